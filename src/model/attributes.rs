//! An instance's Cloud Map attributes, stored compactly.
//!
//! ECS registers the same seven or eight keys on every instance. The keys are
//! therefore interned, and so is each set of keys: every instance holds a pointer
//! to its (shared) sorted keys and one string of its own with the values one after
//! another, each behind its length. Most values are shorter than the 16 bytes a
//! shared pointer to them would take, and the one that is unique to each instance
//! (its address) would cost an allocation and an interner entry of its own: at
//! 100,000 instances of seven attributes this is about 8 MB, where an array of
//! shared values took about 20 MB, pairs of shared keys and values 24 MB and a map
//! per instance about 100 MB.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

/// An interned string: equal strings share one allocation, and comparing two
/// equal ones costs a pointer comparison (`Arc`'s equality checks identity first).
pub type Text = Arc<str>;

/// Attribute keys and values sorted by key, each key once. Iterates, compares
/// and orders exactly like the `BTreeMap<String, String>` it replaces.
/// Equal attributes have the same interned key set (compared by address first)
/// and the same values string: one encoding per list of values.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// The keys, sorted, shared by every instance with the same keys; `None`: no attribute.
    keys: Option<Arc<Keys>>,
    /// The values in key order, each after its length (see [`push_len`]). One
    /// encoding per list of values, so equal values mean equal strings.
    values: Box<str>,
}

/// One interned set of attribute keys, sorted. Behind an `Arc` of its own (a thin
/// pointer) rather than an `Arc<[Text]>`: eight bytes less in every instance.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Keys(Box<[Text]>);

/// The key set of some [`Attributes`], held (so it stays the same allocation) to
/// recognise attributes with the very same keys. Key sets are interned, so
/// instances with equal keys nearly always share one, and a translation can
/// work out what each key means once per key set.
#[derive(Debug, Clone, Default)]
pub struct KeySet(Option<Arc<Keys>>);

impl KeySet {
    /// Whether `attributes` holds this very key set (the same allocation, or both
    /// none): then their keys are equal without comparing them.
    pub fn is_of(&self, attributes: &Attributes) -> bool {
        match (&self.0, &attributes.keys) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

/// Bits of a length in each byte of its encoding; the next bit says another byte follows.
const LEN_BITS: u32 = 6;
const LEN_MORE: u8 = 1 << LEN_BITS;
const LEN_MASK: usize = (1 << LEN_BITS) - 1;

/// Appends `len` in ASCII bytes, least significant bits first, [`LEN_BITS`] a byte:
/// one byte for a value under 64 bytes, two under 4,096. ASCII keeps the whole
/// encoding a `str`, so every value is a plain slice of it.
fn push_len(out: &mut String, mut len: usize) {
    loop {
        // Masked to six bits: fits a u8 and stays ASCII with the continuation bit.
        let low = (len & LEN_MASK) as u8;
        len >>= LEN_BITS;
        if len == 0 {
            out.push(char::from(low));
            return;
        }
        out.push(char::from(low | LEN_MORE));
    }
}

/// Bytes [`push_len`] writes for `len`.
fn len_of_len(len: usize) -> usize {
    let bits = usize::BITS - len.leading_zeros();
    (bits.max(1).div_ceil(LEN_BITS)) as usize
}

/// The length [`push_len`] wrote at the start of `bytes`, and the bytes it took.
fn read_len(bytes: &[u8]) -> Option<(usize, usize)> {
    let first = *bytes.first()?;
    if first & LEN_MORE == 0 {
        return Some((usize::from(first), 1));
    }
    let (mut len, mut shift) = (0usize, 0u32);
    for (at, &byte) in bytes.iter().enumerate() {
        len |= usize::from(byte & (LEN_MORE - 1)).checked_shl(shift)?;
        if byte & LEN_MORE == 0 {
            return Some((len, at + 1));
        }
        shift += LEN_BITS;
    }
    None
}

/// The values of an [`Attributes`], in key order.
#[derive(Clone)]
struct Values<'a> {
    rest: &'a str,
    left: usize,
}

impl<'a> Iterator for Values<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let (len, at) = read_len(self.rest.as_bytes())?;
        // Never `None` for an encoding `push_len` wrote: the lengths are ASCII bytes
        // and every value a whole `str`, so both ends fall on character boundaries.
        let value = self.rest.get(at..at + len)?;
        self.rest = self.rest.get(at + len..)?;
        self.left = self.left.saturating_sub(1);
        Some(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Values<'_> {}

/// The attributes in key order, as `(key, value)`.
#[derive(Clone)]
pub struct Iter<'a> {
    keys: std::slice::Iter<'a, Text>,
    values: Values<'a>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        Some((self.keys.next()?, self.values.next()?))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.keys.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl Attributes {
    pub fn new() -> Self {
        Attributes::default()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        // Skips the values before it by their lengths alone.
        self.values().nth(self.position(key).ok()?)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// In key order.
    pub fn iter(&self) -> Iter<'_> {
        Iter { keys: self.key_slice().iter(), values: self.values() }
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + Clone {
        self.key_slice().iter().map(|k| &**k)
    }

    /// Its key set, kept to recognise it later (see [`KeySet::is_of`]).
    pub fn key_set(&self) -> KeySet {
        KeySet(self.keys.clone())
    }

    pub fn len(&self) -> usize {
        self.key_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.key_slice().is_empty()
    }

    /// Sets one attribute (replacing its value). Copies the attributes: meant for
    /// edits, not for building (collect an iterator for that).
    pub fn insert(&mut self, key: impl AsRef<str>, value: impl AsRef<str>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        let mut entries = self.entries();
        match self.position(key) {
            Ok(i) => entries[i].1 = value,
            Err(i) => entries.insert(i, (key, value)),
        }
        *self = Attributes::from_sorted(&entries);
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.position(key).ok()?;
        let mut entries = self.entries();
        let (_, value) = entries.remove(i);
        let value = value.to_owned();
        *self = Attributes::from_sorted(&entries);
        Some(value)
    }

    fn key_slice(&self) -> &[Text] {
        self.keys.as_deref().map_or(&[], |k| &k.0)
    }

    fn values(&self) -> Values<'_> {
        Values { rest: &self.values, left: self.len() }
    }

    fn entries(&self) -> Vec<(&str, &str)> {
        self.iter().collect()
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.key_slice().binary_search_by(|k| (**k).cmp(key))
    }

    /// From entries sorted by key, each key once.
    fn from_sorted(entries: &[(&str, &str)]) -> Self {
        if entries.is_empty() {
            return Attributes::default();
        }
        let size = entries.iter().map(|(_, v)| len_of_len(v.len()) + v.len()).sum();
        let mut values = String::with_capacity(size);
        for (_, value) in entries {
            push_len(&mut values, value.len());
            values.push_str(value);
        }
        let mut interner = interner();
        let keys: Box<[Text]> = entries.iter().map(|(k, _)| interner.string(k)).collect();
        Attributes { keys: Some(interner.keys(&keys)), values: values.into_boxed_str() }
    }
}

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

impl<'a> IntoIterator for &'a Attributes {
    type Item = (&'a str, &'a str);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
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
        Attributes::from_sorted(&kept)
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
        Attributes::from_sorted(&entries)
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
#[derive(Clone, PartialEq, Eq, Hash)]
struct InternedKeys(Arc<Keys>);

impl Borrow<[Text]> for InternedKeys {
    fn borrow(&self) -> &[Text] {
        &self.0.0
    }
}

/// One table of shared values. Entries nobody else holds any more are dropped
/// when the table has doubled since its last sweep, so it stays within twice
/// what is in use however values churn.
struct Table<T> {
    entries: HashSet<T>,
    sweep_at: usize,
}

impl<T: Hash + Eq + Clone> Table<T> {
    fn new() -> Self {
        Table { entries: HashSet::new(), sweep_at: MIN_SWEEP }
    }

    /// The shared entry equal to `key`, made by `make` when there is none;
    /// `in_use` tells an entry held elsewhere from one only the table holds.
    fn shared<Q>(&mut self, key: &Q, make: impl FnOnce() -> T, in_use: impl Fn(&T) -> bool) -> T
    where
        T: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(shared) = self.entries.get(key) {
            return shared.clone();
        }
        let shared = make();
        self.entries.insert(shared.clone());
        if self.entries.len() >= self.sweep_at {
            self.entries.retain(|e| in_use(e));
            self.entries.shrink_to_fit();
            self.sweep_at = (self.entries.len() * 2).max(MIN_SWEEP);
        }
        shared
    }
}

/// The interned strings and key sets.
struct Interner {
    strings: Table<Text>,
    keys: Table<InternedKeys>,
}

const MIN_SWEEP: usize = 4096;

static INTERNER: LazyLock<Mutex<Interner>> =
    LazyLock::new(|| Mutex::new(Interner { strings: Table::new(), keys: Table::new() }));

fn interner() -> MutexGuard<'static, Interner> {
    // A poisoned lock only means a panic elsewhere mid-insert; the tables are still usable.
    INTERNER.lock().unwrap_or_else(|e| e.into_inner())
}

impl Interner {
    fn string(&mut self, s: &str) -> Text {
        self.strings.shared(s, || Arc::from(s), |t| Arc::strong_count(t) > 1)
    }

    /// A new set copies its keys (shared pointers); a known one copies nothing.
    fn keys(&mut self, keys: &[Text]) -> Arc<Keys> {
        let make = || InternedKeys(Arc::new(Keys(keys.into())));
        self.keys.shared(keys, make, |k| Arc::strong_count(&k.0) > 1).0
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
    fn equal_keys_are_shared() {
        let a = Attributes::from([("REGION", "us-east-1")]);
        let b = Attributes::from([("REGION".to_string(), "us-east-1".to_string())]);
        assert!(Arc::ptr_eq(&a.key_slice()[0], &b.key_slice()[0]));
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

    #[test]
    fn values_of_any_length_and_text_come_back_as_they_went_in() {
        let lengths = [0, 1, 63, 64, 65, 4095, 4096, 262_143, 262_144, 300_000];
        for len in lengths {
            let mut encoded = String::new();
            push_len(&mut encoded, len);
            assert_eq!(encoded.len(), len_of_len(len), "length {len}");
            assert!(encoded.is_ascii());
        }
        let long = "x".repeat(300_000);
        let pairs: Vec<(String, String)> = lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| (format!("k{i:02}"), long[..len].to_owned()))
            .chain([("unicode".into(), "zoné 東京 🚀".into()), ("z".into(), String::new())])
            .collect();
        let ours: Attributes = pairs.iter().map(|(k, v)| (k, v)).collect();
        assert_eq!(ours.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect::<Vec<_>>(), pairs);
        assert_eq!(ours.iter().len(), pairs.len());
        for (k, v) in &pairs {
            assert_eq!(ours.get(k), Some(v.as_str()));
        }
        assert_eq!(ours.get("unicode"), Some("zoné 東京 🚀"));
        // One encoding per list of values: built in another order, or edited into shape, it is equal.
        let reversed: Attributes = pairs.iter().rev().map(|(k, v)| (k, v)).collect();
        assert_eq!(reversed, ours);
        let mut edited = reversed.clone();
        edited.insert("k03", "changed");
        assert_ne!(edited, ours);
        edited.insert("k03", &long[..64]);
        assert_eq!(edited, ours);
    }
}
