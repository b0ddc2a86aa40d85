//! A real server on a loopback port for end-to-end tests, and clients for it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbiter_proto::v1 as pb;
use arbiter_proto::v1::reward_service_client::RewardServiceClient;
use arbiter_server::serve::{start, Running, ServeArgs};
use clap::Parser;
use tonic::transport::Channel;

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: ServeArgs,
}

/// Starts `arbiter serve --demo` in-process on 127.0.0.1:0 with `extra` flags; returns once SERVING.
pub async fn serve(extra: &[&str]) -> (SocketAddr, Running) {
    let mut argv = vec![
        "arbiter",
        "--demo",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "none",
        "--max-batch-tokens",
        "2048",
        "--shutdown-linger-seconds",
        "0",
    ];
    argv.extend_from_slice(extra);
    let args = Wrapper::parse_from(argv).args;
    let running = start(args).await.expect("server starts");
    let addr = running.addr;
    wait_serving(addr).await;
    (addr, running)
}

/// Polls the standard health service until the reward service is SERVING.
pub async fn wait_serving(addr: SocketAddr) {
    let t = Instant::now();
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            let r = h.check(tonic_health::pb::HealthCheckRequest { service: "arbiter.v1.RewardService".into() }).await;
            if r.ok().map(|r| r.into_inner().status)
                == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
            {
                return;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "server did not become SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn client(addr: SocketAddr) -> RewardServiceClient<Channel> {
    RewardServiceClient::connect(format!("http://{addr}")).await.expect("connects").max_decoding_message_size(256 << 20)
}

pub fn conv(pairs: &[(&str, &str)]) -> pb::Conversation {
    pb::Conversation {
        messages: pairs.iter().map(|(r, c)| pb::Message { role: r.to_string(), content: c.to_string() }).collect(),
    }
}

pub fn conv_item(pairs: &[(&str, &str)]) -> pb::Item {
    pb::Item { input: Some(pb::item::Input::Conversation(conv(pairs))) }
}

pub fn text_item(t: &str) -> pb::Item {
    pb::Item { input: Some(pb::item::Input::Text(t.into())) }
}

pub fn ids_item(ids: &[u32]) -> pb::Item {
    pb::Item { input: Some(pb::item::Input::TokenIds(pb::TokenIds { ids: ids.to_vec() })) }
}

pub fn score_req(items: Vec<pb::Item>) -> pb::ScoreRequest {
    pb::ScoreRequest { items, ..Default::default() }
}

pub mod process;
