//! Model parallelism: the layout ([`plan`]), the in-process communicator and stage links
//! ([`local`]), and the engine that runs one model across ranks ([`runner`]).

pub mod cluster;
pub mod local;
pub mod plan;
pub mod runner;
pub mod wire;

pub use plan::{Parallelism, RankPlan};
