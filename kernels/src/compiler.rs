//! NVRTC compilation of a [`Module`] to PTX, through the on-disk cache.
//!
//! cudarc resolves libnvrtc lazily and panics when it cannot, so [`Compiler::discover`] makes sure
//! it will succeed first: it tries the same library names cudarc tries, and when the dynamic
//! loader knows none of them it loads libnvrtc (and the libnvrtc-builtins it needs) from the known
//! directories by full path. Once a library with soname `libnvrtc.so.13` is loaded, the loader
//! hands that same library to cudarc when it asks by name.

use crate::cache::{cache_key, default_cache_dir, CacheKeyInput, PtxCache};
use crate::discover::{find_include_dir, find_library_file, SearchEnv};
use crate::validate::{validate_arch, validate_define};
use crate::{KernelError, Module};
use cudarc::nvrtc::{result, sys, Ptx};
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Libraries loaded by full path. They must stay loaded for the life of the process (cudarc's
/// handle and NVRTC's own lookups of the builtins rely on them), so they are never dropped.
fn keep_loaded(lib: libloading::Library) {
    static LOADED: OnceLock<Mutex<Vec<libloading::Library>>> = OnceLock::new();
    let libs = LOADED.get_or_init(|| Mutex::new(Vec::new()));
    // A poisoned lock only means another thread panicked while pushing; the Vec is still valid.
    libs.lock().unwrap_or_else(|e| e.into_inner()).push(lib);
}

/// Where the cached or fresh PTX of a [`Compiled`] came from / went to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from this cache file; NVRTC did not run.
    Hit(PathBuf),
    /// Compiled and stored in this file.
    Stored(PathBuf),
    /// Compiled; storing failed (unwritable directory, disk full). Not an error: the PTX is good.
    StoreFailed(String),
    /// Compiled; the compiler has no cache.
    Disabled,
}

/// The result of [`Compiler::compile_detailed`].
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The PTX text.
    pub ptx_source: String,
    /// NVRTC's log (warnings, ptxas statistics when asked for); empty on a cache hit.
    pub log: String,
    /// The NVRTC options the PTX was (or would have been) compiled with.
    pub options: Vec<String>,
    /// Cache hit, store, or why not.
    pub cache: CacheOutcome,
}

impl Compiled {
    /// The PTX in the form cudarc's `CudaContext::load_module` takes.
    pub fn ptx(&self) -> Ptx {
        Ptx::from_src(self.ptx_source.clone())
    }
}

/// A located NVRTC plus CUDA include directory, and the cache compilations go through.
#[derive(Debug, Clone)]
pub struct Compiler {
    include_dir: PathBuf,
    library: String,
    version: (i32, i32),
    cache: Option<PtxCache>,
    extra_options: Vec<String>,
}

impl Compiler {
    /// Finds libnvrtc and the CUDA headers the way [`SearchEnv::from_process`] describes, with the
    /// cache in [`default_cache_dir`]. Never panics: a missing piece is an error naming what was
    /// looked for and where.
    pub fn discover() -> Result<Compiler, KernelError> {
        Self::discover_in(&SearchEnv::from_process())
    }

    /// [`Compiler::discover`] with explicit search inputs.
    pub fn discover_in(env: &SearchEnv) -> Result<Compiler, KernelError> {
        let include_dir = find_include_dir(env)?;
        let library = ensure_nvrtc_loaded(env)?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: ensure_nvrtc_loaded checked that cudarc resolves the library, so this call
        // cannot hit cudarc's "library not found" panic; the pointers are to live locals.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| KernelError::Nvrtc {
            module: "-",
            call: "nvrtcVersion",
            message: format!("{e:?}"),
        })?;
        Ok(Compiler {
            include_dir,
            library,
            version: (major, minor),
            cache: default_cache_dir().map(PtxCache::new),
            extra_options: Vec::new(),
        })
    }

    /// Replaces the cache (`None` compiles every time).
    pub fn with_cache(mut self, cache: Option<PtxCache>) -> Self {
        self.cache = cache;
        self
    }

    /// Extra NVRTC options appended to every compilation (e.g. `--ptxas-options=--verbose`).
    /// They are part of the cache key.
    pub fn with_extra_options(mut self, options: Vec<String>) -> Self {
        self.extra_options = options;
        self
    }

    /// The CUDA include directory in use.
    pub fn include_dir(&self) -> &Path {
        &self.include_dir
    }

    /// How libnvrtc was found: the name the loader resolved, or the file loaded.
    pub fn library(&self) -> &str {
        &self.library
    }

    /// NVRTC's version (major, minor).
    pub fn nvrtc_version(&self) -> (i32, i32) {
        self.version
    }

    /// The cache in use, if any.
    pub fn cache(&self) -> Option<&PtxCache> {
        self.cache.as_ref()
    }

    /// Compiles `module` for `arch` (e.g. `"sm_90"`) with `-D` macros `defines`, or returns the
    /// cached PTX of an identical earlier compilation.
    pub fn compile(&self, module: &Module, arch: &str, defines: &[(&str, String)]) -> Result<Ptx, KernelError> {
        Ok(self.compile_detailed(module, arch, defines)?.ptx())
    }

    /// [`Compiler::compile`] with the log, the options and what the cache did.
    pub fn compile_detailed(
        &self,
        module: &Module,
        arch: &str,
        defines: &[(&str, String)],
    ) -> Result<Compiled, KernelError> {
        let options = self.options(module, arch, defines)?;
        let key = cache_key(&CacheKeyInput {
            module: module.name,
            source: module.source,
            arch,
            options: &options,
            nvrtc_version: self.version,
        });
        if let Some(cache) = &self.cache {
            if let Some(ptx_source) = cache.load(module.name, arch, &key) {
                let hit = CacheOutcome::Hit(cache.path(module.name, arch, &key));
                return Ok(Compiled { ptx_source, log: String::new(), options, cache: hit });
            }
        }
        let (ptx_source, log) = nvrtc_compile(module, arch, &options)?;
        let cache = match &self.cache {
            None => CacheOutcome::Disabled,
            Some(cache) => match cache.store(module.name, arch, &key, &ptx_source) {
                Ok(path) => CacheOutcome::Stored(path),
                Err(e) => CacheOutcome::StoreFailed(format!("{}: {e}", cache.dir().display())),
            },
        };
        Ok(Compiled { ptx_source, log, options, cache })
    }

    /// Validated NVRTC options for one compilation.
    fn options(&self, module: &Module, arch: &str, defines: &[(&str, String)]) -> Result<Vec<String>, KernelError> {
        validate_arch(arch)?;
        for (name, value) in defines {
            validate_define(name, value)?;
        }
        for required in module.required_defines {
            if !defines.iter().any(|(name, _)| name == required) {
                return Err(KernelError::MissingDefine { module: module.name, define: required });
            }
        }
        let mut options = vec![
            format!("--gpu-architecture={arch}"),
            format!("--include-path={}", self.include_dir.display()),
            "--std=c++17".to_string(),
        ];
        options.extend(defines.iter().map(|(name, value)| format!("-D{name}={value}")));
        options.extend(self.extra_options.iter().cloned());
        if let Some(bad) = options.iter().find(|o| o.contains('\0')) {
            return Err(KernelError::InvalidDefine { name: bad.replace('\0', "\\0"), reason: "contains a NUL byte" });
        }
        Ok(options)
    }
}

/// Makes sure cudarc will find libnvrtc (see the module doc); returns how it was found.
fn ensure_nvrtc_loaded(env: &SearchEnv) -> Result<String, KernelError> {
    let names = cudarc::get_lib_name_candidates("nvrtc");
    for name in &names {
        // SAFETY: loading libnvrtc runs its initialisers, which have no preconditions; the
        // handle is dropped right away (cudarc opens its own, the same library).
        if unsafe { libloading::Library::new(name) }.is_ok() {
            return Ok(format!("{name} (dynamic loader)"));
        }
    }
    let path = find_library_file(env, &names)?;
    // NVRTC opens libnvrtc-builtins by soname when it compiles, through the loader's search path,
    // which does not include a wheel's lib directory; loaded first, it is found by soname.
    if let Some(dir) = path.parent() {
        let mut builtins: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                        name.starts_with("libnvrtc-builtins.so.") && !name.contains(".alt.")
                    })
                    .collect()
            })
            .unwrap_or_default();
        builtins.sort();
        for file in builtins {
            // SAFETY: as above; kept loaded for the process lifetime.
            let lib = unsafe { libloading::Library::new(&file) }
                .map_err(|e| KernelError::NvrtcLoad { path: file.clone(), reason: e.to_string() })?;
            keep_loaded(lib);
        }
    }
    // SAFETY: as above.
    let lib = unsafe { libloading::Library::new(&path) }
        .map_err(|e| KernelError::NvrtcLoad { path: path.clone(), reason: e.to_string() })?;
    keep_loaded(lib);
    // SAFETY: only probes names with dlopen; cannot panic.
    if !unsafe { sys::is_culib_present() } {
        return Err(KernelError::NvrtcUnresolvable { path });
    }
    Ok(path.display().to_string())
}

/// NVRTC's NUL-terminated char buffers as text.
fn c_text(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Destroys the NVRTC program however compilation ends.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed exactly once, here. A failure to free
        // is not actionable.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// One NVRTC compilation: (PTX, log). Uses cudarc's `result` layer rather than its `safe` one,
/// which unwraps internally.
fn nvrtc_compile(module: &Module, arch: &str, options: &[String]) -> Result<(String, String), KernelError> {
    let nvrtc_err = |call: &'static str| {
        move |e: result::NvrtcError| KernelError::Nvrtc { module: module.name, call, message: format!("{e:?}") }
    };
    let src = CString::new(module.source).map_err(|_| KernelError::SourceHasNul { module: module.name })?;
    let name =
        CString::new(format!("{}.cu", module.name)).map_err(|_| KernelError::SourceHasNul { module: module.name })?;
    let program = Program(result::create_program(&src, Some(&name)).map_err(nvrtc_err("nvrtcCreateProgram"))?);
    // SAFETY: `program` is live; options were checked free of NUL bytes (compile_program unwraps
    // CString::new).
    let compiled = unsafe { result::compile_program(program.0, options) };
    // SAFETY: `program` is live.
    let log = unsafe { result::get_program_log(program.0) }.map(|l| c_text(&l)).unwrap_or_default();
    if compiled.is_err() {
        return Err(KernelError::Compile {
            module: module.name,
            arch: arch.to_string(),
            options: options.join(" "),
            log: log.trim_end().to_string(),
        });
    }
    // SAFETY: `program` is live and compiled.
    let ptx = unsafe { result::get_ptx(program.0) }.map_err(nvrtc_err("nvrtcGetPTX"))?;
    Ok((c_text(&ptx), log))
}
