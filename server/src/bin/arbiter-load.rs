//! `arbiter-load`: a load generator for a running `arbiter serve`.
//!
//! Closed-loop clients send a mix of Score, Rank and ScoreStream requests of varied lengths for a
//! duration or a request count, then the same sequences are run through the engine offline (in
//! this process, with the server idle) to give the ratio of served to offline tokens/s.
//!
//! Each request's kind is drawn by the mix weights (seeded per client), so every kind is sent
//! at any concurrency. Timing starts once the server's health says SERVING; a client that gets
//! UNAVAILABLE backs off before its next request, so a server still warming up or draining is
//! not flooded and its refusals do not dominate the run.
//!
//! arbiter-load --addr http://127.0.0.1:50051 --demo --concurrency 32 --duration 20
//!
//! With `--shared-prefix N` the requests are groups (N shared tokens, then each item's own):
//! served tokens/s counts every item's full length, so a server that computes the prefix once
//! shows the gain against the offline run, which packs every sequence whole.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use arbiter_engine::sync::lock;
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
    /// Grouped workload: every Score / ScoreStream request's items start with the same this
    /// many tokens, and Rank prompts are about this long (GRPO-like groups; 0: no shared prompt).
    /// Compare a server with sharing on and off (`arbiter serve --shared-prefix-min 0`).
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    /// Token budget of one offline batch (use the server's --max-batch-tokens).
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
    /// Label of the model in the table.
    #[arg(long, default_value = "model")]
    label: String,
    /// Bearer token, if the server requires one.
    #[arg(long, env = "ARBITER_AUTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Random seed of the inputs and of the request kinds.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds to wait for the server to be reachable and SERVING before giving up.
    #[arg(long, default_value_t = 600.0)]
    ready_timeout: f64,
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
    let model = args.model.load().context("for the offline comparison")?;
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
                    let id = |rng: &mut SplitMix| 7 + (rng.next_u64() % (vocab - 7)) as u32;
                    let prefix: Vec<u32> = (0..args.shared_prefix).map(|_| id(&mut rng)).collect();
                    let mut seqs: Vec<Vec<u32>> = Vec::with_capacity(args.items);
                    for _ in 0..args.items {
                        let n = len(&mut rng);
                        seqs.push(prefix.iter().copied().chain((0..n).map(|_| id(&mut rng))).collect());
                    }
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
                    let n = if args.shared_prefix > 0 { args.shared_prefix * 2 / 3 } else { len(&mut rng) / 3 };
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
    let t = lock(&tally);

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

/// Draws a request kind by the mix weights.
fn draw(mix: &[(Kind, usize)], total_weight: usize, rng: &mut SplitMix) -> Kind {
    let mut slot = (rng.next_u64() % total_weight as u64) as usize;
    for &(kind, w) in mix {
        if slot < w {
            return kind;
        }
        slot -= w;
    }
    unreachable!("slot is below the sum of the weights")
}

/// Connects and waits until the health service says SERVING, so that the load's clock does not
/// count a server still loading or warming up.
async fn wait_until_serving(addr: &str, timeout: Duration) -> Result<Channel> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let start = Instant::now();
    let mut said = false;
    loop {
        let last = match Channel::from_shared(addr.to_string())?.connect().await {
            Ok(channel) => {
                let service = arbiter_server::serve::SERVICE_NAME.to_string();
                match HealthClient::new(channel.clone()).check(HealthCheckRequest { service }).await {
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(channel),
                    Ok(r) => format!("health says {:?}", ServingStatus::try_from(r.get_ref().status)),
                    Err(e) => format!("health check failed: {}", e.message()),
                }
            }
            Err(e) => {
                // tonic's Display is only "transport error"; the cause says what went wrong.
                let cause = std::error::Error::source(&e).map(|c| format!(": {c}")).unwrap_or_default();
                format!("cannot connect: {e}{cause}")
            }
        };
        if start.elapsed() > timeout {
            bail!("{addr} was not SERVING after {:.0} s ({last})", timeout.as_secs_f64());
        }
        if !said {
            eprintln!("arbiter-load: waiting for {addr} to be SERVING ({last})");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Backoff after UNAVAILABLE: doubling from 10 ms to 1 s, reset by a success.
fn backoff(unavailable_in_a_row: u32) -> Duration {
    Duration::from_millis(10u64 << unavailable_in_a_row.min(7)).min(Duration::from_secs(1))
}

async fn run_load(
    args: &Args,
    mix: &[(Kind, usize)],
    templates: Arc<Vec<Template>>,
    tally: Arc<Mutex<Tally>>,
) -> Result<f64> {
    let channel = wait_until_serving(&args.addr, Duration::from_secs_f64(args.ready_timeout)).await?;
    let token = args.token.clone().map(|t| format!("Bearer {t}"));
    let stop = Arc::new(AtomicBool::new(false));
    let budget = args.requests.map(|n| Arc::new(std::sync::atomic::AtomicUsize::new(n)));
    let total_weight: usize = mix.iter().map(|(_, w)| w).sum();
    let by_kind: Arc<BTreeMap<Kind, Vec<usize>>> =
        Arc::new(templates.iter().enumerate().fold(BTreeMap::new(), |mut m, (i, t)| {
            m.entry(t.kind).or_insert_with(Vec::new).push(i);
            m
        }));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        let mix = mix.to_vec();
        let (templates, by_kind, tally, stop, budget, token) =
            (templates.clone(), by_kind.clone(), tally.clone(), stop.clone(), budget.clone(), token.clone());
        let mut client = RewardServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
            if let Some(t) = &token {
                r.metadata_mut().insert("authorization", t.parse().expect("ASCII token"));
            }
            Ok(r)
        })
        .max_decoding_message_size(256 << 20);
        // Each client its own stream of draws, reproducible from --seed.
        let mut rng = SplitMix::new(args.seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        tasks.push(tokio::spawn(async move {
            // A client's ScoreStream, opened on its first stream request and reopened after one ends.
            let mut stream: Option<(tokio::sync::mpsc::Sender<pb::ScoreStreamRequest>, tonic::Streaming<_>)> = None;
            let mut unavailable = 0u32;
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(b) = &budget {
                    if b.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_err() {
                        break;
                    }
                }
                let kind = draw(&mix, total_weight, &mut rng);
                let mine = &by_kind[&kind];
                let ti = mine[(rng.next_u64() % mine.len() as u64) as usize];
                k += 1;
                let t = &templates[ti];
                let sent = Instant::now();
                let result: Result<Vec<pb::Result>, tonic::Code> = match kind {
                    Kind::Score => client
                        .score(t.score.clone().expect("score template"))
                        .await
                        .map(|r| r.into_inner().results)
                        .map_err(|e| e.code()),
                    Kind::Rank => client
                        .rank(t.rank.clone().expect("rank template"))
                        .await
                        .map(|r| r.into_inner().results)
                        .map_err(|e| e.code()),
                    Kind::Stream => {
                        if stream.is_none() {
                            let (tx, rx) = tokio::sync::mpsc::channel::<pb::ScoreStreamRequest>(1);
                            let opened = client.score_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
                            stream = opened.ok().map(|r| (tx, r.into_inner()));
                        }
                        let reply = match stream.as_mut() {
                            Some((tx, s)) => {
                                tx.send(pb::ScoreStreamRequest {
                                    request_id: format!("{c}-{k}"),
                                    request: t.score.clone(),
                                })
                                .await
                                .ok();
                                match s.message().await {
                                    Ok(Some(m)) => match m.outcome {
                                        Some(pb::score_stream_response::Outcome::Response(r)) => Ok(r.results),
                                        Some(pb::score_stream_response::Outcome::Error(e)) => {
                                            Err(tonic::Code::from(e.code))
                                        }
                                        None => Err(tonic::Code::Internal),
                                    },
                                    Ok(None) => Err(tonic::Code::Aborted),
                                    Err(e) => Err(e.code()),
                                }
                            }
                            None => Err(tonic::Code::Unavailable),
                        };
                        if reply.is_err() {
                            stream = None;
                        }
                        reply
                    }
                };
                let ms = sent.elapsed().as_secs_f64() * 1e3;
                let code = {
                    let mut tl = lock(&tally);
                    match result {
                        Ok(results) => {
                            tl.latencies_ms.push(ms);
                            tl.items += results.len() as u64;
                            tl.tokens += results.iter().map(|r| r.tokens as u64).sum::<u64>();
                            *tl.by_kind.entry(format!("{kind:?}")).or_default() += 1;
                            tl.sent_sequences.push(ti);
                            None
                        }
                        Err(code) => {
                            *tl.errors.entry(format!("{code:?}")).or_default() += 1;
                            Some(code)
                        }
                    }
                };
                if code == Some(tonic::Code::Unavailable) {
                    tokio::time::sleep(backoff(unavailable)).await;
                    unavailable += 1;
                } else {
                    unavailable = 0;
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
