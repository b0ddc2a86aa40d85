//! Where to look for the CUDA headers and libnvrtc. Pure file-system logic (no library is loaded
//! here), so it is testable on any machine; `Compiler::discover` loads what this finds.

use crate::KernelError;
use std::path::{Path, PathBuf};

/// File names of libnvrtc looked for in each candidate directory (Linux; CUDA 13 first). The
/// wheel `nvidia-cuda-nvrtc==13.0.*` installs `libnvrtc.so.13`, a toolkit also has `libnvrtc.so`.
pub const NVRTC_FILE_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so"];

/// The header whose presence marks a usable CUDA include directory (attention and norm include
/// it, and it pulls in cuda_fp16.h and vector_types.h from the same directory).
const MARKER_HEADER: &str = "cuda_bf16.h";

/// Packages of the NVIDIA CUDA 13 wheels under `site-packages/nvidia/`: 13.x wheels install
/// everything into `cu13/`; 12.x wheels used one folder per component.
const WHEEL_INCLUDE_PACKAGES: &[&str] = &["cu13", "cuda_runtime"];
const WHEEL_LIB_PACKAGES: &[&str] = &["cu13", "cuda_nvrtc"];

/// The inputs of the search, read from the process environment by [`SearchEnv::from_process`] or
/// built by hand (tests, callers with their own configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchEnv {
    /// `$ARBITER_CUDA_INCLUDE`: when set it is the only include directory considered.
    pub include_override: Option<PathBuf>,
    /// `$CUDA_PATH`, the toolkit root (`include/`, `lib64/`).
    pub cuda_path: Option<PathBuf>,
    /// The conventional toolkit root, `/usr/local/cuda`.
    pub system_root: Option<PathBuf>,
    /// Python virtual environments that may hold the NVIDIA wheels, in search order.
    pub venvs: Vec<PathBuf>,
}

impl SearchEnv {
    /// The search inputs of this process: `$ARBITER_CUDA_INCLUDE`, `$CUDA_PATH`, `/usr/local/cuda`,
    /// then the virtual environments `$VIRTUAL_ENV` and any `.venv` in the current directory, the
    /// executable's directory, or one of their ancestors (the repository's `.venv` when run from a
    /// checkout or its `target/`).
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let mut venvs: Vec<PathBuf> = Vec::new();
        let mut push = |p: PathBuf| {
            if !venvs.contains(&p) {
                venvs.push(p);
            }
        };
        if let Some(v) = var("VIRTUAL_ENV") {
            push(v);
        }
        let starts = [std::env::current_dir().ok(), std::env::current_exe().ok()];
        for start in starts.into_iter().flatten() {
            for dir in start.ancestors() {
                let venv = dir.join(".venv");
                if venv.is_dir() {
                    push(venv);
                }
            }
        }
        SearchEnv {
            include_override: var("ARBITER_CUDA_INCLUDE"),
            cuda_path: var("CUDA_PATH"),
            system_root: Some(PathBuf::from("/usr/local/cuda")),
            venvs,
        }
    }

    /// Include directories in search order (the override alone when it is set).
    pub fn include_candidates(&self) -> Vec<PathBuf> {
        if let Some(dir) = &self.include_override {
            return vec![dir.clone()];
        }
        let mut out: Vec<PathBuf> = Vec::new();
        out.extend(self.cuda_path.iter().map(|p| p.join("include")));
        out.extend(self.system_root.iter().map(|p| p.join("include")));
        for venv in &self.venvs {
            out.extend(wheel_dirs(venv, WHEEL_INCLUDE_PACKAGES, "include"));
        }
        out
    }

    /// Directories that may hold libnvrtc, in search order (used when the dynamic loader cannot
    /// resolve it by name).
    pub fn library_dirs(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for root in self.cuda_path.iter().chain(self.system_root.iter()) {
            out.push(root.join("lib64"));
            out.push(root.join("lib"));
        }
        for venv in &self.venvs {
            out.extend(wheel_dirs(venv, WHEEL_LIB_PACKAGES, "lib"));
        }
        out
    }
}

/// `<venv>/lib/python3.*/site-packages/nvidia/<package>/<leaf>` for each package and each Python
/// found; when the venv has no Python folder yet, the pattern itself (so error messages still say
/// where the wheels would have been looked for).
fn wheel_dirs(venv: &Path, packages: &[&str], leaf: &str) -> Vec<PathBuf> {
    let mut site_packages: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                .map(|e| e.path().join("site-packages"))
                .collect()
        })
        .unwrap_or_default();
    site_packages.sort();
    if site_packages.is_empty() {
        site_packages.push(venv.join("lib/python3.*/site-packages"));
    }
    let mut out = Vec::new();
    for site in &site_packages {
        for package in packages {
            out.push(site.join("nvidia").join(package).join(leaf));
        }
    }
    out
}

/// The first candidate include directory that contains `cuda_bf16.h`. An override
/// (`$ARBITER_CUDA_INCLUDE`) without it is an error rather than a silent fall-through, so a typo
/// does not quietly pick other headers.
pub fn find_include_dir(env: &SearchEnv) -> Result<PathBuf, KernelError> {
    if let Some(dir) = &env.include_override {
        if dir.join(MARKER_HEADER).is_file() {
            return Ok(dir.clone());
        }
        return Err(KernelError::IncludeOverrideInvalid { var: "ARBITER_CUDA_INCLUDE", path: dir.clone() });
    }
    let searched = env.include_candidates();
    match searched.iter().find(|dir| dir.join(MARKER_HEADER).is_file()) {
        Some(dir) => Ok(dir.clone()),
        None => Err(KernelError::IncludeNotFound { searched }),
    }
}

/// The first libnvrtc file ([`NVRTC_FILE_NAMES`]) in the candidate library directories.
/// `loader_names` only enters the error message: the names the caller already failed to load
/// through the dynamic loader.
pub fn find_library_file(env: &SearchEnv, loader_names: &[String]) -> Result<PathBuf, KernelError> {
    let searched = env.library_dirs();
    for dir in &searched {
        for name in NVRTC_FILE_NAMES {
            let path = dir.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    Err(KernelError::NvrtcNotFound {
        names: loader_names.to_vec(),
        files: NVRTC_FILE_NAMES.iter().map(|s| s.to_string()).collect(),
        searched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"").unwrap();
    }

    /// An environment that points only into `root` (no /usr/local/cuda, no process variables).
    fn env_in(root: &Path) -> SearchEnv {
        SearchEnv {
            include_override: None,
            cuda_path: Some(root.join("toolkit")),
            system_root: Some(root.join("usr-local-cuda")),
            venvs: vec![root.join(".venv")],
        }
    }

    #[test]
    fn empty_tree_reports_every_place_searched() {
        let tmp = tempfile::tempdir().unwrap();
        let env = env_in(tmp.path());
        let err = find_include_dir(&env).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, KernelError::IncludeNotFound { ref searched } if searched.len() == 4), "{err:?}");
        assert!(msg.contains(&tmp.path().join("toolkit/include").display().to_string()), "{msg}");
        assert!(msg.contains(&tmp.path().join("usr-local-cuda/include").display().to_string()), "{msg}");
        assert!(msg.contains("python3.*/site-packages/nvidia/cu13/include"), "{msg}");
        assert!(msg.contains("ARBITER_CUDA_INCLUDE"), "{msg}");

        let names = vec!["libnvrtc.so".to_string(), "libnvrtc.so.13".to_string()];
        let err = find_library_file(&env, &names).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("libnvrtc.so.13") && msg.contains("LD_LIBRARY_PATH"), "{msg}");
        assert!(msg.contains(&tmp.path().join("toolkit/lib64").display().to_string()), "{msg}");
        assert!(msg.contains("site-packages/nvidia/cu13/lib"), "{msg}");
    }

    #[test]
    fn finds_the_cuda13_wheel_layout_in_a_venv() {
        let tmp = tempfile::tempdir().unwrap();
        let nvidia = tmp.path().join(".venv/lib/python3.11/site-packages/nvidia");
        touch(&nvidia.join("cu13/include/cuda_bf16.h"));
        touch(&nvidia.join("cu13/lib/libnvrtc.so.13"));
        let env = env_in(tmp.path());
        assert_eq!(find_include_dir(&env).unwrap(), nvidia.join("cu13/include"));
        assert_eq!(find_library_file(&env, &[]).unwrap(), nvidia.join("cu13/lib/libnvrtc.so.13"));
    }

    #[test]
    fn toolkit_comes_before_the_venv_and_the_override_before_both() {
        let tmp = tempfile::tempdir().unwrap();
        touch(&tmp.path().join(".venv/lib/python3.11/site-packages/nvidia/cu13/include/cuda_bf16.h"));
        touch(&tmp.path().join("usr-local-cuda/include/cuda_bf16.h"));
        touch(&tmp.path().join("usr-local-cuda/lib64/libnvrtc.so"));
        touch(&tmp.path().join(".venv/lib/python3.11/site-packages/nvidia/cu13/lib/libnvrtc.so.13"));
        let mut env = env_in(tmp.path());
        assert_eq!(find_include_dir(&env).unwrap(), tmp.path().join("usr-local-cuda/include"));
        assert_eq!(find_library_file(&env, &[]).unwrap(), tmp.path().join("usr-local-cuda/lib64/libnvrtc.so"));

        touch(&tmp.path().join("mine/cuda_bf16.h"));
        env.include_override = Some(tmp.path().join("mine"));
        assert_eq!(find_include_dir(&env).unwrap(), tmp.path().join("mine"));
    }

    #[test]
    fn an_override_without_headers_is_an_error_not_a_fall_through() {
        let tmp = tempfile::tempdir().unwrap();
        touch(&tmp.path().join("usr-local-cuda/include/cuda_bf16.h"));
        let mut env = env_in(tmp.path());
        env.include_override = Some(tmp.path().join("typo"));
        let err = find_include_dir(&env).unwrap_err();
        assert!(matches!(err, KernelError::IncludeOverrideInvalid { .. }), "{err:?}");
        assert!(err.to_string().contains("ARBITER_CUDA_INCLUDE="), "{err}");
    }

    #[test]
    fn cuda12_per_component_wheels_are_found_too() {
        let tmp = tempfile::tempdir().unwrap();
        let nvidia = tmp.path().join(".venv/lib/python3.12/site-packages/nvidia");
        touch(&nvidia.join("cuda_runtime/include/cuda_bf16.h"));
        touch(&nvidia.join("cuda_nvrtc/lib/libnvrtc.so"));
        let env = env_in(tmp.path());
        assert_eq!(find_include_dir(&env).unwrap(), nvidia.join("cuda_runtime/include"));
        assert_eq!(find_library_file(&env, &[]).unwrap(), nvidia.join("cuda_nvrtc/lib/libnvrtc.so"));
    }
}
