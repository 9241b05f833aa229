//! An instance's Cloud Map attributes, stored compactly.
//!
//! ECS registers the same seven or eight keys on every instance, and most
//! values repeat too (region, zone, cluster, port, the task's service name on
//! every task of a service). Keys and values are therefore interned, and so is
//! each set of keys: every instance holds a pointer to its (shared) sorted keys
//! and one small array of shared values. At 100,000 instances of seven
//! attributes that is about 13 MB of arrays where a map of their own per
//! instance took about 100 MB and an array of key-value pairs 24 MB.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

/// An interned string: equal strings share one allocation, and comparing two
/// equal ones costs a pointer comparison (`Arc`'s equality checks identity first).
pub type Text = Arc<str>;

/// Attribute keys and values sorted by key, each key once. Iterates, compares
/// and orders exactly like the `BTreeMap<String, String>` it replaces.
#[derive(Clone, Default)]
pub struct Attributes {
    /// The keys, sorted, shared by every instance with the same keys; `None`: no attribute.
    keys: Option<Arc<Keys>>,
    /// `values[i]` is the value of `keys[i]`.
    values: Box<[Text]>,
}

/// One interned set of attribute keys, sorted. Behind an `Arc` of its own (a thin
/// pointer) rather than an `Arc<[Text]>`: eight bytes less in every instance.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Keys(Box<[Text]>);

impl Attributes {
    pub fn new() -> Self {
        Attributes::default()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key).ok().map(|i| &*self.values[i])
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// In key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + Clone {
        self.key_slice().iter().zip(self.values.iter()).map(|(k, v)| (&**k, &**v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + Clone {
        self.key_slice().iter().map(|k| &**k)
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Sets one attribute (replacing its value). Copies the arrays: meant for
    /// edits, not for building (collect an iterator for that).
    pub fn insert(&mut self, key: impl AsRef<str>, value: impl AsRef<str>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        let mut entries = self.entries();
        match position(self.key_slice(), key) {
            Ok(i) => entries[i].1 = value,
            Err(i) => entries.insert(i, (key, value)),
        }
        *self = Attributes::from_sorted(&entries, &mut interner());
    }

    pub fn remove(&mut self, key: &str) -> Option<Text> {
        let i = self.position(key).ok()?;
        let value = self.values[i].clone();
        let mut entries = self.entries();
        entries.remove(i);
        *self = Attributes::from_sorted(&entries, &mut interner());
        Some(value)
    }

    fn key_slice(&self) -> &[Text] {
        self.keys.as_deref().map_or(&[], |k| &k.0)
    }

    fn entries(&self) -> Vec<(&str, &str)> {
        self.iter().collect()
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        position(self.key_slice(), key)
    }

    /// From entries sorted by key, each key once.
    fn from_sorted(entries: &[(&str, &str)], interner: &mut Interner) -> Self {
        if entries.is_empty() {
            return Attributes::default();
        }
        let keys: Box<[Text]> = entries.iter().map(|(k, _)| interner.string(k)).collect();
        let values = entries.iter().map(|(_, v)| interner.string(v)).collect();
        Attributes { keys: Some(interner.keys(keys)), values }
    }
}

fn position(keys: &[Text], key: &str) -> Result<usize, usize> {
    keys.binary_search_by(|k| (**k).cmp(key))
}

impl PartialEq for Attributes {
    fn eq(&self, other: &Self) -> bool {
        // Interned key sets are equal when they are the same set; the slice comparison is for safety.
        let same_keys = match (&self.keys, &other.keys) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            (None, None) => true,
            _ => false,
        };
        same_keys && self.values == other.values
    }
}

impl Eq for Attributes {}

impl PartialOrd for Attributes {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Attributes {
    /// Lexicographically over (key, value) pairs, then by length, as the maps are.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.iter().cmp(other.iter())
    }
}

impl Hash for Attributes {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.len());
        for pair in self.iter() {
            pair.hash(state);
        }
    }
}

impl<'a> IntoIterator for &'a Attributes {
    type Item = (&'a str, &'a str);
    type IntoIter = std::iter::Map<
        std::iter::Zip<std::slice::Iter<'a, Text>, std::slice::Iter<'a, Text>>,
        fn((&'a Text, &'a Text)) -> (&'a str, &'a str),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.key_slice().iter().zip(self.values.iter()).map(|(k, v)| (&**k, &**v))
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Attributes {
    /// Like collecting into a `BTreeMap`: of two equal keys the last one wins.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let owned: Vec<(K, V)> = iter.into_iter().collect();
        let mut entries: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        // Stable: equal keys keep their input order, so the last is the one kept.
        entries.sort_by(|a, b| a.0.cmp(b.0));
        let mut kept: Vec<(&str, &str)> = Vec::with_capacity(entries.len());
        for entry in entries {
            match kept.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => kept.push(entry),
            }
        }
        Attributes::from_sorted(&kept, &mut interner())
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for Attributes {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Attributes {
    fn from(map: BTreeMap<String, String>) -> Self {
        let entries: Vec<(&str, &str)> = map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Attributes::from_sorted(&entries, &mut interner())
    }
}

impl From<&Attributes> for BTreeMap<String, String> {
    fn from(attributes: &Attributes) -> Self {
        attributes.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }
}

impl std::ops::Index<&str> for Attributes {
    type Output = str;

    /// Panics when the key is absent, like `BTreeMap`'s index.
    fn index(&self, key: &str) -> &str {
        match self.get(key) {
            Some(value) => value,
            None => panic!("no attribute {key:?}"),
        }
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl serde::Serialize for Attributes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

/// A key set in the interner, looked up by its keys.
#[derive(PartialEq, Eq, Hash)]
struct InternedKeys(Arc<Keys>);

impl Borrow<[Text]> for InternedKeys {
    fn borrow(&self) -> &[Text] {
        &self.0.0
    }
}

/// The interned strings and key sets. Entries nobody else holds any more are
/// dropped when a table has doubled since its last sweep, so each stays within
/// twice what is in use however values churn.
struct Interner {
    strings: HashSet<Text>,
    sweep_at: usize,
    keys: HashSet<InternedKeys>,
    keys_sweep_at: usize,
}

const MIN_SWEEP: usize = 4096;

static INTERNER: LazyLock<Mutex<Interner>> = LazyLock::new(|| {
    Mutex::new(Interner {
        strings: HashSet::new(),
        sweep_at: MIN_SWEEP,
        keys: HashSet::new(),
        keys_sweep_at: MIN_SWEEP,
    })
});

fn interner() -> MutexGuard<'static, Interner> {
    // A poisoned lock only means a panic elsewhere mid-insert; the tables are still usable.
    INTERNER.lock().unwrap_or_else(|e| e.into_inner())
}

impl Interner {
    fn string(&mut self, s: &str) -> Text {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        let shared: Text = Arc::from(s);
        self.strings.insert(shared.clone());
        if self.strings.len() >= self.sweep_at {
            self.strings.retain(|t| Arc::strong_count(t) > 1);
            self.strings.shrink_to_fit();
            self.sweep_at = (self.strings.len() * 2).max(MIN_SWEEP);
        }
        shared
    }

    fn keys(&mut self, keys: Box<[Text]>) -> Arc<Keys> {
        if let Some(shared) = self.keys.get(&keys[..]) {
            return shared.0.clone();
        }
        let shared = Arc::new(Keys(keys));
        self.keys.insert(InternedKeys(shared.clone()));
        if self.keys.len() >= self.keys_sweep_at {
            self.keys.retain(|k| Arc::strong_count(&k.0) > 1);
            self.keys.shrink_to_fit();
            self.keys_sweep_at = (self.keys.len() * 2).max(MIN_SWEEP);
        }
        shared
    }
}

/// The shared copy of `s`.
pub fn intern(s: &str) -> Text {
    interner().string(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_the_map_it_replaces() {
        let pairs = [("b", "2"), ("a", "1"), ("c", "3"), ("a", "9")];
        let ours: Attributes = pairs.into_iter().collect();
        let map: BTreeMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(
            ours.iter().collect::<Vec<_>>(),
            map.iter().map(|(k, v)| (&**k, &**v)).collect::<Vec<_>>()
        );
        assert_eq!(ours.get("a"), Some("9"));
        assert_eq!(&ours["c"], "3");
        assert_eq!(ours.get("z"), None);
        assert_eq!(BTreeMap::from(&ours), map);
        // Ordered as the maps are: lexicographically over (key, value) pairs, then by length.
        let other: Attributes = [("a", "9"), ("b", "2")].into();
        let other_map = BTreeMap::from(&other);
        assert_eq!(ours.cmp(&other), map.cmp(&other_map));
        assert_eq!(format!("{ours:?}"), format!("{map:?}"));
    }

    #[test]
    fn inserts_and_removes_keep_the_order() {
        let mut a = Attributes::from([("b", "2")]);
        a.insert("a", "1");
        a.insert("c", "3");
        a.insert("b", "4");
        assert_eq!(a.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "4"), ("c", "3")]);
        assert_eq!(a.remove("a").as_deref(), Some("1"));
        assert_eq!(a.keys().collect::<Vec<_>>(), ["b", "c"]);
    }

    #[test]
    fn equal_strings_are_shared() {
        let a = Attributes::from([("REGION", "us-east-1")]);
        let b = Attributes::from([("REGION".to_string(), "us-east-1".to_string())]);
        assert!(Arc::ptr_eq(&a.key_slice()[0], &b.key_slice()[0]));
        assert!(Arc::ptr_eq(&a.values[0], &b.values[0]));
    }

    #[test]
    fn equal_key_sets_are_shared_whatever_the_values() {
        let a = Attributes::from([("REGION", "us-east-1"), ("AZ", "a")]);
        let mut b = Attributes::from([("AZ", "b"), ("REGION", "eu-west-1")]);
        assert!(Arc::ptr_eq(a.keys.as_ref().unwrap(), b.keys.as_ref().unwrap()));
        assert_ne!(a, b);
        // An edit that leaves the keys as they were keeps the shared set; one that adds a key moves to another.
        b.insert("AZ", "a");
        b.insert("REGION", "us-east-1");
        assert!(Arc::ptr_eq(a.keys.as_ref().unwrap(), b.keys.as_ref().unwrap()));
        assert_eq!(a, b);
        b.insert("zone", "z");
        assert!(!Arc::ptr_eq(a.keys.as_ref().unwrap(), b.keys.as_ref().unwrap()));
        assert_eq!(b.remove("zone").as_deref(), Some("z"));
        assert_eq!(a, b);
        // Removing the last attribute leaves the same value as no attribute at all.
        let mut c = Attributes::from([("k", "v")]);
        c.remove("k");
        assert_eq!(c, Attributes::new());
        assert!(c.is_empty() && c.iter().next().is_none());
    }

    #[test]
    fn order_and_hash_follow_the_pairs_across_key_sets() {
        use std::hash::BuildHasher;
        let sets = [
            Attributes::new(),
            Attributes::from([("a", "1")]),
            Attributes::from([("a", "1"), ("b", "2")]),
            Attributes::from([("a", "2")]),
            Attributes::from([("b", "1")]),
            Attributes::from([("a", "1"), ("c", "0")]),
        ];
        let hasher = std::hash::RandomState::new();
        for x in &sets {
            for y in &sets {
                let (mx, my) = (BTreeMap::from(x), BTreeMap::from(y));
                assert_eq!(x.cmp(y), mx.cmp(&my), "{x:?} vs {y:?}");
                assert_eq!(x == y, mx == my);
            }
            let again: Attributes = x.iter().collect();
            assert_eq!(hasher.hash_one(x), hasher.hash_one(&again));
        }
    }
}
