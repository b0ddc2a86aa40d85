//! `arbiter-kernels-check`: compiles every kernel module with NVRTC for the target GPU
//! architectures, without a GPU, and fails on any error. Run by scripts/kernels-check.sh in CI.

use anyhow::{bail, Context, Result};
use arbiter_kernels::{
    attention_defines, attention_smem_bytes, CacheOutcome, Compiler, KernelError, Module, PtxCache, ATTENTION, FP8,
    MODULES, NORM,
};
use clap::Parser;
use std::time::Instant;

/// Compile-check of arbiter's CUDA kernels (kernels/*.cu) with NVRTC; needs no GPU.
///
/// Compiles norm.cu and elementwise.cu, and attention.cu once per head dimension, for each
/// architecture, and fp8.cu for each FP8 architecture (sm_89 and sm_90: e4m3 needs Ada or newer); NVRTC runs ptxas too, so register and shared-memory limits are checked. Each PTX
/// must export every entry point the ABI (docs/kernel-abi.md) names. Prints a table (module, arch,
/// defines, PTX size, registers, spill bytes, compile time), then checks the error paths against
/// the real NVRTC: a missing define, a compile error with its log, a host/kernel shared-memory
/// disagreement, the on-disk cache (hit, and recompilation of a corrupted entry), and fp8.cu's
/// refusal of sm_80.
///
/// NVRTC and the headers are found like the server finds them: libnvrtc through the dynamic
/// loader (LD_LIBRARY_PATH) or in $CUDA_PATH/lib64, /usr/local/cuda/lib64 or a .venv with the
/// nvidia-cuda-nvrtc wheel; headers in $ARBITER_CUDA_INCLUDE, $CUDA_PATH/include,
/// /usr/local/cuda/include or a .venv with the nvidia-cuda-runtime wheel.
///
/// Exits 0 when everything compiled and every check passed, 1 otherwise.
#[derive(Parser, Debug)]
#[command(name = "arbiter-kernels-check", version)]
struct Args {
    /// GPU architectures to compile for (repeatable).
    #[arg(long = "arch", default_values = ["sm_80", "sm_90"])]
    archs: Vec<String>,
    /// Architectures to compile the FP8 module (fp8.cu, sm_89 and newer) for (repeatable); an
    /// arch below sm_89 is refused.
    #[arg(long = "fp8-arch", default_values = arbiter_kernels::FP8_CHECK_ARCHS)]
    fp8_archs: Vec<String>,
    /// Head dimensions to compile attention.cu for (repeatable; 1..=256).
    #[arg(long = "head-dim", default_values_t = [64, 80, 96, 128, 192, 256, 40])]
    head_dims: Vec<usize>,
    /// Go through the on-disk PTX cache ($ARBITER_KERNEL_CACHE or ~/.cache/arbiter/kernels) for
    /// the table; by default every entry is compiled so the times are NVRTC's.
    #[arg(long)]
    cache: bool,
}

struct Row {
    module: &'static str,
    arch: String,
    defines: String,
    ptx_bytes: usize,
    registers: Option<u32>,
    spill_bytes: Option<u32>,
    millis: f64,
    status: String,
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("arbiter-kernels-check: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<bool> {
    let args = Args::parse();
    let compiler = Compiler::discover().context("locating NVRTC and the CUDA headers")?;
    let (major, minor) = compiler.nvrtc_version();
    println!("NVRTC {major}.{minor} from {}", compiler.library());
    println!("CUDA headers: {}", compiler.include_dir().display());
    let compiler = if args.cache { compiler } else { compiler.with_cache(None) };
    if let Some(cache) = compiler.cache() {
        println!("PTX cache: {}", cache.dir().display());
    }
    // ptxas statistics (registers, spills) for the table; they do not change the code.
    let verbose = compiler.clone().with_extra_options(vec!["--ptxas-options=--verbose".to_string()]);

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for module in MODULES {
        let define_sets: Vec<Vec<(&str, String)>> = if module.name == ATTENTION.name {
            let mut sets = Vec::new();
            for &d in &args.head_dims {
                sets.push(attention_defines(d).with_context(|| format!("--head-dim {d}"))?);
            }
            sets
        } else {
            vec![Vec::new()]
        };
        // FP8 (e4m3) needs sm_89+: its module has its own list, the others skip nothing.
        let archs = if module.min_sm > 80 { &args.fp8_archs } else { &args.archs };
        for arch in archs {
            if !module.supports(arch) {
                failures.push(format!("{} cannot be compiled for {arch} (it needs sm_{})", module.name, module.min_sm));
                continue;
            }
            for defines in &define_sets {
                let (row, failure) = check_one(&verbose, module, arch, defines);
                rows.push(row);
                failures.extend(failure);
            }
        }
    }
    print_table(&rows);

    println!();
    let arch = args.archs.last().map(String::as_str).unwrap_or("sm_90");
    for (name, outcome) in [
        ("missing ARB_HEAD_DIM is refused before NVRTC", check_missing_define(&compiler, arch)),
        ("a compile error comes back with NVRTC's log", check_compile_error(&compiler, arch)),
        ("host/kernel shared-memory disagreement fails to compile", check_smem_assert(&compiler, arch)),
        ("cache: store, hit, corrupted entry recompiled", check_cache(&compiler, arch)),
        ("fp8.cu refuses sm_80 with its #error (e4m3 needs sm_89)", check_fp8_refuses_sm_80(&compiler)),
    ] {
        match outcome {
            Ok(()) => println!("ok    {name}"),
            Err(e) => {
                println!("FAIL  {name}: {e:#}");
                failures.push(format!("{name}: {e:#}"));
            }
        }
    }

    if failures.is_empty() {
        println!("\nall {} compilations and 5 checks passed", rows.len());
        Ok(true)
    } else {
        eprintln!("\n{} failure(s):", failures.len());
        for f in &failures {
            eprintln!("- {f}");
        }
        Ok(false)
    }
}

fn define_text(defines: &[(&str, String)]) -> String {
    // ARB_EXPECT_SMEM is derived from the head dim; show the head dim and the size.
    defines
        .iter()
        .map(|(n, v)| match *n {
            "ARB_HEAD_DIM" => format!("D={v}"),
            "ARB_EXPECT_SMEM" => format!("smem={v}"),
            _ => format!("{n}={v}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_one(compiler: &Compiler, module: &Module, arch: &str, defines: &[(&str, String)]) -> (Row, Option<String>) {
    let start = Instant::now();
    let result = compiler.compile_detailed(module, arch, defines);
    let millis = start.elapsed().as_secs_f64() * 1e3;
    let mut row = Row {
        module: module.name,
        arch: arch.to_string(),
        defines: define_text(defines),
        ptx_bytes: 0,
        registers: None,
        spill_bytes: None,
        millis,
        status: "ok".to_string(),
    };
    let label = format!("{} {arch} {}", module.name, row.defines);
    match result {
        Err(e) => {
            row.status = "FAILED".to_string();
            (row, Some(format!("{label}: {e}")))
        }
        Ok(compiled) => {
            row.ptx_bytes = compiled.ptx_source.len();
            (row.registers, row.spill_bytes) = ptxas_stats(&compiled.log);
            if matches!(compiled.cache, CacheOutcome::Hit(_)) {
                row.status = "ok (cached)".to_string();
            }
            let missing: Vec<&str> = module
                .functions
                .iter()
                .copied()
                .filter(|f| !compiled.ptx_source.contains(&format!(".entry {f}(")))
                .collect();
            if missing.is_empty() {
                (row, None)
            } else {
                row.status = "MISSING ENTRY".to_string();
                (row, Some(format!("{label}: PTX lacks entry points {missing:?}")))
            }
        }
    }
}

/// (max registers of any entry, total spill-store bytes) from a `--ptxas-options=--verbose` log.
fn ptxas_stats(log: &str) -> (Option<u32>, Option<u32>) {
    let mut registers: Option<u32> = None;
    let mut spills: Option<u32> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Used ").nth(1) {
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                if rest.split_whitespace().nth(1) == Some("registers,") {
                    registers = Some(registers.map_or(n, |r: u32| r.max(n)));
                }
            }
        }
        if let Some(before) = line.split(" bytes spill stores").next().filter(|_| line.contains(" bytes spill stores"))
        {
            if let Some(n) = before.rsplit([' ', ',']).find(|s| !s.is_empty()).and_then(|n| n.parse::<u32>().ok()) {
                spills = Some(spills.unwrap_or(0) + n);
            }
        }
    }
    (registers, spills)
}

fn print_table(rows: &[Row]) {
    let opt = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "\n| {:<11} | {:<5} | {:<19} | {:>9} | {:>4} | {:>7} | {:>8} | {:<11} |",
        "module", "arch", "defines", "PTX bytes", "regs", "spill B", "time ms", "result"
    );
    println!("|{:-<13}|{:-<7}|{:-<21}|{:->11}|{:->6}|{:->9}|{:->10}|{:-<13}|", "", "", "", "", "", "", "", "");
    for r in rows {
        println!(
            "| {:<11} | {:<5} | {:<19} | {:>9} | {:>4} | {:>7} | {:>8.0} | {:<11} |",
            r.module,
            r.arch,
            if r.defines.is_empty() { "-" } else { &r.defines },
            r.ptx_bytes,
            opt(r.registers),
            opt(r.spill_bytes),
            r.millis,
            r.status
        );
    }
}

fn check_missing_define(compiler: &Compiler, arch: &str) -> Result<()> {
    match compiler.compile_detailed(&ATTENTION, arch, &[]) {
        Err(KernelError::MissingDefine { define: "ARB_HEAD_DIM", .. }) => Ok(()),
        Err(e) => bail!("wrong error: {e}"),
        Ok(_) => bail!("attention.cu compiled without ARB_HEAD_DIM"),
    }
}

fn check_compile_error(compiler: &Compiler, arch: &str) -> Result<()> {
    let broken = Module {
        name: "broken",
        source: "extern \"C\" __global__ void k(float* x) {\n    x[0] = not_declared_anywhere(x[1]);\n}\n",
        functions: &["k"],
        required_defines: &[],
        min_sm: 80,
    };
    match compiler.compile_detailed(&broken, arch, &[]) {
        Err(KernelError::Compile { log, .. }) if log.contains("not_declared_anywhere") && log.contains("broken.cu") => {
            Ok(())
        }
        Err(e) => bail!("error without the expected log: {e}"),
        Ok(_) => bail!("a source calling an undeclared function compiled"),
    }
}

fn check_smem_assert(compiler: &Compiler, arch: &str) -> Result<()> {
    let wrong = (attention_smem_bytes(128) + 16).to_string();
    let defines = [("ARB_HEAD_DIM", "128".to_string()), ("ARB_EXPECT_SMEM", wrong)];
    match compiler.compile_detailed(&ATTENTION, arch, &defines) {
        Err(KernelError::Compile { log, .. }) if log.contains("attention_smem_bytes() on the host disagrees") => Ok(()),
        Err(e) => bail!("error without the static_assert message: {e}"),
        Ok(_) => bail!("attention.cu accepted a wrong ARB_EXPECT_SMEM"),
    }
}

fn check_fp8_refuses_sm_80(compiler: &Compiler) -> Result<()> {
    match compiler.compile_detailed(&FP8, "sm_80", &[]) {
        Err(KernelError::Compile { log, .. }) if log.contains("needs sm_89 or newer") => Ok(()),
        Err(e) => bail!("error without fp8.cu's #error message: {e}"),
        Ok(_) => bail!("fp8.cu compiled for sm_80"),
    }
}

fn check_cache(compiler: &Compiler, arch: &str) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("arbiter-kernels-check-{}", std::process::id()));
    let result = (|| {
        let cached = compiler.clone().with_cache(Some(PtxCache::new(&dir)));
        let first = cached.compile_detailed(&NORM, arch, &[])?;
        let CacheOutcome::Stored(path) = &first.cache else { bail!("first compile: {:?}", first.cache) };
        let second = cached.compile_detailed(&NORM, arch, &[])?;
        if second.cache != CacheOutcome::Hit(path.clone()) || second.ptx_source != first.ptx_source {
            bail!("second compile was not an identical hit: {:?}", second.cache);
        }
        let mut bytes = std::fs::read(path)?;
        let last = bytes.len() - 2;
        bytes[last] ^= 0x20;
        std::fs::write(path, &bytes)?;
        let third = cached.compile_detailed(&NORM, arch, &[])?;
        if third.cache != CacheOutcome::Stored(path.clone()) || third.ptx_source != first.ptx_source {
            bail!("corrupted entry was not recompiled: {:?}", third.cache);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_stats_parse_registers_and_spills() {
        let log = "ptxas info    : Compiling entry function 'a' for 'sm_90'\n\
                   ptxas         .     16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n\
                   ptxas info    : Used 128 registers, used 1 barriers, 16 bytes cumulative stack size\n\
                   ptxas         .     0 bytes stack frame, 4 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 168 registers, used 1 barriers\n";
        assert_eq!(ptxas_stats(log), (Some(168), Some(16)));
        assert_eq!(ptxas_stats(""), (None, None));
    }

    #[test]
    fn help_documents_the_options() {
        use clap::CommandFactory;
        let help = Args::command().render_long_help().to_string();
        for needle in ["--arch", "--fp8-arch", "--head-dim", "--cache", "sm_80", "sm_89", "Exits 0"] {
            assert!(help.contains(needle), "{needle} missing from --help:\n{help}");
        }
    }
}
