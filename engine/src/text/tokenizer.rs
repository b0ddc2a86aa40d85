//! The model folder's `tokenizer.json`, through the `tokenizers` crate (no network features).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};

/// A tokenizer with two encoders: one that recognizes special tokens written in the text (for
/// pre-templated text), and one that treats them as plain text (for message contents, so a user
/// cannot forge template markers).
#[derive(Clone)]
pub struct TextTokenizer {
    special: Tokenizer,
    plain: Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer(vocab {})", self.vocab_size())
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(EngineError::MissingFile {
                path: path.to_path_buf(),
                why: "text and message inputs need the model's tokenizer.json".into(),
            });
        }
        let special = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Self::from_tokenizer(special))
    }

    /// Wraps an already built tokenizer.
    pub fn from_tokenizer(special: Tokenizer) -> Self {
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);
        TextTokenizer { special, plain }
    }

    /// Token ids of `text`, special tokens written in it recognized; nothing added (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Self::ids(&self.special, text)
    }

    /// Token ids of `text` with special-token strings treated as ordinary text.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Self::ids(&self.plain, text)
    }

    fn ids(t: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        t.encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::InvalidInput(format!("cannot tokenize the text: {e}")))
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.special.token_to_id(token)
    }

    /// Text of token ids (special tokens kept), for debugging templates.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.special.decode(ids, false).map_err(|e| EngineError::InvalidInput(format!("cannot decode: {e}")))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.special.get_vocab_size(true)
    }

    /// The underlying tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.special
    }
}
