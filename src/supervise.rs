//! Supervision of the long-lived tasks (source, snapshot builder, servers,
//! readiness mirror): a replica that can no longer serve must say so and go.
//!
//! Every such task runs under one [`Supervisor`]. None of them may end before
//! the drain starts, so the first one that ends, by a panic, an error or an
//! early return, is a failure: `app` then turns readiness and grpc.health
//! false, logs the reason, drains and exits non-zero, so Kubernetes restarts
//! the process instead of leaving a replica that looks healthy and serves
//! nothing new.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use tokio::task::{self, JoinError, JoinSet};

/// Names of the supervised tasks, as logged and as a test fault names them.
pub mod task_names {
    pub const CLOUDMAP_POLLER: &str = "cloudmap-poller";
    pub const REGISTRY_FILE_WATCHER: &str = "registry-file-watcher";
    pub const SNAPSHOT_BUILDER: &str = "snapshot-builder";
    pub const GRPC_SERVER: &str = "grpc-server";
    pub const ADMIN_SERVER: &str = "admin-server";
    pub const READINESS_MIRROR: &str = "readiness-mirror";
    pub const TLS_RELOADER: &str = "tls-reloader";
    pub const PEER_BOOTSTRAP: &str = "peer-bootstrap";
    pub const MEMORY_TRIMMER: &str = "memory-trimmer";
}

/// How a supervised task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    /// It returned normally, which a long-lived task must not do before the drain.
    Returned,
    Failed(String),
    Panicked(String),
}

/// One task's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub task: &'static str,
    pub how: How,
}

impl Ended {
    /// Whether this end is a failure even during a drain (a return then is expected).
    pub fn is_error(&self) -> bool {
        !matches!(self.how, How::Returned)
    }
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.how {
            How::Returned => write!(f, "task {} returned", self.task),
            How::Failed(error) => write!(f, "task {} failed: {error}", self.task),
            How::Panicked(message) => write!(f, "task {} panicked: {message}", self.task),
        }
    }
}

/// What a supervised task's future may return.
pub trait TaskOutput {
    fn into_result(self) -> Result<(), String>;
}

impl TaskOutput for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: Into<anyhow::Error>> TaskOutput for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| format!("{:#}", e.into()))
    }
}

/// The long-lived tasks of one server; dropping it aborts those still running.
#[derive(Debug, Default)]
pub struct Supervisor {
    tasks: JoinSet<Result<(), String>>,
    names: HashMap<task::Id, &'static str>,
    /// Tasks that ended, in order.
    ended: Vec<Ended>,
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` on the runtime, watched.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        let task = async move { task.await.into_result() };
        #[cfg(feature = "testing")]
        let task = fault::inject(name, task);
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits for the next task to end; never returns while none is running.
    pub async fn next_end(&mut self) -> Ended {
        let Some(joined) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let ended = match joined {
            Ok((id, result)) => Ended {
                task: self.names.remove(&id).unwrap_or("unknown"),
                how: match result {
                    Ok(()) => How::Returned,
                    Err(error) => How::Failed(error),
                },
            },
            Err(error) => {
                Ended { task: self.names.remove(&error.id()).unwrap_or("unknown"), how: how_it_died(error) }
            }
        };
        self.ended.push(ended.clone());
        ended
    }

    /// Waits until `name` has ended (or returns at once if it already has).
    /// Tasks that end on the way are recorded; see [`Supervisor::ended`].
    pub async fn wait_for(&mut self, name: &str) -> Ended {
        loop {
            if let Some(ended) = self.ended.iter().find(|e| e.task == name) {
                return ended.clone();
            }
            if self.tasks.is_empty() {
                return Ended { task: "unknown", how: How::Failed(format!("no task named {name}")) };
            }
            self.next_end().await;
        }
    }

    /// Every task end seen so far.
    pub fn ended(&self) -> &[Ended] {
        &self.ended
    }
}

/// For a task whose input channel closed: the task feeding it has ended, and
/// that end is the one to report, so this task waits instead of ending too.
pub async fn upstream_ended() {
    std::future::pending::<()>().await;
}

fn how_it_died(error: JoinError) -> How {
    if error.is_cancelled() {
        return How::Failed("cancelled".into());
    }
    let payload = error.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a non-string panic payload)".into());
    How::Panicked(message)
}

/// Test hooks (feature `testing` only, so never in a release build): make a named
/// task fail on SIGUSR1, and hold the exit after a failure until SIGUSR2, so a
/// test can look at `/ready` and grpc.health before the process goes.
#[cfg(feature = "testing")]
pub mod fault {
    use std::future::Future;
    use std::pin::Pin;

    use tokio::signal::unix::{Signal, SignalKind, signal};

    /// `<task>:<panic|error|return>`: on SIGUSR1, that task panics, fails or returns.
    pub const FAULT_ENV: &str = "CLOUDMAP_XDS_TEST_FAULT";
    /// Set (to anything): after a task failure is reported, wait for SIGUSR2 before draining.
    pub const HOLD_EXIT_ENV: &str = "CLOUDMAP_XDS_TEST_HOLD_EXIT";

    type Task = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

    pub(super) fn inject(
        name: &'static str,
        task: impl Future<Output = Result<(), String>> + Send + 'static,
    ) -> Task {
        let planned = std::env::var(FAULT_ENV).ok();
        let Some((target, kind)) = planned.as_deref().and_then(|p| p.split_once(':')) else {
            return Box::pin(task);
        };
        if target != name {
            return Box::pin(task);
        }
        let kind = kind.to_owned();
        let mut trigger = match signal(SignalKind::user_defined1()) {
            Ok(trigger) => trigger,
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGUSR1 fault trigger");
                return Box::pin(task);
            }
        };
        Box::pin(async move {
            tokio::select! {
                result = task => result,
                _ = trigger.recv() => match kind.as_str() {
                    "panic" => panic!("injected fault: {name} panics"),
                    "error" => Err(format!("injected fault: {name} fails")),
                    _ => Ok(()),
                },
            }
        })
    }

    /// The SIGUSR2 listener that releases a held exit, installed at start so the
    /// signal can never arrive before it.
    pub fn exit_hold() -> Option<Signal> {
        std::env::var_os(HOLD_EXIT_ENV)?;
        signal(SignalKind::user_defined2()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_kind_of_end_is_reported_with_its_task() {
        let mut supervisor = Supervisor::new();
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        supervisor.spawn("returns", async move {
            let _ = wait.await;
        });
        supervisor.spawn("fails", async { Err::<(), _>(anyhow::anyhow!("disk full")) });
        supervisor.spawn("panics", async {
            if true {
                panic!("boom");
            }
        });
        let mut ends = [supervisor.next_end().await, supervisor.next_end().await];
        ends.sort_by_key(|e| e.task);
        assert_eq!(ends[0].to_string(), "task fails failed: disk full");
        assert_eq!(ends[1].to_string(), "task panics panicked: boom");
        release.send(()).unwrap();
        let ended = supervisor.wait_for("returns").await;
        assert_eq!(ended, Ended { task: "returns", how: How::Returned });
        assert!(!ended.is_error());
        assert_eq!(supervisor.ended().len(), 3);
        // Already ended: answered at once.
        assert_eq!(supervisor.wait_for("fails").await.how, How::Failed("disk full".into()));
    }

    #[tokio::test]
    async fn with_nothing_running_next_end_waits() {
        let mut supervisor = Supervisor::new();
        tokio::select! {
            biased;
            ended = supervisor.next_end() => panic!("nothing ran, yet {ended}"),
            () = std::future::ready(()) => {}
        }
    }
}
