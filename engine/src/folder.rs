//! A model folder read once: config.json parsed into a [`ModelSpec`], every weights file mapped.
//! Loading builds everything from this one value (each rank of a split model reads its slices
//! from the same mapping), so a folder is parsed, validated and mapped once per process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::read_config;
use crate::error::{EngineError, Result};
use crate::spec::ModelSpec;
use crate::weights::WeightStore;

/// The config file every model folder has.
pub const CONFIG_FILE: &str = "config.json";

/// An opened model folder.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    /// The folder.
    pub dir: PathBuf,
    /// config.json, parsed.
    pub spec: ModelSpec,
    /// The weights, memory-mapped; shared by every rank of this process.
    pub store: Arc<WeightStore>,
    config_text: String,
}

impl ModelFolder {
    /// Reads config.json and maps the weights of `dir`; errors name the file at fault.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(EngineError::MissingFile {
                path: dir.to_path_buf(),
                why: "the model folder does not exist".into(),
            });
        }
        let (config_text, spec) = read_config(&dir.join(CONFIG_FILE))?;
        let store = Arc::new(WeightStore::open(dir)?);
        Ok(ModelFolder { dir: dir.to_path_buf(), spec, store, config_text })
    }

    /// Fingerprint of the model: config.json's bytes and every tensor's name, dtype and shape,
    /// plus the tokenizer and template files when present (they change scores as much as weights
    /// do). Hex SHA-256, first 16 bytes.
    pub fn fingerprint(&self) -> Result<String> {
        let mut h = Sha256::new();
        let mut file = |name: &str, bytes: &[u8]| {
            h.update(name.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        file(CONFIG_FILE, self.config_text.as_bytes());
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let path = self.dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => file(name, &bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::Io { path, source: e }),
            }
        }
        for name in self.store.names() {
            let t = self.store.get(name)?;
            h.update(format!("{name}:{:?}:{:?};", t.dtype, t.shape).as_bytes());
        }
        Ok(h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect())
    }
}
