//! `arbiter quantize`: writes the FP8 version of a model folder (see convert/src/quantize.rs).

use std::path::PathBuf;
use std::process::ExitCode;

use arbiter_convert::quantize::{quantize, QuantizeOptions};

use arbiter_server::error::CommandError;

/// Flags of `arbiter quantize`.
#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// The model folder to read (BF16, F16 or F32 weights).
    #[arg(long)]
    pub input: PathBuf,
    /// The FP8 model folder to write (new, or empty).
    #[arg(long)]
    pub output: PathBuf,
    /// Largest safetensors shard in bytes (a single larger tensor gets a shard of its own).
    #[arg(long, default_value_t = arbiter_convert::writer::DEFAULT_MAX_SHARD_BYTES)]
    pub max_shard_bytes: u64,
}

/// Runs `arbiter quantize`.
pub fn run(args: QuantizeArgs) -> Result<ExitCode, CommandError> {
    let opts = QuantizeOptions {
        input: args.input,
        output: args.output,
        max_shard_bytes: args.max_shard_bytes.max(1),
        progress: true,
    };
    let report = quantize(&opts).map_err(|source| CommandError::Convert {
        doing: format!("quantizing {} into {}", opts.input.display(), opts.output.display()),
        source: Box::new(source),
    })?;
    eprintln!(
        "arbiter: wrote {} ({} matrices in FP8, {} tensors copied; {:.2} GB -> {:.2} GB) in {:.1}s",
        opts.output.display(),
        report.quantized,
        report.copied,
        report.bytes_in as f64 / 1e9,
        report.bytes_out as f64 / 1e9,
        report.seconds
    );
    Ok(ExitCode::SUCCESS)
}
