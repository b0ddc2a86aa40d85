//! Runs the real CUDA sources on the CPU: g++ compiles kernels/*.cu against the emulation of the
//! CUDA built-ins and PTX wrappers in tests/emu/cuda_bf16.h (fibers for threads, the ISA's mma /
//! ldmatrix fragment layouts, deferred cp.async, adversarial warp scheduling), under
//! AddressSanitizer with every byte a block must not touch poisoned, and compares every output with
//! a float64 reference (tests/emu/*.cpp; fp8.cu against the e4m3 rounding rules of engine/src/fp8.rs). This checks the kernels' indexing, masking, tiling,
//! pipelining and numerics without a GPU; it cannot check timing or the hardware itself, which
//! docs/gpu-owed.md leaves to the GPU check.
//!
//! Needs g++ (C++17, with libasan/libubsan); scripts/test.sh installs it when missing. A missing
//! compiler fails these tests, it does not skip them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn emu_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emu")
}

/// Compiles `harness` (a file in tests/emu) with `defines`, runs it, and fails the test with its
/// full output unless it exits 0. Returns its stdout.
fn build_and_run(harness: &str, defines: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("temporary directory");
    let exe = dir.path().join("emu");
    let source = emu_dir().join(harness);
    let mut cmd = Command::new("g++");
    cmd.args([
        "-std=c++17",
        "-O1",
        "-g",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-unknown-pragmas", // #pragma unroll is for NVRTC
        "-fno-strict-aliasing",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
    ])
    .arg("-I")
    .arg(emu_dir())
    .args(defines.iter().map(|d| format!("-D{d}")))
    .arg(&source)
    .arg("-o")
    .arg(&exe);
    let built = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run g++ ({e}): the kernel emulation tests need a C++17 compiler with AddressSanitizer \
             (Debian: apt-get install g++; scripts/test.sh does this)"
        )
    });
    assert!(
        built.status.success(),
        "g++ failed on {}:\n{}{}",
        source.display(),
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    // Leak checking needs ptrace-like access some sandboxes deny, and a leak in a test harness
    // says nothing about a kernel.
    let run = Command::new(&exe).env("ASAN_OPTIONS", "detect_leaks=0").output().expect("run the emulation binary");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{harness} {defines:?} failed ({}):\n{stdout}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    print!("{stdout}");
    stdout
}

/// Every case line of the harness reports "ok"; guards against a harness that exits 0 having
/// checked nothing.
fn assert_all_ok(stdout: &str, at_least: usize) {
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= at_least, "expected at least {at_least} checks, got:\n{stdout}");
    for line in lines {
        assert!(line.starts_with("ok "), "not ok: {line}");
    }
}

fn attention(head_dim: usize) {
    let define = format!("ARB_HEAD_DIM={head_dim}");
    let out = build_and_run("attention_emu.cpp", &[&define]);
    assert_all_ok(&out, 11);
}

/// Odd head dim: element-wise loads (no 16-byte path), 15 zero-padded channels, scalar stores.
#[test]
fn attention_head_dim_17() {
    attention(17);
}

/// Multiple of 8 but not 16: cp.async path with a zero-padded last k-step.
#[test]
fn attention_head_dim_40() {
    attention(40);
}

/// gpu-1b's head dim: 64-key tiles, full cp.async path.
#[test]
fn attention_head_dim_128() {
    attention(128);
}

/// Above 128: 32-key tiles.
#[test]
fn attention_head_dim_192() {
    attention(192);
}

/// The largest supported head dim.
#[test]
fn attention_head_dim_256() {
    attention(256);
}

/// norm.cu (LayerNorm / RMSNorm, residual add, Qwen3's q/k norm) and elementwise.cu (embed,
/// gather, relu2, relu, SwiGLU, GeGLU, bias, f32 -> bf16, RoPE).
#[test]
fn norm_and_elementwise() {
    let out = build_and_run("rowwise_emu.cpp", &[]);
    assert_all_ok(&out, 32);
}

/// fp8.cu (after norm.cu and elementwise.cu, as the FP8 module compiles them): per-token e4m3
/// quantization standalone, fused with LayerNorm / RMSNorm and with relu2, relu, SwiGLU and GeGLU,
/// dequantization and the row x column scale epilogue, against engine/src/fp8.rs's rounding rules
/// (bit-identical codes and scales where the kernel's f32 input is exact).
#[test]
fn fp8() {
    let out = build_and_run("fp8_emu.cpp", &[]);
    assert_all_ok(&out, 32);
}
