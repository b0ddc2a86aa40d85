//! The memory plan printed when `serve` starts, and refused when it does not fit: per rank, the
//! weight slices, the activations of a full `--max-batch-tokens` batch, and workspace (see
//! engine/src/memory.rs), against the memory of the device the ranks run on.

use arbiter_engine::cpu::Precision;
use arbiter_engine::folder::ModelFolder;
use arbiter_engine::memory::{available_host_memory, gpu_memory, plan, Storage};
use arbiter_engine::parallel::Parallelism;
use arbiter_engine::runtime::Device;

use crate::error::CommandError;
use crate::serve::ServeArgs;

/// Plans the model `args` serves (its opened `folder`), logs the table, and refuses a plan that needs more than the
/// device has. Runs before loading, so a deployment that cannot fit fails in a second with
/// numbers, not after copying hundreds of gigabytes.
pub fn check(args: &ServeArgs, folder: &ModelFolder) -> Result<(), CommandError> {
    let (dir, spec) = (&folder.dir, &folder.spec);
    let par = Parallelism { tp: args.model.tp.into(), pp: args.model.pp.into() };
    let (storage, capacity, shared, what) = match args.model.device {
        // All CPU ranks of this process share its host memory.
        Device::Cpu => (
            match args.model.cpu_precision {
                Precision::F32 => Storage::CPU,
                Precision::Bf16 => Storage::CPU_BF16,
            },
            available_host_memory(),
            par.world_size() / usize::from(args.model.nodes).max(1),
            "available host memory",
        ),
        Device::Cuda(ordinal) => (Storage::CUDA, gpu_memory(ordinal), 1, "GPU memory"),
    };
    let plan =
        plan(spec, par, storage, args.max_batch_tokens.max(1)).map_err(CommandError::engine("planning memory"))?;
    tracing::info!(
        "memory plan ({} on {}, {}{}):\n{}",
        dir.display(),
        args.model.device,
        if spec.fp8.is_some() { "FP8 linear layers" } else { "unquantized" },
        capacity.map_or(String::new(), |c| format!(", {:.2} GB of {what}", c as f64 / 1e9)),
        plan.table()
    );
    if let Some(capacity) = capacity {
        plan.check(capacity, shared.max(1), what).map_err(CommandError::engine("checking the memory plan"))?;
    }
    Ok(())
}
