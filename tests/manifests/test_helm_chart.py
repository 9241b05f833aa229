"""Offline checks of the Helm chart deploy/helm/cloudmap-xds: `helm lint`, the same objects as the kustomize base
for the default values, and what each value changes. The invariants shared with the kustomize base (schema,
security context, probes, NetworkPolicy, spread...) run on the chart's default rendering in test_manifests.py.

Rendering goes through scripts/render-manifests.sh (release cloudmap-xds in istio-system), like the tests that
apply the chart to a real API server.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import shlex
import tomllib

import pytest
import yaml

from manifest_support import (
    ADMIN_PORT, CHART, DEPLOY, GRPC_PORT, HELM_ONLY_LABELS, K8S_VERSIONS, NAME, NAMESPACE, PEER_BOOTSTRAP, PEERS_NAME,
    REPO, TLS_DIR, container, env_by_name, helm, helm_docs, helm_fails, istiod_service, kustomize_docs, load_docs,
    matches, network_policy_admits, one, parse, pod_labels, port_by_name, render, server_flags, validate_strict,
)

ROLE_ARN = "arn:aws:iam::111122223333:role/cloudmap-xds-read"

# Value sets a user is likely to install with; every one must render schema-valid, coherent objects.
SCENARIOS = {
    "defaults": (),
    "irsa": ("--set", f"aws.roleArn={ROLE_ARN}", "--set", "aws.region=eu-west-1"),
    "static-keys": ("--set", "aws.credentials.accessKeyId=AKIAEXAMPLE",
                    "--set", "aws.credentials.secretAccessKey=c2VjcmV0"),
    "own-secret": ("--set", "aws.credentials.create=false", "--set", "aws.credentials.secretName=my-aws-keys"),
    "tuned": ("--set", "replicaCount=3", "--set", "publishNamespace=mesh-external", "--set", "logFormat=text",
              "--set", "logLevel=debug", "--set", "pollInterval=10s", "--set", "resources.limits.memory=512Mi",
              "--set", "env.CLOUDMAP_XDS_HEALTH_FILTER=HEALTHY", "--set", "aws.disableInstanceMetadata=true",
              "--set", "priorityClassName=system-cluster-critical"),
    "other-ports": ("--set", "ports.grpc=16099", "--set", "ports.admin=16098"),
    "no-extras": ("--set", "networkPolicy.enabled=false", "--set", "pdb.enabled=false",
                  "--set", "spread.enabled=false", "--set", "metrics.prometheusAnnotations=false",
                  "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=shared"),
    "tls": ("--set", "tls.enabled=true", "--set", "tls.secretName=cloudmap-xds-tls"),
    "digest": ("--set", "image.repository=111122223333.dkr.ecr.us-east-1.amazonaws.com/cloudmap-xds",
               "--set", "image.digest=sha256:" + "ab" * 32),
}


def scenario_docs(name: str) -> list[dict]:
    return helm_docs(*SCENARIOS[name])


def deployment(docs: list[dict]) -> dict:
    return one(docs, "Deployment")


# ---------------------------------------------------------------------------------------------- lint, metadata


@pytest.mark.parametrize("scenario", ["defaults", "irsa", "no-extras", "tls"])
def test_helm_lint_strict(scenario):
    out = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *SCENARIOS[scenario])
    assert out.returncode == 0, f"helm lint failed:\n{out.stdout}\n{out.stderr}"
    assert "0 chart(s) failed" in out.stdout


def test_chart_version_follows_crate_and_kustomize_image():
    chart = load_docs(CHART / "Chart.yaml")[0]
    crate = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]
    kust = load_docs(DEPLOY / "kustomization.yaml")[0]
    tag = next(i["newTag"] for i in kust["images"] if i["name"] == NAME)
    assert chart["apiVersion"] == "v2" and chart["name"] == NAME
    assert chart["appVersion"] == crate == tag, "image tag default, crate version and kustomize image agree"
    assert container(deployment(scenario_docs("defaults")))["image"] == f"{NAME}:{crate}"


# ---------------------------------------------------------------------------------------------- parity


def without_helm_conventions(doc: dict) -> dict:
    """The object minus what only Helm adds: its standard labels (in metadata and in every selector) and the
    checksum/* pod annotations that roll the pods when the AWS config changes."""
    doc = copy.deepcopy(doc)

    def walk(node):
        if isinstance(node, dict):
            for key in ("labels", "matchLabels", "selector"):  # a Service's selector is a plain label map
                if isinstance(node.get(key), dict) and all(isinstance(v, str) for v in node[key].values()):
                    for label in HELM_ONLY_LABELS:
                        node[key].pop(label, None)
            if isinstance(node.get("annotations"), dict):
                for ann in [a for a in node["annotations"] if a.startswith("checksum/")]:
                    del node["annotations"][ann]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return doc


def by_identity(docs: list[dict]) -> dict[tuple[str, str, str], dict]:
    out = {}
    for d in docs:
        key = (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", ""))
        assert key not in out, f"duplicate object {key}"
        out[key] = d
    return out


def test_chart_defaults_render_the_kustomize_base():
    """Same kinds, names, namespaces and the same specs (container args, env, ports, probes, resources,
    securityContext, selectors, NetworkPolicy, spread...) as `kustomize build deploy/`, object for object."""
    helm_objects = by_identity(scenario_docs("defaults"))
    kust_objects = by_identity(kustomize_docs())
    assert sorted(helm_objects) == sorted(kust_objects)
    for key, kust in kust_objects.items():
        ours = without_helm_conventions(helm_objects[key])
        if ours != kust:
            diff = "\n".join(difflib.unified_diff(
                yaml.safe_dump(kust, sort_keys=True).splitlines(), yaml.safe_dump(ours, sort_keys=True).splitlines(),
                "kustomize", "helm", lineterm=""))
            pytest.fail(f"{key} differs between the kustomize base and the chart:\n{diff}")


def test_chart_labels_are_the_helm_conventions_on_top_of_the_base():
    for doc in scenario_docs("defaults"):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == NAME
        assert labels["app.kubernetes.io/instance"] == NAME
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert set(labels) == {"app.kubernetes.io/name"} | HELM_ONLY_LABELS, doc["kind"]


def test_parity_check_sees_a_difference():
    """The parity comparison is not vacuous: a changed probe survives the normalisation."""
    deploy = deployment(scenario_docs("defaults"))
    changed = copy.deepcopy(deploy)
    container(changed)["readinessProbe"]["httpGet"]["path"] = "/healthz"
    assert without_helm_conventions(changed) != without_helm_conventions(deploy)
    kust = one(kustomize_docs(), "Deployment", NAME)
    assert without_helm_conventions(deploy) == kust


# ---------------------------------------------------------------------------------------------- every scenario


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_valid_against_openapi(scenario, version):
    docs = scenario_docs(scenario)
    assert docs
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']} carries its namespace"
        validate_strict(doc, version)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_selectors_and_ports_agree(scenario):
    docs = scenario_docs(scenario)
    deploy = deployment(docs)
    labels = pod_labels(deploy)
    c = container(deploy)
    assert matches(deploy["spec"]["selector"], labels)
    svc = istiod_service(docs)
    for service in (d for d in docs if d["kind"] == "Service"):
        assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items()), service["metadata"]["name"]
        for p in service["spec"]["ports"]:
            port_by_name(c, p["targetPort"])
    env = env_by_name(c)
    assert env["CLOUDMAP_XDS_GRPC_ADDR"]["value"] == f"0.0.0.0:{port_by_name(c, 'grpc-xds')}"
    assert env["CLOUDMAP_XDS_ADMIN_ADDR"]["value"] == f"0.0.0.0:{port_by_name(c, 'admin')}"
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc-xds")
    assert grpc_port == port_by_name(c, "grpc-xds"), "the Service port istiod dials is the container's"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for doc in (d for d in docs if d["kind"] == kind):
            selector = doc["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
            assert matches(selector, labels), kind
    sa = deploy["spec"]["template"]["spec"]["serviceAccountName"]
    sas = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert not sas or sas[0]["metadata"]["name"] == sa


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_uses_only_flags_the_server_has(scenario):
    """Every --flag and CLOUDMAP_XDS_* variable the chart sets is declared by the server's clap structs."""
    flags, envs = server_flags()
    c = container(deployment(scenario_docs(scenario)))
    used_flags = {a for a in c["args"] if a.startswith("--")}
    if scenario == "tls" and not {"--tls-cert-file", "--tls-key-file"} <= flags:
        pytest.skip("--tls-cert-file/--tls-key-file are not in this build yet (issue 11 item 5); "
                    "this check covers them once they are")
    assert used_flags <= flags, f"unknown flags: {used_flags - flags}"
    used_env = {e["name"] for e in c["env"] if e["name"].startswith("CLOUDMAP_XDS_")}
    assert used_env <= envs, f"unknown variables: {used_env - envs}"


# ---------------------------------------------------------------------------------------------- values


def test_image_tag_and_digest():
    c = container(deployment(helm_docs("--set", "image.repository=registry.example/cmx", "--set", "image.tag=1.2.3",
                                       "--set", "image.pullPolicy=Always")))
    assert (c["image"], c["imagePullPolicy"]) == ("registry.example/cmx:1.2.3", "Always")
    c = container(deployment(scenario_docs("digest")))
    assert c["image"] == "111122223333.dkr.ecr.us-east-1.amazonaws.com/cloudmap-xds@sha256:" + "ab" * 32


def test_replicas():
    assert deployment(helm_docs("--set", "replicaCount=3"))["spec"]["replicas"] == 3


def test_irsa_role_and_region():
    docs = scenario_docs("irsa")
    sa = one(docs, "ServiceAccount", NAME)
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": ROLE_ARN}
    assert sa["automountServiceAccountToken"] is False
    assert one(docs, "ConfigMap", "aws-config")["data"] == {"aws-region": "eu-west-1"}
    # The Secret stays empty (the keys are optional for the pods), so IRSA is not shadowed.
    secret = one(docs, "Secret", "aws-creds")
    assert secret["stringData"] == {"access-key-id": "", "secret-access-key": ""}
    assert "annotations" not in one(scenario_docs("defaults"), "ServiceAccount", NAME)["metadata"]


def test_static_keys_fill_the_secret_and_roll_the_pods():
    docs = scenario_docs("static-keys")
    secret = one(docs, "Secret", "aws-creds")
    assert secret["stringData"] == {"access-key-id": "AKIAEXAMPLE", "secret-access-key": "c2VjcmV0"}
    before = deployment(scenario_docs("defaults"))["spec"]["template"]["metadata"]["annotations"]
    after = deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/aws-config"] != after["checksum/aws-config"], "changed keys restart the pods"
    region = deployment(helm_docs("--set", "aws.region=ap-southeast-2"))["spec"]["template"]["metadata"]
    assert region["annotations"]["checksum/aws-config"] != before["checksum/aws-config"]


def test_own_secret_is_referenced_not_created():
    docs = scenario_docs("own-secret")
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = env_by_name(container(deployment(docs)))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "my-aws-keys" and ref["optional"] is True


def test_tuned_values_reach_the_container():
    docs = scenario_docs("tuned")
    deploy = deployment(docs)
    c = container(deploy)
    env = {k: v.get("value") for k, v in env_by_name(c).items()}
    assert deploy["spec"]["replicas"] == 3
    assert c["args"] == ["serve", "--log-format", "text"]
    assert env["CLOUDMAP_XDS_PUBLISH_NAMESPACE"] == "mesh-external"
    assert env["CLOUDMAP_XDS_LOG"] == "debug"
    assert env["CLOUDMAP_XDS_POLL_INTERVAL"] == "10s"
    assert env["CLOUDMAP_XDS_HEALTH_FILTER"] == "HEALTHY"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert c["resources"]["limits"]["memory"] == "512Mi"
    assert c["resources"]["requests"] == {"cpu": "150m", "memory": "96Mi"}, "other resources keep their defaults"
    assert deploy["spec"]["template"]["spec"]["priorityClassName"] == "system-cluster-critical"
    defaults = env_by_name(container(deployment(scenario_docs("defaults"))))
    assert "CLOUDMAP_XDS_PUBLISH_NAMESPACE" not in defaults, "default: the pod's namespace (POD_NAMESPACE)"
    assert "AWS_EC2_METADATA_DISABLED" not in defaults


def test_other_ports_follow_everywhere():
    docs = scenario_docs("other-ports")
    deploy = deployment(docs)
    c = container(deploy)
    assert (port_by_name(c, "grpc-xds"), port_by_name(c, "admin")) == (16099, 16098)
    svc = one(docs, "Service", NAME)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc-xds": 16099, "http-metrics": 16098}
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == "16098"
    assert deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "16098"
    policy = one(docs, "NetworkPolicy", NAME)
    istiod = {"app": "istiod"}
    assert network_policy_admits(policy, deploy, pod=istiod, namespace="istio-system", port=16099)
    assert not network_policy_admits(policy, deploy, pod=istiod, namespace="istio-system", port=GRPC_PORT)


def test_optional_objects_can_be_left_out():
    docs = scenario_docs("no-extras")
    assert {d["kind"] for d in docs} == {"Secret", "ConfigMap", "Deployment", "Service"}
    pod = deployment(docs)["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == "shared"
    assert "topologySpreadConstraints" not in pod["spec"] and "affinity" not in pod["spec"]
    assert not any(a.startswith("prometheus.io/") for a in pod["metadata"]["annotations"])
    assert "annotations" not in one(docs, "Service", NAME)["metadata"]


def test_spread_can_be_made_strict_or_replaced():
    pod = deployment(helm_docs("--set", "spread.zone.whenUnsatisfiable=DoNotSchedule"))["spec"]["template"]["spec"]
    by_key = {t["topologyKey"]: t["whenUnsatisfiable"] for t in pod["topologySpreadConstraints"]}
    assert by_key == {"topology.kubernetes.io/zone": "DoNotSchedule", "kubernetes.io/hostname": "ScheduleAnyway"}
    custom = [{"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
               "labelSelector": {"matchLabels": {"app.kubernetes.io/name": NAME}}}]
    pod = deployment(helm_docs("--set-json", f"topologySpreadConstraints={json.dumps(custom)}",
                               "--set-json", 'affinity={"nodeAffinity":{}}'))["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"] == custom
    assert pod["affinity"] == {"nodeAffinity": {}}


def test_network_policy_scrapers_and_istiod_are_configurable():
    docs = helm_docs("--set", "networkPolicy.scrapers.namespaceLabels.kubernetes\\.io/metadata\\.name=monitoring",
                     "--set-json", 'networkPolicy.scrapers.podLabels={"app.kubernetes.io/name":"vmagent"}',
                     "--set", "networkPolicy.istiod.namespace=istio-control",
                     "--set", "networkPolicy.allowPeers=false", "--set", "peerBootstrap.enabled=false")
    policy, deploy = one(docs, "NetworkPolicy", NAME), deployment(docs)

    def admits(pod, namespace, port):
        return network_policy_admits(policy, deploy, pod=pod, namespace=namespace, port=port)

    assert admits({"app.kubernetes.io/name": "vmagent"}, "monitoring", ADMIN_PORT)
    assert not admits({"app.kubernetes.io/name": "vmagent"}, "default", ADMIN_PORT)
    assert not admits({"app.kubernetes.io/name": "prometheus"}, "monitoring", ADMIN_PORT)
    assert admits({"app": "istiod"}, "istio-control", GRPC_PORT)
    assert not admits({"app": "istiod"}, "istio-system", GRPC_PORT)
    assert not admits(pod_labels(deploy), NAMESPACE, GRPC_PORT), "allowPeers=false"


def test_peer_bootstrap_follows_its_values():
    """On by default (the kustomize base has it too); off drops the headless Service and the variable; with TLS the
    replicas trust the CA of the TLS Secret; the replicas must be admitted to each other's gRPC port."""
    for scenario in ("defaults", "other-ports", "tls"):
        docs = scenario_docs(scenario)
        env = env_by_name(container(deployment(docs)))
        port = port_by_name(container(deployment(docs)), "grpc-xds")
        assert env["CLOUDMAP_XDS_PEER_BOOTSTRAP"]["value"] == PEER_BOOTSTRAP.replace(str(GRPC_PORT), str(port))
        peers = one(docs, "Service", PEERS_NAME)
        assert [p["port"] for p in peers["spec"]["ports"]] == [port]
        policy = one(docs, "NetworkPolicy", NAME)
        assert network_policy_admits(policy, deployment(docs), pod=pod_labels(deployment(docs)), namespace=NAMESPACE,
                                     port=port), "a replica may dial another's gRPC port"
        assert ("CLOUDMAP_XDS_PEER_CA_FILE" in env) == (scenario == "tls")
    tls_env = env_by_name(container(deployment(scenario_docs("tls"))))
    assert tls_env["CLOUDMAP_XDS_PEER_CA_FILE"]["value"] == f"{TLS_DIR}/ca.crt"
    off = helm_docs("--set", "peerBootstrap.enabled=false")
    assert [d["metadata"]["name"] for d in off if d["kind"] == "Service"] == [NAME]
    assert "CLOUDMAP_XDS_PEER_BOOTSTRAP" not in env_by_name(container(deployment(off)))
    err = helm_fails("--set", "networkPolicy.allowPeers=false")
    assert "peerBootstrap.enabled needs networkPolicy.allowPeers" in err, err
    err = helm_fails("--set", "env.CLOUDMAP_XDS_PEER_BOOTSTRAP=x:1")
    assert "env.CLOUDMAP_XDS_PEER_BOOTSTRAP is set by the chart" in err, err


def test_network_policy_extra_ingress_is_appended():
    extra = [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": ADMIN_PORT, "protocol": "TCP"}]}]
    policy = one(helm_docs("--set-json", f"networkPolicy.extraIngress={json.dumps(extra)}"), "NetworkPolicy")
    assert policy["spec"]["ingress"][-1] == extra[0]
    assert len(policy["spec"]["ingress"]) == 3


def test_tls_mounts_the_secret_and_passes_the_files():
    deploy = deployment(scenario_docs("tls"))
    c = container(deploy)
    assert c["args"] == ["serve", "--log-format", "json",
                         "--tls-cert-file", f"{TLS_DIR}/tls.crt", "--tls-key-file", f"{TLS_DIR}/tls.key"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["tls"]["mountPath"] == TLS_DIR and mounts["tls"]["readOnly"] is True
    assert "subPath" not in mounts["tls"], "a subPath mount never sees a rotated Secret"
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "cloudmap-xds-tls"
    defaults = deployment(scenario_docs("defaults"))
    assert "volumes" not in defaults["spec"]["template"]["spec"] and "volumeMounts" not in container(defaults)
    assert not any("tls" in a for a in container(defaults)["args"]), "TLS is off by default"


def test_release_name_and_namespace_name_the_objects():
    out = render("helm", "--set", "networkPolicy.enabled=true", env={"RELEASE": "mesh", "NAMESPACE": "platform"})
    assert out.returncode == 0, out.stderr
    docs = parse(out.stdout)
    assert {d["metadata"]["namespace"] for d in docs} == {"platform"}
    assert istiod_service(docs)["metadata"]["name"] == "mesh-cloudmap-xds"
    peers = one(docs, "Service", "mesh-cloudmap-xds-peers")
    assert peers["spec"]["clusterIP"] == "None"
    assert env_by_name(container(deployment(docs)))["CLOUDMAP_XDS_PEER_BOOTSTRAP"]["value"] == \
        "mesh-cloudmap-xds-peers.$(POD_NAMESPACE).svc:15099"
    assert deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "mesh-cloudmap-xds"
    assert "# istiod dials xds://mesh-cloudmap-xds.platform.svc:15099" in out.stdout


def test_notes_give_the_xds_address_and_keep_k8s():
    out = helm("install", NAME, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert out.returncode == 0, out.stderr
    notes = out.stdout[out.stdout.index("NOTES:"):]
    sources = re.findall(r"^\s*- address: (\S+)$", notes, re.M)
    assert sources == ["k8s://", f"xds://{NAME}.{NAMESPACE}.svc:{GRPC_PORT}"]
    assert "KEEP `- address: k8s://`" in notes
    assert f"rollout status deploy/{NAME}" in notes


# ---------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("args, message", [
    (("--set", "logFormat=yaml"), "/logFormat"),
    (("--set", "replicas=3"), "'replicas' not allowed"),
    (("--set", "aws.roleArn=my-role"), "/aws/roleArn"),
    (("--set", "aws.region=Ireland"), "/aws/region"),
    (("--set", "pollInterval=5"), "/pollInterval"),
    (("--set", "ports.grpc=70000"), "/ports/grpc"),
    (("--set", "service.type=LoadBalancer"), "/service/type"),
    (("--set", "replicaCount=1"), "pdb.minAvailable (1) must be below replicaCount (1)"),
    (("--set", "tls.enabled=true"), "tls.enabled needs tls.secretName"),
    (("--set", "env.CLOUDMAP_XDS_LOG=debug"), "env.CLOUDMAP_XDS_LOG is set by the chart"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_values_are_refused_with_a_precise_message(args, message):
    assert message in helm_fails(*args)


def test_one_replica_without_pdb_renders():
    docs = helm_docs("--set", "replicaCount=1", "--set", "pdb.enabled=false")
    assert deployment(docs)["spec"]["replicas"] == 1
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]


# ---------------------------------------------------------------------------------------------- READMEs


PLACEHOLDERS = {"<account>": "111122223333", "<region>": "eu-west-1", "<registry>": "registry.example",
                "<arn>": ROLE_ARN}


def readme_helm_installs() -> list[tuple[str, list[str]]]:
    """Every `helm upgrade --install ... deploy/helm/cloudmap-xds ...` command of the READMEs, as argv."""
    found = []
    for readme in (REPO / "README.md", DEPLOY / "README.md"):
        text = readme.read_text()
        for block in re.findall(r"```sh\n(.*?)```", text, re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                if "helm upgrade --install" in line and "deploy/helm/cloudmap-xds" in line:
                    for placeholder, value in PLACEHOLDERS.items():
                        line = line.replace(placeholder, value)
                    found.append((readme.relative_to(REPO).as_posix(), shlex.split(line.strip())))
    return found


def test_readme_helm_install_commands_render():
    """The install commands users copy render valid objects with what they set (placeholders filled in)."""
    commands = readme_helm_installs()
    assert sorted(name for name, _ in commands) == ["README.md", "deploy/README.md"], "one in each README"
    for name, argv in commands:
        assert argv[:5] == ["helm", "upgrade", "--install", NAME, "deploy/helm/cloudmap-xds"], (name, argv)
        rest = argv[5:]
        assert rest[:2] == ["-n", NAMESPACE], (name, rest)
        docs = helm_docs(*rest[2:])
        deploy = deployment(docs)
        image = container(deploy)["image"]
        assert image.endswith("/cloudmap-xds:0.1.0") and image.split("/")[0] in ("registry.example",
                                                                               "111122223333.dkr.ecr.eu-west-1.amazonaws.com"), image
        assert one(docs, "ConfigMap", "aws-config")["data"]["aws-region"] == "eu-west-1"
        assert one(docs, "ServiceAccount", NAME)["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == ROLE_ARN
        for doc in docs:
            validate_strict(doc, K8S_VERSIONS[-1])


def test_every_config_sources_example_keeps_k8s():
    """Wherever the docs show istiod's configSources, k8s:// is listed before our xds:// address."""
    texts = {p.relative_to(REPO).as_posix(): p.read_text()
             for p in (REPO / "README.md", DEPLOY / "README.md", CHART / "templates" / "NOTES.txt",
                       CHART / "values.yaml")}
    checked = 0
    for name, text in texts.items():
        for m in re.finditer(r"configSources:\n((?:\s*- address: \S+\n?)+)", text):
            addresses = re.findall(r"- address: (\S+)", m.group(1))
            assert addresses[0] == "k8s://" and any(a.startswith("xds://") for a in addresses[1:]), (name, addresses)
            checked += 1
        if "configSources" in text:
            assert "k8s://" in text, f"{name} mentions configSources without the k8s:// warning"
    assert checked >= 3
