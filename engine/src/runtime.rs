//! A loaded model as the service and the CLI use it: the engine behind a trait object (so the
//! backend is chosen at run time), the preprocessor, and the model's fingerprint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, HostTensor};
use crate::batch::PackedBatch;
use crate::cpu::{CpuBackend, Precision};
use crate::error::Result;
use crate::folder::ModelFolder;
use crate::graph::Model;
use crate::parallel::cluster::{join, ClusterConfig};
use crate::parallel::local::DEFAULT_COLLECTIVE_TIMEOUT;
use crate::parallel::node::NodeWiring;
use crate::parallel::runner::{MakeComm, ParallelEngine};
use crate::plan::{Parallelism, RankPlan};
use crate::spec::ModelSpec;
use crate::text::Preprocessor;

/// A model that scores packed batches, whatever backend it runs on.
pub trait Engine: Send + Sync {
    /// The model's spec.
    fn spec(&self) -> &ModelSpec;
    /// Raw head outputs at each item's read row (see [`PackedBatch::read_rows`]).
    fn forward(&self, batch: &PackedBatch) -> Result<Vec<Vec<f32>>>;
    /// The backend's name ("cpu", ...).
    fn backend_name(&self) -> String;
    /// How many batches may usefully run at once (the pipeline stages of a split model).
    fn pipeline_depth(&self) -> usize {
        1
    }
    /// `Err` once the engine can no longer compute (a model-parallel rank failed); callers should
    /// stop serving rather than retry.
    fn health(&self) -> Result<()> {
        Ok(())
    }
}

impl Engine for ParallelEngine {
    fn spec(&self) -> &ModelSpec {
        ParallelEngine::spec(self)
    }
    fn forward(&self, batch: &PackedBatch) -> Result<Vec<Vec<f32>>> {
        ParallelEngine::forward(self, batch)
    }
    fn backend_name(&self) -> String {
        self.name().to_string()
    }
    fn pipeline_depth(&self) -> usize {
        ParallelEngine::pipeline_depth(self)
    }
    fn health(&self) -> Result<()> {
        ParallelEngine::health(self)
    }
}

impl<B: Backend> Engine for Model<B> {
    fn spec(&self) -> &ModelSpec {
        Model::spec(self)
    }
    fn forward(&self, batch: &PackedBatch) -> Result<Vec<Vec<f32>>> {
        Model::forward(self, batch)
    }
    fn backend_name(&self) -> String {
        self.backend().name()
    }
}

/// Where the engine computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU backend (f32, every core).
    #[default]
    Cpu,
    /// The CUDA backend on the GPU with this ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("device {s:?}: expected cpu, cuda or cuda:N (N a GPU number: 0, 1, ...)");
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    n.parse().map(Device::Cuda).map_err(|_| bad())
                }
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// CPU threads (0: one per core), shared by all ranks of this process.
    pub threads: usize,
    /// Cap on input length below the model's own maximum.
    pub max_input_tokens: Option<usize>,
    /// Where to compute.
    pub device: Device,
    /// What the CPU backend computes in (the CUDA backend always computes in bf16).
    pub cpu_precision: Precision,
    /// Tensor- and pipeline-parallel layout.
    pub parallel: Parallelism,
    /// How long a collective call or stage link waits for its peers before the group fails.
    pub collective_timeout: Duration,
    /// This process's place among several nodes, if the model spans nodes.
    pub cluster: Option<ClusterConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: 0,
            max_input_tokens: None,
            device: Device::Cpu,
            cpu_precision: Precision::F32,
            parallel: Parallelism::default(),
            collective_timeout: DEFAULT_COLLECTIVE_TIMEOUT,
            cluster: None,
        }
    }
}

/// Everything needed to score inputs for one model.
#[derive(Clone)]
pub struct LoadedModel {
    /// The engine.
    pub engine: Arc<dyn Engine>,
    /// Input preparation for this model.
    pub preprocessor: Arc<Preprocessor>,
    /// Hex SHA-256 (first 16 bytes) of config.json and the weights index (names, dtypes, shapes).
    pub fingerprint: String,
    /// The model folder.
    pub dir: PathBuf,
    /// Seconds it took to load.
    pub load_seconds: f64,
    /// On a worker node of a multi-node deployment: its stages, to be driven by
    /// [`ParallelEngine::run_worker`] (the engine above is then not for scoring).
    pub worker: Option<Arc<ParallelEngine>>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("dir", &self.dir).field("fingerprint", &self.fingerprint).finish()
    }
}

impl LoadedModel {
    /// Loads the model folder `dir` on the device `opts.device` names, split across ranks as
    /// `opts.parallel` says.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::from_folder(ModelFolder::open(dir)?, opts)
    }

    /// Like [`LoadedModel::load`], for a folder the caller has already opened (to plan memory
    /// from its spec first, without reading config.json twice).
    pub fn from_folder(folder: ModelFolder, opts: &LoadOptions) -> Result<Self> {
        let t = Instant::now();
        let dir = folder.dir.as_path();
        let fingerprint = folder.fingerprint()?;
        let preprocessor = Preprocessor::from_model_dir(dir, &folder.spec, opts.max_input_tokens)?;
        let single = opts.parallel.is_single() && opts.cluster.is_none();
        let (engine, worker): (Arc<dyn Engine>, _) = match opts.device {
            Device::Cuda(ordinal) => cuda_engine(&folder, &fingerprint, ordinal, single, opts)?,
            Device::Cpu if single => {
                let backend = CpuBackend::with_threads(opts.threads)?.with_precision(opts.cpu_precision);
                (Arc::new(Model::from_store(folder.spec.clone(), &folder.store, backend)?), None)
            }
            Device::Cpu => {
                // CPU ranks share the cores: each gets an equal part of the thread budget.
                let total = if opts.threads == 0 {
                    std::thread::available_parallelism().map_or(1, |n| n.get())
                } else {
                    opts.threads
                };
                let nodes = opts.cluster.as_ref().map_or(1, |c| c.nodes);
                let per_rank = (total * nodes / opts.parallel.world_size()).max(1);
                let precision = opts.cpu_precision;
                let make = move |_: &RankPlan| Ok(CpuBackend::with_threads(per_rank)?.with_precision(precision));
                parallel_engine(&folder, &fingerprint, opts, make, None)?
            }
        };
        Ok(LoadedModel {
            engine,
            preprocessor: Arc::new(preprocessor),
            fingerprint,
            dir: dir.to_path_buf(),
            load_seconds: t.elapsed().as_secs_f64(),
            worker,
        })
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        self.engine.spec()
    }
}

/// A built engine, and on a worker node the same engine as the worker to drive.
pub(crate) type Built = (Arc<dyn Engine>, Option<Arc<ParallelEngine>>);

/// A model split across ranks of this process (and, with a cluster, across nodes); on a worker
/// node the engine is also returned as the worker to drive.
pub(crate) fn parallel_engine<B, F>(
    folder: &ModelFolder,
    fingerprint: &str,
    opts: &LoadOptions,
    make_backend: F,
    make_comm: Option<MakeComm<B>>,
) -> Result<Built>
where
    B: Backend + 'static,
    B::Tensor: HostTensor + 'static,
    F: Fn(&RankPlan) -> Result<B> + Send + Sync + 'static,
{
    let par = opts.parallel;
    // Before the rendezvous: a layout that cannot work is refused without waiting for peers.
    par.validate(&folder.spec)?;
    let Some(cfg) = &opts.cluster else {
        let engine =
            ParallelEngine::load_node_with(folder, par, opts.collective_timeout, make_backend, make_comm, None)?;
        return Ok((Arc::new(engine), None));
    };
    let joined = join(cfg, &par, fingerprint)?;
    let (from_prev, to_next) = joined.connect_data(par.tp, cfg.timeout)?;
    let wiring = NodeWiring { joined, from_prev, to_next };
    let engine = Arc::new(ParallelEngine::load_node_with(
        folder,
        par,
        opts.collective_timeout,
        make_backend,
        make_comm,
        Some(wiring),
    )?);
    let worker = (cfg.node_rank > 0).then(|| engine.clone());
    Ok((engine, worker))
}

#[cfg(feature = "cuda")]
use crate::cuda::placement::cuda_engine;

/// Without the `cuda` feature there is no CUDA backend to build.
#[cfg(not(feature = "cuda"))]
fn cuda_engine(
    _folder: &ModelFolder,
    _fingerprint: &str,
    ordinal: usize,
    _single: bool,
    _opts: &LoadOptions,
) -> Result<Built> {
    Err(crate::error::EngineError::Backend(format!(
        "device cuda:{ordinal}: this arbiter was built without CUDA; rebuild with --features cuda (or use --device cpu)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        assert_eq!(Device::default(), Device::Cpu);
        for bad in ["", "cuda:", "cuda:x", "cuda:-1", "cuda:1.5", "tpu", "cuda:99999999999999999999"] {
            let e = bad.parse::<Device>().unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad:?}: {e}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn asking_for_cuda_without_the_feature_says_how_to_get_it() {
        let dir = crate::demo::ensure_demo_model().unwrap();
        let opts = LoadOptions { device: Device::Cuda(0), ..LoadOptions::default() };
        let e = LoadedModel::load(&dir, &opts).unwrap_err().to_string();
        assert!(e.contains("built without CUDA") && e.contains("--features cuda"), "{e}");
    }
}
