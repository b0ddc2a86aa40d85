//! The model folder's `tokenizer.json`, through the `tokenizers` crate (no network features).

use std::path::Path;

use tokenizers::normalizer::Range;
use tokenizers::{NormalizedString, Normalizer, OffsetType, PreTokenizedString, PreTokenizer, Token, Tokenizer};

use crate::error::{EngineError, Result};

/// Part of an input assembled by a template: text to tokenize, or a token the template places
/// itself (a marker that message text cannot forge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'a> {
    /// Text, tokenized as part of the whole input; special-token strings in it stay text.
    Text(&'a str),
    /// A token id, emitted as is.
    Token(u32),
}

/// A tokenizer that encodes like SentencePiece does when the tokenizer has a normalizer: the
/// whole input is normalized as one string (so a dummy-prefix step applies once, at the very
/// start), and special tokens are then split out. The `tokenizers` library instead splits
/// special tokens out first and normalizes each piece on its own, which puts a dummy prefix after
/// every marker; for the Nemotron reward template that is not what the model was trained on
/// (NeMo-Aligner calls `SentencePieceProcessor.encode` on the whole templated string, see
/// docs/convert.md). Tokenizers without a normalizer (byte-level BPE: Llama 3, the demo model)
/// encode exactly as the library does.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Added tokens recognized in text, longest first, with their ids.
    added: Vec<(String, u32)>,
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
        let inner = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Self::from_tokenizer(inner))
    }

    /// Wraps an already built tokenizer.
    pub fn from_tokenizer(inner: Tokenizer) -> Self {
        let mut added: Vec<(String, u32)> =
            inner.get_added_tokens_decoder().into_iter().map(|(id, t)| (t.content, id)).collect();
        added.retain(|(s, _)| !s.is_empty());
        added.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        TextTokenizer { inner, added }
    }

    /// Token ids of `text`, special tokens written in it recognized; nothing added (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.inner.get_normalizer().is_none() {
            return self
                .inner
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| EngineError::InvalidInput(format!("cannot tokenize the text: {e}")));
        }
        let mut segments = Vec::new();
        let (mut start, mut i) = (0, 0);
        while i < text.len() {
            match self.added.iter().find(|(s, _)| text[i..].starts_with(s.as_str())) {
                Some((s, id)) => {
                    if start < i {
                        segments.push(Segment::Text(&text[start..i]));
                    }
                    segments.push(Segment::Token(*id));
                    i += s.len();
                    start = i;
                }
                None => i += text[i..].chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            segments.push(Segment::Text(&text[start..]));
        }
        self.encode_segments(&segments)
    }

    /// The tokens the tokenizer's post-processor places before and after a text's tokens when
    /// special tokens are asked for: what HF `tokenizer(text)` (`add_special_tokens=True`, the
    /// default) adds, and so what vLLM adds to a text prompt. BOS in front for Llama-family
    /// tokenizers (`TemplateProcessing` "<bos> $A"); nothing for a byte-level or absent
    /// post-processor. Found by post-processing a one-token placeholder and seeing what lands
    /// around it, so any post-processor (templates, sequences of them) is read the same way.
    pub fn special_tokens_around(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        const PLACEHOLDER: u32 = u32::MAX;
        let one = tokenizers::Encoding::from_tokens(vec![Token::new(PLACEHOLDER, String::new(), (0, 0))], 0);
        let processed = self
            .inner
            .post_process(one, None, true)
            .map_err(|e| EngineError::InvalidInput(format!("the tokenizer's post-processor failed: {e}")))?;
        let ids = processed.get_ids();
        let at = ids.iter().position(|&id| id == PLACEHOLDER).ok_or_else(|| {
            EngineError::InvalidInput("the tokenizer's post-processor dropped the text it was given".into())
        })?;
        Ok((ids[..at].to_vec(), ids[at + 1..].to_vec()))
    }

    /// Token ids of segments encoded as one input: the text is normalized as a whole (with the
    /// tokens' own strings in place), then split at the tokens, pre-tokenized and modelled piece
    /// by piece. Special-token strings inside [`Segment::Text`] are not recognized.
    pub fn encode_segments(&self, segments: &[Segment<'_>]) -> Result<Vec<u32>> {
        let failed = |e: tokenizers::Error| EngineError::InvalidInput(format!("cannot tokenize the text: {e}"));
        let mut whole = String::new();
        let mut tokens = Vec::new();
        for s in segments {
            match *s {
                Segment::Text(t) => whole.push_str(t),
                Segment::Token(id) => {
                    let content = self.inner.id_to_token(id).ok_or_else(|| {
                        EngineError::InvalidInput(format!("token id {id} is not in the tokenizer's vocabulary"))
                    })?;
                    tokens.push((whole.len()..whole.len() + content.len(), id, content.clone()));
                    whole.push_str(&content);
                }
            }
        }
        let mut normalized = NormalizedString::from(whole.as_str());
        if let Some(n) = self.inner.get_normalizer() {
            n.normalize(&mut normalized).map_err(failed)?;
        }
        // Where each placed token ended up in the normalized string.
        let mut spans = Vec::with_capacity(tokens.len());
        for (range, id, content) in tokens {
            // A prefix the normalizer inserts (SentencePiece's dummy "▁") is aligned with the
            // first original character, so the converted span may start with it: the token is
            // its own string inside that span, and what precedes it is text.
            let rewritten =
                || EngineError::InvalidInput(format!("the tokenizer's normalizer rewrote the token {content:?}"));
            let span = normalized.convert_offsets(Range::Original(range.clone())).ok_or_else(rewritten)?;
            let at = normalized.get()[span.clone()].find(content.as_str()).ok_or_else(rewritten)?;
            spans.push((span.start + at..span.start + at + content.len(), id, content));
        }
        let mut pre = PreTokenizedString::from(normalized);
        pre.split(|_, n| {
            let mut pieces = Vec::with_capacity(2 * spans.len() + 1);
            let mut at = 0;
            for (span, id, content) in &spans {
                if at < span.start {
                    pieces.push((n.slice(Range::Normalized(at..span.start)).expect("in bounds"), None));
                }
                let piece = n.slice(Range::Normalized(span.clone())).expect("in bounds");
                let len = piece.len();
                pieces.push((piece, Some(vec![Token::new(*id, content.clone(), (0, len))])));
                at = span.end;
            }
            if at < n.len() {
                pieces.push((n.slice(Range::Normalized(at..n.len())).expect("in bounds"), None));
            }
            Ok(pieces)
        })
        .map_err(failed)?;
        if let Some(p) = self.inner.get_pre_tokenizer() {
            p.pre_tokenize(&mut pre).map_err(failed)?;
        }
        let model = self.inner.get_model();
        pre.tokenize(|n| tokenizers::Model::tokenize(model, n.get())).map_err(failed)?;
        let encoding = pre.into_encoding(None, 0, OffsetType::Byte).map_err(failed)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Where each token of `text` starts, in bytes of `text`, ascending: the places text can be
    /// cut at a token boundary. Byte-level tokens that split a character start at that character.
    pub fn token_starts(&self, text: &str) -> Result<Vec<usize>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::InvalidInput(format!("cannot tokenize the text: {e}")))?;
        let mut starts: Vec<usize> = encoding
            .get_offsets()
            .iter()
            .map(|&(start, _)| {
                let mut at = start.min(text.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                at
            })
            .collect();
        starts.sort_unstable();
        starts.dedup();
        Ok(starts)
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The string of a token id, if the vocabulary has it.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Text of token ids (special tokens kept), for debugging templates.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| EngineError::InvalidInput(format!("cannot decode: {e}")))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
