//! The [`Scorer`]: items in, scores out, through the one queue.

use std::time::{Duration, Instant};

use arbiter_engine::runtime::LoadedModel;
use arbiter_engine::text::{
    validate_roles, Input, Message, Prepared, Role, Truncation, TruncationPolicy, Turn, TurnRead,
};
use arbiter_engine::{RewardWeights, Score};

use crate::error::{Place, QueueError, RequestError, ScoreError};
use crate::metrics as m;
use crate::queue::{BatchConfig, Job, JobOutput, OnFatal, Queue, Reply};

/// How a scorer batches and prepares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScorerConfig {
    /// The queue's batching limits.
    pub batch: BatchConfig,
    /// Threads that template and tokenize items.
    pub tokenization_workers: usize,
}

impl Default for ScorerConfig {
    /// `arbiter serve`'s defaults.
    fn default() -> Self {
        ScorerConfig { batch: BatchConfig::default(), tokenization_workers: 2 }
    }
}

/// One thing to score, with its own truncation policy and reward weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// What to score.
    pub input: Input,
    /// What to do when it is longer than the model's input limit.
    pub truncation: TruncationPolicy,
    /// Weights combining its attributes into the reward (`None`: the model's defaults).
    pub weights: Option<RewardWeights>,
    /// Also score the conversation after every assistant turn ([`ItemScore::turns`]), in the
    /// same pass (docs/per-turn.md). Only for messages.
    pub per_turn: bool,
}

impl Item {
    /// An item scored with the model's default reward weights.
    pub fn new(input: Input, truncation: TruncationPolicy) -> Self {
        Item { input, truncation, weights: None, per_turn: false }
    }
}

/// The score after one assistant turn of a per-turn item: the conversation (as truncation left
/// it) stopped at that turn, scored exactly as that conversation alone.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnScore {
    /// Index of the turn's message in the item's messages.
    pub message: usize,
    /// Its score; `None` when truncation cut the turn away.
    pub score: Option<Score>,
    /// Tokens of the conversation stopped at the turn (0 when cut away).
    pub tokens: usize,
    /// Computed as a branch of the whole conversation; `false`: as its own sequence (the template
    /// renders the stopped conversation differently) or not at all.
    pub on_spine: bool,
}

/// The score of one item.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemScore {
    /// Exposed attributes and the reward.
    pub score: Score,
    /// Tokens scored (after truncation).
    pub tokens: usize,
    /// What truncation did.
    pub truncation: Truncation,
    /// Time the item waited for its batch.
    pub queue: Duration,
    /// Forward time of the batch that held it.
    pub inference: Duration,
    /// Per-turn items: one per assistant turn, in order (the last is the item's own score);
    /// empty otherwise.
    pub turns: Vec<TurnScore>,
}

/// Every item of a request scored, in input order.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// One per item, in input order.
    pub items: Vec<ItemScore>,
    /// Time spent templating and tokenizing the request's items.
    pub tokenize: Duration,
}

/// Candidates scored and ranked.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// One per candidate, in input order.
    pub scored: Scored,
    /// Candidate indices, best (highest reward) first; ties keep input order.
    pub order: Vec<usize>,
}

/// Per-call options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Items still queued when it passes are dropped and fail with [`QueueError::DeadlineExceeded`].
    pub deadline: Option<Instant>,
    /// Wait for queue space instead of failing with [`QueueError::Full`] (for callers that bound
    /// their own in-flight work, like `arbiter score`).
    pub wait_for_space: bool,
}

/// The scoring core: a model's preprocessor, the queue, and the engine behind it.
///
/// Dropping a returned future cancels its items: those still queued are dropped before compute.
pub struct Scorer {
    model: LoadedModel,
    queue: Queue,
    workers: rayon::ThreadPool,
    /// Numbers Rank requests, so that the queue knows which candidates belong together.
    requests: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Scorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scorer").field("model", &self.model).field("queue", &self.queue).finish()
    }
}

/// An item prepared for the engine, with its weights and its per-turn reads, or why it cannot be.
type PreparedItem = Result<(Prepared, RewardWeights, Vec<Turn>), ScoreError>;

/// An item prepared and queued, or already failed.
enum Slot {
    /// Tokens, what truncation did, the weights, where the output will come, and its turns.
    Queued(usize, Truncation, RewardWeights, Reply, Vec<TurnSlot>),
    Failed(ScoreError),
}

/// Where one turn's output will come.
enum TurnSlot {
    /// The next of the item's job's branch outputs: message index, tokens.
    Branch(usize, usize),
    /// Its own job: message index, tokens, receiver.
    Alone(usize, usize, Reply),
    /// No score: the message index.
    CutAway(usize),
}

impl Scorer {
    /// Starts the queue's engine threads and the tokenization workers for `model`. `on_fatal` is
    /// called once if the engine breaks for good (a model-parallel rank failed).
    pub fn start(model: LoadedModel, cfg: ScorerConfig, on_fatal: Option<OnFatal>) -> std::io::Result<Self> {
        let queue = Queue::start(model.engine.clone(), cfg.batch, on_fatal)?;
        let workers = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.tokenization_workers.max(1))
            .thread_name(|i| format!("arbiter-tokenize-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Scorer { model, queue, workers, requests: 0.into() })
    }

    /// The model it scores with.
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// The batching limits in force.
    pub fn batch_config(&self) -> BatchConfig {
        self.queue.config()
    }

    /// Items waiting for a batch.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// Refuses new work, finishes what is queued, and stops the engine threads.
    pub fn shutdown(&self) {
        self.queue.shutdown();
    }

    /// Scores every item or none: the first failure in input order fails the request. Nothing
    /// is computed when an item cannot be prepared or the queue cannot take them all.
    pub async fn score(&self, items: Vec<Item>, opts: Options) -> Result<Scored, RequestError> {
        self.score_all(items, opts, None).await
    }

    /// [`Scorer::score`], the items being the candidates of Rank request `request` when given.
    async fn score_all(&self, items: Vec<Item>, opts: Options, request: Option<u64>) -> Result<Scored, RequestError> {
        let start = Instant::now();
        let prepared = self.prepare(items).await;
        if let Some((i, e)) = prepared.iter().enumerate().find_map(|(i, p)| p.as_ref().err().map(|e| (i, e.clone()))) {
            return Err(RequestError { place: Place::Item(i), error: e });
        }
        let tokenize = start.elapsed();
        let slots = self.enqueue(prepared, opts, request).await.map_err(RequestError::request)?;
        let mut items = Vec::with_capacity(slots.len());
        // In order, so the first failure returned is the first in input order; returning drops
        // the other receivers, which cancels what is still queued.
        for (i, slot) in slots.into_iter().enumerate() {
            items.push(finish(&self.model, slot).await.map_err(|error| RequestError { place: Place::Item(i), error })?);
        }
        Ok(Scored { items, tokenize })
    }

    /// Scores each item on its own: one result per item in input order, the failed ones with
    /// their error, the others scored.
    pub async fn score_each(&self, items: Vec<Item>, opts: Options) -> Vec<Result<ItemScore, ScoreError>> {
        let prepared = self.prepare(items).await;
        let n = prepared.len();
        let slots = match self.enqueue(prepared, opts, None).await {
            Ok(s) => s,
            Err(e) => return (0..n).map(|_| Err(e.clone().into())).collect(),
        };
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            out.push(finish(&self.model, slot).await);
        }
        out
    }

    /// Scores each candidate as the assistant's reply to `prompt` (a conversation ending with a
    /// user turn), exactly as [`Scorer::score`] scores that conversation, and ranks them. The
    /// candidates' common token prefix (the templated prompt) is computed once for those that
    /// share a batch, whatever its length; on the CPU the scores keep every bit.
    pub async fn rank(
        &self,
        prompt: Vec<Message>,
        candidates: Vec<String>,
        truncation: TruncationPolicy,
        weights: Option<RewardWeights>,
        opts: Options,
    ) -> Result<Ranked, RequestError> {
        let invalid = |m: String| RequestError { place: Place::Prompt, error: ScoreError::Invalid(m) };
        if let Some(last) = prompt.last().filter(|m| m.role != Role::User) {
            return Err(invalid(format!(
                "messages[{}] is a {} turn; the prompt must end with a user turn (each candidate is the assistant's reply)",
                prompt.len() - 1,
                last.role.as_str()
            )));
        }
        let mut probe = prompt.clone();
        probe.push(Message::new(Role::Assistant, ""));
        validate_roles(&probe).map_err(|e| invalid(e.to_string()))?;
        let items = candidates
            .into_iter()
            .map(|c| {
                let mut conv = prompt.clone();
                conv.push(Message::new(Role::Assistant, c));
                Item { input: Input::Messages(conv), truncation, weights: weights.clone(), per_turn: false }
            })
            .collect();
        let request = self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scored = self.score_all(items, opts, Some(request)).await?;
        let mut order: Vec<usize> = (0..scored.items.len()).collect();
        // Stable sort: equal rewards keep input order.
        order.sort_by(|&a, &b| scored.items[b].score.reward.total_cmp(&scored.items[a].score.reward));
        Ok(Ranked { scored, order })
    }

    /// Templates and tokenizes the items on the workers.
    async fn prepare(&self, items: Vec<Item>) -> Vec<PreparedItem> {
        let start = Instant::now();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let n = items.len();
        let pre = self.model.preprocessor.clone();
        let head = self.model.spec().head.clone();
        self.workers.spawn(move || {
            use rayon::prelude::*;
            let prepared: Vec<_> = items
                .into_par_iter()
                .map(|it| {
                    let weights = it.weights.unwrap_or_else(|| RewardWeights::defaults(&head));
                    let prepared = match (&it.input, it.per_turn) {
                        (_, false) => pre.prepare(&it.input, it.truncation).map(|p| (p, Vec::new())),
                        (Input::Messages(m), true) => pre.prepare_turns(m, it.truncation).map(|t| (t.spine, t.turns)),
                        (_, true) => {
                            return Err(ScoreError::Invalid(
                                "per_turn scores the turns of a conversation: send messages, not text or token ids"
                                    .into(),
                            ))
                        }
                    };
                    prepared.map(|(p, turns)| (p, weights, turns)).map_err(ScoreError::from_engine)
                })
                .collect();
            tx.send(prepared).ok();
        });
        let prepared = rx.await.unwrap_or_else(|_| {
            (0..n).map(|_| Err(ScoreError::Engine("a tokenization worker failed".into()))).collect()
        });
        metrics::histogram!(m::TOKENIZE_SECONDS).record(start.elapsed().as_secs_f64());
        prepared
    }

    /// Queues the prepared items, all together or none.
    async fn enqueue(
        &self,
        prepared: Vec<PreparedItem>,
        opts: Options,
        request: Option<u64>,
    ) -> Result<Vec<Slot>, QueueError> {
        let mut jobs = Vec::new();
        let slots: Vec<Slot> = prepared
            .into_iter()
            .map(|r| match r {
                Ok((p, w, turns)) => {
                    let (tokens, truncation) = (p.ids.len(), p.truncation);
                    let (mut branches, mut slots) = (Vec::new(), Vec::new());
                    for t in turns {
                        let n = t.tokens();
                        slots.push(match t.read {
                            TurnRead::Spine { seen, closing } => {
                                branches.push((seen, closing));
                                TurnSlot::Branch(t.message, n)
                            }
                            TurnRead::Alone(ids) => {
                                let (job, rx) = Job::new(ids, opts.deadline);
                                jobs.push(job);
                                TurnSlot::Alone(t.message, n, rx)
                            }
                            TurnRead::CutAway => TurnSlot::CutAway(t.message),
                        });
                    }
                    let (job, rx) = Job::new(p.ids, opts.deadline);
                    jobs.push(match request {
                        Some(r) => job.candidate_of(r),
                        None => job.with_branches(branches),
                    });
                    Slot::Queued(tokens, truncation, w, rx, slots)
                }
                Err(e) => Slot::Failed(e),
            })
            .collect();
        if jobs.is_empty() {
            return Ok(slots);
        }
        let submitted =
            if opts.wait_for_space { self.queue.submit_waiting(jobs).await } else { self.queue.submit(jobs) };
        submitted.map(|()| slots)
    }
}

/// Waits for a queued item's output and turns it into its score.
async fn finish(model: &LoadedModel, slot: Slot) -> Result<ItemScore, ScoreError> {
    let (tokens, truncation, weights, rx, turn_slots) = match slot {
        Slot::Queued(tokens, truncation, weights, rx, turns) => (tokens, truncation, weights, rx, turns),
        Slot::Failed(e) => return Err(e),
    };
    let received =
        |r: Result<Result<JobOutput, ScoreError>, _>| r.map_err(|_| ScoreError::Queue(QueueError::EngineStopped))?;
    let out = received(rx.await)?;
    let head = &model.spec().head;
    let mut branches = out.turns.into_iter();
    let mut turns = Vec::with_capacity(turn_slots.len());
    for t in turn_slots {
        turns.push(match t {
            TurnSlot::Branch(message, tokens) => {
                let raw =
                    branches.next().ok_or_else(|| ScoreError::Engine("a per-turn branch got no output".into()))?;
                TurnScore { message, score: Some(Score::from_raw(head, raw, &weights)), tokens, on_spine: true }
            }
            TurnSlot::Alone(message, tokens, rx) => {
                let raw = received(rx.await)?.raw;
                TurnScore { message, score: Some(Score::from_raw(head, raw, &weights)), tokens, on_spine: false }
            }
            TurnSlot::CutAway(message) => TurnScore { message, score: None, tokens: 0, on_spine: false },
        });
    }
    Ok(ItemScore {
        score: Score::from_raw(head, out.raw, &weights),
        tokens,
        truncation,
        queue: out.queue,
        inference: out.inference,
        turns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbiter_engine::runtime::Engine;
    use arbiter_engine::spec::ModelSpec;
    use arbiter_engine::text::{ChatTemplate, Preprocessor};
    use arbiter_engine::PackedBatch;
    use std::sync::{Arc, Mutex};

    /// Outputs each sequence's length in every head slot and records the lengths it computed;
    /// its first batch waits until `gate` is released, so a test can hold the engine busy.
    struct Recording {
        spec: ModelSpec,
        seen: Mutex<Vec<usize>>,
        gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl Engine for Recording {
        fn spec(&self) -> &ModelSpec {
            &self.spec
        }
        fn forward(&self, batch: &PackedBatch) -> arbiter_engine::Result<Vec<Vec<f32>>> {
            let gate = self.gate.lock().unwrap().take();
            if let Some(gate) = gate {
                gate.recv().ok();
            }
            let lens: Vec<usize> = (0..batch.len()).map(|i| batch.item_len(i)).collect();
            self.seen.lock().unwrap().extend(&lens);
            Ok(lens.iter().map(|&n| vec![n as f32; self.spec.head.labels.len()]).collect())
        }
        fn backend_name(&self) -> String {
            "recording".into()
        }
    }

    /// A scorer over a token-ids-only model (vocab 100, inputs up to 16 tokens), one sequence per
    /// batch, and the engine's record.
    fn scorer(gate: Option<std::sync::mpsc::Receiver<()>>) -> (Scorer, Arc<Recording>) {
        let config = serde_json::json!({
            "architectures": ["LlamaForSequenceClassification"], "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100
        });
        let spec = arbiter_engine::config::parse_config(&config.to_string(), "config.json".as_ref()).unwrap();
        let engine = Arc::new(Recording { spec, seen: Mutex::default(), gate: Mutex::new(gate) });
        let model = LoadedModel {
            engine: engine.clone(),
            preprocessor: Arc::new(Preprocessor::new(None, ChatTemplate::None, 100, 16)),
            fingerprint: "test".into(),
            dir: "test".into(),
            load_seconds: 0.0,
            worker: None,
        };
        let batch =
            BatchConfig { max_batch_tokens: 1, max_batch_requests: 1, queue_capacity: 8, ..BatchConfig::default() };
        (Scorer::start(model, ScorerConfig { batch, tokenization_workers: 1 }, None).unwrap(), engine)
    }

    fn ids(v: &[u32]) -> Item {
        Item::new(Input::TokenIds(v.to_vec()), TruncationPolicy::Error)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    #[test]
    fn score_is_all_or_nothing_and_names_the_first_failing_item() {
        let (s, engine) = scorer(None);
        let bad = rt().block_on(s.score(vec![ids(&[1, 2]), ids(&[1, 200]), ids(&[]), ids(&[3])], Options::default()));
        let e = bad.unwrap_err();
        assert_eq!(e.place, Place::Item(1));
        assert!(matches!(&e.error, ScoreError::Invalid(m) if m.contains("200")), "{e}");
        assert!(engine.seen.lock().unwrap().is_empty(), "nothing is computed when an item is refused");
        let good = rt().block_on(s.score(vec![ids(&[1, 2]), ids(&[4, 5, 6])], Options::default())).unwrap();
        let tokens: Vec<usize> = good.items.iter().map(|i| i.tokens).collect();
        assert_eq!(tokens, [2, 3]);
        assert_eq!(good.items[1].score.raw, vec![3.0]);
    }

    #[test]
    fn score_each_answers_every_item_in_input_order() {
        let (s, _) = scorer(None);
        let long = ids(&[1; 17]);
        let mut cut = ids(&[7; 20]);
        cut.truncation = TruncationPolicy::Truncate;
        let out = rt().block_on(s.score_each(vec![ids(&[1]), long, ids(&[]), cut, ids(&[2, 2])], Options::default()));
        assert_eq!(out.len(), 5);
        assert_eq!(out[0].as_ref().unwrap().score.raw[0], 1.0);
        assert!(matches!(&out[1], Err(ScoreError::Invalid(m)) if m.contains("17 tokens")), "{:?}", out[1]);
        assert!(matches!(&out[2], Err(ScoreError::Invalid(_))), "{:?}", out[2]);
        let cut = out[3].as_ref().unwrap();
        assert_eq!((cut.tokens, cut.truncation.dropped_tokens, cut.truncation.original_tokens), (16, 4, 20));
        assert_eq!(out[4].as_ref().unwrap().score.raw[0], 2.0);
    }

    #[test]
    fn a_full_queue_refuses_the_whole_request_unless_the_caller_waits() {
        let (s, _) = scorer(None);
        let nine: Vec<Item> = (0..9).map(|i| ids(&[i + 1])).collect();
        let e = rt().block_on(s.score(nine.clone(), Options::default())).unwrap_err();
        assert_eq!(e.place, Place::Request);
        assert!(matches!(e.error, ScoreError::Queue(QueueError::Full { capacity: 8, .. })), "{e}");
        // Waiting only helps when the items can ever fit together.
        let wait = Options { deadline: None, wait_for_space: true };
        let e = rt().block_on(s.score(nine, wait)).unwrap_err();
        assert!(matches!(e.error, ScoreError::Queue(QueueError::Full { .. })), "{e}");
        let out = rt().block_on(s.score_each((0..8).map(|i| ids(&[i + 1])).collect(), wait));
        assert!(out.iter().all(Result::is_ok));
    }

    #[test]
    fn a_passed_deadline_fails_the_item_before_compute() {
        let (s, engine) = scorer(None);
        let past = Options { deadline: Some(Instant::now() - Duration::from_millis(1)), wait_for_space: false };
        let e = rt().block_on(s.score(vec![ids(&[5, 5, 5])], past)).unwrap_err();
        assert_eq!((e.place, e.error), (Place::Item(0), ScoreError::Queue(QueueError::DeadlineExceeded)));
        assert!(engine.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn a_dropped_caller_s_items_are_dropped_before_compute() {
        let (release, gate) = std::sync::mpsc::channel();
        let (s, engine) = scorer(Some(gate));
        let s = Arc::new(s);
        let rt = rt();
        rt.block_on(async {
            let busy = tokio::spawn({
                let s = s.clone();
                async move { s.score(vec![ids(&[1])], Options::default()).await }
            });
            // The engine holds the first item; the second caller's item waits in the queue.
            while engine.gate.lock().unwrap().is_some() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let gone = tokio::spawn({
                let s = s.clone();
                async move { s.score(vec![ids(&[7; 7])], Options::default()).await }
            });
            while s.queue_depth() == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            gone.abort();
            assert!(gone.await.unwrap_err().is_cancelled());
            release.send(()).unwrap();
            busy.await.unwrap().unwrap();
            s.score(vec![ids(&[2, 2])], Options::default()).await.unwrap();
        });
        assert_eq!(*engine.seen.lock().unwrap(), [1, 2], "the abandoned 7-token item never ran");
    }
}
