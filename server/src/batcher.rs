//! The token-budget batcher: a bounded queue of prepared items and engine threads that pack
//! them into batches by a token budget and a request cap.
//!
//! An engine thread takes whatever is waiting when it becomes free (continuous batching), so
//! the next batch accumulates while the current one computes. There is one engine thread per
//! pipeline stage of the model, so a split model has a batch in every stage at once. Items whose
//! client went away or whose deadline passed are dropped before compute and counted. A failing
//! batch fails only its own items; a panic inside the engine is caught and reported as INTERNAL.
//! When the engine reports itself broken (a model-parallel rank failed), `on_fatal` is called
//! once so that the server stops serving instead of failing every request.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arbiter_engine::runtime::Engine;
use arbiter_engine::PackedBatch;
use metrics::{counter, gauge, histogram};
use tokio::sync::oneshot;

use crate::error::ServiceError;
use crate::metrics as m;

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Token budget of one batch (an item longer than this runs alone).
    pub max_batch_tokens: usize,
    /// Sequences in one batch.
    pub max_batch_requests: usize,
    /// Items waiting before new work is refused.
    pub queue_capacity: usize,
}

/// What the engine computed for one item.
#[derive(Debug, Clone)]
pub struct ItemOutput {
    /// Raw head outputs at the last token.
    pub raw: Vec<f32>,
    /// Time spent in the queue.
    pub queue: Duration,
    /// Forward time of the batch that held it.
    pub inference: Duration,
}

/// One sequence waiting to be scored.
#[derive(Debug)]
pub struct WorkItem {
    /// Token ids (validated).
    pub ids: Vec<u32>,
    /// Where the result goes; a closed receiver means the client went away.
    pub reply: oneshot::Sender<Result<ItemOutput, ServiceError>>,
    /// When the request's deadline passes, if it has one.
    pub deadline: Option<Instant>,
    enqueued: Instant,
}

impl WorkItem {
    /// A work item and the receiver of its result.
    pub fn new(
        ids: Vec<u32>,
        deadline: Option<Instant>,
    ) -> (Self, oneshot::Receiver<Result<ItemOutput, ServiceError>>) {
        let (tx, rx) = oneshot::channel();
        (WorkItem { ids, reply: tx, deadline, enqueued: Instant::now() }, rx)
    }
}

struct State {
    items: VecDeque<WorkItem>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    cfg: BatchConfig,
    fatal: std::sync::Once,
    on_fatal: OnFatal,
}

/// Called once with the reason when the engine can no longer compute.
pub type OnFatal = Arc<dyn Fn(String) + Send + Sync>;

/// Handle to the queue and its engine threads.
pub struct Batcher {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("cfg", &self.shared.cfg).finish()
    }
}

impl Batcher {
    /// Starts one engine thread per pipeline stage of `engine`.
    pub fn start(engine: Arc<dyn Engine>, cfg: BatchConfig, on_fatal: OnFatal) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { items: VecDeque::new(), closed: false }),
            wake: Condvar::new(),
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
        Ok(Batcher { shared, threads: Mutex::new(threads) })
    }

    /// The limits in force.
    pub fn config(&self) -> BatchConfig {
        self.shared.cfg
    }

    /// Enqueues all items or none: when they do not all fit, the request is refused with
    /// RESOURCE_EXHAUSTED and nothing of it is computed.
    pub fn submit(&self, items: Vec<WorkItem>) -> Result<(), ServiceError> {
        let mut st = self.shared.state.lock().expect("batcher lock");
        if st.closed {
            return Err(ServiceError::Unavailable("the server is shutting down".into()));
        }
        let depth = st.items.len();
        if depth + items.len() > self.shared.cfg.queue_capacity {
            return Err(ServiceError::QueueFull { depth, capacity: self.shared.cfg.queue_capacity });
        }
        st.items.extend(items);
        gauge!(m::QUEUE_DEPTH).set(st.items.len() as f64);
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Items waiting.
    pub fn depth(&self) -> usize {
        self.shared.state.lock().expect("batcher lock").items.len()
    }

    /// Refuses new work, lets the engine threads finish what is queued, and waits for them.
    pub fn shutdown(&self) {
        self.shared.state.lock().expect("batcher lock").closed = true;
        self.shared.wake.notify_all();
        for t in std::mem::take(&mut *self.threads.lock().expect("thread lock")) {
            t.join().ok();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn engine_loop(shared: &Shared, engine: &dyn Engine) {
    loop {
        let batch = {
            let mut st = shared.state.lock().expect("batcher lock");
            while st.items.is_empty() && !st.closed {
                st = shared.wake.wait(st).expect("batcher lock");
            }
            if st.items.is_empty() {
                return; // closed and drained
            }
            let batch = take_batch(&mut st.items, &shared.cfg);
            gauge!(m::QUEUE_DEPTH).set(st.items.len() as f64);
            batch
        };
        if !batch.is_empty() {
            run_batch(engine, batch);
            if let Err(e) = engine.health() {
                shared.fatal.call_once(|| (shared.on_fatal)(e.to_string()));
            }
        }
    }
}

/// Pops the next batch: items in arrival order while the token budget and request cap allow
/// (always at least one), skipping items nobody waits for anymore.
fn take_batch(queue: &mut VecDeque<WorkItem>, cfg: &BatchConfig) -> Vec<WorkItem> {
    let now = Instant::now();
    let (mut batch, mut tokens) = (Vec::new(), 0usize);
    while let Some(front) = queue.front() {
        // Deadline first: a client that gave up at its deadline also closed its receiver.
        if front.deadline.is_some_and(|d| d <= now) {
            let item = queue.pop_front().expect("front exists");
            counter!(m::DROPPED, "reason" => "deadline").increment(1);
            item.reply.send(Err(ServiceError::DeadlineExceeded)).ok();
            continue;
        }
        if front.reply.is_closed() {
            queue.pop_front();
            counter!(m::DROPPED, "reason" => "cancelled").increment(1);
            continue;
        }
        let n = front.ids.len();
        if !batch.is_empty() && (tokens + n > cfg.max_batch_tokens || batch.len() >= cfg.max_batch_requests) {
            break;
        }
        tokens += n;
        batch.push(queue.pop_front().expect("front exists"));
    }
    batch
}

fn run_batch(engine: &dyn Engine, batch: Vec<WorkItem>) {
    let start = Instant::now();
    let tokens: usize = batch.iter().map(|w| w.ids.len()).sum();
    let packed = PackedBatch::from_sequences(&batch.iter().map(|w| w.ids.as_slice()).collect::<Vec<_>>());
    let result =
        packed.map_err(ServiceError::from).and_then(|p| match catch_unwind(AssertUnwindSafe(|| engine.forward(&p))) {
            Ok(r) => r.map_err(ServiceError::from),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(ServiceError::Internal(format!("the engine panicked on this batch: {what}")))
            }
        });
    let inference = start.elapsed();
    histogram!(m::INFERENCE_SECONDS).record(inference.as_secs_f64());
    histogram!(m::BATCH_SIZE).record(batch.len() as f64);
    histogram!(m::BATCH_TOKENS).record(tokens as f64);
    match result {
        Ok(raws) => {
            counter!(m::ITEMS).increment(batch.len() as u64);
            counter!(m::TOKENS).increment(tokens as u64);
            for (w, raw) in batch.into_iter().zip(raws) {
                let queue = start.saturating_duration_since(w.enqueued);
                histogram!(m::QUEUE_SECONDS).record(queue.as_secs_f64());
                w.reply.send(Ok(ItemOutput { raw, queue, inference })).ok();
            }
        }
        Err(e) => {
            tracing::error!(sequences = batch.len(), tokens, error = %e, "batch failed");
            counter!(m::BATCH_FAILURES, "code" => crate::error::code_name(e.code())).increment(1);
            for w in batch {
                w.reply.send(Err(e.clone())).ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbiter_engine::spec::ModelSpec;

    /// An engine that fails batches holding token 13, panics on batches holding token 66, and
    /// breaks for good (as a model-parallel group whose rank died) on token 99.
    struct Flaky(ModelSpec, std::sync::atomic::AtomicBool);

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
                return Err(arbiter_engine::EngineError::Backend("CUDA error: out of memory".into()));
            }
            Ok((0..batch.len()).map(|i| vec![batch.range(i).len() as f32]).collect())
        }
        fn backend_name(&self) -> String {
            "flaky".into()
        }
    }

    fn flaky() -> Arc<dyn Engine> {
        let config = serde_json::json!({
            "architectures": ["LlamaForSequenceClassification"], "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100
        });
        let spec = arbiter_engine::config::parse_config(&config.to_string(), "config.json".as_ref()).unwrap();
        Arc::new(Flaky(spec, false.into()))
    }

    fn no_fatal() -> OnFatal {
        Arc::new(|why| panic!("unexpected fatal engine error: {why}"))
    }

    #[test]
    fn a_broken_engine_is_reported_once_and_its_items_fail() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let on_fatal: OnFatal = Arc::new(move |why| seen.lock().unwrap().push(why));
        let b = Batcher::start(
            flaky(),
            BatchConfig { max_batch_tokens: 1, max_batch_requests: 1, queue_capacity: 10 },
            on_fatal,
        )
        .unwrap();
        let (items, rxs): (Vec<_>, Vec<_>) =
            [vec![99], vec![1], vec![2]].into_iter().map(|ids| WorkItem::new(ids, None)).unzip();
        b.submit(items).unwrap();
        for rx in rxs {
            // The batch that broke it may be raced by the second engine thread; none succeeds after.
            if let Err(e) = rx.blocking_recv().unwrap() {
                assert!(e.to_string().contains("peer lost"), "{e}");
            }
        }
        b.shutdown();
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert!(calls[0].contains("stage 1 rank 0: peer lost"), "{calls:?}");
    }

    #[test]
    fn a_failing_or_panicking_batch_fails_only_its_own_items_and_serving_goes_on() {
        // One sequence per batch, so each item is its own batch.
        let b = Batcher::start(
            flaky(),
            BatchConfig { max_batch_tokens: 1, max_batch_requests: 1, queue_capacity: 10 },
            no_fatal(),
        )
        .unwrap();
        let (items, rxs): (Vec<_>, Vec<_>) =
            [vec![1, 2], vec![13], vec![66, 1], vec![4, 5, 6]].into_iter().map(|ids| WorkItem::new(ids, None)).unzip();
        b.submit(items).unwrap();
        let out: Vec<_> = rxs.into_iter().map(|rx| rx.blocking_recv().unwrap()).collect();
        assert_eq!(out[0].as_ref().unwrap().raw, vec![2.0]);
        let e = out[1].as_ref().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.to_string().contains("out of memory"), "{e}");
        let e = out[2].as_ref().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        assert!(e.to_string().contains("panicked") && e.to_string().contains("kernel bug"), "{e}");
        assert_eq!(out[3].as_ref().unwrap().raw, vec![3.0], "later batches still run");
        b.shutdown();
        assert_eq!(b.submit(vec![WorkItem::new(vec![1], None).0]).unwrap_err().code(), tonic::Code::Unavailable);
    }

    #[test]
    fn batches_respect_the_token_budget_and_request_cap_but_always_take_one() {
        let cfg = BatchConfig { max_batch_tokens: 10, max_batch_requests: 3, queue_capacity: 100 };
        let (mut q, mut rxs) = (VecDeque::new(), Vec::new());
        for n in [4, 4, 4, 20, 1, 1, 1, 1] {
            let (w, rx) = WorkItem::new(vec![1; n], None);
            q.push_back(w);
            rxs.push(rx);
        }
        let sizes = |b: Vec<WorkItem>| b.iter().map(|w| w.ids.len()).collect::<Vec<_>>();
        assert_eq!(sizes(take_batch(&mut q, &cfg)), [4, 4]);
        assert_eq!(sizes(take_batch(&mut q, &cfg)), [4]);
        assert_eq!(sizes(take_batch(&mut q, &cfg)), [20], "an oversized item runs alone");
        assert_eq!(sizes(take_batch(&mut q, &cfg)), [1, 1, 1], "request cap");
        assert_eq!(sizes(take_batch(&mut q, &cfg)), [1]);
    }

    #[test]
    fn cancelled_and_expired_items_are_dropped_before_compute() {
        let cfg = BatchConfig { max_batch_tokens: 100, max_batch_requests: 100, queue_capacity: 100 };
        let mut q = VecDeque::new();
        let (gone, rx_gone) = WorkItem::new(vec![1], None);
        drop(rx_gone);
        let (late, rx_late) = WorkItem::new(vec![2], Some(Instant::now() - Duration::from_millis(1)));
        q.push_back(gone);
        q.push_back(late);
        let (live, _rx_live) = WorkItem::new(vec![3; 3], None);
        q.push_back(live);
        let b = take_batch(&mut q, &cfg);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].ids.len(), 3);
        assert_eq!(rx_late.blocking_recv().unwrap().unwrap_err(), ServiceError::DeadlineExceeded);
    }
}
