//! Model parallelism at run time: the in-process communicator and stage links ([`local`]), the
//! engine that runs one model across ranks ([`runner`]) and the node protocol ([`cluster`],
//! [`wire`]). The layout itself ([`crate::plan`]) lives beside the graph that reads it.

pub mod cluster;
mod failure;
pub mod local;
pub mod node;
pub mod runner;
pub mod wire;

pub use crate::plan::{Parallelism, RankPlan};
