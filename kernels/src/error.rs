//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong finding NVRTC and the CUDA headers, or compiling a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No directory with `cuda_bf16.h` was found.
    #[error(
        "CUDA headers not found: no cuda_bf16.h in any of {}; set ARBITER_CUDA_INCLUDE to the include \
         directory of a CUDA 13.0 toolkit, or `pip install nvidia-cuda-runtime==13.0.*` into the repo's .venv",
        list(searched)
    )]
    IncludeNotFound {
        /// The directories looked at, in search order.
        searched: Vec<PathBuf>,
    },

    /// An explicit include directory override does not hold the CUDA headers.
    #[error("{var}={} does not contain cuda_bf16.h", path.display())]
    IncludeOverrideInvalid {
        /// The environment variable that named the directory.
        var: &'static str,
        /// Its value.
        path: PathBuf,
    },

    /// libnvrtc is neither loadable by name nor present in any known directory.
    #[error(
        "NVRTC library not found: the dynamic loader (LD_LIBRARY_PATH, ld.so.cache) resolves none of {names:?}, \
         and none of {files:?} exists in {}; install CUDA 13.0 or `pip install nvidia-cuda-nvrtc==13.0.*` into \
         the repo's .venv, or add its lib directory to LD_LIBRARY_PATH",
        list(searched)
    )]
    NvrtcNotFound {
        /// Library names tried with the dynamic loader.
        names: Vec<String>,
        /// File names looked for in each directory.
        files: Vec<String>,
        /// Directories looked in, in search order.
        searched: Vec<PathBuf>,
    },

    /// A libnvrtc file exists but the dynamic loader refused it.
    #[error("cannot load {}: {reason}", path.display())]
    NvrtcLoad {
        /// The file.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },

    /// libnvrtc was loaded from a file, but cudarc still cannot resolve it by name, so using it
    /// would panic inside cudarc.
    #[error(
        "loaded {} but cudarc does not resolve libnvrtc by name (its soname is unexpected); add its directory \
         to LD_LIBRARY_PATH",
        path.display()
    )]
    NvrtcUnresolvable {
        /// The file that was loaded.
        path: PathBuf,
    },

    /// The GPU architecture string is not `sm_NN` / `compute_NN` (optionally with an `a` suffix).
    #[error("invalid GPU architecture {arch:?}: expected e.g. \"sm_90\" or \"sm_80\"")]
    InvalidArch {
        /// The rejected string.
        arch: String,
    },

    /// A `-D` macro has a name that is not a C identifier, or a value NVRTC cannot take.
    #[error("invalid define {name:?}: {reason}")]
    InvalidDefine {
        /// The macro name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A module was compiled without a macro its source requires.
    #[error("module {module} needs the define {define} (e.g. from attention_defines(head_dim))")]
    MissingDefine {
        /// The module.
        module: &'static str,
        /// The missing macro.
        define: &'static str,
    },

    /// A head dimension attention.cu does not support.
    #[error("head dimension {head_dim} is not supported by attention.cu (1..=256)")]
    InvalidHeadDim {
        /// The rejected value.
        head_dim: usize,
    },

    /// The source text contains a NUL byte, which NVRTC's C API cannot take.
    #[error("source of module {module} contains a NUL byte")]
    SourceHasNul {
        /// The module.
        module: &'static str,
    },

    /// An NVRTC call other than the compilation itself failed.
    #[error("NVRTC {call} failed for module {module}: {message}")]
    Nvrtc {
        /// The module being compiled.
        module: &'static str,
        /// The NVRTC function.
        call: &'static str,
        /// NVRTC's error.
        message: String,
    },

    /// The compilation failed; `log` is NVRTC's compile log with the diagnostics.
    #[error("NVRTC could not compile {module}.cu for {arch} (options: {options}):\n{log}")]
    Compile {
        /// The module.
        module: &'static str,
        /// The target architecture.
        arch: String,
        /// The NVRTC options used, space separated.
        options: String,
        /// The compile log.
        log: String,
    },
}

fn list(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "(no candidate directories)".to_string();
    }
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}
