//! In-process model parallelism: ranks are threads of one process. Used for CPU ranks, and in
//! tests for several ranks on one device.
//!
//! The all-reduce sums contributions in rank order on the host, so its result does not depend on
//! which rank arrives first: TP runs are as deterministic as TP=1 runs.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Communicator, HostTensor, StageLink};
use crate::error::{EngineError, Result};

/// Default limit on how long a collective call waits for its peers.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Round {
    /// Completed rounds; a rank waiting in round `g` is released when this passes `g`.
    generation: u64,
    contributions: Vec<Option<Vec<f32>>>,
    arrived: usize,
    result: Arc<Vec<f32>>,
    /// Set once a rank failed or timed out; every later call fails with it.
    poisoned: Option<String>,
}

/// The shared state of one tensor-parallel group of threads.
pub struct LocalGroup {
    size: usize,
    timeout: Duration,
    state: Mutex<Round>,
    cv: Condvar,
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGroup").field("size", &self.size).field("timeout", &self.timeout).finish()
    }
}

impl LocalGroup {
    /// A group of `size` ranks whose collectives give up after `timeout`.
    pub fn new(size: usize, timeout: Duration) -> Arc<Self> {
        let state = Round { contributions: vec![None; size], ..Round::default() };
        Arc::new(LocalGroup { size, timeout, state: Mutex::new(state), cv: Condvar::new() })
    }

    /// One communicator per rank, in rank order.
    pub fn communicators(self: &Arc<Self>) -> Vec<LocalComm> {
        (0..self.size).map(|rank| LocalComm { group: self.clone(), rank }).collect()
    }

    /// Marks the group failed: every waiting and later collective returns an error with `why`.
    pub fn poison(&self, why: &str) {
        let mut st = crate::sync::lock(&self.state);
        st.poisoned.get_or_insert_with(|| why.to_string());
        self.cv.notify_all();
    }

    fn sum(&self, rank: usize, mine: Vec<f32>) -> Result<Arc<Vec<f32>>> {
        let mut st = crate::sync::lock(&self.state);
        if let Some(why) = &st.poisoned {
            return Err(EngineError::Parallel(why.clone()));
        }
        if st.contributions[rank].is_some() {
            return Err(EngineError::Parallel(format!("rank {rank} entered an all-reduce twice")));
        }
        let n = mine.len();
        if let Some(other) = st.contributions.iter().flatten().next() {
            if other.len() != n {
                let why = format!("all-reduce size mismatch: rank {rank} has {n} values, a peer {}", other.len());
                st.poisoned = Some(why.clone());
                self.cv.notify_all();
                return Err(EngineError::Parallel(why));
            }
        }
        st.contributions[rank] = Some(mine);
        st.arrived += 1;
        let generation = st.generation;
        if st.arrived == self.size {
            let mut total = vec![0.0f32; n];
            for c in st.contributions.iter_mut() {
                for (t, v) in total.iter_mut().zip(c.take().unwrap_or_default()) {
                    *t += v;
                }
            }
            st.result = Arc::new(total);
            st.arrived = 0;
            st.generation += 1;
            self.cv.notify_all();
            return Ok(st.result.clone());
        }
        let deadline = Instant::now() + self.timeout;
        while st.generation == generation {
            if let Some(why) = &st.poisoned {
                return Err(EngineError::Parallel(why.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> =
                    (0..self.size).filter(|&r| st.contributions[r].is_none()).map(|r| r.to_string()).collect();
                let why = format!(
                    "all-reduce timed out after {:.0} s: rank {rank} waited for rank(s) {} that never arrived",
                    self.timeout.as_secs_f64(),
                    missing.join(", ")
                );
                st.poisoned = Some(why.clone());
                self.cv.notify_all();
                return Err(EngineError::Parallel(why));
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(st.result.clone())
    }
}

/// One rank's handle on a [`LocalGroup`].
#[derive(Debug)]
pub struct LocalComm {
    group: Arc<LocalGroup>,
    rank: usize,
}

impl<T: HostTensor> Communicator<T> for LocalComm {
    fn world_size(&self) -> usize {
        self.group.size
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce(&self, t: &mut T) -> Result<()> {
        if self.group.size == 1 {
            return Ok(());
        }
        let sum = self.group.sum(self.rank, t.read_host()?)?;
        t.write_host(&sum)
    }
}

/// Turns host values into a tensor on the receiving rank's backend.
pub type MakeTensor<T> = Arc<dyn Fn(&[f32], usize, usize) -> Result<T> + Send + Sync>;

/// One end of an in-process link between consecutive pipeline stages (a bounded channel of host
/// copies of the residual stream).
pub struct ChannelLink<T> {
    tx: Option<SyncSender<Vec<f32>>>,
    rx: Option<Mutex<Receiver<Vec<f32>>>>,
    make: MakeTensor<T>,
    timeout: Duration,
}

impl<T> std::fmt::Debug for ChannelLink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelLink").field("sends", &self.tx.is_some()).field("receives", &self.rx.is_some()).finish()
    }
}

/// A link from one stage to the next: `(sending end, receiving end)`. `depth` batches may be in
/// flight between them, which is what lets consecutive batches overlap across stages.
pub fn channel_link<T>(depth: usize, timeout: Duration, make: MakeTensor<T>) -> (ChannelLink<T>, ChannelLink<T>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(depth.max(1));
    (
        ChannelLink { tx: Some(tx), rx: None, make: make.clone(), timeout },
        ChannelLink { tx: None, rx: Some(Mutex::new(rx)), make, timeout },
    )
}

impl<T: HostTensor + Send> StageLink<T> for ChannelLink<T> {
    fn send(&self, t: &T) -> Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| EngineError::Parallel("send on the receiving end of a link".into()))?;
        tx.send(t.read_host()?).map_err(|_| EngineError::Parallel("the next pipeline stage is gone".into()))
    }

    fn recv(&self, rows: usize, cols: usize) -> Result<T> {
        let rx =
            self.rx.as_ref().ok_or_else(|| EngineError::Parallel("receive on the sending end of a link".into()))?;
        let rx = crate::sync::lock(rx);
        let data = rx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => EngineError::Parallel(format!(
                "no activations from the previous pipeline stage within {:.0} s",
                self.timeout.as_secs_f64()
            )),
            RecvTimeoutError::Disconnected => EngineError::Parallel("the previous pipeline stage is gone".into()),
        })?;
        rebuild(&self.make, &data, rows, cols, "the previous stage")
    }
}

/// Rebuilds a received `[rows, cols]` activation on the receiving rank, after checking that
/// `from` (the sender, for the error) sent that many values.
pub(crate) fn rebuild<T>(make: &MakeTensor<T>, data: &[f32], rows: usize, cols: usize, from: &str) -> Result<T> {
    if data.len() != rows * cols {
        return Err(EngineError::Parallel(format!(
            "{from} sent {} values for a {rows} x {cols} activation",
            data.len()
        )));
    }
    make(data, rows, cols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuTensor;

    fn t(v: &[f32]) -> CpuTensor {
        CpuTensor::new(v.to_vec(), 1, v.len())
    }

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank_and_repeats() {
        let group = LocalGroup::new(3, Duration::from_secs(10));
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .communicators()
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for round in 0..4 {
                            let r = Communicator::<CpuTensor>::rank(&c) as f32;
                            let mut x = t(&[r + round as f32, 10.0 * r]);
                            c.all_reduce(&mut x).unwrap();
                            out.extend_from_slice(&x.data);
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<f32> = (0..4).flat_map(|round| [3.0 + 3.0 * round as f32, 30.0]).collect();
        for r in &results {
            assert_eq!(r, &want);
        }
    }

    #[test]
    fn a_missing_rank_times_out_and_poisons_the_group() {
        let group = LocalGroup::new(2, Duration::from_millis(100));
        let comms = group.communicators();
        let mut x = t(&[1.0]);
        let e = comms[0].all_reduce(&mut x).unwrap_err().to_string();
        assert!(e.contains("timed out") && e.contains("rank(s) 1"), "{e}");
        // The late rank does not hang: the group is poisoned.
        let e = comms[1].all_reduce(&mut x).unwrap_err().to_string();
        assert!(e.contains("timed out"), "{e}");
    }

    #[test]
    fn links_carry_activations_and_report_a_lost_peer() {
        let make: MakeTensor<CpuTensor> = Arc::new(|d: &[f32], rows, cols| Ok(CpuTensor::new(d.to_vec(), rows, cols)));
        let (tx, rx) = channel_link(2, Duration::from_millis(100), make);
        tx.send(&t(&[1.0, 2.0])).unwrap();
        assert_eq!(rx.recv(1, 2).unwrap().data, [1.0, 2.0]);
        let e = rx.recv(1, 2).unwrap_err().to_string();
        assert!(e.contains("within"), "{e}");
        drop(tx);
        let e = rx.recv(1, 2).unwrap_err().to_string();
        assert!(e.contains("gone"), "{e}");
    }
}
