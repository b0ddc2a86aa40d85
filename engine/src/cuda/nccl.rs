//! NCCL between GPUs: the tensor-parallel all-reduce ([`Communicator`]) and the pipeline stage
//! link ([`StageLink`]) for CUDA tensors.
//!
//! Every operation is enqueued on the backend's stream (so it is ordered with the kernels around
//! it) and then waited for by polling an event against a deadline: a rank that died or never
//! arrives makes the call fail after the timeout, with the communicator aborted, instead of
//! hanging the process forever.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::sys;

use super::probe::{check_libraries, CudaLibrary};
use super::tensor::Data;
use super::{alloc_on, driver_err, CudaBackend, CudaTensor};
use crate::backend::{Communicator, StageLink};
use crate::error::{EngineError, Result};

/// How long a collective may wait for the other ranks before the communicator is aborted.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Bytes of an NCCL unique id: what rank 0 creates and every rank must be given.
pub const ID_BYTES: usize = 128;

fn nccl_message(r: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static C string for any result code.
    let s = unsafe { sys::ncclGetErrorString(r) };
    if s.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: non-null, NUL-terminated, static.
        format!("{r:?}: {}", unsafe { CStr::from_ptr(s) }.to_string_lossy())
    }
}

fn check(r: sys::ncclResult_t, what: &str) -> Result<()> {
    match r {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        e => Err(EngineError::Backend(format!("NCCL: cannot {what}: {}", nccl_message(e)))),
    }
}

/// A raw communicator handle that may cross threads (NCCL allows a communicator to be used from
/// any thread, one call at a time: [`NcclComm`] serializes its calls).
struct RawComm(sys::ncclComm_t);
// SAFETY: see above.
unsafe impl Send for RawComm {}

/// One rank of an NCCL communicator bound to one GPU's backend stream.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
    aborted: AtomicBool,
    calls: Mutex<()>,
}

// SAFETY: the handle is only used under `calls`, and NCCL communicators may move between threads.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {})", self.rank, self.world)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // Abort rather than destroy: destroy waits for outstanding work, which never comes
            // if a peer died; every operation of ours has completed by now anyway.
            // SAFETY: the handle is ours and used by nothing else any more.
            unsafe {
                sys::ncclCommAbort(self.comm);
            }
        }
    }
}

/// A fresh NCCL unique id, to hand to every rank (over whatever channel the launcher has).
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    check_libraries(&[CudaLibrary::Nccl], CudaLibrary::is_present)?;
    let mut id = sys::ncclUniqueId { internal: [0; ID_BYTES] };
    // SAFETY: `id` is a valid out-pointer.
    check(unsafe { sys::ncclGetUniqueId(&mut id) }, "create a unique id")?;
    Ok(id.internal.map(|c| c as u8))
}

impl NcclComm {
    /// Joins the communicator `id` as `rank` of `world` on `backend`'s GPU. Blocks until every
    /// rank has joined, at most `timeout`.
    pub fn new(backend: &CudaBackend, id: &[u8], rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        check_libraries(&[CudaLibrary::Nccl], CudaLibrary::is_present)?;
        let bytes: [u8; ID_BYTES] = id.try_into().map_err(|_| {
            EngineError::Backend(format!("an NCCL unique id is {ID_BYTES} bytes, this one is {}", id.len()))
        })?;
        if world == 0 || rank >= world {
            return Err(EngineError::Backend(format!("NCCL: rank {rank} of a group of {world}")));
        }
        let (nranks, r) = (world as i32, rank as i32);
        let unique = sys::ncclUniqueId { internal: bytes.map(|b| b as std::ffi::c_char) };
        let stream = backend.stream().clone();
        let ctx = stream.context().clone();
        // ncclCommInitRank blocks until all ranks arrive and cannot be interrupted; it runs on its
        // own thread so that this call can give up. A late success is aborted by that thread.
        let given_up = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let flag = given_up.clone();
        std::thread::Builder::new()
            .name(format!("arbiter-nccl-init-{rank}"))
            .spawn(move || {
                let result = ctx.bind_to_thread().map_err(driver_err("bind the GPU for NCCL")).and_then(|()| {
                    let mut comm = std::ptr::null_mut();
                    // SAFETY: valid out-pointer; the id is passed by value.
                    check(unsafe { sys::ncclCommInitRank(&mut comm, nranks, unique, r) }, "initialize the communicator")
                        .map(|()| RawComm(comm))
                });
                if flag.load(Ordering::SeqCst) {
                    if let Ok(c) = result {
                        // SAFETY: nobody else holds this handle.
                        unsafe { sys::ncclCommAbort(c.0) };
                    }
                } else {
                    let _ = tx.send(result);
                }
            })
            .map_err(|e| EngineError::Backend(format!("cannot start the NCCL init thread: {e}")))?;
        match rx.recv_timeout(timeout) {
            Ok(r) => Ok(NcclComm {
                comm: r?.0,
                stream,
                rank,
                world,
                timeout,
                aborted: AtomicBool::new(false),
                calls: Mutex::new(()),
            }),
            Err(_) => {
                given_up.store(true, Ordering::SeqCst);
                // The thread may have sent just before the flag was set.
                if let Ok(Ok(c)) = rx.try_recv() {
                    // SAFETY: nobody else holds this handle.
                    unsafe { sys::ncclCommAbort(c.0) };
                }
                Err(EngineError::Backend(format!(
                    "NCCL: rank {rank} of {world} waited {timeout:?} for the other ranks to join; did every rank start with the same id?"
                )))
            }
        }
    }

    /// One communicator per backend (one GPU each) in this process: rank `i` is `backends[i]`.
    /// Each rank joins from its own thread, as NCCL requires when ranks share a process.
    pub fn local_group(backends: &[&CudaBackend], timeout: Duration) -> Result<Vec<NcclComm>> {
        let id = unique_id()?;
        let world = backends.len();
        std::thread::scope(|s| {
            let joins: Vec<_> = backends
                .iter()
                .enumerate()
                .map(|(rank, b)| s.spawn(move || NcclComm::new(b, &id, rank, world, timeout)))
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().unwrap_or_else(|_| Err(EngineError::Backend("NCCL init thread panicked".into()))))
                .collect()
        })
    }

    /// The time a call may wait for the other ranks.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `op` (which enqueues NCCL work on the stream) and waits for it with the deadline.
    fn run(&self, what: &str, op: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t) -> Result<()> {
        let _one_at_a_time = crate::sync::lock(&self.calls);
        if self.aborted.load(Ordering::SeqCst) {
            return Err(EngineError::Backend(format!(
                "NCCL: rank {} of {}: the communicator was aborted after an earlier failure",
                self.rank, self.world
            )));
        }
        self.stream.context().bind_to_thread().map_err(driver_err("bind the GPU for NCCL"))?;
        if let Err(e) = check(op(self.comm, self.stream.cu_stream() as sys::cudaStream_t), what) {
            self.abort();
            return Err(e);
        }
        let done = self.stream.record_event(None).map_err(driver_err("record an event after an NCCL call"))?;
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_micros(5);
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.abort();
                    return Err(driver_err("wait for an NCCL operation")(e));
                }
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: valid handle and out-pointer.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_err) };
            if let Err(e) = check(async_err, what) {
                self.abort();
                return Err(e);
            }
            if Instant::now() > deadline {
                self.abort();
                return Err(EngineError::Backend(format!(
                    "NCCL: {what} on rank {} of {} did not finish within {:?}; another rank is gone or stuck. The communicator is aborted",
                    self.rank, self.world, self.timeout
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_micros(200));
        }
    }

    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the handle is valid until Drop, which skips an aborted communicator.
            unsafe { sys::ncclCommAbort(self.comm) };
        }
    }

    /// The peer of a two-rank stage link.
    fn peer(&self) -> Result<i32> {
        if self.world != 2 {
            return Err(EngineError::Backend(format!(
                "a stage link is a communicator of 2 ranks (this stage's and the next one's); this one has {}",
                self.world
            )));
        }
        Ok(1 - self.rank as i32)
    }
}

impl Communicator<CudaTensor> for NcclComm {
    fn world_size(&self) -> usize {
        self.world
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce(&self, t: &mut CudaTensor) -> Result<()> {
        let count = t.rows * t.cols;
        let stream = self.stream.clone();
        let (ptr, dtype) = match &mut t.data {
            Data::F32(s) => (s.device_ptr_mut(&stream).0, sys::ncclDataType_t::ncclFloat32),
            Data::Bf16(s) => (s.device_ptr_mut(&stream).0, sys::ncclDataType_t::ncclBfloat16),
            // Sums of codes with different scales mean nothing: only GEMM outputs are reduced.
            Data::E4m3 { .. } => {
                return Err(EngineError::Backend("all-reduce of an e4m3 tensor (a GEMM input) is not defined".into()))
            }
        };
        self.run("all-reduce", |comm, st| {
            let p = ptr as *mut c_void;
            // SAFETY: in place over `count` elements of `t`, which outlives the wait in `run`.
            unsafe { sys::ncclAllReduce(p, p, count, dtype, sys::ncclRedOp_t::ncclSum, comm, st) }
        })
    }
}

impl StageLink<CudaTensor> for NcclComm {
    fn send(&self, t: &CudaTensor) -> Result<()> {
        let peer = self.peer()?;
        let src = t.f32("stage send")?;
        let count = t.rows * t.cols;
        let ptr = src.device_ptr(&self.stream).0;
        self.run("send", |comm, st| {
            // SAFETY: `count` f32 of `t`, which outlives the wait in `run`.
            unsafe { sys::ncclSend(ptr as *const c_void, count, sys::ncclDataType_t::ncclFloat32, peer, comm, st) }
        })
    }

    fn recv(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        let peer = self.peer()?;
        let count = rows * cols;
        // NCCL writes all `count` elements before the wait returns.
        let mut buf = alloc_on::<f32>(&self.stream, count)?;
        let ptr = buf.device_ptr_mut(&self.stream).0;
        self.run("receive", |comm, st| {
            // SAFETY: `count` f32 of `buf`, alive until the wait in `run` returns.
            unsafe { sys::ncclRecv(ptr as *mut c_void, count, sys::ncclDataType_t::ncclFloat32, peer, comm, st) }
        })?;
        Ok(CudaTensor { data: Data::F32(buf), rows, cols })
    }
}
