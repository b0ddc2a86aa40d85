//! Checks that the CUDA libraries can be loaded before cudarc is asked to use them: cudarc loads
//! them lazily and panics when one is missing, and a missing driver must be an error the user can
//! act on ("no libcuda: is the NVIDIA driver installed?"), not a crash.

use crate::error::{EngineError, Result};

/// A shared library the CUDA backend loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaLibrary {
    /// The driver API (`libcuda`), installed with the NVIDIA driver.
    Driver,
    /// cuBLASLt (`libcublasLt`), the GEMMs.
    CublasLt,
    /// NCCL (`libnccl`), multi-GPU collectives; only tensor/pipeline parallel runs need it.
    Nccl,
}

impl CudaLibrary {
    /// The libraries every CUDA backend loads through cudarc by name. (NVRTC is found by the
    /// kernels crate's `Compiler::discover`, which also looks in CUDA wheels and never panics.)
    pub const BACKEND: [CudaLibrary; 2] = [CudaLibrary::Driver, CudaLibrary::CublasLt];

    /// The base name cudarc looks for (`lib{name}.so`, `lib{name}.so.13`, ...).
    pub fn base_name(self) -> &'static str {
        match self {
            CudaLibrary::Driver => "cuda",
            CudaLibrary::CublasLt => "cublasLt",
            CudaLibrary::Nccl => "nccl",
        }
    }

    /// What installs it, for the error message.
    fn hint(self) -> &'static str {
        match self {
            CudaLibrary::Driver => "the NVIDIA driver (is this a machine with an NVIDIA GPU?)",
            CudaLibrary::CublasLt => "the CUDA 13 toolkit or the nvidia-cublas wheel",
            CudaLibrary::Nccl => "NCCL 2 or the nvidia-nccl-cu13 wheel; cudarc needs a file named libnccl.so",
        }
    }

    /// Whether the dynamic loader finds it under one of the names cudarc tries.
    pub fn is_present(self) -> bool {
        // SAFETY: these only dlopen candidate names (running the libraries' initializers, as
        // loading them for use would) and drop the handles.
        unsafe {
            match self {
                CudaLibrary::Driver => cudarc::driver::sys::is_culib_present(),
                CudaLibrary::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                CudaLibrary::Nccl => cudarc::nccl::sys::is_culib_present(),
            }
        }
    }
}

/// Checks `libs` with `is_present` and names every missing one, with the file names tried and
/// where each usually comes from.
pub fn check_libraries(libs: &[CudaLibrary], is_present: impl Fn(CudaLibrary) -> bool) -> Result<()> {
    let missing: Vec<CudaLibrary> = libs.iter().copied().filter(|&l| !is_present(l)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = missing
        .iter()
        .map(|&l| {
            // The plain name and the usual sonames (CUDA 13 libraries, the driver's .so.1) of
            // the many cudarc tries.
            let names = cudarc::get_lib_name_candidates(l.base_name());
            let shown: Vec<&str> = names
                .iter()
                .map(String::as_str)
                .filter(|n| n.ends_with(".so") && !n.contains("64") || n.ends_with(".so.13") || n.ends_with(".so.1"))
                .collect();
            format!("lib{} (tried {}, ...; from {})", l.base_name(), shown.join(", "), l.hint())
        })
        .collect();
    Err(EngineError::Backend(format!(
        "the CUDA backend cannot start: missing {}. Add the folder holding them to LD_LIBRARY_PATH, or run with --device cpu",
        lines.join("; ")
    )))
}

/// Checks the libraries the CUDA backend needs with the system's dynamic loader.
pub fn check_backend_libraries() -> Result<()> {
    check_libraries(&CudaLibrary::BACKEND, CudaLibrary::is_present)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_found_names_every_library_and_what_installs_it() {
        let e = check_libraries(&CudaLibrary::BACKEND, |_| false).unwrap_err().to_string();
        for want in ["libcuda ", "libcublasLt ", "NVIDIA driver", "nvidia-cublas", "LD_LIBRARY_PATH", "--device cpu"] {
            assert!(e.contains(want), "{want:?} missing from: {e}");
        }
        assert!(e.contains("libcuda.so"), "the file names tried are shown: {e}");
    }

    #[test]
    fn only_the_missing_library_is_named() {
        let e = check_libraries(&CudaLibrary::BACKEND, |l| l != CudaLibrary::CublasLt).unwrap_err().to_string();
        assert!(e.contains("libcublasLt") && !e.contains("libcuda "), "{e}");
        assert!(check_libraries(&CudaLibrary::BACKEND, |_| true).is_ok());
    }

    #[test]
    fn the_real_probe_answers_without_panicking() {
        // On a machine without the driver (CI) this is the path `CudaBackend::new` takes.
        let r = check_backend_libraries();
        if !CudaLibrary::Driver.is_present() {
            assert!(r.unwrap_err().to_string().contains("libcuda "));
        }
    }
}
