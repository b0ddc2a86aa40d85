//! One path from any input (messages, pre-templated text, token ids) to the token ids the engine
//! scores, with one truncation policy for all of them.

use std::path::Path;
use std::str::FromStr;

use super::chat::{validate_roles, Message, Role};
use super::jinja::JinjaTemplate;
use super::tokenizer::{Segment, TextTokenizer};
use crate::error::{EngineError, Result};
use crate::spec::ModelSpec;

/// The system prompt Nemotron-4-340B-Reward was trained with, used when a conversation has none.
pub const NEMOTRON_DEFAULT_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// The markers of the Nemotron reward template: header, turn, and the score position.
const NEMOTRON_MARKERS: [&str; 3] = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"];

/// How messages become text and tokens.
#[derive(Debug)]
pub enum ChatTemplate {
    /// `<extra_id_0>System\n{system}\n<extra_id_1>User\n{user}\n<extra_id_1>Assistant\n{assistant}\n...<extra_id_2>`,
    /// no BOS/EOS; the score is read at the final `<extra_id_2>`. The ids are what NeMo-Aligner
    /// fed the model, SentencePiece over the whole templated string (see
    /// [`TextTokenizer::encode_segments`]), except that marker strings written inside messages
    /// stay plain text, so message contents cannot forge turns; the markers are their single ids.
    NemotronReward {
        /// Ids of `<extra_id_0>`, `<extra_id_1>`, `<extra_id_2>`.
        markers: [u32; 3],
    },
    /// The model's own HF chat template.
    Jinja(Box<JinjaTemplate>),
    /// The model has no template: messages are refused, text and token ids work.
    None,
}

/// What a user asks to score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A conversation; the model's template is applied.
    Messages(Vec<Message>),
    /// Text already in the model's format; tokenized as is (special tokens recognized, none added).
    Text(String),
    /// Text tokenized as [`Input::Text`], with the special tokens the tokenizer's post-processor
    /// adds placed around it (BOS in front for Llama-family tokenizers; see
    /// [`TextTokenizer::special_tokens_around`]): what HF `tokenizer(text)` gives by default, and
    /// what vLLM scores for a text prompt. Truncation keeps those tokens and the text's end.
    TextWithSpecialTokens(String),
    /// Token ids, used as they are.
    TokenIds(Vec<u32>),
}

/// What to do with an input longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TruncationPolicy {
    /// Refuse it (the default: silently cut inputs change rewards).
    #[default]
    Error,
    /// Messages: drop whole oldest turns (user + assistant pairs), never the system header, the
    /// last user turn, the final assistant turn or the score marker. Text and token ids: keep
    /// the end, so the score position is never cut off.
    Truncate,
    /// Messages: cut contents by tokens and re-render: the start of the prompt's contents first
    /// (oldest turn first), then the start of the response; never the template's markers, the
    /// system message or the score position. Every conversation whose template and system
    /// message fit gets scored, which benchmarks need (a single-turn example has no whole turn
    /// to drop). Text and token ids: keep the end, as [`TruncationPolicy::Truncate`].
    TruncateContent,
}

impl FromStr for TruncationPolicy {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "error" => Ok(TruncationPolicy::Error),
            "truncate" => Ok(TruncationPolicy::Truncate),
            "truncate_content" => Ok(TruncationPolicy::TruncateContent),
            other => Err(EngineError::InvalidInput(format!(
                "unknown truncation policy {other:?}; expected \"error\", \"truncate\" or \"truncate_content\""
            ))),
        }
    }
}

impl TruncationPolicy {
    /// The policy's name.
    pub fn as_str(self) -> &'static str {
        match self {
            TruncationPolicy::Error => "error",
            TruncationPolicy::Truncate => "truncate",
            TruncationPolicy::TruncateContent => "truncate_content",
        }
    }
}

/// What truncation did to an input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Truncation {
    /// Tokens before truncation.
    pub original_tokens: usize,
    /// Messages dropped from the start of the conversation (after the system message).
    pub dropped_messages: usize,
    /// Tokens dropped from the start of text or token-id inputs, or cut from message contents
    /// ([`TruncationPolicy::TruncateContent`], counted as each content tokenizes on its own).
    pub dropped_tokens: usize,
}

impl Truncation {
    /// Whether anything was cut.
    pub fn truncated(&self) -> bool {
        self.dropped_messages > 0 || self.dropped_tokens > 0
    }
}

/// An input ready for the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The ids to score; the score is read at the last one.
    pub ids: Vec<u32>,
    /// The templated text, for message inputs.
    pub text: Option<String>,
    /// What truncation did.
    pub truncation: Truncation,
}

/// Turns inputs into token ids for one model.
#[derive(Debug)]
pub struct Preprocessor {
    tokenizer: Option<TextTokenizer>,
    template: ChatTemplate,
    vocab: usize,
    max_tokens: usize,
}

impl Preprocessor {
    /// Builds the preprocessor of the model folder `dir`: its `tokenizer.json` (optional: without
    /// it only token ids are accepted), and its template, chosen by `arbiter.chat_template` in
    /// config.json (`"nemotron-reward"` or `"jinja"`), else the Jinja template of
    /// tokenizer_config.json if there is one, else the Nemotron reward template for Nemotron
    /// models. `max_tokens` caps inputs below the model's own limit.
    pub fn from_model_dir(dir: &Path, spec: &ModelSpec, max_tokens: Option<usize>) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() { Some(TextTokenizer::from_file(&tok_path)?) } else { None };
        let jinja = JinjaTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json"))?;
        let nemotron = || -> Result<ChatTemplate> {
            let t = tokenizer.as_ref().ok_or_else(|| EngineError::MissingFile {
                path: tok_path.clone(),
                why: "the Nemotron reward template needs the tokenizer".into(),
            })?;
            let mut markers = [0u32; 3];
            for (m, name) in markers.iter_mut().zip(NEMOTRON_MARKERS) {
                *m = t.token_id(name).ok_or_else(|| EngineError::Tokenizer {
                    path: tok_path.clone(),
                    message: format!("the Nemotron reward template needs the special token {name}"),
                })?;
            }
            Ok(ChatTemplate::NemotronReward { markers })
        };
        let template = match (spec.chat_template.as_deref(), jinja) {
            (Some("nemotron-reward"), _) => nemotron()?,
            (Some("jinja"), Some(j)) | (None, Some(j)) => ChatTemplate::Jinja(Box::new(j)),
            (Some("jinja"), None) => {
                return Err(EngineError::Config {
                    path: dir.join("config.json"),
                    message: "arbiter.chat_template is \"jinja\" but tokenizer_config.json has no chat_template".into(),
                })
            }
            (Some(other), _) => {
                return Err(EngineError::Config {
                    path: dir.join("config.json"),
                    message: format!("arbiter.chat_template {other:?} is not \"nemotron-reward\" or \"jinja\""),
                })
            }
            (None, None) if spec.architecture.starts_with("Nemotron") && tokenizer.is_some() => nemotron()?,
            (None, None) => ChatTemplate::None,
        };
        Ok(Self::new(tokenizer, template, spec.vocab, max_tokens.unwrap_or(spec.max_positions).min(spec.max_positions)))
    }

    /// A preprocessor from parts.
    pub fn new(tokenizer: Option<TextTokenizer>, template: ChatTemplate, vocab: usize, max_tokens: usize) -> Self {
        Preprocessor { tokenizer, template, vocab, max_tokens }
    }

    /// The longest input accepted, in tokens.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The template in use.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The tokenizer, if the model folder has one.
    pub fn tokenizer(&self) -> Option<&TextTokenizer> {
        self.tokenizer.as_ref()
    }

    fn need_tokenizer(&self, what: &str) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "this model has no tokenizer.json, so {what} cannot be scored; send token ids"
            ))
        })
    }

    /// Renders a valid conversation to its text and ids, without truncation.
    pub fn render(&self, messages: &[Message]) -> Result<(String, Vec<u32>)> {
        match &self.template {
            ChatTemplate::NemotronReward { markers } => {
                let tok = self.need_tokenizer("messages")?;
                let (system, turns) = match messages.first() {
                    Some(m) if m.role == Role::System => (m.content.as_str(), &messages[1..]),
                    _ => (NEMOTRON_DEFAULT_SYSTEM, messages),
                };
                let mut bodies = vec![(0, format!("System\n{system}\n"))];
                for m in turns {
                    let who = if m.role == Role::User { "User" } else { "Assistant" };
                    bodies.push((1, format!("{who}\n{}\n", m.content)));
                }
                bodies.push((2, String::new()));
                let mut text = String::new();
                let mut segments = Vec::with_capacity(2 * bodies.len());
                for (marker, body) in &bodies {
                    text.push_str(NEMOTRON_MARKERS[*marker]);
                    text.push_str(body);
                    segments.push(Segment::Token(markers[*marker]));
                    if !body.is_empty() {
                        segments.push(Segment::Text(body));
                    }
                }
                let ids = tok.encode_segments(&segments)?;
                Ok((text, ids))
            }
            ChatTemplate::Jinja(j) => {
                let tok = self.need_tokenizer("messages")?;
                let text = j.render(messages)?;
                let ids = tok.encode(&text)?;
                Ok((text, ids))
            }
            ChatTemplate::None => Err(EngineError::InvalidInput(
                "this model has no chat template, so messages cannot be scored; send pre-templated text or token ids"
                    .into(),
            )),
        }
    }

    /// Validates, templates, tokenizes and (per `policy`) truncates one input.
    pub fn prepare(&self, input: &Input, policy: TruncationPolicy) -> Result<Prepared> {
        match input {
            Input::Messages(messages) => self.prepare_messages(messages, policy),
            Input::Text(text) => {
                if text.is_empty() {
                    return Err(EngineError::InvalidInput("the text is empty".into()));
                }
                let ids = self.need_tokenizer("text")?.encode(text)?;
                self.keep_end(ids, "the text", policy)
            }
            Input::TextWithSpecialTokens(text) => {
                if text.is_empty() {
                    return Err(EngineError::InvalidInput("the text is empty".into()));
                }
                let tok = self.need_tokenizer("text")?;
                let (before, after) = tok.special_tokens_around()?;
                let body = tok.encode(text)?;
                let n = before.len() + body.len() + after.len();
                let room = self.max_tokens.saturating_sub(before.len() + after.len());
                if n > self.max_tokens && room > 0 && policy != TruncationPolicy::Error {
                    // Cut the text's start only: the special tokens frame it as the model expects.
                    let mut kept = self.keep_end_within(body, room, "the text", policy)?;
                    kept.truncation.original_tokens = n;
                    kept.ids = [before, kept.ids, after].concat();
                    return Ok(kept);
                }
                self.keep_end([before, body, after].concat(), "the text", policy)
            }
            Input::TokenIds(ids) => {
                if ids.is_empty() {
                    return Err(EngineError::InvalidInput("token_ids is empty".into()));
                }
                if let Some((i, t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= self.vocab) {
                    return Err(EngineError::InvalidInput(format!(
                        "token_ids[{i}]: {t} is outside the vocabulary (ids are below {})",
                        self.vocab
                    )));
                }
                self.keep_end(ids.clone(), "token_ids", policy)
            }
        }
    }

    fn keep_end(&self, ids: Vec<u32>, what: &str, policy: TruncationPolicy) -> Result<Prepared> {
        self.keep_end_within(ids, self.max_tokens, what, policy)
    }

    /// [`Preprocessor::keep_end`] with room for `max` tokens (fewer than the model's limit when
    /// special tokens are added around the ids).
    fn keep_end_within(&self, ids: Vec<u32>, max: usize, what: &str, policy: TruncationPolicy) -> Result<Prepared> {
        let n = ids.len();
        if n == 0 {
            return Err(EngineError::InvalidInput(format!("{what} has no tokens")));
        }
        let mut truncation = Truncation { original_tokens: n, ..Default::default() };
        if n <= max {
            return Ok(Prepared { ids, text: None, truncation });
        }
        match policy {
            TruncationPolicy::Error => Err(EngineError::TooLong {
                what: what.to_string(),
                tokens: n,
                max: self.max_tokens,
                hint: " (truncation policy \"error\"; \"truncate\" keeps the last tokens)".into(),
            }),
            TruncationPolicy::Truncate | TruncationPolicy::TruncateContent => {
                truncation.dropped_tokens = n - max;
                Ok(Prepared { ids: ids[n - max..].to_vec(), text: None, truncation })
            }
        }
    }

    fn prepare_messages(&self, messages: &[Message], policy: TruncationPolicy) -> Result<Prepared> {
        self.prepare_messages_kept(messages, policy).map(|(p, _)| p)
    }

    /// [`Preprocessor::prepare`] for messages, with the conversation it rendered after
    /// truncation: what per-turn scoring cuts into turns.
    pub(super) fn prepare_messages_kept(
        &self,
        messages: &[Message],
        policy: TruncationPolicy,
    ) -> Result<(Prepared, Vec<Message>)> {
        validate_roles(messages)?;
        let (text, ids) = self.render(messages)?;
        if ids.is_empty() {
            return Err(EngineError::InvalidInput("the chat template rendered no tokens".into()));
        }
        let mut truncation = Truncation { original_tokens: ids.len(), ..Default::default() };
        if ids.len() <= self.max_tokens {
            return Ok((Prepared { ids, text: Some(text), truncation }, messages.to_vec()));
        }
        match policy {
            TruncationPolicy::Error => {
                return Err(EngineError::TooLong {
                    what: "the conversation".into(),
                    tokens: ids.len(),
                    max: self.max_tokens,
                    hint: " (truncation policy \"error\"; \"truncate\" drops the oldest turns, \"truncate_content\" cuts message text)".into(),
                })
            }
            TruncationPolicy::TruncateContent => return self.cut_contents(messages, ids.len(), truncation),
            TruncationPolicy::Truncate => {}
        }
        // Droppable: whole user+assistant pairs before the last user turn; dropping more never
        // makes the rendering longer, so the fewest pairs that fit are found by bisection.
        let head = usize::from(messages[0].role == Role::System);
        let pairs = (messages.len() - head - 2) / 2;
        let kept =
            |k: usize| -> Vec<Message> { messages[..head].iter().chain(&messages[head + 2 * k..]).cloned().collect() };
        let with_dropped = |k: usize| -> Result<(String, Vec<u32>)> { self.render(&kept(k)) };
        let protected = with_dropped(pairs)?;
        if protected.1.len() > self.max_tokens {
            return Err(EngineError::TooLong {
                what: "the system message, last user turn and final assistant turn alone".into(),
                tokens: protected.1.len(),
                max: self.max_tokens,
                hint: " (these are never truncated)".into(),
            });
        }
        let (mut lo, mut hi, mut best) = (1, pairs, protected);
        let mut best_k = pairs;
        while lo < hi {
            let mid = (lo + hi) / 2;
            let r = with_dropped(mid)?;
            if r.1.len() <= self.max_tokens {
                hi = mid;
                best = r;
                best_k = mid;
            } else {
                lo = mid + 1;
            }
        }
        if lo != best_k {
            best = with_dropped(lo)?;
            best_k = lo;
        }
        truncation.dropped_messages = 2 * best_k;
        Ok((Prepared { ids: best.1, text: Some(best.0), truncation }, kept(best_k)))
    }

    /// [`TruncationPolicy::TruncateContent`] for a conversation of `rendered` tokens, over the
    /// limit: cuts the fewest leading content tokens (the prompt's messages in order, then the
    /// response) it can find that make the re-rendered conversation fit.
    fn cut_contents(
        &self,
        messages: &[Message],
        rendered: usize,
        mut truncation: Truncation,
    ) -> Result<(Prepared, Vec<Message>)> {
        let tok = self.need_tokenizer("messages")?;
        let head = usize::from(messages[0].role == Role::System);
        // Every place a content can be cut, in cutting order: (message, byte where its kept
        // text starts). A message's first place is its start, so cutting exactly the messages
        // before it leaves it whole.
        let mut places = Vec::new();
        for (i, m) in messages.iter().enumerate().skip(head) {
            let starts = tok.token_starts(&m.content)?;
            places.extend(starts.iter().enumerate().map(|(j, &at)| (i, if j == 0 { 0 } else { at })));
        }
        let cut = |k: usize| -> Result<(String, Vec<u32>, Vec<Message>)> {
            let mut kept = messages.to_vec();
            for &(i, _) in &places[..k] {
                kept[i].content.clear();
            }
            if let Some(&(i, at)) = places.get(k) {
                kept[i].content = messages[i].content[at..].to_string();
            }
            let (text, ids) = self.render(&kept)?;
            Ok((text, ids, kept))
        };
        // Each content token cut removes about one rendered token: start at the excess and add
        // what is still over until it fits (a handful of renders; k only grows, so it ends).
        let mut k = (rendered - self.max_tokens).min(places.len());
        loop {
            let (text, ids, kept) = cut(k)?;
            if ids.len() <= self.max_tokens {
                truncation.dropped_tokens = k;
                return Ok((Prepared { ids, text: Some(text), truncation }, kept));
            }
            if k == places.len() {
                return Err(EngineError::TooLong {
                    what: "the template's markers and the system message alone".into(),
                    tokens: ids.len(),
                    max: self.max_tokens,
                    hint: " (these are never truncated)".into(),
                });
            }
            k = (k + ids.len() - self.max_tokens).min(places.len());
        }
    }
}
