//! From what users send to token ids: tokenizers, chat templates, role validation, truncation.

mod chat;
mod jinja;
mod prepare;
mod tokenizer;
mod turns;

pub use chat::{validate_roles, Message, Role};
pub use jinja::JinjaTemplate;
pub use prepare::{ChatTemplate, Input, Prepared, Preprocessor, Truncation, TruncationPolicy, NEMOTRON_DEFAULT_SYSTEM};
pub use tokenizer::{Segment, TextTokenizer};
pub use turns::{PreparedTurns, Turn, TurnRead};
