//! Per-turn items through the scoring core on the demo model: every turn's score equals, bit
//! for bit, the conversation stopped at that turn scored as an ordinary item, whether the turn
//! was a branch of the conversation or (template rewriting earlier turns) its own sequence, and
//! whatever else shares the batches.

use std::path::Path;
use std::sync::Arc;

use arbiter_engine::demo::write_demo_model;
use arbiter_engine::plan::Parallelism;
use arbiter_engine::runtime::{LoadOptions, LoadedModel};
use arbiter_engine::text::{Input, Message, Role, TruncationPolicy};
use arbiter_scoring::error::Place;
use arbiter_scoring::{BatchConfig, Item, Options, ScoreError, Scorer, ScorerConfig};

/// Like Qwen3: earlier assistant turns lose their reasoning.
const REWRITES: &str = "{% for m in messages %}{% set c = m.content %}\
{% if m.role == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}\
<extra_id_0>{{ m.role }}\n{{ c }}<extra_id_1>\n{% endfor %}";

/// The demo model; with `jinja`, its template replaced by that Jinja template.
fn scorer(dir: &Path, jinja: Option<&str>, max_tokens: Option<usize>) -> Arc<Scorer> {
    scorer_split(dir, jinja, max_tokens, Parallelism::default())
}

/// [`scorer`] with the model split across ranks.
fn scorer_split(dir: &Path, jinja: Option<&str>, max_tokens: Option<usize>, parallel: Parallelism) -> Arc<Scorer> {
    write_demo_model(dir).unwrap();
    if let Some(t) = jinja {
        let cfg_path = dir.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["arbiter"]["chat_template"] = "jinja".into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), serde_json::json!({ "chat_template": t }).to_string())
            .unwrap();
    }
    let opts = LoadOptions { max_input_tokens: max_tokens, parallel, ..LoadOptions::default() };
    let model = LoadedModel::load(dir, &opts).unwrap();
    let batch = BatchConfig { max_batch_tokens: 4096, ..BatchConfig::default() };
    Arc::new(Scorer::start(model, ScorerConfig { batch, tokenization_workers: 2 }, None).unwrap())
}

/// `turns` user/assistant pairs after a system message; answers carry reasoning.
fn conversation(turns: usize) -> Vec<Message> {
    let mut m = vec![Message::new(Role::System, "You answer briefly and check your work.")];
    for t in 0..turns {
        m.push(Message::new(Role::User, format!("Question {t}: what is {t} times {}?", t + 3)));
        m.push(Message::new(Role::Assistant, format!("<think>{t} x {} </think>It is {}.", t + 3, t * (t + 3))));
    }
    m
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn per_turn(messages: Vec<Message>, truncation: TruncationPolicy) -> Item {
    Item { per_turn: true, ..Item::new(Input::Messages(messages), truncation) }
}

/// Scores `messages` per turn next to ordinary items, then every stopped conversation as an
/// ordinary item, and compares bits. Returns which turns were branches of the conversation.
async fn per_turn_equals_stopped_conversations(
    s: &Scorer,
    messages: &[Message],
    policy: TruncationPolicy,
) -> Vec<bool> {
    // Ordinary items that start like the conversation, so the queue would group them with it.
    let mut items: Vec<Item> = (1..4).map(|k| Item::new(Input::Messages(conversation(k)), policy)).collect();
    items.insert(1, per_turn(messages.to_vec(), policy));
    let scored = s.score(items, Options::default()).await.unwrap();
    let got = &scored.items[1];
    let whole = s.score(vec![Item::new(Input::Messages(messages.to_vec()), policy)], Options::default()).await.unwrap();
    assert_eq!(bits(&got.score.raw), bits(&whole.items[0].score.raw), "the item's own score");
    assert_eq!((got.tokens, got.truncation), (whole.items[0].tokens, whole.items[0].truncation));
    let dropped = got.truncation.dropped_messages;
    let assistants: Vec<usize> = (0..messages.len()).filter(|&i| messages[i].role == Role::Assistant).collect();
    assert_eq!(got.turns.iter().map(|t| t.message).collect::<Vec<_>>(), assistants);
    for t in &got.turns {
        if t.message < 1 + dropped {
            assert!(t.score.is_none() && t.tokens == 0, "message {} was cut away: {t:?}", t.message);
            continue;
        }
        let stopped: Vec<Message> = messages[..1].iter().chain(&messages[1 + dropped..=t.message]).cloned().collect();
        let alone = s.score(vec![Item::new(Input::Messages(stopped), policy)], Options::default()).await.unwrap();
        let score = t.score.as_ref().unwrap();
        assert_eq!(bits(&score.raw), bits(&alone.items[0].score.raw), "message {}", t.message);
        assert_eq!(score.reward.to_bits(), alone.items[0].score.reward.to_bits(), "message {}", t.message);
        assert_eq!(t.tokens, alone.items[0].tokens, "message {}", t.message);
    }
    assert_eq!(got.turns.last().unwrap().score.as_ref(), Some(&got.score), "the last turn is the item");
    got.turns.iter().map(|t| t.on_spine).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemotron_turns_equal_their_stopped_conversations_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let s = scorer(dir.path(), None, None);
    let on_spine = per_turn_equals_stopped_conversations(&s, &conversation(5), TruncationPolicy::Error).await;
    assert_eq!(on_spine, [true; 5]);
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewriting_jinja_template_falls_back_to_separate_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let s = scorer(dir.path(), Some(REWRITES), None);
    let on_spine = per_turn_equals_stopped_conversations(&s, &conversation(4), TruncationPolicy::Error).await;
    assert_eq!(on_spine, [false, false, false, true]);
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_turns_get_no_score_and_the_rest_still_match() {
    let dir = tempfile::tempdir().unwrap();
    let full = scorer(dir.path(), None, None);
    let messages = conversation(5);
    let n = full.score(vec![Item::new(Input::Messages(messages.clone()), TruncationPolicy::Error)], Options::default());
    let n = n.await.unwrap().items[0].tokens;
    full.shutdown();
    // Room for all but about two pairs.
    let dir = tempfile::tempdir().unwrap();
    let s = scorer(dir.path(), None, Some(n * 3 / 5));
    let on_spine = per_turn_equals_stopped_conversations(&s, &messages, TruncationPolicy::Truncate).await;
    let cut = on_spine.iter().filter(|&&b| !b).count();
    assert!((1..5).contains(&cut), "{on_spine:?}");
    assert!(on_spine[cut..].iter().all(|&b| b), "{on_spine:?}");
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_turn_needs_messages_and_names_the_item() {
    let dir = tempfile::tempdir().unwrap();
    let s = scorer(dir.path(), None, None);
    let items = vec![
        per_turn(conversation(1), TruncationPolicy::Error),
        Item { per_turn: true, ..Item::new(Input::Text("hello".into()), TruncationPolicy::Error) },
    ];
    let e = s.score(items, Options::default()).await.unwrap_err();
    assert_eq!(e.place, Place::Item(1));
    assert!(matches!(&e.error, ScoreError::Invalid(m) if m.contains("per_turn")), "{e}");
    s.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_and_pipeline_parallel_turns_equal_their_stopped_conversations() {
    let messages = conversation(3);
    let one = tempfile::tempdir().unwrap();
    let unsplit = scorer(one.path(), None, None);
    let item = || vec![per_turn(messages.clone(), TruncationPolicy::Error)];
    let want = unsplit.score(item(), Options::default()).await.unwrap().items.remove(0);
    unsplit.shutdown();
    for (tp, pp) in [(2, 1), (1, 2), (2, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let s = scorer_split(dir.path(), None, None, Parallelism { tp, pp });
        let on_spine = per_turn_equals_stopped_conversations(&s, &messages, TruncationPolicy::Error).await;
        assert_eq!(on_spine, [true; 3], "tp{tp} pp{pp}");
        if tp == 1 {
            // Pipeline stages split no reduction: the unsplit model's bits.
            let got = s.score(item(), Options::default()).await.unwrap().items.remove(0);
            assert_eq!(got.turns, want.turns, "pp{pp}");
        }
        s.shutdown();
    }
}
