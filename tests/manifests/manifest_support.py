"""Shared helpers of the offline manifest checks: rendering deploy/ (plain files, kustomize, Helm), lookups, and
small evaluators for label selectors and NetworkPolicy rules (what the API server and a CNI would decide)."""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ISTIOD_DIR = DEPLOY / "istiod"
CHART = DEPLOY / "helm" / "cloudmap-xds"
RENDER = REPO / "scripts" / "render-manifests.sh"

# Kubernetes versions whose OpenAPI schemas (strict: unknown fields rejected) the manifests must pass.
K8S_VERSIONS = ("1.31", "1.37")

NAME = "cloudmap-xds"
NAMESPACE = "istio-system"
GRPC_PORT = 15099  # default of --grpc-addr
ADMIN_PORT = 15098  # default of --admin-addr
XDS_ADDRESS = f"xds://{NAME}.{NAMESPACE}.svc:{GRPC_PORT}"
NONROOT_UID = 65532
EXPECTED_KINDS = {"ServiceAccount", "Secret", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                  "NetworkPolicy"}
TLS_DIR = "/etc/cloudmap-xds/tls"  # agreed with the TLS work (issue 11 item 5): tls.crt and tls.key in it
# The headless Service the replicas find each other through (--peer-bootstrap); the other Service is istiod's.
PEERS_NAME = f"{NAME}-peers"
PEER_BOOTSTRAP = f"{PEERS_NAME}.$(POD_NAMESPACE).svc:{GRPC_PORT}"

# Labels the chart adds on top of the kustomize base's app.kubernetes.io/name (Helm conventions).
HELM_ONLY_LABELS = {"app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                    "helm.sh/chart"}


# ---------------------------------------------------------------------------------------------- loading


def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_manifest_files() -> list[Path]:
    """The plain Kubernetes manifests of the kustomize base: deploy/*.yaml but kustomization.yaml."""
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def plain_docs() -> list[dict]:
    return [d for p in k8s_manifest_files() for d in load_docs(p)]


def render(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """scripts/render-manifests.sh ARGS: the same entry point the tests against an API server use."""
    if not (os.environ.get("KUSTOMIZE") and os.environ.get("HELM")):
        pytest.fail("no $KUSTOMIZE/$HELM: run `eval \"$(scripts/install-manifest-tools.sh)\"` first")
    return subprocess.run([str(RENDER), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def parse(stdout: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(stdout) if d is not None]


@functools.lru_cache(maxsize=None)
def _kustomize_cached() -> str:
    out = render("kustomize")
    assert out.returncode == 0, f"kustomize build deploy/ failed:\n{out.stderr}"
    return out.stdout


def kustomize_docs() -> list[dict]:
    return parse(_kustomize_cached())


@functools.lru_cache(maxsize=None)
def _helm_cached(args: tuple[str, ...]) -> str:
    out = render("helm", *args)
    assert out.returncode == 0, f"helm template {' '.join(args)} failed:\n{out.stderr}"
    return out.stdout


def helm_docs(*args: str) -> list[dict]:
    """`helm template` of the chart (release cloudmap-xds in istio-system) with extra helm args, e.g. --set k=v."""
    return copy.deepcopy(parse(_helm_cached(tuple(args))))


def helm_fails(*args: str) -> str:
    """stderr of a `helm template` that must fail."""
    out = render("helm", *args)
    assert out.returncode != 0, f"helm template {' '.join(args)} succeeded but must fail:\n{out.stdout}"
    return out.stderr


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.environ["HELM"], *args], capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------- lookups


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def istiod_service(docs: list[dict]) -> dict:
    """The Service istiod dials: the one that is not headless."""
    found = [d for d in docs if d.get("kind") == "Service" and d["spec"].get("clusterIP") != "None"]
    assert len(found) == 1, f"expected exactly one Service with a cluster IP, found {len(found)}"
    return found[0]


def container(deploy: dict) -> dict:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == [NAME], "exactly one container named cloudmap-xds"
    return containers[0]


def pod_labels(deploy: dict) -> dict:
    return deploy["spec"]["template"]["metadata"]["labels"]


def port_by_name(c: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"container has no port named {name!r}: {ports}"
    return ports[name]


def env_by_name(c: dict) -> dict[str, dict]:
    env = c.get("env", [])
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e for e in env}


def quantity(q: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|k|M|G)?", str(q))
    assert m, f"unparsed quantity {q!r}"
    mult = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[m.group(2)]
    return float(m.group(1)) * mult


def seconds(d: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)", d)
    assert m, f"unparsed duration {d!r}"
    return int(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60}[m.group(2)]


def validate_strict(doc: dict, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


# ---------------------------------------------------------------------------------------------- selectors


def matches(selector: dict, labels: dict) -> bool:
    """A metav1.LabelSelector against a label set (matchLabels AND every matchExpression); {} selects all."""
    assert set(selector) <= {"matchLabels", "matchExpressions"}, f"unknown selector fields: {selector}"
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        assert op in ("In", "NotIn", "Exists", "DoesNotExist"), op
    return True


def namespace_labels(name: str, extra: dict | None = None) -> dict:
    """The labels every namespace carries (the API server sets kubernetes.io/metadata.name) plus extra ones."""
    return {"kubernetes.io/metadata.name": name, **(extra or {})}


def network_policy_admits(policy: dict, deploy: dict, *, pod: dict, namespace: str, port: int,
                          namespace_extra_labels: dict | None = None) -> bool:
    """Would `policy` admit a TCP connection from a pod (labels `pod`, in `namespace`) to `port` of our pods?

    NetworkPolicy semantics: the policy must select our pods and isolate them for Ingress; a connection is
    admitted when some ingress rule lists the port (numbers, or container port names resolved on our pod) and
    some peer of that rule matches. A peer with only podSelector means the policy's own namespace; with only
    namespaceSelector, every pod of the matching namespaces; with both, both must match.
    """
    spec = policy["spec"]
    assert matches(spec["podSelector"], pod_labels(deploy)), "the policy does not select our pods"
    assert "Ingress" in spec.get("policyTypes", ["Ingress"])
    ns_labels = namespace_labels(namespace, namespace_extra_labels)
    own_namespace = policy["metadata"].get("namespace", NAMESPACE)  # plain files carry none
    ports_by_name = {p["name"]: p["containerPort"] for p in container(deploy).get("ports", [])}
    for rule in spec.get("ingress") or []:
        rule_ports = rule.get("ports")
        if rule_ports is not None:
            numbers = {ports_by_name.get(p["port"]) if isinstance(p["port"], str) else p["port"]
                       for p in rule_ports if p.get("protocol", "TCP") == "TCP"}
            if port not in numbers:
                continue
        peers = rule.get("from")
        if peers is None:  # no `from`: every source
            return True
        for peer in peers:
            assert "ipBlock" not in peer, "the policy admits peers by selectors only"
            ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
            ns_ok = matches(ns_sel, ns_labels) if ns_sel is not None else namespace == own_namespace
            pod_ok = matches(pod_sel, pod) if pod_sel is not None else True
            if ns_ok and pod_ok:
                return True
    return False


# ---------------------------------------------------------------------------------------------- flags


@functools.lru_cache(maxsize=None)
def server_flags() -> tuple[frozenset[str], frozenset[str]]:
    """(long flags, environment variables) the server's clap structs declare in src/, e.g. --log-format and
    CLOUDMAP_XDS_LOG_FORMAT. Parsed from the `#[arg(long, env = ...)]` attributes and their fields."""
    flags, envs = set(), set()
    pattern = re.compile(r"#\[arg\(([^\]]*)\)\]\s*(?:#\[[^\]]*\]\s*)*pub (\w+):")
    for path in (REPO / "src").rglob("*.rs"):
        for attr, field in pattern.findall(path.read_text()):
            if not re.search(r"\blong\b", attr):
                continue
            named = re.search(r'\blong\s*=\s*"([^"]+)"', attr)
            flags.add("--" + (named.group(1) if named else field.replace("_", "-")))
            env = re.search(r'\benv\s*=\s*"([^"]+)"', attr)
            if env:
                envs.add(env.group(1))
    assert {"--log-format", "--grpc-addr", "--poll-interval"} <= flags, f"clap flags not found in src/: {flags}"
    assert "CLOUDMAP_XDS_LOG_FORMAT" in envs, envs
    return frozenset(flags), frozenset(envs)
