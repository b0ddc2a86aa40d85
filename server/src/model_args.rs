//! Choosing and loading the model: a folder, or the embedded demo model.

use std::path::PathBuf;
use std::time::Duration;

use arbiter_engine::cpu::Precision;
use arbiter_engine::demo::ensure_demo_model;
use arbiter_engine::folder::ModelFolder;
use arbiter_engine::parallel::cluster::{ClusterConfig, DEFAULT_LEADER_PORT};
use arbiter_engine::parallel::Parallelism;
use arbiter_engine::runtime::{Device, LoadOptions, LoadedModel};

use crate::error::CommandError;

type Result<T, E = CommandError> = std::result::Result<T, E>;

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
    /// What the CPU backend computes in: "f32" (the default; scores within 1e-4 of transformers'
    /// fp32) or "bf16" (bf16 weights, activations rounded where the GPU rounds them: half the
    /// weight memory, scores within 1e-2 of f32 in units of the output scale on the golden
    /// fixtures). Only for --device cpu.
    #[arg(long, env = "ARBITER_CPU_PRECISION", default_value = "f32")]
    pub cpu_precision: Precision,
    /// Tensor-parallel ranks per pipeline stage (Megatron layout; must divide the heads, the KV
    /// heads and the FFN width).
    #[arg(long, env = "ARBITER_TP", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub tp: u16,
    /// Pipeline stages, each a contiguous range of layers (must divide the layer count).
    #[arg(long, env = "ARBITER_PP", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub pp: u16,
    /// Seconds a collective call (all-reduce, stage hand-off) waits for its peers before the
    /// model-parallel group is declared failed.
    #[arg(long, env = "ARBITER_COLLECTIVE_TIMEOUT_SECONDS", default_value_t = 300.0)]
    pub collective_timeout_seconds: f64,
    /// Nodes (one process each) the pipeline stages are spread over; --pp must be a multiple.
    #[arg(long, env = "ARBITER_NODES", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub nodes: u16,
    /// This node's index: 0 is the leader (serves the RewardService), others are workers.
    #[arg(long, env = "ARBITER_NODE_RANK", default_value_t = 0)]
    pub node_rank: u16,
    /// The leader's rendezvous address, HOST:PORT (the leader listens there; workers connect).
    #[arg(long, env = "ARBITER_LEADER_ADDR", default_value = "127.0.0.1:29500")]
    pub leader_addr: String,
    /// Seconds to wait at start for the other nodes (workers retry the leader until then).
    #[arg(long, env = "ARBITER_RENDEZVOUS_TIMEOUT_SECONDS", default_value_t = 600.0)]
    pub rendezvous_timeout_seconds: f64,
}

fn seconds(flag: &'static str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| CommandError::Flag { flag, message: format!("must be a positive number of seconds, got {v}") })
}

impl ModelArgs {
    /// The model folder these flags name, writing the demo model first if asked for.
    pub fn dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(d) => Ok(d.clone()),
            None => ensure_demo_model().map_err(CommandError::engine("writing the demo model")),
        }
    }

    /// Loads the model.
    pub fn load(&self) -> Result<LoadedModel> {
        self.load_folder(self.open()?)
    }

    /// Reads the model folder's config.json and maps its weights, once (see
    /// [`ModelArgs::load_folder`]).
    pub fn open(&self) -> Result<ModelFolder> {
        ModelFolder::open(&self.dir()?).map_err(CommandError::engine("loading the model"))
    }

    /// `--cpu-precision` other than f32 needs the CPU backend.
    fn check_precision(&self) -> Result<()> {
        if self.cpu_precision != Precision::F32 && self.device != Device::Cpu {
            return Err(CommandError::Flag {
                flag: "--cpu-precision",
                message: format!("{} is for --device cpu; {} always computes in bf16", self.cpu_precision, self.device),
            });
        }
        Ok(())
    }

    /// Loads an opened model folder as these flags say.
    pub fn load_folder(&self, folder: ModelFolder) -> Result<LoadedModel> {
        self.check_precision()?;
        let opts = LoadOptions {
            threads: self.threads,
            max_input_tokens: self.max_input_tokens,
            device: self.device,
            cpu_precision: self.cpu_precision,
            parallel: Parallelism { tp: self.tp.into(), pp: self.pp.into() },
            collective_timeout: seconds("--collective-timeout-seconds", self.collective_timeout_seconds)?,
            cluster: if self.nodes > 1 {
                let mut leader_addr = self.leader_addr.clone();
                if !leader_addr.contains(':') {
                    leader_addr = format!("{leader_addr}:{DEFAULT_LEADER_PORT}");
                }
                Some(ClusterConfig {
                    nodes: self.nodes.into(),
                    node_rank: self.node_rank.into(),
                    leader_addr,
                    timeout: seconds("--rendezvous-timeout-seconds", self.rendezvous_timeout_seconds)?,
                })
            } else if self.node_rank > 0 {
                return Err(CommandError::Flag {
                    flag: "--node-rank",
                    message: format!("{} needs --nodes greater than it", self.node_rank),
                });
            } else {
                None
            },
        };
        LoadedModel::from_folder(folder, &opts).map_err(CommandError::engine("loading the model"))
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

    #[test]
    fn cpu_precision_flag_takes_f32_and_bf16_and_refuses_cuda() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["arbiter", "--demo"], args].concat()).map(|c| c.model);
        assert_eq!(parse(&[]).unwrap().cpu_precision, Precision::F32);
        assert_eq!(parse(&["--cpu-precision", "bf16"]).unwrap().cpu_precision, Precision::Bf16);
        let e = parse(&["--cpu-precision", "int8"]).unwrap_err().to_string();
        assert!(e.contains("--cpu-precision") && e.contains("expected f32 or bf16"), "{e}");
        let cuda = parse(&["--cpu-precision", "bf16", "--device", "cuda"]).unwrap();
        let e = cuda.check_precision().unwrap_err().to_string();
        assert!(e.contains("--cpu-precision") && e.contains("--device cpu"), "{e}");
        assert!(parse(&["--device", "cuda"]).unwrap().check_precision().is_ok());
    }
}
