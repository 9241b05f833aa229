//! A real Kubernetes API on loopback: etcd and kube-apiserver as child processes
//! (built by `scripts/install-kube.sh`), reached with the real kubectl. No kubelet and
//! no controller-manager: nothing runs in pods, and nothing garbage-collects owned
//! objects, which config-source tests do not need.
//!
//! Every [`KubeApi`] is fresh (its own etcd data, certificates, token and free ports)
//! and is killed on drop; when the test is failing each process prints the tail of its
//! log. A new instance never reuses the ports of an old one: kube-apiserver takes about
//! 4 s to exit on SIGTERM, and probes could reach the old one meanwhile.
//!
//! `$ETCD_BIN`, `$KUBE_APISERVER_BIN` and `$KUBECTL_BIN` name the binaries; tests fail,
//! never skip, without them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::istiod::{accepts_tcp, kill, log_file, loopback, print_tail_if_failing};

/// From spawn to `/readyz` = ok: 2.7–4.2 s measured alone on 2 cores; a loaded CI box is slower.
pub const KUBE_READY_DEADLINE: Duration = Duration::from_secs(90);
/// Istio's CRDs from nothing to established: about 6 s measured.
pub const CRDS_ESTABLISHED_DEADLINE: Duration = Duration::from_secs(120);
/// The namespace istiod runs in (`POD_NAMESPACE`), and where cloudmap-xds publishes by default.
pub const ISTIO_NAMESPACE: &str = "istio-system";
/// kubectl's field manager for everything the tests apply server-side.
pub const FIELD_MANAGER: &str = "cloudmap-xds-tests";

/// The etcd, kube-apiserver and kubectl binaries.
#[derive(Debug, Clone)]
pub struct KubeBins {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    pub kubectl: PathBuf,
    /// `$KUBE_VERSION`, e.g. `v1.35.4`.
    pub version: String,
}

impl KubeBins {
    pub fn from_env() -> KubeBins {
        let var = |name: &str| {
            let value = std::env::var(name).unwrap_or_default();
            assert!(
                !value.is_empty(),
                "{name} is not set: the Kubernetes-mode tests need etcd, kube-apiserver and kubectl \
                 (run `eval \"$(scripts/install-kube.sh)\"` first, or use scripts/test)"
            );
            value
        };
        let file = |name: &str| {
            let path = PathBuf::from(var(name));
            assert!(
                path.is_file(),
                "{name}={} is not a file (re-run scripts/install-kube.sh)",
                path.display()
            );
            path
        };
        KubeBins {
            etcd: file("ETCD_BIN"),
            apiserver: file("KUBE_APISERVER_BIN"),
            kubectl: file("KUBECTL_BIN"),
            version: var("KUBE_VERSION"),
        }
    }
}

/// A running etcd + kube-apiserver pair, and a kubeconfig whose user is in `system:masters`.
pub struct KubeApi {
    pub bins: KubeBins,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    pub kubeconfig: PathBuf,
    dir: PathBuf,
    etcd_log: PathBuf,
    apiserver_log: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
}

/// Runs `openssl ARGS` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a serving certificate for 127.0.0.1 signed by it, and an RSA key pair for
/// service-account tokens, in `dir`.
fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let days = "2";
    openssl(dir, &["genrsa", "-out", "ca.key", "2048"]);
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            days,
            "-subj",
            "/CN=cloudmap-xds-test-ca",
        ],
    );
    openssl(dir, &["genrsa", "-out", "apiserver.key", "2048"]);
    openssl(
        dir,
        &["req", "-new", "-key", "apiserver.key", "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver"],
    );
    std::fs::write(
        dir.join("apiserver.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "apiserver.crt",
            "-days",
            days,
            "-extfile",
            "apiserver.ext",
        ],
    );
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"]);
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

impl KubeApi {
    /// Starts etcd and kube-apiserver under `dir` and waits until `/readyz` says ok.
    pub async fn start(dir: &Path) -> KubeApi {
        let bins = KubeBins::from_env();
        let started = Instant::now();
        let dir = dir.join("kube");
        let pki = dir.join("pki");
        tokio::task::spawn_blocking({
            let pki = pki.clone();
            move || make_pki(&pki)
        })
        .await
        .unwrap();
        let token = format!("{:032x}", fastrand::u128(..));
        std::fs::write(pki.join("tokens.csv"), format!("{token},admin,admin,system:masters\n")).unwrap();

        let free = cloudmap_xds::test_helpers::free_port;
        let (etcd_client, etcd_peer, secure) = (free(), free(), free());
        let server = format!("https://127.0.0.1:{secure}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    \
                 certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n\
                 - name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
                ca = pki.join("ca.crt").display()
            ),
        )
        .unwrap();

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd_log = dir.join("etcd.log");
        let (stdout, stderr) = log_file(&etcd_log);
        let etcd = Command::new(&bins.etcd)
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("etcd-data"))
            .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .arg(format!("--initial-cluster=test={peer_url}"))
            .args(["--listen-metrics-urls=", "--unsafe-no-fsync", "--log-level=warn"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bins.etcd.display()));

        let apiserver_log = dir.join("kube-apiserver.log");
        let mut api = KubeApi {
            bins,
            server,
            kubeconfig,
            dir: dir.clone(),
            etcd_log,
            apiserver_log,
            etcd: Some(etcd),
            apiserver: None,
        };
        let until = Instant::now() + KUBE_READY_DEADLINE;
        while !accepts_tcp(loopback(etcd_client)).await {
            api.assert_running("etcd's client port");
            assert!(
                Instant::now() < until,
                "etcd did not listen on {etcd_url} within {KUBE_READY_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }

        let pem = |name: &str| pki.join(name).display().to_string();
        let (stdout, stderr) = log_file(&api.apiserver_log);
        let apiserver = Command::new(&api.bins.apiserver)
            .arg(format!("--etcd-servers={etcd_url}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={secure}"))
            .arg(format!("--cert-dir={}", dir.join("apiserver-certs").display()))
            .arg(format!("--tls-cert-file={}", pem("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", pem("apiserver.key")))
            .arg(format!("--client-ca-file={}", pem("ca.crt")))
            .arg(format!("--token-auth-file={}", pem("tokens.csv")))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", pem("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", pem("sa.key")))
            .arg("--api-audiences=https://kubernetes.default.svc.cluster.local,istio-ca")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .args(["--enable-priority-and-fairness=false", "--profiling=false"])
            // Without it the apiserver keeps rewriting the `kubernetes` Service's endpoints
            // to its loopback address, which the API rejects (noise, and wasted CPU).
            .arg("--endpoint-reconciler-type=none")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", api.bins.apiserver.display()));
        api.apiserver = Some(apiserver);

        // TCP first (cheap), then `/readyz` through kubectl (a process per poll).
        while !accepts_tcp(loopback(secure)).await {
            api.assert_running("kube-apiserver's secure port");
            assert!(
                Instant::now() < until,
                "kube-apiserver did not listen on {} within {KUBE_READY_DEADLINE:?}",
                api.server
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        loop {
            api.assert_running("/readyz");
            if let Ok(out) = api.kubectl(&["get", "--raw", "/readyz"], None).await
                && out.trim() == "ok"
            {
                break;
            }
            assert!(
                Instant::now() < until,
                "kube-apiserver {} not ready within {KUBE_READY_DEADLINE:?}",
                api.server
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "kube-apiserver {} {}: ready {:?} after start",
            api.bins.version,
            api.server,
            started.elapsed()
        );
        api
    }

    /// [`KubeApi::start`], then Istio's CRDs (`crds`, the istio module's `crd-all.gen.yaml`)
    /// applied server-side and established, and namespace `istio-system` created: what
    /// istiod needs before it starts.
    pub async fn start_for_istio(dir: &Path, crds: &Path) -> KubeApi {
        let api = KubeApi::start(dir).await;
        api.apply_istio_crds(crds).await;
        api.kubectl_ok(&["create", "namespace", ISTIO_NAMESPACE], None).await;
        api
    }

    /// Applies `crds` server-side and waits until every CRD is established.
    pub async fn apply_istio_crds(&self, crds: &Path) {
        let started = Instant::now();
        assert!(crds.is_file(), "no CRD file at {} (re-run scripts/install-peers.sh)", crds.display());
        let path = crds.display().to_string();
        self.kubectl_ok(&["apply", "--server-side", "--field-manager", FIELD_MANAGER, "-f", &path], None)
            .await;
        let timeout = format!("--timeout={}s", CRDS_ESTABLISHED_DEADLINE.as_secs());
        self.kubectl_ok(&["wait", "--for=condition=Established", "crd", "--all", &timeout], None).await;
        eprintln!("Istio CRDs established {:?} after apply", started.elapsed());
    }

    fn assert_running(&mut self, waiting_for: &str) {
        for (name, child) in [("etcd", &mut self.etcd), ("kube-apiserver", &mut self.apiserver)] {
            if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{name} exited with {status} while waiting for {waiting_for}");
            }
        }
    }

    /// `kubectl ARGS` against this API server, with `stdin` piped in; its stdout, or
    /// `Err(stderr)` when it fails.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let out = self.kubectl_output(args, stdin).await;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    }

    /// [`KubeApi::kubectl`], panicking with kubectl's error.
    pub async fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.kubectl(args, stdin).await.unwrap_or_else(|e| panic!("{e}"))
    }

    async fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new(&self.bins.kubectl);
        command
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            // A discovery cache of its own: a later API server on the same port may serve other kinds.
            .arg(format!("--cache-dir={}", self.dir.join("kubectl-cache").display()))
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let stdin = stdin.map(str::to_owned);
        let kubectl = self.bins.kubectl.clone();
        tokio::task::spawn_blocking(move || {
            let mut child =
                command.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", kubectl.display()));
            if let Some(input) = stdin {
                use std::io::Write as _;
                child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
            }
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap()
    }

    /// `kubectl apply --server-side` of `yaml` (one or more documents).
    pub async fn apply(&self, yaml: &str) -> String {
        self.kubectl_ok(&["apply", "--server-side", "--field-manager", FIELD_MANAGER, "-f", "-"], Some(yaml))
            .await
    }

    /// `kubectl ARGS -o json`, parsed.
    pub async fn get_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl_ok(&all, None).await;
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {all:?}: not JSON ({e}): {out}"))
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // SIGKILL: nothing here needs a graceful stop, and the ports are never reused.
        kill(&mut self.apiserver);
        kill(&mut self.etcd);
        print_tail_if_failing("the kube-apiserver log", &self.apiserver_log);
        print_tail_if_failing("the etcd log", &self.etcd_log);
    }
}
