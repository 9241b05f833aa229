//! The served resources, sorted by name, in shared chunks: the next snapshot
//! copies only the chunks a change touched, so one changed service costs a copy
//! of one chunk (at most [`MAX_CHUNK`] handles) and of the chunk index, not of
//! every resource.

use std::fmt;
use std::sync::Arc;

use super::Resource;

/// Chunks are cut at this size when built from a sorted list...
const CHUNK: usize = 64;
/// ...and split in two when inserts make one larger than this.
const MAX_CHUNK: usize = 2 * CHUNK;

/// Resources sorted by name, each name once. Cloning shares every chunk.
#[derive(Clone, Default)]
pub struct ResourceList {
    chunks: Vec<Arc<Vec<Arc<Resource>>>>,
    len: usize,
}

/// Where a name is (`Ok`) or would go (`Err`): chunk and index in it.
pub(super) type Position = Result<(usize, usize), (usize, usize)>;

impl ResourceList {
    /// From resources already sorted by name, each name once.
    pub(super) fn from_sorted(resources: Vec<Arc<Resource>>) -> Self {
        let len = resources.len();
        let chunks = resources.chunks(CHUNK).map(|c| Arc::new(c.to_vec())).collect();
        ResourceList { chunks, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// In name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Resource>> + Clone {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    pub fn get(&self, mut index: usize) -> Option<&Arc<Resource>> {
        for chunk in &self.chunks {
            if index < chunk.len() {
                return chunk.get(index);
            }
            index -= chunk.len();
        }
        None
    }

    pub(super) fn find(&self, name: &str) -> Position {
        let c = self.chunks.partition_point(|chunk| chunk.last().is_some_and(|r| r.name.as_str() < name));
        if c == self.chunks.len() {
            // After every name: the end of the last chunk (or a first chunk).
            let last = self.chunks.len().saturating_sub(1);
            return Err((last, self.chunks.last().map_or(0, |chunk| chunk.len())));
        }
        match self.chunks[c].binary_search_by(|r| r.name.as_str().cmp(name)) {
            Ok(i) => Ok((c, i)),
            Err(i) => Err((c, i)),
        }
    }

    pub(super) fn at(&self, (c, i): (usize, usize)) -> &Arc<Resource> {
        &self.chunks[c][i]
    }

    pub(super) fn replace(&mut self, (c, i): (usize, usize), resource: Arc<Resource>) -> Arc<Resource> {
        std::mem::replace(&mut Arc::make_mut(&mut self.chunks[c])[i], resource)
    }

    /// Inserts at a position [`ResourceList::find`] returned as `Err`.
    pub(super) fn insert(&mut self, (c, i): (usize, usize), resource: Arc<Resource>) {
        self.len += 1;
        if self.chunks.is_empty() {
            self.chunks.push(Arc::new(vec![resource]));
            return;
        }
        let chunk = Arc::make_mut(&mut self.chunks[c]);
        chunk.insert(i, resource);
        if chunk.len() > MAX_CHUNK {
            let tail = chunk.split_off(chunk.len() / 2);
            self.chunks.insert(c + 1, Arc::new(tail));
        }
    }

    pub(super) fn remove(&mut self, (c, i): (usize, usize)) -> Arc<Resource> {
        self.len -= 1;
        let chunk = Arc::make_mut(&mut self.chunks[c]);
        let removed = chunk.remove(i);
        if chunk.is_empty() {
            self.chunks.remove(c);
        }
        removed
    }
}

impl std::ops::Index<usize> for ResourceList {
    type Output = Arc<Resource>;

    /// Panics when out of range, like a slice.
    fn index(&self, index: usize) -> &Arc<Resource> {
        match self.get(index) {
            Some(r) => r,
            None => panic!("resource index {index} out of range for {} resources", self.len),
        }
    }
}

impl PartialEq for ResourceList {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl fmt::Debug for ResourceList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter().map(|r| &r.name)).finish()
    }
}

impl<'a> IntoIterator for &'a ResourceList {
    type Item = &'a Arc<Resource>;
    type IntoIter = Box<dyn Iterator<Item = &'a Arc<Resource>> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}
