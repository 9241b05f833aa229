//! `deploy/` against a real Kubernetes API server (etcd + kube-apiserver on loopback:
//! tests/support/kube.rs), with the real kubectl: what the offline schema checks of
//! tests/manifests/ cannot see (admission, defaulting, server-side apply, strict field
//! validation by the server itself).
//!
//! - `kustomize build deploy/` applied server-side for real, every object read back
//!   with every field as written, and a second apply changing nothing;
//! - `--dry-run=server` of every variant the docs describe: `kubectl apply -k deploy/`,
//!   each plain file, IRSA (annotation uncommented), static keys, IMDS off, another
//!   namespace;
//! - the Helm chart rendered by `scripts/render-manifests.sh helm` (what `helm install`
//!   sends), for the default values and each main value set, applied server-side for real
//!   (one namespace per set), read back as written, a second apply changing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_json::Value;
use support::kube::{FIELD_MANAGER, ISTIO_NAMESPACE, KubeApi};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
const RENDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/render-manifests.sh");
const ROLE_ARN: &str = "arn:aws:iam::111122223333:role/cloudmap-xds-read";

/// The value sets a user is likely to install the chart with: the same as the offline checks'
/// `SCENARIOS` (tests/manifests/test_helm_chart.py), plus the peer bootstrap off.
const HELM_VALUE_SETS: &[(&str, &[&str])] = &[
    ("defaults", &[]),
    (
        "irsa",
        &[
            "--set",
            "aws.roleArn=arn:aws:iam::111122223333:role/cloudmap-xds-read",
            "--set",
            "aws.region=eu-west-1",
        ],
    ),
    (
        "static-keys",
        &[
            "--set",
            "aws.credentials.accessKeyId=AKIAEXAMPLE",
            "--set",
            "aws.credentials.secretAccessKey=c2VjcmV0",
        ],
    ),
    (
        "own-secret",
        &["--set", "aws.credentials.create=false", "--set", "aws.credentials.secretName=my-aws-keys"],
    ),
    (
        "tuned",
        &[
            "--set",
            "replicaCount=3",
            "--set",
            "publishNamespace=mesh-external",
            "--set",
            "logFormat=text",
            "--set",
            "logLevel=debug",
            "--set",
            "pollInterval=10s",
            "--set",
            "resources.limits.memory=512Mi",
            "--set",
            "env.CLOUDMAP_XDS_HEALTH_FILTER=HEALTHY",
            "--set",
            "aws.disableInstanceMetadata=true",
            "--set",
            "priorityClassName=system-cluster-critical",
        ],
    ),
    ("other-ports", &["--set", "ports.grpc=16099", "--set", "ports.admin=16098"]),
    (
        "no-extras",
        &[
            "--set",
            "networkPolicy.enabled=false",
            "--set",
            "pdb.enabled=false",
            "--set",
            "spread.enabled=false",
            "--set",
            "metrics.prometheusAnnotations=false",
            "--set",
            "serviceAccount.create=false",
            "--set",
            "serviceAccount.name=shared",
        ],
    ),
    ("tls", &["--set", "tls.enabled=true", "--set", "tls.secretName=cloudmap-xds-tls"]),
    (
        "digest",
        &[
            "--set",
            "image.repository=111122223333.dkr.ecr.us-east-1.amazonaws.com/cloudmap-xds",
            "--set",
            "image.digest=sha256:abababababababababababababababababababababababababababababababab",
        ],
    ),
    ("no-peer-bootstrap", &["--set", "peerBootstrap.enabled=false"]),
];

/// `$KUSTOMIZE build DIR` (scripts/install-manifest-tools.sh exports it).
fn kustomize_build(dir: &Path) -> String {
    let kustomize = std::env::var("KUSTOMIZE").unwrap_or_default();
    assert!(
        !kustomize.is_empty(),
        "KUSTOMIZE is not set: run `eval \"$(scripts/install-manifest-tools.sh)\"` first, or use scripts/test"
    );
    let out = Command::new(&kustomize).arg("build").arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "kustomize build {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The YAML documents of `text` as JSON values (no empty ones).
fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Every manifest file directly under `deploy/` (not the kustomization, not istiod/ or helm/).
fn plain_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(DEPLOY)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "deploy/ holds {files:?}");
    files
}

/// A copy of `deploy/` in `dir` with `edit` applied to `file`, whose text must contain `from`.
fn variant(dir: &Path, name: &str, file: &str, from: &str, to: &str) -> PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(DEPLOY).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
        }
    }
    let path = copy.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "deploy/{file} no longer contains {from:?}: update this variant");
    std::fs::write(&path, text.replace(from, to)).unwrap();
    copy
}

/// Base64 (standard alphabet, padded), as the API server shows Secret data.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Where `written` (what we applied) differs from `live` (what the server holds): every
/// field we wrote must be there with the same value; the server may add defaults.
fn differences(written: &Value, live: &Value, path: &str, out: &mut Vec<String>) {
    match (written, live) {
        (Value::Object(w), Value::Object(l)) => {
            for (key, value) in w {
                match l.get(key) {
                    Some(live_value) => differences(value, live_value, &format!("{path}.{key}"), out),
                    None => out.push(format!("{path}.{key}: missing")),
                }
            }
        }
        (Value::Array(w), Value::Array(l)) if w.len() == l.len() => {
            for (i, (a, b)) in w.iter().zip(l).enumerate() {
                differences(a, b, &format!("{path}[{i}]"), out);
            }
        }
        (w, l) if w == l => {}
        (w, l) => out.push(format!("{path}: wrote {w}, server has {l}")),
    }
}

/// What the API server stores for a Secret's `stringData`: base64 `data`.
fn as_stored(mut doc: Value) -> Value {
    if doc["kind"] == "Secret"
        && let Some(Value::Object(string_data)) = doc.as_object_mut().unwrap().remove("stringData")
    {
        let data =
            doc.as_object_mut().unwrap().entry("data").or_insert_with(|| Value::Object(Default::default()));
        for (key, value) in string_data {
            data[key] = Value::String(base64(value.as_str().unwrap().as_bytes()));
        }
    }
    doc
}

/// `(kind, namespace/name)` → `resourceVersion` of `docs` as the server holds them now.
async fn live_versions(kube: &KubeApi, docs: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for doc in docs {
        let live = live(kube, doc).await;
        out.push((doc["kind"].as_str().unwrap().to_owned(), live["metadata"]["resourceVersion"].to_string()));
    }
    out
}

async fn live(kube: &KubeApi, doc: &Value) -> Value {
    let kind = doc["kind"].as_str().unwrap();
    let name = doc["metadata"]["name"].as_str().unwrap();
    let namespace = doc["metadata"]["namespace"].as_str().unwrap_or(ISTIO_NAMESPACE);
    kube.get_json(&["-n", namespace, "get", kind, name, "--show-managed-fields"]).await
}

async fn dry_run_file(kube: &KubeApi, path: &Path) -> String {
    let path = path.display().to_string();
    kube.kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "--field-manager",
            FIELD_MANAGER,
            "-n",
            ISTIO_NAMESPACE,
            "-f",
            &path,
        ],
        None,
    )
    .await
}

/// `scripts/render-manifests.sh helm ARGS` for release `cloudmap-xds` in `namespace`: what `helm install`
/// would send.
fn helm_template(namespace: &str, args: &[&str]) -> String {
    let helm = std::env::var("HELM").unwrap_or_default();
    assert!(
        !helm.is_empty(),
        "HELM is not set: run `eval \"$(scripts/install-manifest-tools.sh)\"` first, or use scripts/test"
    );
    let out = Command::new(RENDER)
        .arg("helm")
        .args(args)
        .env("RELEASE", "cloudmap-xds")
        .env("NAMESPACE", namespace)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "render-manifests.sh helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Applies `rendered` server-side for real, reads every object back (every field as written, the
/// server only adding defaults, owned by our field manager) and applies it again (nothing changes:
/// no field fights with the server's defaults). Returns the objects.
async fn apply_and_read_back(kube: &KubeApi, what: &str, rendered: &str) -> Vec<Value> {
    let docs = documents(rendered);
    assert!(docs.iter().any(|d| d["kind"] == "Deployment"), "{what}: {rendered}");
    let apply = ["apply", "--server-side", "--validate=strict", "--field-manager", FIELD_MANAGER, "-f", "-"];
    let out = kube.kubectl_ok(&apply, Some(rendered)).await;
    assert_eq!(out.lines().count(), docs.len(), "{what}: one line per object: {out}");
    for doc in &docs {
        let live = live(kube, doc).await;
        let mut diffs = Vec::new();
        differences(&as_stored(doc.clone()), &live, "", &mut diffs);
        assert!(diffs.is_empty(), "{what}: {} {}: {diffs:#?}", doc["kind"], doc["metadata"]["name"]);
        let managers: Vec<&str> = live["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["manager"].as_str())
            .collect();
        assert!(managers.contains(&FIELD_MANAGER), "{what}: {}: managers {managers:?}", doc["kind"]);
    }
    let before = live_versions(kube, &docs).await;
    kube.kubectl_ok(&apply, Some(rendered)).await;
    assert_eq!(live_versions(kube, &docs).await, before, "{what}: a second apply changed objects");
    docs
}

#[tokio::test]
async fn deploy_applies_server_side_and_reads_back_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let kube = KubeApi::start(dir.path()).await;
    kube.kubectl_ok(&["create", "namespace", ISTIO_NAMESPACE], None).await;

    // The kustomization, applied for real, as `kustomize build deploy/ | kubectl apply --server-side -f -`.
    let rendered = kustomize_build(Path::new(DEPLOY));
    let docs = apply_and_read_back(&kube, "kustomize build deploy/", &rendered).await;
    let peers =
        docs.iter().find(|d| d["metadata"]["name"] == "cloudmap-xds-peers").expect("the peers' Service");
    let live_peers = live(&kube, peers).await;
    assert_eq!(live_peers["spec"]["clusterIP"], "None", "headless: its name resolves to every Ready replica");

    // The README's command, `kubectl apply -k deploy/` (kubectl's own kustomize), as a dry run.
    kube.kubectl_ok(
        &["apply", "-k", DEPLOY, "--server-side", "--dry-run=server", "--field-manager", FIELD_MANAGER],
        None,
    )
    .await;
}

#[tokio::test]
async fn every_deploy_variant_passes_a_server_side_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let kube = KubeApi::start(dir.path()).await;
    kube.kubectl_ok(&["create", "namespace", ISTIO_NAMESPACE], None).await;

    // Each plain file on its own (into istio-system, as the kustomization does).
    for file in plain_files() {
        let out = dry_run_file(&kube, &file).await;
        assert!(out.contains("(server dry run)"), "{}: {out}", file.display());
    }

    // IRSA: the ServiceAccount annotation, uncommented as deploy/serviceaccount.yaml shows it.
    let irsa = variant(
        dir.path(),
        "irsa",
        "serviceaccount.yaml",
        "  # annotations:\n  #   eks.amazonaws.com/role-arn:",
        "  annotations:\n    eks.amazonaws.com/role-arn:",
    );
    dry_run_file(&kube, &irsa.join("serviceaccount.yaml")).await;
    // Static keys in the Secret.
    let keys = variant(
        dir.path(),
        "static-keys",
        "aws-config.yaml",
        "access-key-id: \"\"",
        "access-key-id: \"AKIAIOSFODNN7EXAMPLE\"",
    );
    dry_run_file(&kube, &keys.join("aws-config.yaml")).await;
    // IMDS fallback off (the commented env var in the Deployment).
    let imds = variant(
        dir.path(),
        "imds-off",
        "deployment.yaml",
        "        # - name: AWS_EC2_METADATA_DISABLED\n        #   value: \"true\"",
        "        - name: AWS_EC2_METADATA_DISABLED\n          value: \"true\"",
    );
    dry_run_file(&kube, &imds.join("deployment.yaml")).await;
    // Another namespace, as deploy/kustomization.yaml says to change it.
    let other = variant(
        dir.path(),
        "other-namespace",
        "kustomization.yaml",
        "namespace: istio-system",
        "namespace: mesh-addons",
    );
    kube.kubectl_ok(&["create", "namespace", "mesh-addons"], None).await;
    let rendered = kustomize_build(&other);
    assert!(documents(&rendered).iter().all(|d| d["metadata"]["namespace"] == "mesh-addons"), "{rendered}");
    kube.kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "--field-manager",
            FIELD_MANAGER,
            "-f",
            "-",
        ],
        Some(&rendered),
    )
    .await;

    // Not vacuous: the server rejects a misspelled field.
    let typo =
        variant(dir.path(), "typo", "deployment.yaml", "readOnlyRootFilesystem", "readOnlyRootFilesytem");
    let path = typo.join("deployment.yaml").display().to_string();
    let err = kube
        .kubectl(
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--validate=strict",
                "-n",
                ISTIO_NAMESPACE,
                "-f",
                &path,
            ],
            None,
        )
        .await
        .unwrap_err();
    assert!(err.contains("readOnlyRootFilesytem"), "{err}");
}

#[tokio::test]
async fn the_helm_chart_applies_server_side_and_reads_back_for_each_value_set() {
    let dir = tempfile::tempdir().unwrap();
    let kube = KubeApi::start(dir.path()).await;
    for (name, args) in HELM_VALUE_SETS {
        // One namespace per value set: the objects of one set never meet another's.
        let namespace = format!("helm-{name}");
        kube.kubectl_ok(&["create", "namespace", &namespace], None).await;
        let rendered = helm_template(&namespace, args);
        let docs = apply_and_read_back(&kube, &format!("helm value set {name}"), &rendered).await;
        assert!(docs.iter().all(|d| d["metadata"]["namespace"] == namespace.as_str()), "{name}: {rendered}");
        // What the set is for, as the server holds it.
        let deployment = live(&kube, docs.iter().find(|d| d["kind"] == "Deployment").unwrap()).await;
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let env = |var: &str| {
            container["env"].as_array().unwrap().iter().find(|e| e["name"] == var).map(|e| e["value"].clone())
        };
        match *name {
            "defaults" => {
                assert_eq!(deployment["spec"]["replicas"], 2);
                assert_eq!(
                    env("CLOUDMAP_XDS_PEER_BOOTSTRAP"),
                    Some(Value::from("cloudmap-xds-peers.$(POD_NAMESPACE).svc:15099"))
                );
                let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
                for kind in [
                    "ServiceAccount",
                    "Secret",
                    "ConfigMap",
                    "Service",
                    "Deployment",
                    "PodDisruptionBudget",
                    "NetworkPolicy",
                ] {
                    assert!(kinds.contains(&kind), "defaults: no {kind} in {kinds:?}");
                }
            }
            "irsa" => {
                let sa = live(&kube, docs.iter().find(|d| d["kind"] == "ServiceAccount").unwrap()).await;
                assert_eq!(sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"], ROLE_ARN);
            }
            "tuned" => assert_eq!(deployment["spec"]["replicas"], 3),
            "other-ports" => assert_eq!(container["ports"][0]["containerPort"], 16099),
            "no-extras" => {
                assert_eq!(pod["serviceAccountName"], "shared");
                assert!(
                    !docs.iter().any(|d| d["kind"] == "NetworkPolicy" || d["kind"] == "PodDisruptionBudget")
                );
            }
            "tls" => {
                assert_eq!(pod["volumes"][0]["secret"]["secretName"], "cloudmap-xds-tls");
                assert_eq!(
                    env("CLOUDMAP_XDS_PEER_CA_FILE"),
                    Some(Value::from("/etc/cloudmap-xds/tls/ca.crt"))
                );
            }
            "digest" => assert!(container["image"].as_str().unwrap().contains("@sha256:"), "{container}"),
            "no-peer-bootstrap" => {
                assert_eq!(env("CLOUDMAP_XDS_PEER_BOOTSTRAP"), None);
                assert!(!docs.iter().any(|d| d["metadata"]["name"] == "cloudmap-xds-peers"));
            }
            _ => {}
        }
    }
    // Not vacuous: a value set the chart refuses never reaches the server.
    let out =
        Command::new(RENDER).args(["helm", "--set", "networkPolicy.allowPeers=false"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("peerBootstrap.enabled needs networkPolicy.allowPeers")
    );
}
