//! Streaming safetensors output: shards of at most `max_shard_bytes` (a tensor larger than that
//! gets a shard of its own), each file's header written first and its tensors then filled in
//! place, row by row, as the source chunks are read. Nothing bigger than a row and a few write
//! buffers is held in memory.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use arbiter_engine::fp8::{self, Fp8Scheme};
use arbiter_engine::weights::{widen, Dtype, INDEX_FILE, SINGLE_FILE};
use serde_json::{json, Map, Value};

use crate::error::{io, ConvertError, Result};
use crate::layout::{Job, Layout, OutTensor, Route};

/// The largest shard HF writes by default, and what the issue asks for.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Bytes buffered per output cursor before a write.
const WRITE_BUFFER: usize = 8 << 20;

/// Where an output tensor lives: shard file index and byte range in that file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Index into [`Shards::files`].
    pub file: usize,
    /// Absolute byte offset in the file.
    pub start: u64,
    /// Bytes.
    pub len: u64,
}

/// The planned shard files.
#[derive(Debug)]
pub struct Shards {
    /// Shard paths.
    pub files: Vec<PathBuf>,
    /// One place per output tensor.
    pub places: Vec<Place>,
}

/// Groups tensors, in order, into shards of at most `max_bytes` of data.
pub fn group(tensors: &[OutTensor], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let b = t.bytes();
        match groups.last_mut() {
            Some(g) if size + b <= max_bytes => {
                g.push(i);
                size += b;
            }
            _ => {
                groups.push(vec![i]);
                size = b;
            }
        }
    }
    groups
}

/// Creates the shard files in `dir` with their headers and full length, and writes the index
/// when there is more than one shard. One shard is named `model.safetensors`, as HF names it.
pub fn create(dir: &Path, tensors: &[OutTensor], max_bytes: u64) -> Result<Shards> {
    let groups = group(tensors, max_bytes);
    let n = groups.len();
    let mut files = Vec::with_capacity(n);
    let mut places = vec![Place { file: 0, start: 0, len: 0 }; tensors.len()];
    let mut weight_map = Map::new();
    for (fi, g) in groups.iter().enumerate() {
        let name =
            if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", fi + 1, n) };
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt", "converted_by": "arbiter convert"}));
        let mut offset = 0u64;
        for &t in g {
            let tensor = &tensors[t];
            header.insert(
                tensor.name.clone(),
                json!({"dtype": tensor.dtype.safetensors_name(), "shape": tensor.shape, "data_offsets": [offset, offset + tensor.bytes()]}),
            );
            weight_map.insert(tensor.name.clone(), Value::String(name.clone()));
            offset += tensor.bytes();
        }
        let mut text = serde_json::to_string(&Value::Object(header)).expect("a JSON map serializes");
        // The data section starts 8-byte aligned, as the safetensors writer does it.
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        let data_start = 8 + text.len() as u64;
        let path = dir.join(&name);
        let mut f = File::create(&path).map_err(io(&path))?;
        f.write_all(&(text.len() as u64).to_le_bytes()).map_err(io(&path))?;
        f.write_all(text.as_bytes()).map_err(io(&path))?;
        f.set_len(data_start + offset).map_err(io(&path))?;
        let mut at = data_start;
        for &t in g {
            places[t] = Place { file: fi, start: at, len: tensors[t].bytes() };
            at += tensors[t].bytes();
        }
        files.push(path);
    }
    if n > 1 {
        let total: u64 = tensors.iter().map(OutTensor::bytes).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&index).expect("JSON serializes")).map_err(io(&path))?;
    }
    Ok(Shards { files, places })
}

/// `t` as the output tensors of an FP8 folder (it would sit at index `at`): the tensor itself
/// when `scheme` leaves it alone, else the e4m3 weight followed by its f32 `[out, 1]` scale.
pub fn fp8_outputs(t: OutTensor, scheme: &Fp8Scheme, at: usize) -> Vec<OutTensor> {
    if !scheme.quantizes(&t.name) {
        return vec![t];
    }
    let scale =
        OutTensor { name: fp8::scale_name(&t.name), dtype: Dtype::F32, shape: vec![t.shape[0], 1], scale: None };
    vec![OutTensor { dtype: Dtype::F8E4M3, scale: Some(at + 1), ..t }, scale]
}

/// Where the rows of one output tensor go: copied as they come, or, for an FP8 weight,
/// quantized row by row into its codes and its scale tensor. Rows arrive whole (every input
/// column), which is what a per-output-channel scale needs.
pub struct RowSink {
    out: Cursor,
    fp8: Option<(Dtype, Cursor)>,
    row: Vec<f32>,
    codes: Vec<u8>,
}

impl RowSink {
    /// Opens output tensor `t`; `source` is the dtype of the rows that will be written (they are
    /// converted only when `t` is quantized, so they must be `t`'s own dtype otherwise).
    pub fn open(shards: &Shards, tensors: &[OutTensor], t: usize, source: Dtype) -> Result<Self> {
        let out = Cursor::open(shards, tensors, t)?;
        let fp8 = match tensors[t].scale {
            Some(s) => Some((source, Cursor::open(shards, tensors, s)?)),
            None if source != tensors[t].dtype => {
                return Err(ConvertError::Output {
                    path: out.path.clone(),
                    message: format!(
                        "tensor {:?} is {:?} but its rows come as {source:?} (a routing bug)",
                        tensors[t].name, tensors[t].dtype
                    ),
                })
            }
            None => None,
        };
        Ok(RowSink { out, fp8, row: Vec::new(), codes: Vec::new() })
    }

    /// Writes one whole row of the source dtype.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let Some((source, scales)) = &mut self.fp8 else { return self.out.write(bytes) };
        self.row.clear();
        widen(*source, bytes, &mut self.row);
        self.codes.clear();
        let s = fp8::quantize_row(&self.row, &mut self.codes);
        scales.write(&s.to_le_bytes())?;
        self.out.write(&self.codes)
    }

    /// Checks that every byte of the tensor (and its scales) was written, and flushes.
    pub fn finish(self) -> Result<()> {
        if let Some((_, scales)) = self.fp8 {
            scales.finish()?;
        }
        self.out.finish()
    }
}

/// A sequential writer into one output tensor's byte range.
struct Cursor {
    path: PathBuf,
    name: String,
    out: BufWriter<File>,
    left: u64,
}

impl Cursor {
    fn open(shards: &Shards, tensors: &[OutTensor], t: usize) -> Result<Self> {
        let p = shards.places[t];
        let path = shards.files[p.file].clone();
        let mut f = File::options().write(true).open(&path).map_err(io(&path))?;
        f.seek(SeekFrom::Start(p.start)).map_err(io(&path))?;
        let cap = WRITE_BUFFER.min(p.len as usize).max(1);
        Ok(Cursor { path, name: tensors[t].name.clone(), out: BufWriter::with_capacity(cap, f), left: p.len })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 > self.left {
            return Err(ConvertError::Output {
                path: self.path.clone(),
                message: format!("more data than tensor {:?} holds (a routing bug)", self.name),
            });
        }
        self.left -= bytes.len() as u64;
        self.out.write_all(bytes).map_err(io(&self.path))
    }

    fn finish(mut self) -> Result<()> {
        if self.left != 0 {
            return Err(ConvertError::Output {
                path: self.path.clone(),
                message: format!("tensor {:?} is {} bytes short (a routing bug)", self.name, self.left),
            });
        }
        self.out.flush().map_err(io(&self.path))
    }
}

/// Runs one job: streams its rows into the output tensors; `progress(bytes)` after each row.
pub fn run_job(layout: &Layout, shards: &Shards, job: &Job, progress: &mut dyn FnMut(u64)) -> Result<()> {
    let array = &layout.arrays[job.array];
    match job.route {
        Route::Copy(t) => {
            let mut c = RowSink::open(shards, &layout.outputs, t, array.dtype)?;
            array.stream_rows(&job.prefix, &mut |_, row| {
                progress(row.len() as u64);
                c.write(row)
            })?;
            c.finish()
        }
        Route::Qkv { q, k, v, heads_per_group, head_dim } => {
            let mut cq = RowSink::open(shards, &layout.outputs, q, array.dtype)?;
            let mut ck = RowSink::open(shards, &layout.outputs, k, array.dtype)?;
            let mut cv = RowSink::open(shards, &layout.outputs, v, array.dtype)?;
            let group_rows = (heads_per_group + 2) * head_dim;
            array.stream_rows(&job.prefix, &mut |r, row| {
                progress(row.len() as u64);
                // Rows of a group come in order, and groups in order, so each of q, k and v is
                // filled front to back.
                let within = r % group_rows;
                if within < heads_per_group * head_dim {
                    cq.write(row)
                } else if within < (heads_per_group + 1) * head_dim {
                    ck.write(row)
                } else {
                    cv.write(row)
                }
            })?;
            cq.finish()?;
            ck.finish()?;
            cv.finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, rows: usize) -> OutTensor {
        OutTensor { name: name.into(), dtype: Dtype::BF16, shape: vec![rows, 50], scale: None }
    }

    #[test]
    fn shards_pack_in_order_and_oversized_tensors_stand_alone() {
        // 100 bytes per row of 50 bf16.
        let ts = [t("a", 3), t("b", 4), t("c", 20), t("d", 1), t("e", 9), t("f", 1)];
        assert_eq!(group(&ts, 1000), vec![vec![0, 1], vec![2], vec![3, 4], vec![5]]);
        assert_eq!(group(&ts, 100_000), vec![vec![0, 1, 2, 3, 4, 5]]);
    }
}
