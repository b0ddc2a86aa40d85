//! Operating the service as a separate process: health transitions, reflection, the Prometheus
//! scrape against the exact requests sent, and SIGTERM under load.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter_proto::v1 as pb;
use common::process::{parse_prometheus, value, ServerProcess};
use common::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

async fn reflection_services(addr: std::net::SocketAddr) -> (Vec<String>, usize) {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut c = ServerReflectionClient::new(ch);
    let reqs = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol("arbiter.v1.RewardService".into())),
        },
    ];
    let mut s = c.server_reflection_info(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let (mut names, mut files) = (Vec::new(), 0);
    while let Some(r) = s.message().await.unwrap() {
        match r.message_response.unwrap() {
            MessageResponse::ListServicesResponse(l) => names = l.service.into_iter().map(|s| s.name).collect(),
            MessageResponse::FileDescriptorResponse(f) => files = f.file_descriptor_proto.len(),
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }
    (names, files)
}

fn long_ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 7 + (i * 31 + salt) % 2000).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_reflection_and_sigterm_under_load() {
    // A large warm-up keeps the server in NOT_SERVING long enough to be seen.
    let mut server = ServerProcess::spawn(&[
        "--max-input-tokens",
        "512",
        "--max-batch-tokens",
        "32768",
        "--max-batch-requests",
        "64",
        "--shutdown-grace-seconds",
        "60",
    ]);
    let seen = server.wait_serving().await;
    assert_eq!(seen, [ServingStatus::NotServing, ServingStatus::Serving], "loading -> SERVING");
    assert_eq!(server.health("").await, Some(ServingStatus::Serving));

    let (names, files) = reflection_services(server.addr).await;
    for want in ["arbiter.v1.RewardService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(names.iter().any(|n| n == want), "reflection lists {want}: {names:?}");
    }
    assert!(files >= 1, "reflection returns the descriptor of arbiter.v1.RewardService");

    // Load: clients sending requests back to back until the server is gone.
    let addr = server.addr;
    let signalled = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for k in 0..8u32 {
        let signalled = signalled.clone();
        clients.push(tokio::spawn(async move {
            let mut outcomes = Vec::new(); // (sent after the signal, code)
            let mut c = client(addr).await;
            for round in 0..10_000u32 {
                let after = signalled.load(Ordering::SeqCst);
                let items = (0..4).map(|j| ids_item(&long_ids(400, k * 1000 + round * 4 + j))).collect();
                let code = match c.score(score_req(items)).await {
                    Ok(r) => {
                        assert_eq!(r.into_inner().results.len(), 4);
                        Code::Ok
                    }
                    Err(e) => {
                        if e.code() != Code::Unavailable {
                            eprintln!("client {k} round {round}: {e:?}");
                        }
                        e.code()
                    }
                };
                outcomes.push((after, code));
                if after && code == Code::Unavailable {
                    break;
                }
                if round > 5000 {
                    panic!("the server never stopped answering");
                }
            }
            outcomes
        }));
    }
    // A big request in flight when the signal arrives: 48 x 512 tokens.
    let big = tokio::spawn(async move {
        let mut c = client(addr).await;
        c.score(score_req((0..48).map(|j| ids_item(&long_ids(512, 99_000 + j))).collect())).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.sigterm();
    signalled.store(true, Ordering::SeqCst);
    let signal_at = Instant::now();
    // While accepted requests drain, health says NOT_SERVING (or the process is already gone).
    let mut during = None;
    while during.is_none() && signal_at.elapsed() < Duration::from_secs(5) {
        during = server.health("arbiter.v1.RewardService").await.filter(|s| *s != ServingStatus::Serving);
    }
    assert_eq!(during, Some(ServingStatus::NotServing), "health during the drain");

    let big = big.await.unwrap();
    assert_eq!(big.expect("the request in flight at the signal is answered").into_inner().results.len(), 48);
    for c in clients {
        for (after, code) in c.await.unwrap() {
            assert!(code == Code::Ok || code == Code::Unavailable, "only answers or UNAVAILABLE, got {code:?}");
            if !after {
                assert_eq!(code, Code::Ok, "requests before the signal are answered");
            }
        }
    }
    assert_eq!(server.wait_exit(Duration::from_secs(60)), Some(0), "exit status; log:\n{}", server.log_text());
    assert!(server.log_text().contains("draining"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_scrape_agrees_exactly_with_the_requests_sent() {
    let server = ServerProcess::spawn(&[
        "--auth-token",
        "tok",
        "--queue-capacity",
        "40",
        "--max-batch-tokens",
        "1024",
        "--max-message-bytes",
        "1048576",
    ]);
    server.wait_serving().await;
    let ch =
        tonic::transport::Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let with_token = |token: &str| {
        let v: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", v.clone());
            Ok(r)
        }
    };
    let mut c = pb::reward_service_client::RewardServiceClient::with_interceptor(ch.clone(), with_token("tok"));
    let mut wrong = pb::reward_service_client::RewardServiceClient::with_interceptor(ch.clone(), with_token("nope"));
    let good = || conv_item(&[("user", "What is 2+2?"), ("assistant", "4")]);
    let (mut items, mut tokens) = (0u64, 0u64);
    for n in 1..=3 {
        let r = c.score(score_req(vec![good(); n])).await.unwrap().into_inner();
        items += r.results.len() as u64;
        tokens += r.results.iter().map(|x| x.tokens as u64).sum::<u64>();
    }
    let r = c
        .rank(pb::RankRequest {
            prompt: Some(conv(&[("user", "q")])),
            candidates: vec!["a".into(), "b".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    items += 2;
    tokens += r.results.iter().map(|x| x.tokens as u64).sum::<u64>();
    c.get_model_info(pb::GetModelInfoRequest {}).await.unwrap();
    c.tokenize(pb::TokenizeRequest { item: Some(good()), truncation: 0 }).await.unwrap();
    assert_eq!(c.score(score_req(vec![])).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(c.score(score_req(vec![ids_item(&[999_999])])).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(wrong.score(score_req(vec![good()])).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(c.score(score_req(vec![good(); 41])).await.unwrap_err().code(), Code::ResourceExhausted);
    // Refused by the codec before any handler runs, and still counted.
    let mut c_big = c.clone().max_encoding_message_size(4 << 20);
    let big = score_req(vec![text_item(&"x".repeat(2 << 20))]);
    assert_eq!(c_big.score(big).await.unwrap_err().code(), Code::ResourceExhausted);
    let reqs: Vec<pb::ScoreStreamRequest> = (0..2)
        .map(|i| pb::ScoreStreamRequest { request_id: i.to_string(), request: Some(score_req(vec![good()])) })
        .collect();
    let mut s = c.score_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    while let Some(m) = s.message().await.unwrap() {
        let pb::score_stream_response::Outcome::Response(r) = m.outcome.unwrap() else { panic!("stream error") };
        items += 1;
        tokens += r.results[0].tokens as u64;
    }
    // A request cancelled by its client while it waits behind a long one: dropped, not computed.
    let mut c2 = c.clone();
    let long =
        tokio::spawn(async move { c2.score(score_req((0..30).map(|j| ids_item(&long_ids(1000, j))).collect())).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c3 = c.clone();
    let doomed = tokio::spawn(async move { c3.score(score_req(vec![ids_item(&[5, 6, 7])])).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    doomed.abort();
    let r = long.await.unwrap().unwrap().into_inner();
    items += 30;
    tokens += r.results.iter().map(|x| x.tokens as u64).sum::<u64>();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let text = server.scrape().await;
    let samples = parse_prometheus(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let req = |rpc: &str, code: &str| value(&samples, "arbiter_requests_total", &[("rpc", rpc), ("code", code)]);
    assert_eq!(req("Score", "OK"), 4.0, "3 Score + the long one");
    assert_eq!(req("Rank", "OK"), 1.0);
    assert_eq!(req("GetModelInfo", "OK"), 1.0);
    assert_eq!(req("Tokenize", "OK"), 1.0);
    assert_eq!(req("ScoreStream", "OK"), 2.0);
    assert_eq!(req("Score", "INVALID_ARGUMENT"), 2.0);
    assert_eq!(req("Score", "UNAUTHENTICATED"), 1.0);
    assert_eq!(req("Score", "RESOURCE_EXHAUSTED"), 2.0, "queue full, and the oversized message");
    assert_eq!(req("Score", "CANCELLED"), 1.0);
    let total: f64 = samples.iter().filter(|s| s.name == "arbiter_requests_total").map(|s| s.value).sum();
    assert_eq!(total, 15.0, "nothing else was counted:\n{text}");
    assert_eq!(value(&samples, "arbiter_dropped_total", &[("reason", "cancelled")]), 1.0);
    assert_eq!(value(&samples, "arbiter_items_scored_total", &[]), items as f64);
    assert_eq!(value(&samples, "arbiter_tokens_scored_total", &[]), tokens as f64);
    assert_eq!(value(&samples, "arbiter_queue_depth", &[]), 0.0);
    assert_eq!(value(&samples, "arbiter_ready", &[]), 1.0);
    assert!(value(&samples, "arbiter_model_load_seconds", &[]) > 0.0);
    assert_eq!(value(&samples, "arbiter_build_info", &[]), 1.0);
    assert_eq!(value(&samples, "arbiter_model_info", &[("architecture", "NemotronForSequenceClassification")]), 1.0);
    // Histograms render as cumulative _bucket series with +Inf equal to _count.
    for h in [
        "arbiter_request_seconds",
        "arbiter_queue_seconds",
        "arbiter_tokenize_seconds",
        "arbiter_inference_seconds",
        "arbiter_batch_size",
        "arbiter_batch_tokens",
    ] {
        let buckets: Vec<_> = samples.iter().filter(|s| s.name == format!("{h}_bucket")).collect();
        assert!(buckets.len() >= 5, "{h} has _bucket series:\n{text}");
        let inf = value(&samples, &format!("{h}_bucket"), &[("le", "+Inf")]);
        assert_eq!(inf, value(&samples, &format!("{h}_count"), &[]), "{h}");
    }
    let score_ok_count = value(&samples, "arbiter_request_seconds_count", &[("rpc", "Score")]);
    assert_eq!(score_ok_count, 4.0 + 2.0 + 1.0 + 2.0 + 1.0, "every Score outcome is timed");
    assert_eq!(value(&samples, "arbiter_batch_size_sum", &[]), items as f64, "every scored item was in one batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id_on_every_line_about_a_request() {
    let mut server = ServerProcess::spawn(&["--log-format", "json", "--shutdown-linger-seconds", "0"]);
    server.wait_serving().await;
    let mut c = client(server.addr).await;
    let mut req = tonic::Request::new(score_req(vec![conv_item(&[("user", "hi"), ("assistant", "yo")])]));
    req.metadata_mut().insert("x-request-id", "trace-abc-123".parse().unwrap());
    c.score(req).await.unwrap();
    let mut bad = tonic::Request::new(score_req(vec![]));
    bad.metadata_mut().insert("x-request-id", "trace-bad-456".parse().unwrap());
    assert_eq!(c.score(bad).await.unwrap_err().code(), Code::InvalidArgument);
    server.sigterm();
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0));
    let log = server.log_text();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let about = |id: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|l| l.get("span").and_then(|s| s.get("request_id")).and_then(|v| v.as_str()) == Some(id))
            .collect()
    };
    let ok = about("trace-abc-123");
    assert!(!ok.is_empty(), "the request logs at least its outcome:\n{log}");
    assert!(ok.iter().all(|l| l["span"]["rpc"] == "Score"));
    let bad = about("trace-bad-456");
    assert!(bad.iter().any(|l| l["fields"]["code"] == "INVALID_ARGUMENT"), "{log}");
    // No line mentions a request without being inside its span.
    for l in &lines {
        let text = l.to_string();
        if text.contains("trace-abc-123") || text.contains("trace-bad-456") {
            assert!(l.get("span").is_some(), "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_serve_one_pipeline_and_the_leader_stops_when_the_worker_dies() {
    let leader_addr = format!("127.0.0.1:{}", common::process::free_port());
    let node = |rank: &str| {
        ServerProcess::spawn(&[
            "--pp",
            "2",
            "--nodes",
            "2",
            "--node-rank",
            rank,
            "--leader-addr",
            &leader_addr,
            "--max-batch-tokens",
            "1024",
        ])
    };
    // The worker starts first and retries until the leader listens.
    let mut worker = node("1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut leader = node("0");
    leader.wait_serving().await;
    assert_eq!(worker.health("").await, Some(ServingStatus::Serving), "{}", worker.log_text());
    assert_eq!(worker.health("arbiter.v1.RewardService").await, Some(ServingStatus::NotServing));

    // The same pipeline in one process answers bit for bit the same.
    let (one_addr, one) = serve(&["--pp", "2"]).await;
    let items = || {
        vec![
            conv_item(&[("user", "What is 2+2?"), ("assistant", "4")]),
            conv_item(&[("user", "Name a prime."), ("assistant", "Seven. ".repeat(40).as_str())]),
        ]
    };
    let two_nodes = client(leader.addr).await.score(score_req(items())).await.unwrap().into_inner();
    let one_process = client(one_addr).await.score(score_req(items())).await.unwrap().into_inner();
    assert_eq!(two_nodes.results.len(), 2);
    for (a, b) in two_nodes.results.iter().zip(&one_process.results) {
        assert_eq!(a.reward.to_bits(), b.reward.to_bits(), "{} vs {}", a.reward, b.reward);
    }
    // Per-turn branches cross the nodes too: every turn is its stopped conversation's result,
    // and the one-process pipeline's.
    let pairs = turns_conv(3);
    let refs: Vec<(&str, &str)> = pairs.iter().map(|(r, m)| (r.as_str(), m.as_str())).collect();
    let req = pb::ScoreRequest { per_turn: true, ..score_req(vec![conv_item(&refs)]) };
    let mut lc = client(leader.addr).await;
    let two_nodes = lc.score(req.clone()).await.unwrap().into_inner().results;
    check_per_turn(&mut lc, &pairs, &two_nodes[0]).await;
    let one_process = client(one_addr).await.score(req).await.unwrap().into_inner().results;
    assert_eq!(two_nodes, one_process);
    one.stop();
    one.wait().await.unwrap();

    // Losing the worker stops the leader with the reason, instead of hanging its clients.
    worker.child.kill().unwrap();
    worker.child.wait().unwrap();
    let code = leader.wait_exit(Duration::from_secs(30));
    assert_ne!(code, Some(0), "{}", leader.log_text());
    let log = leader.log_text();
    assert!(log.contains("lost node 1"), "{log}");
}
