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

use crate::backend::{Backend, HostTensor, StageLink};
use crate::batch::PackedBatch;
use crate::error::{EngineError, Result};
use crate::graph::{check_batch, Model, StageOutput};
use crate::parallel::local::{channel_link, ChannelLink, LocalGroup, MakeTensor};
use crate::parallel::{Parallelism, RankPlan};
use crate::spec::ModelSpec;
use crate::weights::WeightStore;

/// Where a rank's tensor constructor is published once its backend exists.
type MakerSlot<T> = Arc<Mutex<Option<MakeTensor<T>>>>;

type Reply = SyncSender<Result<Vec<Vec<f32>>>>;

struct Job {
    batch: Arc<PackedBatch>,
    reply: Reply,
}

/// The first failure of a group, shared by its ranks and its engine.
#[derive(Default)]
struct Failure {
    first: Mutex<Option<String>>,
    groups: Mutex<Vec<Arc<LocalGroup>>>,
}

impl Failure {
    fn get(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, why: String) -> String {
        let why = self.first.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(why).clone();
        for g in self.groups.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            g.poison(&why);
        }
        why
    }
}

/// A model split across ranks in this process, behind the same `forward` as an unsplit model.
pub struct ParallelEngine {
    spec: ModelSpec,
    par: Parallelism,
    name: String,
    jobs: Mutex<Vec<SyncSender<Job>>>,
    failure: Arc<Failure>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ParallelEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParallelEngine").field("par", &self.par).field("name", &self.name).finish()
    }
}

/// The ends of the links a rank uses.
struct RankLinks<T> {
    input: Option<ChannelLink<T>>,
    output: Option<ChannelLink<T>>,
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
        let (spec, _) = crate::graph::open_folder(dir)?;
        par.validate(&spec)?;
        let make_backend = Arc::new(make_backend);
        let failure = Arc::new(Failure::default());
        let ranks = par.ranks();

        // Tensor-parallel groups, one per stage.
        let groups: Vec<Arc<LocalGroup>> = (0..par.pp).map(|_| LocalGroup::new(par.tp, timeout)).collect();
        *failure.groups.lock().unwrap_or_else(|e| e.into_inner()) = groups.clone();
        let mut comms: Vec<_> = groups.iter().flat_map(|g| g.communicators()).map(Some).collect();

        // Links between consecutive stages, rank to same rank. Tensors cross as host copies and
        // are rebuilt on the receiving rank's backend by `make`, filled in once it exists.
        let makers: Vec<MakerSlot<B::Tensor>> = ranks.iter().map(|_| Arc::new(Mutex::new(None))).collect();
        let mut links: Vec<RankLinks<B::Tensor>> =
            ranks.iter().map(|_| RankLinks { input: None, output: None }).collect();
        for (i, r) in ranks.iter().enumerate() {
            if r.is_last_stage() {
                continue;
            }
            let next = i + par.tp;
            let slot = makers[next].clone();
            let make: MakeTensor<B::Tensor> = Arc::new(move |d: &[f32], rows, cols| {
                let f = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
                f.ok_or_else(|| EngineError::Parallel("activations arrived before the stage was loaded".into()))?(
                    d, rows, cols,
                )
            });
            let (tx, rx) = channel_link(par.pp, timeout, make);
            links[i].output = Some(tx);
            links[next].input = Some(rx);
        }

        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, Result<()>)>();
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for (i, (rank, links)) in ranks.iter().copied().zip(links).enumerate() {
            let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(par.pp.max(1) * 2);
            jobs.push(job_tx);
            let comm = comms[i].take().expect("one communicator per rank");
            let (dir, make_backend, failure, ready_tx, maker) =
                (dir.to_path_buf(), make_backend.clone(), failure.clone(), ready_tx.clone(), makers[i].clone());
            let spec = spec.clone();
            let handle = std::thread::Builder::new()
                .name(format!("rank-{}-{}", rank.stage, rank.tp_rank))
                .spawn(move || {
                    let loaded = (|| -> Result<Model<B>> {
                        let backend = make_backend(&rank)?;
                        let store = WeightStore::open(&dir)?;
                        let model = Model::load_rank(spec, &store, backend, rank, Box::new(comm))?;
                        Ok(model)
                    })();
                    let model = match loaded {
                        Ok(m) => {
                            let _ = ready_tx.send((i, Ok(())));
                            m
                        }
                        Err(e) => {
                            let why = failure.set(format!("{} failed to load: {e}", rank.label()));
                            let _ = ready_tx.send((i, Err(EngineError::Parallel(why))));
                            return;
                        }
                    };
                    drop(ready_tx);
                    let model = Arc::new(model);
                    {
                        let m = model.clone();
                        let make: MakeTensor<B::Tensor> =
                            Arc::new(move |d: &[f32], rows, cols| m.backend().upload(d, rows, cols));
                        *maker.lock().unwrap_or_else(|e| e.into_inner()) = Some(make);
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
                Ok((_, Ok(()))) => {}
                Ok((_, Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(EngineError::Parallel("a rank thread died while loading".into()));
                    break;
                }
            }
        }
        let name = format!("{} x tp{} pp{}", spec.architecture, par.tp, par.pp);
        let engine = ParallelEngine { spec, par, name, jobs: Mutex::new(jobs), failure, threads };
        match first_error {
            Some(e) => Err(e), // dropping the engine stops the ranks that did load
            None => Ok(engine),
        }
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
        let batch = Arc::new(batch.clone());
        let (reply, answer) = std::sync::mpsc::sync_channel(self.par.world_size());
        {
            // One lock around the whole dispatch: every rank sees batches in the same order.
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            for tx in jobs.iter() {
                if tx.send(Job { batch: batch.clone(), reply: reply.clone() }).is_err() {
                    return Err(EngineError::Parallel(
                        self.failure.get().unwrap_or_else(|| "a rank has stopped".into()),
                    ));
                }
            }
        }
        drop(reply);
        answer.recv().unwrap_or_else(|_| {
            Err(EngineError::Parallel(
                self.failure.get().unwrap_or_else(|| "the ranks stopped without an answer".into()),
            ))
        })
    }
}

impl Drop for ParallelEngine {
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.failure.set("the engine is shutting down".into());
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
                Some(link) => Some(link.recv(job.batch.tokens().len(), hidden)?),
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
