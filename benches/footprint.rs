//! The release binary serving a registry file: time to ready, RSS after ready,
//! and idle CPU (nothing changes; 10 s window).
//!
//! `cargo bench --bench footprint` (env `CLOUDMAP_XDS_BIN`, default the binary
//! Cargo built; `FOOTPRINT_SHAPES`, default `1000x10,10000x1,10000x10`); under
//! `cargo test` a small smoke pass.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed bench

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ms, process_cpu, rss_bytes};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let bin = std::env::var("CLOUDMAP_XDS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cloudmap-xds").into());
    let shapes: Vec<(usize, usize)> = if full {
        std::env::var("FOOTPRINT_SHAPES")
            .unwrap_or_else(|_| "1000x10,10000x1,10000x10".into())
            .split(',')
            .map(|s| {
                let (a, b) = s.split_once('x').unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            })
            .collect()
    } else {
        vec![(20, 2)]
    };
    let idle_window = if full { Duration::from_secs(10) } else { Duration::from_secs(1) };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut json = Vec::new();
    println!("| registry file | ready after | RSS after ready | idle CPU |");
    println!("|---|---|---|---|");
    for (services, instances) in shapes {
        let path = dir.path().join(format!("registry-{services}x{instances}.yaml"));
        std::fs::write(&path, common::registry_yaml(&common::generated(services, instances))).unwrap();
        // As deployed, the file predates the server (a fresh file is re-read until it settles).
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(hour_ago).unwrap();
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], cloudmap_xds::test_helpers::free_port()));
        let grpc = std::net::SocketAddr::from(([127, 0, 0, 1], cloudmap_xds::test_helpers::free_port()));
        let started = Instant::now();
        let mut child = Command::new(&bin)
            .args(["serve", "--registry-file"])
            .arg(&path)
            .args(["--grpc-addr", &grpc.to_string(), "--admin-addr", &admin.to_string(), "--log", "warn"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        runtime.block_on(async {
            loop {
                if let Ok((200, _)) = cloudmap_xds::test_helpers::http_get(admin, "/ready").await {
                    break;
                }
                assert!(started.elapsed() < Duration::from_secs(600), "not ready");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let ready = started.elapsed();
        let rss = rss_bytes(child.id());
        let cpu0 = process_cpu(child.id());
        std::thread::sleep(idle_window);
        let idle = (process_cpu(child.id()) - cpu0).as_secs_f64() * 1000.0 / idle_window.as_secs_f64();
        let _ = child.kill();
        let _ = child.wait();
        println!(
            "| {services} × {instances} | {:.2} s | {:.0} MB | {idle:.1} ms/s |",
            ready.as_secs_f64(),
            rss as f64 / 1e6
        );
        json.push(format!(
            "BENCH_JSON {{\"bench\":\"footprint\",\"services\":{services},\"instances\":{instances},\"ready_ms\":{:.0},\"rss_mb\":{:.1},\"idle_cpu_ms_per_s\":{idle:.2}}}",
            ms(ready),
            rss as f64 / 1e6
        ));
    }
    for line in json {
        println!("{line}");
    }
}
