//! This process's role in a deployment: alone, the leader of several nodes, or a worker.
//!
//! The leader sends every batch to the workers on their control connections and receives the
//! answers from the node of the last stage; a worker runs what the leader sends and reports its
//! first failure at once. Activations cross between nodes on [`TcpLink`]s, one per
//! tensor-parallel rank, attached to the first and last stage of the node.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backend::{HostTensor, StageLink};
use crate::batch::PackedBatch;
use crate::error::{EngineError, Result};
use crate::parallel::cluster::Joined;
use crate::parallel::failure::Failure;
use crate::parallel::local::{rebuild, MakeTensor};
use crate::parallel::wire::{
    decode_batch, decode_f32, encode_batch, encode_f32, expect_frame, read_frame, write_frame, Kind,
};
use crate::sync::lock;

/// Head outputs of a batch, one row per item.
pub(crate) type Outputs = Result<Vec<Vec<f32>>>;

/// Where a batch's answer (or the first failure) is sent.
pub(crate) type Reply = std::sync::mpsc::SyncSender<Outputs>;

/// What a node of a multi-node deployment brings to the engine's loading: the rendezvous result
/// and its data connections.
pub struct NodeWiring {
    /// The rendezvous result (control connections, peers).
    pub joined: Joined,
    /// Data connections from the previous node, by tensor-parallel rank.
    pub from_prev: Vec<TcpStream>,
    /// Data connections to the next node, by tensor-parallel rank.
    pub to_next: Vec<TcpStream>,
}

/// Stage links a node's edge ranks use: what [`NodeWiring::split`] hands to the ranks.
pub(crate) struct EdgeLinks<T> {
    /// Inputs of the node's first stage, by tensor-parallel rank (empty on the first node).
    pub(crate) inputs: Vec<Box<dyn StageLink<T>>>,
    /// Outputs of the node's last stage, by tensor-parallel rank (empty on the last node).
    pub(crate) outputs: Vec<Box<dyn StageLink<T>>>,
}

impl NodeWiring {
    /// Turns the data connections into stage links (tensors rebuilt on the receiving rank by
    /// `make_first(tp_rank)`, sent from the last stage's rank `tp_rank`) and the control
    /// connections into this node's role, which starts once its ranks have loaded.
    pub(crate) fn split<T: HostTensor + Send + 'static>(
        self,
        timeout: Duration,
        make_first: impl Fn(usize) -> MakeTensor<T>,
        make_last: impl Fn(usize) -> MakeTensor<T>,
    ) -> (EdgeLinks<T>, Loading) {
        let tcp = |stream: TcpStream, make: MakeTensor<T>| -> Box<dyn StageLink<T>> {
            stream.set_read_timeout(Some(timeout)).ok();
            Box::new(TcpLink { stream: Mutex::new(stream), make })
        };
        let inputs = self.from_prev.into_iter().enumerate().map(|(i, s)| tcp(s, make_first(i))).collect();
        let outputs = self.to_next.into_iter().enumerate().map(|(i, s)| tcp(s, make_last(i))).collect();
        let mut control = self.joined.control.into_iter().flatten();
        let loading = if self.joined.config.node_rank == 0 {
            Loading::Leader(control.collect())
        } else {
            match control.next() {
                Some(c) => Loading::Worker(c),
                None => Loading::Alone,
            }
        };
        (EdgeLinks { inputs, outputs }, loading)
    }
}

/// A node's role while its ranks load.
pub(crate) enum Loading {
    /// One process holds every stage.
    Alone,
    /// The leader, with the workers' control connections.
    Leader(Vec<TcpStream>),
    /// A worker, with its control connection to the leader.
    Worker(TcpStream),
}

impl Loading {
    /// Reports how this node's loading went and starts the role: a worker tells the leader
    /// (ready, or why not); the leader waits until every worker is ready, then listens to them.
    /// The leader's listener threads are pushed onto `threads`.
    pub(crate) fn finish(
        self,
        loaded: Result<()>,
        failure: &Arc<Failure>,
        threads: &mut Vec<JoinHandle<()>>,
    ) -> Result<NodeRole> {
        match (self, loaded) {
            (Loading::Worker(mut c), Err(e)) => {
                let _ = write_frame(&mut c, Kind::Error, &serde_json::to_vec(&e.to_string()).unwrap_or_default());
                Err(e)
            }
            (_, Err(e)) => Err(e),
            (Loading::Alone, Ok(())) => Ok(NodeRole::Alone),
            (Loading::Worker(mut c), Ok(())) => {
                write_frame(&mut c, Kind::Ready, &[])?;
                Ok(NodeRole::Worker(Worker { control: c }))
            }
            (Loading::Leader(workers), Ok(())) => Ok(NodeRole::Leader(Leader::start(workers, failure, threads)?)),
        }
    }
}

/// This process's role in a deployment.
pub(crate) enum NodeRole {
    /// Every stage is in this process.
    Alone,
    /// Node 0 of several.
    Leader(Leader),
    /// A node other than 0.
    Worker(Worker),
}

impl NodeRole {
    /// Sends `batch` to the other nodes (on the leader); `reply` gets the answer of the last
    /// node. Alone and on a worker there is nobody to send to.
    pub(crate) fn send(&self, batch: &PackedBatch, reply: &Reply) -> Result<()> {
        match self {
            NodeRole::Leader(l) => l.send(batch, reply),
            NodeRole::Alone | NodeRole::Worker(_) => Ok(()),
        }
    }

    /// Closes the control connections, which ends the threads reading them and tells the peers.
    pub(crate) fn shutdown(&self) {
        let streams: &[TcpStream] = match self {
            NodeRole::Alone => &[],
            NodeRole::Leader(l) => &l.workers,
            NodeRole::Worker(w) => std::slice::from_ref(&w.control),
        };
        for s in streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The leader's side of the other nodes.
pub(crate) struct Leader {
    /// Control connections of the workers, for sending batches.
    workers: Vec<TcpStream>,
    /// Replies awaited from the node of the last stage, in dispatch order.
    pending: Arc<Mutex<VecDeque<Reply>>>,
}

impl Leader {
    /// Waits until every worker has loaded, then starts a reader per control connection
    /// (outputs from the last node, failures from any).
    fn start(mut workers: Vec<TcpStream>, failure: &Arc<Failure>, threads: &mut Vec<JoinHandle<()>>) -> Result<Self> {
        for (k, w) in workers.iter_mut().enumerate() {
            expect_frame(w, Kind::Ready).map_err(|e| EngineError::Parallel(format!("node {}: {e}", k + 1)))?;
        }
        let pending: Arc<Mutex<VecDeque<Reply>>> = Arc::default();
        let last = workers.len();
        for (k, w) in workers.iter().enumerate() {
            let r = w.try_clone().map_err(|e| EngineError::Parallel(e.to_string()))?;
            let (failure, pending) = (failure.clone(), pending.clone());
            let node = k + 1;
            let t = std::thread::Builder::new()
                .name(format!("node-{node}-control"))
                .spawn(move || listen(r, node, node == last, &failure, &pending))
                .map_err(|e| EngineError::Parallel(format!("cannot start a control thread: {e}")))?;
            threads.push(t);
        }
        Ok(Leader { workers, pending })
    }

    fn send(&self, batch: &PackedBatch, reply: &Reply) -> Result<()> {
        let frame = encode_batch(batch);
        lock(&self.pending).push_back(reply.clone());
        for mut w in &self.workers {
            write_frame(&mut w, Kind::Batch, &frame)?;
        }
        Ok(())
    }
}

/// The leader's reader of one worker's control connection: answers from the last node go to
/// the oldest pending reply; anything else is the end of the deployment.
fn listen(mut r: TcpStream, node: usize, last: bool, failure: &Failure, pending: &Mutex<VecDeque<Reply>>) {
    let why = loop {
        match read_frame(&mut r) {
            Ok((Kind::Outputs, p)) if last => {
                let out = decode_f32(&p)
                    .map(|(rows, cols, v)| v.chunks(cols.max(1)).take(rows).map(<[f32]>::to_vec).collect::<Vec<_>>());
                if let Some(reply) = lock(pending).pop_front() {
                    let _ = reply.send(out);
                }
            }
            Ok((Kind::Error, p)) => {
                break format!("node {node}: {}", serde_json::from_slice::<String>(&p).unwrap_or_default())
            }
            Ok((k, _)) => break format!("node {node} sent an unexpected {k:?} frame"),
            Err(e) => break format!("lost node {node}: {e}"),
        }
    };
    let why = failure.set(why);
    for reply in lock(pending).drain(..) {
        let _ = reply.send(Err(EngineError::Parallel(why.clone())));
    }
}

/// A worker's side of the leader.
pub(crate) struct Worker {
    control: TcpStream,
}

impl Worker {
    /// Runs the batches the leader sends through `dispatch` until the leader goes away, and
    /// returns why it stopped (a worker never stops on its own). `answers`: whether this node
    /// runs the last stage, and so sends the outputs back. The first failure of this node's
    /// ranks is reported to the leader at once, which stops the whole deployment.
    pub(crate) fn run(
        &self,
        failure: &Failure,
        answers: bool,
        dispatch: impl Fn(Arc<PackedBatch>) -> Result<Receiver<Outputs>>,
    ) -> Result<()> {
        let clone = || self.control.try_clone().map_err(|e| EngineError::Parallel(e.to_string()));
        let mut control = clone()?;
        let writer = Arc::new(Mutex::new(clone()?));
        {
            let writer = writer.clone();
            failure.on_failure(Box::new(move |why: &str| {
                let mut w = lock(&writer);
                let _ = write_frame(&mut *w, Kind::Error, &serde_json::to_vec(why).unwrap_or_default());
            }));
        }
        // Answers go back in order from a writer thread, so reading the next batch never waits
        // for this one to finish: that is the overlap between nodes.
        let (answers_tx, answers_rx) = std::sync::mpsc::channel::<Receiver<Outputs>>();
        let write_answers = std::thread::spawn(move || {
            for rx in answers_rx {
                // Failures reach the leader through the failure notice; only outputs go here.
                let Ok(Ok(out)) = rx.recv() else { return };
                let cols = out.first().map_or(0, Vec::len);
                let flat: Vec<f32> = out.into_iter().flatten().collect();
                let frame = encode_f32(flat.len() / cols.max(1), cols, &flat);
                if write_frame(&mut *lock(&writer), Kind::Outputs, &frame).is_err() {
                    return;
                }
            }
        });
        let result = loop {
            let batch = match read_frame(&mut control) {
                Ok((Kind::Batch, p)) => decode_batch(&p)?,
                Ok((k, _)) => break Err(EngineError::Parallel(format!("the leader sent an unexpected {k:?} frame"))),
                Err(e) => break Err(EngineError::Parallel(format!("lost the leader: {e}"))),
            };
            let rx = match dispatch(Arc::new(batch)) {
                Ok(rx) => rx,
                Err(e) => break Err(e),
            };
            if answers && answers_tx.send(rx).is_err() {
                break Err(EngineError::Parallel("lost the leader while answering".into()));
            }
        };
        if let Err(e) = &result {
            failure.set(e.to_string());
        }
        drop(answers_tx);
        let _ = write_answers.join();
        result
    }
}

/// A stage link to or from a rank on another node, over a TCP data connection.
struct TcpLink<T> {
    stream: Mutex<TcpStream>,
    make: MakeTensor<T>,
}

impl<T: HostTensor + Send> StageLink<T> for TcpLink<T> {
    fn send(&self, t: &T) -> Result<()> {
        let data = t.read_host()?;
        let mut s = lock(&self.stream);
        write_frame(&mut *s, Kind::Tensor, &encode_f32(1, data.len(), &data))
    }

    fn recv(&self, rows: usize, cols: usize) -> Result<T> {
        let mut s = lock(&self.stream);
        let (_, _, data) = decode_f32(&expect_frame(&mut *s, Kind::Tensor)?)?;
        rebuild(&self.make, &data, rows, cols, "the previous node")
    }
}
