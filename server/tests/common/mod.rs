//! A real server on a loopback port for end-to-end tests, and clients for it.
#![allow(dead_code)]

use std::net::SocketAddr;

use arbiter_proto::v1 as pb;
use arbiter_proto::v1::reward_service_client::RewardServiceClient;
use arbiter_server::serve::Running;
use tonic::transport::Channel;

/// Starts `arbiter serve --demo` in-process on 127.0.0.1:0 with `extra` flags; returns once SERVING.
pub async fn serve(extra: &[&str]) -> (SocketAddr, Running) {
    let running = arbiter_testkit::serve_demo(extra).await.expect("server starts");
    (running.addr, running)
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
