//! `arbiter-eval`: RewardBench (v1 or 2) against a running arbiter server.
//!
//! Each example goes out as one Rank call (the prompt once, every response a candidate), many in
//! flight; each result is appended to the scores file as it arrives, so a killed run resumes
//! where it stopped. The report is computed from the scores file, as RewardBench computes it.
//!
//! arbiter-eval --server http://127.0.0.1:50051 --data filtered.parquet --out results/

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arbiter_client::{conversation, pb, Client, ClientConfig, ScoreOptions};
use arbiter_eval::dataset::{self, Example, Version};
use arbiter_eval::scoring::{score_v1, score_v2, Report, Scored};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "arbiter-eval", about = "RewardBench evaluation of an arbiter server")]
struct Args {
    /// Server address.
    #[arg(long, env = "ARBITER_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// RewardBench file: .json, .jsonl or .parquet (v1 or v2, detected from the rows).
    #[arg(long)]
    data: PathBuf,
    /// Folder for scores.jsonl (resumable), report.json and report.md.
    #[arg(long, default_value = "arbiter-eval-out")]
    out: PathBuf,
    /// Examples in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Truncation of over-long examples: "truncate" (what RewardBench's pipelines do) or "error".
    #[arg(long, default_value = "truncate")]
    truncation: String,
    /// Bearer token.
    #[arg(long, env = "ARBITER_AUTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) for TLS.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Seconds per call.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Print the published numbers of this model side by side ("nemotron-4-340b-reward").
    #[arg(long)]
    compare: Option<String>,
}

/// Published RewardBench v1 results, for `--compare`.
const PUBLISHED: [(&str, [(&str, f64); 5]); 1] = [(
    "nemotron-4-340b-reward",
    [("Overall", 92.0), ("Chat", 95.8), ("Chat Hard", 87.1), ("Safety", 91.5), ("Reasoning", 93.7)],
)];

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("arbiter-eval: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn saved_line(e: &Example, scores: &[f32], fingerprint: &str) -> String {
    json!({"id": e.id, "subset": e.subset, "scores": scores, "num_correct": e.num_correct, "model_fingerprint": fingerprint})
        .to_string()
}

/// Scores already in the scores file, by (subset, id).
fn load_saved(path: &std::path::Path, fingerprint: &str) -> Result<HashMap<(String, String), Scored>> {
    let mut saved = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(saved) };
    for (i, line) in text.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            // A run killed mid-write leaves a partial last line: that example is simply redone.
            eprintln!("arbiter-eval: ignoring unreadable line {} of {}", i + 1, path.display());
            continue;
        };
        if v["model_fingerprint"] != json!(fingerprint) {
            bail!(
                "{} holds scores of model {} but the server serves {fingerprint}; use another --out",
                path.display(),
                v["model_fingerprint"]
            );
        }
        let s = Scored {
            id: v["id"].as_str().unwrap_or_default().to_string(),
            subset: v["subset"].as_str().unwrap_or_default().to_string(),
            scores: v["scores"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default(),
            num_correct: v["num_correct"].as_u64().unwrap_or(1) as usize,
        };
        saved.insert((s.subset.clone(), s.id.clone()), s);
    }
    Ok(saved)
}

async fn run(args: Args) -> Result<ExitCode> {
    let (version, examples) = dataset::read(&args.data)?;
    let mut cfg = ClientConfig::new(args.server.clone());
    cfg.token = args.token.clone();
    cfg.timeout = Some(std::time::Duration::from_secs_f64(args.timeout));
    if let Some(ca) = &args.tls_ca {
        cfg.tls_ca_pem = Some(std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?);
    }
    let client = Client::connect(cfg).await?;
    let info = client.model_info().await?;
    let truncation = match args.truncation.as_str() {
        "truncate" => pb::Truncation::Truncate,
        "error" => pb::Truncation::Error,
        other => bail!("--truncation {other:?}: expected truncate or error"),
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let scores_path = args.out.join("scores.jsonl");
    let saved = load_saved(&scores_path, &info.model_fingerprint)?;
    let todo: Vec<Example> =
        examples.iter().filter(|e| !saved.contains_key(&(e.subset.clone(), e.id.clone()))).cloned().collect();
    eprintln!(
        "arbiter-eval: {} ({:?}): {} examples, {} already scored, model {}{}",
        args.data.display(),
        version,
        examples.len(),
        examples.len() - todo.len(),
        info.model_fingerprint,
        if info.warning.is_empty() { String::new() } else { format!(" ({})", info.warning) }
    );

    let bar = indicatif::ProgressBar::new(todo.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} examples, {per_sec}, ETA {eta}")
            .expect("template"),
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&scores_path)
        .with_context(|| format!("opening {}", scores_path.display()))?;
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Example, Result<Vec<f32>, String>)>(64);
    let opts = ScoreOptions { truncation, ..Default::default() };
    for e in todo {
        let (client, sem, tx, opts) = (client.clone(), sem.clone(), tx.clone(), opts.clone());
        tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let r = client
                .rank(conversation(&[("user", &e.prompt)]), e.candidates.clone(), &opts)
                .await
                .map(|r| r.results.iter().map(|x| x.reward).collect())
                .map_err(|err| err.to_string());
            tx.send((e, r)).await.ok();
        });
    }
    drop(tx);
    let mut failed = Vec::new();
    while let Some((e, r)) = rx.recv().await {
        match r {
            Ok(scores) => {
                writeln!(file, "{}", saved_line(&e, &scores, &info.model_fingerprint))?;
                file.flush()?;
            }
            Err(msg) => failed.push(format!("{} ({}): {msg}", e.id, e.subset)),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("arbiter-eval: failed {f}");
        }
        eprintln!("arbiter-eval: {} examples failed; run again to retry them (scored ones are kept)", failed.len());
        return Ok(ExitCode::from(1));
    }

    let saved = load_saved(&scores_path, &info.model_fingerprint)?;
    let items: Vec<Scored> =
        examples.iter().filter_map(|e| saved.get(&(e.subset.clone(), e.id.clone())).cloned()).collect();
    let report = match version {
        Version::V1 => score_v1(&items),
        Version::V2 => score_v2(&items).map_err(anyhow::Error::msg)?,
    };
    let published = args.compare.as_deref().map(|name| {
        PUBLISHED.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_vec()).ok_or_else(|| {
            anyhow::anyhow!("--compare {name:?}: known models are {}", PUBLISHED.map(|(n, _)| n).join(", "))
        })
    });
    let published = published.transpose()?;
    let (js, md) = render(&args, version, &info, &report, published.as_deref());
    std::fs::write(args.out.join("report.json"), serde_json::to_string_pretty(&js)? + "\n")?;
    std::fs::write(args.out.join("report.md"), &md)?;
    print!("{md}");
    Ok(ExitCode::SUCCESS)
}

fn render(
    args: &Args,
    version: Version,
    info: &pb::ModelInfo,
    r: &Report,
    published: Option<&[(&str, f64)]>,
) -> (Value, String) {
    let name = match version {
        Version::V1 => "RewardBench",
        Version::V2 => "RewardBench 2",
    };
    let pct = |x: f64| (x * 1000.0).round() / 10.0;
    let js = json!({
        "benchmark": name,
        "data": args.data.display().to_string(),
        "model_fingerprint": info.model_fingerprint,
        "architecture": info.architecture,
        "warning": info.warning,
        "overall": pct(r.overall),
        "categories": r.categories.iter().map(|(k, v)| (k.clone(), json!(pct(*v)))).collect::<serde_json::Map<_, _>>(),
        "subsets": r.subsets.iter().map(|(k, (n, v))| (k.clone(), json!({"examples": n, "score": pct(*v)}))).collect::<serde_json::Map<_, _>>(),
        "unknown_subsets": r.unknown_subsets,
        "published": published.map(|p| p.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()),
    });
    let mut md = format!("# {name}: model {}\n\n", info.model_fingerprint);
    if !info.warning.is_empty() {
        md.push_str(&format!("> {}\n\n", info.warning));
    }
    let label = if version == Version::V1 { "category" } else { "domain" };
    match published {
        Some(p) => {
            md.push_str(&format!("| {label} | score | published |\n|---|---|---|\n"));
            let get = |k: &str| p.iter().find(|(n, _)| *n == k).map_or("".to_string(), |(_, v)| format!("{v:.1}"));
            md.push_str(&format!("| **Overall** | **{:.1}** | {} |\n", pct(r.overall), get("Overall")));
            for (k, v) in &r.categories {
                md.push_str(&format!("| {k} | {:.1} | {} |\n", pct(*v), get(k)));
            }
        }
        None => {
            md.push_str(&format!("| {label} | score |\n|---|---|\n| **Overall** | **{:.1}** |\n", pct(r.overall)));
            for (k, v) in &r.categories {
                md.push_str(&format!("| {k} | {:.1} |\n", pct(*v)));
            }
        }
    }
    md.push_str("\n| subset | examples | score |\n|---|---|---|\n");
    for (k, (n, v)) in &r.subsets {
        let mark = if r.unknown_subsets.contains(k) { " (in no category)" } else { "" };
        md.push_str(&format!("| {k}{mark} | {n} | {:.1} |\n", pct(*v)));
    }
    (js, md)
}
