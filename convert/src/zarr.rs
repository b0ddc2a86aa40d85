//! A zarr v2 reader for exactly what Megatron's distributed checkpoint writes: uncompressed,
//! C-order arrays of `"bfloat16"` (or `<f2` / `<f4`), one raw little-endian file per chunk, chunk
//! files named with `.` between indices. Anything else is refused with an error naming the array.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use arbiter_engine::weights::Dtype;
use serde_json::Value;

use crate::error::{io, ConvertError, Result};

/// Read-ahead per open chunk file; a row-split tensor keeps one reader per tensor-parallel rank.
const READ_BUFFER: usize = 1 << 20;

/// One zarr array (a folder with `.zarray` and chunk files).
#[derive(Debug, Clone)]
pub struct ZarrArray {
    /// The tensor's name (the folder name).
    pub name: String,
    /// The folder.
    pub dir: PathBuf,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Chunk shape.
    pub chunks: Vec<usize>,
    /// Element type.
    pub dtype: Dtype,
    /// The dtype as `.zarray` spells it, for messages.
    pub dtype_name: String,
}

impl ZarrArray {
    /// Reads and checks `dir/.zarray`.
    pub fn open(dir: &Path) -> Result<Self> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let path = dir.join(".zarray");
        let bad = |message: String| ConvertError::BadArray { name: name.clone(), path: path.clone(), message };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConvertError::MissingFile { path, why: format!("tensor {name:?} is not a zarr array") })
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let field = |k: &str| v.get(k).unwrap_or(&Value::Null);
        if field("zarr_format").as_u64() != Some(2) {
            return Err(bad(format!("zarr_format is {}, only zarr v2 is read", field("zarr_format"))));
        }
        if !field("compressor").is_null() {
            return Err(bad(format!(
                "compressor {} is not supported: Megatron writes uncompressed chunks (\"compressor\": null)",
                field("compressor")
            )));
        }
        if !matches!(field("filters"), Value::Null) && field("filters").as_array().is_none_or(|a| !a.is_empty()) {
            return Err(bad(format!("filters {} are not supported", field("filters"))));
        }
        if !matches!(field("order"), Value::String(s) if s == "C") {
            return Err(bad(format!("order {} is not supported, only \"C\"", field("order"))));
        }
        match field("dimension_separator") {
            Value::Null => {}
            Value::String(s) if s == "." => {}
            other => return Err(bad(format!("dimension_separator {other} is not supported, only \".\""))),
        }
        let dtype_name = field("dtype").as_str().unwrap_or_default().to_string();
        let dtype = match dtype_name.as_str() {
            "bfloat16" => Dtype::BF16,
            "<f2" => Dtype::F16,
            "<f4" => Dtype::F32,
            _ => {
                return Err(bad(format!(
                    "dtype {} is not supported; expected \"bfloat16\", \"<f2\" or \"<f4\"",
                    field("dtype")
                )))
            }
        };
        let dims = |k: &str| -> Result<Vec<usize>> {
            field(k)
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad(format!("{k} must be a list of non-negative integers, found {}", field(k))))
        };
        let (shape, chunks) = (dims("shape")?, dims("chunks")?);
        if shape.len() != chunks.len() || shape.is_empty() {
            return Err(bad(format!("shape {shape:?} and chunks {chunks:?} must have the same, non-zero rank")));
        }
        if chunks.contains(&0) {
            return Err(bad(format!("chunks {chunks:?} contain a zero")));
        }
        Ok(ZarrArray { name, dir: dir.to_path_buf(), shape, chunks, dtype, dtype_name })
    }

    /// Bytes of one chunk file.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunks.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of chunks along each dimension.
    pub fn grid(&self) -> Vec<usize> {
        self.shape.iter().zip(&self.chunks).map(|(s, c)| s.div_ceil(*c)).collect()
    }

    /// The file of the chunk at grid index `idx`.
    pub fn chunk_path(&self, idx: &[usize]) -> PathBuf {
        let name: Vec<String> = idx.iter().map(usize::to_string).collect();
        self.dir.join(name.join("."))
    }

    /// Opens the chunk at `idx`, checking that it exists and has exactly one chunk's bytes.
    pub fn open_chunk(&self, idx: &[usize]) -> Result<File> {
        let path = self.chunk_path(idx);
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ConvertError::MissingChunk { name: self.name.clone(), path: path.clone() },
            _ => io(&path)(e),
        })?;
        let found = file.metadata().map_err(io(&path))?.len();
        if found != self.chunk_bytes() {
            return Err(ConvertError::ChunkSize {
                name: self.name.clone(),
                path,
                chunks: self.chunks.clone(),
                dtype: self.dtype_name.clone(),
                expected: self.chunk_bytes(),
                found,
            });
        }
        Ok(file)
    }

    /// Grid indices of every chunk, in C order.
    pub fn chunk_indices(&self) -> impl Iterator<Item = Vec<usize>> {
        let grid = self.grid();
        (0..grid.iter().product::<usize>()).map(move |flat| {
            let mut idx = vec![0; grid.len()];
            let mut x = flat;
            for d in (0..grid.len()).rev() {
                idx[d] = x % grid[d];
                x /= grid[d];
            }
            idx
        })
    }

    /// Checks that every chunk file exists and has the right size, without reading them.
    pub fn check_chunks(&self) -> Result<()> {
        self.chunk_indices().try_for_each(|idx| self.open_chunk(&idx).map(drop))
    }

    /// Streams the sub-array with the leading indices fixed to `prefix` (e.g. `[layer]` of a
    /// stacked array, or `[]` for the whole array), in C order, one row (last dimension) at a
    /// time: `sink(row_index, row_bytes)`. At most two dimensions may remain after the prefix.
    /// Each chunk file is read once, front to back; memory is one row plus one read buffer per
    /// chunk along the last dimension.
    pub fn stream_rows(&self, prefix: &[usize], sink: &mut dyn FnMut(usize, &[u8]) -> Result<()>) -> Result<()> {
        let bad = |message: String| ConvertError::BadArray {
            name: self.name.clone(),
            path: self.dir.join(".zarray"),
            message,
        };
        let rest = self.shape.len().checked_sub(prefix.len()).filter(|r| (1..=2).contains(r)).ok_or_else(|| {
            bad(format!("cannot read rows of shape {:?} with {} leading indices fixed", self.shape, prefix.len()))
        })?;
        if let Some((d, &i)) = prefix.iter().enumerate().find(|&(d, &i)| i >= self.shape[d]) {
            return Err(bad(format!("index {i} is out of range for dimension {d} of shape {:?}", self.shape)));
        }
        let es = self.dtype.size();
        let p = prefix.len();
        // The fixed leading indices: which chunk, and where inside it (in chunk-sized slabs).
        let prefix_chunk: Vec<usize> = prefix.iter().zip(&self.chunks).map(|(i, c)| i / c).collect();
        let mut slab = 0usize;
        for (d, i) in prefix.iter().enumerate() {
            slab = slab * self.chunks[d] + i % self.chunks[d];
        }
        let (rows, cols) = if rest == 2 { (self.shape[p], self.shape[p + 1]) } else { (1, self.shape[p]) };
        let (crows, ccols) = if rest == 2 { (self.chunks[p], self.chunks[p + 1]) } else { (1, self.chunks[p]) };
        let slab_bytes = (slab * crows * ccols * es) as u64;
        let col_chunks = cols.div_ceil(ccols);
        let mut row = vec![0u8; col_chunks * ccols * es];
        for band in 0..rows.div_ceil(crows) {
            let mut readers = Vec::with_capacity(col_chunks);
            for cc in 0..col_chunks {
                let mut idx = prefix_chunk.clone();
                if rest == 2 {
                    idx.push(band);
                }
                idx.push(cc);
                let path = self.chunk_path(&idx);
                let mut f = self.open_chunk(&idx)?;
                f.seek(SeekFrom::Start(slab_bytes)).map_err(io(&path))?;
                readers.push((path, BufReader::with_capacity(READ_BUFFER.min(self.chunk_bytes() as usize), f)));
            }
            for r in band * crows..((band + 1) * crows).min(rows) {
                for (cc, (path, reader)) in readers.iter_mut().enumerate() {
                    reader.read_exact(&mut row[cc * ccols * es..(cc + 1) * ccols * es]).map_err(io(&*path))?;
                }
                // Edge chunks are stored full size; only the first `cols` columns are real.
                sink(r, &row[..cols * es])?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a u16-valued array whose element at (i, j, k) is its C-order index in `shape`.
    fn write_array(dir: &Path, shape: &[usize], chunks: &[usize]) -> ZarrArray {
        std::fs::create_dir_all(dir).unwrap();
        let zarray = serde_json::json!({"chunks": chunks, "compressor": null, "dtype": "<f2", "fill_value": null,
            "filters": null, "order": "C", "shape": shape, "zarr_format": 2});
        std::fs::write(dir.join(".zarray"), zarray.to_string()).unwrap();
        let a = ZarrArray::open(dir).unwrap();
        for idx in a.chunk_indices() {
            let m: usize = chunks.iter().product();
            let mut bytes = Vec::with_capacity(m * 2);
            for local in 0..m {
                let mut l = local;
                let mut pos = vec![0; chunks.len()];
                for d in (0..chunks.len()).rev() {
                    pos[d] = idx[d] * chunks[d] + l % chunks[d];
                    l /= chunks[d];
                }
                // Padding of edge chunks gets a marker value that must never be read.
                let v = if pos.iter().zip(shape).all(|(p, s)| p < s) {
                    pos.iter().zip(shape).fold(0usize, |acc, (p, s)| acc * s + p) as u16
                } else {
                    0xFFFF
                };
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            std::fs::write(a.chunk_path(&idx), bytes).unwrap();
        }
        a
    }

    fn read_all(a: &ZarrArray, prefix: &[usize]) -> Vec<u16> {
        let mut out = Vec::new();
        let mut next_row = 0;
        a.stream_rows(prefix, &mut |r, bytes| {
            assert_eq!(r, next_row);
            next_row += 1;
            out.extend(bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn rows_come_out_in_c_order_whatever_the_chunking() {
        let dir = tempfile::tempdir().unwrap();
        let shape = [3usize, 6, 10];
        for (i, chunks) in [[1, 6, 10], [1, 3, 10], [1, 6, 5], [1, 2, 4], [2, 4, 3], [3, 6, 10]].iter().enumerate() {
            let a = write_array(&dir.path().join(format!("a{i}")), &shape, chunks);
            for layer in 0..3 {
                let want: Vec<u16> = (layer * 60..(layer + 1) * 60).map(|v| v as u16).collect();
                assert_eq!(read_all(&a, &[layer]), want, "chunks {chunks:?}, layer {layer}");
            }
        }
        let a = write_array(&dir.path().join("flat"), &[7], &[3]);
        assert_eq!(read_all(&a, &[]), (0..7).collect::<Vec<u16>>());
        let a = write_array(&dir.path().join("matrix"), &[5, 4], &[2, 3]);
        assert_eq!(read_all(&a, &[]), (0..20).collect::<Vec<u16>>());
    }

    #[test]
    fn refusals_name_the_array_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_array(&dir.path().join("t"), &[2, 4], &[1, 4]);
        std::fs::remove_file(a.chunk_path(&[1, 0])).unwrap();
        let e = a.check_chunks().unwrap_err().to_string();
        assert!(e.contains("\"t\"") && e.contains("missing chunk file") && e.ends_with("t/1.0"), "{e}");
        std::fs::write(a.chunk_path(&[1, 0]), [0u8; 6]).unwrap();
        let e = a.check_chunks().unwrap_err().to_string();
        assert!(e.contains("t/1.0 is 6 bytes") && e.contains("are 8 bytes"), "{e}");
        let zarray = dir.path().join("t/.zarray");
        let text = std::fs::read_to_string(&zarray).unwrap();
        std::fs::write(&zarray, text.replace("\"compressor\":null", "\"compressor\":{\"id\":\"blosc\"}")).unwrap();
        let e = ZarrArray::open(&dir.path().join("t")).unwrap_err().to_string();
        assert!(e.contains("\"t\"") && e.contains("compressor {\"id\":\"blosc\"} is not supported"), "{e}");
        std::fs::write(&zarray, text.replace("<f2", "<i8")).unwrap();
        let e = ZarrArray::open(&dir.path().join("t")).unwrap_err().to_string();
        assert!(e.contains("dtype \"<i8\" is not supported"), "{e}");
        std::fs::write(&zarray, text.replace("\"order\":\"C\"", "\"order\":\"F\"")).unwrap();
        let e = ZarrArray::open(&dir.path().join("t")).unwrap_err().to_string();
        assert!(e.contains("order \"F\""), "{e}");
    }
}
