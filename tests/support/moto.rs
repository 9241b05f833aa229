//! A real `moto_server` (AWS Cloud Map emulator) on loopback, and a seeding
//! client for it. `$MOTO_SERVER` names the binary (`scripts/install-peers.sh`
//! exports it); tests fail, not skip, without it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_servicediscovery as sd;
use aws_sdk_servicediscovery::config::{Credentials, Region};
use aws_smithy_http_client::tls;
use cloudmap_xds::source::cloudmap::client::StripDataPrefix;

pub const MOTO_SERVER_ENV: &str = "MOTO_SERVER";
pub const REGION: &str = "us-east-1";
/// moto accepts any key, but every request must be SigV4-signed.
pub const ACCESS_KEY_ID: &str = "test";
pub const SECRET_ACCESS_KEY: &str = "test";
/// The environment a `cloudmap-xds` process needs to sign its calls to moto, and not to
/// look for an instance metadata service that loopback does not have.
pub const CLIENT_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID),
    ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// In-process `serve` arguments against `endpoint` with moto's credentials; `extra` flags
/// override the defaults here.
pub fn serve_args(endpoint: &str, extra: &[&str]) -> cloudmap_xds::config::ServeArgs {
    let defaults = [
        ("--aws-region", REGION),
        ("--aws-endpoint-url", endpoint),
        ("--publish-namespace", "istio-system"),
        ("--poll-interval", "200ms"),
        ("--aws-request-timeout", "2s"),
    ];
    let mut argv: Vec<&str> = extra.to_vec();
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            argv.extend([flag, value]);
        }
    }
    let mut args = cloudmap_xds::test_helpers::server::serve_args(&argv);
    args.cloudmap = args.cloudmap.with_static_credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY);
    args
}
// moto_server imports boto and flask before it listens: about 2 s on an idle machine, but tens of seconds
// when a dozen tests start one at once beside istiod builds on two cores.
const START_DEADLINE: Duration = Duration::from_secs(90);

/// A `moto_server` child process on 127.0.0.1; killed on drop.
pub struct Moto {
    bin: String,
    port: u16,
    child: Option<Child>,
}

impl Moto {
    /// Starts moto on a free loopback port and waits until it answers.
    pub async fn start() -> Moto {
        let bin = std::env::var(MOTO_SERVER_ENV).unwrap_or_default();
        assert!(
            !bin.is_empty(),
            "{MOTO_SERVER_ENV} is not set: the Cloud Map tests need a moto_server binary \
             (run `eval \"$(scripts/install-peers.sh)\"`, or set {MOTO_SERVER_ENV}=/path/to/moto_server)"
        );
        let mut moto = Moto { bin, port: cloudmap_xds::test_helpers::free_port(), child: None };
        moto.spawn().await;
        moto
    }

    async fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {MOTO_SERVER_ENV}={}: {e}", self.bin));
        self.child = Some(child);
        let until = Instant::now() + START_DEADLINE;
        loop {
            if matches!(self.post("/moto-api/reset").await, Ok(200)) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("moto_server exited with {status} before answering on port {}", self.port);
            }
            assert!(
                Instant::now() < until,
                "moto_server did not answer on 127.0.0.1:{} within {START_DEADLINE:?}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Forgets every namespace, service and instance.
    pub async fn reset(&self) {
        assert_eq!(self.post("/moto-api/reset").await.unwrap(), 200);
    }

    /// SIGSTOP: connections are accepted by the kernel but never answered (timeouts).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Moto::pause`]; the state is intact.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kills the process: connections are refused. The state is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh (empty) moto on the same port after [`Moto::kill`].
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("moto is running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().expect("running kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    async fn post(&self, path: &str) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.addr()).await?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "moto did not answer"))??;
        let text = String::from_utf8_lossy(&raw);
        Ok(text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0))
    }

    /// A client to seed this moto (or anything at `endpoint`, e.g. a proxy in front of it).
    pub async fn seeder(&self) -> Seeder {
        Seeder::new(&self.endpoint()).await
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // SIGKILL also ends a paused (SIGSTOPped) process.
        self.kill();
    }
}

/// A registered service, as the tests need it.
#[derive(Debug, Clone)]
pub struct SeededService {
    pub id: String,
    pub name: String,
    pub created: SystemTime,
}

/// Writes to Cloud Map (moto) with the AWS SDK.
#[derive(Debug, Clone)]
pub struct Seeder {
    client: sd::Client,
}

impl Seeder {
    pub async fn new(endpoint: &str) -> Seeder {
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            .region(Region::new(REGION))
            .endpoint_url(endpoint)
            .credentials_provider(Credentials::new(ACCESS_KEY_ID, SECRET_ACCESS_KEY, None, None, "test"))
            .load()
            .await;
        let config = sd::config::Builder::from(&sdk).interceptor(StripDataPrefix).build();
        Seeder { client: sd::Client::from_conf(config) }
    }

    /// `DiscoverInstances` under a health filter, straight from moto: the instance IDs and
    /// `AWS_INSTANCE_IPV4`s a Cloud Map client is given, sorted by ID.
    pub async fn discover(
        &self,
        namespace_http_name: &str,
        service: &str,
        health: sd::types::HealthStatusFilter,
    ) -> Vec<(String, String)> {
        let out = self
            .client
            .discover_instances()
            .namespace_name(namespace_http_name)
            .service_name(service)
            .max_results(1000)
            .health_status(health)
            .send()
            .await
            .unwrap();
        let mut instances: Vec<(String, String)> = out
            .instances()
            .iter()
            .map(|i| {
                let ip = i.attributes().and_then(|a| a.get("AWS_INSTANCE_IPV4")).cloned().unwrap_or_default();
                (i.instance_id().unwrap_or_default().to_owned(), ip)
            })
            .collect();
        instances.sort();
        instances
    }

    pub fn client(&self) -> &sd::Client {
        &self.client
    }

    async fn namespace_of_operation(&self, operation_id: Option<&str>) -> String {
        let op = self
            .client
            .get_operation()
            .operation_id(operation_id.expect("operation id"))
            .send()
            .await
            .unwrap();
        let op = op.operation().expect("operation");
        op.targets()
            .and_then(|t| t.get(&sd::types::OperationTargetType::Namespace))
            .expect("the operation's namespace")
            .clone()
    }

    /// Returns the namespace ID.
    pub async fn create_http_namespace(&self, name: &str) -> String {
        let out = self.client.create_http_namespace().name(name).send().await.unwrap();
        self.namespace_of_operation(out.operation_id()).await
    }

    pub async fn create_private_dns_namespace(&self, name: &str) -> String {
        let out = self
            .client
            .create_private_dns_namespace()
            .name(name)
            .vpc("vpc-0123456789abcdef0")
            .send()
            .await
            .unwrap();
        self.namespace_of_operation(out.operation_id()).await
    }

    pub async fn create_public_dns_namespace(&self, name: &str) -> String {
        let out = self.client.create_public_dns_namespace().name(name).send().await.unwrap();
        self.namespace_of_operation(out.operation_id()).await
    }

    /// A service; with `custom_health`, instances report health through
    /// [`Seeder::set_health`] (HealthCheckCustomConfig).
    pub async fn create_service(&self, namespace_id: &str, name: &str, custom_health: bool) -> SeededService {
        let mut request = self.client.create_service().namespace_id(namespace_id).name(name);
        if custom_health {
            request =
                request.health_check_custom_config(sd::types::HealthCheckCustomConfig::builder().build());
        }
        let out = request.send().await.unwrap();
        let svc = out.service().expect("service");
        SeededService {
            id: svc.id().expect("id").to_owned(),
            name: name.to_owned(),
            created: svc
                .create_date()
                .map(|d| SystemTime::try_from(*d).unwrap())
                .unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    /// An ECS bridge-mode service's tasks: `task-0`..`task-2` on 10.0.0.1-3, each on its own
    /// random host port (32768, 32769, 32770).
    pub async fn register_bridge_mode_tasks(&self, service_id: &str) {
        for (n, port) in ["32768", "32769", "32770"].iter().enumerate() {
            let ip = format!("10.0.0.{}", n + 1);
            let attributes = [("AWS_INSTANCE_IPV4", ip.as_str()), ("AWS_INSTANCE_PORT", port)];
            self.register(service_id, &format!("task-{n}"), &attributes).await;
        }
    }

    pub async fn register(&self, service_id: &str, instance_id: &str, attributes: &[(&str, &str)]) {
        let mut request = self.client.register_instance().service_id(service_id).instance_id(instance_id);
        for (k, v) in attributes {
            request = request.attributes(*k, *v);
        }
        request.send().await.unwrap();
    }

    /// Registers `i-<n>` with `AWS_INSTANCE_IPV4` = `ip(n)` for n in 0..count, a few at a time.
    pub async fn register_many(&self, service_id: &str, count: usize, ip: impl Fn(usize) -> String) {
        let mut pending = tokio::task::JoinSet::new();
        for n in 0..count {
            if pending.len() >= 4 {
                pending.join_next().await.unwrap().unwrap();
            }
            let (seeder, service_id, ip) = (self.clone(), service_id.to_owned(), ip(n));
            pending.spawn(async move {
                seeder.register(&service_id, &format!("i-{n}"), &[("AWS_INSTANCE_IPV4", &ip)]).await
            });
        }
        while let Some(done) = pending.join_next().await {
            done.unwrap();
        }
    }

    /// Sets (merges) service attributes, as `aws servicediscovery update-service-attributes` does.
    pub async fn update_service_attributes(&self, service_id: &str, attributes: &[(&str, &str)]) {
        let mut request = self.client.update_service_attributes().service_id(service_id);
        for (k, v) in attributes {
            request = request.attributes(*k, *v);
        }
        request.send().await.unwrap();
    }

    pub async fn deregister(&self, service_id: &str, instance_id: &str) {
        self.client
            .deregister_instance()
            .service_id(service_id)
            .instance_id(instance_id)
            .send()
            .await
            .unwrap();
    }

    pub async fn set_health(&self, service_id: &str, instance_id: &str, healthy: bool) {
        let status = if healthy {
            sd::types::CustomHealthStatus::Healthy
        } else {
            sd::types::CustomHealthStatus::Unhealthy
        };
        self.client
            .update_instance_custom_health_status()
            .service_id(service_id)
            .instance_id(instance_id)
            .status(status)
            .send()
            .await
            .unwrap();
    }

    /// The seed tutorial: HTTP namespace `my-namespace`, service
    /// `getmesh-external-service`, one instance at 52.192.72.89 with no port.
    pub async fn seed_tutorial(&self) -> SeededService {
        let ns = self.create_http_namespace("my-namespace").await;
        let svc = self.create_service(&ns, "getmesh-external-service", false).await;
        self.register(&svc.id, "i-1", &[("AWS_INSTANCE_IPV4", "52.192.72.89")]).await;
        svc
    }
}
