//! `arbiter`: serve a reward model over gRPC, score JSON lines, write the demo model, or convert
//! NVIDIA's released Nemotron-4-340B-Reward checkpoint into a model folder.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use arbiter_engine::demo::{write_demo_preset, DemoPreset, DEMO_WARNING};
use arbiter_engine::runtime::LoadedModel;
use arbiter_engine::text::{Prepared, TruncationPolicy};
use arbiter_engine::{EngineError, RewardWeights};
use arbiter_server::jsonl::{error_json, item_weights, parse_item, result_json};
use arbiter_server::model_args::ModelArgs;
use arbiter_server::serve::{start, ServeArgs};
use clap::{Parser, Subcommand, ValueEnum};
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
    /// Python interpreter with the PyPI packages sentencepiece, protobuf and tokenizers, used to
    /// turn the SentencePiece model into tokenizer.json.
    #[arg(long, default_value = "python3", conflicts_with_all = ["tokenizer_dir", "weights_only"])]
    python: PathBuf,
    /// Folder where scripts/spm_to_tokenizer_json.py already wrote tokenizer.json and
    /// sentencepiece_reference.json (for machines where the conversion cannot run Python).
    #[arg(long, conflicts_with = "weights_only")]
    tokenizer_dir: Option<PathBuf>,
    /// Write no tokenizer: the folder then scores token ids only.
    #[arg(long)]
    weights_only: bool,
    /// Largest safetensors shard in bytes (a single larger tensor gets a shard of its own).
    #[arg(long, default_value_t = arbiter_convert::writer::DEFAULT_MAX_SHARD_BYTES)]
    max_shard_bytes: u64,
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
    use arbiter_convert::{ConvertOptions, TokenizerSource};
    let tokenizer = match (args.weights_only, args.tokenizer_dir) {
        (true, _) => TokenizerSource::None,
        (false, Some(d)) => TokenizerSource::Dir(d),
        (false, None) => TokenizerSource::Python(args.python),
    };
    let opts = ConvertOptions {
        input: args.input,
        output: args.output,
        tokenizer_model: args.tokenizer_model,
        tokenizer,
        max_shard_bytes: args.max_shard_bytes.max(1),
        progress: true,
    };
    let report = arbiter_convert::convert(&opts)
        .with_context(|| format!("converting {} into {}", opts.input.display(), opts.output.display()))?;
    let tokenizer = match report.fidelity_checked {
        0 => "no tokenizer (token ids only)".to_string(),
        n => format!("tokenizer.json matches SentencePiece on all {n} corpus entries"),
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

/// A line waiting for its batch: prepared, or already failed.
struct Pending {
    line: usize,
    id: Option<Value>,
    item: Result<(Prepared, RewardWeights), EngineError>,
}

fn score(args: ScoreArgs) -> Result<ExitCode> {
    let model = args.model.load().context("loading the model")?;
    anyhow::ensure!(
        model.worker.is_none(),
        "--node-rank {} is a pipeline worker: workers run under `arbiter serve`; score on the leader (node 0)",
        args.model.node_rank
    );
    let demo = model.spec().demo;
    eprintln!(
        "arbiter: model {} (fingerprint {}, {} backend) loaded in {:.2}s",
        model.dir.display(),
        model.fingerprint,
        model.engine.backend_name(),
        model.load_seconds
    );
    if demo {
        eprintln!("arbiter: warning: {DEMO_WARNING}");
    }
    let reader: Box<dyn BufRead> = if args.input.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
        Box::new(BufReader::new(f))
    };
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => {
            Box::new(BufWriter::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?))
        }
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let bar = indicatif::ProgressBar::new_spinner().with_message("scoring");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} lines scored, {per_sec}, {elapsed} {msg}")
            .expect("a valid template"),
    );

    let head = model.spec().head.clone();
    let (mut pending, mut batch_tokens) = (Vec::<Pending>::new(), 0usize);
    let (mut scored, mut failed) = (0usize, 0usize);
    for (n, line) in reader.lines().enumerate() {
        let line_no = n + 1;
        let line = line.with_context(|| format!("reading line {line_no} of {}", args.input.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let (id, item) = match parse_item(&line) {
            Ok(item) => {
                let prepared = model
                    .preprocessor
                    .prepare(&item.input, item.truncation.unwrap_or(args.truncation))
                    .and_then(|p| Ok((p, item_weights(&head, &item)?)));
                (item.id, prepared)
            }
            Err(e) => (None, Err(e)),
        };
        let tokens = item.as_ref().map_or(0, |(p, _)| p.ids.len());
        if batch_tokens + tokens > args.batch_tokens && batch_tokens > 0 {
            flush(&model, &mut pending, &mut out, demo, &mut scored, &mut failed)?;
            bar.set_position(scored as u64);
            batch_tokens = 0;
        }
        batch_tokens += tokens;
        pending.push(Pending { line: line_no, id, item });
    }
    flush(&model, &mut pending, &mut out, demo, &mut scored, &mut failed)?;
    out.flush().context("writing results")?;
    bar.finish_and_clear();
    eprintln!("arbiter: {scored} lines scored, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Scores the pending lines as one packed batch and writes every line's result in order.
fn flush(
    model: &LoadedModel,
    pending: &mut Vec<Pending>,
    out: &mut dyn Write,
    demo: bool,
    scored: &mut usize,
    failed: &mut usize,
) -> Result<()> {
    let ok: Vec<&(Prepared, RewardWeights)> = pending.iter().filter_map(|p| p.item.as_ref().ok()).collect();
    let scores = if ok.is_empty() {
        Ok(Vec::new())
    } else {
        model.score(&ok.iter().map(|(p, _)| p).collect::<Vec<_>>(), &ok.iter().map(|(_, w)| w).collect::<Vec<_>>())
    };
    let mut scores = match scores {
        Ok(s) => s.into_iter(),
        Err(e) => {
            // The batch failed as a whole: every line in it gets the error, the file goes on.
            let msg = e.to_string();
            for p in pending.iter_mut() {
                if p.item.is_ok() {
                    p.item = Err(EngineError::Backend(msg.clone()));
                }
            }
            Vec::new().into_iter()
        }
    };
    for p in pending.drain(..) {
        let v = match &p.item {
            Ok((prepared, _)) => {
                *scored += 1;
                result_json(p.line, p.id.as_ref(), prepared, &scores.next().expect("one score per prepared item"), demo)
            }
            Err(e) => {
                *failed += 1;
                eprintln!("arbiter: line {}: {e}", p.line);
                error_json(p.line, p.id.as_ref(), e)
            }
        };
        writeln!(out, "{v}").context("writing results")?;
    }
    Ok(())
}
