//! Peak memory of `arbiter convert`: writes a synthetic checkpoint in the released layout (TP=8
//! chunks like the 340B checkpoint, 16 layers, per-layer tensors of tens of MB), runs
//! `arbiter convert --weights-only` on it as a child process, samples the child's VmHWM (peak
//! resident memory) from /proc, and prints a table against the bound of the issue:
//! 2 x the largest per-layer tensor + 256 MB.
//!
//! ```text
//! cargo build --release -p arbiter-server --bin arbiter
//! cargo run --release -p arbiter-convert --example peak_memory -- [--layers 16] [--hidden 2048] [--ffn 8192] [--dir /tmp/x]
//! ```
//!
//! Linux only (reads /proc). Not a test: a program that prints a table (docs/convert.md).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arbiter_convert::zarr::ZarrArray;
use arbiter_engine::synth::SplitMix;

struct Args {
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    groups: usize,
    tp: usize,
    dir: Option<PathBuf>,
    arbiter: PathBuf,
}

fn parse_args() -> Args {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/examples/peak_memory -> target/<profile>/arbiter
    let default_bin = exe.parent().and_then(Path::parent).map(|p| p.join("arbiter")).unwrap_or_default();
    let mut a = Args {
        layers: 16,
        hidden: 2048,
        ffn: 8192,
        heads: 16,
        groups: 4,
        tp: 8,
        dir: None,
        arbiter: std::env::var_os("ARBITER_BIN").map(PathBuf::from).unwrap_or(default_bin),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--layers" => a.layers = value().parse().expect("--layers N"),
            "--hidden" => a.hidden = value().parse().expect("--hidden N"),
            "--ffn" => a.ffn = value().parse().expect("--ffn N"),
            "--dir" => a.dir = Some(PathBuf::from(value())),
            "--arbiter" => a.arbiter = PathBuf::from(value()),
            other => panic!("unknown flag {other}; see the doc comment of examples/peak_memory.rs"),
        }
    }
    a
}

/// Writes one zarr array of random bf16 chunks.
fn array(weights: &Path, name: &str, shape: &[usize], chunks: &[usize], rng: &mut SplitMix) {
    let dir = weights.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let zarray = serde_json::json!({"chunks": chunks, "compressor": null, "dtype": "bfloat16", "fill_value": null,
        "filters": null, "order": "C", "shape": shape, "zarr_format": 2});
    std::fs::write(dir.join(".zarray"), zarray.to_string()).unwrap();
    let a = ZarrArray::open(&dir).unwrap();
    let chunk_elems: usize = chunks.iter().product();
    for idx in a.chunk_indices() {
        let mut f = BufWriter::with_capacity(1 << 20, std::fs::File::create(a.chunk_path(&idx)).unwrap());
        let mut left = chunk_elems * 2;
        while left > 0 {
            let bytes = rng.next_u64().to_le_bytes();
            let n = left.min(8);
            f.write_all(&bytes[..n]).unwrap();
            left -= n;
        }
        f.flush().unwrap();
    }
}

fn write_checkpoint(root: &Path, a: &Args) -> u64 {
    let (l, h, f, heads, g, tp) = (a.layers, a.hidden, a.ffn, a.heads, a.groups, a.tp);
    let d = h / heads;
    let vocab = 32 * 1024;
    let w = root.join("model_weights");
    std::fs::create_dir_all(&w).unwrap();
    std::fs::write(w.join("metadata.json"), r#"{"sharded_backend": "zarr", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}"#).unwrap();
    std::fs::write(
        root.join("model_config.yaml"),
        format!(
            "num_layers: {l}\nhidden_size: {h}\nffn_hidden_size: {f}\nnum_attention_heads: {heads}\nnum_query_groups: {g}\n\
             kv_channels: null\nlayernorm_epsilon: 1.0e-05\nmake_vocab_size_divisible_by: 128\nnormalization: layernorm1p\n\
             bias: false\nactivation: squared-relu\nposition_embedding_type: rope\nrotary_percentage: 0.5\n\
             max_position_embeddings: 4096\nshare_embeddings_and_output_weights: false\ntensor_model_parallel_size: {tp}\n\
             regression:\n  num_attributes: 9\n"
        ),
    )
    .unwrap();
    let mut rng = SplitMix::new(7);
    let p = "model.decoder.layers.";
    let qkv = (heads + 2 * g) * d;
    array(&w, "model.embedding.word_embeddings.weight", &[vocab, h], &[vocab / tp, h], &mut rng);
    array(&w, "model.output_layer.weight", &[vocab, h], &[vocab / tp, h], &mut rng);
    array(&w, &format!("{p}self_attention.linear_qkv.weight"), &[l, qkv, h], &[1, qkv / tp, h], &mut rng);
    array(&w, &format!("{p}self_attention.linear_proj.weight"), &[l, h, heads * d], &[1, h, heads * d / tp], &mut rng);
    array(&w, &format!("{p}mlp.linear_fc1.weight"), &[l, f, h], &[1, f / tp, h], &mut rng);
    array(&w, &format!("{p}mlp.linear_fc2.weight"), &[l, h, f], &[1, h, f / tp], &mut rng);
    for n in [
        "self_attention.linear_qkv.layer_norm_weight",
        "self_attention.linear_qkv.layer_norm_bias",
        "mlp.linear_fc1.layer_norm_weight",
        "mlp.linear_fc1.layer_norm_bias",
    ] {
        array(&w, &format!("{p}{n}"), &[l, h], &[1, h], &mut rng);
    }
    array(&w, "model.decoder.final_layernorm.weight", &[h], &[h], &mut rng);
    array(&w, "model.decoder.final_layernorm.bias", &[h], &[h], &mut rng);
    array(&w, "model.rm_head.weight", &[9, h], &[9, h / tp], &mut rng);
    array(&w, "model.rm_head.bias", &[9], &[9], &mut rng);
    // Largest per-layer tensor: fc1 / fc2, bf16.
    (f * h * 2) as u64
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `cmd`, sampling its VmHWM until it exits; returns (peak KiB, seconds, success).
fn measure(cmd: &mut Command) -> (u64, f64, bool) {
    let start = Instant::now();
    let mut child = cmd.spawn().expect("the arbiter binary runs (build it first, see the doc comment)");
    let mut peak = 0;
    loop {
        if let Some(k) = vm_hwm_kib(child.id()) {
            peak = peak.max(k);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (peak, start.elapsed().as_secs_f64(), status.success());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn main() {
    let a = parse_args();
    let scratch = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("arbiter-peak-memory-{}", std::process::id())),
    };
    let input = scratch.join("released");
    let output = scratch.join("converted");
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!("writing a synthetic released checkpoint to {} ...", input.display());
    let largest = write_checkpoint(&input, &a);
    let (base, _, _) = measure(Command::new(&a.arbiter).arg("--version").stdout(std::process::Stdio::null()));
    let (peak, secs, ok) = measure(
        Command::new(&a.arbiter)
            .args(["convert", "--weights-only", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .stderr(std::process::Stdio::inherit()),
    );
    assert!(ok, "arbiter convert failed");
    let written: u64 = std::fs::read_dir(&output).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let bound = 2 * largest + 256 * 1024 * 1024;
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("| what | value |");
    println!("|---|---|");
    println!(
        "| layers, hidden, FFN, heads/KV groups, TP chunks | {}, {}, {}, {}/{}, {} |",
        a.layers, a.hidden, a.ffn, a.heads, a.groups, a.tp
    );
    println!("| largest per-layer tensor (fc1/fc2, bf16) | {:.1} MiB |", mb(largest));
    println!("| converted folder | {:.1} MiB in {secs:.1} s |", mb(written));
    println!("| `arbiter --version` VmHWM (process baseline) | {:.1} MiB |", base as f64 / 1024.0);
    println!("| `arbiter convert` VmHWM | {:.1} MiB |", peak as f64 / 1024.0);
    println!("| bound: 2 x largest per-layer tensor + 256 MiB | {:.1} MiB |", mb(bound));
    println!("| within the bound | {} |", if peak * 1024 <= bound { "yes" } else { "NO" });
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    if peak * 1024 > bound {
        std::process::exit(1);
    }
}
