//! The gRPC service end to end: a real server on a loopback port, a real tonic client.

mod common;

use std::collections::HashMap;
use std::process::Command;

use arbiter_proto::v1 as pb;
use common::*;
use serde_json::json;
use tonic::Code;

fn bits(r: &pb::Result) -> (u32, Vec<(String, u32)>) {
    let mut a: Vec<(String, u32)> = r.attributes.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect();
    a.sort();
    (r.reward.to_bits(), a)
}

/// Conversations of varied lengths.
fn conversations() -> Vec<Vec<(&'static str, String)>> {
    (0..12)
        .map(|i| {
            let mut c = Vec::new();
            if i % 3 == 0 {
                c.push(("system", "Answer briefly.".to_string()));
            }
            for t in 0..(i % 4) {
                c.push(("user", format!("earlier question {t}")));
                c.push(("assistant", format!("earlier answer {t}")));
            }
            c.push(("user", format!("What is {i} times {i}? ").repeat(1 + i * 3)));
            c.push(("assistant", format!("It is {}.", i * i)));
            c
        })
        .collect()
}

fn as_pairs<'a>(c: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    c.iter().map(|(r, s)| (*r, s.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_stream_and_rank_are_bit_identical_to_arbiter_score() {
    let (addr, running) = serve(&[]).await;
    let mut c = client(addr).await;
    let convs = conversations();

    // `arbiter score` on the same conversations.
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines: Vec<String> = convs
        .iter()
        .map(|c| {
            json!({"messages": c.iter().map(|(r, s)| json!({"role": r, "content": s})).collect::<Vec<_>>()}).to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(["score", "--demo", "--input", input.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Vec<(u32, Vec<(String, u32)>)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let mut a: Vec<(String, u32)> = v["attributes"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, x)| (k.clone(), (x.as_f64().unwrap() as f32).to_bits()))
                .collect();
            a.sort();
            ((v["reward"].as_f64().unwrap() as f32).to_bits(), a)
        })
        .collect();
    assert_eq!(cli.len(), convs.len());

    // Score: all in one request.
    let r = c.score(score_req(convs.iter().map(|x| conv_item(&as_pairs(x))).collect())).await.unwrap().into_inner();
    assert_eq!(r.results.iter().map(bits).collect::<Vec<_>>(), cli);
    assert!(r.warning.contains("meaningless"));
    assert_eq!(r.model_fingerprint.len(), 32);

    // ScoreStream: one request per conversation, matched by id.
    let reqs: Vec<pb::ScoreStreamRequest> = convs
        .iter()
        .enumerate()
        .map(|(i, x)| pb::ScoreStreamRequest {
            request_id: format!("q{i}"),
            request: Some(score_req(vec![conv_item(&as_pairs(x))])),
        })
        .collect();
    let mut stream = c.score_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let mut by_id = HashMap::new();
    while let Some(m) = stream.message().await.unwrap() {
        match m.outcome.unwrap() {
            pb::score_stream_response::Outcome::Response(r) => by_id.insert(m.request_id, bits(&r.results[0])),
            pb::score_stream_response::Outcome::Error(e) => {
                panic!("{}: {}", m.request_id, e.message)
            }
        };
    }
    assert_eq!(by_id.len(), convs.len());
    for (i, want) in cli.iter().enumerate() {
        assert_eq!(&by_id[&format!("q{i}")], want, "stream request {i}");
    }

    // Rank: the prompt of conversation 5 with three candidates, one of them its own answer.
    let x = &convs[5];
    let prompt = conv(&as_pairs(&x[..x.len() - 1]));
    let own = x.last().unwrap().1.clone();
    let r = c
        .rank(pb::RankRequest {
            prompt: Some(prompt),
            candidates: vec!["No idea.".into(), own, "No idea.".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bits(&r.results[1]), cli[5], "a candidate scores exactly as Score scores the full conversation");
    assert_eq!(bits(&r.results[0]), bits(&r.results[2]));
    let pos = |i: u32| r.order.iter().position(|&o| o == i).unwrap();
    assert!(pos(0) < pos(2), "ties keep input order: {:?}", r.order);
    let rewards: Vec<f32> = r.order.iter().map(|&i| r.results[i as usize].reward).collect();
    assert!(rewards.windows(2).all(|w| w[0] >= w[1]), "best first: {rewards:?}");

    running.stop();
    running.wait().await.unwrap();
}

/// Scores each conversation alone, then has `clients` concurrent clients send mixed requests and
/// checks every answer bit for bit against the lone scores; returns the lone scores.
async fn concurrent_clients_get_their_own_answers(flags: &[&str], clients: usize) -> Vec<(u32, Vec<(String, u32)>)> {
    let (addr, running) = serve(flags).await;
    let convs = conversations();
    // Reference: each conversation scored alone.
    let mut c = client(addr).await;
    let mut reference = Vec::new();
    for x in &convs {
        let r = c.score(score_req(vec![conv_item(&as_pairs(x))])).await.unwrap().into_inner();
        reference.push(bits(&r.results[0]));
    }
    let reference = std::sync::Arc::new(reference);
    let convs = std::sync::Arc::new(convs);
    let mut tasks = Vec::new();
    for client_no in 0..clients {
        let (reference, convs) = (reference.clone(), convs.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            for k in 0..4usize {
                // Mixed requests: 1 to 3 items chosen by client and round.
                let picks: Vec<usize> =
                    (0..1 + (client_no + k) % 3).map(|j| (client_no * 7 + k * 5 + j * 3) % convs.len()).collect();
                let items = picks.iter().map(|&p| conv_item(&as_pairs(&convs[p]))).collect();
                let r = c.score(score_req(items)).await.expect("no errors").into_inner();
                assert_eq!(r.results.len(), picks.len());
                for (res, &p) in r.results.iter().zip(&picks) {
                    assert_eq!(bits(res), reference[p], "client {client_no} round {k}: answer matches its own request");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    running.stop();
    running.wait().await.unwrap();
    std::sync::Arc::try_unwrap(reference).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_clients_each_get_their_own_answers() {
    concurrent_clients_get_their_own_answers(&["--max-batch-requests", "64"], 64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_split_tp2_pp2_serves_concurrent_clients_like_the_unsplit_model() {
    // Two engine threads keep both pipeline stages busy; answers must still be each request's own.
    let split = concurrent_clients_get_their_own_answers(&["--tp", "2", "--pp", "2"], 16).await;
    let (addr, running) = serve(&[]).await;
    let mut c = client(addr).await;
    for (x, s) in conversations().iter().zip(&split) {
        let r = c.score(score_req(vec![conv_item(&as_pairs(x))])).await.unwrap().into_inner();
        let (want, got) = (r.results[0].reward, f32::from_bits(s.0));
        assert!((want - got).abs() <= 1e-4 * want.abs().max(1e-3), "split reward {got} vs unsplit {want}");
    }
    running.stop();
    running.wait().await.unwrap();
}

async fn expect_err<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, code: Code, want: &str) {
    let e = r.expect_err("should fail");
    assert_eq!(e.code(), code, "{}", e.message());
    assert!(e.message().contains(want), "{:?}: {}", code, e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_code_and_a_message_and_serving_goes_on() {
    let (addr, running) = serve(&["--max-items-per-request", "4", "--max-input-tokens", "100"]).await;
    let mut c = client(addr).await;
    let ok = || conv_item(&[("user", "hi"), ("assistant", "hello")]);
    expect_err(c.score(score_req(vec![])).await, Code::InvalidArgument, "no items").await;
    expect_err(c.score(score_req(vec![ok(); 5])).await, Code::InvalidArgument, "5 items; the limit is 4").await;
    expect_err(
        c.score(score_req(vec![ok(), pb::Item { input: None }])).await,
        Code::InvalidArgument,
        "items[1]: no input",
    )
    .await;
    expect_err(
        c.score(score_req(vec![conv_item(&[])])).await,
        Code::InvalidArgument,
        "items[0]: the conversation has no messages",
    )
    .await;
    expect_err(
        c.score(score_req(vec![ok(), conv_item(&[("assistant", "a"), ("user", "b")])])).await,
        Code::InvalidArgument,
        "items[1]: messages[0]: expected a user turn",
    )
    .await;
    expect_err(
        c.score(score_req(vec![conv_item(&[("robot", "x")])])).await,
        Code::InvalidArgument,
        "items[0].messages[0]: unknown role \"robot\"",
    )
    .await;
    expect_err(c.score(score_req(vec![text_item("")])).await, Code::InvalidArgument, "items[0]: the text is empty")
        .await;
    expect_err(
        c.score(score_req(vec![ids_item(&[1, 99999])])).await,
        Code::InvalidArgument,
        "items[0]: token_ids[1]: 99999 is outside the vocabulary",
    )
    .await;
    expect_err(c.score(score_req(vec![ids_item(&[])])).await, Code::InvalidArgument, "token_ids is empty").await;
    let long = "word ".repeat(400);
    expect_err(
        c.score(score_req(vec![conv_item(&[("user", &long), ("assistant", "ok")])])).await,
        Code::InvalidArgument,
        "items[0]: the conversation is",
    )
    .await;
    let mut w = score_req(vec![ok()]);
    w.reward_weights.insert("quality".into(), 1.0);
    expect_err(c.score(w).await, Code::InvalidArgument, "unknown reward weight \"quality\"").await;
    let mut w = score_req(vec![ok()]);
    w.reward_weights.insert("verbosity".into(), f32::INFINITY);
    expect_err(c.score(w).await, Code::InvalidArgument, "not a finite number").await;
    let mut t = score_req(vec![ok()]);
    t.truncation = 7;
    expect_err(c.score(t).await, Code::InvalidArgument, "truncation 7").await;
    expect_err(
        c.rank(pb::RankRequest {
            prompt: Some(conv(&[("user", "q"), ("assistant", "a")])),
            candidates: vec!["x".into()],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "prompt: messages[1] is a assistant turn; the prompt must end with a user turn",
    )
    .await;
    expect_err(
        c.rank(pb::RankRequest { prompt: Some(conv(&[("user", "q")])), candidates: vec![], ..Default::default() })
            .await,
        Code::InvalidArgument,
        "no candidates",
    )
    .await;
    expect_err(c.tokenize(pb::TokenizeRequest::default()).await, Code::InvalidArgument, "item: no input").await;

    // Still serving, and truncation works when asked for.
    let old_turn =
        conv_item(&[("system", "Be brief."), ("user", &long), ("assistant", "ok"), ("user", "q"), ("assistant", "a")]);
    let mut t = score_req(vec![old_turn, ids_item(&(1..200).collect::<Vec<_>>())]);
    t.truncation = pb::Truncation::Truncate as i32;
    let r = c.score(t).await.unwrap().into_inner();
    assert!(r.results.iter().all(|x| x.truncation.unwrap().truncated && x.tokens <= 100));
    // A stream with one bad request answers it with an error and goes on.
    let reqs = vec![
        pb::ScoreStreamRequest { request_id: "bad".into(), request: Some(score_req(vec![])) },
        pb::ScoreStreamRequest { request_id: "good".into(), request: Some(score_req(vec![ok()])) },
    ];
    let mut s = c.score_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let mut seen = HashMap::new();
    while let Some(m) = s.message().await.unwrap() {
        seen.insert(m.request_id.clone(), m.outcome.unwrap());
    }
    assert!(
        matches!(&seen["bad"], pb::score_stream_response::Outcome::Error(e) if e.code == Code::InvalidArgument as i32)
    );
    assert!(matches!(&seen["good"], pb::score_stream_response::Outcome::Response(_)));
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_info_and_tokenize() {
    let (addr, running) = serve(&["--max-input-tokens", "1000"]).await;
    let mut c = client(addr).await;
    let info = c.get_model_info(pb::GetModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.architecture, "NemotronForSequenceClassification");
    assert_eq!(info.attributes, ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]);
    assert_eq!(info.default_reward_weights["correctness"], 0.74);
    assert_eq!(info.max_input_tokens, 1000);
    assert_eq!(info.head_outputs.len(), 9);
    assert_eq!(info.chat_template, "nemotron-reward");
    let limits = info.limits.unwrap();
    assert_eq!((limits.max_batch_tokens, limits.default_truncation.as_str()), (2048, "error"));
    assert!(info.warning.contains("meaningless"));
    let t = c
        .tokenize(pb::TokenizeRequest { item: Some(conv_item(&[("user", "hi"), ("assistant", "yo")])), truncation: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(t.text.starts_with("<extra_id_0>System\n") && t.text.ends_with("<extra_id_1>Assistant\nyo\n<extra_id_2>"));
    assert_eq!((t.token_ids[0], *t.token_ids.last().unwrap()), (4, 6));
    assert_eq!(t.model_fingerprint, info.model_fingerprint);
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_says_resource_exhausted() {
    let (addr, running) = serve(&["--queue-capacity", "3"]).await;
    let mut c = client(addr).await;
    let items = vec![ids_item(&[1, 2, 3]); 4];
    expect_err(c.score(score_req(items)).await, Code::ResourceExhausted, "the queue is full").await;
    // Flood: some requests fit, the rest are refused; none is lost or wrong.
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        tasks.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            c.score(score_req(vec![ids_item(&(1..300).map(|t| t + i).collect::<Vec<_>>()); 3]))
                .await
                .map(|r| r.into_inner().results.len())
        }));
    }
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(3) => ok += 1,
            Err(e) if e.code() == Code::ResourceExhausted => full += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ok >= 1 && ok + full == 16, "ok {ok}, full {full}");
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_refuses_wrong_tokens_while_health_stays_open() {
    let (addr, running) = serve(&["--auth-token", "s3cret"]).await; // serve() itself polls health with no token
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut c = pb::reward_service_client::RewardServiceClient::new(ch.clone());
    expect_err(c.get_model_info(pb::GetModelInfoRequest {}).await, Code::Unauthenticated, "Bearer").await;
    let mut req = tonic::Request::new(pb::GetModelInfoRequest {});
    req.metadata_mut().insert("authorization", "Bearer wrong".parse().unwrap());
    expect_err(c.get_model_info(req).await, Code::Unauthenticated, "wrong bearer token").await;
    let mut req = tonic::Request::new(pb::GetModelInfoRequest {});
    req.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    assert!(c.get_model_info(req).await.is_ok());
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mb_request_works_under_a_raised_limit_and_is_refused_clearly_above_it() {
    let big = "x".repeat(20 << 20);
    let item = || text_item(&big);
    // Default 64 MiB limit: the 20 MB text is accepted (and truncated to the model's limit).
    let (addr, running) = serve(&[]).await;
    let mut c = client(addr).await.max_encoding_message_size(64 << 20);
    let mut req = score_req(vec![item()]);
    req.truncation = pb::Truncation::Truncate as i32;
    let r = c.score(req).await.unwrap().into_inner();
    assert!(r.results[0].truncation.unwrap().truncated);
    running.stop();
    running.wait().await.unwrap();
    // A 16 MiB limit refuses it with a message that says so, as RESOURCE_EXHAUSTED (the code
    // the API promises; tonic's own is OUT_OF_RANGE).
    let (addr, running) = serve(&["--max-message-bytes", "16777216"]).await;
    let mut c = client(addr).await.max_encoding_message_size(64 << 20);
    let e = c.score(score_req(vec![item()])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message().contains("message length too large: found 20971530 bytes, the limit is: 16777216 bytes"),
        "{}",
        e.message()
    );
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_deadline_exceeded() {
    let (addr, running) = serve(&[]).await;
    let mut c = client(addr).await;
    // A long request ahead of it in the queue.
    let mut c2 = c.clone();
    let long = tokio::spawn(async move {
        c2.score(score_req(
            (0..24u32).map(|j| ids_item(&(0..1000).map(|i| 7 + (i * 13 + j) % 2000).collect::<Vec<_>>())).collect(),
        ))
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut req = tonic::Request::new(score_req(vec![ids_item(&[5, 6, 7])]));
    req.set_timeout(std::time::Duration::from_millis(200));
    let e = c.score(req).await.unwrap_err();
    // The server answers DEADLINE_EXCEEDED 5 ms early; on a loaded machine the tonic client's own
    // timer can still fire first, and tonic reports that as CANCELLED "Timeout expired".
    let client_side = e.code() == Code::Cancelled && e.message() == "Timeout expired";
    assert!(e.code() == Code::DeadlineExceeded || client_side, "{:?}: {}", e.code(), e.message());
    assert_eq!(long.await.unwrap().unwrap().into_inner().results.len(), 24, "the long request is unaffected");
    running.stop();
    running.wait().await.unwrap();
}

/// A message that is not a ScoreRequest on the wire: field 1 (items) holds the byte 0x05,
/// which is no valid Item (field number 0).
fn undecodable() -> pb::TokenIds {
    pb::TokenIds { ids: vec![5] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_request_is_invalid_argument_not_internal() {
    let (addr, running) = serve(&[]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = arbiter_proto::codec::ArbiterCodec::<pb::TokenIds, pb::ScoreResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/arbiter.v1.RewardService/Score");
    let e = grpc.unary(tonic::Request::new(undecodable()), path, codec).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().starts_with(arbiter_proto::codec::UNDECODABLE), "{}", e.message());
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_with_resource_exhausted_or_invalid_argument_after_the_answers_it_had() {
    let (addr, running) = serve(&["--max-message-bytes", "1048576"]).await;
    let small = |id: &str| pb::ScoreStreamRequest {
        request_id: id.into(),
        request: Some(score_req(vec![ids_item(&[5, 6, 7])])),
    };
    let big = pb::ScoreStreamRequest {
        request_id: "big".into(),
        request: Some(score_req(vec![text_item(&"x".repeat(2 << 20))])),
    };
    // Oversized: the first answer arrives, then the stream ends with RESOURCE_EXHAUSTED.
    let mut c = client(addr).await.max_encoding_message_size(64 << 20);
    let mut s = c.score_stream(tokio_stream::iter(vec![small("a"), big, small("b")])).await.unwrap().into_inner();
    let first = s.message().await.unwrap().expect("the answer to the first message");
    assert_eq!(first.request_id, "a");
    let e = s.message().await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("too large"), "{}", e.message());
    // Undecodable: INVALID_ARGUMENT, also after the answer to the message before it (which has
    // no request, so its answer is an in-stream error).
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/arbiter.v1.RewardService/ScoreStream");
    let codec = arbiter_proto::codec::ArbiterCodec::<RawStreamRequest, pb::ScoreStreamResponse>::default();
    let reqs = tokio_stream::iter(vec![
        RawStreamRequest { request_id: "c".into(), request: None },
        RawStreamRequest { request_id: "bad".into(), request: Some(undecodable()) },
    ]);
    let mut s = grpc.streaming(tonic::Request::new(reqs), path, codec).await.unwrap().into_inner();
    let first = s.message().await.unwrap().expect("the answer to the first message");
    assert_eq!(first.request_id, "c");
    let e = s.message().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    running.stop();
    running.wait().await.unwrap();
}

/// ScoreStreamRequest's wire layout with TokenIds where the request goes, so a test can send a
/// stream message whose request does not decode.
#[derive(Clone, PartialEq, prost::Message)]
struct RawStreamRequest {
    #[prost(string, tag = "1")]
    request_id: String,
    #[prost(message, optional, tag = "2")]
    request: Option<pb::TokenIds>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_content_cuts_prompt_then_response_text_for_score_and_rank_alike() {
    // The default system prompt and the markers of six turns are 95 demo tokens: room for some text.
    let (addr, running) = serve(&["--max-input-tokens", "160"]).await;
    let mut c = client(addr).await;
    let long = "the start of a very long question that goes on ".repeat(20);
    let two = vec![("user", format!("{long}what is the end?")), ("assistant", "It ends here.".to_string())];
    let six = vec![
        ("user", format!("{long}first")),
        ("assistant", "first answer".to_string()),
        ("user", "second question".to_string()),
        ("assistant", "second answer".to_string()),
        ("user", "last question".to_string()),
        ("assistant", "last answer".to_string()),
    ];
    // Over the limit only through the response: the prompt's text goes first, then the
    // response's start.
    let long_response = vec![("user", "short".to_string()), ("assistant", format!("{long}the end."))];
    let request = |convs: &[&Vec<(&'static str, String)>], t: pb::Truncation| pb::ScoreRequest {
        items: convs.iter().map(|c| conv_item(&as_pairs(c))).collect(),
        truncation: t as i32,
        ..Default::default()
    };

    // Dropping whole turns cannot help a single-turn conversation; cutting text can.
    expect_err(
        c.score(request(&[&two], pb::Truncation::Truncate)).await,
        Code::InvalidArgument,
        "last user turn and final assistant turn alone",
    )
    .await;
    let scored =
        c.score(request(&[&two, &six, &long_response], pb::Truncation::TruncateContent)).await.unwrap().into_inner();
    for r in &scored.results {
        let t = r.truncation.unwrap();
        assert!(t.truncated && t.dropped_tokens > 0 && t.dropped_messages == 0, "{t:?}");
        assert!(r.tokens <= 160 && t.original_tokens > 160, "{r:?}");
    }

    // What was kept: the ends of the cut contents, every marker, and the score position.
    let tokenize = |conv: &Vec<(&'static str, String)>| pb::TokenizeRequest {
        item: Some(conv_item(&as_pairs(conv))),
        truncation: pb::Truncation::TruncateContent as i32,
    };
    let t = c.tokenize(tokenize(&six)).await.unwrap().into_inner();
    assert!(t.text.ends_with("first\n<extra_id_1>Assistant\nfirst answer\n<extra_id_1>User\nsecond question\n<extra_id_1>Assistant\nsecond answer\n<extra_id_1>User\nlast question\n<extra_id_1>Assistant\nlast answer\n<extra_id_2>"), "{}", t.text);
    assert!(t.text.starts_with("<extra_id_0>System\n") && t.text.matches("<extra_id_1>").count() == 6, "{}", t.text);
    let t = c.tokenize(tokenize(&long_response)).await.unwrap().into_inner();
    assert!(t.text.contains("<extra_id_1>User\n\n<extra_id_1>Assistant\n"), "the prompt's text went first: {}", t.text);
    assert!(t.text.ends_with("the end.\n<extra_id_2>"), "{}", t.text);

    // Rank cuts each candidate's conversation exactly as Score cuts it.
    for conv in [&two, &six] {
        let (prompt, response) = conv.split_at(conv.len() - 1);
        let mut other = prompt.to_vec();
        other.push(("assistant", "A different, longer answer to compare.".to_string()));
        let ranked = c
            .rank(pb::RankRequest {
                prompt: Some(pb::Conversation {
                    messages: prompt
                        .iter()
                        .map(|(r, s)| pb::Message { role: r.to_string(), content: s.clone() })
                        .collect(),
                }),
                candidates: vec![response[0].1.clone(), other[other.len() - 1].1.clone()],
                truncation: pb::Truncation::TruncateContent as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let scored = c.score(request(&[conv, &other], pb::Truncation::TruncateContent)).await.unwrap().into_inner();
        assert_eq!(ranked.results.len(), 2);
        for (r, s) in ranked.results.iter().zip(&scored.results) {
            assert_eq!(bits(r), bits(s), "{} turns", conv.len());
            assert_eq!((r.tokens, r.truncation), (s.tokens, s.truncation));
            assert!(r.truncation.unwrap().truncated);
        }
    }
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_turn_score_and_stream_give_each_turn_its_stopped_conversation_s_result() {
    let (addr, running) = serve(&[]).await;
    let mut c = client(addr).await;
    let pairs = turns_conv(4);
    let refs: Vec<(&str, &str)> = pairs.iter().map(|(r, m)| (r.as_str(), m.as_str())).collect();
    let req = pb::ScoreRequest { per_turn: true, ..score_req(vec![conv_item(&refs), conv_item(&refs[..2])]) };
    let got = c.score(req.clone()).await.unwrap().into_inner().results;
    check_per_turn(&mut c, &pairs, &got[0]).await;
    assert!(got[0].turns.iter().all(|t| t.on_spine), "the Nemotron template only appends");
    assert_eq!(got[1].turns.len(), 1);
    // Without the option there are no turns.
    let plain = c.score(pb::ScoreRequest { per_turn: false, ..req.clone() }).await.unwrap().into_inner().results;
    assert!(plain[0].turns.is_empty());
    assert_eq!(plain[0].reward.to_bits(), got[0].reward.to_bits());
    // ScoreStream carries the same option and answers the same.
    let reqs = vec![pb::ScoreStreamRequest { request_id: "a".into(), request: Some(req) }];
    let mut stream = c.score_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let m = stream.message().await.unwrap().unwrap();
    match m.outcome.unwrap() {
        pb::score_stream_response::Outcome::Response(r) => assert_eq!(r.results, got),
        pb::score_stream_response::Outcome::Error(e) => panic!("{e:?}"),
    }
    // Text has no turns: the item is named.
    let bad = pb::ScoreRequest { per_turn: true, ..score_req(vec![conv_item(&refs), text_item("hello")]) };
    let e = c.score(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("items[1]") && e.message().contains("per_turn"), "{}", e.message());
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_turn_turns_cut_away_by_truncation_are_marked_unscored() {
    let pairs = turns_conv(6);
    let refs: Vec<(&str, &str)> = pairs.iter().map(|(r, m)| (r.as_str(), m.as_str())).collect();
    let (addr, running) = serve(&[]).await;
    let whole = client(addr).await.score(score_req(vec![conv_item(&refs)])).await.unwrap().into_inner();
    running.stop();
    running.wait().await.unwrap();
    let max = (whole.results[0].tokens * 2 / 3).to_string();
    let (addr, running) = serve(&["--max-input-tokens", &max]).await;
    let mut c = client(addr).await;
    let req = pb::ScoreRequest {
        per_turn: true,
        truncation: pb::Truncation::Truncate as i32,
        ..score_req(vec![conv_item(&refs)])
    };
    let got = c.score(req).await.unwrap().into_inner().results.remove(0);
    let dropped = got.truncation.as_ref().unwrap().dropped_messages as usize;
    assert!(dropped >= 2, "{:?}", got.truncation);
    assert_eq!(got.turns.len(), 6);
    for t in &got.turns {
        let cut = (t.message_index as usize) < dropped;
        assert_eq!(t.scored, !cut, "{t:?}");
        if cut {
            assert!(t.attributes.is_empty() && t.tokens == 0, "{t:?}");
        }
    }
    // The scored turns are the kept conversation stopped at each of them.
    // (message indices renumbered as in the kept conversation).
    let renumber = |t: &pb::TurnResult| pb::TurnResult { message_index: t.message_index - dropped as u32, ..t.clone() };
    let kept = pb::Result { turns: got.turns[dropped / 2..].iter().map(renumber).collect(), ..got.clone() };
    check_per_turn(&mut c, &pairs[dropped..], &kept).await;
    running.stop();
    running.wait().await.unwrap();
}
