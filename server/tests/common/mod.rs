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

/// A conversation of `turns` user/assistant pairs.
pub fn turns_conv(turns: usize) -> Vec<(String, String)> {
    (0..turns)
        .flat_map(|t| {
            [
                ("user".to_string(), format!("Step {t}: what comes next after {t}?")),
                ("assistant".into(), format!("{}.", t + 1).repeat(t + 1)),
            ]
        })
        .collect()
}

/// Checks a per-turn result of the conversation `pairs` against each conversation stopped at its
/// turns, scored as ordinary items by `c`: same reward and attributes, bit for bit.
pub async fn check_per_turn(c: &mut RewardServiceClient<Channel>, pairs: &[(String, String)], got: &pb::Result) {
    let refs: Vec<(&str, &str)> = pairs.iter().map(|(r, m)| (r.as_str(), m.as_str())).collect();
    let assistants: Vec<u32> = (0..refs.len() as u32).filter(|&i| refs[i as usize].0 == "assistant").collect();
    assert_eq!(got.turns.iter().map(|t| t.message_index).collect::<Vec<_>>(), assistants);
    let stopped: Vec<pb::Item> = assistants.iter().map(|&i| conv_item(&refs[..=i as usize])).collect();
    let alone = c.score(score_req(stopped)).await.unwrap().into_inner().results;
    for (t, a) in got.turns.iter().zip(&alone) {
        assert!(t.scored, "turn at message {}", t.message_index);
        assert_eq!(t.reward.to_bits(), a.reward.to_bits(), "message {}: {} vs {}", t.message_index, t.reward, a.reward);
        assert_eq!(t.tokens, a.tokens, "message {}", t.message_index);
        for (k, v) in &a.attributes {
            assert_eq!(t.attributes[k].to_bits(), v.to_bits(), "message {} attribute {k}", t.message_index);
        }
    }
    assert_eq!(got.turns.last().unwrap().reward.to_bits(), got.reward.to_bits());
}

pub mod process;
