//! What our pushes cost istiod: real istiod 1.26.0 (`$ISTIOD_BIN`, kube-less,
//! `scripts/run-istiod.sh`) consumes a server child that runs production's publish
//! loop; istiod's CPU is read from `/proc/<pid>/stat`.
//!
//! - per one-service change (the child answers once istiod ACKed it; istiod's
//!   debounce and push then get 2 s), idle CPU subtracted;
//! - under a churn of 10 changed services per second for 20 s, with
//!   `--min-push-interval` 0 (every change published) and the default;
//! - with the ServiceEntries split over 8 config sources (stable shards by hash of
//!   the name), per one-service change.
//!
//! `cargo bench --bench istiod` (env `ISTIOD_SHAPES`, default `1000x10,10000x10`;
//! `ISTIOD_INTERVALS_MS`, default `0,<the default --min-push-interval>`; `ISTIOD_SHARDS`, default 8, 0 for none);
//! under `cargo test` a small smoke pass (20 services, one change, no churn).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed bench

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{ServerChild, ms, process_cpu};
use support::istiod::{Istiod, IstiodBin};

const CHANGES: usize = 5;
const CHURN_PER_SECOND: usize = 10;
const CHURN_SECONDS: usize = 20;
/// After istiod ACKed a change: its debounce (100 ms) and the push that follows.
const SETTLE: Duration = Duration::from_secs(2);
const SHARDS: usize = 8;

struct Setup {
    shards: usize,
    interval_ms: u64,
    per_change: bool,
    churn: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if common::serve_child(&args) {
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let shapes: Vec<(usize, usize)> = if full {
        std::env::var("ISTIOD_SHAPES")
            .unwrap_or_else(|_| "1000x10,10000x10".into())
            .split(',')
            .map(|s| {
                let (a, b) = s.split_once('x').unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            })
            .collect()
    } else {
        vec![(20, 1)]
    };
    let default_interval =
        humantime::parse_duration(cloudmap_xds::config::DEFAULT_MIN_PUSH_INTERVAL).unwrap();
    // Churn is measured once per interval; the first also measures one change, and
    // the sharded setup one change. ISTIOD_INTERVALS_MS and ISTIOD_SHARDS override.
    let intervals: Vec<u64> = std::env::var("ISTIOD_INTERVALS_MS")
        .map(|v| v.split(',').map(|i| i.trim().parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![0, default_interval.as_millis() as u64]);
    let shards: usize = std::env::var("ISTIOD_SHARDS").ok().and_then(|v| v.parse().ok()).unwrap_or(SHARDS);
    let setups = if full {
        let mut setups: Vec<Setup> = intervals
            .iter()
            .enumerate()
            .map(|(i, &interval_ms)| Setup { shards: 1, interval_ms, per_change: i == 0, churn: true })
            .collect();
        if shards > 1 {
            setups.push(Setup { shards, interval_ms: 0, per_change: true, churn: false });
        }
        setups
    } else {
        vec![Setup { shards: 1, interval_ms: 0, per_change: true, churn: false }]
    };
    let bin = IstiodBin::current();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let me = std::env::current_exe().unwrap();
    let mut rows = Vec::new();
    for &(services, instances) in &shapes {
        for setup in &setups {
            let work = tempfile::tempdir().unwrap();
            let changes = CHANGES + CHURN_PER_SECOND * CHURN_SECONDS;
            let mut command = Command::new(&me);
            command.args(
                [
                    "--serve-registries".to_owned(),
                    services.to_string(),
                    instances.to_string(),
                    changes.to_string(),
                    setup.shards.to_string(),
                    setup.interval_ms.to_string(),
                ]
                .iter(),
            );
            let mut server = ServerChild::spawn(command);
            let mut istiod = Istiod::spawn(&bin, work.path(), &server.addrs);
            let started = Instant::now();
            runtime.block_on(istiod.wait_synced(Duration::from_secs(900)));
            let sync = started.elapsed();
            let pid = istiod.pid().unwrap();
            let sync_cpu = process_cpu(pid);
            std::thread::sleep(Duration::from_secs(3));
            let (idle0, idle_at) = (process_cpu(pid), Instant::now());
            std::thread::sleep(Duration::from_secs(3));
            let idle_rate = (process_cpu(pid) - idle0).as_secs_f64() / idle_at.elapsed().as_secs_f64();
            let cost = |before: Duration, since: Instant| {
                (process_cpu(pid) - before)
                    .saturating_sub(Duration::from_secs_f64(idle_rate * since.elapsed().as_secs_f64()))
            };
            let mut row = format!(
                "| {services} × {instances} | {} | {} ms | sync {:.1} s, {:.0} ms CPU; idle {:.1} ms/s |",
                setup.shards,
                setup.interval_ms,
                sync.as_secs_f64(),
                ms(sync_cpu),
                idle_rate * 1000.0
            );
            let mut json = format!(
                "\"services\":{services},\"instances\":{instances},\"shards\":{},\"min_push_interval_ms\":{},\"sync_s\":{:.2},\"sync_cpu_ms\":{:.0},\"idle_ms_per_s\":{:.2}",
                setup.shards,
                setup.interval_ms,
                sync.as_secs_f64(),
                ms(sync_cpu),
                idle_rate * 1000.0
            );
            if setup.per_change {
                let (before, at) = (process_cpu(pid), Instant::now());
                for _ in 0..if full { CHANGES } else { 1 } {
                    server.command("change 1");
                    std::thread::sleep(SETTLE);
                }
                let per_change = cost(before, at) / if full { CHANGES as u32 } else { 1 };
                row.push_str(&format!(" {:.0} ms |", ms(per_change)));
                json.push_str(&format!(",\"istiod_cpu_per_change_ms\":{:.1}", ms(per_change)));
            } else {
                row.push_str(" – |");
            }
            if setup.churn {
                let (before, at) = (process_cpu(pid), Instant::now());
                server.command(&format!("churn {CHURN_PER_SECOND} {CHURN_SECONDS}"));
                std::thread::sleep(SETTLE);
                let per_second = cost(before, at) / CHURN_SECONDS as u32;
                row.push_str(&format!(" {:.0} ms/s |", ms(per_second)));
                json.push_str(&format!(",\"istiod_cpu_under_churn_ms_per_s\":{:.1}", ms(per_second)));
            } else {
                row.push_str(" – |");
            }
            let rejected = istiod.rejections();
            assert!(rejected.is_empty(), "istiod rejected resources: {rejected:?}");
            println!("{row}");
            rows.push(json);
            drop(istiod);
            drop(server);
        }
    }
    for json in rows {
        println!("BENCH_JSON {{\"bench\":\"istiod\",{json}}}");
    }
}
