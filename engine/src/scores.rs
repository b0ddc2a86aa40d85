//! From raw head outputs to what users see: the exposed attributes by name and one reward.

use crate::error::{EngineError, Result};
use crate::spec::HeadSpec;

/// The score of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Every head output at the last token, in head order (exposed or not).
    pub raw: Vec<f32>,
    /// The exposed attributes, in the model's order, by name.
    pub attributes: Vec<(String, f32)>,
    /// `sum(weight * attribute)` over the exposed attributes.
    pub reward: f32,
}

/// Reward weights, one per exposed attribute, aligned with [`HeadSpec::exposed`].
#[derive(Debug, Clone, PartialEq)]
pub struct RewardWeights(pub Vec<f32>);

impl RewardWeights {
    /// The model's default weights.
    pub fn defaults(head: &HeadSpec) -> Self {
        RewardWeights(head.reward_weights.clone())
    }

    /// The defaults with some weights replaced by name. Unknown or unexposed names and
    /// non-finite values are errors that name the attribute.
    pub fn with_overrides<'a>(head: &HeadSpec, overrides: impl IntoIterator<Item = (&'a str, f32)>) -> Result<Self> {
        let mut w = head.reward_weights.clone();
        for (name, value) in overrides {
            let slot = head.exposed.iter().position(|&i| head.labels[i] == name).ok_or_else(|| {
                EngineError::InvalidInput(format!(
                    "unknown reward weight {name:?}; attributes are {}",
                    head.exposed.iter().map(|&i| head.labels[i].as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?;
            if !value.is_finite() {
                return Err(EngineError::InvalidInput(format!(
                    "reward weight {name:?} is {value}, not a finite number"
                )));
            }
            w[slot] = value;
        }
        Ok(RewardWeights(w))
    }
}

impl Score {
    /// Names the exposed outputs of `raw` and combines them with `weights`.
    pub fn from_raw(head: &HeadSpec, raw: Vec<f32>, weights: &RewardWeights) -> Self {
        let attributes: Vec<(String, f32)> = head.exposed.iter().map(|&i| (head.labels[i].clone(), raw[i])).collect();
        let reward = attributes.iter().zip(&weights.0).fold(0.0f32, |acc, ((_, v), w)| acc + w * v);
        Score { raw, attributes, reward }
    }
}

/// Output names of Nemotron-4-340B-Reward's head, in order (NeMo-Aligner's ALL_STEERLM_ATTRIBUTES).
pub const HELPSTEER_LABELS: [&str; 9] = [
    "quality",
    "toxicity",
    "humor",
    "creativity",
    "helpfulness",
    "correctness",
    "coherence",
    "complexity",
    "verbosity",
];

/// The default reward: the RewardBench weighting of the five HelpSteer2 attributes (the first four outputs are untrained).
pub const DEFAULT_REWARD_WEIGHTS: [(&str, f64); 5] =
    [("helpfulness", 0.3), ("correctness", 0.74), ("coherence", 0.46), ("complexity", 0.47), ("verbosity", -0.33)];

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> HeadSpec {
        HeadSpec {
            kind: crate::spec::HeadKind::Linear,
            labels: vec!["quality".into(), "helpfulness".into(), "verbosity".into()],
            exposed: vec![1, 2],
            reward_weights: vec![0.5, -0.25],
        }
    }

    #[test]
    fn exposed_attributes_and_weighted_reward() {
        let s = Score::from_raw(&head(), vec![9.0, 2.0, 4.0], &RewardWeights::defaults(&head()));
        assert_eq!(s.attributes, vec![("helpfulness".to_string(), 2.0), ("verbosity".to_string(), 4.0)]);
        assert_eq!(s.reward, 0.5 * 2.0 - 0.25 * 4.0);
    }

    #[test]
    fn overrides_by_name_and_their_errors() {
        let w = RewardWeights::with_overrides(&head(), [("verbosity", 1.0)]).unwrap();
        assert_eq!(w.0, vec![0.5, 1.0]);
        let e = RewardWeights::with_overrides(&head(), [("quality", 1.0)]).unwrap_err().to_string();
        assert!(e.contains("\"quality\"") && e.contains("helpfulness, verbosity"), "{e}");
        let e = RewardWeights::with_overrides(&head(), [("verbosity", f32::NAN)]).unwrap_err().to_string();
        assert!(e.contains("not a finite number"), "{e}");
    }
}
