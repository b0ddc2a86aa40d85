//! Memory-mapped safetensors: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Nothing is read until a tensor is asked for, so a rank that
//! owns a slice of a tensor touches only those pages.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{EngineError, Result};

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
    /// OCP float8 e4m3 (`F8_E4M3` in safetensors): quantized linear weights only, always with a
    /// scale tensor (see [`crate::fp8`]). Widening gives the unscaled code values.
    F8E4M3,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
            Dtype::F8E4M3 => 1,
        }
    }

    /// The name safetensors headers use ("BF16", "F8_E4M3", ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            Dtype::F32 => "F32",
            Dtype::F8E4M3 => "F8_E4M3",
        }
    }

    /// The safetensors crate's dtype.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::BF16 => safetensors::Dtype::BF16,
            Dtype::F16 => safetensors::Dtype::F16,
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F8E4M3 => safetensors::Dtype::F8_E4M3,
        }
    }
}

/// A borrowed view of one stored tensor: its dtype, shape and raw little-endian bytes.
///
/// Every read goes through [`TensorView::for_each_row`], so that a store opened with a
/// [`ReadObserver`] sees exactly which bytes a rank touched.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: &'a [usize],
    /// Raw bytes, `shape.product() * dtype.size()` of them.
    pub bytes: &'a [u8],
    /// Who sees the reads, when the store was opened with an observer.
    pub observer: Option<&'a dyn ReadObserver>,
}

impl<'a> TensorView<'a> {
    /// A view with no read observer (tests, in-memory tensors).
    pub fn new(name: &'a str, dtype: Dtype, shape: &'a [usize], bytes: &'a [u8]) -> Self {
        TensorView { name, dtype, shape, bytes, observer: None }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements per row of the outermost dimension.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Calls `f` with the raw bytes of columns `cols` of each row in `rows` (rows of the outermost
    /// dimension, columns of the flattened rest), in order, reporting each read to the observer.
    ///
    /// Panics only on ranges outside the shape, which the loaders check before asking.
    pub fn for_each_row(&self, rows: Range<usize>, cols: Range<usize>, mut f: impl FnMut(&'a [u8])) {
        let (row_len, es) = (self.row_len(), self.dtype.size());
        assert!(rows.end <= self.shape.first().copied().unwrap_or(1) && cols.end <= row_len, "block out of range");
        if cols.len() == row_len {
            // Whole rows are one contiguous run: one read, one report.
            let bytes = &self.bytes[rows.start * row_len * es..rows.end * row_len * es];
            self.record(rows.start * row_len * es..rows.end * row_len * es);
            for row in bytes.chunks_exact((row_len * es).max(1)) {
                f(row);
            }
            return;
        }
        for r in rows {
            let range = (r * row_len + cols.start) * es..(r * row_len + cols.end) * es;
            self.record(range.clone());
            f(&self.bytes[range]);
        }
    }

    fn record(&self, bytes: Range<usize>) {
        if let Some(observer) = self.observer {
            observer.read(self.name, bytes);
        }
    }

    /// Converts the block `rows` x `cols` to f32, appending to `out` row by row.
    pub fn block_to_f32(&self, rows: Range<usize>, cols: Range<usize>, out: &mut Vec<f32>) {
        out.reserve(rows.len() * cols.len());
        let dtype = self.dtype;
        self.for_each_row(rows, cols, |bytes| widen(dtype, bytes, out));
    }

    /// Converts the block `rows` x `cols` to bfloat16 bits (round to nearest even from f32; exact
    /// from bf16), appending to `out` row by row.
    pub fn block_to_bf16_bits(&self, rows: Range<usize>, cols: Range<usize>, out: &mut Vec<u16>) {
        out.reserve(rows.len() * cols.len());
        let dtype = self.dtype;
        let mut tmp = Vec::new();
        self.for_each_row(rows, cols, |bytes| match dtype {
            Dtype::BF16 => out.extend(bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]))),
            _ => {
                tmp.clear();
                widen(dtype, bytes, &mut tmp);
                out.extend(tmp.iter().map(|&v| half::bf16::from_f32(v).to_bits()));
            }
        });
    }

    /// Converts rows `rows` (of the outermost dimension) to f32, appending to `out`.
    pub fn rows_to_f32(&self, rows: Range<usize>, out: &mut Vec<f32>) {
        self.block_to_f32(rows, 0..self.row_len(), out);
    }

    /// The whole tensor as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::new();
        self.rows_to_f32(0..self.shape.first().copied().unwrap_or(1), &mut out);
        out
    }
}

/// Appends the little-endian elements of `bytes` to `out` as f32 (exact for every dtype; e4m3
/// gives the unscaled code values).
pub fn widen(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        Dtype::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        Dtype::BF16 => {
            out.extend(bytes.chunks_exact(2).map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()))
        }
        Dtype::F16 => {
            out.extend(bytes.chunks_exact(2).map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()))
        }
        Dtype::F8E4M3 => out.extend(bytes.iter().map(|&b| crate::fp8::decode(b))),
    }
}

/// `values` stored as `dtype`, little-endian: the inverse of reading a tensor as f32 (round to
/// nearest even; e4m3 saturates at ±448).
pub fn narrow(values: &[f32], dtype: Dtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    for &v in values {
        match dtype {
            Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
            Dtype::F8E4M3 => out.push(crate::fp8::encode(v)),
        }
    }
    out
}

/// Sees every byte range read from a store's tensors (relative to each tensor's data). Tests use
/// one to show that a tensor-parallel rank reads only its own slices; serving never sets one.
pub trait ReadObserver: Send + Sync + std::fmt::Debug {
    /// `bytes` of tensor `tensor` were read.
    fn read(&self, tensor: &str, bytes: Range<usize>);
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// All tensors of a model folder, memory-mapped.
pub struct WeightStore {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, Entry>,
    observer: Option<Arc<dyn ReadObserver>>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("files", &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Name of the single-file weights.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

impl WeightStore {
    /// Opens the weights of the model folder `dir`: `model.safetensors.index.json` and its shards
    /// when the index exists, `model.safetensors` otherwise.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let files: Vec<PathBuf> = if index.exists() {
            shard_files(&index)?.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join(SINGLE_FILE)]
        };
        let mut store = WeightStore { files: Vec::new(), tensors: HashMap::new(), observer: None };
        for path in files {
            store.add_file(path)?;
        }
        Ok(store)
    }

    /// Like [`WeightStore::open`], reporting every byte range read to `observer`.
    pub fn open_observed(dir: &Path, observer: Arc<dyn ReadObserver>) -> Result<Self> {
        let mut store = Self::open(dir)?;
        store.observer = Some(observer);
        Ok(store)
    }

    /// Stored size in bytes of the tensor called `name` (0 when absent).
    pub fn byte_len(&self, name: &str) -> usize {
        self.tensors.get(name).map_or(0, |e| e.end - e.start)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EngineError::MissingFile {
                path: path.clone(),
                why: format!("weights must be in {SINGLE_FILE} or in the shards {INDEX_FILE} lists"),
            },
            _ => EngineError::Io { path: path.clone(), source: e },
        })?;
        // SAFETY: the map is read-only; a model file modified while being served is outside what
        // any inference server can defend against, and we never hand out references that outlive
        // the store.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::Io { path: path.clone(), source: e })?;
        let bad = |message: String| EngineError::BadWeightsFile { path: path.clone(), message };
        if mmap.len() < 8 {
            return Err(bad(format!("file is {} bytes, too short for a safetensors header", mmap.len())));
        }
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap[..]).map_err(|e| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                bad(format!("truncated: the header describes more data than the file's {} bytes", mmap.len()))
            }
            e => bad(format!("unreadable header ({e}); the file may be truncated or not safetensors")),
        })?;
        let data_start = 8 + header_len;
        let file_idx = self.files.len();
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                safetensors::Dtype::BF16 => Dtype::BF16,
                safetensors::Dtype::F16 => Dtype::F16,
                safetensors::Dtype::F32 => Dtype::F32,
                safetensors::Dtype::F8_E4M3 => Dtype::F8E4M3,
                other => return Err(EngineError::UnsupportedDtype { name: name.clone(), dtype: format!("{other:?}") }),
            };
            let (s, e) = info.data_offsets;
            let (start, end) = (data_start + s, data_start + e);
            if end > mmap.len() {
                return Err(bad(format!(
                    "truncated: tensor {name:?} ends at byte {end} but the file has {} bytes",
                    mmap.len()
                )));
            }
            let n: usize = info.shape.iter().product();
            if n * dtype.size() != e - s {
                return Err(bad(format!(
                    "tensor {name:?} has shape {:?} ({} bytes) but occupies {} bytes",
                    info.shape,
                    n * dtype.size(),
                    e - s
                )));
            }
            if self.tensors.contains_key(&name) {
                return Err(bad(format!("tensor {name:?} is stored in more than one file")));
            }
            self.tensors.insert(name, Entry { file: file_idx, dtype, shape: info.shape.clone(), start, end });
        }
        self.files.push((path, mmap));
        Ok(())
    }

    /// The tensor called `name`, or an error naming it.
    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        let (key, e) = self
            .tensors
            .get_key_value(name)
            .ok_or_else(|| EngineError::MissingTensor { name: name.to_string(), looked_in: self.file_list() })?;
        Ok(TensorView {
            name: key,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: &self.files[e.file].1[e.start..e.end],
            observer: self.observer.as_deref(),
        })
    }

    /// The tensor called `name`, checked to have shape `expected`.
    pub fn get_shaped(&self, name: &str, expected: &[usize]) -> Result<TensorView<'_>> {
        let t = self.get(name)?;
        if t.shape != expected {
            return Err(EngineError::WrongShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: t.shape.to_vec(),
            });
        }
        Ok(t)
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names of all stored tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    fn file_list(&self) -> String {
        self.files
            .iter()
            .map(|(p, _)| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The distinct shard file names of an index, in sorted order.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| EngineError::Io { path: index.to_path_buf(), source: e })?;
    let bad = |message: String| EngineError::Config { path: index.to_path_buf(), message };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map =
        v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("missing object \"weight_map\"".into()))?;
    let mut files = BTreeMap::new();
    for (name, f) in map {
        let f = f.as_str().ok_or_else(|| bad(format!("weight_map[{name:?}] must be a file name")))?;
        if f.contains('/') || f.contains('\\') || f == ".." {
            return Err(bad(format!("weight_map[{name:?}] = {f:?} must be a file name inside the folder")));
        }
        files.insert(f.to_string(), ());
    }
    if files.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok(files.into_keys().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_widens_exactly_to_f32() {
        let values = [1.5f32, -0.25, 65504.0, 3.0e-5];
        let f16: Vec<u8> = values.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect();
        let bf16: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect();
        let f32b: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape = [2usize, 2];
        let view = |dtype, bytes| TensorView::new("t", dtype, &shape, bytes);
        let want16: Vec<f32> = values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let wantb: Vec<f32> = values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(view(Dtype::F16, &f16).to_f32(), want16);
        assert_eq!(view(Dtype::BF16, &bf16).to_f32(), wantb);
        assert_eq!(view(Dtype::F32, &f32b).to_f32(), values);
        let mut row = Vec::new();
        view(Dtype::F16, &f16).rows_to_f32(1..2, &mut row);
        assert_eq!(row, want16[2..]);
    }

    #[test]
    fn column_blocks_read_and_log_only_their_bytes() {
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape = [3usize, 4];
        #[derive(Debug, Default)]
        struct Reads(std::sync::Mutex<Vec<Range<usize>>>);
        impl ReadObserver for Reads {
            fn read(&self, _: &str, bytes: Range<usize>) {
                crate::sync::lock(&self.0).push(bytes);
            }
        }
        let log = Reads::default();
        let view = TensorView { observer: Some(&log), ..TensorView::new("w", Dtype::F32, &shape, &bytes) };
        let mut out = Vec::new();
        view.block_to_f32(1..3, 2..4, &mut out);
        assert_eq!(out, [6.0, 7.0, 10.0, 11.0]);
        let mut bits = Vec::new();
        view.block_to_bf16_bits(0..1, 1..2, &mut bits);
        assert_eq!(bits, [half::bf16::from_f32(1.0).to_bits()]);
        // Row 1 cols 2..4 is bytes 24..32, row 2 is 40..48, row 0 col 1 is 4..8.
        assert_eq!(*crate::sync::lock(&log.0), vec![24..32, 40..48, 4..8]);
        view.rows_to_f32(0..3, &mut out);
        assert_eq!(crate::sync::lock(&log.0).last(), Some(&(0..48)));
    }
}
