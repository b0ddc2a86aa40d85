//! Choosing and loading the model: a folder, or the embedded demo model.

use std::path::PathBuf;

use arbiter_engine::demo::ensure_demo_model;
use arbiter_engine::runtime::{LoadOptions, LoadedModel};
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
        let opts = LoadOptions { threads: self.threads, max_input_tokens: self.max_input_tokens };
        LoadedModel::load(&self.dir()?, &opts)
    }
}
