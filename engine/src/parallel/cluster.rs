//! Several nodes, one process each: the rendezvous and the connections between them.
//!
//! Node 0 (the leader) listens on `--leader-addr`; every worker connects to it, retrying until
//! `--rendezvous-timeout-seconds`, and introduces itself (node rank, layout, model fingerprint,
//! the port of its data listener). The leader checks that all agree and answers each with the
//! peer table and, for GPU runs, the NCCL unique id. The control connection then stays open:
//! the leader sends every batch's token ids on it, the node of the last stage returns the head
//! outputs on it, and a closed control connection is a lost node. Activations go directly from
//! each node to the next over data connections (one per tensor-parallel rank).

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::parallel::wire::{expect_frame, write_frame, Kind};
use crate::parallel::Parallelism;

/// Bumped whenever the frames change, so mismatched binaries refuse each other clearly.
const PROTOCOL: u32 = 1;

/// Default port of the leader's rendezvous listener.
pub const DEFAULT_LEADER_PORT: u16 = 29500;

/// Where this process sits in a multi-node deployment.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Number of nodes (processes).
    pub nodes: usize,
    /// This node's index; 0 is the leader.
    pub node_rank: usize,
    /// The leader's rendezvous address, `host:port`.
    pub leader_addr: String,
    /// How long to wait for the other nodes at start.
    pub timeout: Duration,
}

impl ClusterConfig {
    /// Checks the node count against the layout: every node hosts the same number of whole stages.
    pub fn validate(&self, par: &Parallelism) -> Result<()> {
        if self.nodes == 0 || self.node_rank >= self.nodes {
            return Err(EngineError::Plan(format!(
                "--node-rank {} must be below --nodes {}",
                self.node_rank, self.nodes
            )));
        }
        if !par.pp.is_multiple_of(self.nodes) {
            return Err(EngineError::Plan(format!(
                "--pp {} must be a multiple of --nodes {}: each node hosts whole pipeline stages",
                par.pp, self.nodes
            )));
        }
        Ok(())
    }

    /// The pipeline stages node `node` hosts.
    pub fn stages_of(&self, par: &Parallelism, node: usize) -> Range<usize> {
        let per = par.pp / self.nodes;
        node * per..(node + 1) * per
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    protocol: u32,
    node_rank: usize,
    nodes: usize,
    tp: usize,
    pp: usize,
    fingerprint: String,
    data_port: u16,
}

#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    /// Data listener address of every node, by node rank.
    peers: Vec<String>,
}

/// A node that found its peers.
#[derive(Debug)]
pub struct Joined {
    /// The configuration it joined with.
    pub config: ClusterConfig,
    /// Leader: the control connection of each worker, by node rank (index 0 unused). Worker: the
    /// connection to the leader at index 0.
    pub control: Vec<Option<TcpStream>>,
    /// Data listener addresses by node rank.
    pub peers: Vec<String>,
    data: TcpListener,
}

fn parallel(msg: String) -> EngineError {
    EngineError::Parallel(msg)
}

/// Meets the other nodes. Tensor parallelism stays inside a node (NCCL cliques are made per
/// process), so nothing but addresses is exchanged.
pub fn join(cfg: &ClusterConfig, par: &Parallelism, fingerprint: &str) -> Result<Joined> {
    cfg.validate(par)?;
    let data = TcpListener::bind("0.0.0.0:0").map_err(|e| parallel(format!("opening the data listener: {e}")))?;
    let data_port = data.local_addr().map_err(|e| parallel(e.to_string()))?.port();
    let deadline = Instant::now() + cfg.timeout;
    let hello = Hello {
        protocol: PROTOCOL,
        node_rank: cfg.node_rank,
        nodes: cfg.nodes,
        tp: par.tp,
        pp: par.pp,
        fingerprint: fingerprint.to_string(),
        data_port,
    };
    if cfg.node_rank == 0 {
        lead(cfg, hello, data, deadline)
    } else {
        follow(cfg, hello, data, deadline)
    }
}

fn lead(cfg: &ClusterConfig, me: Hello, data: TcpListener, deadline: Instant) -> Result<Joined> {
    let listener = TcpListener::bind(&cfg.leader_addr)
        .map_err(|e| parallel(format!("the leader cannot listen on --leader-addr {}: {e}", cfg.leader_addr)))?;
    listener.set_nonblocking(true).map_err(|e| parallel(e.to_string()))?;
    let leader_host = cfg.leader_addr.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
    let leader_host = if leader_host == "0.0.0.0" || leader_host == "[::]" { "127.0.0.1" } else { leader_host };
    let mut peers = vec![String::new(); cfg.nodes];
    peers[0] = format!("{leader_host}:{}", me.data_port);
    let mut control: Vec<Option<TcpStream>> = (0..cfg.nodes).map(|_| None).collect();
    let mut joined = 1;
    while joined < cfg.nodes {
        let (mut stream, addr) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> =
                        (1..cfg.nodes).filter(|&n| control[n].is_none()).map(|n| n.to_string()).collect();
                    return Err(parallel(format!(
                        "rendezvous timed out after {:.0} s: node(s) {} never joined {}",
                        cfg.timeout.as_secs_f64(),
                        missing.join(", "),
                        cfg.leader_addr
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(parallel(format!("accepting a worker: {e}"))),
        };
        stream.set_nonblocking(false).ok();
        stream
            .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1))))
            .ok();
        stream.set_nodelay(true).ok();
        let hello: Hello = match expect_frame(&mut stream, Kind::Hello)
            .and_then(|p| serde_json::from_slice(&p).map_err(|e| parallel(format!("a bad hello from {addr}: {e}"))))
        {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(%addr, error = %e, "ignoring a connection that is not an arbiter worker");
                continue;
            }
        };
        let refuse = |stream: &mut TcpStream, why: String| -> EngineError {
            let _ = write_frame(stream, Kind::Error, &serde_json::to_vec(&why).unwrap_or_default());
            parallel(why)
        };
        let mismatch = if hello.protocol != PROTOCOL {
            Some(format!(
                "protocol {} (the leader speaks {PROTOCOL}: run the same arbiter version everywhere)",
                hello.protocol
            ))
        } else if (hello.nodes, hello.tp, hello.pp) != (me.nodes, me.tp, me.pp) {
            Some(format!(
                "--nodes {} --tp {} --pp {} (the leader has --nodes {} --tp {} --pp {})",
                hello.nodes, hello.tp, hello.pp, me.nodes, me.tp, me.pp
            ))
        } else if hello.fingerprint != me.fingerprint {
            Some(format!("model fingerprint {} (the leader has {})", hello.fingerprint, me.fingerprint))
        } else if hello.node_rank == 0 || hello.node_rank >= cfg.nodes || control[hello.node_rank].is_some() {
            Some(format!("node rank {} (taken or out of range)", hello.node_rank))
        } else {
            None
        };
        if let Some(m) = mismatch {
            return Err(refuse(&mut stream, format!("node {} at {addr} joined with {m}", hello.node_rank)));
        }
        peers[hello.node_rank] = SocketAddr::new(addr.ip(), hello.data_port).to_string();
        control[hello.node_rank] = Some(stream);
        joined += 1;
    }
    let welcome = serde_json::to_vec(&Welcome { peers: peers.clone() }).map_err(|e| parallel(e.to_string()))?;
    for s in control.iter_mut().flatten() {
        write_frame(s, Kind::Welcome, &welcome)?;
        s.set_read_timeout(None).ok();
    }
    Ok(Joined { config: cfg.clone(), control, peers, data })
}

fn follow(cfg: &ClusterConfig, me: Hello, data: TcpListener, deadline: Instant) -> Result<Joined> {
    let mut stream = loop {
        let attempt = cfg
            .leader_addr
            .to_socket_addrs()
            .map_err(|e| std::io::Error::new(ErrorKind::NotFound, e))
            .and_then(|mut a| a.next().ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address")))
            .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)));
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(leader = %cfg.leader_addr, error = %e, "leader not reachable yet; retrying");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => {
                return Err(parallel(format!(
                    "rendezvous timed out after {:.0} s: cannot reach the leader at --leader-addr {} ({e})",
                    cfg.timeout.as_secs_f64(),
                    cfg.leader_addr
                )))
            }
        }
    };
    stream.set_nodelay(true).ok();
    write_frame(&mut stream, Kind::Hello, &serde_json::to_vec(&me).map_err(|e| parallel(e.to_string()))?)?;
    stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1)))).ok();
    let welcome: Welcome = serde_json::from_slice(&expect_frame(&mut stream, Kind::Welcome)?)
        .map_err(|e| parallel(format!("a bad welcome from the leader: {e}")))?;
    stream.set_read_timeout(None).ok();
    if welcome.peers.len() != cfg.nodes {
        return Err(parallel(format!("the leader listed {} nodes, expected {}", welcome.peers.len(), cfg.nodes)));
    }
    Ok(Joined { config: cfg.clone(), control: vec![Some(stream)], peers: welcome.peers, data })
}

impl Joined {
    /// Opens this node's data connections: `tp` to the next node (when there is one) and `tp`
    /// accepted from the previous node, each in tensor-parallel rank order.
    pub fn connect_data(&self, tp: usize, timeout: Duration) -> Result<(Vec<TcpStream>, Vec<TcpStream>)> {
        let me = self.config.node_rank;
        let deadline = Instant::now() + timeout;
        let mut to_next = Vec::new();
        if me + 1 < self.config.nodes {
            let addr = &self.peers[me + 1];
            for rank in 0..tp {
                let mut s = loop {
                    match TcpStream::connect(addr) {
                        Ok(s) => break s,
                        Err(e) if Instant::now() >= deadline => {
                            return Err(parallel(format!(
                                "cannot open the data connection to node {} at {addr}: {e}",
                                me + 1
                            )))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                };
                s.set_nodelay(true).ok();
                write_frame(&mut s, Kind::Ready, &(rank as u32).to_le_bytes())?;
                to_next.push(s);
            }
        }
        let mut from_prev: Vec<Option<TcpStream>> = Vec::new();
        if me > 0 {
            from_prev = (0..tp).map(|_| None).collect();
            self.data.set_nonblocking(true).map_err(|e| parallel(e.to_string()))?;
            let mut got = 0;
            while got < tp {
                match self.data.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).ok();
                        s.set_nodelay(true).ok();
                        let p = expect_frame(&mut s, Kind::Ready)?;
                        let rank = p.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
                        match rank {
                            Some(r) if r < tp && from_prev[r].is_none() => {
                                from_prev[r] = Some(s);
                                got += 1;
                            }
                            _ => return Err(parallel(format!("a bad data connection from node {}", me - 1))),
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => return Err(parallel(format!("node {} did not open its data connections: {e}", me - 1))),
                }
            }
        }
        Ok((from_prev.into_iter().flatten().collect(), to_next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nodes: usize, rank: usize, addr: &str, ms: u64) -> ClusterConfig {
        ClusterConfig { nodes, node_rank: rank, leader_addr: addr.into(), timeout: Duration::from_millis(ms) }
    }

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    #[test]
    fn three_nodes_meet_and_connect_in_a_chain() {
        let addr = free_addr();
        let par = Parallelism { tp: 2, pp: 3 };
        let joined: Vec<Joined> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        // Workers start first and must retry until the leader listens.
                        if rank == 0 {
                            std::thread::sleep(Duration::from_millis(300));
                        }
                        join(&cfg(3, rank, &addr, 10_000), &par, "abc").unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for j in &joined {
            assert_eq!(j.peers, joined[0].peers);
        }
        let links: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> =
                joined.iter().map(|j| s.spawn(|| j.connect_data(2, Duration::from_secs(10)).unwrap())).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let counts: Vec<(usize, usize)> = links.iter().map(|(a, b)| (a.len(), b.len())).collect();
        assert_eq!(counts, [(0, 2), (2, 2), (2, 0)]);
    }

    #[test]
    fn a_worker_with_another_model_is_refused_by_name() {
        let addr = free_addr();
        let par = Parallelism { tp: 1, pp: 2 };
        let (leader, worker) = std::thread::scope(|s| {
            let a = addr.clone();
            let l = s.spawn(move || join(&cfg(2, 0, &a, 5_000), &par, "model-a"));
            let w = s.spawn(|| join(&cfg(2, 1, &addr, 5_000), &par, "model-b"));
            (l.join().unwrap(), w.join().unwrap())
        });
        let e = leader.unwrap_err().to_string();
        assert!(e.contains("model fingerprint model-b (the leader has model-a)"), "{e}");
        assert!(worker.unwrap_err().to_string().contains("fingerprint"));
    }

    #[test]
    fn missing_nodes_time_out_with_their_ranks() {
        let addr = free_addr();
        let par = Parallelism { tp: 1, pp: 3 };
        let e = join(&cfg(3, 0, &addr, 300), &par, "m").unwrap_err().to_string();
        assert!(e.contains("node(s) 1, 2 never joined"), "{e}");
        let e = join(&cfg(3, 2, &free_addr(), 300), &par, "m").unwrap_err().to_string();
        assert!(e.contains("cannot reach the leader"), "{e}");
        let e = cfg(2, 0, &addr, 1).validate(&par).unwrap_err().to_string();
        assert!(e.contains("--pp 3 must be a multiple of --nodes 2"), "{e}");
    }
}
