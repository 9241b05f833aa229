//! The built-in source: a YAML file that mirrors Cloud Map's data model
//! (namespaces → services → instances with Cloud Map attributes), watched for edits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;

use super::SourceSink;
use crate::metrics::{OutcomeLabels, SourceMetrics};
use crate::model::{Attributes, Health, Instance, Registry, Service};

/// How often the file's metadata is checked; an edit is served within about
/// twice this long (two reads must agree).
pub const CHECK_INTERVAL: Duration = Duration::from_millis(300);
/// A file modified less than this before it was read may change again without
/// its metadata showing it (coarse file-system timestamps): until the file is
/// older than this, every check reads it.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// The `created` of a service that gives none: the Unix epoch, which is also what
/// istiod assumes for a missing `create_time`, so every replica and restart agrees.
pub const DEFAULT_CREATED: SystemTime = SystemTime::UNIX_EPOCH;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read registry file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("registry file {path}:{line}:{column}: {message}")]
    Parse { path: PathBuf, line: usize, column: usize, message: String },
    #[error("registry file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    namespaces: Vec<NamespaceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceEntry {
    name: String,
    #[serde(default)]
    services: Vec<ServiceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: String,
    #[serde(default, deserialize_with = "deserialize_time")]
    created: Option<SystemTime>,
    /// Cloud Map service attributes (`cloudmap-xds/ports`, ...).
    #[serde(default)]
    attributes: BTreeMap<String, Scalar>,
    #[serde(default)]
    instances: Vec<InstanceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceEntry {
    id: Option<String>,
    #[serde(default)]
    health: HealthEntry,
    #[serde(default, deserialize_with = "deserialize_attributes")]
    attributes: Attributes,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum HealthEntry {
    #[default]
    Healthy,
    Unhealthy,
    Unknown,
}

/// Attribute values are strings in Cloud Map; YAML users write `AWS_INSTANCE_PORT: 8080`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::String(s) => s,
            Scalar::Integer(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

/// Straight into the model's interned attributes, entry by entry: a map of owned
/// strings per instance, kept until the whole file is read, would be most of the
/// parse's memory (100,000 instances at 10,000 × 10). Of two equal keys the last
/// wins, as in a `BTreeMap`.
fn deserialize_attributes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Attributes, D::Error> {
    struct AttributesVisitor;
    impl<'de> serde::de::Visitor<'de> for AttributesVisitor {
        type Value = Attributes;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Attributes, M::Error> {
            let mut entries = Vec::new();
            while let Some((key, value)) = map.next_entry::<String, Scalar>()? {
                entries.push((key, value.into_string()));
            }
            Ok(entries.into_iter().collect())
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Attributes, E> {
            Ok(Attributes::new())
        }
    }
    d.deserialize_map(AttributesVisitor)
}

fn deserialize_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_rfc3339_weak(&text).map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid `created` {text:?} (want RFC 3339, e.g. 2024-05-01T12:00:00Z): {e}"
        ))
    })
}

/// serde-saphyr set to read what serde_norway reads: repeated keys reach serde
/// (a repeated field is an error, a repeated attribute keeps its last value),
/// `<<` is an ordinary key, YAML 1.2 scalars (`yes`, `017`, `1_000` are strings),
/// and no size budget (the file is the operator's and already in memory; depth
/// and alias expansion stay bounded).
fn streaming_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = usize::MAX;
    budget.max_nodes = usize::MAX;
    budget.max_total_scalar_bytes = usize::MAX;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::PassThrough;
    options.merge_keys = serde_saphyr::MergeKeyPolicy::AsOrdinary;
    options.with_snippet = false;
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    options
}

fn from_str_buffered(path: &Path, text: &str) -> Result<RegistryFile, Error> {
    serde_norway::from_str(text).map_err(|e| {
        let text = e.to_string();
        let message = text.split(" at line ").next().unwrap_or(&text).to_owned();
        match e.location() {
            Some(l) => Error::Parse { path: path.to_owned(), line: l.line(), column: l.column(), message },
            // A few errors have no position (a second YAML document, say); no `0:0`.
            None => Error::Invalid { path: path.to_owned(), message },
        }
    })
}

/// Parses registry-file text into the model. Pure; `path` only labels errors.
pub fn parse(path: &Path, text: &str) -> Result<Registry, Error> {
    // serde_norway loads every event of the document before deserializing (about
    // 14 times the file's size at 10,000 × 10), leaving the heap fragmented long
    // after; serde-saphyr streams. serde_norway stays the reference for what a
    // file means and what its errors say: a file serde-saphyr does not take is
    // read again by serde_norway, which either reports the error as it always
    // has or accepts what serde-saphyr is stricter about.
    let file: RegistryFile = match serde_saphyr::from_str_with_options(text, streaming_options()) {
        Ok(file) => file,
        Err(_) => from_str_buffered(path, text)?,
    };
    let invalid = |message: String| Error::Invalid { path: path.to_owned(), message };
    let mut seen = BTreeSet::new();
    let mut services = Vec::new();
    for ns in file.namespaces {
        if ns.name.trim().is_empty() {
            return Err(invalid("a namespace has an empty name".into()));
        }
        for svc in ns.services {
            if svc.name.trim().is_empty() {
                return Err(invalid(format!("namespace {:?} has a service with an empty name", ns.name)));
            }
            if !seen.insert((ns.name.clone(), svc.name.clone())) {
                return Err(invalid(format!(
                    "service {:?} appears twice in namespace {:?}",
                    svc.name, ns.name
                )));
            }
            let instances = svc
                .instances
                .into_iter()
                .enumerate()
                .map(|(index, i)| Instance {
                    id: i.id.unwrap_or_else(|| format!("instance-{}", index + 1)),
                    health: match i.health {
                        HealthEntry::Healthy => Health::Healthy,
                        HealthEntry::Unhealthy => Health::Unhealthy,
                        HealthEntry::Unknown => Health::Unknown,
                    },
                    attributes: i.attributes,
                })
                .collect();
            services.push(Service {
                namespace: ns.name.clone(),
                name: svc.name,
                created: svc.created.unwrap_or(DEFAULT_CREATED),
                attributes: svc.attributes.into_iter().map(|(k, v)| (k, v.into_string())).collect(),
                instances,
            });
        }
    }
    Ok(Registry::new(services))
}

/// A registry as registry-file YAML (what `export` prints); [`parse`] reads it back unchanged.
pub fn to_yaml(registry: &Registry) -> Result<String, serde_norway::Error> {
    let mut namespaces: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
    let mut services: Vec<&Service> = registry.services.iter().map(|s| &**s).collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for service in services {
        let mut instances: Vec<&Instance> = service.instances.iter().collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        let instances: Vec<serde_json::Value> = instances
            .into_iter()
            .map(|i| serde_json::json!({"id": i.id, "health": i.health.as_str(), "attributes": i.attributes}))
            .collect();
        let mut entry = serde_json::json!({
            "name": service.name,
            "created": humantime::format_rfc3339(service.created).to_string(),
        });
        if !service.attributes.is_empty() {
            entry["attributes"] = serde_json::json!(service.attributes);
        }
        entry["instances"] = serde_json::Value::Array(instances);
        namespaces.entry(&service.namespace).or_default().push(entry);
    }
    let file = serde_json::json!({
        "namespaces": namespaces
            .into_iter()
            .map(|(name, services)| serde_json::json!({"name": name, "services": services}))
            .collect::<Vec<_>>(),
    });
    Ok(format!(
        "# Cloud Map as read by cloudmap-xds export; serve or render it with --registry-file.\n{}",
        serde_norway::to_string(&file)?
    ))
}

/// Reads and parses the file once.
pub fn load(path: &Path) -> Result<Registry, Error> {
    parse(path, &read(path)?)
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_owned(), source })
}

/// Loads the file at start-up (blocking: call it off the async workers); a
/// missing or broken file is an error for the caller. Returns the watcher that
/// keeps the source up to date from then on.
pub fn start(path: &Path, sink: SourceSink, metrics: SourceMetrics) -> Result<Watcher, Error> {
    let stamp = Stamp::of(path).ok();
    let read_at = SystemTime::now();
    let text = read(path)?;
    sink.publish(parse(path, &text)?);
    Ok(Watcher {
        path: path.to_owned(),
        sink,
        metrics,
        served: Digest::of(&text),
        seen: stamp.map(|stamp| (stamp, read_at)),
        candidate: None,
        unreadable: false,
        reads: 0,
    })
}

/// What identifies one version of the file without reading it: a write moves
/// the modification or change time or the size, and an editor's or
/// Kubernetes' atomic replace (rename, symlink swap) moves the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    changed: (i64, i64),
    len: u64,
    inode: (u64, u64),
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Stamp {
            modified: m.modified()?,
            changed: (m.ctime(), m.ctime_nsec()),
            len: m.len(),
            inode: (m.dev(), m.ino()),
        })
    }
}

/// A content hash, so that neither the served text nor a candidate is kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digest([u8; 32]);

impl Digest {
    fn of(text: &str) -> Digest {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(text.as_bytes()).into())
    }
}

/// Follows the file: re-reads it only when its metadata moved, and takes a
/// change once two reads in a row agree, so a file caught half-written is never
/// served. A change that parses is published; one that does not is logged with
/// file, line and column and changes nothing.
#[derive(Debug)]
pub struct Watcher {
    path: PathBuf,
    sink: SourceSink,
    metrics: SourceMetrics,
    /// The content last taken (served or rejected).
    served: Digest,
    /// The metadata before the last read that found the taken content, and when that read was.
    seen: Option<(Stamp, SystemTime)>,
    /// A changed content seen once, waiting for a second read to agree.
    candidate: Option<Digest>,
    unreadable: bool,
    /// Reads since start (the start-up load not counted).
    reads: u64,
}

impl Watcher {
    /// Checks the file once; blocking (a stat, and a read and parse only when it changed).
    pub fn check(&mut self) {
        let stamp = match Stamp::of(&self.path) {
            Ok(stamp) => stamp,
            Err(source) => return self.unreadable(source),
        };
        if self.candidate.is_none()
            && let Some((seen, read_at)) = self.seen
            && seen == stamp
            && read_at.duration_since(stamp.modified).is_ok_and(|age| age >= RACY_WINDOW)
        {
            return;
        }
        let read_at = SystemTime::now();
        self.reads += 1;
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(source) => return self.unreadable(source),
        };
        self.unreadable = false;
        let digest = Digest::of(&text);
        if digest == self.served {
            self.candidate = None;
            self.seen = Some((stamp, read_at));
            return;
        }
        if self.candidate != Some(digest) {
            self.candidate = Some(digest);
            return;
        }
        let started = Instant::now();
        let outcome = match parse(&self.path, &text) {
            Ok(registry) => {
                let services = registry.services.len();
                if self.sink.publish(registry) {
                    tracing::info!(path = %self.path.display(), services, "registry file reloaded");
                    "success"
                } else {
                    "unchanged"
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "registry file rejected; keeping the last good snapshot");
                self.sink.record_error(&err);
                "error"
            }
        };
        self.metrics.loads.get_or_create(&OutcomeLabels { outcome }).inc();
        self.metrics.load_duration.observe(started.elapsed().as_secs_f64());
        self.served = digest;
        self.seen = Some((stamp, read_at));
        self.candidate = None;
    }

    /// How many times the file was read since start.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    fn unreadable(&mut self, source: std::io::Error) {
        // Editors that replace the file leave a moment without it; keep serving.
        if !self.unreadable {
            let err = Error::Read { path: self.path.clone(), source };
            tracing::warn!(error = %err, "registry file unreadable; keeping the last good snapshot");
            self.sink.record_error(&err);
            self.metrics.loads.get_or_create(&OutcomeLabels { outcome: "error" }).inc();
            self.unreadable = true;
        }
        self.seen = None;
    }
}

/// Checks the file every [`CHECK_INTERVAL`] until `shutdown` fires, each check
/// on the blocking pool, away from the workers that serve streams and probes.
pub async fn watch(mut watcher: Watcher, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        watcher = match tokio::task::spawn_blocking(move || {
            watcher.check();
            watcher
        })
        .await
        {
            Ok(watcher) => watcher,
            Err(err) => {
                tracing::error!(error = %err, "registry file check failed; the file is no longer followed");
                return;
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Registry, Error> {
        parse(Path::new("r.yaml"), text)
    }

    #[test]
    fn parses_the_seed_service() {
        let registry = parse_str(
            "namespaces:\n- name: my-namespace\n  services:\n  - name: getmesh-external-service\n    instances:\n    - attributes:\n        AWS_INSTANCE_IPV4: 52.192.72.89\n",
        )
        .unwrap();
        let svc = &registry.services[0];
        assert_eq!((svc.namespace.as_str(), svc.name.as_str()), ("my-namespace", "getmesh-external-service"));
        assert_eq!(svc.created, DEFAULT_CREATED);
        assert_eq!(svc.instances[0].id, "instance-1");
        assert_eq!(svc.instances[0].health, Health::Healthy);
        assert_eq!(&svc.instances[0].attributes["AWS_INSTANCE_IPV4"], "52.192.72.89");
    }

    #[test]
    fn numbers_become_attribute_strings_and_times_parse() {
        let registry = parse_str(
            "namespaces:\n- name: ns\n  services:\n  - name: s\n    created: 2024-05-01T12:00:00Z\n    instances:\n    - id: a\n      health: UNHEALTHY\n      attributes: {AWS_INSTANCE_PORT: 8080}\n",
        )
        .unwrap();
        let svc = &registry.services[0];
        assert_eq!(svc.created, SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_564_800));
        assert_eq!(&svc.instances[0].attributes["AWS_INSTANCE_PORT"], "8080");
        assert_eq!(svc.instances[0].health, Health::Unhealthy);
    }

    #[test]
    fn syntax_errors_name_file_line_and_column() {
        let err = parse_str("namespaces:\n- name: ns\n  services: [\n").unwrap_err();
        match err {
            Error::Parse { line, column, .. } => assert!(line >= 3 && column > 0, "{line}:{column}"),
            other => panic!("unexpected {other}"),
        }
        let err = parse_str("namespaces:\n- name: ns\n  servics: []\n").unwrap_err().to_string();
        assert!(err.starts_with("registry file r.yaml:3:3: "), "{err}");
        assert!(err.contains("servics"), "{err}");
    }

    #[test]
    fn bad_values_are_located() {
        let err = parse_str("namespaces:\n- name: ns\n  services:\n  - name: s\n    created: yesterday\n")
            .unwrap_err()
            .to_string();
        // The YAML library locates value errors at the enclosing mapping.
        assert!(
            err.contains("r.yaml:4:5: ") && err.contains("services[0]") && err.contains("created"),
            "{err}"
        );
        assert!(!err.contains(" at line "), "location is not repeated: {err}");
        let err = parse_str(
            "namespaces:\n- name: ns\n  services:\n  - name: s\n    instances:\n    - health: GREAT\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("r.yaml:6:") && err.contains("GREAT"), "{err}");
    }

    const ONE: &str = "namespaces:\n- name: ns\n  services:\n  - name: a\n";
    const TWO: &str = "namespaces:\n- name: ns\n  services:\n  - name: b\n";

    /// A registry file last modified `age` ago, and a watcher that loaded it.
    fn watched(text: &str, age: Duration) -> (tempfile::TempDir, PathBuf, Watcher, super::super::SourceView) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.yaml");
        write_aged(&path, text, age);
        let (sink, view) = super::super::channel("test");
        let watcher = start(&path, sink, crate::metrics::Metrics::unregistered().source).unwrap();
        (dir, path, watcher, view)
    }

    fn write_aged(path: &Path, text: &str, age: Duration) {
        std::fs::write(path, text).unwrap();
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    fn served(view: &super::super::SourceView) -> String {
        view.registry.borrow().as_ref().unwrap().services[0].name.clone()
    }

    #[test]
    fn an_unchanged_file_is_not_read_again() {
        let (_dir, _path, mut watcher, view) = watched(ONE, RACY_WINDOW * 2);
        for _ in 0..5 {
            watcher.check();
        }
        assert_eq!(watcher.reads(), 0);
        assert_eq!(served(&view), "a");
    }

    #[test]
    fn a_same_size_edit_with_the_old_modification_time_is_still_seen() {
        let (_dir, path, mut watcher, view) = watched(ONE, RACY_WINDOW * 2);
        let old = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, TWO).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        watcher.check();
        assert_eq!(served(&view), "a", "one read is not enough: the file may be half-written");
        watcher.check();
        assert_eq!(served(&view), "b");
        assert_eq!(watcher.reads(), 2);
    }

    #[test]
    fn a_recently_modified_file_is_read_on_every_check_until_it_settles() {
        let (_dir, path, mut watcher, view) = watched(ONE, Duration::ZERO);
        watcher.check();
        watcher.check();
        assert_eq!(watcher.reads(), 2, "its metadata cannot be trusted yet");
        write_aged(&path, ONE, RACY_WINDOW * 2);
        watcher.check();
        let settled = watcher.reads();
        watcher.check();
        watcher.check();
        assert_eq!(watcher.reads(), settled);
        assert_eq!(served(&view), "a");
    }

    #[test]
    fn a_broken_edit_is_rejected_once_and_a_fix_is_taken() {
        let (_dir, path, mut watcher, view) = watched(ONE, RACY_WINDOW * 2);
        write_aged(&path, "namespaces: [\n", RACY_WINDOW * 2);
        for _ in 0..4 {
            watcher.check();
        }
        assert_eq!(served(&view), "a");
        assert!(view.status().last_error.unwrap().contains("registry.yaml:"));
        assert_eq!(watcher.reads(), 2, "a rejected file is not re-read while unchanged");
        write_aged(&path, TWO, RACY_WINDOW * 2);
        watcher.check();
        watcher.check();
        assert_eq!(served(&view), "b");
    }

    #[test]
    fn export_yaml_reads_back_unchanged() {
        let registry = parse_str(
            "namespaces:\n- name: ns\n  services:\n  - name: s\n    created: 2024-05-01T12:00:00Z\n    attributes:\n      cloudmap-xds/ports: http=80/HTTP\n    instances:\n    - id: b\n      health: UNKNOWN\n      attributes: {AWS_INSTANCE_PORT: 8080, AWS_INSTANCE_IPV4: 10.0.0.2, note: 'a: b'}\n    - id: a\n      attributes: {AWS_INSTANCE_IPV4: 10.0.0.1}\n- name: other\n",
        )
        .unwrap();
        let text = to_yaml(&registry).unwrap();
        let mut again = parse_str(&text).unwrap();
        for s in &mut again.services {
            std::sync::Arc::make_mut(s).instances.sort_by(|a, b| b.id.cmp(&a.id));
        }
        assert_eq!(again, registry, "{text}");
        assert_eq!(registry.services[0].attributes["cloudmap-xds/ports"], "http=80/HTTP");
    }

    #[test]
    fn an_error_without_a_position_still_says_what_is_wrong() {
        let err = parse_str("namespaces: []\n---\nnamespaces: []\n").unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "registry file r.yaml: deserializing from YAML containing more than one document is not supported"
        );
    }

    #[test]
    fn yaml_1_1_scalars_stay_strings_repeated_attributes_keep_the_last_and_null_lists_are_empty() {
        let registry = parse_str(
            "namespaces:\n- name: ns\n  services:\n  - name: s\n    instances:\n    - id: a\n      attributes: {Y: yes, O: 017, U: 1_000, P: 8080, T: true, A: 1, A: 2}\n  - name: t\n    instances:\n",
        )
        .unwrap();
        let attributes = &registry.services[0].instances[0].attributes;
        let values: Vec<_> =
            ["Y", "O", "U", "P", "T", "A"].iter().map(|k| attributes.get(k).unwrap()).collect();
        assert_eq!(values, ["yes", "017", "1_000", "8080", "true", "2"]);
        assert!(registry.services[1].instances.is_empty());
        let err = parse_str("namespaces:\n- name: ns\n  name: other\n").unwrap_err().to_string();
        assert!(
            err.starts_with("registry file r.yaml:2:3: ") && err.contains("duplicate field `name`"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_services_are_rejected() {
        let err = parse_str("namespaces:\n- name: ns\n  services:\n  - name: s\n  - name: s\n").unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
    }
}
