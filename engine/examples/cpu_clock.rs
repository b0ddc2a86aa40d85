//! Measures the core clock (not a test): a chain of dependent integer adds retires one per
//! cycle, so adds per second is the clock. VMs often show the base clock in /proc/cpuinfo while
//! the core boosts; the FLOP/s ceilings of docs/bench-cpu.md use this figure.
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

#[cfg(target_arch = "x86_64")]
fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    println!("| thread | GHz |");
    println!("|---|---|");
    let runs: Vec<_> = (0..threads).map(|_| std::thread::spawn(ghz)).collect();
    for (i, r) in runs.into_iter().enumerate() {
        println!("| {i} | {:.3} |", r.join().expect("the timing thread"));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("cpu_clock measures x86-64 cores only");
}
