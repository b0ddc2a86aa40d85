//! Per-turn scoring: a reward after every assistant turn of a conversation, from one pass over it.
//!
//! The conversation (after truncation) is the spine. The score after assistant turn `t` is the
//! score of the conversation stopped at `t`, whose ids are, for templates that only append, the
//! spine's ids up to the end of that turn followed by the template's closing tokens. Such a turn
//! is computed as a short branch off the spine: it attends to the spine's first `seen` tokens and
//! carries only the closing tokens. Whether that holds is checked on token ids for every turn;
//! a turn whose stopped conversation is not such a prefix plus closing (a template that rewrites
//! earlier turns, like Qwen3 removing earlier reasoning) is scored as its own sequence instead.
//! Either way its ids are exactly those of the stopped conversation scored alone.

use super::chat::{Message, Role};
use super::prepare::{ChatTemplate, Prepared, Preprocessor, TruncationPolicy};
use crate::error::Result;

/// How the score after one assistant turn is computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnRead {
    /// A branch off the spine: its first `seen` ids, then `closing` (possibly none: the score is
    /// read at spine row `seen - 1`).
    Spine {
        /// Spine ids the turn's sequence starts with.
        seen: usize,
        /// The ids that follow them (the template's closing tokens, less those the spine repeats).
        closing: Vec<u32>,
    },
    /// Its own sequence: the template renders the conversation stopped here differently from the
    /// spine's beginning, so sharing would change its tokens.
    Alone(Vec<u32>),
    /// Truncation dropped or cut this turn: it gets no score.
    CutAway,
}

/// One assistant turn of a per-turn request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Index of the turn's message in the request's messages.
    pub message: usize,
    /// How its score is computed.
    pub read: TurnRead,
}

impl Turn {
    /// Tokens of the conversation stopped at this turn (0 for a turn cut away).
    pub fn tokens(&self) -> usize {
        match &self.read {
            TurnRead::Spine { seen, closing } => seen + closing.len(),
            TurnRead::Alone(ids) => ids.len(),
            TurnRead::CutAway => 0,
        }
    }
}

/// A conversation prepared for per-turn scoring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedTurns {
    /// The whole conversation as [`Preprocessor::prepare`] prepares it: the spine.
    pub spine: Prepared,
    /// Every assistant turn of the request, in order; the last one reads the spine's last row.
    pub turns: Vec<Turn>,
}

impl Preprocessor {
    /// Prepares `messages` (a conversation ending with an assistant turn) for a score after every
    /// assistant turn. The spine is prepared exactly as [`Preprocessor::prepare`] would, with
    /// `policy`; each turn's sequence is the spine's conversation stopped at that turn.
    pub fn prepare_turns(&self, messages: &[Message], policy: TruncationPolicy) -> Result<PreparedTurns> {
        let (spine, kept) = self.prepare_messages_kept(messages, policy)?;
        let head = usize::from(messages[0].role == Role::System);
        // `kept` is the system message, then the messages from `head + dropped` on, contents
        // possibly cut (truncate_content drops no message).
        let dropped = spine.truncation.dropped_messages;
        let original = |j: usize| if j < head { j } else { j + dropped };
        let mut turns: Vec<Turn> = (head..head + dropped)
            .filter(|&i| messages[i].role == Role::Assistant)
            .map(|message| Turn { message, read: TurnRead::CutAway })
            .collect();
        let last = kept.len() - 1;
        for (j, m) in kept.iter().enumerate().filter(|(_, m)| m.role == Role::Assistant) {
            let message = original(j);
            let read = if m.content != messages[message].content {
                TurnRead::CutAway
            } else if j == last {
                TurnRead::Spine { seen: spine.ids.len(), closing: Vec::new() }
            } else {
                self.turn_read(&kept[..=j], &spine.ids)?
            };
            turns.push(Turn { message, read });
        }
        Ok(PreparedTurns { spine, turns })
    }

    /// How the conversation `stopped` (a prefix of the spine's conversation, ending with an
    /// assistant turn) is scored: on the spine when its ids are spine ids followed by the
    /// template's closing tokens, else alone.
    fn turn_read(&self, stopped: &[Message], spine: &[u32]) -> Result<TurnRead> {
        let (text, ids) = self.render(stopped)?;
        if ids.len() > self.max_tokens() {
            // Only a template that renders a stopped conversation longer than the whole one.
            return Ok(TurnRead::CutAway);
        }
        let closing = self.closing(stopped, &text)?;
        let on_spine = closing.as_ref().and_then(|c| {
            let seen = ids.len().checked_sub(c.len())?;
            (ids.ends_with(c) && seen > 0 && spine.starts_with(&ids[..seen])).then_some(seen)
        });
        let Some(mut seen) = on_spine else { return Ok(TurnRead::Alone(ids)) };
        // Closing tokens the spine has at the same place are read from the spine itself.
        while seen < ids.len() && spine.get(seen) == Some(&ids[seen]) {
            seen += 1;
        }
        Ok(TurnRead::Spine { seen, closing: ids[seen..].to_vec() })
    }

    /// The ids the template puts after the last message's content when the conversation stops
    /// there, or `None` when they cannot be told apart from the content.
    fn closing(&self, stopped: &[Message], text: &str) -> Result<Option<Vec<u32>>> {
        match self.template() {
            // `<extra_id_2>` after the turn's trailing newline, which the spine shares.
            ChatTemplate::NemotronReward { markers } => Ok(Some(vec![markers[2]])),
            // Whatever the template renders after the content: `<|eot_id|>`, `<|im_end|>\n`, ...
            // Templates that trim contents are found by the trimmed content.
            ChatTemplate::Jinja(_) => {
                let content = stopped.last().map_or("", |m| m.content.as_str());
                let end = text
                    .rfind(content)
                    .map(|at| at + content.len())
                    .or_else(|| text.rfind(content.trim()).map(|at| at + content.trim().len()));
                match (end, self.tokenizer()) {
                    (Some(end), Some(tok)) if end < text.len() => tok.encode(&text[end..]).map(Some),
                    (Some(_), Some(_)) => Ok(Some(Vec::new())),
                    _ => Ok(None),
                }
            }
            ChatTemplate::None => Ok(None),
        }
    }
}
