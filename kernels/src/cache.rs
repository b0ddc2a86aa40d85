//! The on-disk PTX cache: compiling attention for one head dimension takes NVRTC about a second,
//! so a server start reuses the PTX of the previous one.
//!
//! An entry is keyed by a hash of everything that determines the PTX (module name and source,
//! target architecture, NVRTC options including the defines and include path, NVRTC version), so
//! a changed kernel or a new NVRTC can never be served stale PTX. Each file carries a hash of its
//! own contents: a truncated or corrupted entry is detected, ignored and overwritten. The cache is
//! an optimisation only; no cache failure is ever an error for the caller.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bumped whenever the key derivation or the file format changes.
const FORMAT: &str = "arbiter-kernels-cache v1";

/// Everything that determines the PTX NVRTC produces.
#[derive(Debug, Clone, Copy)]
pub struct CacheKeyInput<'a> {
    /// Module name (file stem).
    pub module: &'a str,
    /// Full source text.
    pub source: &'a str,
    /// Target architecture, e.g. `sm_90`.
    pub arch: &'a str,
    /// NVRTC options in the order passed (defines, include path, language standard, ...).
    pub options: &'a [String],
    /// NVRTC version (major, minor).
    pub nvrtc_version: (i32, i32),
}

/// Hex SHA-256 of the key input. Every field is length-prefixed, so no two different inputs hash
/// the same concatenation (e.g. options `["-DA", "B"]` vs `["-DAB"]`).
pub fn cache_key(input: &CacheKeyInput<'_>) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(FORMAT.as_bytes());
    field(input.module.as_bytes());
    field(input.source.as_bytes());
    field(input.arch.as_bytes());
    field(&(input.options.len() as u64).to_le_bytes());
    for option in input.options {
        field(option.as_bytes());
    }
    field(&input.nvrtc_version.0.to_le_bytes());
    field(&input.nvrtc_version.1.to_le_bytes());
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `$ARBITER_KERNEL_CACHE`, else `$HOME/.cache/arbiter/kernels`; `None` when neither is set
/// (the compiler then compiles every time).
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("ARBITER_KERNEL_CACHE").or_else(|| var("HOME").map(|home| home.join(".cache/arbiter/kernels")))
}

/// A directory of cached PTX files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxCache {
    dir: PathBuf,
}

impl PtxCache {
    /// A cache in `dir` (created on the first store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PtxCache { dir: dir.into() }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of one entry. Module and arch are in the name only to make the folder readable.
    pub fn path(&self, module: &str, arch: &str, key: &str) -> PathBuf {
        self.dir.join(format!("{module}-{arch}-{key}.ptx"))
    }

    /// The cached PTX for `key`, or `None` when absent, unreadable, or failing its integrity check.
    pub fn load(&self, module: &str, arch: &str, key: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.path(module, arch, key)).ok()?;
        let (header, body) = text.split_once('\n')?;
        let expected = header.strip_prefix(FORMAT)?.strip_prefix(" sha256=")?;
        (hex(&Sha256::digest(body.as_bytes())) == expected).then(|| body.to_string())
    }

    /// Writes an entry atomically (temporary file, then rename), so a concurrent reader or a crash
    /// never leaves a half-written entry under the final name. Returns the entry's path.
    pub fn store(&self, module: &str, arch: &str, key: &str, ptx: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(module, arch, key);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let tmp = self.dir.join(format!(".{module}-{arch}-{key}.{}.{nanos}.tmp", std::process::id()));
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            write!(file, "{FORMAT} sha256={}\n{ptx}", hex(&Sha256::digest(ptx.as_bytes())))?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_stable_and_depends_on_every_input() {
        let options = vec!["-DARB_HEAD_DIM=128".to_string(), "--std=c++17".to_string()];
        let other_opts = vec!["-DARB_HEAD_DIM=64".to_string(), "--std=c++17".to_string()];
        let split_opts = vec!["-DARB_HEAD_DIM=128--std=c++17".to_string()];
        let base = CacheKeyInput {
            module: "attention",
            source: "src",
            arch: "sm_90",
            options: &options,
            nvrtc_version: (13, 0),
        };
        let key = cache_key(&base);
        assert_eq!(key, cache_key(&base.clone()));
        assert_eq!(key.len(), 64);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        let variants = [
            CacheKeyInput { module: "norm", ..base },
            CacheKeyInput { source: "src ", ..base },
            CacheKeyInput { arch: "sm_80", ..base },
            CacheKeyInput { options: &other_opts, ..base },
            CacheKeyInput { options: &split_opts, ..base },
            CacheKeyInput { options: &[], ..base },
            CacheKeyInput { nvrtc_version: (13, 1), ..base },
            CacheKeyInput { nvrtc_version: (12, 0), ..base },
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(cache_key(v), key, "variant {i}");
        }
        // Moving text between adjacent fields changes the key (length prefixes).
        let a = cache_key(&CacheKeyInput { module: "ab", source: "c", ..base });
        let b = cache_key(&CacheKeyInput { module: "a", source: "bc", ..base });
        assert_ne!(a, b);
    }

    #[test]
    fn store_then_load_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(tmp.path().join("nested/cache"));
        assert_eq!(cache.load("norm", "sm_90", "k1"), None);
        let ptx = "//\n// Generated by NVIDIA NVVM Compiler\n.version 9.0\n.target sm_90\n";
        let path = cache.store("norm", "sm_90", "k1", ptx).unwrap();
        assert_eq!(path, tmp.path().join("nested/cache/norm-sm_90-k1.ptx"));
        assert_eq!(cache.load("norm", "sm_90", "k1").as_deref(), Some(ptx));
        // Other keys do not alias.
        assert_eq!(cache.load("norm", "sm_90", "k2"), None);
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn corrupt_or_truncated_entries_are_misses() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(tmp.path());
        let ptx = ".version 9.0\n.target sm_80\n.visible .entry relu2()\n{\n}\n";
        let path = cache.store("elementwise", "sm_80", "k", ptx).unwrap();
        let good = std::fs::read(&path).unwrap();

        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x01;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(cache.load("elementwise", "sm_80", "k"), None, "flipped byte");

        std::fs::write(&path, &good[..good.len() - 5]).unwrap();
        assert_eq!(cache.load("elementwise", "sm_80", "k"), None, "truncated");

        std::fs::write(&path, ptx).unwrap();
        assert_eq!(cache.load("elementwise", "sm_80", "k"), None, "no header");

        std::fs::write(&path, [0xff, 0xfe, b'\n']).unwrap();
        assert_eq!(cache.load("elementwise", "sm_80", "k"), None, "not UTF-8");

        // Storing again repairs the entry.
        cache.store("elementwise", "sm_80", "k", ptx).unwrap();
        assert_eq!(cache.load("elementwise", "sm_80", "k").as_deref(), Some(ptx));
    }

    #[test]
    fn unwritable_cache_is_an_io_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        // A regular file where the cache directory should be: create_dir_all fails.
        let blocker = tmp.path().join("not-a-dir");
        std::fs::write(&blocker, b"x").unwrap();
        let cache = PtxCache::new(blocker.join("cache"));
        assert!(cache.store("norm", "sm_90", "k", "ptx").is_err());
        assert_eq!(cache.load("norm", "sm_90", "k"), None);
    }
}
