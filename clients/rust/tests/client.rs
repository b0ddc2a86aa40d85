//! The Rust client against a real server on loopback (demo model).

use std::time::Duration;

use arbiter_client::{conversation, items, Client, ClientConfig, Item, ScoreOptions};
use arbiter_server::serve::Running;
use tonic::Code;

async fn serve(extra: &[&str]) -> (String, Running) {
    let running = arbiter_testkit::serve_demo(extra).await.unwrap();
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

#[derive(clap::Parser)]
struct ArgsOnly {
    #[command(flatten)]
    args: arbiter_server::serve::ServeArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    // A private CA and a leaf certificate for localhost signed by it (rustls refuses a
    // self-signed CA certificate used as the server's own).
    let script = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=arbiter-test-ca -keyout ca.key -out ca.pem
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout key.pem -out leaf.csr
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > leaf.ext
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile leaf.ext -out cert.pem"#;
    let out = std::process::Command::new("sh").arg("-c").arg(script).current_dir(dir.path()).output().expect("sh runs");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    let (key, cert, ca) = (dir.path().join("key.pem"), dir.path().join("cert.pem"), dir.path().join("ca.pem"));
    let argv =
        ["arbiter", "--demo", "--listen", "127.0.0.1:0", "--metrics-listen", "none", "--max-batch-tokens", "2048"];
    let mut args = ArgsOnly::parse_from(argv).args;
    args.tls_cert = Some(cert.clone());
    args.tls_key = Some(key);
    let running = arbiter_server::serve::start(args).await.unwrap();
    let mut cfg = ClientConfig::new(format!("https://localhost:{}", running.addr.port()));
    cfg.tls_ca_pem = Some(std::fs::read(&ca).unwrap());
    cfg.retries = 300; // UNAVAILABLE while the model loads
    cfg.backoff = Duration::from_millis(20);
    let c = Client::connect(cfg).await.unwrap();
    assert_eq!(c.model_info().await.unwrap().attributes.len(), 5);
    assert_eq!(c.score(vec![conv()], &ScoreOptions::default()).await.unwrap().len(), 1);
    // Without the CA the handshake fails.
    let plain = Client::connect(ClientConfig::new(format!("https://localhost:{}", running.addr.port()))).await;
    match plain {
        Err(_) => {}
        Ok(c) => assert!(c.model_info().await.is_err(), "an unknown CA is refused"),
    }
    running.stop();
    running.wait().await.unwrap();
}
