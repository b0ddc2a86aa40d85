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

/// The demo engine, counting what it computes and what its items would cost unshared.
struct Counting {
    inner: Arc<dyn arbiter_engine::runtime::Engine>,
    computed: std::sync::atomic::AtomicUsize,
    full: std::sync::atomic::AtomicUsize,
}

impl arbiter_engine::runtime::Engine for Counting {
    fn spec(&self) -> &arbiter_engine::ModelSpec {
        self.inner.spec()
    }
    fn forward(&self, batch: &PackedBatch) -> arbiter_engine::Result<Vec<Vec<f32>>> {
        use std::sync::atomic::Ordering::SeqCst;
        self.computed.fetch_add(batch.tokens().len(), SeqCst);
        self.full.fetch_add(batch.item_tokens_total(), SeqCst);
        self.inner.forward(batch)
    }
    fn backend_name(&self) -> String {
        self.inner.backend_name()
    }
}

fn counting_scorer(batch: BatchConfig) -> (Arc<Scorer>, Arc<Counting>) {
    let mut model = LoadedModel::load(&ensure_demo_model().unwrap(), &LoadOptions::default()).unwrap();
    let counting = Arc::new(Counting { inner: model.engine.clone(), computed: 0.into(), full: 0.into() });
    model.engine = counting.clone();
    (Arc::new(Scorer::start(model, ScorerConfig { batch, tokenization_workers: 2 }, None).unwrap()), counting)
}

fn raw_alone(model: &LoadedModel, ids: &[u32]) -> Vec<u32> {
    let raw = model.engine.forward(&PackedBatch::from_sequences(&[ids]).unwrap()).unwrap().remove(0);
    raw.iter().map(|x| x.to_bits()).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_sharing_a_prefix_compute_it_once_and_keep_every_bit() {
    use std::sync::atomic::Ordering::SeqCst;
    let (scorer, counting) = counting_scorer(BatchConfig { max_batch_tokens: 4096, ..BatchConfig::default() });
    let model = scorer.model().clone();
    let prefix: Vec<u32> = (0..150u32).map(|t| (t * 37 + 11) % 2048).collect();
    // Branches of 0..=60 tokens (0: the item is the prefix itself), and two strangers.
    let mut all: Vec<Vec<u32>> =
        (0..6u32).map(|b| [prefix.clone(), (0..b * 12).map(|t| (t * 13 + b) % 2048).collect()].concat()).collect();
    all.push((0..40u32).collect());
    all.push(prefix[..30].to_vec());
    let items: Vec<Item> =
        all.iter().map(|ids| Item::new(Input::TokenIds(ids.clone()), TruncationPolicy::Error)).collect();
    let scored = scorer.score(items, Options::default()).await.unwrap();
    let full: usize = all.iter().map(Vec::len).sum();
    assert_eq!(counting.full.load(SeqCst), full);
    assert_eq!(counting.computed.load(SeqCst), full - 5 * 150, "the prefix computed once for six items");
    for (i, ids) in all.iter().enumerate() {
        assert_eq!(bits(&scored.items[i].score.raw), raw_alone(&model, ids), "item {i} (length {})", ids.len());
    }

    // Sharing off: every item computed whole, the same bits.
    let (off, counting) = counting_scorer(BatchConfig { shared_prefix_min: None, ..BatchConfig::default() });
    let items: Vec<Item> =
        all.iter().map(|ids| Item::new(Input::TokenIds(ids.clone()), TruncationPolicy::Error)).collect();
    let again = off.score(items, Options::default()).await.unwrap();
    assert_eq!(counting.computed.load(SeqCst), full);
    for (a, b) in again.items.iter().zip(&scored.items) {
        assert_eq!(bits(&a.score.raw), bits(&b.score.raw));
    }
    scorer.shutdown();
    off.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_computes_its_prompt_once_with_the_bits_of_each_conversation_alone() {
    use std::sync::atomic::Ordering::SeqCst;
    let (scorer, counting) = counting_scorer(BatchConfig { max_batch_tokens: 4096, ..BatchConfig::default() });
    let model = scorer.model().clone();
    // A short prompt (under the 64 tokens strangers need) and a long one: Rank shares both.
    for user in ["name a colour", &"tell me about the sea and its colours. ".repeat(12)] {
        let before = (counting.computed.load(SeqCst), counting.full.load(SeqCst));
        let candidates: Vec<String> =
            ["red", "", "a long answer about green and blue", "red"].map(String::from).to_vec();
        let ranked = scorer.rank(
            vec![Message::new(Role::User, user)],
            candidates.clone(),
            TruncationPolicy::Error,
            None,
            Options::default(),
        );
        let ranked = ranked.await.unwrap();
        let convs: Vec<Vec<u32>> = candidates
            .iter()
            .map(|c| {
                model
                    .preprocessor
                    .prepare(&Input::Messages(conversation(user, c)), TruncationPolicy::Error)
                    .unwrap()
                    .ids
            })
            .collect();
        let common = convs.iter().map(|c| c.iter().zip(&convs[0]).take_while(|(a, b)| a == b).count()).min().unwrap();
        assert!(common > 0);
        let full: usize = convs.iter().map(Vec::len).sum();
        let computed = counting.computed.load(SeqCst) - before.0;
        assert_eq!(counting.full.load(SeqCst) - before.1, full);
        assert_eq!(computed, full - 3 * common, "prompt of {} tokens computed once", common);
        // Scoring alone goes through the counting engine too: after the counts are read.
        for (i, ids) in convs.iter().enumerate() {
            assert_eq!(bits(&ranked.scored.items[i].score.raw), raw_alone(&model, ids), "candidate {i}");
        }
    }
    scorer.shutdown();
}
