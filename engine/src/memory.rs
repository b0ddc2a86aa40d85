//! The memory plan: what each rank holds (its weight slices, the activations of a full batch,
//! workspace), computed from the model's tensor list before anything is loaded, so that a
//! deployment that cannot fit is refused with numbers instead of failing half-way through a
//! 340 GB load.

use crate::error::{EngineError, Result};
use crate::plan::{Parallelism, RankPlan};
use crate::spec::ModelSpec;
use crate::tensors::{Place, Split, TensorTable};

/// Bytes per stored element, as a backend keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storage {
    /// Full-precision weights (embedding, norms, head, unquantized linear layers).
    pub dense: usize,
    /// Linear weights of an FP8 folder (plus one f32 scale per output row).
    pub fp8: usize,
    /// Activations between kernels.
    pub activation: usize,
    /// Fixed per-rank allowance for what the backend allocates besides tensors (CUDA context,
    /// cuBLASLt workspace, NCCL buffers); an allowance, not a measurement.
    pub overhead: u64,
}

impl Storage {
    /// The CPU backend: everything widened to f32 at load (FP8 weights dequantized), f32
    /// activations, no device context.
    pub const CPU: Storage = Storage { dense: 4, fp8: 4, activation: 4, overhead: 64 << 20 };
    /// The CPU backend in bf16 precision: bf16 weights and embedding, f32 activations (holding
    /// bf16 values); FP8 folders are refused in this precision.
    pub const CPU_BF16: Storage = Storage { dense: 2, fp8: 4, activation: 4, overhead: 64 << 20 };
    /// The CUDA backend: bf16 weights and activations; FP8 weights kept as e4m3 with f32 scales
    /// (cuda/fp8.rs); 1 GiB for the context, cuBLASLt and NCCL. Not counted: the f32 `[tokens,
    /// out]` buffer of the tensor-wide FP8 path, which only sm_89 GPUs take.
    pub const CUDA: Storage = Storage { dense: 2, fp8: 1, activation: 2, overhead: 1 << 30 };
}

/// One rank's share of memory, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankMemory {
    /// The rank.
    pub rank: RankPlan,
    /// The embedding table (first stage only; replicated on every rank of it).
    pub embedding: u64,
    /// Every other weight the rank holds: its slices of the linear layers (and their scales),
    /// norms, the head.
    pub weights: u64,
    /// Live activations of one batch of the planned token count.
    pub activations: u64,
    /// Scratch copies the kernels make, plus the backend's fixed allowance.
    pub workspace: u64,
}

impl RankMemory {
    /// Everything together.
    pub fn total(&self) -> u64 {
        self.embedding + self.weights + self.activations + self.workspace
    }
}

/// The plan for every rank of a layout.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// Per rank, stage-major.
    pub ranks: Vec<RankMemory>,
    /// The batch size in tokens the activations are planned for.
    pub batch_tokens: usize,
}

/// Plans `spec` split as `par`, stored as `storage` says, for batches of `batch_tokens` tokens.
pub fn plan(spec: &ModelSpec, par: Parallelism, storage: Storage, batch_tokens: usize) -> Result<MemoryPlan> {
    par.validate(spec)?;
    let table = TensorTable::new(spec);
    let t = batch_tokens as u64;
    let tp = par.tp as u64;
    let ranks = par
        .ranks()
        .into_iter()
        .map(|rank| {
            let (mut embedding, mut weights) = (0u64, 0u64);
            for tensor in table.iter().filter(|x| x.held_by(&rank, spec.layers)) {
                let fp8 = spec.fp8.as_ref().is_some_and(|q| q.quantizes(&tensor.name));
                let per = if fp8 { storage.fp8 } else { storage.dense } as u64;
                let (rows, cols) = tensor.slice(spec, &rank);
                let elements = (rows.len() * cols.len()) as u64;
                // One f32 scale per output row the rank holds.
                let scales = match tensor.split {
                    Split::Replicated => 0,
                    Split::Rows(_) | Split::Cols(_) => rows.len() as u64,
                };
                let bytes = elements * per + if fp8 { scales * 4 } else { 0 };
                if tensor.place == Place::Embedding {
                    embedding += bytes;
                } else {
                    weights += bytes;
                }
            }
            // The graph's live tensors, per token: the residual stream and its normed copy, then
            // the widest of the attention phase (fused qkv, attention output, o's partial sum)
            // and the MLP phase (up, activation, down's partial sum).
            let (h, w) = (spec.hidden as u64, storage.activation as u64);
            let attn = (spec.qkv_width() + spec.heads * spec.head_dim) as u64 / tp + h;
            let mlp = (spec.up_width() + spec.ffn) as u64 / tp + h;
            let activations = t * (2 * h + attn.max(mlp)) * w;
            // Scratch: the CPU GEMM packs its input (and FP8 rounds a copy of it); a GPU
            // quantizes it to e4m3. Planned as two copies of the widest GEMM input.
            let widest_input =
                [h, (spec.heads * spec.head_dim) as u64 / tp, spec.ffn as u64 / tp].into_iter().max().unwrap_or(h);
            let workspace = 2 * t * widest_input * w + storage.overhead;
            RankMemory { rank, embedding, weights, activations, workspace }
        })
        .collect();
    Ok(MemoryPlan { ranks, batch_tokens })
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

impl MemoryPlan {
    /// The largest rank total.
    pub fn max_rank_total(&self) -> u64 {
        self.ranks.iter().map(RankMemory::total).max().unwrap_or(0)
    }

    /// The sum over `ranks` (the ranks one process or one node holds).
    pub fn total_of(&self, ranks: &[RankPlan]) -> u64 {
        self.ranks.iter().filter(|r| ranks.contains(&r.rank)).map(RankMemory::total).sum()
    }

    /// A table, one line per rank (ranks with the same numbers folded into one line).
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<24} {:>12} {:>12} {:>14} {:>12} {:>12}\n",
            "ranks",
            "embedding",
            "weights",
            format!("act@{}tok", self.batch_tokens),
            "workspace",
            "total"
        );
        let mut i = 0;
        while i < self.ranks.len() {
            let r = &self.ranks[i];
            let same = |o: &RankMemory| {
                (o.embedding, o.weights, o.activations, o.workspace)
                    == (r.embedding, r.weights, r.activations, r.workspace)
            };
            let mut j = i + 1;
            while j < self.ranks.len() && same(&self.ranks[j]) {
                j += 1;
            }
            let label = if j - i == 1 {
                r.rank.label()
            } else {
                format!("{} .. {}", r.rank.label(), self.ranks[j - 1].rank.label())
            };
            out += &format!(
                "{label:<24} {:>12} {:>12} {:>14} {:>12} {:>12}\n",
                gb(r.embedding),
                gb(r.weights),
                gb(r.activations),
                gb(r.workspace),
                gb(r.total())
            );
            i = j;
        }
        out
    }

    /// Refuses the plan when a rank needs more than `capacity` bytes (`what` names the memory:
    /// "GPU memory", "available host memory"); `ranks_per_capacity` ranks share one capacity
    /// (all CPU ranks of a process share host memory; each GPU has its own).
    pub fn check(&self, capacity: u64, ranks_per_capacity: usize, what: &str) -> Result<()> {
        let need = if ranks_per_capacity > 1 {
            self.ranks.iter().take(ranks_per_capacity).map(RankMemory::total).sum()
        } else {
            self.max_rank_total()
        };
        if need > capacity {
            return Err(EngineError::Plan(format!(
                "the model needs {} of {what} ({} rank(s) on it) but {} is there: use more ranks (--tp, --pp) or a \
                 smaller --max-batch-tokens; on GPUs an FP8 folder (`arbiter quantize`) halves the linear \
                 layers\n{}",
                gb(need),
                ranks_per_capacity.max(1),
                gb(capacity),
                self.table()
            )));
        }
        Ok(())
    }
}

/// Host memory available to this process (`MemAvailable` of /proc/meminfo), if the system says.
pub fn available_host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Total memory of GPU `ordinal`, when this is a CUDA build and the driver is there to ask.
#[cfg(feature = "cuda")]
pub fn gpu_memory(ordinal: usize) -> Option<u64> {
    // cudarc aborts on a missing library; probe first.
    crate::cuda::probe::check_backend_libraries().ok()?;
    let ctx = cudarc::driver::CudaContext::new(ordinal).ok()?;
    ctx.mem_get_info().ok().map(|(_, total)| total as u64)
}

/// Without the CUDA build there is no GPU to ask (loading then says why).
#[cfg(not(feature = "cuda"))]
pub fn gpu_memory(_ordinal: usize) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;
    use crate::fp8::Fp8Scheme;
    use crate::synth::nemotron_340b_config;

    fn spec_340b(fp8: bool) -> ModelSpec {
        let mut c = nemotron_340b_config();
        if fp8 {
            c["quantization_config"] = Fp8Scheme::default().to_config();
        }
        parse_config(&c.to_string(), "config.json".as_ref()).unwrap()
    }

    #[test]
    fn the_340b_model_fits_8_x_80gb_in_fp8_with_headroom_and_not_in_bf16() {
        let par = Parallelism { tp: 8, pp: 1 };
        let fp8 = plan(&spec_340b(true), par, Storage::CUDA, 16384).unwrap();
        let r = &fp8.ranks[0];
        // The embedding: 256000 x 18432 bf16 on every rank.
        assert_eq!(r.embedding, 256_000 * 18_432 * 2);
        // Linear weights per layer: q 96x192, k and v 8x192 each, o, up and down, over 96
        // layers, one byte each, an eighth per rank.
        let per_layer = 18_432u64 * (96 * 192 + 2 * 8 * 192) + 96 * 192 * 18_432 + 2 * 73_728 * 18_432;
        assert!(r.weights >= 96 * per_layer / 8 && r.weights < 96 * per_layer / 8 + 100_000_000, "{}", r.weights);
        assert!(fp8.ranks.iter().all(|x| x == &RankMemory { rank: x.rank, ..r.clone() }));
        fp8.check(80_000_000_000, 1, "GPU memory").unwrap();
        assert!(r.total() < 70_000_000_000, "headroom: {}", fp8.table());
        let bf16 = plan(&spec_340b(false), par, Storage::CUDA, 16384).unwrap();
        let e = bf16.check(80_000_000_000, 1, "GPU memory").unwrap_err().to_string();
        assert!(e.contains("GPU memory") && e.contains("arbiter quantize"), "{e}");
        assert!(bf16.ranks[0].total() > 90_000_000_000);
    }

    #[test]
    fn layers_the_fp8_scheme_ignores_are_planned_at_full_precision_without_scales() {
        let par = Parallelism { tp: 8, pp: 1 };
        let all = plan(&spec_340b(true), par, Storage::CUDA, 16384).unwrap().ranks[0].weights;
        let mut c = nemotron_340b_config();
        let mut scheme = Fp8Scheme::default();
        scheme.keep_layer(0, &crate::tensors::module::UNGATED_LINEAR);
        c["quantization_config"] = scheme.to_config();
        let spec = parse_config(&c.to_string(), "config.json".as_ref()).unwrap();
        let kept = plan(&spec, par, Storage::CUDA, 16384).unwrap().ranks[0].weights;
        // Layer 0's linear weights, an eighth per rank: one more byte each (bf16 instead of
        // e4m3), less their f32 scales (column-parallel q/k/v and up: their slice of rows;
        // row-parallel o and down: every row).
        let params = 18_432u64 * (96 * 192 + 2 * 8 * 192) + 96 * 192 * 18_432 + 2 * 73_728 * 18_432;
        let scales = 4 * ((96 * 192 + 2 * 8 * 192 + 73_728) / 8 + 2 * 18_432);
        assert_eq!(kept - all, params / 8 - scales);
    }

    #[test]
    fn stages_hold_their_layers_and_only_the_first_the_embedding() {
        let spec = parse_config(&crate::synth::bench_small_config().to_string(), "c.json".as_ref()).unwrap();
        let one = plan(&spec, Parallelism::default(), Storage::CPU, 1000).unwrap();
        let two = plan(&spec, Parallelism { tp: 2, pp: 2 }, Storage::CPU, 1000).unwrap();
        let params: u64 =
            crate::tensors::tensor_shapes(&spec).iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
        assert_eq!(one.ranks[0].embedding + one.ranks[0].weights, params * 4);
        // bf16 precision keeps weights and embedding in two bytes.
        let bf16 = plan(&spec, Parallelism::default(), Storage::CPU_BF16, 1000).unwrap();
        assert_eq!(bf16.ranks[0].embedding + bf16.ranks[0].weights, params * 2);
        assert_eq!(bf16.ranks[0].activations, one.ranks[0].activations);
        assert_eq!(two.ranks[0].embedding, one.ranks[0].embedding);
        assert_eq!(two.ranks[3].embedding, 0);
        // Over the four ranks, every linear weight is held once, norms once per TP rank.
        let held: u64 = two.ranks.iter().map(|r| r.embedding + r.weights).sum();
        assert!(held > params * 4 + one.ranks[0].embedding && held < params * 4 * 2, "{held}");
        let e = one.check(1_000_000, 1, "available host memory").unwrap_err().to_string();
        assert!(e.contains("needs") && e.contains("stage 0 rank 0"), "{e}");
    }
}
