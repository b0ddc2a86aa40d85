//! Rewrites a single-file model folder as two shards and an index, as transformers saves big
//! models.

use std::path::Path;

use serde_json::json;

/// Splits `dir/model.safetensors` into `model-00001-of-00002.safetensors` and
/// `model-00002-of-00002.safetensors` (tensors alternating) plus `model.safetensors.index.json`,
/// and removes the single file. Returns the shard file names.
pub fn split_into_two_shards(dir: &Path) -> [String; 2] {
    let names = [1, 2].map(|i| format!("model-0000{i}-of-00002.safetensors"));
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut shards: [Vec<(String, safetensors::tensor::TensorView<'_>)>; 2] = [Vec::new(), Vec::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, (name, view)) in st.tensors().into_iter().enumerate() {
        weight_map.insert(name.clone(), json!(names[i % 2]));
        shards[i % 2].push((name, view));
    }
    for (shard, file) in shards.into_iter().zip(&names) {
        safetensors::serialize_to_file(shard, None, &dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("model.safetensors.index.json"), json!({ "weight_map": weight_map }).to_string()).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    names
}
