//! Per-turn scoring in the engine: every turn of a conversation, read off one batch (the
//! conversation as the spine, each turn a branch of closing tokens or its own sequence), scores
//! bit for bit as the conversation stopped at that turn, prepared and scored alone.

use arbiter_engine::config::load_config;
use arbiter_engine::cpu::CpuBackend;
use arbiter_engine::demo::write_demo_model;
use arbiter_engine::text::{
    ChatTemplate, Input, JinjaTemplate, Message, PreparedTurns, Preprocessor, Role, TextTokenizer, TruncationPolicy,
    TurnRead,
};
use arbiter_engine::{Model, PackedBatch};

mod common;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A 4-turn conversation with a system message; assistant contents carry reasoning, which the
/// Qwen3-like template below removes from every turn but the last.
fn conversation() -> Vec<Message> {
    use Role::*;
    let m = |r, c: &str| Message::new(r, c);
    vec![
        m(System, "You answer briefly."),
        m(User, "What is the capital of France?"),
        m(Assistant, "<think>easy</think>Paris."),
        m(User, "And of Italy? Explain how you know."),
        m(Assistant, "<think>recall</think>Rome, which has been the capital since 1871."),
        m(User, "Which one is larger?"),
        m(Assistant, "<think>compare</think>Paris has fewer people than Rome inside the city limits."),
        m(User, "Thanks!"),
        m(Assistant, "<think>polite</think>You are welcome."),
    ]
}

/// Appends only: every turn is the spine so far plus a score marker when the conversation ends.
const SCORE_MARKER: &str = "{% for m in messages %}<extra_id_0>{{ m.role }}\n{{ m.content }}\n{% endfor %}<extra_id_2>";
/// ChatML: a conversation stopped after a turn is exactly a prefix of the whole one.
const CHATML: &str = "{% for m in messages %}<extra_id_0>{{ m.role }}\n{{ m.content }}<extra_id_1>\n{% endfor %}";
/// Like Qwen3: earlier assistant turns lose their reasoning, so stopped conversations differ from
/// the spine's beginning at every turn but the last.
const REWRITES: &str = "{% for m in messages %}{% set c = m.content %}\
{% if m.role == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}\
<extra_id_0>{{ m.role }}\n{{ c }}<extra_id_1>\n{% endfor %}";

struct Demo {
    _dir: tempfile::TempDir,
    model: Model<CpuBackend>,
    nemotron: Preprocessor,
    tokenizer_json: std::path::PathBuf,
    vocab: usize,
}

fn demo() -> Demo {
    let dir = tempfile::tempdir().unwrap();
    write_demo_model(dir.path()).unwrap();
    let spec = load_config(&dir.path().join("config.json")).unwrap();
    let nemotron = Preprocessor::from_model_dir(dir.path(), &spec, None).unwrap();
    let model = Model::load(dir.path(), CpuBackend::new()).unwrap();
    Demo { tokenizer_json: dir.path().join("tokenizer.json"), _dir: dir, model, nemotron, vocab: spec.vocab }
}

impl Demo {
    fn jinja(&self, source: &str, max_tokens: usize) -> Preprocessor {
        let tok = TextTokenizer::from_file(&self.tokenizer_json).unwrap();
        let t = JinjaTemplate::new(source.into(), Vec::new()).unwrap();
        Preprocessor::new(Some(tok), ChatTemplate::Jinja(Box::new(t)), self.vocab, max_tokens)
    }
}

/// Packs the spine and its turns as the scoring queue does, runs it once, and checks every
/// scored turn against its stopped conversation prepared and scored alone. Returns the reads.
fn check_turns(
    model: &Model<CpuBackend>,
    pre: &Preprocessor,
    messages: &[Message],
    p: &PreparedTurns,
) -> Vec<TurnRead> {
    let mut batch = PackedBatch::from_sequences(&[&p.spine.ids]).unwrap();
    let mut expected = Vec::new();
    for t in &p.turns {
        let item = match &t.read {
            TurnRead::Spine { seen, closing } => batch.push_continuation(0, *seen, closing).unwrap(),
            TurnRead::Alone(ids) => {
                batch.push(ids).unwrap();
                batch.len() - 1
            }
            TurnRead::CutAway => continue,
        };
        expected.push((t.message, item));
    }
    let out = model.forward(&batch).unwrap();
    let dropped = p.spine.truncation.dropped_messages;
    for (message, item) in expected {
        // The conversation stopped at the turn, as the spine has it (after its truncation).
        let head = usize::from(messages[0].role == Role::System);
        let stopped: Vec<Message> =
            messages[..head].iter().chain(&messages[head + dropped..=message]).cloned().collect();
        let alone = pre.prepare(&Input::Messages(stopped), TruncationPolicy::Error).unwrap();
        assert_eq!(batch.item_tokens(item), alone.ids, "message {message}: the turn's ids");
        let want = model.forward(&PackedBatch::from_sequences(&[&alone.ids]).unwrap()).unwrap().remove(0);
        assert_eq!(bits(&out[item]), bits(&want), "message {message}: bits");
    }
    p.turns.iter().map(|t| t.read.clone()).collect()
}

fn on_spine(read: &TurnRead) -> Option<usize> {
    match read {
        TurnRead::Spine { closing, .. } => Some(closing.len()),
        _ => None,
    }
}

#[test]
fn nemotron_turns_are_branches_of_one_closing_marker() {
    let d = demo();
    let msgs = conversation();
    let p = d.nemotron.prepare_turns(&msgs, TruncationPolicy::Error).unwrap();
    assert_eq!(p.spine, d.nemotron.prepare(&Input::Messages(msgs.clone()), TruncationPolicy::Error).unwrap());
    let reads = check_turns(&d.model, &d.nemotron, &msgs, &p);
    assert_eq!(p.turns.iter().map(|t| t.message).collect::<Vec<_>>(), [2, 4, 6, 8]);
    // Earlier turns carry `<extra_id_2>` (id 6); the last reads the spine's own last row.
    assert_eq!(reads.iter().map(on_spine).collect::<Vec<_>>(), [Some(1), Some(1), Some(1), Some(0)]);
    for r in &reads[..3] {
        assert!(matches!(r, TurnRead::Spine { closing, .. } if closing == &[6]), "{r:?}");
    }
}

#[test]
fn jinja_turns_share_the_spine_when_the_template_only_appends() {
    let d = demo();
    let msgs = conversation();
    let marker = d.jinja(SCORE_MARKER, 4096);
    let reads = check_turns(&d.model, &marker, &msgs, &marker.prepare_turns(&msgs, TruncationPolicy::Error).unwrap());
    assert_eq!(reads.iter().map(on_spine).collect::<Vec<_>>(), [Some(1), Some(1), Some(1), Some(0)]);
    // ChatML's closing `<extra_id_1>\n` is on the spine too: every turn is read off it.
    let chatml = d.jinja(CHATML, 4096);
    let reads = check_turns(&d.model, &chatml, &msgs, &chatml.prepare_turns(&msgs, TruncationPolicy::Error).unwrap());
    assert_eq!(reads.iter().map(on_spine).collect::<Vec<_>>(), [Some(0); 4]);
}

#[test]
fn a_template_that_rewrites_earlier_turns_scores_them_alone() {
    let d = demo();
    let msgs = conversation();
    let pre = d.jinja(REWRITES, 4096);
    let p = pre.prepare_turns(&msgs, TruncationPolicy::Error).unwrap();
    let reads = check_turns(&d.model, &pre, &msgs, &p);
    assert!(reads[..3].iter().all(|r| matches!(r, TurnRead::Alone(_))), "{reads:?}");
    assert_eq!(on_spine(&reads[3]), Some(0));
}

#[test]
fn turns_cut_away_by_truncation_get_no_read() {
    let d = demo();
    let msgs = conversation();
    // Room for all but the first pair: one turn dropped.
    let small = d.jinja(SCORE_MARKER, 4096);
    let n = small.prepare(&Input::Messages(msgs.clone()), TruncationPolicy::Error).unwrap().ids.len();
    let pre = d.jinja(SCORE_MARKER, n - 1);
    let p = pre.prepare_turns(&msgs, TruncationPolicy::Truncate).unwrap();
    assert_eq!(p.spine.truncation.dropped_messages, 2);
    let reads = check_turns(&d.model, &pre, &msgs, &p);
    assert_eq!(reads[0], TurnRead::CutAway);
    assert_eq!(reads[1..].iter().map(on_spine).collect::<Vec<_>>(), [Some(1), Some(1), Some(0)]);
    assert_eq!(p.turns.iter().map(|t| t.message).collect::<Vec<_>>(), [2, 4, 6, 8]);
    // Too long without truncation: the request fails as Score would.
    let e = pre.prepare_turns(&msgs, TruncationPolicy::Error).unwrap_err().to_string();
    assert!(e.contains(&format!("{n} tokens")), "{e}");
}

#[test]
fn truncate_content_scores_no_turn_whose_answer_was_cut() {
    let d = demo();
    let msgs = conversation();
    let pre = d.jinja(SCORE_MARKER, 4096);
    let n = pre.prepare(&Input::Messages(msgs.clone()), TruncationPolicy::Error).unwrap().ids.len();
    // Cut more than the first user message holds, so the first answer loses its start.
    let first_user = pre.tokenizer().unwrap().encode(&msgs[1].content).unwrap().len();
    let cut = d.jinja(SCORE_MARKER, n - first_user - 2);
    let p = cut.prepare_turns(&msgs, TruncationPolicy::TruncateContent).unwrap();
    assert!(p.spine.truncation.dropped_tokens > first_user, "{:?}", p.spine.truncation);
    assert_eq!(p.turns[0].read, TurnRead::CutAway);
    assert!(p.turns[1..].iter().all(|t| on_spine(&t.read).is_some()), "{:?}", p.turns);
}

#[test]
fn qwen3_s_real_template_rewrites_every_earlier_turn_so_each_is_scored_alone() {
    // Qwen3 keeps a `<think>` block only on assistant turns after the last user message, and
    // gives the final one an empty block when it has none: a conversation stopped at an earlier
    // turn renders that turn differently from the whole conversation, with or without reasoning.
    let dir = common::fixture("qwen3");
    let model = Model::load(&dir, CpuBackend::new()).unwrap();
    let pre = Preprocessor::from_model_dir(&dir, model.spec(), None).unwrap();
    assert!(matches!(pre.template(), ChatTemplate::Jinja(_)));
    let plain: Vec<Message> = conversation()
        .into_iter()
        .map(|m| Message::new(m.role, m.content.split("</think>").last().unwrap_or_default()))
        .collect();
    for msgs in [conversation(), plain] {
        let p = pre.prepare_turns(&msgs, TruncationPolicy::Error).unwrap();
        let reads = check_turns(&model, &pre, &msgs, &p);
        assert!(reads[..3].iter().all(|r| matches!(r, TurnRead::Alone(_))), "{reads:?}");
        assert_eq!(on_spine(&reads[3]), Some(0));
    }
}
