//! The Rust client against a real server on loopback (demo model).

use std::time::Duration;

use arbiter_client::{conversation, items, Client, ClientConfig, Item, ScoreOptions};
use arbiter_server::serve::Running;
use tonic::Code;

async fn serve(extra: &[&str]) -> (String, Running) {
    let running = arbiter_server::testing::serve_demo(extra).await.unwrap();
    (format!("http://{}", running.addr), running)
}

fn conv() -> Item {
    items::conversation_item(&[("user", "What is 2+2?"), ("assistant", "4")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_rank_stream_and_info() {
    let (endpoint, running) = serve(&[]).await;
    let c = Client::connect(ClientConfig::new(endpoint)).await.unwrap();
    let scored = c.score(vec![conv(), items::token_ids(vec![5, 6, 7])], &ScoreOptions::default()).await.unwrap();
    assert_eq!(scored.len(), 2);
    let ranked = c
        .rank(conversation(&[("user", "What is 2+2?")]), vec!["4".into(), "5".into()], &ScoreOptions::default())
        .await
        .unwrap();
    assert_eq!(ranked.results[0].reward.to_bits(), scored[0].reward.to_bits(), "Rank scores as Score does");
    let streamed =
        c.stream(vec![("a".into(), vec![conv()]), ("b".into(), vec![])], &ScoreOptions::default()).await.unwrap();
    for (id, r) in streamed {
        match id.as_str() {
            "a" => assert_eq!(r.unwrap()[0].reward.to_bits(), scored[0].reward.to_bits()),
            "b" => assert_eq!(r.unwrap_err().code(), Some(Code::InvalidArgument)),
            other => panic!("unexpected id {other}"),
        }
    }
    let info = c.model_info().await.unwrap();
    assert_eq!(info.attributes.len(), 5);
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_only_what_may_succeed_later() {
    let (endpoint, running) = serve(&["--queue-capacity", "1"]).await;
    let mut cfg = ClientConfig::new(endpoint);
    cfg.retries = 2;
    cfg.backoff = Duration::from_millis(5);
    let c = Client::connect(cfg).await.unwrap();
    let e = c.score(vec![conv(), conv()], &ScoreOptions::default()).await.unwrap_err();
    assert!(matches!(e, arbiter_client::ClientError::Status { code: Code::ResourceExhausted, attempts: 3, .. }), "{e}");
    let e = c.score(vec![], &ScoreOptions::default()).await.unwrap_err();
    assert!(matches!(e, arbiter_client::ClientError::Status { code: Code::InvalidArgument, attempts: 1, .. }), "{e}");
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_and_deadline() {
    let (endpoint, running) = serve(&["--auth-token", "t0k"]).await;
    let mut cfg = ClientConfig::new(endpoint.clone());
    cfg.retries = 0;
    let e = Client::connect(cfg.clone()).await.unwrap().model_info().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated));
    cfg.token = Some("t0k".into());
    cfg.timeout = Some(Duration::from_millis(1));
    let c = Client::connect(cfg).await.unwrap();
    let big: Vec<Item> = (0..16).map(|j| items::token_ids((0..1500).map(|i| 7 + (i + j) % 2000).collect())).collect();
    let e = c.score(big, &ScoreOptions::default()).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::DeadlineExceeded), "{e}");
    running.stop();
    running.wait().await.unwrap();
}
