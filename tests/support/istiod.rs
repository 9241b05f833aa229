//! A real istiod (`pilot-discovery`) on loopback, started with `scripts/run-istiod.sh`
//! (the invocation of `tests/e2e/ISTIOD_NOTES.md`), and our own binary as a child
//! process next to it. istiod runs without Kubernetes ([`Istiod::spawn`]: our server
//! is its only config source) or in Kubernetes mode against a [`KubeApi`]
//! ([`Istiod::spawn_kube`]: `configSources: [k8s://, xds://ours]`, as users run it).
//! Both are killed on drop; when the test is failing (the thread is panicking) each
//! prints the tail of its log.
//!
//! `$ISTIOD_BIN` / `$ISTIOD_OLD_BIN` / `$ISTIOD_MASTER_BIN` (exported by
//! `scripts/install-peers.sh`) name the binaries; tests fail, never skip, without them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use cloudmap_xds::test_helpers::eventually;

use cloudmap_xds::proto::cloudmap_xds::debug::v1::debug_client::DebugClient;
use cloudmap_xds::proto::cloudmap_xds::debug::v1::{
    Client as DebugClientInfo, GetStatusRequest, GetStatusResponse, ListClientsRequest,
    ListServiceEntriesRequest, ServiceEntryResource,
};
use cloudmap_xds::proto::istio::networking::v1alpha3::ServiceEntry;
use cloudmap_xds::proto::istio::networking::v1alpha3::service_entry::{Location, Resolution};

use super::kube::KubeApi;

const RUN_ISTIOD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/run-istiod.sh");
/// istiod's log line once every config source answered every type it asked for.
pub const SYNCED_LINE: &str = "All controller caches have been synced up";
/// Logged every 5 s while some requested type is still unanswered.
pub const WAITING_LINE: &str = "waiting for sync";
/// How long istiod may take from spawn to an open gRPC port (0.2 s measured; a busy CI box is slower).
pub const ISTIOD_SYNC_DEADLINE: Duration = Duration::from_secs(60);
/// Lines of each log printed when a test fails.
const TAIL_LINES: usize = 60;
/// How long istiod in Kubernetes mode may take from spawn to `/ready` = 200 (its informers
/// sync against the API server first).
pub const ISTIOD_KUBE_READY_DEADLINE: Duration = Duration::from_secs(90);

/// Known istiod pins (`scripts/install-peers.sh`) → the Istio version a sidecar of that release
/// reports (the module's `VERSION` file; master says 1.31).
const KNOWN_ISTIO_VERSIONS: [(&str, &str); 3] = [
    ("v0.0.0-20250506181944-c2e9871f340c", "1.26.0"),
    ("v0.0.0-20240218163812-d80ef7b19049", "1.22.0"),
    ("v0.0.0-20260827124520-eed52ebb66ad", "1.31.0"),
];

/// One istiod binary and what it speaks.
#[derive(Debug, Clone)]
pub struct IstiodBin {
    pub path: PathBuf,
    /// The Go pseudo-version it was built from.
    pub pseudo_version: String,
    /// The Istio release it is (what its sidecars report as `ISTIO_VERSION`).
    pub istio_version: String,
    /// The ServiceEntry type URL it asks for.
    pub se_type_url: String,
    /// Istio's CRDs of the same version (`crd-all.gen.yaml`), for Kubernetes mode.
    pub crds: Option<PathBuf>,
}

impl IstiodBin {
    /// `$ISTIOD_BIN`: Istio 1.26.0, asks for `networking.istio.io/v1/ServiceEntry`.
    pub fn current() -> IstiodBin {
        Self::from_env("ISTIOD_BIN", "ISTIOD_VERSION", "ISTIOD_SE_TYPE_URL", Some("ISTIOD_CRDS"))
    }

    /// `$ISTIOD_OLD_BIN`: a 2024 master (1.22 dev), asks for `networking.istio.io/v1alpha3/ServiceEntry`.
    pub fn old() -> IstiodBin {
        Self::from_env("ISTIOD_OLD_BIN", "ISTIOD_OLD_VERSION", "ISTIOD_OLD_SE_TYPE_URL", None)
    }

    /// `$ISTIOD_MASTER_BIN`: the newest Istio master the Go module proxy serves, unpatched
    /// (it runs only in Kubernetes mode), asks for `networking.istio.io/v1/ServiceEntry`.
    pub fn master() -> IstiodBin {
        Self::from_env(
            "ISTIOD_MASTER_BIN",
            "ISTIOD_MASTER_VERSION",
            "ISTIOD_MASTER_SE_TYPE_URL",
            Some("ISTIOD_MASTER_CRDS"),
        )
    }

    /// Its CRD file; panics naming the variable when unset.
    pub fn crds(&self) -> &Path {
        self.crds.as_deref().unwrap_or_else(|| panic!("{self}: no CRD file for Kubernetes mode"))
    }

    fn from_env(bin: &str, version: &str, type_url: &str, crds: Option<&str>) -> IstiodBin {
        let var = |name: &str| {
            let value = std::env::var(name).unwrap_or_default();
            assert!(
                !value.is_empty(),
                "{name} is not set: the istiod tests need real pilot-discovery binaries \
                 (run `eval \"$(scripts/install-peers.sh)\"` first, or use scripts/test)"
            );
            value
        };
        let path = PathBuf::from(var(bin));
        assert!(path.is_file(), "{bin}={} is not a file (re-run scripts/install-peers.sh)", path.display());
        let pseudo_version = var(version);
        let istio_version = KNOWN_ISTIO_VERSIONS
            .iter()
            .find(|(pin, _)| *pin == pseudo_version)
            .map_or("65536.65536.65536", |(_, v)| v) // what istiod's own adsc client reports
            .to_owned();
        let crds = crds.map(|name| {
            let path = PathBuf::from(var(name));
            assert!(
                path.is_file(),
                "{name}={} is not a file (re-run scripts/install-peers.sh)",
                path.display()
            );
            path
        });
        IstiodBin { path, pseudo_version, istio_version, se_type_url: var(type_url), crds }
    }
}

impl std::fmt::Display for IstiodBin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "istiod {} ({})", self.istio_version, self.pseudo_version)
    }
}

/// Opens `path` for the child's stdout and stderr (appending, so restarts keep the history).
pub fn log_file(path: &Path) -> (Stdio, Stdio) {
    let file = File::options().create(true).append(true).open(path).unwrap();
    let err = file.try_clone().unwrap();
    (Stdio::from(file), Stdio::from(err))
}

pub fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn print_tail_if_failing(what: &str, path: &Path) {
    if std::thread::panicking() {
        eprintln!(
            "\n======== last {TAIL_LINES} lines of {what} ({}) ========\n{}\n======== end of {what} ========",
            path.display(),
            tail(path, TAIL_LINES)
        );
    }
}

pub async fn accepts_tcp(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running istiod whose config sources are `xds://` addresses of ours, and in
/// Kubernetes mode also `k8s://`.
pub struct Istiod {
    pub bin: IstiodBin,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub monitoring: SocketAddr,
    /// The webhook server (Kubernetes mode only).
    pub https: Option<SocketAddr>,
    pub log_path: PathBuf,
    /// The mesh config istiod reads (and watches: an edit applies at run time).
    pub mesh_config: PathBuf,
    child: Option<Child>,
}

impl Istiod {
    /// Spawns istiod without Kubernetes in `work_dir` (its log is `work_dir/istiod.log`).
    /// The sources must already listen: istiod exits at once (255) when a source refuses
    /// the connection.
    pub fn spawn(bin: &IstiodBin, work_dir: &Path, sources: &[SocketAddr]) -> Istiod {
        Self::spawn_with_env(bin, work_dir, sources, &[])
    }

    /// Spawns istiod in Kubernetes mode against `kube` (its CRDs established, namespace
    /// `istio-system` created: [`KubeApi::start_for_istio`]), with `configSources:
    /// [k8s://, xds://sources...]` and `mesh_extra` appended to its mesh config (e.g.
    /// `discoverySelectors`). Its log is `work_dir/istiod.log` (appended to, so a second
    /// istiod in the same directory keeps the first one's lines).
    pub fn spawn_kube(
        bin: &IstiodBin,
        work_dir: &Path,
        kube: &KubeApi,
        sources: &[SocketAddr],
        mesh_extra: &str,
    ) -> Istiod {
        Self::spawn_kube_with_env(bin, work_dir, kube, sources, mesh_extra, &[])
    }

    /// [`Istiod::spawn_kube`] with more environment for `scripts/run-istiod.sh` (e.g.
    /// `ISTIOD_XDS_CREDENTIAL_NAME`).
    pub fn spawn_kube_with_env(
        bin: &IstiodBin,
        work_dir: &Path,
        kube: &KubeApi,
        sources: &[SocketAddr],
        mesh_extra: &str,
        extra_env: &[(&str, &str)],
    ) -> Istiod {
        let https = cloudmap_xds::test_helpers::free_port().to_string();
        let kubeconfig = kube.kubeconfig.display().to_string();
        let mut env = vec![
            ("ISTIOD_KUBECONFIG", kubeconfig.as_str()),
            ("ISTIOD_HTTPS_PORT", https.as_str()),
            ("ISTIOD_MESH_EXTRA", mesh_extra),
        ];
        env.extend_from_slice(extra_env);
        let mut istiod = Self::spawn_with_env(bin, work_dir, sources, &env);
        istiod.https = Some(loopback(https.parse().unwrap()));
        istiod
    }

    /// [`Istiod::spawn`] with environment for `scripts/run-istiod.sh` (e.g. `ISTIOD_XDS_CA_FILE`).
    pub fn spawn_with_env(
        bin: &IstiodBin,
        work_dir: &Path,
        sources: &[SocketAddr],
        env: &[(&str, &str)],
    ) -> Istiod {
        let (grpc, http, monitoring) = (
            cloudmap_xds::test_helpers::free_port(),
            cloudmap_xds::test_helpers::free_port(),
            cloudmap_xds::test_helpers::free_port(),
        );
        let log_path = work_dir.join("istiod.log");
        let (stdout, stderr) = log_file(&log_path);
        let sources: Vec<String> = sources.iter().map(ToString::to_string).collect();
        // One directory per istiod (by gRPC port): a restarted istiod gets a fresh mesh.yaml.
        let istiod_dir = work_dir.join(format!("istiod-{grpc}"));
        let child = Command::new(RUN_ISTIOD)
            .arg(&bin.path)
            .arg(&istiod_dir)
            .arg(sources.join(","))
            .args([grpc, http, monitoring].map(|p| p.to_string()))
            .env_remove("ISTIOD_KUBECONFIG")
            .env_remove("ISTIOD_HTTPS_PORT")
            .env_remove("ISTIOD_MESH_EXTRA")
            .env_remove("ISTIOD_XDS_CA_FILE")
            .env_remove("ISTIOD_XDS_SNI")
            .env_remove("ISTIOD_XDS_CREDENTIAL_NAME")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {RUN_ISTIOD}: {e}"));
        Istiod {
            bin: bin.clone(),
            grpc: loopback(grpc),
            http: loopback(http),
            monitoring: loopback(monitoring),
            https: None,
            log_path,
            mesh_config: istiod_dir.join("mesh.yaml"),
            child: Some(child),
        }
    }

    /// `GET /ready` on the HTTP port: its status (200 ready, 503 not yet; 0 when nothing answers).
    pub async fn ready_status(&self) -> u16 {
        cloudmap_xds::test_helpers::http_get(self.http, "/ready").await.map_or(0, |(status, _)| status)
    }

    /// Waits until `/ready` answers 200 (Kubernetes mode; without kube it stays 503).
    pub async fn wait_ready(&mut self, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            self.assert_running("/ready");
            if self.ready_status().await == 200 {
                return;
            }
            assert!(Instant::now() < until, "{}: /ready not 200 after {deadline:?}", self.bin);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until istiod has exited; its exit status.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(Instant::now() < until, "{} still running after {deadline:?}", self.bin);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// istiod's process id (`scripts/run-istiod.sh` execs it), for CPU and memory readings.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once istiod has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn assert_running(&mut self, waiting_for: &str) {
        if let Some(status) = self.exited() {
            panic!("{} exited with {status} while waiting for {waiting_for}", self.bin);
        }
    }

    pub async fn grpc_port_open(&self) -> bool {
        accepts_tcp(self.grpc).await
    }

    /// Waits until the gRPC port accepts connections (istiod opens it only once every
    /// requested type was answered), then checks the log says the caches synced.
    pub async fn wait_synced(&mut self, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            self.assert_running("its gRPC port");
            if self.grpc_port_open().await {
                break;
            }
            assert!(
                Instant::now() < until,
                "{}: gRPC port {} still closed after {deadline:?} (a `{WAITING_LINE}` in its log means a type went unanswered)",
                self.bin,
                self.grpc
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            self.log().contains(SYNCED_LINE),
            "{}: gRPC port open but no `{SYNCED_LINE}` in its log",
            self.bin
        );
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&mut self, needle: &str, deadline: Duration) {
        let until = Instant::now() + deadline;
        while !self.log().contains(needle) {
            self.assert_running(needle);
            assert!(Instant::now() < until, "{}: no `{needle}` in its log after {deadline:?}", self.bin);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `GET /debug/configz` on the monitoring port: the ServiceEntries in istiod's store.
    pub async fn try_configz(&self) -> Result<Vec<Value>, String> {
        Ok(self.try_configz_all().await?.into_iter().filter(|c| c["kind"] == "ServiceEntry").collect())
    }

    /// `GET /debug/configz`: every config in istiod's store, of any kind.
    pub async fn try_configz_all(&self) -> Result<Vec<Value>, String> {
        let (status, body) = cloudmap_xds::test_helpers::http_get(self.monitoring, "/debug/configz")
            .await
            .map_err(|e| format!("GET /debug/configz: {e}"))?;
        if status != 200 {
            return Err(format!("GET /debug/configz: status {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("configz is not a JSON array: {e}"))
    }

    pub async fn configz(&self) -> Vec<Value> {
        self.try_configz().await.unwrap()
    }

    /// `GET /debug/registryz`: every service in istiod's registry.
    pub async fn registryz(&self) -> Vec<Value> {
        let (status, body) =
            cloudmap_xds::test_helpers::http_get(self.monitoring, "/debug/registryz").await.unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The hostnames of [`Istiod::registryz`], sorted and deduplicated (istiod lists a
    /// host once per ServiceEntry that claims it).
    pub async fn registryz_hostnames(&self) -> Vec<String> {
        let services = self.registryz().await;
        let mut hosts: Vec<String> =
            services.iter().map(|s| s["hostname"].as_str().expect("hostname").to_owned()).collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Log lines in which istiod refused or failed to store something it received.
    pub fn rejections(&self) -> Vec<String> {
        rejections(&self.log())
    }

    /// Asks istiod for clusters as a sidecar in namespace `default` would, and returns their names.
    pub async fn sidecar_clusters(&self) -> Result<Vec<String>, String> {
        super::xds::clusters(self.grpc, &super::xds::Sidecar::new(&self.bin.istio_version)).await
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        kill(&mut self.child);
        print_tail_if_failing(&format!("the log of {}", self.bin), &self.log_path);
    }
}

/// The lines of an istiod log in which it refused or failed to store a resource from a
/// config source: its MCP client (`adsc`) logs those as warnings or errors, e.g.
/// `warn adsc Invalid data: invalid name …` and
/// `warn adsc Error adding a new resource to the store invalid host *`.
pub fn rejections(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| {
            let lower = line.to_ascii_lowercase();
            lower.contains("invalid data")
                || lower.contains("error adding")
                || lower.contains("rejected")
                || (lower.contains("\tadsc\t") && (lower.contains("\twarn\t") || lower.contains("\terror\t")))
                || (lower.contains("serviceentry") && lower.contains("invalid"))
        })
        .map(str::to_owned)
        .collect()
}

/// Our own binary (`cloudmap-xds serve`) as a child process on fixed loopback ports,
/// so that it can be killed and started again on the same ports.
pub struct ServerProcess {
    bin: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// `bin serve --grpc-addr … --admin-addr … --log-format json <args>`, with `envs` set on the
    /// child only; waits until the gRPC port listens. The log goes to `log_path`.
    pub async fn start(bin: &str, log_path: PathBuf, args: &[&str], envs: &[(&str, &str)]) -> ServerProcess {
        let (grpc, admin) = (
            loopback(cloudmap_xds::test_helpers::free_port()),
            loopback(cloudmap_xds::test_helpers::free_port()),
        );
        Self::start_at(bin, log_path, (grpc, admin), args, envs).await
    }

    /// [`ServerProcess::start`] on given `(grpc, admin)` addresses, e.g. chosen beforehand so that
    /// replicas can name each other (`--peer-bootstrap`).
    pub async fn start_at(
        bin: &str,
        log_path: PathBuf,
        (grpc, admin): (SocketAddr, SocketAddr),
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> ServerProcess {
        let mut all = vec!["serve".to_owned(), "--grpc-addr".into(), grpc.to_string()];
        all.extend(["--admin-addr".into(), admin.to_string(), "--log-format".into(), "json".into()]);
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let mut server = ServerProcess {
            bin: bin.into(),
            args: all,
            envs: envs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            grpc,
            admin,
            log_path,
            child: None,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let (stdout, stderr) = log_file(&self.log_path);
        let child = Command::new(&self.bin)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        while !accepts_tcp(self.grpc).await {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("cloudmap-xds exited with {status} before listening on {}", self.grpc);
            }
            assert!(Instant::now() < until, "cloudmap-xds did not listen on {} within 20 s", self.grpc);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL: no drain, connections die as in a crash.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// The process id, e.g. for `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal by name (`TERM`, `USR1`, ...).
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill").args([format!("-{name}"), self.pid().to_string()]).status().unwrap();
        assert!(sent.success(), "kill -{name} failed");
    }

    /// Waits up to `deadline` for the process to exit, and returns how it did.
    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < until, "cloudmap-xds did not exit within {deadline:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Starts the same command again on the same ports (after [`ServerProcess::kill`]).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    async fn debug(&self) -> DebugClient<tonic::transport::Channel> {
        DebugClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
            .max_decoding_message_size(usize::MAX)
    }

    /// The ServiceEntries we serve, sorted by name, from the debug service.
    pub async fn service_entries(&self) -> Vec<ServiceEntryResource> {
        let mut entries = self
            .debug()
            .await
            .list_service_entries(ListServiceEntriesRequest {})
            .await
            .unwrap()
            .into_inner()
            .service_entries;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries
    }

    pub async fn status(&self) -> GetStatusResponse {
        self.debug().await.get_status(GetStatusRequest {}).await.unwrap().into_inner()
    }

    pub async fn clients(&self) -> Vec<DebugClientInfo> {
        self.debug().await.list_clients(ListClientsRequest {}).await.unwrap().into_inner().clients
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        kill(&mut self.child);
        print_tail_if_failing("the log of cloudmap-xds", &self.log_path);
    }
}

// ---- what istiod holds, and changes reaching it ---------------------------------------------------

/// How long a change may take from our source to istiod's store (a file edit is served
/// within a second; istiod applies it in milliseconds; a loaded CI box is slower).
pub const CHANGE_DEADLINE: Duration = Duration::from_secs(20);

/// `namespace/name` → `resourceVersion`, as istiod has them.
pub fn versions_in(configz: &[Value]) -> BTreeMap<String, String> {
    configz
        .iter()
        .map(|c| (configz_name(c), c["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

pub fn versions_of(served: &[ServiceEntryResource]) -> BTreeMap<String, String> {
    served.iter().map(|e| (e.name.clone(), e.version.clone())).collect()
}

/// Waits until our server serves something satisfying `check`, then until istiod's
/// store holds exactly that (names and content hashes), then checks every field.
pub async fn wait_until_istiod_has(
    what: &str,
    istiod: &Istiod,
    server: &ServerProcess,
    check: impl Fn(&[ServiceEntryResource]) -> bool,
) -> Vec<Value> {
    wait_until_istiod_has_besides(what, istiod, server, &[], check).await
}

/// [`wait_until_istiod_has`] where istiod also holds the ServiceEntries named `besides`
/// (`namespace/name`, e.g. stored in Kubernetes), which are left out of the comparison.
pub async fn wait_until_istiod_has_besides(
    what: &str,
    istiod: &Istiod,
    server: &ServerProcess,
    besides: &[&str],
    check: impl Fn(&[ServiceEntryResource]) -> bool,
) -> Vec<Value> {
    let started = Instant::now();
    let served = eventually(&format!("our server to serve {what}"), CHANGE_DEADLINE, || async {
        let served = server.service_entries().await;
        check(&served).then_some(served)
    })
    .await;
    let want = versions_of(&served);
    let configz = eventually(&format!("istiod to take {what}: {want:#?}"), CHANGE_DEADLINE, || async {
        let mut configz = istiod.configz().await;
        configz.retain(|c| !besides.contains(&configz_name(c).as_str()));
        (versions_in(&configz) == want).then_some(configz)
    })
    .await;
    assert_configz_is(&configz, &served);
    eprintln!("{}: {what}: in istiod's configz {:?} after the change", istiod.bin, started.elapsed());
    configz
}

/// Kills our server (SIGKILL, as in a crash) and starts it again on the same ports while a
/// task polls istiod's `/debug/configz` every 5 ms, from before the kill until istiod has
/// reconnected and taken the new stream; asserts that every poll saw exactly the
/// ServiceEntries of `before` (no entry lost or changed during the restart).
pub async fn restart_our_server_without_loss(
    istiod: &Arc<Istiod>,
    server: &mut ServerProcess,
    before: &[Value],
) {
    let want = versions_in(before);
    let streams_before = istiod.log().matches("connection closed").count();

    // Poll configz continuously from before the kill until istiod has reconnected.
    let stop = Arc::new(AtomicBool::new(false));
    let polled = Arc::new(AtomicUsize::new(0));
    let poller = tokio::spawn({
        let (istiod, stop, polled) = (istiod.clone(), stop.clone(), polled.clone());
        async move {
            let mut polls = Vec::new();
            // At most one GET every 5 ms (a GET takes about that long): leave istiod some CPU.
            let mut pace = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                let result = istiod.try_configz().await.map(|c| versions_in(&c));
                polls.push((Instant::now(), result));
                polled.fetch_add(1, Ordering::Relaxed);
            }
            polls
        }
    });
    eventually("the poller to start", CHANGE_DEADLINE, || async {
        (polled.load(Ordering::Relaxed) >= 5).then_some(())
    })
    .await;

    let killed = Instant::now();
    server.kill();
    // istiod notices (its stream to us broke) before we come back.
    eventually("istiod to notice our server died", CHANGE_DEADLINE, || async {
        (istiod.log().matches("connection closed").count() > streams_before).then_some(())
    })
    .await;
    server.restart().await;
    let restarted = Instant::now();
    // Reconnected: the new process has a stream from istiod that ACKed our ServiceEntries.
    eventually("istiod to reconnect to the restarted server", Duration::from_secs(120), || async {
        let clients = server.clients().await;
        clients
            .iter()
            .any(|c| {
                c.types
                    .iter()
                    .any(|t| t.type_url == istiod.bin.se_type_url && !t.last_version_acked.is_empty())
            })
            .then_some(())
    })
    .await;
    let reconnected = Instant::now();
    // Keep polling a little after the reconnection (istiod applies the full set it just got).
    let settle = reconnected + Duration::from_millis(500);
    eventually("a few more configz polls", CHANGE_DEADLINE, || async {
        (Instant::now() >= settle).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let polls = poller.await.unwrap();

    let during: Vec<_> = polls.iter().filter(|(at, _)| *at >= killed).collect();
    let mut bad = String::new();
    for (at, result) in &polls {
        match result {
            Ok(versions) if *versions == want => {}
            Ok(versions) => {
                writeln!(bad, "+{:?}: {versions:?}", at.saturating_duration_since(killed)).unwrap()
            }
            Err(e) => writeln!(bad, "+{:?}: {e}", at.saturating_duration_since(killed)).unwrap(),
        }
    }
    assert!(bad.is_empty(), "istiod's ServiceEntries changed during our restart (want {want:?}):\n{bad}");
    assert!(during.len() >= 10, "only {} configz polls during the restart", during.len());
    eprintln!(
        "restart: {} configz polls ({} after the kill), all {} ServiceEntries every time; \
         down {:?}, istiod reconnected {:?} after the restart",
        polls.len(),
        during.len(),
        want.len(),
        restarted - killed,
        reconnected - restarted
    );
}

/// A configz entry's `namespace/name`.
pub fn configz_name(config: &Value) -> String {
    format!(
        "{}/{}",
        config["metadata"]["namespace"].as_str().unwrap_or("?"),
        config["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The spec as istiod's `/debug/configz` prints it (protojson: camelCase, defaults
/// left out, enums by name).
pub fn configz_spec(spec: &ServiceEntry) -> Value {
    let mut out = serde_json::Map::new();
    let mut put = |key: &str, value: Value| {
        let empty = match &value {
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::String(s) => s.is_empty(),
            Value::Number(n) => n.as_u64() == Some(0),
            Value::Null => true,
            Value::Bool(b) => !b,
        };
        if !empty {
            out.insert(key.to_owned(), value);
        }
    };
    put("hosts", json!(spec.hosts));
    put("addresses", json!(spec.addresses));
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|p| {
            let mut port = json!({"number": p.number, "protocol": p.protocol, "name": p.name});
            if p.target_port != 0 {
                port["targetPort"] = json!(p.target_port);
            }
            port
        })
        .collect();
    put("ports", json!(ports));
    if spec.location() != Location::MeshExternal {
        put("location", json!(spec.location().as_str_name()));
    }
    if spec.resolution() != Resolution::None {
        put("resolution", json!(spec.resolution().as_str_name()));
    }
    let endpoints: Vec<Value> = spec
        .endpoints
        .iter()
        .map(|e| {
            let mut endpoint = serde_json::Map::new();
            endpoint.insert("address".into(), json!(e.address));
            for (key, value) in [
                ("ports", json!(e.ports.iter().collect::<BTreeMap<_, _>>())),
                ("labels", json!(e.labels.iter().collect::<BTreeMap<_, _>>())),
                ("network", json!(e.network)),
                ("locality", json!(e.locality)),
                ("serviceAccount", json!(e.service_account)),
            ] {
                if value != json!({}) && value != json!("") {
                    endpoint.insert(key.into(), value);
                }
            }
            if e.weight != 0 {
                endpoint.insert("weight".into(), json!(e.weight));
            }
            Value::Object(endpoint)
        })
        .collect();
    put("endpoints", json!(endpoints));
    put("exportTo", json!(spec.export_to));
    put("subjectAltNames", json!(spec.subject_alt_names));
    assert!(spec.workload_selector.is_none(), "configz_spec does not render workloadSelector");
    Value::Object(out)
}

/// Asserts that istiod's ServiceEntries are exactly ours: the same names, and for
/// each the same `resourceVersion` (our content hash), `creationTimestamp` and spec.
pub fn assert_configz_is(configz: &[Value], served: &[ServiceEntryResource]) {
    let ours: BTreeMap<String, &ServiceEntryResource> = served.iter().map(|e| (e.name.clone(), e)).collect();
    let theirs: BTreeMap<String, &Value> = configz.iter().map(|c| (configz_name(c), c)).collect();
    assert_eq!(
        theirs.keys().collect::<Vec<_>>(),
        ours.keys().collect::<Vec<_>>(),
        "istiod's ServiceEntries (left) are not the ones we serve (right)"
    );
    assert_eq!(configz.len(), served.len(), "duplicate names in configz");
    for (name, entry) in ours {
        let config = theirs[&name];
        assert_eq!(config["metadata"]["resourceVersion"], json!(entry.version), "{name}: resourceVersion");
        let created = config["metadata"]["creationTimestamp"].as_str().unwrap_or_default();
        let created = humantime::parse_rfc3339(created)
            .unwrap_or_else(|e| panic!("{name}: creationTimestamp {created:?}: {e}"));
        // configz prints whole seconds (Kubernetes' metav1.Time); our create_time may have a fraction.
        let want = entry.create_time.unwrap_or_default();
        let want =
            std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(want.seconds).unwrap());
        assert_eq!(created, want, "{name}: creationTimestamp (whole seconds)");
        let spec = entry.spec.as_ref().expect("spec");
        assert_eq!(
            config["spec"],
            configz_spec(spec),
            "{name}: istiod's spec (left) differs from ours (right)"
        );
    }
}
