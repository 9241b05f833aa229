"""Offline checks of deploy/ (the plain files, the kustomize base, the Helm chart with default values), the
Dockerfile and the IAM policy. No cluster needed.

Tools: `eval "$(scripts/install-manifest-tools.sh)"; "$PYTEST_BIN" tests/manifests`
(PyYAML, kubernetes-validate for the Kubernetes OpenAPI schemas, $KUSTOMIZE and $HELM; rendering goes through
scripts/render-manifests.sh). Chart-specific checks (values, lint, parity with kustomize) are in test_helm_chart.py.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from manifest_support import (
    ADMIN_PORT, DEPLOY, EXPECTED_KINDS, GRPC_PORT, ISTIOD_DIR, K8S_VERSIONS, NAME, NAMESPACE, NONROOT_UID,
    PEER_BOOTSTRAP, PEERS_NAME, REPO, TLS_DIR, XDS_ADDRESS, container, env_by_name, helm_docs, k8s_manifest_files,
    kustomize_docs, load_docs, matches, network_policy_admits, one, plain_docs, pod_labels,
    port_by_name, quantity, seconds, validate_strict,
)

READ_ACTIONS = {
    "servicediscovery:ListNamespaces",
    "servicediscovery:ListServices",
    "servicediscovery:DiscoverInstances",
    "servicediscovery:DiscoverInstancesRevision",
    # Optional (service attributes; without it the defaults apply), in a statement of its own.
    "servicediscovery:GetServiceAttributes",
}
SOURCES = ("plain", "kustomize", "helm")


def all_sources():
    """The invariants hold for the plain files, the kustomize output and the chart's default rendering."""
    return pytest.mark.parametrize("source", SOURCES)


def rendered_sources():
    return pytest.mark.parametrize("source", ("kustomize", "helm"))


def docs_for(source: str) -> list[dict]:
    return {"plain": plain_docs, "kustomize": kustomize_docs, "helm": helm_docs}[source]()


# ---------------------------------------------------------------------------------------------- schemas


def test_manifest_files_present():
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    for required in ("kustomization.yaml", "serviceaccount.yaml", "deployment.yaml", "pdb.yaml", "service.yaml",
                     "aws-config.yaml", "networkpolicy.yaml", "iam-policy.json", "istiod/istio-operator.yaml",
                     "istiod/helm-values.yaml", "README.md", "helm/cloudmap-xds/Chart.yaml",
                     "helm/cloudmap-xds/values.yaml", "helm/cloudmap-xds/values.schema.json"):
        assert required in names, f"deploy/{required} missing"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", k8s_manifest_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_plain_manifest_valid_against_openapi(path: Path, version: str):
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        validate_strict(doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@rendered_sources()
def test_rendered_manifests_valid_against_openapi(source: str, version: str):
    docs = docs_for(source)
    assert {d["kind"] for d in docs} == EXPECTED_KINDS
    assert len(docs) == len(EXPECTED_KINDS) + 1, "one object of each kind, two Services (istiod's and the peers')"
    for doc in docs:
        validate_strict(doc, version)


def test_strict_validation_rejects_a_typo():
    """The schema check is not vacuous: a misspelled field in the Deployment must be rejected."""
    deploy = one(load_docs(DEPLOY / "deployment.yaml"), "Deployment")
    validate_strict(deploy, K8S_VERSIONS[0])
    broken = copy.deepcopy(deploy)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strict(broken, K8S_VERSIONS[0])


def test_kustomization_lists_every_manifest_and_sets_namespace_and_labels():
    kust = load_docs(DEPLOY / "kustomization.yaml")[0]
    assert kust["namespace"] == NAMESPACE
    assert sorted(kust["resources"]) == sorted(p.name for p in k8s_manifest_files()), \
        "kustomization resources must list every manifest in deploy/ (and nothing from deploy/istiod/)"
    pairs = {}
    for entry in kust.get("labels", []):
        pairs.update(entry.get("pairs", {}))
    pairs.update(kust.get("commonLabels", {}))
    assert pairs.get("app.kubernetes.io/name") == NAME


@rendered_sources()
def test_rendered_objects_are_namespaced_and_labelled(source):
    for doc in docs_for(source):
        meta = doc["metadata"]
        assert meta.get("namespace") == NAMESPACE, f"{doc['kind']}/{meta['name']} not in {NAMESPACE}"
        assert meta.get("labels", {}).get("app.kubernetes.io/name") == NAME, f"{doc['kind']}/{meta['name']}"


# ---------------------------------------------------------------------------------------------- Deployment


@all_sources()
def test_deployment_shape(source):
    deploy = one(docs_for(source), "Deployment", NAME)
    spec = deploy["spec"]
    assert spec["replicas"] == 2
    pod_labels = spec["template"]["metadata"]["labels"]
    assert matches(spec["selector"], pod_labels)
    assert pod_labels.get("app.kubernetes.io/name") == NAME
    c = container(deploy)
    assert c["args"] == ["serve", "--log-format", "json"]
    assert c.get("command") is None, "the image ENTRYPOINT is the binary; only args are set"
    flat = json.dumps(deploy)
    assert "--registry-file" not in flat and "REGISTRY_FILE" not in flat, "Cloud Map mode only"


@all_sources()
def test_sidecar_injection_disabled(source):
    tmpl = one(docs_for(source), "Deployment", NAME)["spec"]["template"]["metadata"]
    assert tmpl["annotations"]["sidecar.istio.io/inject"] == "false"
    assert tmpl["labels"]["sidecar.istio.io/inject"] == "false"


@all_sources()
def test_ports_and_listen_addresses(source):
    c = container(one(docs_for(source), "Deployment", NAME))
    assert port_by_name(c, "grpc-xds") == GRPC_PORT
    assert port_by_name(c, "admin") == ADMIN_PORT
    env = env_by_name(c)
    # If the listen addresses are set explicitly they must agree with the declared container ports.
    for var, port in (("CLOUDMAP_XDS_GRPC_ADDR", GRPC_PORT), ("CLOUDMAP_XDS_ADMIN_ADDR", ADMIN_PORT)):
        if var in env:
            assert env[var]["value"].rsplit(":", 1)[1] == str(port), f"{var}={env[var]['value']}"


@all_sources()
def test_probes_hit_admin_port(source):
    c = container(one(docs_for(source), "Deployment", NAME))
    assert port_by_name(c, "admin") == ADMIN_PORT
    expected = {"readinessProbe": "/ready", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        assert probe in c, f"{probe} missing"
        get = c[probe]["httpGet"]
        assert get["path"] == path, f"{probe} path {get['path']}"
        assert get["port"] in ("admin", ADMIN_PORT), f"{probe} port {get['port']}"


@all_sources()
def test_security_context(source):
    pod = one(docs_for(source), "Deployment", NAME)["spec"]["template"]["spec"]
    c = container({"spec": {"template": {"spec": pod}}})
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})

    def eff(key):
        return csc.get(key, psc.get(key))

    assert eff("runAsNonRoot") is True
    assert eff("runAsUser") == NONROOT_UID
    assert csc.get("readOnlyRootFilesystem") is True
    assert csc.get("allowPrivilegeEscalation") is False
    assert csc.get("privileged", False) is False
    assert csc.get("capabilities", {}).get("drop") == ["ALL"]
    assert not csc.get("capabilities", {}).get("add")
    assert eff("seccompProfile") == {"type": "RuntimeDefault"}
    assert pod.get("hostNetwork", False) is False
    assert pod.get("automountServiceAccountToken") is False, "the server never calls the Kubernetes API"


@all_sources()
def test_resources_set(source):
    res = container(one(docs_for(source), "Deployment", NAME))["resources"]
    for kind in ("cpu", "memory"):
        req, lim = quantity(res["requests"][kind]), quantity(res["limits"][kind])
        assert 0 < req <= lim, f"{kind}: request {req} limit {lim}"


@all_sources()
def test_graceful_shutdown_fits(source):
    deploy = one(docs_for(source), "Deployment", NAME)
    env = env_by_name(container(deploy))
    grace = seconds(env["CLOUDMAP_XDS_SHUTDOWN_GRACE_PERIOD"]["value"]) if "CLOUDMAP_XDS_SHUTDOWN_GRACE_PERIOD" in env \
        else 10
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


@all_sources()
@pytest.mark.parametrize("topology_key", ["topology.kubernetes.io/zone", "kubernetes.io/hostname"])
def test_replicas_spread_over_zones_and_nodes(source, topology_key):
    """One zone or node lost leaves a replica serving istiod; soft, so a one-zone/one-node cluster still runs all."""
    deploy = one(docs_for(source), "Deployment", NAME)
    pod = deploy["spec"]["template"]["spec"]
    found = [t for t in pod.get("topologySpreadConstraints", []) if t["topologyKey"] == topology_key]
    assert len(found) == 1, f"one spread constraint on {topology_key}"
    spread = found[0]
    assert spread["maxSkew"] == 1
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert matches(spread["labelSelector"], pod_labels(deploy)), "the constraint counts our own pods"
    # Count only the pods of one ReplicaSet, so a rollout spreads the new pods by themselves.
    assert spread.get("matchLabelKeys") == ["pod-template-hash"]


@all_sources()
def test_replicas_prefer_distinct_nodes(source):
    deploy = one(docs_for(source), "Deployment", NAME)
    anti = deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti, "hard anti-affinity blocks small clusters"
    terms = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert len(terms) == 1
    assert terms[0]["weight"] == 100
    term = terms[0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert matches(term["labelSelector"], pod_labels(deploy))


@all_sources()
def test_env_wiring(source):
    docs = docs_for(source)
    deploy = one(docs, "Deployment", NAME)
    env = env_by_name(container(deploy))
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["AWS_REGION"]["valueFrom"]["configMapKeyRef"]["name"] == "aws-config"
    assert env["AWS_REGION"]["valueFrom"]["configMapKeyRef"]["key"] == "aws-region"
    for var, key in (("AWS_ACCESS_KEY_ID", "access-key-id"), ("AWS_SECRET_ACCESS_KEY", "secret-access-key")):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"], ref.get("optional")) == ("aws-creds", key, True), var
    assert "AWS_SESSION_TOKEN" not in env
    assert env["CLOUDMAP_XDS_LOG"]["value"] == "info"
    assert seconds(env["CLOUDMAP_XDS_POLL_INTERVAL"]["value"]) >= 1


def test_aws_config_keys_exist():
    docs = load_docs(DEPLOY / "aws-config.yaml")
    secret = one(docs, "Secret", "aws-creds")
    cm = one(docs, "ConfigMap", "aws-config")
    secret_data = {**secret.get("data", {}), **secret.get("stringData", {})}
    assert set(secret_data) == {"access-key-id", "secret-access-key"}
    # Blank placeholders: the AWS SDK treats blank env credentials as unset and goes on to IRSA / Pod Identity.
    # A dummy non-empty value would be sent to AWS as a key and shadow IRSA.
    assert all(v == "" for v in secret_data.values()), "ship no credential, not even a dummy one"
    assert re.fullmatch(r"[a-z]{2}(-gov)?-[a-z]+-\d", cm["data"]["aws-region"]), cm["data"]["aws-region"]


def test_service_account_and_irsa_hint():
    text = (DEPLOY / "serviceaccount.yaml").read_text()
    sa = one(load_docs(DEPLOY / "serviceaccount.yaml"), "ServiceAccount", NAME)
    assert "annotations" not in sa["metadata"], "the IRSA annotation is shown commented out"
    assert re.search(r"^\s*#\s*eks\.amazonaws\.com/role-arn:\s*arn:aws:iam::", text, re.M)
    deploy = one(plain_docs(), "Deployment", NAME)
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == NAME


# ---------------------------------------------------------------------------------------------- Service, PDB


@all_sources()
def test_service_targets_pods(source):
    docs = docs_for(source)
    deploy = one(docs, "Deployment", NAME)
    svc = one(docs, "Service", NAME)
    c = container(deploy)
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] and all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {"grpc-xds", "http-metrics"}

    def target(p):
        t = p.get("targetPort", p["port"])
        return port_by_name(c, t) if isinstance(t, str) else t

    grpc = ports["grpc-xds"]
    assert grpc["port"] == GRPC_PORT and target(grpc) == GRPC_PORT
    assert grpc["appProtocol"] == "grpc"
    metrics = ports["http-metrics"]
    assert target(metrics) == ADMIN_PORT
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == ADMIN_PORT
    assert ann.get("prometheus.io/path", "/metrics") == "/metrics"


@all_sources()
def test_peers_find_each_other_through_a_headless_service(source):
    """--peer-bootstrap names a headless Service (every Ready replica's address, not one virtual IP) whose port is
    the gRPC port, and the NetworkPolicy admits the replicas to it."""
    docs = docs_for(source)
    deploy = one(docs, "Deployment", NAME)
    peers = one(docs, "Service", PEERS_NAME)
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"].get("publishNotReadyAddresses", False) is False, "only Ready replicas have a set to lend"
    assert matches({"matchLabels": peers["spec"]["selector"]}, pod_labels(deploy))
    (port,) = peers["spec"]["ports"]
    assert port["port"] == GRPC_PORT and port_by_name(container(deploy), port["targetPort"]) == GRPC_PORT
    env = [e["name"] for e in container(deploy)["env"]]
    assert env_by_name(container(deploy))["CLOUDMAP_XDS_PEER_BOOTSTRAP"]["value"] == PEER_BOOTSTRAP
    assert env.index("POD_NAMESPACE") < env.index("CLOUDMAP_XDS_PEER_BOOTSTRAP"), "$(POD_NAMESPACE) expands"
    policy = one(docs, "NetworkPolicy", NAME)
    assert network_policy_admits(policy, deploy, pod=pod_labels(deploy), namespace=NAMESPACE, port=GRPC_PORT)


@all_sources()
def test_pdb_selects_deployment_pods(source):
    docs = docs_for(source)
    deploy = one(docs, "Deployment", NAME)
    pdb = one(docs, "PodDisruptionBudget", NAME)
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["minAvailable"] < deploy["spec"]["replicas"], "a PDB at replicas would block drains"
    assert matches(pdb["spec"]["selector"], deploy["spec"]["template"]["metadata"]["labels"])


# ---------------------------------------------------------------------------------------------- NetworkPolicy

ISTIOD_POD = {"app": "istiod", "istio": "pilot", "istio.io/rev": "default"}
PROMETHEUS_POD = {"app.kubernetes.io/name": "prometheus", "app.kubernetes.io/instance": "kube-prometheus-stack"}
OTHER_POD = {"app": "sleep"}


def network_policy_case(source):
    docs = docs_for(source)
    return one(docs, "NetworkPolicy", NAME), one(docs, "Deployment", NAME), one(docs, "Service", NAME)


@all_sources()
def test_network_policy_selects_our_pods_and_isolates_ingress_only(source):
    policy, deploy, _ = network_policy_case(source)
    assert matches(policy["spec"]["podSelector"], pod_labels(deploy))
    assert policy["spec"]["podSelector"] != {}, "must not isolate every pod of the namespace"
    # Egress stays open: Cloud Map endpoints have no fixed addresses.
    assert policy["spec"]["policyTypes"] == ["Ingress"]


@all_sources()
def test_network_policy_ports_match_service_and_container(source):
    policy, deploy, svc = network_policy_case(source)
    c = container(deploy)
    svc_targets = {p["name"]: port_by_name(c, p["targetPort"]) for p in svc["spec"]["ports"]}
    policy_ports = sorted(p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"])
    assert policy_ports == sorted([port_by_name(c, "grpc-xds"), port_by_name(c, "admin")])
    assert sorted(svc_targets.values()) == policy_ports, "every Service port reaches a port the policy opens"


@all_sources()
def test_network_policy_admits_istiod_to_grpc_only(source):
    policy, deploy, _ = network_policy_case(source)

    def admits(pod, namespace, port, **kw):
        return network_policy_admits(policy, deploy, pod=pod, namespace=namespace, port=port, **kw)

    assert admits(ISTIOD_POD, "istio-system", GRPC_PORT)
    assert admits({"app": "istiod", "istio.io/rev": "1-26-0"}, "istio-system", GRPC_PORT), "revisioned istiod"
    assert not admits(ISTIOD_POD, "default", GRPC_PORT), "an app=istiod pod outside istio-system"
    assert not admits(OTHER_POD, "istio-system", GRPC_PORT)
    assert not admits(OTHER_POD, "default", GRPC_PORT)
    assert not admits(PROMETHEUS_POD, "monitoring", GRPC_PORT)
    # Our other replicas (same namespace) may dial the gRPC port; the same labels elsewhere may not.
    assert admits(pod_labels(deploy), NAMESPACE, GRPC_PORT)
    assert not admits(pod_labels(deploy), "default", GRPC_PORT)


@all_sources()
def test_network_policy_admits_scrapers_to_admin_only(source):
    policy, deploy, _ = network_policy_case(source)

    def admits(pod, namespace, port):
        return network_policy_admits(policy, deploy, pod=pod, namespace=namespace, port=port)

    for namespace in ("monitoring", "istio-system", "prometheus"):
        assert admits(PROMETHEUS_POD, namespace, ADMIN_PORT), namespace
    assert not admits(OTHER_POD, "monitoring", ADMIN_PORT)
    assert not admits(OTHER_POD, "istio-system", ADMIN_PORT)
    assert not admits(ISTIOD_POD, "istio-system", ADMIN_PORT)
    for port in (8080, 15010, 15014):
        assert not admits(PROMETHEUS_POD, "monitoring", port) and not admits(ISTIOD_POD, "istio-system", port)


def test_network_policy_evaluator_sees_a_kustomize_injected_label():
    """The istiod check is not vacuous: a peer selector that also requires our name label (what kustomize's
    includeSelectors does to a podSelector.matchLabels) admits no istiod pod."""
    policy, deploy, _ = network_policy_case("kustomize")
    broken = copy.deepcopy(policy)
    peer = broken["spec"]["ingress"][0]["from"][0]
    peer["podSelector"] = {"matchLabels": {"app": "istiod", "app.kubernetes.io/name": NAME}}
    assert network_policy_admits(policy, deploy, pod=ISTIOD_POD, namespace="istio-system", port=GRPC_PORT)
    assert not network_policy_admits(broken, deploy, pod=ISTIOD_POD, namespace="istio-system", port=GRPC_PORT)


# ---------------------------------------------------------------------------------------------- IAM


def test_iam_policy_is_read_only():
    policy = json.loads((DEPLOY / "iam-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    actions: set[str] = set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        assert "NotAction" not in st and "NotResource" not in st
        acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        for a in acts:
            assert "*" not in a, f"wildcard action {a}"
            service, _, op = a.partition(":")
            assert service == "servicediscovery", a
            assert re.match(r"(List|Get|Discover)[A-Z]", op), f"not a read action: {a}"
            actions.add(a)
    assert actions == READ_ACTIONS


# ---------------------------------------------------------------------------------------------- istiod


def _config_sources(doc: dict) -> list[str]:
    return [s["address"] for s in doc["meshConfig"]["configSources"]]


@pytest.mark.parametrize("fname", ["istio-operator.yaml", "helm-values.yaml", "tls-helm-values.yaml",
                                   "tls-credential-name-helm-values.yaml"])
def test_istiod_config_sources_keep_k8s(fname):
    path = ISTIOD_DIR / fname
    doc = one(load_docs(path), "IstioOperator") if fname == "istio-operator.yaml" else load_docs(path)[0]
    if fname == "istio-operator.yaml":
        assert doc["apiVersion"] == "install.istio.io/v1alpha1"
        doc = doc["spec"]
    addrs = _config_sources(doc)
    assert "k8s://" in addrs, "without k8s:// every Kubernetes Istio CRD vanishes"
    assert XDS_ADDRESS in addrs
    assert len(addrs) == len(set(addrs))
    text = path.read_text()
    assert re.search(r"^#.*k8s://", text, re.M), "comment explaining why k8s:// must stay"


@rendered_sources()
def test_xds_address_matches_service(source):
    svc = one(docs_for(source), "Service", NAME)
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc-xds")
    assert XDS_ADDRESS == f"xds://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{port}"


# ---------------------------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stages.append([])
        assert stages, f"instruction before FROM: {line}"
        stages[-1].append((instr, rest.strip()))
    return stages


def test_dockerfile_final_stage_runs_non_root():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build"
    build, final = stages[0], stages[-1]
    assert any(i == "RUN" and "cargo build --release --locked" in r for i, r in build)
    base = final[0][1].split()[0]
    assert base.startswith("gcr.io/distroless/") and base.endswith(":nonroot"), base
    users = [r for i, r in final if i == "USER"]
    assert users, "final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid == str(NONROOT_UID)
    deploy = one(plain_docs(), "Deployment", NAME)
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    entry = [json.loads(r) for i, r in final if i == "ENTRYPOINT"]
    cmd = [json.loads(r) for i, r in final if i == "CMD"]
    assert entry[-1] == ["/usr/local/bin/cloudmap-xds"]
    assert cmd[-1] == ["serve"]
    exposed = {int(p.split("/")[0]) for i, r in final if i == "EXPOSE" for p in shlex.split(r)}
    assert exposed == {GRPC_PORT, ADMIN_PORT}
    copies = [r for i, r in final if i == "COPY"]
    assert any(r.startswith("--from=") and r.endswith("/usr/local/bin/cloudmap-xds") for r in copies)


def test_dockerignore_excludes_target_and_git():
    entries = {l.strip().rstrip("/") for l in (REPO / ".dockerignore").read_text().splitlines()}
    assert {"target", ".git"} <= entries


# ---------------------------------------------------------------------------------------------- TLS component

TLS_COMPONENT = DEPLOY / "tls"  # an optional kustomize component (cert-manager Certificate, a patch)


def rendered_with_tls(tmp_path: Path) -> list[dict]:
    """`kustomize build` of deploy/ with `components: [tls]` added, as the README says to enable it."""
    import os
    import shutil
    import subprocess

    copy_of = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy_of)
    kust = copy_of / "kustomization.yaml"
    kust.write_text(kust.read_text() + "components:\n- tls\n")
    out = subprocess.run([os.environ["KUSTOMIZE"], "build", str(copy_of)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"kustomize build with the tls component failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def test_tls_component_mounts_the_certificate_secret(tmp_path: Path):
    docs = rendered_with_tls(tmp_path)
    cert = one(docs, "Certificate", "cloudmap-xds-tls")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert cert["metadata"]["namespace"] == NAMESPACE
    svc = one(docs, "Service", NAME)
    assert f"{svc['metadata']['name']}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    deploy = one(docs, "Deployment", NAME)
    for version in K8S_VERSIONS:
        validate_strict(deploy, version)
    spec = deploy["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == cert["spec"]["secretName"]
    mount = next(m for m in container(deploy)["volumeMounts"] if m["name"] == "tls")
    assert "subPath" not in mount, "a subPath mount never sees the renewed files"
    assert mount["mountPath"] == TLS_DIR, "the same path as the Helm chart's TLS values"
    env = {e["name"]: e.get("value") for e in container(deploy)["env"]}
    assert env["CLOUDMAP_XDS_TLS_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
    assert env["CLOUDMAP_XDS_TLS_KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    # The replicas dial each other over TLS: they trust the issuer's CA and check the peers' Service name.
    assert env["CLOUDMAP_XDS_PEER_CA_FILE"] == f"{mount['mountPath']}/ca.crt"
    assert f"{PEERS_NAME}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    # The component changes nothing else: still every manifest of the plain build.
    assert {d["kind"] for d in docs} == EXPECTED_KINDS | {"Certificate"}


def test_tls_istiod_values_verify_the_certificate_name():
    doc = load_docs(ISTIOD_DIR / "tls-helm-values.yaml")[0]
    source = next(s for s in doc["meshConfig"]["configSources"] if s["address"] == XDS_ADDRESS)
    tls = source["tlsSettings"]
    assert tls["mode"] == "SIMPLE", "istiod implements only SIMPLE for config sources"
    assert "BEGIN CERTIFICATE" in tls["caCertificates"], "in Istio 1.26 caCertificates is the PEM text itself"
    cert = one(load_docs(TLS_COMPONENT / "certificate.yaml"), "Certificate")
    assert tls["sni"] in cert["spec"]["dnsNames"]


def test_tls_istiod_values_with_credential_name_read_our_certificate_secret():
    """istiod reads the CA from the Secret cert-manager writes for our Certificate (its ca.crt), in istiod's own
    namespace; credentialName excludes caCertificates (istiod refuses both)."""
    doc = load_docs(ISTIOD_DIR / "tls-credential-name-helm-values.yaml")[0]
    source = next(s for s in doc["meshConfig"]["configSources"] if s["address"] == XDS_ADDRESS)
    tls = source["tlsSettings"]
    assert tls["mode"] == "SIMPLE"
    assert "caCertificates" not in tls and "caCrl" not in tls
    cert = one(load_docs(TLS_COMPONENT / "certificate.yaml"), "Certificate")
    assert tls["credentialName"] == cert["spec"]["secretName"]
    assert tls["sni"] in cert["spec"]["dnsNames"]
    assert NAMESPACE == "istio-system", "the Secret is in istiod's namespace, the kustomization's too"
