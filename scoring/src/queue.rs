//! The queue and its batching policy: a bounded queue of jobs and engine threads that pack them
//! into batches by a token budget and a request cap.
//!
//! An engine thread takes whatever is waiting when it becomes free (continuous batching), so the
//! next batch accumulates while the current one computes. There is one engine thread per pipeline
//! stage of the model, so a split model has a batch in every stage at once. Jobs whose caller went
//! away or whose deadline passed are dropped before compute and counted. A failing batch fails
//! only its own jobs; a panic inside the engine is caught and reported as [`ScoreError::Panicked`].
//! When the engine reports itself broken (a model-parallel rank failed), `on_fatal` is called
//! once so that the owner stops serving instead of failing every request.
//!
//! A [`Job`] is the unit the queue packs: one sequence whose score is read at its last token.
//! Jobs of a batch that start with the same token ids compute that prefix once
//! ([`crate::grouping`]): the budget counts computed tokens, so a batch of candidates after one
//! long prompt holds many more of them. To find sharers, a batch may take a later job ahead of
//! an earlier one that does not fit; a job is passed over like that at most once, so no job is
//! overtaken by more than one batch of later arrivals.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arbiter_engine::runtime::Engine;
use arbiter_engine::sync::panic_message;
use metrics::{counter, gauge, histogram};
use tokio::sync::{oneshot, Notify};

use crate::error::{QueueError, ScoreError};
use crate::grouping::Plan;
pub use crate::grouping::{pack, Packed};
use crate::metrics as m;

/// Batching limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Token budget of one batch (a job longer than this runs alone).
    pub max_batch_tokens: usize,
    /// Sequences in one batch.
    pub max_batch_requests: usize,
    /// Jobs waiting before new work is refused (or, for callers that wait, held back).
    pub queue_capacity: usize,
    /// Shortest common token-id prefix that jobs from different requests share (computed once);
    /// the candidates of one Rank request share any. `None`: nothing is shared.
    pub shared_prefix_min: Option<usize>,
}

/// The default [`BatchConfig::shared_prefix_min`]: below this, sharing saves less than the
/// extra segment costs to pack and attend.
pub const DEFAULT_SHARED_PREFIX_MIN: usize = 64;

/// How far past the first job that does not fit a batch looks for jobs that share a prefix
/// with it (bounds the work of filling a batch from a long queue).
const LOOK_AHEAD: usize = 1024;

impl Default for BatchConfig {
    /// `arbiter serve`'s defaults.
    fn default() -> Self {
        BatchConfig {
            max_batch_tokens: 8192,
            max_batch_requests: 256,
            queue_capacity: 4096,
            shared_prefix_min: Some(DEFAULT_SHARED_PREFIX_MIN),
        }
    }
}

/// What the engine computed for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutput {
    /// Raw head outputs at the job's read row.
    pub raw: Vec<f32>,
    /// Raw head outputs of its per-turn branches, in their order (empty without any).
    pub turns: Vec<Vec<f32>>,
    /// Time spent in the queue.
    pub queue: Duration,
    /// Forward time of the batch that held it.
    pub inference: Duration,
}

/// Where a job's result goes; a dropped receiver means its caller went away.
pub type Reply = oneshot::Receiver<Result<JobOutput, ScoreError>>;

/// One sequence waiting to be scored, with the per-turn branches read off it.
#[derive(Debug)]
pub struct Job {
    pub(crate) ids: Vec<u32>,
    /// Per-turn branches: the first `seen` ids, then these closing ids.
    pub(crate) branches: Vec<(usize, Vec<u32>)>,
    reply: oneshot::Sender<Result<JobOutput, ScoreError>>,
    deadline: Option<Instant>,
    enqueued: Instant,
    /// The Rank request it is a candidate of: candidates share their prompt however short.
    pub(crate) request: Option<u64>,
    /// A batch already took later jobs ahead of this one; it may not happen again.
    overtaken: bool,
}

impl Job {
    /// A job for the (validated) token ids `ids`, and the receiver of its result.
    pub fn new(ids: Vec<u32>, deadline: Option<Instant>) -> (Self, Reply) {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            ids,
            branches: Vec::new(),
            reply: tx,
            deadline,
            enqueued: Instant::now(),
            request: None,
            overtaken: false,
        };
        (job, rx)
    }

    /// Adds per-turn branches, each the job's first `seen` ids (`1..=` its length) followed by
    /// closing ids, computed in the job's batch off its rows; their outputs come in
    /// [`JobOutput::turns`]. Such a job shares its rows with no other job.
    pub fn with_branches(mut self, branches: Vec<(usize, Vec<u32>)>) -> Self {
        self.branches = branches;
        self
    }

    /// Whether it keeps its rows to itself (it has branches).
    pub(crate) fn is_solo(&self) -> bool {
        !self.branches.is_empty()
    }

    /// Tokens its branches add to a batch.
    fn branch_tokens(&self) -> usize {
        self.branches.iter().map(|(_, c)| c.len()).sum()
    }

    /// Tokens of all its reads' full sequences: what it would compute with nothing shared.
    fn full_tokens(&self) -> usize {
        self.ids.len() + self.branches.iter().map(|(seen, c)| seen + c.len()).sum::<usize>()
    }

    /// Marks the job a candidate of Rank request `request` (an id unique among live requests):
    /// candidates batched together compute their common prefix once, whatever its length.
    pub fn candidate_of(mut self, request: u64) -> Self {
        self.request = Some(request);
        self
    }

    /// Tokens the job adds to a batch when it shares nothing: its ids and its branches' closing
    /// ids.
    pub fn tokens(&self) -> usize {
        self.ids.len() + self.branch_tokens()
    }
}

struct State {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Notified when jobs leave the queue or it closes, for callers waiting for space.
    space: Notify,
    cfg: BatchConfig,
    fatal: std::sync::Once,
    on_fatal: Option<OnFatal>,
}

impl Shared {
    /// The state, even after a panic elsewhere held the lock: every update of it is a single
    /// push, pop or flag, so it is never left half-done.
    fn lock(&self) -> MutexGuard<'_, State> {
        arbiter_engine::sync::lock(&self.state)
    }
}

/// Called once with the reason when the engine can no longer compute.
pub type OnFatal = Arc<dyn Fn(String) + Send + Sync>;

/// Handle to the queue and its engine threads.
pub struct Queue {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("cfg", &self.shared.cfg).finish()
    }
}

impl Queue {
    /// Starts one engine thread per pipeline stage of `engine`.
    pub fn start(engine: Arc<dyn Engine>, cfg: BatchConfig, on_fatal: Option<OnFatal>) -> std::io::Result<Self> {
        let cfg = BatchConfig {
            max_batch_tokens: cfg.max_batch_tokens.max(1),
            max_batch_requests: cfg.max_batch_requests.max(1),
            queue_capacity: cfg.queue_capacity.max(1),
            shared_prefix_min: cfg.shared_prefix_min,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State { jobs: VecDeque::new(), closed: false }),
            wake: Condvar::new(),
            space: Notify::new(),
            cfg,
            fatal: std::sync::Once::new(),
            on_fatal,
        });
        let threads = (0..engine.pipeline_depth().max(1))
            .map(|i| {
                let (s, engine) = (shared.clone(), engine.clone());
                std::thread::Builder::new()
                    .name(format!("arbiter-engine-{i}"))
                    .spawn(move || engine_loop(&s, engine.as_ref()))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Queue { shared, threads: Mutex::new(threads) })
    }

    /// The limits in force.
    pub fn config(&self) -> BatchConfig {
        self.shared.cfg
    }

    /// Enqueues all jobs or none: when they do not all fit, nothing is enqueued.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<(), QueueError> {
        let mut st = self.shared.lock();
        self.admit(&mut st, jobs).map_err(|(e, _)| e)
    }

    /// Enqueues all jobs, waiting for space while the queue is too full to take them together.
    /// Refused only when the queue closes or could never hold them all at once.
    pub async fn submit_waiting(&self, mut jobs: Vec<Job>) -> Result<(), QueueError> {
        loop {
            let notified = self.shared.space.notified();
            tokio::pin!(notified);
            {
                let mut st = self.shared.lock();
                // Registered before the lock is released, so a wake-up in between is not lost.
                notified.as_mut().enable();
                match self.admit(&mut st, jobs) {
                    Err((QueueError::Full { .. }, back)) if back.len() <= self.shared.cfg.queue_capacity => jobs = back,
                    other => return other.map_err(|(e, _)| e),
                }
            }
            notified.await;
        }
    }

    /// Enqueues `jobs` if they fit; otherwise hands them back with the reason.
    fn admit(&self, st: &mut State, jobs: Vec<Job>) -> Result<(), (QueueError, Vec<Job>)> {
        if st.closed {
            return Err((QueueError::Closed, jobs));
        }
        let depth = st.jobs.len();
        if depth + jobs.len() > self.shared.cfg.queue_capacity {
            return Err((QueueError::Full { depth, capacity: self.shared.cfg.queue_capacity }, jobs));
        }
        st.jobs.extend(jobs);
        gauge!(m::QUEUE_DEPTH).set(st.jobs.len() as f64);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Jobs waiting.
    pub fn depth(&self) -> usize {
        self.shared.lock().jobs.len()
    }

    /// Refuses new work, lets the engine threads finish what is queued, and waits for them.
    pub fn shutdown(&self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        self.shared.space.notify_waiters();
        let threads = std::mem::take(&mut *arbiter_engine::sync::lock(&self.threads));
        for t in threads {
            t.join().ok();
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn engine_loop(shared: &Shared, engine: &dyn Engine) {
    loop {
        let batch = {
            let mut st = shared.lock();
            while st.jobs.is_empty() && !st.closed {
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.jobs.is_empty() {
                return; // closed and drained
            }
            let batch = take_batch(&mut st.jobs, &shared.cfg);
            gauge!(m::QUEUE_DEPTH).set(st.jobs.len() as f64);
            batch
        };
        shared.space.notify_waiters();
        if !batch.is_empty() {
            run_batch(engine, batch, shared.cfg.shared_prefix_min);
            if let Err(e) = engine.health() {
                if let Some(on_fatal) = &shared.on_fatal {
                    shared.fatal.call_once(|| on_fatal(e.to_string()));
                }
            }
        }
    }
}

/// Pops the next batch: jobs in arrival order while the budget of computed tokens and the
/// request cap allow (always at least one), skipping jobs nobody waits for anymore; then later
/// jobs that share a prefix with the batch and still fit, unless that would pass over a job a
/// second time.
pub(crate) fn take_batch(queue: &mut VecDeque<Job>, cfg: &BatchConfig) -> Vec<Job> {
    let now = Instant::now();
    let (mut batch, mut plan) = (Vec::<Job>::new(), Plan::default());
    while let Some(front) = queue.front() {
        // Deadline first: a caller that gave up at its deadline also closed its receiver.
        if front.deadline.is_some_and(|d| d <= now) {
            let job = queue.pop_front().expect("front exists");
            counter!(m::DROPPED, "reason" => "deadline").increment(1);
            job.reply.send(Err(QueueError::DeadlineExceeded.into())).ok();
            continue;
        }
        if front.reply.is_closed() {
            queue.pop_front();
            counter!(m::DROPPED, "reason" => "cancelled").increment(1);
            continue;
        }
        let mut at = plan.place(&front.ids, front.request, cfg.shared_prefix_min, front.is_solo(), |k| &batch[k].ids);
        at.cost += front.branch_tokens();
        if !batch.is_empty()
            && (plan.computed() + at.cost > cfg.max_batch_tokens || batch.len() >= cfg.max_batch_requests)
        {
            break;
        }
        let job = queue.pop_front().expect("front exists");
        plan.add(batch.len(), &job.ids, job.request, job.is_solo(), at, |k| &batch[k].ids);
        batch.push(job);
    }
    if cfg.shared_prefix_min.is_none() {
        return batch;
    }
    let (mut k, mut passed) = (0, Vec::new());
    while k < queue.len().min(LOOK_AHEAD) && batch.len() < cfg.max_batch_requests {
        let job = &queue[k];
        let at = plan.place(&job.ids, job.request, cfg.shared_prefix_min, job.is_solo(), |i| &batch[i].ids);
        let live = !job.reply.is_closed() && job.deadline.is_none_or(|d| d > now);
        if live && at.group.is_some() && plan.computed() + at.cost <= cfg.max_batch_tokens {
            let job = queue.remove(k).expect("index is inside the queue");
            plan.add(batch.len(), &job.ids, job.request, false, at, |i| &batch[i].ids);
            batch.push(job);
            for i in passed.drain(..) {
                let passed_over: &mut Job = &mut queue[i];
                passed_over.overtaken = true;
            }
            continue;
        }
        if job.overtaken {
            break; // taking anything behind it would pass over it a second time
        }
        passed.push(k);
        k += 1;
    }
    batch
}

fn run_batch(engine: &dyn Engine, batch: Vec<Job>, shared_prefix_min: Option<usize>) {
    let start = Instant::now();
    let tokens: usize = batch.iter().map(Job::full_tokens).sum();
    let packed = pack(&batch, shared_prefix_min, engine.spec()).map_err(ScoreError::from_engine);
    let computed = packed.as_ref().map_or(tokens, |p| p.batch.tokens().len());
    let result = packed.and_then(|p| match catch_unwind(AssertUnwindSafe(|| engine.forward(&p.batch))) {
        Ok(Ok(raws)) if raws.len() == p.order.len() + p.branch_of.len() => {
            // Back to job order: the engine answers in the packed batch's item order, each job's
            // own read first, then the per-turn branches.
            let mut by_job = vec![(Vec::new(), Vec::new()); p.order.len()];
            let mut raws = raws.into_iter();
            for (&k, raw) in p.order.iter().zip(raws.by_ref()) {
                by_job[k].0 = raw;
            }
            for (&k, raw) in p.branch_of.iter().zip(raws) {
                by_job[k].1.push(raw);
            }
            Ok((by_job, p.groups))
        }
        Ok(Ok(raws)) => Err(ScoreError::Engine(format!(
            "the engine returned {} outputs for {} reads",
            raws.len(),
            p.order.len() + p.branch_of.len()
        ))),
        Ok(Err(e)) => Err(ScoreError::from_engine(e)),
        Err(panic) => Err(ScoreError::Panicked(panic_message(panic.as_ref()))),
    });
    let inference = start.elapsed();
    histogram!(m::INFERENCE_SECONDS).record(inference.as_secs_f64());
    histogram!(m::BATCH_SIZE).record(batch.len() as f64);
    histogram!(m::BATCH_TOKENS).record(computed as f64);
    match result {
        Ok((raws, groups)) => {
            counter!(m::ITEMS).increment(batch.len() as u64);
            counter!(m::TOKENS).increment(tokens as u64);
            counter!(m::PREFIX_TOKENS_SAVED).increment(tokens.saturating_sub(computed) as u64);
            counter!(m::PREFIX_GROUPS).increment(groups as u64);
            for (job, (raw, turns)) in batch.into_iter().zip(raws) {
                let queue = start.saturating_duration_since(job.enqueued);
                histogram!(m::QUEUE_SECONDS).record(queue.as_secs_f64());
                job.reply.send(Ok(JobOutput { raw, turns, queue, inference })).ok();
            }
        }
        Err(e) => {
            tracing::error!(sequences = batch.len(), tokens, computed, error = %e, "batch failed");
            counter!(m::BATCH_FAILURES, "reason" => e.reason()).increment(1);
            for job in batch {
                job.reply.send(Err(e.clone())).ok();
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arbiter_engine::spec::ModelSpec;
    use arbiter_engine::PackedBatch;

    /// An engine that fails batches holding token 13, panics on batches holding token 66, and
    /// breaks for good (as a model-parallel group whose rank died) on token 99. Its output for a
    /// sequence is its length.
    pub(crate) struct Flaky(ModelSpec, std::sync::atomic::AtomicBool);

    impl Engine for Flaky {
        fn spec(&self) -> &ModelSpec {
            &self.0
        }
        fn pipeline_depth(&self) -> usize {
            2
        }
        fn health(&self) -> arbiter_engine::Result<()> {
            if self.1.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(arbiter_engine::EngineError::Parallel("stage 1 rank 0: peer lost".into()));
            }
            Ok(())
        }
        fn forward(&self, batch: &PackedBatch) -> arbiter_engine::Result<Vec<Vec<f32>>> {
            self.health()?;
            if batch.tokens().contains(&99) {
                self.1.store(true, std::sync::atomic::Ordering::SeqCst);
                return self.health().map(|_| Vec::new());
            }
            if batch.tokens().contains(&66) {
                panic!("kernel bug");
            }
            if batch.tokens().contains(&13) {
                return Err(arbiter_engine::EngineError::OutOfMemory("CUDA: cannot allocate 64 MiB".into()));
            }
            Ok((0..batch.len()).map(|i| vec![batch.item_len(i) as f32]).collect())
        }
        fn backend_name(&self) -> String {
            "flaky".into()
        }
    }

    pub(crate) fn flaky() -> Arc<dyn Engine> {
        let config = serde_json::json!({
            "architectures": ["LlamaForSequenceClassification"], "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100
        });
        let spec = arbiter_engine::config::parse_config(&config.to_string(), "config.json".as_ref()).unwrap();
        Arc::new(Flaky(spec, false.into()))
    }

    fn no_fatal() -> Option<OnFatal> {
        Some(Arc::new(|why| panic!("unexpected fatal engine error: {why}")))
    }

    fn one_per_batch(queue_capacity: usize) -> BatchConfig {
        BatchConfig { max_batch_tokens: 1, max_batch_requests: 1, queue_capacity, shared_prefix_min: Some(64) }
    }

    #[test]
    fn a_broken_engine_is_reported_once_and_its_items_fail() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let on_fatal: OnFatal = Arc::new(move |why| seen.lock().unwrap().push(why));
        let q = Queue::start(flaky(), one_per_batch(10), Some(on_fatal)).unwrap();
        let (jobs, rxs): (Vec<_>, Vec<_>) =
            [vec![99], vec![1], vec![2]].into_iter().map(|ids| Job::new(ids, None)).unzip();
        q.submit(jobs).unwrap();
        for rx in rxs {
            // The batch that broke it may be raced by the second engine thread; none succeeds after.
            if let Err(e) = rx.blocking_recv().unwrap() {
                assert!(e.to_string().contains("peer lost"), "{e}");
            }
        }
        q.shutdown();
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert!(calls[0].contains("stage 1 rank 0: peer lost"), "{calls:?}");
    }

    #[test]
    fn a_failing_or_panicking_batch_fails_only_its_own_items_and_serving_goes_on() {
        // One sequence per batch, so each job is its own batch.
        let q = Queue::start(flaky(), one_per_batch(10), no_fatal()).unwrap();
        let (jobs, rxs): (Vec<_>, Vec<_>) =
            [vec![1, 2], vec![13], vec![66, 1], vec![4, 5, 6]].into_iter().map(|ids| Job::new(ids, None)).unzip();
        q.submit(jobs).unwrap();
        let out: Vec<_> = rxs.into_iter().map(|rx| rx.blocking_recv().unwrap()).collect();
        assert_eq!(out[0].as_ref().unwrap().raw, vec![2.0]);
        let e = out[1].as_ref().unwrap_err();
        assert!(matches!(e, ScoreError::OutOfMemory(m) if m.contains("64 MiB")), "{e}");
        let e = out[2].as_ref().unwrap_err();
        assert!(matches!(e, ScoreError::Panicked(m) if m == "kernel bug"), "{e}");
        assert!(e.to_string().contains("panicked"), "{e}");
        assert_eq!(out[3].as_ref().unwrap().raw, vec![3.0], "later batches still run");
        q.shutdown();
        assert_eq!(q.submit(vec![Job::new(vec![1], None).0]).unwrap_err(), QueueError::Closed);
    }

    #[test]
    fn batches_respect_the_token_budget_and_request_cap_but_always_take_one() {
        let cfg = BatchConfig {
            max_batch_tokens: 10,
            max_batch_requests: 3,
            queue_capacity: 100,
            shared_prefix_min: Some(64),
        };
        let (mut q, mut rxs) = (VecDeque::new(), Vec::new());
        for n in [4, 4, 4, 20, 1, 1, 1, 1] {
            let (j, rx) = Job::new(vec![1; n], None);
            q.push_back(j);
            rxs.push(rx);
        }
        let sizes = |b: Vec<Job>| b.iter().map(Job::tokens).collect::<Vec<_>>();
        assert_eq!(sizes(take_batch(&mut q, &cfg)), [4, 4]);
        assert_eq!(sizes(take_batch(&mut q, &cfg)), [4]);
        assert_eq!(sizes(take_batch(&mut q, &cfg)), [20], "an oversized item runs alone");
        assert_eq!(sizes(take_batch(&mut q, &cfg)), [1, 1, 1], "request cap");
        assert_eq!(sizes(take_batch(&mut q, &cfg)), [1]);
    }

    #[test]
    fn cancelled_and_expired_items_are_dropped_before_compute() {
        let cfg = BatchConfig {
            max_batch_tokens: 100,
            max_batch_requests: 100,
            queue_capacity: 100,
            shared_prefix_min: Some(64),
        };
        let mut q = VecDeque::new();
        let (gone, rx_gone) = Job::new(vec![1], None);
        drop(rx_gone);
        let (late, rx_late) = Job::new(vec![2], Some(Instant::now() - Duration::from_millis(1)));
        q.push_back(gone);
        q.push_back(late);
        let (live, _rx_live) = Job::new(vec![3; 3], None);
        q.push_back(live);
        let b = take_batch(&mut q, &cfg);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].tokens(), 3);
        assert_eq!(rx_late.blocking_recv().unwrap().unwrap_err(), ScoreError::Queue(QueueError::DeadlineExceeded));
    }

    #[test]
    fn a_full_queue_refuses_all_or_nothing_and_waiting_callers_get_in_when_space_frees() {
        // Capacity 2: three jobs are refused whole; a waiting caller gets in once the engine
        // takes the first ones; more jobs than the capacity can never fit and are refused.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let q = Arc::new(Queue::start(flaky(), one_per_batch(2), no_fatal()).unwrap());
        let three = || (0..3).map(|i| Job::new(vec![i + 1], None)).unzip::<_, _, Vec<_>, Vec<_>>();
        let (jobs, _rxs) = three();
        assert!(matches!(q.submit(jobs), Err(QueueError::Full { capacity: 2, .. })));
        let (jobs, _rxs) = three();
        assert!(matches!(rt.block_on(q.submit_waiting(jobs)), Err(QueueError::Full { capacity: 2, .. })));
        let results = rt.block_on(async {
            let mut all = Vec::new();
            for round in 0..5u32 {
                let (jobs, rxs): (Vec<_>, Vec<_>) =
                    (0..2).map(|i| Job::new(vec![1; (round + i + 1) as usize], None)).unzip();
                q.submit_waiting(jobs).await.unwrap();
                all.extend(rxs);
            }
            let mut out = Vec::new();
            for rx in all {
                out.push(rx.await.unwrap().unwrap().raw[0]);
            }
            out
        });
        assert_eq!(results, [1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0, 5.0, 6.0]);
        q.shutdown();
        let (mut jobs, _rxs) = three();
        jobs.truncate(1);
        assert_eq!(rt.block_on(q.submit_waiting(jobs)), Err(QueueError::Closed));
    }
}
