//! `arbiter-eval`: RewardBench (v1 or 2) against a running arbiter server.
//!
//! Each example goes out as one Rank call (the prompt once, every response a candidate), many in
//! flight; each result is appended to the scores file as it arrives, so a killed run resumes
//! where it stopped (clients/eval/src/saved.rs). The report is computed from the scores file, as
//! RewardBench computes it, and only when it covers every example (or `--partial` is given).
//!
//! arbiter-eval --server http://127.0.0.1:50051 --data filtered.parquet --out results/

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbiter_client::{conversation, pb, Client, ClientConfig, ScoreOptions};
use arbiter_eval::dataset::{self, Example, Version};
use arbiter_eval::saved::{self, SavedResult};
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
    /// Examples longer than the model's limit: "truncate_content" cuts the start of the prompt,
    /// then of the response, and keeps the template and the score position, so every example
    /// gets a score; "truncate" drops whole oldest turns (a single-turn example that is still too
    /// long fails); "error" fails them. RewardBench's own pipelines cut tokens on the right,
    /// which for a reward model cuts off the position its score is read at.
    #[arg(long, default_value = "truncate_content")]
    truncation: String,
    /// Write a report even when some examples have no score (it says how many it covers).
    /// Without it such a run exits 1 with no report.
    #[arg(long)]
    partial: bool,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, default_value_t = 30.0)]
    progress_seconds: f64,
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

/// The progress line printed when stderr is not a terminal (logs, CI, nohup).
fn progress_line(done: usize, total: usize, elapsed: Duration) -> String {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let eta = if done == 0 {
        "unknown".to_string()
    } else {
        let left = ((total - done) as f64 / rate).round() as u64;
        format!("{}m{:02}s", left / 60, left % 60)
    };
    format!("arbiter-eval: {done}/{total} examples, {rate:.1}/s, ETA {eta}")
}

/// Shows progress: a bar on a terminal, else a line every `every` (a bar drawn into a log file
/// is unreadable, and no output at all looks like a hung run).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    done: Arc<AtomicUsize>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(total: usize, every: Duration) -> Progress {
        let done = Arc::new(AtomicUsize::new(0));
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} examples, {per_sec}, ETA {eta}")
                    .expect("template"),
            );
            return Progress { bar: Some(bar), done, ticker: None };
        }
        let counter = done.clone();
        let ticker = tokio::spawn(async move {
            let t = Instant::now();
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                eprintln!("{}", progress_line(counter.load(Ordering::Relaxed), total, t.elapsed()));
            }
        });
        Progress { bar: None, done, ticker: Some(ticker) }
    }

    fn inc(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        if let Some(t) = self.ticker {
            t.abort();
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    let (version, examples) = dataset::read(&args.data)?;
    let truncation = match args.truncation.as_str() {
        "truncate_content" => pb::Truncation::TruncateContent,
        "truncate" => pb::Truncation::Truncate,
        "error" => pb::Truncation::Error,
        other => bail!("--truncation {other:?}: expected truncate_content, truncate or error"),
    };
    let mut cfg = ClientConfig::new(args.server.clone());
    cfg.token = args.token.clone();
    cfg.timeout = Some(Duration::from_secs_f64(args.timeout));
    if let Some(ca) = &args.tls_ca {
        cfg.tls_ca_pem = Some(std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?);
    }
    let client = Client::connect(cfg).await?;
    let info = client.model_info().await?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let scores_path = args.out.join("scores.jsonl");
    let saved = saved::load(&scores_path, &info.model_fingerprint)?;
    if let Some(n) = saved.torn_bytes {
        eprintln!(
            "arbiter-eval: the last line of {} was cut off by a kill ({n} bytes without a newline); removed it, its example is scored again",
            scores_path.display()
        );
    }
    for line in &saved.unreadable {
        eprintln!("arbiter-eval: line {line} of {} is unreadable; its example is scored again", scores_path.display());
    }
    let key = |e: &Example| (e.subset.clone(), e.id.clone());
    let todo: Vec<Example> = examples.iter().filter(|e| !saved.results.contains_key(&key(e))).cloned().collect();
    eprintln!(
        "arbiter-eval: {} ({:?}): {} examples, {} already scored, model {}{}",
        args.data.display(),
        version,
        examples.len(),
        examples.len() - todo.len(),
        info.model_fingerprint,
        if info.warning.is_empty() { String::new() } else { format!(" ({})", info.warning) }
    );

    let progress = Progress::start(todo.len(), Duration::from_secs_f64(args.progress_seconds.max(0.01)));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&scores_path)
        .with_context(|| format!("opening {}", scores_path.display()))?;
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    type Outcome = Result<(Vec<f32>, bool), String>;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Example, Outcome)>(64);
    let opts = ScoreOptions { truncation, ..Default::default() };
    for e in todo {
        let (client, sem, tx, opts) = (client.clone(), sem.clone(), tx.clone(), opts.clone());
        tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let r = client
                .rank(conversation(&[("user", &e.prompt)]), e.candidates.clone(), &opts)
                .await
                .map(|r| {
                    let cut = r.results.iter().any(|x| x.truncation.is_some_and(|t| t.truncated));
                    (r.results.iter().map(|x| x.reward).collect(), cut)
                })
                .map_err(|err| err.to_string());
            tx.send((e, r)).await.ok();
        });
    }
    drop(tx);
    let mut failed = Vec::new();
    while let Some((e, r)) = rx.recv().await {
        match r {
            Ok((scores, cut)) => {
                let line = saved::line(&e.id, &e.subset, &scores, e.num_correct, cut, &info.model_fingerprint);
                saved::append(&mut file, &scores_path, &line)?;
            }
            Err(msg) => failed.push(format!("{} ({}): {msg}", e.id, e.subset)),
        }
        progress.inc();
    }
    progress.finish();
    for f in &failed {
        eprintln!("arbiter-eval: failed {f}");
    }

    // The report is computed from the file, as a resumed run would see it.
    let saved = saved::load(&scores_path, &info.model_fingerprint)?;
    let covered: Vec<&SavedResult> = examples.iter().filter_map(|e| saved.results.get(&key(e))).collect();
    if covered.len() < examples.len() {
        let missing = examples.len() - covered.len();
        eprintln!(
            "arbiter-eval: {missing} of {} examples have no score ({} failed in this run); run again to retry them (scored ones are kept){}",
            examples.len(),
            failed.len(),
            if args.partial { "; writing a partial report (--partial)" } else { ", or pass --partial for a report over the scored ones" }
        );
        if !args.partial {
            return Ok(ExitCode::from(1));
        }
    }
    let cut = covered.iter().filter(|s| s.truncated).count();
    if cut > 0 {
        eprintln!(
            "arbiter-eval: {cut} examples were longer than the model's {} tokens and cut ({})",
            info.max_input_tokens, args.truncation
        );
    }
    let items: Vec<Scored> = covered.iter().map(|s| s.scored.clone()).collect();
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
    let coverage = Coverage { scored: items.len(), in_data: examples.len(), truncated: cut };
    let (js, md) = render(&args, version, &info, &report, &coverage, published.as_deref());
    std::fs::write(args.out.join("report.json"), serde_json::to_string_pretty(&js)? + "\n")?;
    std::fs::write(args.out.join("report.md"), &md)?;
    print!("{md}");
    Ok(ExitCode::SUCCESS)
}

/// How much of the data a report covers.
struct Coverage {
    scored: usize,
    in_data: usize,
    truncated: usize,
}

fn render(
    args: &Args,
    version: Version,
    info: &pb::ModelInfo,
    r: &Report,
    coverage: &Coverage,
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
        "examples": coverage.scored,
        "examples_in_data": coverage.in_data,
        "partial": coverage.scored < coverage.in_data,
        "truncation": args.truncation,
        "truncated_examples": coverage.truncated,
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
    if coverage.scored < coverage.in_data {
        md.push_str(&format!(
            "> Partial report: {} of the {} examples in the data are scored.\n\n",
            coverage.scored, coverage.in_data
        ));
    }
    if coverage.truncated > 0 {
        md.push_str(&format!(
            "{} of {} examples were cut to the model's {} tokens (`--truncation {}`).\n\n",
            coverage.truncated, coverage.scored, info.max_input_tokens, args.truncation
        ));
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
