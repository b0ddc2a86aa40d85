//! Runs one model across `tp x pp` ranks of this process, one thread per rank.
//!
//! Every rank gets every batch (the token ids are tiny); the first stage embeds, each stage hands
//! its residual stream to the same tensor-parallel rank of the next stage over a bounded link, and
//! rank 0 of the last stage answers. Links hold up to `pp` batches, so while stage 1 runs batch
//! `k` stage 0 already runs batch `k + 1`: callers get that overlap by calling
//! [`ParallelEngine::forward`] from up to [`ParallelEngine::pipeline_depth`] threads at once.
//!
//! A rank that fails makes the whole group fail for good: it poisons the collectives, drops its
//! links so its neighbours stop waiting, and every later call returns the first error. A serving
//! process reports NOT_SERVING and exits on it rather than limp on with a broken group.

use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backend::{Backend, Communicator, HostTensor, StageLink};
use crate::batch::PackedBatch;
use crate::error::{EngineError, Result};
use crate::folder::ModelFolder;
use crate::graph::{check_batch, Model, StageOutput};
use crate::parallel::failure::Failure;
use crate::parallel::local::{channel_link, LocalGroup, MakeTensor};
use crate::parallel::node::{Loading, NodeRole, NodeWiring, Outputs, Reply};
use crate::parallel::{Parallelism, RankPlan};
use crate::spec::ModelSpec;
use crate::sync::lock;

/// Builds a rank's tensor-parallel communicator from its backend.
pub type MakeComm<B> =
    Arc<dyn Fn(&RankPlan, &B) -> Result<Box<dyn Communicator<<B as Backend>::Tensor>>> + Send + Sync>;

/// Where a rank's tensor constructor is published once its backend exists.
type MakerSlot<T> = Arc<Mutex<Option<MakeTensor<T>>>>;

/// A tensor constructor for the rank whose slot this is: links are built before the ranks'
/// backends exist, so it looks the rank's real constructor up when activations arrive.
fn deferred_make<T: 'static>(slot: MakerSlot<T>) -> MakeTensor<T> {
    Arc::new(move |d: &[f32], rows, cols| {
        let f = lock(&slot).clone();
        f.ok_or_else(|| EngineError::Parallel("activations arrived before the stage was loaded".into()))?(d, rows, cols)
    })
}

/// One batch for one rank, and where rank 0 of the last stage answers.
struct Job {
    batch: Arc<PackedBatch>,
    reply: Reply,
}

/// A model split across ranks in this process, behind the same `forward` as an unsplit model.
pub struct ParallelEngine {
    spec: ModelSpec,
    par: Parallelism,
    name: String,
    /// Job queues of this node's ranks.
    jobs: Mutex<Vec<SyncSender<Job>>>,
    failure: Arc<Failure>,
    threads: Vec<JoinHandle<()>>,
    /// This node's part in a deployment of several.
    role: NodeRole,
    /// Whether this node runs the last stage (and so produces the answers).
    last_stage_here: bool,
}

impl std::fmt::Debug for ParallelEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParallelEngine").field("par", &self.par).field("name", &self.name).finish()
    }
}

/// The ends of the links a rank uses.
struct RankLinks<T> {
    input: Option<Box<dyn StageLink<T>>>,
    output: Option<Box<dyn StageLink<T>>>,
}

impl ParallelEngine {
    /// Loads the model folder `dir` split as `par`: one thread per rank, each building its backend
    /// with `make_backend`, memory-mapping the folder, and reading only its own slices. Collective
    /// calls and stage links give up after `timeout`.
    pub fn load<B, F>(dir: &Path, par: Parallelism, timeout: Duration, make_backend: F) -> Result<Self>
    where
        B: Backend + 'static,
        B::Tensor: HostTensor + 'static,
        F: Fn(&RankPlan) -> Result<B> + Send + Sync + 'static,
    {
        Self::load_node_with(&ModelFolder::open(dir)?, par, timeout, make_backend, None, None)
    }

    /// Like [`ParallelEngine::load`], with two additions. `make_comm`: each rank's
    /// tensor-parallel communicator is built from its backend (NCCL between GPUs) instead of the
    /// in-process one; the ranks of a stage call it concurrently, as collective initialisations
    /// require. `node`: for one node of several, load only this node's stages, link its first
    /// and last stage to the neighbouring nodes, and report to the leader (or, on the leader,
    /// wait until every worker has loaded).
    pub fn load_node_with<B, F>(
        folder: &ModelFolder,
        par: Parallelism,
        timeout: Duration,
        make_backend: F,
        make_comm: Option<MakeComm<B>>,
        node: Option<NodeWiring>,
    ) -> Result<Self>
    where
        B: Backend + 'static,
        B::Tensor: HostTensor + 'static,
        F: Fn(&RankPlan) -> Result<B> + Send + Sync + 'static,
    {
        let spec = folder.spec.clone();
        par.validate(&spec)?;
        let make_backend = Arc::new(make_backend);
        let failure = Arc::new(Failure::default());
        let local_stages = match &node {
            Some(n) => n.joined.config.stages_of(&par, n.joined.config.node_rank),
            None => 0..par.pp,
        };
        let ranks: Vec<RankPlan> = par.ranks().into_iter().filter(|r| local_stages.contains(&r.stage)).collect();

        // Tensor-parallel groups, one per stage.
        let groups: Vec<Arc<LocalGroup>> = local_stages.clone().map(|_| LocalGroup::new(par.tp, timeout)).collect();
        failure.watch(groups.clone());
        let mut comms: Vec<_> = groups.iter().flat_map(|g| g.communicators()).map(Some).collect();

        // Links between consecutive stages, rank to same rank. Tensors cross as host copies and
        // are rebuilt on the receiving rank's backend by `make`, filled in once it exists.
        let makers: Vec<MakerSlot<B::Tensor>> = ranks.iter().map(|_| Arc::new(Mutex::new(None))).collect();
        let mut links: Vec<RankLinks<B::Tensor>> =
            ranks.iter().map(|_| RankLinks { input: None, output: None }).collect();
        for (i, r) in ranks.iter().enumerate() {
            if r.stage + 1 == local_stages.end {
                continue; // the next stage, if any, is on another node
            }
            let next = i + par.tp;
            let (tx, rx) = channel_link(par.pp, timeout, deferred_make(makers[next].clone()));
            links[i].output = Some(Box::new(tx));
            links[next].input = Some(Box::new(rx));
        }
        let loading = match node {
            None => Loading::Alone,
            Some(n) => {
                let last = ranks.len() - par.tp;
                let (edges, loading) = n.split(
                    timeout,
                    |tp| deferred_make(makers[tp].clone()),
                    |tp| deferred_make(makers[last + tp].clone()),
                );
                for (i, link) in edges.inputs.into_iter().enumerate() {
                    links[i].input = Some(link);
                }
                for (i, link) in edges.outputs.into_iter().enumerate() {
                    links[last + i].output = Some(link);
                }
                loading
            }
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for (i, (rank, links)) in ranks.iter().copied().zip(links).enumerate() {
            let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(par.pp.max(1) * 2);
            jobs.push(job_tx);
            let comm = comms[i].take().expect("one communicator per rank");
            let (store, make_backend, failure, ready_tx, maker) =
                (folder.store.clone(), make_backend.clone(), failure.clone(), ready_tx.clone(), makers[i].clone());
            let make_comm = make_comm.clone();
            let spec = spec.clone();
            let handle = std::thread::Builder::new()
                .name(format!("rank-{}-{}", rank.stage, rank.tp_rank))
                .spawn(move || {
                    let loaded = (|| -> Result<Model<B>> {
                        let backend = make_backend(&rank)?;
                        let comm: Box<dyn Communicator<B::Tensor>> = match &make_comm {
                            Some(make) => make(&rank, &backend)?,
                            None => Box::new(comm),
                        };
                        let model = Model::load_rank(spec, &store, backend, rank, comm)?;
                        Ok(model)
                    })();
                    let model = match loaded {
                        Ok(m) => {
                            let _ = ready_tx.send(Ok(()));
                            m
                        }
                        Err(e) => {
                            let why = failure.set(format!("{} failed to load: {e}", rank.label()));
                            let _ = ready_tx.send(Err(EngineError::Parallel(why)));
                            return;
                        }
                    };
                    drop(ready_tx);
                    let model = Arc::new(model);
                    {
                        let m = model.clone();
                        let make: MakeTensor<B::Tensor> =
                            Arc::new(move |d: &[f32], rows, cols| m.backend().upload(d, rows, cols));
                        *lock(&maker) = Some(make);
                    }
                    rank_loop(&model, rank, links, job_rx, &failure);
                })
                .map_err(|e| EngineError::Parallel(format!("cannot start the thread of {}: {e}", rank.label())))?;
            threads.push(handle);
        }
        drop(ready_tx);

        let mut first_error = None;
        for _ in 0..ranks.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(EngineError::Parallel("a rank thread died while loading".into()));
                    break;
                }
            }
        }
        let name = format!("{} x tp{} pp{}", spec.architecture, par.tp, par.pp);
        let mut engine = ParallelEngine {
            spec,
            par,
            name,
            jobs: Mutex::new(jobs),
            failure,
            threads,
            role: NodeRole::Alone,
            last_stage_here: local_stages.end == par.pp,
        };
        // On failure, dropping the engine stops the ranks that did load.
        engine.role = loading.finish(first_error.map_or(Ok(()), Err), &engine.failure, &mut engine.threads)?;
        Ok(engine)
    }

    /// Worker: runs the batches the leader sends until the leader goes away, and returns why
    /// it stopped (a worker never stops on its own). Failures of this node's ranks are reported
    /// to the leader at once, which stops the whole deployment.
    pub fn run_worker(&self) -> Result<()> {
        let NodeRole::Worker(worker) = &self.role else {
            return Err(EngineError::Parallel("run_worker on a node that is not a worker".into()));
        };
        worker.run(&self.failure, self.last_stage_here, |batch| self.dispatch(batch))
    }

    /// Sends a batch to this node's ranks (and, on the leader, to the workers); returns where the
    /// answer (or the first failure) arrives.
    fn dispatch(&self, batch: Arc<PackedBatch>) -> Result<Receiver<Outputs>> {
        let (reply, answer) = std::sync::mpsc::sync_channel(self.par.world_size() + 1);
        let failed = || EngineError::Parallel(self.failure.get().unwrap_or_else(|| "a rank has stopped".into()));
        // One lock around the whole dispatch: every rank and node sees batches in the same order.
        let jobs = lock(&self.jobs);
        self.role.send(&batch, &reply).map_err(|_| failed())?;
        for tx in jobs.iter() {
            if tx.send(Job { batch: batch.clone(), reply: reply.clone() }).is_err() {
                return Err(failed());
            }
        }
        Ok(answer)
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The layout.
    pub fn parallelism(&self) -> Parallelism {
        self.par
    }

    /// A name for logs: architecture and layout.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many batches may usefully be in flight at once (one per stage).
    pub fn pipeline_depth(&self) -> usize {
        self.par.pp
    }

    /// `Err` with the first failure once any rank has failed; the group cannot recover.
    pub fn health(&self) -> Result<()> {
        match self.failure.get() {
            Some(why) => Err(EngineError::Parallel(why)),
            None => Ok(()),
        }
    }

    /// Runs a packed batch through every stage; safe to call from several threads at once.
    pub fn forward(&self, batch: &PackedBatch) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.health()?;
        check_batch(&self.spec, batch)?;
        let answer = self.dispatch(Arc::new(batch.clone()))?;
        answer.recv().unwrap_or_else(|_| {
            Err(EngineError::Parallel(
                self.failure.get().unwrap_or_else(|| "the ranks stopped without an answer".into()),
            ))
        })
    }
}

impl Drop for ParallelEngine {
    fn drop(&mut self) {
        lock(&self.jobs).clear();
        self.failure.set("the engine is shutting down".into());
        self.role.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn rank_loop<B: Backend>(
    model: &Model<B>,
    rank: RankPlan,
    links: RankLinks<B::Tensor>,
    jobs: Receiver<Job>,
    failure: &Failure,
) where
    B::Tensor: HostTensor,
{
    let hidden = model.spec().hidden;
    for job in jobs {
        let run = || -> Result<()> {
            let input = match &links.input {
                Some(link) => Some(link.recv(model.computed_rows(&job.batch), hidden)?),
                None => None,
            };
            match model.forward_stage(&job.batch, input)? {
                StageOutput::Hidden(x) => match &links.output {
                    Some(link) => link.send(&x),
                    None => Err(EngineError::Parallel("a middle stage has no next stage".into())),
                },
                StageOutput::Outputs(out) => {
                    if rank.tp_rank == 0 {
                        let _ = job.reply.send(Ok(out));
                    }
                    Ok(())
                }
            }
        };
        if let Err(e) = run() {
            let why = failure.set(format!("{}: {e}", rank.label()));
            let _ = job.reply.send(Err(EngineError::Parallel(why)));
            // Dropping the links (by returning) wakes the neighbouring stages.
            return;
        }
    }
}
