//! `arbiter quantize`: an arbiter model folder (BF16, F16 or F32) in, its FP8 version out: the
//! linear layers of the blocks as e4m3 with one f32 scale per output channel
//! (`max|row| / 448`, 1 for an all-zero row), everything else (embeddings, norms, the reward
//! head, an LM head) copied unchanged, and config.json given the compressed-tensors
//! `quantization_config` that says so (see engine/src/fp8.rs and docs/fp8.md).
//!
//! Tensors are streamed one row at a time from the memory-mapped input into preallocated shards,
//! so memory stays at a row and a few write buffers whatever the model's size.

use std::path::{Path, PathBuf};
use std::time::Instant;

use arbiter_engine::fp8::Fp8Scheme;
use arbiter_engine::graph::open_folder;
use arbiter_engine::weights::{INDEX_FILE, SINGLE_FILE};
use serde_json::Value;

use crate::error::{io, ConvertError, Result};
use crate::layout::OutTensor;
use crate::writer::{self, RowSink};

/// What to quantize, and how.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// The model folder to read.
    pub input: PathBuf,
    /// The FP8 folder to write (must not exist, or be empty).
    pub output: PathBuf,
    /// Largest shard, in bytes.
    pub max_shard_bytes: u64,
    /// Draw a progress bar on standard error.
    pub progress: bool,
}

/// What a quantization did.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// Weight matrices stored as e4m3.
    pub quantized: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Bytes of weights read.
    pub bytes_in: u64,
    /// Bytes of weights written.
    pub bytes_out: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Quantizes `opts.input` into `opts.output`.
pub fn quantize(opts: &QuantizeOptions) -> Result<QuantizeReport> {
    let started = Instant::now();
    let (spec, store) = open_folder(&opts.input)?;
    if spec.fp8.is_some() {
        return Err(ConvertError::Output {
            path: opts.input.join("config.json"),
            message: "this folder is already quantized (it has a quantization_config)".into(),
        });
    }
    let scheme = Fp8Scheme::default();
    let names = store.names();
    let mut outputs: Vec<OutTensor> = Vec::new();
    // Source tensor name and its output index, in output order.
    let mut sources: Vec<(&str, usize)> = Vec::new();
    for name in &names {
        let t = store.get(name)?;
        let out = OutTensor { name: name.to_string(), dtype: t.dtype, shape: t.shape.to_vec(), scale: None };
        sources.push((*name, outputs.len()));
        let at = outputs.len();
        outputs.extend(writer::fp8_outputs(out, &scheme, at));
    }
    crate::prepare_output(&opts.output)?;
    copy_side_files(&opts.input, &opts.output)?;
    let shards = writer::create(&opts.output, &outputs, opts.max_shard_bytes)?;
    let bytes_in: u64 = names.iter().map(|n| store.byte_len(n) as u64).sum();
    let bar = crate::progress_bar(opts.progress, bytes_in);
    let mut quantized = 0;
    for &(name, t) in &sources {
        let view = store.get(name)?;
        bar.set_message(name.to_string());
        quantized += usize::from(outputs[t].scale.is_some());
        let mut sink = RowSink::open(&shards, &outputs, t, view.dtype)?;
        let rows = view.shape.first().copied().unwrap_or(1);
        let mut failed = None;
        // One row at a time: a per-channel scale needs a whole row, and nothing more is held.
        view.for_each_row(0..rows, 0..view.row_len(), |row| {
            if failed.is_none() {
                failed = sink.write(row).err();
                bar.inc(row.len() as u64);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        sink.finish()?;
    }
    bar.finish_and_clear();
    // config.json last: a run stopped half-way leaves no folder the engine would load.
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(opts.input.join("config.json")).map_err(io(&opts.input.join("config.json")))?,
    )
    .map_err(|e| ConvertError::Output { path: opts.input.join("config.json"), message: e.to_string() })?;
    config["quantization_config"] = scheme.to_config();
    let config_path = opts.output.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).expect("JSON serializes"))
        .map_err(io(&config_path))?;
    crate::check_output(&opts.output)?;
    Ok(QuantizeReport {
        quantized,
        copied: sources.len() - quantized,
        bytes_in,
        bytes_out: outputs.iter().map(OutTensor::bytes).sum(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Copies every file of the input folder except config.json and the weights (tokenizer files,
/// chat templates, READMEs) into the output.
fn copy_side_files(input: &Path, output: &Path) -> Result<()> {
    for entry in std::fs::read_dir(input).map_err(io(input))? {
        let entry = entry.map_err(io(input))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let weights = name.ends_with(".safetensors") || name == INDEX_FILE || name == SINGLE_FILE;
        if !path.is_file() || weights || name == "config.json" {
            continue;
        }
        let dst = output.join(&name);
        std::fs::copy(&path, &dst).map_err(io(&path))?;
    }
    Ok(())
}
