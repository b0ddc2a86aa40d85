//! The server's errors: a request's ([`ServiceError`], and the one place where they become gRPC
//! status codes and HTTP statuses), and a command's ([`CommandError`]: `serve`, `quantize`, the
//! memory plan, model flags).

use arbiter_engine::EngineError;
use arbiter_scoring::error::Place;
use arbiter_scoring::{QueueError, RequestError, ScoreError};
use tonic::{Code, Status};

/// Why a request (or one item of it) was not answered with a score.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ServiceError {
    /// The request is malformed; the message names the item and the problem.
    #[error("{0}")]
    InvalidArgument(String),
    /// The queue cannot take the request's items now; retry later.
    #[error("the queue is full ({depth} items waiting, capacity {capacity}); retry with backoff")]
    QueueFull {
        /// Items waiting.
        depth: usize,
        /// Queue capacity.
        capacity: usize,
    },
    /// The batch ran out of memory or another resource.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The server is loading, warming up or draining.
    #[error("{0}")]
    Unavailable(String),
    /// The bearer token is missing or wrong.
    #[error("{0}")]
    Unauthenticated(String),
    /// The request's deadline passed before it was answered.
    #[error("the deadline passed before the request could be answered")]
    DeadlineExceeded,
    /// The client went away.
    #[error("the client cancelled the request")]
    Cancelled,
    /// A bug or a backend failure; other requests are unaffected.
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// The gRPC status code of this error.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::QueueFull { .. } | ServiceError::ResourceExhausted(_) => Code::ResourceExhausted,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Unauthenticated(_) => Code::Unauthenticated,
            ServiceError::DeadlineExceeded => Code::DeadlineExceeded,
            ServiceError::Cancelled => Code::Cancelled,
            ServiceError::Internal(_) => Code::Internal,
        }
    }

    /// The HTTP status of this error, for the HTTP front ends (`server::http`).
    pub fn http_status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            ServiceError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            ServiceError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ServiceError::QueueFull { .. } | ServiceError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            ServiceError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServiceError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            // The client went away; nobody reads the answer, but it must be one.
            ServiceError::Cancelled => StatusCode::BAD_REQUEST,
            ServiceError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Prefixes the message with where in the request the problem is (`items[3]`).
    pub fn at(self, place: impl std::fmt::Display) -> Self {
        match self {
            ServiceError::InvalidArgument(m) => ServiceError::InvalidArgument(format!("{place}: {m}")),
            other => other,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

impl From<EngineError> for ServiceError {
    fn from(e: EngineError) -> Self {
        ServiceError::from_score(ScoreError::from_engine(e), None)
    }
}

impl ServiceError {
    /// The status of a scoring-core error about the item at `place` (named in the message when
    /// the caller can fix it).
    pub fn from_score(e: ScoreError, place: Option<String>) -> Self {
        match e {
            ScoreError::Invalid(m) => ServiceError::InvalidArgument(match place {
                Some(p) => format!("{p}: {m}"),
                None => m,
            }),
            ScoreError::Queue(QueueError::Full { depth, capacity }) => ServiceError::QueueFull { depth, capacity },
            ScoreError::Queue(QueueError::Closed) => ServiceError::Unavailable("the server is shutting down".into()),
            ScoreError::Queue(QueueError::DeadlineExceeded) => ServiceError::DeadlineExceeded,
            e @ ScoreError::OutOfMemory(_) => ServiceError::ResourceExhausted(e.to_string()),
            e @ (ScoreError::Queue(QueueError::EngineStopped) | ScoreError::Engine(_) | ScoreError::Panicked(_)) => {
                ServiceError::Internal(e.to_string())
            }
        }
    }

    /// The status of a failed request; `items` names its list in messages (`items[3]: ...`).
    pub fn from_request(e: RequestError, items: &str) -> Self {
        let place = match e.place {
            Place::Request => None,
            Place::Item(i) => Some(format!("{items}[{i}]")),
            Place::Prompt => Some("prompt".to_string()),
        };
        ServiceError::from_score(e.error, place)
    }
}

/// The status code name as Prometheus labels and logs spell it ("OK", "INVALID_ARGUMENT", ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Why a command (`arbiter serve`, `quantize`, the memory plan, the model flags) could not run.
/// Messages carry their cause in full: the binary prints them as they are.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A flag's value is unusable.
    #[error("{flag}: {message}")]
    Flag {
        /// The flag, as typed (`--metrics-listen`).
        flag: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// A file a flag names cannot be read.
    #[error("reading {flag} {}: {source}", path.display())]
    ReadFile {
        /// The flag that names it.
        flag: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// An address cannot be listened on.
    #[error("binding {flag} {addr}: {source}")]
    Bind {
        /// The flag that names it.
        flag: &'static str,
        /// The address.
        addr: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A part of the server cannot be set up (metrics exporter, TLS, reflection, threads).
    #[error("{what}: {message}")]
    Setup {
        /// The part.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// The engine refused (the model folder, the layout, the backend, the memory plan).
    #[error("{doing}: {source}")]
    Engine {
        /// What was being done ("loading the model").
        doing: String,
        /// The engine's reason.
        source: EngineError,
    },
    /// The converter refused (`arbiter quantize`).
    #[error("{doing}: {source}")]
    Convert {
        /// What was being done.
        doing: String,
        /// The converter's reason (boxed: it is large, and rare).
        source: Box<arbiter_convert::ConvertError>,
    },
    /// The server stopped because it could not go on (a failed engine or pipeline worker).
    #[error("{0}")]
    Stopped(String),
}

impl CommandError {
    /// An engine error met while `doing` something.
    pub fn engine(doing: impl Into<String>) -> impl FnOnce(EngineError) -> CommandError {
        let doing = doing.into();
        move |source| CommandError::Engine { doing, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_codes() {
        let e: ServiceError = EngineError::InvalidInput("bad".into()).into();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e: ServiceError = EngineError::OutOfMemory("CUDA: cannot allocate 64 MiB".into()).into();
        assert_eq!(e.code(), Code::ResourceExhausted);
        let e: ServiceError = EngineError::Backend("kernel failed".into()).into();
        assert_eq!(e.code(), Code::Internal);
        assert_eq!(ServiceError::QueueFull { depth: 1, capacity: 1 }.code(), Code::ResourceExhausted);
        assert_eq!(ServiceError::QueueFull { depth: 1, capacity: 1 }.http_status().as_u16(), 429);
        assert_eq!(ServiceError::Unauthenticated("x".into()).http_status().as_u16(), 401);
        assert_eq!(ServiceError::Unavailable("x".into()).http_status().as_u16(), 503);
        let s: Status = ServiceError::InvalidArgument("x".into()).at("items[2]").into();
        assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "items[2]: x"));
    }

    #[test]
    fn core_errors_map_to_codes_naming_the_item() {
        let at = |place, error| ServiceError::from_request(RequestError { place, error }, "candidates");
        let s: Status = at(Place::Item(3), ScoreError::Invalid("too long".into())).into();
        assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "candidates[3]: too long"));
        let s: Status = at(Place::Prompt, ScoreError::Invalid("no user turn".into())).into();
        assert_eq!(s.message(), "prompt: no user turn");
        let full = ScoreError::Queue(QueueError::Full { depth: 4, capacity: 4 });
        assert_eq!(at(Place::Request, full).code(), Code::ResourceExhausted);
        assert_eq!(at(Place::Request, QueueError::Closed.into()).code(), Code::Unavailable);
        assert_eq!(at(Place::Item(0), QueueError::DeadlineExceeded.into()).code(), Code::DeadlineExceeded);
        let s: Status = at(Place::Item(1), ScoreError::Panicked("bug".into())).into();
        assert_eq!((s.code(), s.message()), (Code::Internal, "the engine panicked on this batch: bug"));
    }
}
