//! Measures the core clock and the f32 FMA ceiling (not a test).
//!
//! - Clock: a chain of dependent integer adds retires one per cycle, so adds per second is the
//!   clock. VMs often show the base clock in /proc/cpuinfo while the core boosts.
//! - FMA ceiling: 12 independent chains of 256-bit FMAs, registers only: the most f32 FLOP/s an
//!   AVX2 kernel can reach with every core busy (the clock may drop under vector load).
//!
//! docs/bench-cpu.md quotes GEMM efficiency against these figures.
//!
//! cargo run --release -p arbiter-engine --example cpu_clock -- [threads]

#[cfg(target_arch = "x86_64")]
fn ghz() -> f64 {
    let n: u64 = 2_000_000_000;
    let t = std::time::Instant::now();
    // SAFETY: registers only; two dependent adds per iteration, the loop counter on its own chain.
    unsafe {
        std::arch::asm!("2:", "add {x}, 1", "add {x}, 1", "dec {n}", "jnz 2b", n = inout(reg) n => _, x = inout(reg) 0u64 => _);
    }
    2.0 * n as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// f32 GFLOP/s of 12 independent AVX2 FMA chains on this thread (0 without AVX2 and FMA).
#[cfg(target_arch = "x86_64")]
fn fma_gflops() -> f64 {
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
        return 0.0;
    }
    let n: u64 = 200_000_000;
    let t = std::time::Instant::now();
    // SAFETY: registers only (ymm0-ymm13, declared clobbered); the CPU has AVX2 and FMA.
    unsafe {
        std::arch::asm!(
            "vxorps ymm12, ymm12, ymm12",
            "vxorps ymm13, ymm13, ymm13",
            "2:",
            "vfmadd231ps ymm0, ymm12, ymm13", "vfmadd231ps ymm1, ymm12, ymm13",
            "vfmadd231ps ymm2, ymm12, ymm13", "vfmadd231ps ymm3, ymm12, ymm13",
            "vfmadd231ps ymm4, ymm12, ymm13", "vfmadd231ps ymm5, ymm12, ymm13",
            "vfmadd231ps ymm6, ymm12, ymm13", "vfmadd231ps ymm7, ymm12, ymm13",
            "vfmadd231ps ymm8, ymm12, ymm13", "vfmadd231ps ymm9, ymm12, ymm13",
            "vfmadd231ps ymm10, ymm12, ymm13", "vfmadd231ps ymm11, ymm12, ymm13",
            "dec {n}", "jnz 2b",
            n = inout(reg) n => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
            out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
            out("ymm12") _, out("ymm13") _,
        );
    }
    // 12 FMAs of 8 lanes, 2 FLOPs each, per iteration.
    (n * 12 * 8 * 2) as f64 / t.elapsed().as_secs_f64() / 1e9
}

#[cfg(target_arch = "x86_64")]
fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    println!("| thread | GHz | f32 FMA GFLOP/s |");
    println!("|---|---|---|");
    let runs: Vec<_> = (0..threads).map(|_| std::thread::spawn(|| (ghz(), fma_gflops()))).collect();
    let mut total = 0.0;
    for (i, r) in runs.into_iter().enumerate() {
        let (clock, flops) = r.join().expect("the timing thread");
        total += flops;
        println!("| {i} | {clock:.3} | {flops:.1} |");
    }
    println!("| all | | {total:.1} |");
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("cpu_clock measures x86-64 cores only");
}
