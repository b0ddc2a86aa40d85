//! Shared-prefix batches on the CPU: every item of a batch that computes a prefix once for its
//! branches scores bit for bit as that item's full sequence scored alone.

mod common;

use arbiter_engine::cpu::{CpuBackend, Precision};
use arbiter_engine::synth::SplitMix;
use arbiter_engine::{Model, PackedBatch};
use common::{fixture, random_tree_batch};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn random_trees_score_each_item_bit_identically_to_scoring_it_alone() {
    let cases = [
        ("nemotron-v4-gqa", 1u64, Precision::F32),
        ("llama3-scaled", 2, Precision::F32),
        ("gemma2", 3, Precision::F32),
        ("qwen3", 4, Precision::Bf16),
        ("gemma2", 5, Precision::Bf16),
    ];
    for (name, seed, precision) in cases {
        let model = Model::load(&fixture(name), CpuBackend::new().with_precision(precision)).unwrap();
        let name = format!("{name} ({precision})");
        let (vocab, max_len) = (model.spec().vocab, model.spec().max_positions.min(512));
        let mut rng = SplitMix::new(seed);
        for round in 0..4 {
            let (batch, items) = random_tree_batch(&mut rng, vocab, max_len, 300);
            assert!(batch.tokens().len() <= batch.item_tokens_total());
            let shared = model.forward(&batch).unwrap();
            assert_eq!(shared.len(), items.len());
            for (i, (got, ids)) in shared.iter().zip(&items).enumerate() {
                assert_eq!(batch.item_tokens(i), *ids, "{name} round {round}: item {i}'s sequence");
                let alone = model.forward(&PackedBatch::from_sequences(&[ids]).unwrap()).unwrap().remove(0);
                assert_eq!(bits(got), bits(&alone), "{name} round {round}: item {i} (length {})", ids.len());
            }
        }
    }
}

#[test]
fn a_group_of_candidates_costs_its_prefix_once() {
    let model = Model::load(&fixture("nemotron-v5"), CpuBackend::new()).unwrap();
    let prefix: Vec<u32> = (0..100).map(|i| (i * 7 % 200) as u32).collect();
    let branches: Vec<Vec<u32>> = (0..4).map(|b| (0..20).map(|i| (b * 31 + i) as u32 % 200).collect()).collect();
    let mut batch = PackedBatch::new();
    batch.push_group(&prefix, &branches).unwrap();
    assert_eq!(batch.tokens().len(), 100 + 4 * 20);
    assert_eq!(batch.item_tokens_total(), 4 * 120);
    let shared = model.forward(&batch).unwrap();
    let flat = model.forward(&batch.unshared()).unwrap();
    assert_eq!(shared.iter().map(|o| bits(o)).collect::<Vec<_>>(), flat.iter().map(|o| bits(o)).collect::<Vec<_>>());
}

#[test]
fn a_shared_item_longer_than_the_context_is_refused_and_named() {
    let model = Model::load(&fixture("nemotron-v5"), CpuBackend::new()).unwrap();
    let max = model.spec().max_positions;
    let mut batch = PackedBatch::new();
    batch.push(&[1, 2]).unwrap();
    batch.push_group(&vec![3u32; max - 2], &[vec![4u32; 2], vec![5u32; 3]]).unwrap();
    let e = model.forward(&batch).unwrap_err().to_string();
    assert!(e.contains(&format!("sequence 2 has {} tokens", max + 1)) && e.contains(&format!("at most {max}")), "{e}");
}
