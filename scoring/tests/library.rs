//! The scoring core as a Rust program uses it, on the demo model: results equal the engine's
//! forward pass of each sequence alone (the core adds no numerics and batching changes no bit),
//! and a rank equals scoring the full conversations.

use std::sync::Arc;

use arbiter_engine::demo::ensure_demo_model;
use arbiter_engine::runtime::{LoadOptions, LoadedModel};
use arbiter_engine::text::{Input, Message, Role, TruncationPolicy};
use arbiter_engine::{PackedBatch, RewardWeights, Score};
use arbiter_scoring::{BatchConfig, Item, Options, Scorer, ScorerConfig};

fn demo_scorer() -> Arc<Scorer> {
    let model = LoadedModel::load(&ensure_demo_model().unwrap(), &LoadOptions::default()).unwrap();
    let batch = BatchConfig { max_batch_tokens: 512, ..BatchConfig::default() };
    Arc::new(Scorer::start(model, ScorerConfig { batch, tokenization_workers: 2 }, None).unwrap())
}

fn conversation(user: &str, assistant: &str) -> Vec<Message> {
    vec![Message::new(Role::User, user), Message::new(Role::Assistant, assistant)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_match_the_engine_alone_bit_for_bit_and_rank_matches_score() {
    let scorer = demo_scorer();
    let model = scorer.model().clone();
    let inputs: Vec<Input> = (0..24)
        .map(|i| match i % 3 {
            0 => Input::Messages(conversation(&"why is the sky blue? ".repeat(i + 1), &"light scatters. ".repeat(i))),
            1 => Input::Text("<extra_id_1>User\nhello there".repeat(i)),
            _ => Input::TokenIds((0..(5 + 7 * i) as u32).map(|t| (t * 31 + 7) % 2048).collect()),
        })
        .collect();
    let items: Vec<Item> = inputs.iter().map(|i| Item::new(i.clone(), TruncationPolicy::Error)).collect();
    // Two callers at once, so batches mix both callers' items.
    let (a, b) = tokio::join!(
        scorer.score(items.clone(), Options::default()),
        scorer.score_each(items.iter().rev().cloned().collect(), Options::default())
    );
    let a = a.unwrap();
    let b: Vec<_> = b.into_iter().rev().map(Result::unwrap).collect();
    let head = &model.spec().head;
    for (i, input) in inputs.iter().enumerate() {
        let ids = model.preprocessor.prepare(input, TruncationPolicy::Error).unwrap().ids;
        let raw =
            model.engine.forward(&PackedBatch::from_sequences(std::slice::from_ref(&ids)).unwrap()).unwrap().remove(0);
        let alone = Score::from_raw(head, raw, &RewardWeights::defaults(head));
        assert_eq!(a.items[i].score, alone, "item {i}");
        assert_eq!(b[i].score, alone, "item {i} (score_each)");
        assert_eq!(a.items[i].tokens, ids.len());
    }

    let prompt = vec![Message::new(Role::User, "name a colour")];
    let candidates: Vec<String> = ["red", "blue", "red", "a long answer about green"].map(String::from).to_vec();
    let ranked = scorer
        .rank(prompt.clone(), candidates.clone(), TruncationPolicy::Error, None, Options::default())
        .await
        .unwrap();
    let full: Vec<Item> = candidates
        .iter()
        .map(|c| Item::new(Input::Messages(conversation("name a colour", c)), TruncationPolicy::Error))
        .collect();
    let direct = scorer.score(full, Options::default()).await.unwrap();
    let rewards: Vec<f32> = direct.items.iter().map(|s| s.score.reward).collect();
    assert_eq!(ranked.scored.items.iter().map(|s| s.score.reward).collect::<Vec<_>>(), rewards);
    assert_eq!(rewards[0], rewards[2], "equal candidates score equally");
    let mut want: Vec<usize> = (0..4).collect();
    want.sort_by(|&x, &y| rewards[y].total_cmp(&rewards[x]));
    assert_eq!(ranked.order, want);
    let first_red = ranked.order.iter().position(|&i| i == 0).unwrap();
    assert!(ranked.order[first_red + 1..].contains(&2), "ties keep input order");

    let e = scorer
        .rank(conversation("q", "a"), candidates, TruncationPolicy::Error, None, Options::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("must end with a user turn"), "{e}");
    scorer.shutdown();
}
