//! The core's errors: why an item was not scored, and why the queue refused work. Front ends map
//! them to their own codes in one place each (gRPC status, HTTP status, a CLI line error).

use arbiter_engine::EngineError;

/// Why the queue did not compute an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue cannot take the items now; retry later (callers that wait for space never see it).
    #[error("the queue is full ({depth} items waiting, capacity {capacity}); retry with backoff")]
    Full {
        /// Items waiting.
        depth: usize,
        /// Queue capacity.
        capacity: usize,
    },
    /// The scorer is shutting down and takes no new work.
    #[error("the scorer is shutting down")]
    Closed,
    /// The item's deadline passed before its batch started.
    #[error("the deadline passed before the request could be answered")]
    DeadlineExceeded,
    /// The engine thread went away without answering (it should not: batches that fail or panic
    /// are answered with their error).
    #[error("the engine thread stopped")]
    EngineStopped,
}

/// Why one item was not scored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScoreError {
    /// The item cannot be scored as given: malformed, too long for its truncation policy, bad
    /// roles or token ids. The caller can fix it.
    #[error("{0}")]
    Invalid(String),
    /// The queue did not compute it.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Its batch ran out of device memory; smaller batches may fit.
    #[error("the batch ran out of memory: {0}; smaller batches may fit")]
    OutOfMemory(String),
    /// Its batch failed in the engine (a backend or model-parallel failure).
    #[error("{0}")]
    Engine(String),
    /// The engine panicked on its batch (a bug); other batches are unaffected.
    #[error("the engine panicked on this batch: {0}")]
    Panicked(String),
}

impl ScoreError {
    /// Classifies an engine error: the caller's fault, out of memory, or an engine failure.
    pub fn from_engine(e: EngineError) -> Self {
        match e {
            EngineError::InvalidInput(_) | EngineError::TooLong { .. } | EngineError::InvalidBatch(_) => {
                ScoreError::Invalid(e.to_string())
            }
            EngineError::OutOfMemory(m) => ScoreError::OutOfMemory(m),
            other => ScoreError::Engine(other.to_string()),
        }
    }

    /// The `reason` label of a failed batch in the metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ScoreError::Invalid(_) => "invalid",
            ScoreError::Queue(_) => "queue",
            ScoreError::OutOfMemory(_) => "out_of_memory",
            ScoreError::Engine(_) => "engine",
            ScoreError::Panicked(_) => "panic",
        }
    }
}

/// Where in a request a failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The request as a whole (the queue refused it).
    Request,
    /// Item (or candidate) `i`, counted from 0 in input order.
    Item(usize),
    /// The prompt of a rank request.
    Prompt,
}

/// Why a request scored as a whole (all items or none) failed: the first failure in input order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct RequestError {
    /// Where the failure is.
    pub place: Place,
    /// What it is.
    pub error: ScoreError,
}

impl RequestError {
    /// A failure of the request as a whole.
    pub fn request(error: impl Into<ScoreError>) -> Self {
        RequestError { place: Place::Request, error: error.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_are_classified_once() {
        assert_eq!(ScoreError::from_engine(EngineError::InvalidInput("bad".into())), ScoreError::Invalid("bad".into()));
        let too_long = EngineError::TooLong { what: "the text".into(), tokens: 9, max: 4, hint: String::new() };
        assert!(matches!(ScoreError::from_engine(too_long), ScoreError::Invalid(m) if m.contains("9 tokens")));
        let oom = ScoreError::from_engine(EngineError::OutOfMemory("CUDA: cannot allocate 512 MiB".into()));
        assert_eq!(oom, ScoreError::OutOfMemory("CUDA: cannot allocate 512 MiB".into()));
        assert_eq!(
            oom.to_string(),
            "the batch ran out of memory: CUDA: cannot allocate 512 MiB; smaller batches may fit"
        );
        // Only the typed variant means out of memory: a message that mentions it is not one.
        let said = ScoreError::from_engine(EngineError::Backend("kernel failed: out of memory?".into()));
        assert_eq!(said.reason(), "engine");
        let failed = ScoreError::from_engine(EngineError::Backend("kernel failed".into()));
        assert_eq!(failed, ScoreError::Engine("backend error: kernel failed".into()));
        assert_eq!(failed.reason(), "engine");
    }
}
