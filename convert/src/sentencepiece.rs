//! Reads a SentencePiece model (its `ModelProto` protobuf, schema vendored in
//! `convert/proto/sentencepiece_model.proto`) and builds the `tokenizers` tokenizer that encodes
//! like it, so that `arbiter convert` needs no Python to write tokenizer.json.
//!
//! The tokenizer is the one `scripts/spm_to_tokenizer_json.py` builds, piece for piece (the tests
//! compare the two files), and the reasons are the script's: SentencePiece adds its dummy prefix
//! once, to the whole string, before it matches user-defined pieces in the text, so the dummy
//! prefix is a normalizer step and the user-defined pieces are special added tokens that
//! `TextTokenizer::encode_segments` places after normalization; control pieces (`<s>`, `</s>`)
//! stay plain vocabulary, since SentencePiece never matches them in text.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as DecoderStrip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Precompiled, Prepend, Replace, Sequence, Strip};
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, Tokenizer};

use crate::error::{io, ConvertError, Result};

/// The messages generated from the vendored schema.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/sentencepiece.rs"));
}

use proto::model_proto::sentence_piece::Type as PieceType;
use proto::trainer_spec::ModelType;

/// SentencePiece's escaped space.
const SPACE: &str = "\u{2581}";
/// A Unigram score no segmentation of real text takes: SentencePiece's Viterbi only considers
/// normal pieces, so the others keep their ids but must never spell text (e.g. `<s>` written in text).
const NEVER: f64 = -1e9;

/// A SentencePiece model file, parsed.
#[derive(Debug, Clone)]
pub struct SentencePieceModel {
    path: PathBuf,
    proto: proto::ModelProto,
}

impl SentencePieceModel {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io(path))?;
        Self::parse(path, &bytes)
    }

    /// Parses the bytes of a model file; `path` is only named in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let model = SentencePieceModel {
            path: path.to_path_buf(),
            proto: proto::ModelProto::decode(bytes).map_err(|e| ConvertError::SentencePiece {
                path: path.to_path_buf(),
                message: format!("not a SentencePiece model (ModelProto): {e}"),
            })?,
        };
        if model.proto.pieces.is_empty() {
            return Err(model.error("the model has no pieces".into()));
        }
        if let Some(i) = model.proto.pieces.iter().position(|p| p.piece().is_empty()) {
            return Err(model.error(format!("piece {i} is empty")));
        }
        Ok(model)
    }

    /// Number of pieces (the tokenizer's vocabulary before Megatron pads it).
    pub fn pieces(&self) -> usize {
        self.proto.pieces.len()
    }

    /// The model's kind: `"BPE"` or `"Unigram"` (`"word"` and `"char"` are refused when building).
    pub fn kind(&self) -> &'static str {
        match self.trainer().model_type() {
            ModelType::Bpe => "BPE",
            ModelType::Unigram => "Unigram",
            ModelType::Word => "word",
            ModelType::Char => "char",
        }
    }

    /// Whether the normalizer adds SentencePiece's dummy prefix.
    pub fn add_dummy_prefix(&self) -> bool {
        self.normalizer().add_dummy_prefix()
    }

    /// Whether the normalizer has a precompiled character map (e.g. `nmt_nfkc`; none with
    /// `identity`): the one part where `tokenizers` is known to differ from SentencePiece on some
    /// inputs (docs/convert.md).
    pub fn has_charsmap(&self) -> bool {
        !self.normalizer().precompiled_charsmap().is_empty()
    }

    fn trainer(&self) -> proto::TrainerSpec {
        self.proto.trainer_spec.clone().unwrap_or_default()
    }

    fn normalizer(&self) -> proto::NormalizerSpec {
        self.proto.normalizer_spec.clone().unwrap_or_default()
    }

    fn error(&self, message: String) -> ConvertError {
        ConvertError::SentencePiece { path: self.path.clone(), message }
    }

    /// The `tokenizers` tokenizer that encodes whole strings as SentencePiece does (through
    /// arbiter's `TextTokenizer`, which normalizes the whole input before placing added tokens).
    pub fn to_tokenizer(&self) -> Result<Tokenizer> {
        let trainer = self.trainer();
        let norm = self.normalizer();
        // Settings the tokenizer below cannot express: refused rather than silently encoded otherwise.
        if trainer.treat_whitespace_as_suffix() {
            return Err(self
                .error("treat_whitespace_as_suffix is set; arbiter's tokenizer puts \"▁\" before words only".into()));
        }
        if !norm.escape_whitespaces() {
            return Err(
                self.error("escape_whitespaces is off; arbiter's tokenizer always escapes spaces as \"▁\"".into())
            );
        }
        let pieces = &self.proto.pieces;
        let unk_id = pieces.iter().position(|p| p.r#type() == PieceType::Unknown);
        let model: ModelWrapper = match trainer.model_type() {
            ModelType::Bpe => {
                let vocab: Vocab = pieces.iter().enumerate().map(|(i, p)| (p.piece().to_string(), i as u32)).collect();
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab, self.bpe_merges())
                    .byte_fallback(trainer.byte_fallback())
                    .fuse_unk(true);
                if let Some(u) = unk_id {
                    builder = builder.unk_token(pieces[u].piece().to_string());
                }
                builder.build().map_err(|e| self.error(format!("cannot build the BPE model: {e}")))?.into()
            }
            ModelType::Unigram => {
                let vocab = pieces
                    .iter()
                    .map(|p| {
                        let score = if p.r#type() == PieceType::Normal { f64::from(p.score()) } else { NEVER };
                        (p.piece().to_string(), score)
                    })
                    .collect();
                Unigram::from(vocab, unk_id, trainer.byte_fallback())
                    .map_err(|e| self.error(format!("cannot build the Unigram model: {e}")))?
                    .into()
            }
            ModelType::Word | ModelType::Char => {
                return Err(self.error(format!(
                    "a {} model: arbiter converts BPE and Unigram SentencePiece models only",
                    self.kind()
                )))
            }
        };
        let mut tok = Tokenizer::new(model);

        // SentencePiece's normalizer, in its order: character map, whitespace clean-up, dummy
        // prefix, spaces escaped as "▁".
        let mut steps: Vec<NormalizerWrapper> = Vec::new();
        if !norm.precompiled_charsmap().is_empty() {
            check_charsmap(norm.precompiled_charsmap())
                .map_err(|e| self.error(format!("normalizer_spec.precompiled_charsmap: {e}")))?;
            let map = Precompiled::from(norm.precompiled_charsmap())
                .map_err(|e| self.error(format!("normalizer_spec.precompiled_charsmap: {e}")))?;
            steps.push(map.into());
        }
        let replace = |pattern: ReplacePattern, content: &str| -> Result<NormalizerWrapper> {
            Replace::new(pattern, content)
                .map(Into::into)
                .map_err(|e| self.error(format!("cannot build the normalizer: {e}")))
        };
        if norm.remove_extra_whitespaces() {
            steps.push(Strip::new(true, true).into());
            steps.push(replace(ReplacePattern::Regex(" {2,}".into()), " ")?);
        }
        if norm.add_dummy_prefix() {
            steps.push(Prepend::new(" ".into()).into());
        }
        steps.push(replace(ReplacePattern::String(" ".into()), SPACE)?);
        tok.with_normalizer(Some(Sequence::new(steps)))
            .map_err(|e| self.error(format!("cannot set the normalizer: {e}")))?;

        let mut decoders: Vec<DecoderWrapper> =
            vec![Replace::new(SPACE, " ").map_err(|e| self.error(format!("cannot build the decoder: {e}")))?.into()];
        if trainer.byte_fallback() {
            decoders.push(ByteFallback::new().into());
        }
        decoders.push(Fuse::new().into());
        if norm.add_dummy_prefix() {
            decoders.push(DecoderStrip::new(' ', 1, 0).into());
        }
        tok.with_decoder(Some(DecoderSequence::new(decoders)));

        // User-defined pieces are matched in text; the engine places them after normalization.
        let user_defined: Vec<AddedToken> = pieces
            .iter()
            .filter(|p| p.r#type() == PieceType::UserDefined)
            .map(|p| AddedToken::from(p.piece().to_string(), true))
            .collect();
        tok.add_special_tokens(user_defined)
            .map_err(|e| self.error(format!("cannot add the user-defined pieces: {e}")))?;
        for (i, p) in pieces.iter().enumerate().filter(|(_, p)| p.r#type() == PieceType::UserDefined) {
            if tok.token_to_id(p.piece()) != Some(i as u32) {
                return Err(self.error(format!(
                    "user-defined piece {:?} would get id {:?}, not {i} (is it in the vocabulary twice?)",
                    p.piece(),
                    tok.token_to_id(p.piece())
                )));
            }
        }
        Ok(tok)
    }

    /// Writes the tokenizer as `tokenizer.json` at `path` (pretty-printed, as the script does).
    pub fn write_tokenizer_json(&self, path: &Path) -> Result<()> {
        self.to_tokenizer()?
            .save(path, true)
            .map_err(|e| ConvertError::Tokenizer(format!("cannot write {}: {e}", path.display())))
    }

    /// Merges that make HF's BPE pick what SentencePiece's BPE picks: SentencePiece merges the
    /// adjacent pair whose concatenation is the highest-scoring piece, so every split of a normal
    /// piece into two known normal pieces becomes a merge ranked by that piece's score (ties: by
    /// the piece's id, then the left part's).
    fn bpe_merges(&self) -> Vec<(String, String)> {
        let pieces = &self.proto.pieces;
        let normal: HashMap<&str, usize> = pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.r#type() == PieceType::Normal)
            .map(|(i, p)| (p.piece(), i))
            .collect();
        let mut merges = Vec::new();
        for (i, p) in pieces.iter().enumerate().filter(|(_, p)| p.r#type() == PieceType::Normal) {
            let s = p.piece();
            for (k, _) in s.char_indices().skip(1) {
                let (left, right) = s.split_at(k);
                if let (Some(&l), Some(&r)) = (normal.get(left), normal.get(right)) {
                    merges.push((p.score(), i, l, r, left, right));
                }
            }
        }
        merges.sort_by(|a, b| {
            b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3))
        });
        merges.into_iter().map(|m| (m.4.to_string(), m.5.to_string())).collect()
    }
}

/// Checks that looking any text up in a precompiled character map stays inside it: tokenizers'
/// `Precompiled` indexes the map's double-array trie and its string table without bounds checks,
/// so a damaged map would panic at scoring time rather than fail here. The layout (SentencePiece's
/// normalizer.cc, read as spm_precompiled reads it): a little-endian u32 trie size in bytes, the
/// trie's u32 units, then NUL-separated UTF-8 replacements that the leaves point into.
fn check_charsmap(map: &[u8]) -> std::result::Result<(), String> {
    let size = map.get(..4).ok_or("shorter than its 4-byte trie size")?;
    let units = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize / 4;
    let trie =
        map.get(4..4 + 4 * units).ok_or_else(|| format!("a {units}-unit trie does not fit in {} bytes", map.len()))?;
    let units: Vec<usize> =
        trie.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let replacements = std::str::from_utf8(&map[4 + 4 * units.len()..]).map_err(|e| format!("replacements: {e}"))?;
    let offset = |u: usize| (u >> 10) << ((u & (1 << 9)) >> 6);
    let label = |u: usize| u & ((1 << 31) | 0xff);
    let has_leaf = |u: usize| (u >> 8) & 1 == 1;
    let value = |u: usize| u & ((1 << 31) - 1);
    let damaged = |at: usize| format!("damaged trie (a lookup reads unit {at} of {})", units.len());
    let root = *units.first().ok_or("the trie is empty")?;
    // Every node a lookup can reach, and every byte (NUL ends a lookup) it can read there.
    let mut todo = vec![offset(root)];
    let mut seen = std::collections::HashSet::new();
    while let Some(node) = todo.pop() {
        if !seen.insert(node) {
            continue;
        }
        for byte in 1..=0xffusize {
            let at = node ^ byte;
            let unit = *units.get(at).ok_or_else(|| damaged(at))?;
            if label(unit) != byte {
                continue;
            }
            let next = at ^ offset(unit);
            if has_leaf(unit) {
                let leaf = *units.get(next).ok_or_else(|| damaged(next))?;
                if !replacements.is_char_boundary(value(leaf)) {
                    return Err(format!("a replacement starts at byte {} of {}", value(leaf), replacements.len()));
                }
            }
            todo.push(next);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::model_proto::SentencePiece;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/released/nemotron-tiny/tiny_nemotron.model")
    }

    /// A model made here: `<unk>`, then one normal piece per character of `text`.
    fn handmade(kind: ModelType, edit: impl FnOnce(&mut proto::ModelProto)) -> Vec<u8> {
        let piece =
            |s: &str, t: PieceType| SentencePiece { piece: Some(s.into()), score: Some(-1.0), r#type: Some(t as i32) };
        let mut m = proto::ModelProto {
            pieces: vec![
                piece("<unk>", PieceType::Unknown),
                piece("\u{2581}", PieceType::Normal),
                piece("a", PieceType::Normal),
            ],
            trainer_spec: Some(proto::TrainerSpec { model_type: Some(kind as i32), ..Default::default() }),
            ..Default::default()
        };
        edit(&mut m);
        m.encode_to_vec()
    }

    #[test]
    fn the_fixture_model_reads_as_make_released_trained_it() {
        // tests/fixtures/make_released.py: BPE, 400 pieces, byte fallback, dummy prefix, pad 0 /
        // unk 1 / BOS 2 / EOS 3, then the ten <extra_id_N> markers as user-defined pieces.
        let m = SentencePieceModel::read(&fixture()).unwrap();
        assert_eq!((m.pieces(), m.kind(), m.add_dummy_prefix(), m.has_charsmap()), (400, "BPE", true, false));
        let tok = m.to_tokenizer().unwrap();
        let added = tok.get_added_tokens_decoder();
        for i in 0..10u32 {
            let t = &added[&(4 + i)];
            assert_eq!(
                (t.content.as_str(), t.special, t.normalized),
                (format!("<extra_id_{i}>").as_str(), true, false)
            );
        }
        assert_eq!(added.len(), 10, "control pieces (<s>, </s>) are vocabulary only: {added:?}");
        assert_eq!(
            (tok.token_to_id("<unk>"), tok.token_to_id("<s>"), tok.token_to_id("<0x00>").is_some()),
            (Some(1), Some(2), true)
        );
    }

    #[test]
    fn a_file_that_is_not_a_model_is_refused_naming_it() {
        let e = SentencePieceModel::parse(Path::new("x/broken.model"), &[0x0a, 0xff, 0x01]).unwrap_err().to_string();
        assert!(e.contains("x/broken.model") && e.contains("not a SentencePiece model"), "{e}");
        let e = SentencePieceModel::parse(Path::new("empty.model"), &[]).unwrap_err().to_string();
        assert!(e.contains("empty.model") && e.contains("no pieces"), "{e}");
    }

    #[test]
    fn what_the_tokenizer_cannot_express_is_refused() {
        let refused = |bytes: Vec<u8>| {
            SentencePieceModel::parse(Path::new("m.model"), &bytes).unwrap().to_tokenizer().unwrap_err().to_string()
        };
        let e = refused(handmade(ModelType::Word, |_| ()));
        assert!(e.contains("m.model") && e.contains("a word model"), "{e}");
        let e = refused(handmade(ModelType::Char, |_| ()));
        assert!(e.contains("a char model"), "{e}");
        let e = refused(handmade(ModelType::Bpe, |m| {
            m.trainer_spec.as_mut().unwrap().treat_whitespace_as_suffix = Some(true)
        }));
        assert!(e.contains("treat_whitespace_as_suffix"), "{e}");
        let e = refused(handmade(ModelType::Unigram, |m| {
            m.normalizer_spec = Some(proto::NormalizerSpec { escape_whitespaces: Some(false), ..Default::default() })
        }));
        assert!(e.contains("escape_whitespaces"), "{e}");
        let charsmap = |map: Vec<u8>| {
            refused(handmade(ModelType::Unigram, |m| {
                m.normalizer_spec =
                    Some(proto::NormalizerSpec { precompiled_charsmap: Some(map), ..Default::default() })
            }))
        };
        let e = charsmap(vec![1, 2, 3]);
        assert!(e.contains("precompiled_charsmap: shorter than its 4-byte trie size"), "{e}");
        let e = charsmap(vec![8, 0, 0, 0, 0, 0, 0, 0]);
        assert!(e.contains("a 2-unit trie does not fit in 8 bytes"), "{e}");
        // One unit, the root: the first byte looked up reads unit 0 ^ 1, past the end.
        let e = charsmap(vec![4, 0, 0, 0, 0, 0, 0, 0]);
        assert!(e.contains("damaged trie (a lookup reads unit 1 of 1)"), "{e}");
    }

    #[test]
    fn proto2_defaults_apply_to_fields_the_file_leaves_out() {
        // SentencePiece's schema: model_type UNIGRAM, add_dummy_prefix and remove_extra_whitespaces on.
        let m =
            SentencePieceModel::parse(Path::new("m.model"), &handmade(ModelType::Unigram, |m| m.trainer_spec = None))
                .unwrap();
        assert_eq!((m.kind(), m.add_dummy_prefix()), ("Unigram", true));
        let tok = m.to_tokenizer().unwrap();
        assert_eq!(tok.encode("  a   a ", false).unwrap().get_tokens(), ["\u{2581}", "a", "\u{2581}", "a"]);
    }
}
