//! bf16 GEMMs through cuBLASLt: `y[t, n] = x[t, k] @ w[n, k]^T`, bf16 in and out, f32 compute.
//!
//! cudarc's safe `Matmul` builds descriptors and asks the heuristic on every call (tens of
//! microseconds, 80 times per forward of a 20-layer model); here each (t, n, k) gets its plan
//! (descriptors + chosen algorithm) once and keeps it while it is among the [`PLAN_CAPACITY`]
//! most recently used. A server sees a new token count with nearly every batch, so an unbounded
//! cache would grow for as long as the process lives; rounding the token count up to buckets
//! would bound it too, but would run GEMMs over padding rows, so the key stays exact.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of_val;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::driver_err;
use crate::error::{EngineError, Result};

pub(super) fn lt_err(what: &'static str) -> impl FnOnce(lt::CublasError) -> EngineError {
    move |e| EngineError::Backend(format!("cuBLASLt {what}: {e:?}"))
}

/// Descriptors and algorithm of one GEMM shape (bf16 here, FP8 in `cuda::fp8`).
pub(super) struct Plan {
    pub(super) desc: sys::cublasLtMatmulDesc_t,
    pub(super) a: sys::cublasLtMatrixLayout_t,
    pub(super) b: sys::cublasLtMatrixLayout_t,
    pub(super) c: sys::cublasLtMatrixLayout_t,
    pub(super) algo: sys::cublasLtMatmulAlgo_t,
}

impl Plan {
    /// A plan with nothing created yet; dropping it part-built releases what exists.
    pub(super) fn empty() -> Self {
        Plan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: a plain C struct of integers; overwritten by the heuristic's choice.
            algo: unsafe { std::mem::zeroed() },
        }
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by this plan (null when creation stopped before it) and used by nothing
        // else; errors at teardown are moot.
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// A cuBLASLt handle bound to one stream, its workspace, and the plans made so far.
pub(crate) struct Gemm {
    pub(super) handle: sys::cublasLtHandle_t,
    pub(super) workspace: CudaSlice<u8>,
    pub(super) stream: Arc<CudaStream>,
    plans: Mutex<Lru<(usize, usize, usize), Plan>>,
}

/// Plans kept per handle. A forward uses about four GEMM shapes per token count (QKV, output
/// projection, MLP up and down), so this keeps the plans of the last ~64 batch sizes; a plan is
/// a few hundred bytes of host memory, and a miss costs one heuristic query (tens of
/// microseconds), small next to the forward it belongs to.
pub(super) const PLAN_CAPACITY: usize = 256;

/// A map of at most `capacity` entries that drops the least recently used one to make room.
/// Eviction scans the entries (at most `capacity`), which only happens on a miss, where building
/// the new value costs far more.
pub(super) struct Lru<K, V> {
    capacity: usize,
    clock: u64,
    entries: HashMap<K, (V, u64)>,
}

impl<K: std::hash::Hash + Eq + Copy, V> Lru<K, V> {
    /// An empty map holding at most `capacity` entries (at least one).
    pub(super) fn new(capacity: usize) -> Self {
        Lru { capacity: capacity.max(1), clock: 0, entries: HashMap::new() }
    }

    /// The value of `key`, made by `make` on a miss, after evicting the least recently used
    /// entry when the map is full (so a failed `make` may have cost that entry: it is only a
    /// cache).
    pub(super) fn get_or_try_insert<E>(&mut self, key: K, make: impl FnOnce() -> Result<V, E>) -> Result<&mut V, E> {
        self.clock += 1;
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            let oldest = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k);
            if let Some(k) = oldest {
                // Dropping a plan whose GEMM may still run on the stream is fine: cuBLASLt reads
                // descriptors during the host-side call only (PyTorch destroys its descriptors
                // right after cublasLtMatmul returns, unsynchronized, on every call).
                self.entries.remove(&k);
            }
        }
        let slot = match self.entries.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert((make()?, 0)),
        };
        slot.1 = self.clock;
        Ok(&mut slot.0)
    }

    /// Entries held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether `key` is held (does not count as a use).
    #[cfg(test)]
    fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Drops every entry.
    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }
}

// SAFETY: the handle and descriptors are plain heap objects of cuBLASLt; cuBLASLt allows a handle
// to be used from several threads, and all work goes to one stream in call order. Plans are only
// reached through the mutex.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        crate::sync::lock(&self.plans).clear();
        // SAFETY: the handle is ours; no plan outlives it.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

impl Gemm {
    /// A handle with NVIDIA's recommended workspace (32 MiB on Hopper, 4 MiB before).
    pub(crate) fn new(stream: Arc<CudaStream>, compute_major: i32) -> Result<Self> {
        stream.context().bind_to_thread().map_err(driver_err("bind the GPU for cuBLASLt"))?;
        let handle = lt::create_handle().map_err(lt_err("create handle"))?;
        let size = if compute_major >= 9 { 32 << 20 } else { 4 << 20 };
        // SAFETY: the workspace is scratch memory; cuBLASLt never reads what it did not write.
        let workspace = match unsafe { stream.alloc::<u8>(size) } {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above.
                unsafe {
                    let _ = lt::destroy_handle(handle);
                }
                return Err(driver_err("allocate the cuBLASLt workspace")(e));
            }
        };
        Ok(Gemm { handle, workspace, stream, plans: Mutex::new(Lru::new(PLAN_CAPACITY)) })
    }

    fn plan(&self, t: usize, n: usize, k: usize) -> Result<Plan> {
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        // Filled step by step; dropping it part-built releases what exists.
        let mut plan = Plan::empty();
        plan.desc =
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(lt_err("create matmul descriptor"))?;
        // Column-major view of row-major data: y^T[n, t] = W[n, k] x^T[k, t], where W's bytes are
        // the column-major [k, n] matrix (so op(A) = A^T) and x's bytes are x^T[k, t].
        // cublasOperation_t (an int32 in the descriptor): CUBLAS_OP_T = 1.
        let trans: i32 = 1;
        // SAFETY: `trans` outlives the call, which copies it.
        unsafe {
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans as *const _ as *const c_void,
                size_of_val(&trans),
            )
        }
        .map_err(lt_err("set transpose"))?;
        plan.a = lt::create_matrix_layout(bf16, k as u64, n as u64, k as i64).map_err(lt_err("layout of w"))?;
        plan.b = lt::create_matrix_layout(bf16, k as u64, t as u64, k as i64).map_err(lt_err("layout of x"))?;
        plan.c = lt::create_matrix_layout(bf16, n as u64, t as u64, n as i64).map_err(lt_err("layout of y"))?;
        self.choose_algo(&mut plan).map_err(|e| {
            EngineError::Backend(format!("cuBLASLt has no bf16 algorithm for [{t}, {k}] x [{n}, {k}]^T: {e:?}"))
        })?;
        Ok(plan)
    }

    /// Asks the heuristic for the best algorithm of `plan` (whose descriptor and layouts are made,
    /// with C and D sharing a layout) within this handle's workspace, and keeps it in the plan.
    pub(super) fn choose_algo(&self, plan: &mut Plan) -> std::result::Result<(), lt::CublasError> {
        let pref = lt::create_matmul_pref()?;
        let ws = self.workspace.len();
        // SAFETY: `ws` outlives the call; the preference is destroyed right after use.
        let heuristic = unsafe {
            let r = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                size_of_val(&ws),
            )
            .and_then(|_| lt::get_matmul_algo_heuristic(self.handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref));
            let _ = lt::destroy_matmul_pref(pref);
            r
        }?;
        plan.algo = heuristic.algo;
        Ok(())
    }

    /// `y = x @ w^T` for row-major `x[t, k]`, `w[n, k]`, `y[t, n]` holding bf16 bits, enqueued on
    /// the handle's stream.
    pub(crate) fn matmul(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        y: &mut CudaSlice<u16>,
        t: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        if x.len() < t * k || w.len() < n * k || y.len() < t * n {
            return Err(EngineError::Backend(format!(
                "GEMM [{t}, {k}] x [{n}, {k}]^T with buffers of {}, {} and {} elements",
                x.len(),
                w.len(),
                y.len()
            )));
        }
        // cuBLASLt runs on the thread's current context (the runtime API's): make it this GPU's,
        // whichever thread calls.
        self.stream.context().bind_to_thread().map_err(driver_err("bind the GPU for cuBLASLt"))?;
        let mut plans = crate::sync::lock(&self.plans);
        let plan = plans.get_or_try_insert((t, n, k), || self.plan(t, n, k))?;
        let s = &self.stream;
        let (xp, _gx) = x.device_ptr(s);
        let (wp, _gw) = w.device_ptr(s);
        let (yp, _gy) = y.device_ptr_mut(s);
        // SAFETY: buffer sizes were checked against the plan's shape above.
        unsafe { self.run(plan, (wp, xp, yp), "matmul") }
    }

    /// The one `cublasLtMatmul` call: `y = W x` as `plan` lays them out (alpha 1, beta 0), with
    /// this handle's workspace on its stream.
    ///
    /// # Safety
    /// The device pointers must hold the buffers `plan`'s shape and types describe.
    pub(super) unsafe fn run(&self, plan: &Plan, (w, x, y): (u64, u64, u64), what: &'static str) -> Result<()> {
        let s = &self.stream;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (wsp, _gws) = self.workspace.device_ptr(s);
        // SAFETY: the caller's pointers match the plan; alpha/beta live on the stack for the
        // duration of the (host-side) call, which reads them before returning.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                plan.a,
                x as *const c_void,
                plan.b,
                y as *const c_void,
                plan.c,
                y as *mut c_void,
                plan.c,
                &plan.algo,
                wsp as *mut c_void,
                self.workspace.len(),
                s.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(lt_err(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_cache_never_holds_more_than_its_capacity() {
        let mut lru: Lru<(usize, usize, usize), usize> = Lru::new(PLAN_CAPACITY);
        let mut made = 0;
        // Every token count of a long-running server, four shapes each.
        for t in 1..=1000 {
            for (n, k) in [(3072, 2048), (2048, 2048), (8192, 2048), (2048, 8192)] {
                let v = *lru
                    .get_or_try_insert((t, n, k), || {
                        made += 1;
                        Ok::<_, ()>(t * n + k)
                    })
                    .unwrap();
                assert_eq!(v, t * n + k);
                assert!(lru.len() <= PLAN_CAPACITY, "{} plans after t = {t}", lru.len());
            }
        }
        assert_eq!(lru.len(), PLAN_CAPACITY);
        assert_eq!(made, 4000, "each new shape is planned once");
    }

    #[test]
    fn the_least_recently_used_entry_goes_and_hits_keep_theirs() {
        let mut lru: Lru<u32, u32> = Lru::new(3);
        let mut made = Vec::new();
        let mut get = |lru: &mut Lru<u32, u32>, k: u32| {
            *lru.get_or_try_insert(k, || {
                made.push(k);
                Ok::<_, ()>(k * 10)
            })
            .unwrap()
        };
        for k in [1, 2, 3] {
            get(&mut lru, k);
        }
        // 1 is used again, so 2 is now the oldest and makes room for 4.
        assert_eq!(get(&mut lru, 1), 10);
        assert_eq!(get(&mut lru, 4), 40);
        assert!(lru.contains(&1) && lru.contains(&3) && lru.contains(&4) && !lru.contains(&2));
        // 2 comes back (made again), evicting 3, the oldest now.
        assert_eq!(get(&mut lru, 2), 20);
        assert!(!lru.contains(&3));
        assert_eq!(lru.len(), 3);
        assert_eq!(made, vec![1, 2, 3, 4, 2]);
    }

    #[test]
    fn a_failed_plan_is_not_cached() {
        let mut lru: Lru<u32, u32> = Lru::new(2);
        assert_eq!(lru.get_or_try_insert(7, || Err("no algorithm")).err(), Some("no algorithm"));
        assert!(!lru.contains(&7));
        assert_eq!(lru.len(), 0);
        assert_eq!(*lru.get_or_try_insert(7, || Ok::<_, &str>(70)).unwrap(), 70);
        let mut called = false;
        assert_eq!(
            *lru.get_or_try_insert(7, || {
                called = true;
                Ok::<_, &str>(0)
            })
            .unwrap(),
            70
        );
        assert!(!called, "a hit does not plan again");
    }
}
