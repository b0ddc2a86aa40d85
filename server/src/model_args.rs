//! Choosing and loading the model: a folder, or the embedded demo model.

use std::path::PathBuf;

use arbiter_engine::demo::ensure_demo_model;
use arbiter_engine::runtime::{Device, LoadOptions, LoadedModel};
use arbiter_engine::Result;

/// Model flags shared by every subcommand that loads a model.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Model folder (config.json, safetensors, tokenizer.json).
    #[arg(long, env = "ARBITER_MODEL", required_unless_present = "demo", conflicts_with = "demo")]
    pub model: Option<PathBuf>,
    /// Use the embedded demo model (random weights: its scores are meaningless).
    #[arg(long, env = "ARBITER_DEMO")]
    pub demo: bool,
    /// CPU threads for the engine (0: one per core).
    #[arg(long, env = "ARBITER_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Longest input in tokens (default and maximum: the model's max_position_embeddings).
    #[arg(long, env = "ARBITER_MAX_INPUT_TOKENS")]
    pub max_input_tokens: Option<usize>,
    /// Where to compute: "cpu", "cuda" (GPU 0) or "cuda:N" (CUDA needs a build with --features cuda).
    #[arg(long, env = "ARBITER_DEVICE", default_value = "cpu")]
    pub device: Device,
}

impl ModelArgs {
    /// The model folder these flags name, writing the demo model first if asked for.
    pub fn dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(d) => Ok(d.clone()),
            None => ensure_demo_model(),
        }
    }

    /// Loads the model.
    pub fn load(&self) -> Result<LoadedModel> {
        let opts = LoadOptions { threads: self.threads, max_input_tokens: self.max_input_tokens, device: self.device };
        LoadedModel::load(&self.dir()?, &opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        model: ModelArgs,
    }

    #[test]
    fn device_flag_takes_cpu_cuda_and_cuda_n() {
        let parse =
            |args: &[&str]| Cli::try_parse_from([&["arbiter", "--demo"], args].concat()).map(|c| c.model.device);
        assert_eq!(parse(&[]).unwrap(), Device::Cpu);
        assert_eq!(parse(&["--device", "cuda"]).unwrap(), Device::Cuda(0));
        assert_eq!(parse(&["--device", "cuda:1"]).unwrap(), Device::Cuda(1));
        let e = parse(&["--device", "cuda:one"]).unwrap_err().to_string();
        assert!(e.contains("--device") && e.contains("expected cpu, cuda or cuda:N"), "{e}");
    }
}
