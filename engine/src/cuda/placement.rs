//! Where each rank of a CUDA deployment runs: one GPU per rank of this node (`cuda:N` is the
//! first), the attention kernel compiled for the model's head size before loading, and one NCCL
//! clique per tensor-parallel stage. The rest of loading is the same for every backend
//! ([`crate::runtime`]).

use std::sync::Arc;

use super::nccl::{unique_id, NcclComm};
use super::CudaBackend;
use crate::error::Result;
use crate::folder::ModelFolder;
use crate::graph::Model;
use crate::parallel::runner::MakeComm;
use crate::plan::RankPlan;
use crate::runtime::{parallel_engine, Built, LoadOptions};

/// The model on the CUDA backend, the attention kernel compiled for its head size up front.
/// Split across ranks, each rank gets its own GPU of this node (`cuda:N` is the first one) and
/// the ranks of a stage all-reduce through NCCL; stages hand activations on in process, or to
/// the next node over its data connection.
pub(crate) fn cuda_engine(
    folder: &ModelFolder,
    fingerprint: &str,
    ordinal: usize,
    single: bool,
    opts: &LoadOptions,
) -> Result<Built> {
    if single {
        let backend = CudaBackend::new(ordinal)?;
        backend.prepare_attention(folder.spec.head_dim)?;
        return Ok((Arc::new(Model::from_store(folder.spec.clone(), &folder.store, backend)?), None));
    }
    let par = opts.parallel;
    let first_local_stage = opts.cluster.as_ref().map_or(0, |c| c.stages_of(&par, c.node_rank).start);
    let head_dim = folder.spec.head_dim;
    let make_backend = move |r: &RankPlan| {
        let backend = CudaBackend::new(ordinal + (r.stage - first_local_stage) * par.tp + r.tp_rank)?;
        backend.prepare_attention(head_dim)?;
        Ok(backend)
    };
    let make_comm: Option<MakeComm<CudaBackend>> = if par.tp > 1 {
        // One NCCL clique per local stage; its id never leaves this process.
        let ids = (0..par.pp).map(|_| unique_id()).collect::<Result<Vec<_>>>()?;
        let timeout = opts.collective_timeout;
        Some(Arc::new(move |r: &RankPlan, b: &CudaBackend| {
            Ok(Box::new(NcclComm::new(b, &ids[r.stage], r.tp_rank, par.tp, timeout)?) as Box<_>)
        }))
    } else {
        None
    };
    parallel_engine(folder, fingerprint, opts, make_backend, make_comm)
}
