//! An instance's Cloud Map attributes, stored compactly.
//!
//! ECS registers the same seven or eight keys on every instance, and most
//! values repeat too (region, zone, cluster, port, the task's service name on
//! every task of a service). Keys and values are therefore interned: every
//! instance holds one small sorted array of shared strings instead of a map of
//! its own, which at 100,000 instances is the difference between about 100 MB
//! and about 30 MB.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};

/// An interned string: equal strings share one allocation, and comparing two
/// equal ones costs a pointer comparison (`Arc`'s equality checks identity first).
pub type Text = Arc<str>;

/// Attribute keys and values sorted by key, each key once. Iterates, compares
/// and orders exactly like the `BTreeMap<String, String>` it replaces.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attributes(Box<[(Text, Text)]>);

impl Attributes {
    pub fn new() -> Self {
        Attributes::default()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key).ok().map(|i| &*self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// In key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + Clone {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + Clone {
        self.0.iter().map(|(k, _)| &**k)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets one attribute (replacing its value). Copies the array: meant for
    /// edits, not for building (collect an iterator for that).
    pub fn insert(&mut self, key: impl AsRef<str>, value: impl AsRef<str>) {
        let entry = (intern(key.as_ref()), intern(value.as_ref()));
        let mut entries = std::mem::take(&mut self.0).into_vec();
        match position(&entries, key.as_ref()) {
            Ok(i) => entries[i] = entry,
            Err(i) => entries.insert(i, entry),
        }
        self.0 = entries.into_boxed_slice();
    }

    pub fn remove(&mut self, key: &str) -> Option<Text> {
        let i = self.position(key).ok()?;
        let mut entries = std::mem::take(&mut self.0).into_vec();
        let (_, value) = entries.remove(i);
        self.0 = entries.into_boxed_slice();
        Some(value)
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        position(&self.0, key)
    }
}

fn position(entries: &[(Text, Text)], key: &str) -> Result<usize, usize> {
    entries.binary_search_by(|(k, _)| (**k).cmp(key))
}

impl<'a> IntoIterator for &'a Attributes {
    type Item = (&'a str, &'a str);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (Text, Text)>, fn(&'a (Text, Text)) -> (&'a str, &'a str)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Attributes {
    /// Like collecting into a `BTreeMap`: of two equal keys the last one wins.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut entries: Vec<(Text, Text)> =
            iter.into_iter().map(|(k, v)| (intern(k.as_ref()), intern(v.as_ref()))).collect();
        // Stable: equal keys keep their input order, so the last is the one kept.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept: Vec<(Text, Text)> = Vec::with_capacity(entries.len());
        for entry in entries {
            match kept.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => kept.push(entry),
            }
        }
        Attributes(kept.into_boxed_slice())
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> From<[(K, V); N]> for Attributes {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Attributes {
    fn from(map: BTreeMap<String, String>) -> Self {
        map.into_iter().collect()
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

/// The interned strings. Entries nobody else holds any more are dropped when
/// the table has doubled since the last sweep, so it stays within twice what is
/// in use however values churn.
struct Interner {
    strings: HashSet<Text>,
    sweep_at: usize,
}

const MIN_SWEEP: usize = 4096;

static INTERNER: LazyLock<Mutex<Interner>> =
    LazyLock::new(|| Mutex::new(Interner { strings: HashSet::new(), sweep_at: MIN_SWEEP }));

/// The shared copy of `s`.
pub fn intern(s: &str) -> Text {
    // A poisoned lock only means a panic elsewhere mid-insert; the set is still usable.
    let mut interner = INTERNER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = interner.strings.get(s) {
        return shared.clone();
    }
    let shared: Text = Arc::from(s);
    interner.strings.insert(shared.clone());
    if interner.strings.len() >= interner.sweep_at {
        interner.strings.retain(|t| Arc::strong_count(t) > 1);
        interner.strings.shrink_to_fit();
        interner.sweep_at = (interner.strings.len() * 2).max(MIN_SWEEP);
    }
    shared
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
        assert!(Arc::ptr_eq(&a.0[0].0, &b.0[0].0));
        assert!(Arc::ptr_eq(&a.0[0].1, &b.0[0].1));
    }
}
