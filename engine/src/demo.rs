//! The embedded demo model: a small random-weight Nemotron reward model with a real byte-level
//! BPE tokenizer that carries the `<extra_id_N>` markers, written deterministically by the
//! project itself (no download). Its scores are meaningless and are labelled so wherever shown.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

use crate::error::{EngineError, Result};
use crate::synth::write_random_model;
use crate::weights::Dtype;

/// Bumped whenever the demo model's bytes change, so caches are not reused across versions.
pub const DEMO_VERSION: u32 = 1;

/// The label every displayed demo score carries.
pub const DEMO_WARNING: &str = "demo model with random weights: its scores are meaningless";

/// Special tokens, in id order: BOS 2 and EOS 3 as in Nemotron; the three template markers.
const SPECIALS: [&str; 7] = ["<unk>", "<pad>", "<s>", "</s>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>"];
const VOCAB: usize = 2048;
const CORPUS: &str = include_str!("demo_corpus.txt");

/// The demo model's config.json: Nemotron-4-340B-Reward's architecture and head at toy size.
pub fn demo_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["NemotronForSequenceClassification"],
        "model_type": "nemotron",
        "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
        "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "hidden_act": "relu2", "norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        "bos_token_id": 2, "eos_token_id": 3,
        "id2label": {"0": "quality", "1": "toxicity", "2": "humor", "3": "creativity", "4": "helpfulness",
                     "5": "correctness", "6": "coherence", "7": "complexity", "8": "verbosity"},
        "arbiter": {
            "demo": true,
            "chat_template": "nemotron-reward",
            "exposed_attributes": ["helpfulness", "correctness", "coherence", "complexity", "verbosity"],
            "reward_weights": {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46,
                               "complexity": 0.47, "verbosity": -0.33}
        }
    })
}

/// The demo tokenizer as tokenizer.json text: byte-level BPE trained on an embedded corpus.
pub fn demo_tokenizer_json() -> Result<String> {
    let err = |e: tokenizers::Error| EngineError::Backend(format!("building the demo tokenizer: {e}"));
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(VOCAB)
        .min_frequency(2)
        .special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(err)?;
    tok.train(&mut trainer, CORPUS.lines()).map_err(err)?;
    tok.to_string(true).map_err(err)
}

/// Sizes the demo tokenizer and template can be put on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DemoPreset {
    /// The toy model `--demo` serves (hidden 256, 4 layers).
    #[default]
    Demo,
    /// The CPU benchmark's "bench-small" (hidden 1024, 8 layers, 16/4 heads, FFN 4096, vocab 32000), f32.
    BenchSmall,
}

impl std::str::FromStr for DemoPreset {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "demo" => Ok(DemoPreset::Demo),
            "bench-small" => Ok(DemoPreset::BenchSmall),
            other => Err(EngineError::InvalidInput(format!("unknown preset {other:?}; expected demo or bench-small"))),
        }
    }
}

/// Writes the demo model folder into `dir` (created if needed).
pub fn write_demo_model(dir: &Path) -> Result<()> {
    write_demo_preset(dir, DemoPreset::Demo)
}

/// Writes a random-weight model of `preset`'s size with the demo tokenizer and template.
pub fn write_demo_preset(dir: &Path, preset: DemoPreset) -> Result<()> {
    let mut config = demo_config();
    let dtype = match preset {
        DemoPreset::Demo => Dtype::BF16,
        DemoPreset::BenchSmall => {
            let bench = crate::synth::bench_small_config();
            for key in [
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
            ] {
                config[key] = bench[key].clone();
            }
            Dtype::F32
        }
    };
    write_random_model(dir, &config, dtype, 340, true)?;
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, demo_tokenizer_json()?).map_err(|e| EngineError::Io { path, source: e })
}

/// The demo model folder in the user's cache (`$XDG_CACHE_HOME/arbiter` or `~/.cache/arbiter`,
/// else the temp dir), written on first use.
pub fn ensure_demo_model() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("arbiter");
    let dir = base.join(format!("demo-v{DEMO_VERSION}"));
    if dir.join("tokenizer.json").exists() {
        return Ok(dir);
    }
    // Write aside and rename, so a concurrent or interrupted writer never leaves half a folder.
    let tmp = base.join(format!("demo-v{DEMO_VERSION}.tmp-{}", std::process::id()));
    write_demo_model(&tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.join("tokenizer.json").exists() => {
            std::fs::remove_dir_all(&tmp).ok();
            Ok(dir)
        }
        Err(e) => Err(EngineError::Io { path: dir, source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::TextTokenizer;

    #[test]
    fn the_demo_tokenizer_is_deterministic_and_has_the_markers_as_single_tokens() {
        let a = demo_tokenizer_json().unwrap();
        assert_eq!(a, demo_tokenizer_json().unwrap(), "same bytes every time");
        let tok = TextTokenizer::from_tokenizer(a.parse().unwrap());
        for (i, s) in SPECIALS.iter().enumerate() {
            assert_eq!(tok.token_id(s), Some(i as u32), "{s}");
        }
        assert!(tok.vocab_size() <= VOCAB);
        assert_eq!(tok.encode("<extra_id_1>User\n").unwrap()[0], 5);
        let ids = tok.encode("The assistant gives helpful answers.").unwrap();
        assert!(ids.len() < 12, "merges were learned: {ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), "The assistant gives helpful answers.");
    }
}
