//! `arbiter`: serve a reward model over gRPC, score JSON lines, write the demo model, or convert
//! NVIDIA's released Nemotron-4-340B-Reward checkpoint into a model folder.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use arbiter_engine::demo::{write_demo_preset, DemoPreset, DEMO_WARNING};
use arbiter_engine::spec::HeadSpec;
use arbiter_engine::text::TruncationPolicy;
use arbiter_scoring::{BatchConfig, Item, ItemScore, Options, ScoreError, Scorer, ScorerConfig};
use arbiter_server::field::BadField;
use arbiter_server::jsonl::{error_json, item_weights, parse_item, result_json};
use arbiter_server::model_args::ModelArgs;
use arbiter_server::serve::{start, ServeArgs};
use clap::{Parser, Subcommand, ValueEnum};

mod quantize_cmd;
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "arbiter",
    version,
    about = "Reward-model scoring: Nemotron-4-340B-Reward and Llama-family reward models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over gRPC (health, reflection, Prometheus metrics on their own port).
    Serve {
        #[command(flatten)]
        args: Box<ServeArgs>,
        /// Log format: "text" or "json".
        #[arg(long, env = "ARBITER_LOG_FORMAT", default_value = "text")]
        log_format: LogFormat,
    },
    /// Score a JSON-lines file: one result line per input line, in order.
    Score(ScoreArgs),
    /// Convert the released Nemotron-4-340B-Reward checkpoint (NeMo/Megatron zarr) into a model folder.
    Convert(ConvertArgs),
    /// Write the FP8 version of a model folder (e4m3 linear layers, per-channel scales).
    Quantize(quantize_cmd::QuantizeArgs),
    /// Write the demo model (random weights, real tokenizer) to a folder.
    DemoModel {
        /// Folder to write (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// Size: "demo" (what --demo serves) or "bench-small" (the CPU benchmark's config).
        #[arg(long, default_value = "demo")]
        preset: DemoPreset,
    },
}

/// Flags of `arbiter score`.
#[derive(clap::Args)]
struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Input file, one JSON object per line with `messages`, `text` or `token_ids` ("-": standard input).
    #[arg(long)]
    input: PathBuf,
    /// Output file (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Truncation policy for lines that do not set one: "error", "truncate" or "truncate_content".
    #[arg(long, env = "ARBITER_TRUNCATION", default_value = "error")]
    truncation: TruncationPolicy,
    /// Tokens per packed batch.
    #[arg(long, env = "ARBITER_MAX_BATCH_TOKENS", default_value_t = 8192)]
    batch_tokens: usize,
    /// Score every conversation after each assistant turn too (lines may set "per_turn" themselves;
    /// docs/per-turn.md).
    #[arg(long)]
    per_turn: bool,
}

/// Flags of `arbiter convert` (docs/convert.md).
#[derive(clap::Args)]
struct ConvertArgs {
    /// The released checkpoint folder: model_config.yaml, model_weights/, the SentencePiece .model file.
    #[arg(long)]
    input: PathBuf,
    /// The model folder to write (new, or empty).
    #[arg(long)]
    output: PathBuf,
    /// The SentencePiece model (default: the file model_config.yaml's tokenizer.model names, in --input).
    #[arg(long)]
    tokenizer_model: Option<PathBuf>,
    /// Python interpreter with the PyPI package sentencepiece, which checks the tokenizer.json
    /// arbiter builds against SentencePiece (default: python3 if it has sentencepiece, else the
    /// tokenizer is written unverified).
    #[arg(long, conflicts_with_all = ["tokenizer_dir", "weights_only"])]
    python: Option<PathBuf>,
    /// Folder where scripts/spm_to_tokenizer_json.py already wrote tokenizer.json and
    /// sentencepiece_reference.json (a tokenizer checked against SentencePiece on another machine).
    #[arg(long, conflicts_with = "weights_only")]
    tokenizer_dir: Option<PathBuf>,
    /// Write no tokenizer: the folder then scores token ids only.
    #[arg(long)]
    weights_only: bool,
    /// Largest safetensors shard in bytes (a single larger tensor gets a shard of its own).
    #[arg(long, default_value_t = arbiter_convert::writer::DEFAULT_MAX_SHARD_BYTES)]
    max_shard_bytes: u64,
    /// Weight format of the linear layers: "bf16" (as released) or "fp8" (e4m3 with
    /// per-channel scales, half the size: the 340B model on 8 x 80 GB; docs/fp8.md).
    #[arg(long, default_value = "bf16")]
    weights: WeightsFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WeightsFormat {
    Bf16,
    Fp8,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { args, log_format } => serve(*args, log_format),
        Command::Score(args) => score(args),
        Command::Convert(args) => convert(args),
        Command::Quantize(args) => quantize_cmd::run(args).map_err(anyhow::Error::from),
        Command::DemoModel { out, preset } => write_demo_preset(&out, preset)
            .map(|()| {
                eprintln!("wrote the demo model to {} ({DEMO_WARNING})", out.display());
                ExitCode::SUCCESS
            })
            .with_context(|| format!("writing the demo model to {}", out.display())),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("arbiter: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn convert(args: ConvertArgs) -> Result<ExitCode> {
    use arbiter_convert::{ConvertOptions, TokenizerOutcome, TokenizerSource, Verification};
    let tokenizer = match (args.weights_only, args.tokenizer_dir, args.python) {
        (true, _, _) => TokenizerSource::None,
        (false, Some(d), _) => TokenizerSource::Dir(d),
        (false, None, Some(p)) => TokenizerSource::Build(Verification::Python(p)),
        (false, None, None) => TokenizerSource::Build(Verification::IfAvailable),
    };
    let opts = ConvertOptions {
        input: args.input,
        output: args.output,
        tokenizer_model: args.tokenizer_model,
        tokenizer,
        max_shard_bytes: args.max_shard_bytes.max(1),
        progress: true,
        fp8: args.weights == WeightsFormat::Fp8,
    };
    let report = arbiter_convert::convert(&opts)
        .with_context(|| format!("converting {} into {}", opts.input.display(), opts.output.display()))?;
    let tokenizer = match report.tokenizer {
        TokenizerOutcome::None => "no tokenizer (token ids only)".to_string(),
        TokenizerOutcome::Verified(n) => format!("tokenizer.json matches SentencePiece on all {n} corpus entries"),
        TokenizerOutcome::NotVerified(why) => format!(
            "tokenizer not verified against SentencePiece: {why}; pass --python with an interpreter that has \
             `pip install sentencepiece` to check it id for id"
        ),
    };
    eprintln!(
        "arbiter: wrote {} ({} tensors, {:.2} GB in {} shard(s); {tokenizer}) in {:.1}s",
        opts.output.display(),
        report.tensors,
        report.bytes as f64 / 1e9,
        report.shards,
        report.seconds
    );
    Ok(ExitCode::SUCCESS)
}

fn serve(args: ServeArgs, log_format: LogFormat) -> Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("arbiter-grpc").build()?;
    let result = runtime.block_on(async move {
        let running = start(args).await?;
        let stop = running.stop_handle();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: shutting down gracefully");
            stop.stop();
        });
        running.wait().await
    });
    // A warm-up interrupted by the signal may still be computing: do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.ok();
}

/// One input line: the item to score, or why it cannot be.
struct Line {
    line: usize,
    id: Option<Value>,
    item: Result<Item, BadField>,
}

/// Lines handed to the scorer together. Several chunks are in flight at once, so the next ones
/// are tokenized and queued while a batch computes; at most `CHUNKS_IN_FLIGHT * CHUNK_LINES` items
/// are queued, below the queue's capacity, and the scorer waits for space rather than refuse.
const CHUNK_LINES: usize = 64;
const CHUNKS_IN_FLIGHT: usize = 8;

fn score(args: ScoreArgs) -> Result<ExitCode> {
    let model = args.model.load()?;
    anyhow::ensure!(
        model.worker.is_none(),
        "--node-rank {} is a pipeline worker: workers run under `arbiter serve`; score on the leader (node 0)",
        args.model.node_rank
    );
    eprintln!(
        "arbiter: model {} (fingerprint {}, {} backend) loaded in {:.2}s",
        model.dir.display(),
        model.fingerprint,
        model.engine.backend_name(),
        model.load_seconds
    );
    if model.spec().demo {
        eprintln!("arbiter: warning: {DEMO_WARNING}");
    }
    let reader: Box<dyn BufRead> = if args.input.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
        Box::new(BufReader::new(f))
    };
    let out: Box<dyn Write> = match &args.output {
        Some(p) => {
            Box::new(BufWriter::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?))
        }
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    // Tokenizing overlaps compute; on a machine with few cores a second tokenization worker only
    // takes a core from the GEMMs (measured on 2 cores: docs/bench-serve.md).
    let tokenization_workers = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).clamp(1, 2));
    let cfg = ScorerConfig {
        batch: BatchConfig {
            max_batch_tokens: args.batch_tokens,
            queue_capacity: CHUNKS_IN_FLIGHT * CHUNK_LINES,
            ..BatchConfig::default()
        },
        tokenization_workers,
    };
    let scorer = Arc::new(Scorer::start(model, cfg, None).context("starting the engine threads")?);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let result = runtime.block_on(score_lines(&scorer, &args, reader, out));
    scorer.shutdown();
    let (scored, failed) = result?;
    eprintln!("arbiter: {scored} lines scored, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Reads, scores and writes every line in input order; returns (scored, failed) counts.
async fn score_lines(
    scorer: &Arc<Scorer>,
    args: &ScoreArgs,
    reader: Box<dyn BufRead>,
    mut out: Box<dyn Write>,
) -> Result<(usize, usize)> {
    let head = scorer.model().spec().head.clone();
    let demo = scorer.model().spec().demo;
    let bar = indicatif::ProgressBar::new_spinner().with_message("scoring");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} lines scored, {per_sec}, {elapsed} {msg}")
            .expect("a valid template"),
    );
    let mut in_flight = std::collections::VecDeque::new();
    let (mut scored, mut failed) = (0usize, 0usize);
    let mut write_chunk = |(lines, results): (Vec<Line>, Vec<Result<ItemScore, ScoreError>>)| -> Result<()> {
        let mut results = results.into_iter();
        for l in lines {
            let v = match l.item {
                Ok(_) => match results.next().expect("one result per item") {
                    Ok(s) => {
                        scored += 1;
                        result_json(l.line, l.id.as_ref(), &s, demo)
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("arbiter: line {}: {e}", l.line);
                        error_json(l.line, l.id.as_ref(), &e)
                    }
                },
                Err(e) => {
                    failed += 1;
                    eprintln!("arbiter: line {}: {e}", l.line);
                    error_json(l.line, l.id.as_ref(), &e)
                }
            };
            writeln!(out, "{v}").context("writing results")?;
        }
        bar.set_position(scored as u64);
        Ok(())
    };
    let mut chunk = Vec::with_capacity(CHUNK_LINES);
    let mut lines = reader.lines().enumerate();
    loop {
        let next = lines.next();
        if let Some((n, line)) = next.as_ref().map(|(n, l)| (*n, l)) {
            let line_no = n + 1;
            let line = line
                .as_ref()
                .map_err(|e| anyhow::anyhow!("reading line {line_no} of {}: {e}", args.input.display()))?;
            if !line.trim().is_empty() {
                chunk.push(parse_line(line_no, line, &head, args.truncation, args.per_turn));
            }
        }
        if chunk.len() == CHUNK_LINES || (next.is_none() && !chunk.is_empty()) {
            let lines = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_LINES));
            let items: Vec<Item> = lines.iter().filter_map(|l| l.item.as_ref().ok().cloned()).collect();
            let s = scorer.clone();
            let opts = Options { deadline: None, wait_for_space: true };
            in_flight.push_back(tokio::spawn(async move { (lines, s.score_each(items, opts).await) }));
            if in_flight.len() == CHUNKS_IN_FLIGHT {
                write_chunk(in_flight.pop_front().expect("a chunk in flight").await?)?;
            }
        }
        if next.is_none() {
            break;
        }
    }
    while let Some(chunk) = in_flight.pop_front() {
        write_chunk(chunk.await?)?;
    }
    out.flush().context("writing results")?;
    bar.finish_and_clear();
    Ok((scored, failed))
}

/// Parses one input line into the item to score, with its truncation policy, weights and
/// whether it is scored per turn.
fn parse_line(line: usize, text: &str, head: &HeadSpec, default_truncation: TruncationPolicy, per_turn: bool) -> Line {
    match parse_item(text) {
        Ok(item) => {
            let weights = item_weights(head, &item);
            let truncation = item.truncation.unwrap_or(default_truncation);
            let per_turn = item.per_turn.unwrap_or(per_turn);
            let scored = weights.map(|w| Item { input: item.input, truncation, weights: Some(w), per_turn });
            Line { line, id: item.id, item: scored }
        }
        Err(e) => Line { line, id: None, item: Err(e) },
    }
}
