//! What can go wrong while converting, each error naming the file, tensor or field involved.

use std::path::PathBuf;

use arbiter_engine::EngineError;

/// Errors of `arbiter convert`.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A file or folder the released layout must have is not there.
    #[error("missing {}: {why}", path.display())]
    MissingFile {
        /// What was looked for.
        path: PathBuf,
        /// Why it is needed.
        why: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `model_config.yaml` (or `metadata.json`) is unreadable or describes something arbiter does not implement.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// `model_weights/` holds an array this converter does not know what to do with.
    #[error("unknown tensor {name:?} ({}): arbiter convert knows the tensors of a Nemotron-4 reward model and will not silently drop others", path.display())]
    UnknownTensor {
        /// The array's name.
        name: String,
        /// Its folder.
        path: PathBuf,
    },
    /// A tensor the model needs is not in `model_weights/`.
    #[error("missing tensor {name:?}: no zarr array {}", path.display())]
    MissingTensor {
        /// The tensor's name.
        name: String,
        /// The folder that should hold it.
        path: PathBuf,
    },
    /// A `.zarray` describes something this reader does not read (compressor, filters, order, dtype, ...).
    #[error("tensor {name:?} ({}): {message}", path.display())]
    BadArray {
        /// The tensor's name.
        name: String,
        /// Its `.zarray`.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor's shape in `.zarray` disagrees with what `model_config.yaml` implies.
    #[error("tensor {name:?} has shape {found:?}, but model_config.yaml implies {expected:?} ({why})")]
    ShapeMismatch {
        /// The tensor's name.
        name: String,
        /// What model_config.yaml implies.
        expected: Vec<usize>,
        /// What `.zarray` says.
        found: Vec<usize>,
        /// Which config fields give the expected shape.
        why: String,
    },
    /// A chunk file of a zarr array is missing.
    #[error("tensor {name:?}: missing chunk file {}", path.display())]
    MissingChunk {
        /// The tensor's name.
        name: String,
        /// The chunk file.
        path: PathBuf,
    },
    /// A chunk file has the wrong size for the array's chunk shape and dtype.
    #[error("tensor {name:?}: chunk file {} is {found} bytes; chunks {chunks:?} of {dtype} are {expected} bytes", path.display())]
    ChunkSize {
        /// The tensor's name.
        name: String,
        /// The chunk file.
        path: PathBuf,
        /// The chunk shape.
        chunks: Vec<usize>,
        /// The dtype as `.zarray` names it.
        dtype: String,
        /// Expected size in bytes.
        expected: u64,
        /// Actual size in bytes.
        found: u64,
    },
    /// The SentencePiece model file is unreadable, or uses something the converter cannot express.
    #[error("SentencePiece model {}: {message}", path.display())]
    SentencePiece {
        /// The `.model` file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer step failed (the Python verification, or its output).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The converted tokenizer does not encode like SentencePiece (or arbiter's template does not
    /// render like NeMo-Aligner's): the conversion is refused.
    #[error("tokenizer fidelity check failed on {name:?}: {message}")]
    Fidelity {
        /// The corpus entry.
        name: String,
        /// The first difference.
        message: String,
    },
    /// The output folder cannot be written as asked.
    #[error("output {}: {message}", path.display())]
    Output {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The converted folder does not load in the engine.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Result with [`ConvertError`].
pub type Result<T> = std::result::Result<T, ConvertError>;

/// An `Io` error for `path`.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ConvertError {
    let path = path.into();
    move |source| ConvertError::Io { path, source }
}
