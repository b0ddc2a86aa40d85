//! `arbiter-load`: a load generator for a running `arbiter serve`.
//!
//! Closed-loop clients send a mix of Score, Rank and ScoreStream requests of varied lengths for a
//! duration or a request count, then the same sequences are run through the engine offline (in
//! this process, with the server idle) to give the ratio of served to offline tokens/s.
//!
//! arbiter-load --addr http://127.0.0.1:50051 --demo --concurrency 32 --duration 20

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbiter_engine::synth::SplitMix;
use arbiter_engine::text::{Input, Message, Role, TruncationPolicy};
use arbiter_engine::PackedBatch;
use arbiter_proto::v1 as pb;
use arbiter_server::model_args::ModelArgs;
use clap::Parser;
use pb::reward_service_client::RewardServiceClient;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "arbiter-load", about = "Load generator for arbiter serve; compares served and offline tokens/s")]
struct Args {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The model the server serves, loaded here for the offline comparison and to count tokens.
    #[command(flatten)]
    model: ModelArgs,
    /// Concurrent clients (each one request at a time).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds to run (ignored when --requests is given).
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Total requests to send instead of a duration.
    #[arg(long)]
    requests: Option<usize>,
    /// Request mix as weights, e.g. "score=6,rank=2,stream=2".
    #[arg(long, default_value = "score=6,rank=2,stream=2")]
    mix: String,
    /// Items per Score / ScoreStream request, candidates per Rank request.
    #[arg(long, default_value_t = 4)]
    items: usize,
    /// Shortest and longest input in tokens, e.g. "32..512".
    #[arg(long, default_value = "32..512")]
    lengths: String,
    /// Token budget of one offline batch (use the server's --max-batch-tokens).
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
    /// Label of the model in the table.
    #[arg(long, default_value = "model")]
    label: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "ARBITER_AUTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Random seed of the inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Score,
    Rank,
    Stream,
}

/// One request template and the token sequences the server will score for it.
struct Template {
    kind: Kind,
    score: Option<pb::ScoreRequest>,
    rank: Option<pb::RankRequest>,
    sequences: Vec<Vec<u32>>,
}

#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    items: u64,
    tokens: u64,
    errors: BTreeMap<String, u64>,
    by_kind: BTreeMap<String, u64>,
    sent_sequences: Vec<usize>, // template indices of successful requests
}

fn parse_mix(s: &str) -> Result<Vec<(Kind, usize)>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let (k, w) = part.split_once('=').with_context(|| format!("--mix part {part:?}: expected kind=weight"))?;
        let kind = match k.trim() {
            "score" => Kind::Score,
            "rank" => Kind::Rank,
            "stream" => Kind::Stream,
            other => bail!("--mix: unknown kind {other:?} (score, rank, stream)"),
        };
        out.push((kind, w.trim().parse().with_context(|| format!("--mix weight {w:?}"))?));
    }
    if out.iter().all(|(_, w)| *w == 0) {
        bail!("--mix: all weights are zero");
    }
    Ok(out)
}

fn words(rng: &mut SplitMix, n: usize) -> String {
    const W: [&str; 16] = [
        "the", "model", "reward", "answer", "question", "helpful", "correct", "data", "python", "paris", "number",
        "because", "explain", "short", "poem", "sea",
    ];
    (0..n).map(|_| W[(rng.next_u64() % 16) as usize]).collect::<Vec<_>>().join(" ")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (lo, hi) = args.lengths.split_once("..").context("--lengths: expected MIN..MAX")?;
    let (lo, hi): (usize, usize) = (lo.parse()?, hi.parse()?);
    if lo == 0 || hi < lo {
        bail!("--lengths {lo}..{hi}: need 1 <= MIN <= MAX");
    }
    let mix = parse_mix(&args.mix)?;
    let model = args.model.load().context("loading the model for the offline comparison")?;
    let vocab = model.spec().vocab as u64;
    let pre = &model.preprocessor;

    // Templates: 64 per kind, deterministic.
    let mut rng = SplitMix::new(args.seed);
    let mut templates = Vec::new();
    for &(kind, _) in &mix {
        for _ in 0..64 {
            let len = |rng: &mut SplitMix| lo + (rng.next_u64() as usize) % (hi - lo + 1);
            match kind {
                Kind::Score | Kind::Stream => {
                    let seqs: Vec<Vec<u32>> = (0..args.items)
                        .map(|_| (0..len(&mut rng)).map(|_| 7 + (rng.next_u64() % (vocab - 7)) as u32).collect())
                        .collect();
                    let items = seqs
                        .iter()
                        .map(|s| pb::Item { input: Some(pb::item::Input::TokenIds(pb::TokenIds { ids: s.clone() })) })
                        .collect();
                    templates.push(Template {
                        kind,
                        score: Some(pb::ScoreRequest { items, ..Default::default() }),
                        rank: None,
                        sequences: seqs,
                    });
                }
                Kind::Rank => {
                    // Roughly len tokens: the template adds ~40, a word is 1-2 tokens.
                    let n = len(&mut rng) / 3;
                    let prompt = words(&mut rng, n);
                    let cands: Vec<String> = (0..args.items)
                        .map(|_| {
                            let n = len(&mut rng) / 3;
                            words(&mut rng, n)
                        })
                        .collect();
                    let sequences = cands
                        .iter()
                        .map(|c| {
                            let conv = vec![
                                Message::new(Role::User, prompt.clone()),
                                Message::new(Role::Assistant, c.clone()),
                            ];
                            pre.prepare(&Input::Messages(conv), TruncationPolicy::Truncate).map(|p| p.ids)
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .context("the model cannot template Rank requests; use --mix score=1,stream=1")?;
                    let rank = pb::RankRequest {
                        prompt: Some(pb::Conversation {
                            messages: vec![pb::Message { role: "user".into(), content: prompt }],
                        }),
                        candidates: cands,
                        truncation: pb::Truncation::Truncate as i32,
                        ..Default::default()
                    };
                    templates.push(Template { kind, score: None, rank: Some(rank), sequences });
                }
            }
        }
    }
    let templates = Arc::new(templates);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let elapsed = runtime.block_on(run_load(&args, &mix, templates.clone(), tally.clone()))?;
    let t = tally.lock().expect("tally");

    // Offline: the same sequences through the engine in packed batches, server idle.
    let mut seqs: Vec<&[u32]> = Vec::new();
    for &i in &t.sent_sequences {
        seqs.extend(templates[i].sequences.iter().map(Vec::as_slice));
    }
    let offline_tokens: usize = seqs.iter().map(|s| s.len()).sum();
    let start = Instant::now();
    let mut batch: Vec<&[u32]> = Vec::new();
    let mut in_batch = 0;
    for s in seqs {
        if in_batch + s.len() > args.batch_tokens && !batch.is_empty() {
            model.engine.forward(&PackedBatch::from_sequences(&batch)?)?;
            batch.clear();
            in_batch = 0;
        }
        in_batch += s.len();
        batch.push(s);
    }
    if !batch.is_empty() {
        model.engine.forward(&PackedBatch::from_sequences(&batch)?)?;
    }
    let offline_secs = start.elapsed().as_secs_f64();

    let mut lat = t.latencies_ms.clone();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| if lat.is_empty() { f64::NAN } else { lat[((lat.len() - 1) as f64 * p).round() as usize] };
    let requests = lat.len() as f64;
    let served_tps = t.tokens as f64 / elapsed;
    let offline_tps = offline_tokens as f64 / offline_secs;
    let errors = if t.errors.is_empty() {
        "none".into()
    } else {
        t.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
    };
    let mix_done = t.by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
    println!("| model | concurrency | requests ({mix_done}) | s | req/s | items/s | tokens/s | p50 ms | p95 ms | p99 ms | errors | offline tokens/s | served / offline |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.0} | {:.2} |",
        args.label,
        args.concurrency,
        requests,
        elapsed,
        requests / elapsed,
        t.items as f64 / elapsed,
        served_tps,
        pct(0.50),
        pct(0.95),
        pct(0.99),
        errors,
        offline_tps,
        served_tps / offline_tps
    );
    if t.sent_sequences.is_empty() {
        bail!("no request succeeded");
    }
    Ok(())
}

async fn run_load(
    args: &Args,
    mix: &[(Kind, usize)],
    templates: Arc<Vec<Template>>,
    tally: Arc<Mutex<Tally>>,
) -> Result<f64> {
    let channel = Channel::from_shared(args.addr.clone())?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let token = args.token.clone().map(|t| format!("Bearer {t}"));
    let stop = Arc::new(AtomicBool::new(false));
    let budget = args.requests.map(|n| Arc::new(std::sync::atomic::AtomicUsize::new(n)));
    let total_weight: usize = mix.iter().map(|(_, w)| w).sum();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        // Client c gets a kind by weighted round robin.
        let mut slot = c % total_weight;
        let kind = mix
            .iter()
            .find(|(_, w)| {
                if slot < *w {
                    true
                } else {
                    slot -= w;
                    false
                }
            })
            .map(|(k, _)| *k)
            .expect("weights");
        let mine: Vec<usize> = (0..templates.len()).filter(|&i| templates[i].kind == kind).collect();
        let (templates, tally, stop, budget, token) =
            (templates.clone(), tally.clone(), stop.clone(), budget.clone(), token.clone());
        let mut client = RewardServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
            if let Some(t) = &token {
                r.metadata_mut().insert("authorization", t.parse().expect("ASCII token"));
            }
            Ok(r)
        })
        .max_decoding_message_size(256 << 20);
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::ScoreStreamRequest>(1);
            let mut stream = if kind == Kind::Stream {
                Some(client.score_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map(|r| r.into_inner()))
            } else {
                None
            };
            let mut k = c;
            while !stop.load(Ordering::Relaxed) {
                if let Some(b) = &budget {
                    if b.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_err() {
                        break;
                    }
                }
                let ti = mine[k % mine.len()];
                k += 1;
                let t = &templates[ti];
                let sent = Instant::now();
                let result: Result<Vec<pb::Result>, String> = match kind {
                    Kind::Score => client
                        .score(t.score.clone().expect("score template"))
                        .await
                        .map(|r| r.into_inner().results)
                        .map_err(|e| format!("{:?}", e.code())),
                    Kind::Rank => client
                        .rank(t.rank.clone().expect("rank template"))
                        .await
                        .map(|r| r.into_inner().results)
                        .map_err(|e| format!("{:?}", e.code())),
                    Kind::Stream => match stream.as_mut() {
                        Some(Ok(s)) => {
                            tx.send(pb::ScoreStreamRequest { request_id: k.to_string(), request: t.score.clone() })
                                .await
                                .ok();
                            match s.message().await {
                                Ok(Some(m)) => match m.outcome {
                                    Some(pb::score_stream_response::Outcome::Response(r)) => Ok(r.results),
                                    Some(pb::score_stream_response::Outcome::Error(e)) => {
                                        Err(format!("{:?}", tonic::Code::from(e.code)))
                                    }
                                    None => Err("empty stream response".into()),
                                },
                                Ok(None) => Err("stream ended".into()),
                                Err(e) => Err(format!("{:?}", e.code())),
                            }
                        }
                        Some(Err(e)) => Err(format!("{:?}", e.code())),
                        None => unreachable!("stream clients open a stream"),
                    },
                };
                let ms = sent.elapsed().as_secs_f64() * 1e3;
                let mut tl = tally.lock().expect("tally");
                match result {
                    Ok(results) => {
                        tl.latencies_ms.push(ms);
                        tl.items += results.len() as u64;
                        tl.tokens += results.iter().map(|r| r.tokens as u64).sum::<u64>();
                        *tl.by_kind.entry(format!("{kind:?}")).or_default() += 1;
                        tl.sent_sequences.push(ti);
                    }
                    Err(code) => {
                        *tl.errors.entry(code).or_default() += 1;
                        if kind == Kind::Stream {
                            break;
                        }
                    }
                }
            }
        }));
    }
    if args.requests.is_none() {
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        stop.store(true, Ordering::Relaxed);
    }
    for t in tasks {
        t.await?;
    }
    Ok(start.elapsed().as_secs_f64())
}
