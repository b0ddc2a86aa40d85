//! CUDA C++ kernels of arbiter's CUDA backend and the NVRTC compiler that turns them into PTX.
//!
//! The `.cu` sources live next to this crate (`kernels/*.cu`) and are embedded with
//! `include_str!`, so a binary carries its kernels and compiles them for the GPU it finds at start.
//! The launch contract (entry points, argument order, grid, block, shared memory) is
//! `docs/kernel-abi.md`; the constants here mirror the `#define`s of the sources, and a unit test
//! parses the sources to keep the two in agreement.
//!
//! Without the `nvrtc` feature this crate needs no CUDA at all: it exports the sources, the
//! launch constants, the cache and the discovery logic. With it, [`Compiler`] finds libnvrtc and
//! the CUDA headers without panicking and compiles a [`Module`] to PTX through an on-disk cache.

mod cache;
#[cfg(feature = "nvrtc")]
mod compiler;
mod discover;
mod error;
mod validate;

pub use cache::{cache_key, default_cache_dir, CacheKeyInput, PtxCache};
#[cfg(feature = "nvrtc")]
pub use compiler::{CacheOutcome, Compiled, Compiler};
pub use discover::{find_include_dir, find_library_file, SearchEnv, NVRTC_FILE_NAMES};
pub use error::KernelError;
pub use validate::{validate_arch, validate_define};

/// One `.cu` file: what NVRTC compiles as a unit, and the entry points the host looks up in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Module {
    /// Short name, also the file stem (`norm` for `kernels/norm.cu`); names the program in NVRTC
    /// logs and the PTX in the cache.
    pub name: &'static str,
    /// The CUDA C++ source text.
    pub source: &'static str,
    /// The `extern "C" __global__` entry points, in the order the ABI lists them.
    pub functions: &'static [&'static str],
    /// `-D` macros the source cannot compile without (the host must pass a value for each).
    pub required_defines: &'static [&'static str],
    /// The oldest compute capability the source compiles for, as `major * 10 + minor` (80 for
    /// sm_80; 89 for the FP8 module, whose e4m3 conversions need Ada or newer).
    pub min_sm: u32,
}

impl Module {
    /// Whether this module can be compiled for `arch` (`sm_NN...` / `compute_NN...`); an arch
    /// whose number cannot be read is left to NVRTC to refuse.
    pub fn supports(&self, arch: &str) -> bool {
        sm_number(arch).is_none_or(|sm| sm >= self.min_sm)
    }
}

/// The compute capability of an arch string as `major * 10 + minor` (`sm_90a` -> 90), if it has
/// one.
pub fn sm_number(arch: &str) -> Option<u32> {
    let digits = arch.strip_prefix("sm_").or_else(|| arch.strip_prefix("compute_"))?;
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// `kernels/norm.cu`: the residual add fused with LayerNorm / RMSNorm.
pub const NORM: Module = Module {
    name: "norm",
    source: include_str!("../norm.cu"),
    functions: &["add_norm_bf16", "add_norm_f32", "add_residual", "qk_norm"],
    required_defines: &[],
    min_sm: 80,
};

/// `kernels/elementwise.cu`: embedding and row gathers, relu2, SwiGLU, RoPE.
pub const ELEMENTWISE: Module = Module {
    name: "elementwise",
    source: include_str!("../elementwise.cu"),
    functions: &[
        "embed",
        "gather_rows",
        "gather_rows_bf16",
        "relu2",
        "relu",
        "swiglu",
        "geglu",
        "add_bias",
        "to_bf16",
        "rope",
    ],
    required_defines: &[],
    min_sm: 80,
};

/// `kernels/attention.cu`: variable-length causal GQA flash attention; compiled once per head
/// dimension (see [`attention_defines`]).
pub const ATTENTION: Module = Module {
    name: "attention",
    source: include_str!("../attention.cu"),
    functions: &["flash_attn_varlen"],
    required_defines: &["ARB_HEAD_DIM"],
    min_sm: 80,
};

/// The text of kernels/fp8.cu alone (its entry points are [`FP8`]'s functions).
#[cfg(test)]
const FP8_CU: &str = include_str!("../fp8.cu");

/// `kernels/fp8.cu`: per-token e4m3 quantization of GEMM inputs (standalone, fused with the norm,
/// fused with the MLP activation), dequantization, and the row x column scale epilogue of the
/// tensor-wide-scale FP8 GEMM. Compiled after norm.cu and elementwise.cu in one program, since
/// the fused kernels call their device functions; sm_89 and newer only.
pub const FP8: Module = Module {
    name: "fp8",
    source: concat!(include_str!("../norm.cu"), include_str!("../elementwise.cu"), include_str!("../fp8.cu")),
    functions: &["quantize_rows", "add_norm_fp8", "act_fp8", "dequantize_rows", "scale_rows_cols"],
    required_defines: &[],
    min_sm: 89,
};

/// Every kernel module, in a fixed order.
pub const MODULES: &[Module] = &[NORM, ELEMENTWISE, ATTENTION, FP8];

/// The architectures CI compiles [`FP8`] for: the first with e4m3 conversions and FP8 tensor
/// cores (Ada, sm_89) and Hopper.
pub const FP8_CHECK_ARCHS: [&str; 2] = ["sm_89", "sm_90"];

/// Threads per block of every kernel of fp8.cu (`ARB_FP8_THREADS`).
pub const FP8_THREADS: u32 = 256;

/// The activation `act_fp8` applies before rounding (its `kind` argument, `ARB_FP8_ACT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Fp8Act {
    /// `max(x, 0)^2` (Nemotron).
    Relu2 = 0,
    /// `max(x, 0)`.
    Relu = 1,
    /// `silu(gate) * up` over rows `[gate | up]` (Llama).
    SwiGlu = 2,
    /// `gelu_tanh(gate) * up` over rows `[gate | up]` (Gemma 2).
    GeGlu = 3,
}

/// Threads per block of `add_norm_bf16` / `add_norm_f32` (`ARB_NORM_THREADS` in norm.cu).
pub const NORM_THREADS: u32 = 256;
/// Threads per block of the element-wise kernels other than `rope`, and of `add_residual`
/// (`ARB_ELEMENTWISE_THREADS` in elementwise.cu).
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Query rows per attention work tile (`ARB_BLOCK_M`): the host builds its tile list with it.
pub const ATTN_BLOCK_M: usize = 64;
/// Threads per attention block (`ARB_ATTN_THREADS`).
pub const ATTN_THREADS: u32 = 128;
/// Largest head dimension attention.cu supports.
pub const MAX_HEAD_DIM: usize = 256;

// Internal tiling of attention.cu, needed to size its shared memory (names as in the .cu file).
const ATTN_BLOCK_N_SMALL: usize = 64;
const ATTN_BLOCK_N_LARGE: usize = 32;
const ATTN_BLOCK_N_SPLIT: usize = 128;
const ATTN_SMEM_PAD: usize = 8;
const ATTN_KV_STAGES: usize = 2;

/// Dynamic shared memory, in bytes, that `flash_attn_varlen` compiled for `head_dim` needs
/// (`ARB_ATTN_SMEM(head_dim)`): a Q tile plus double-buffered K and V tiles of bf16 rows padded
/// to a multiple of 16 channels plus 8. Above 48 KiB the host must raise
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` to it; it stays under 100 KiB up to 256.
pub fn attention_smem_bytes(head_dim: usize) -> usize {
    let padded = head_dim.div_ceil(16) * 16;
    let block_n = if head_dim > ATTN_BLOCK_N_SPLIT { ATTN_BLOCK_N_LARGE } else { ATTN_BLOCK_N_SMALL };
    (ATTN_BLOCK_M + 2 * ATTN_KV_STAGES * block_n) * (padded + ATTN_SMEM_PAD) * 2
}

/// The `-D` macros attention.cu needs for `head_dim`: the head dimension itself, and the shared
/// memory size this crate computed, which the source `static_assert`s against its own, so the two
/// can never disagree in a kernel that compiled.
pub fn attention_defines(head_dim: usize) -> Result<Vec<(&'static str, String)>, KernelError> {
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(KernelError::InvalidHeadDim { head_dim });
    }
    Ok(vec![("ARB_HEAD_DIM", head_dim.to_string()), ("ARB_EXPECT_SMEM", attention_smem_bytes(head_dim).to_string())])
}

/// Threads per block for `rope`, as the ABI fixes it: the next power of two of `rotary_dim / 2`,
/// at least one warp and at most 256 (threads stride over the channel pairs beyond that).
pub fn rope_threads(rotary_dim: usize) -> u32 {
    let half = (rotary_dim / 2).max(1);
    half.next_power_of_two().clamp(32, 256) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// `#define NAME <integer>` lines of a source (function-like macros and expressions skipped).
    fn integer_defines(source: &str) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for line in source.lines() {
            let Some(rest) = line.trim_start().strip_prefix("#define ") else { continue };
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else { continue };
            if let Ok(v) = value.parse::<i64>() {
                out.insert(name.to_string(), v);
            }
        }
        out
    }

    fn define(module: &Module, name: &str) -> usize {
        let defines = integer_defines(module.source);
        let value = defines.get(name).unwrap_or_else(|| panic!("{}.cu has no integer #define {name}", module.name));
        usize::try_from(*value).expect("non-negative define")
    }

    #[test]
    fn define_parser_reads_integer_defines_only() {
        let src = "#define A 64\n  #define B 7 // why\n#define F(x) ((x) + 1)\n#define E (A + 1)\nint x;\n";
        let d = integer_defines(src);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d["A"], 64);
        assert_eq!(d["B"], 7);
    }

    #[test]
    fn rust_constants_match_the_cu_defines() {
        assert_eq!(define(&ATTENTION, "ARB_BLOCK_M"), ATTN_BLOCK_M);
        assert_eq!(define(&ATTENTION, "ARB_ATTN_THREADS"), ATTN_THREADS as usize);
        assert_eq!(define(&ATTENTION, "ARB_BLOCK_N_SMALL"), ATTN_BLOCK_N_SMALL);
        assert_eq!(define(&ATTENTION, "ARB_BLOCK_N_LARGE"), ATTN_BLOCK_N_LARGE);
        assert_eq!(define(&ATTENTION, "ARB_BLOCK_N_SPLIT"), ATTN_BLOCK_N_SPLIT);
        assert_eq!(define(&ATTENTION, "ARB_SMEM_PAD"), ATTN_SMEM_PAD);
        assert_eq!(define(&ATTENTION, "ARB_KV_STAGES"), ATTN_KV_STAGES);
        assert_eq!(define(&NORM, "ARB_NORM_THREADS"), NORM_THREADS as usize);
        assert_eq!(define(&ELEMENTWISE, "ARB_ELEMENTWISE_THREADS"), ELEMENTWISE_THREADS as usize);
        assert_eq!(define(&FP8, "ARB_FP8_THREADS"), FP8_THREADS as usize);
        assert_eq!(define(&FP8, "ARB_FP8_ACT_RELU2"), Fp8Act::Relu2 as usize);
        assert_eq!(define(&FP8, "ARB_FP8_ACT_RELU"), Fp8Act::Relu as usize);
        assert_eq!(define(&FP8, "ARB_FP8_ACT_SWIGLU"), Fp8Act::SwiGlu as usize);
        assert_eq!(define(&FP8, "ARB_FP8_ACT_GEGLU"), Fp8Act::GeGlu as usize);
    }

    #[test]
    fn the_fp8_module_is_norm_and_elementwise_then_fp8_and_only_for_sm_89_on() {
        assert!(FP8.source.starts_with(NORM.source));
        assert!(FP8.source.ends_with(FP8_CU));
        assert!(FP8.source.contains(ELEMENTWISE.source));
        for (arch, ok) in [("sm_80", false), ("sm_86", false), ("sm_89", true), ("sm_90", true), ("sm_90a", true)] {
            assert_eq!(FP8.supports(arch), ok, "{arch}");
            assert!(NORM.supports(arch), "{arch}");
        }
        assert_eq!(sm_number("sm_100f"), Some(100));
        assert_eq!(sm_number("compute_89"), Some(89));
        assert_eq!(sm_number("gfx90a"), None);
        assert!(FP8_CHECK_ARCHS.iter().all(|a| FP8.supports(a)));
    }

    #[test]
    fn smem_formula_in_the_cu_file_is_the_one_mirrored_here() {
        // The macro text itself, so that a change of the layout in attention.cu fails here rather
        // than only in the NVRTC static_assert of the check binary.
        let src = ATTENTION.source;
        assert!(src.contains("#define ARB_HEAD_DIM_PADDED(d) ((((d) + 15) / 16) * 16)"));
        assert!(
            src.contains("#define ARB_BLOCK_N(d) ((d) > ARB_BLOCK_N_SPLIT ? ARB_BLOCK_N_LARGE : ARB_BLOCK_N_SMALL)")
        );
        assert!(src.contains(
            "((ARB_BLOCK_M + 2 * ARB_KV_STAGES * ARB_BLOCK_N(d)) * (ARB_HEAD_DIM_PADDED(d) + ARB_SMEM_PAD) * 2)"
        ));
    }

    #[test]
    fn attention_smem_bytes_known_values_and_limits() {
        // Worked by hand from the layout: (64 + 2 * 2 * BN) rows of (pad16(d) + 8) bf16.
        assert_eq!(attention_smem_bytes(128), (64 + 256) * 136 * 2); // 87040
        assert_eq!(attention_smem_bytes(128), 87_040);
        assert_eq!(attention_smem_bytes(64), 46_080);
        assert_eq!(attention_smem_bytes(40), 35_840); // padded to 48
        assert_eq!(attention_smem_bytes(1), 15_360); // padded to 16
        assert_eq!(attention_smem_bytes(129), 58_368); // padded to 144, BN 32: 192 rows x 152
        assert_eq!(attention_smem_bytes(192), 76_800);
        assert_eq!(attention_smem_bytes(256), 101_376);
        for d in 1..=MAX_HEAD_DIM {
            assert!(attention_smem_bytes(d) <= 160 * 1024, "d = {d}");
            assert_eq!(attention_smem_bytes(d) % 16, 0, "d = {d}");
        }
    }

    #[test]
    fn attention_defines_validate_the_head_dim() {
        let d = attention_defines(80).unwrap();
        assert_eq!(d, vec![("ARB_HEAD_DIM", "80".to_string()), ("ARB_EXPECT_SMEM", "56320".to_string())]);
        assert!(matches!(attention_defines(0), Err(KernelError::InvalidHeadDim { head_dim: 0 })));
        assert!(matches!(attention_defines(257), Err(KernelError::InvalidHeadDim { head_dim: 257 })));
        assert!(attention_defines(256).is_ok());
    }

    #[test]
    fn rope_threads_follow_the_abi() {
        assert_eq!(rope_threads(128), 64);
        assert_eq!(rope_threads(64), 32);
        assert_eq!(rope_threads(32), 32);
        assert_eq!(rope_threads(100), 64);
        assert_eq!(rope_threads(2), 32);
        assert_eq!(rope_threads(1024), 256);
    }

    /// Names `NAME` of every `extern "C" __global__ [__launch_bounds__(..)] ... NAME(` in a source.
    fn entry_points(source: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = source;
        while let Some(at) = rest.find("extern \"C\" __global__") {
            rest = &rest[at + "extern \"C\" __global__".len()..];
            loop {
                let paren = rest.find('(').expect("an entry point has a parameter list");
                let name = rest[..paren].split_whitespace().last().expect("a name before the parameter list");
                rest = &rest[paren..];
                if name != "__launch_bounds__" {
                    names.push(name.to_string());
                    break;
                }
                rest = &rest[rest.find(')').expect("__launch_bounds__ closes") + 1..];
            }
        }
        names
    }

    #[test]
    fn entry_point_parser_skips_launch_bounds() {
        let src = "extern \"C\" __global__ void __launch_bounds__(256)\n  a(int x) {}\n\
                   extern \"C\" __global__ void b(float* y) {}\n__global__ void not_exported(int) {}\n";
        assert_eq!(entry_points(src), ["a", "b"]);
    }

    #[test]
    fn listed_functions_are_exactly_the_entry_points_of_each_source() {
        for module in MODULES {
            // fp8's program includes norm.cu and elementwise.cu, whose entry points the host takes
            // from those modules.
            let own = if module.name == FP8.name { FP8_CU } else { module.source };
            let mut found = entry_points(own);
            let mut listed: Vec<String> = module.functions.iter().map(|s| s.to_string()).collect();
            found.sort();
            listed.sort();
            assert_eq!(found, listed, "{}.cu", module.name);
        }
        assert_eq!(MODULES.iter().map(|m| m.name).collect::<Vec<_>>(), ["norm", "elementwise", "attention", "fp8"]);
    }

    #[test]
    fn required_defines_are_guarded_in_the_source() {
        for module in MODULES {
            for name in module.required_defines {
                assert!(
                    module.source.contains(&format!("#ifndef {name}\n#error")),
                    "{}.cu must stop with a clear #error when {name} is missing",
                    module.name
                );
            }
        }
    }
}
