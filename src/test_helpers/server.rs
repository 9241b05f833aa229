//! The whole app in-process on loopback port 0.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::app::{self, ShutdownHandle};
use crate::config::{Cli, Command, ServeArgs};

pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: ShutdownHandle,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// `serve` arguments as the CLI would parse them, on loopback port 0.
pub fn serve_args(extra: &[&str]) -> ServeArgs {
    let mut argv = vec!["cloudmap-xds", "serve", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).expect("valid test arguments").command {
        Command::Serve(args) => *args,
        Command::Render(_) | Command::Export(_) => unreachable!("serve was parsed"),
    }
}

impl TestServer {
    pub async fn start(args: ServeArgs) -> anyhow::Result<Self> {
        let bound = app::build(args).await?;
        let (grpc_addr, admin_addr, shutdown) = (bound.grpc_addr, bound.admin_addr, bound.shutdown_handle());
        let task = tokio::spawn(bound.run_until_signal());
        Ok(TestServer { grpc_addr, admin_addr, shutdown, task })
    }

    pub async fn with_registry_file(path: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let path = path.into();
        Self::start(serve_args(&[
            "--registry-file",
            path.to_str().expect("utf-8 path"),
            "--publish-namespace",
            "istio-system",
        ]))
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.drain();
    }
}
