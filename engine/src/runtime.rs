//! A loaded model as the service and the CLI use it: the engine behind a trait object (so the
//! backend is chosen at run time), the preprocessor, and the model's fingerprint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::backend::Backend;
use crate::batch::PackedBatch;
use crate::cpu::CpuBackend;
use crate::error::{EngineError, Result};
use crate::graph::{open_folder, Model};
use crate::scores::{RewardWeights, Score};
use crate::spec::ModelSpec;
use crate::text::{Prepared, Preprocessor};
use crate::weights::WeightStore;

/// A model that scores packed batches, whatever backend it runs on.
pub trait Engine: Send + Sync {
    /// The model's spec.
    fn spec(&self) -> &ModelSpec;
    /// Raw head outputs at each sequence's last token.
    fn forward(&self, batch: &PackedBatch) -> Result<Vec<Vec<f32>>>;
    /// The backend's name ("cpu", ...).
    fn backend_name(&self) -> String;
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
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// CPU threads (0: one per core).
    pub threads: usize,
    /// Cap on input length below the model's own maximum.
    pub max_input_tokens: Option<usize>,
    /// Where to compute.
    pub device: Device,
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
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("dir", &self.dir).field("fingerprint", &self.fingerprint).finish()
    }
}

impl LoadedModel {
    /// Loads the model folder `dir` on the device `opts.device` names.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let t = Instant::now();
        let (spec, store) = open_folder(dir)?;
        let fingerprint = fingerprint(dir, &store)?;
        let preprocessor = Preprocessor::from_model_dir(dir, &spec, opts.max_input_tokens)?;
        let engine: Arc<dyn Engine> = match opts.device {
            Device::Cpu => Arc::new(Model::from_store(spec, &store, CpuBackend::with_threads(opts.threads)?)?),
            Device::Cuda(ordinal) => cuda_engine(spec, &store, ordinal)?,
        };
        Ok(LoadedModel {
            engine,
            preprocessor: Arc::new(preprocessor),
            fingerprint,
            dir: dir.to_path_buf(),
            load_seconds: t.elapsed().as_secs_f64(),
        })
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        self.engine.spec()
    }

    /// Scores prepared inputs in one packed batch; `weights[i]` combines item `i`'s attributes.
    pub fn score(&self, items: &[&Prepared], weights: &[&RewardWeights]) -> Result<Vec<Score>> {
        let batch = PackedBatch::from_sequences(&items.iter().map(|p| p.ids.as_slice()).collect::<Vec<_>>())?;
        let raw = self.engine.forward(&batch)?;
        let head = &self.spec().head;
        Ok(raw.into_iter().zip(weights).map(|(r, w)| Score::from_raw(head, r, w)).collect())
    }
}

/// The model on the CUDA backend, the attention kernel compiled for its head size up front.
#[cfg(feature = "cuda")]
fn cuda_engine(spec: ModelSpec, store: &WeightStore, ordinal: usize) -> Result<Arc<dyn Engine>> {
    let backend = crate::cuda::CudaBackend::new(ordinal)?;
    backend.prepare_attention(spec.head_dim)?;
    Ok(Arc::new(Model::from_store(spec, store, backend)?))
}

/// Without the `cuda` feature there is no CUDA backend to build.
#[cfg(not(feature = "cuda"))]
fn cuda_engine(_spec: ModelSpec, _store: &WeightStore, ordinal: usize) -> Result<Arc<dyn Engine>> {
    Err(EngineError::Backend(format!(
        "device cuda:{ordinal}: this arbiter was built without CUDA; rebuild with --features cuda (or use --device cpu)"
    )))
}

/// Fingerprint of a model: config.json's bytes and every tensor's name, dtype and shape, plus
/// the tokenizer and template files when present (they change scores as much as weights do).
pub fn fingerprint(dir: &Path, store: &WeightStore) -> Result<String> {
    let mut h = Sha256::new();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let path = dir.join(file);
        match std::fs::read(&path) {
            Ok(bytes) => {
                h.update(file.as_bytes());
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EngineError::Io { path, source: e }),
        }
    }
    for name in store.names() {
        let t = store.get(name)?;
        h.update(format!("{name}:{:?}:{:?};", t.dtype, t.shape).as_bytes());
    }
    Ok(h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect())
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
