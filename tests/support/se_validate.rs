//! `se-validate` (tools/se-validate): istiod's own ServiceEntry validation as a child process.
//!
//! One process serves many batches: each batch is the encoded resources of one snapshot, written
//! as length-delimited `google.protobuf.Any` frames (exactly the `DiscoveryResponse.resources`
//! entries) and ended by a zero-length frame; the validator answers with one JSON line per
//! rejection and a batch line. A writer thread feeds stdin while this thread reads stdout, so a
//! batch of any size with any number of rejections cannot deadlock on full pipes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use cloudmap_xds::proto::SharedAny;
use prost::Message;
use serde::Deserialize;

pub const SE_VALIDATE_ENV: &str = "SE_VALIDATE_BIN";

/// One resource istiod would drop.
#[derive(Debug, Clone, Deserialize)]
pub struct Rejection {
    /// Position in the batch.
    pub index: usize,
    /// The MCP name, `<namespace>/<name>`.
    pub name: String,
    /// `istiod` (the store's validation), `adsc` (conversion), `kube-name`, `duplicate` or `decode`.
    pub check: String,
    pub error: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct BatchReport {
    pub resources: usize,
    pub accepted: usize,
    pub rejected: usize,
    pub warnings: usize,
    #[serde(skip)]
    pub rejections: Vec<Rejection>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Line {
    Rejection(Rejection),
    Batch(BatchReport),
}

pub struct SeValidate {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl SeValidate {
    /// Starts `$SE_VALIDATE_BIN` for ServiceEntries served as `type_url`
    /// (`networking.istio.io/v1/ServiceEntry` is what istiod 1.26 asks for).
    pub fn start(type_url: &str) -> SeValidate {
        let bin = std::env::var(SE_VALIDATE_ENV).unwrap_or_default();
        assert!(
            !bin.is_empty(),
            "{SE_VALIDATE_ENV} is not set: the property tests check every ServiceEntry with istio's own \
             validator (run `eval \"$(scripts/install-peers.sh)\"`, or use scripts/test)"
        );
        let mut child = Command::new(&bin)
            .args(["-type-url", type_url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {SE_VALIDATE_ENV}={bin}: {e}"));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        SeValidate { child, stdin, stdout }
    }

    /// Validates one batch: what one ServiceEntry response would carry.
    pub fn validate(&mut self, resources: &[SharedAny]) -> BatchReport {
        let mut frames = Vec::with_capacity(resources.iter().map(|r| r.value.len() + 64).sum::<usize>() + 1);
        for resource in resources {
            assert!(
                !resource.type_url.is_empty() || !resource.value.is_empty(),
                "an empty Any would read as the end of the batch"
            );
            resource.encode_length_delimited(&mut frames).expect("a Vec grows");
        }
        frames.push(0); // a zero-length frame ends the batch
        let stdin = self.stdin.as_mut().expect("validator stdin is open");
        let stdout = &mut self.stdout;
        std::thread::scope(|scope| {
            let writer = scope.spawn(move || stdin.write_all(&frames).and_then(|()| stdin.flush()));
            let mut rejections = Vec::new();
            let mut line = String::new();
            let report = loop {
                line.clear();
                let n = stdout.read_line(&mut line).expect("reading se-validate's output");
                assert!(n > 0, "se-validate exited in the middle of a batch (see its stderr above)");
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line::Rejection(r)) => rejections.push(r),
                    Ok(Line::Batch(report)) => break BatchReport { rejections, ..report },
                    Err(e) => panic!("unexpected se-validate output {line:?}: {e}"),
                }
            };
            writer.join().expect("writer thread").expect("writing to se-validate");
            assert_eq!(report.resources, resources.len(), "se-validate read a different number of frames");
            report
        })
    }
}

impl Drop for SeValidate {
    fn drop(&mut self) {
        drop(self.stdin.take()); // end of input: the validator prints its summary and exits
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stdout, &mut rest);
        let _ = self.child.wait();
    }
}
