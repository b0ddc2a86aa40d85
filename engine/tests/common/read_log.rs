//! A [`ReadObserver`] that records which bytes of each tensor were read.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arbiter_engine::sync::lock;
use arbiter_engine::weights::{ReadObserver, WeightStore};

/// Opens `dir` with a fresh [`ReadLog`] watching every read.
pub fn open_logged(dir: &Path) -> (WeightStore, Arc<ReadLog>) {
    let log = Arc::new(ReadLog::default());
    (WeightStore::open_observed(dir, log.clone()).unwrap(), log)
}

/// The byte ranges read from a store's tensors, for showing that a tensor-parallel rank reads only
/// its own slices.
#[derive(Debug, Default)]
pub struct ReadLog {
    reads: Mutex<BTreeMap<String, Vec<Range<usize>>>>,
}

impl ReadObserver for ReadLog {
    fn read(&self, tensor: &str, bytes: Range<usize>) {
        lock(&self.reads).entry(tensor.to_string()).or_default().push(bytes);
    }
}

impl ReadLog {
    /// Per tensor, the byte ranges (relative to the tensor's data) read so far, sorted and with
    /// adjacent or overlapping ranges merged.
    pub fn merged(&self) -> BTreeMap<String, Vec<Range<usize>>> {
        let reads = lock(&self.reads);
        reads
            .iter()
            .map(|(name, ranges)| {
                let mut v = ranges.clone();
                v.sort_by_key(|r| (r.start, r.end));
                let mut out: Vec<Range<usize>> = Vec::new();
                for r in v {
                    match out.last_mut() {
                        Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                        _ => out.push(r),
                    }
                }
                (name.clone(), out)
            })
            .collect()
    }
}
