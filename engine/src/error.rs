//! The engine's error type: every way a model folder, a batch or a backend can be wrong.

use std::path::PathBuf;

/// Everything the engine can refuse. Messages name the file, tensor or field at fault so that a
/// user can fix the model folder without reading code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file the model folder must contain is absent.
    #[error("missing file {path}: {why}")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What needed it.
        why: String,
    },
    /// A file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// config.json (or another JSON file) is not valid JSON or lacks a field.
    #[error("bad config {path}: {message}")]
    Config {
        /// The JSON file at fault.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The architecture named in config.json is not one this engine implements.
    #[error("unsupported architecture {found:?} in {path}; supported: {supported}")]
    UnsupportedArchitecture {
        /// config.json.
        path: PathBuf,
        /// The architecture string found.
        found: String,
        /// The ones that are supported.
        supported: String,
    },
    /// A safetensors file is malformed or shorter than its header says.
    #[error("bad safetensors file {path}: {message}")]
    BadWeightsFile {
        /// The weights file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the architecture needs is not in any weights file.
    #[error("missing tensor {name:?} (looked in {looked_in})")]
    MissingTensor {
        /// The tensor name, as transformers writes it.
        name: String,
        /// The files that were searched.
        looked_in: String,
    },
    /// A tensor the architecture has no place for (a reward head of another layout).
    #[error("tensor {name:?} {message}")]
    UnexpectedTensor {
        /// The tensor name.
        name: String,
        /// Why it does not fit and what was expected.
        message: String,
    },
    /// A tensor has a different shape than config.json implies.
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?} from config.json")]
    WrongShape {
        /// The tensor name.
        name: String,
        /// The shape config.json implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype the engine does not read.
    #[error("tensor {name:?} has unsupported dtype {dtype}; supported: BF16, F16, F32, and F8_E4M3 for quantized linear weights")]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A quantized weight's scale is not a finite positive number.
    #[error("tensor {name:?} row {row}: scale {value} is not a finite positive number")]
    BadScale {
        /// The scale tensor.
        name: String,
        /// The output row whose scale is wrong.
        row: usize,
        /// The value found.
        value: f32,
    },
    /// A tensor's storage disagrees with the folder's quantization scheme (an e4m3 tensor where
    /// the scheme keeps full precision, or the reverse).
    #[error("tensor {name:?}: {message}")]
    Quantization {
        /// The tensor at fault.
        name: String,
        /// What the scheme expects and what was found.
        message: String,
    },
    /// A batch handed to the engine is malformed (empty sequence, token outside the vocabulary...).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A request's input is malformed: empty, badly ordered roles, token ids outside the
    /// vocabulary, a template that fails to render...
    #[error("{0}")]
    InvalidInput(String),
    /// An input is longer than the limit and the truncation policy does not allow cutting it.
    #[error("{what} is {tokens} tokens; the limit is {max}{hint}")]
    TooLong {
        /// What was too long ("the conversation", "the text", "the protected turns").
        what: String,
        /// Its length in tokens.
        tokens: usize,
        /// The limit.
        max: usize,
        /// How to get under the limit, if anything can be done.
        hint: String,
    },
    /// A tokenizer file is missing or malformed.
    #[error("bad tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model cannot be split as asked (`--tp`, `--pp` that do not divide its shapes).
    #[error("cannot split the model: {0}")]
    Plan(String),
    /// A model-parallel rank failed, a peer was lost, or a collective call timed out. The
    /// model-parallel group is unusable afterwards.
    #[error("model-parallel failure: {0}")]
    Parallel(String),
    /// The device had no memory left for this batch. Set where the driver reports it, so that
    /// callers can tell "smaller batches may fit" from a broken backend without reading messages.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// A backend could not run (no device, kernel failure...).
    #[error("backend error: {0}")]
    Backend(String),
}

/// Result alias for engine operations.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
