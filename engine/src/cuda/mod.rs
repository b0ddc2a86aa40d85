//! The CUDA backend: bf16 weights and activations with an f32 residual stream, GEMMs through
//! cuBLASLt (bf16 in and out, f32 compute), and the kernels of `kernels/*.cu` compiled by NVRTC
//! for the device's architecture when the backend starts (cached on disk by the kernels crate).
//!
//! Design notes and the reasons behind the dtypes are in docs/cuda.md. Everything runs on one
//! stream per backend in call order; host-visible results (`to_host`) synchronize it, which is
//! where an asynchronous kernel failure surfaces.

mod fp8;
mod gemm;
pub mod nccl;
pub mod placement;
pub mod probe;
mod tensor;
pub mod tiles;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arbiter_kernels::{Compiler, Module, ELEMENTWISE_THREADS as EW_THREADS, NORM_THREADS};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::backend::{
    check_parts, check_qk_norm, check_same_shape, stacked_bias, Activation, AttnLayout, Backend, HostTensor, MatrixPart,
};
use crate::batch::PackedBatch;
use crate::error::{EngineError, Result};
use crate::rope;
use crate::spec::NormKind;
use crate::weights::TensorView;
pub use fp8::{Fp8Path, Fp8Settings};
use gemm::Gemm;
use tensor::Data;
pub use tensor::{bf16_bits, bf16_value, ActDtype, CudaTensor};
use tiles::TileList;

/// Wraps a driver error with what was being done; the driver's out-of-memory becomes
/// [`EngineError::OutOfMemory`].
pub(crate) fn driver_err(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> EngineError {
    move |e| {
        let message = format!("CUDA: cannot {what}: {e}");
        if is_out_of_memory(&e) {
            EngineError::OutOfMemory(message)
        } else {
            EngineError::Backend(message)
        }
    }
}

fn is_out_of_memory(e: &cudarc::driver::DriverError) -> bool {
    e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY
}

/// The newest CUDA version the loaded driver supports, `(major, minor)`: (13, 0) for driver 580.
fn driver_cuda_version() -> Result<(i32, i32)> {
    let mut v = 0;
    // SAFETY: only called once the driver is loaded (the backend has a context); `v` is a valid
    // out-pointer.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(driver_err("read the driver's CUDA version"))?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// Why the driver may refuse NVRTC's PTX: each NVRTC writes the PTX ISA of its own CUDA
/// version, which a driver of an older CUDA version cannot JIT (driver 580, CUDA 13.0, rejects
/// the PTX of NVRTC 13.1). `None` when NVRTC is not newer than the driver.
fn ptx_version_hint(nvrtc: (i32, i32), driver: (i32, i32)) -> Option<String> {
    (nvrtc > driver).then(|| {
        format!(
            "NVRTC {}.{} is newer than the driver's CUDA {}.{}, whose JIT cannot read the PTX it writes: \
             use an NVRTC of CUDA {}.{} or older (e.g. the nvidia-cuda-nvrtc wheel of that version), or update the driver",
            nvrtc.0, nvrtc.1, driver.0, driver.1, driver.0, driver.1
        )
    })
}

/// Loads NVRTC's PTX for `what`; a refusal says whether the driver is older than NVRTC.
fn load_ptx(
    ctx: &Arc<CudaContext>,
    ptx: cudarc::nvrtc::Ptx,
    what: &str,
    compiler: &Compiler,
) -> Result<Arc<cudarc::driver::CudaModule>> {
    ctx.load_module(ptx).map_err(|e| {
        let hint = driver_cuda_version()
            .ok()
            .and_then(|driver| ptx_version_hint(compiler.nvrtc_version(), driver))
            .map(|h| format!(" ({h})"))
            .unwrap_or_default();
        EngineError::Backend(format!("CUDA: cannot load the compiled {what}: {e}{hint}"))
    })
}

/// A weight matrix `[n, k]` on the device, bf16 or FP8.
#[derive(Debug)]
pub struct CudaMatrix {
    weights: Weights,
    n: usize,
    k: usize,
    /// Added to every output row after the GEMM (`[n]`, f32).
    bias: Option<CudaSlice<f32>>,
}

/// The values of a weight matrix.
#[derive(Debug)]
enum Weights {
    /// bf16 bits, `[n, k]`.
    Bf16(CudaSlice<u16>),
    /// e4m3 codes with per-output-channel scales (cuda/fp8.rs).
    Fp8(fp8::Fp8Weights),
}

impl CudaMatrix {
    /// Whether the matrix is FP8 (its input is quantized per token).
    pub fn is_fp8(&self) -> bool {
        matches!(self.weights, Weights::Fp8(_))
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// Norm parameters in f32 on the device, LayerNorm1P's `+1` already folded into gamma.
#[derive(Debug)]
pub struct CudaNorm {
    gamma: CudaSlice<f32>,
    beta: Option<CudaSlice<f32>>,
    eps: f32,
    rms: bool,
}

/// The embedding table `[vocab, hidden]` in bf16 on the device.
#[derive(Debug)]
pub struct CudaEmbedding {
    table: CudaSlice<u16>,
    vocab: usize,
    hidden: usize,
    /// Multiplies each gathered row (Gemma 2's `sqrt(hidden)`).
    scale: f32,
}

/// Rotary cos/sin tables `[position][rotary_dim / 2]` on the device for one set of frequencies.
#[derive(Debug)]
struct RopeTables {
    inv_freq: Vec<f32>,
    positions: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
}

/// Per-forward data on the device: positions, offsets, the attention tile list, rotary tables.
#[derive(Debug)]
pub struct CudaBatch {
    tokens: usize,
    positions: CudaSlice<i32>,
    cu_seqlens: CudaSlice<i32>,
    /// Per segment, (first row, rows) of the shared prefix it continues; (0, 0) for none.
    seq_prefix: CudaSlice<i32>,
    tile_seq: CudaSlice<i32>,
    tile_start: CudaSlice<i32>,
    n_tiles: usize,
    rope: Arc<RopeTables>,
}

/// The entry points of the norm and element-wise modules.
struct Kernels {
    add_norm_bf16: CudaFunction,
    add_norm_f32: CudaFunction,
    add_residual: CudaFunction,
    embed: CudaFunction,
    gather_rows: CudaFunction,
    gather_rows_bf16: CudaFunction,
    relu2: CudaFunction,
    relu: CudaFunction,
    swiglu: CudaFunction,
    geglu: CudaFunction,
    add_bias: CudaFunction,
    to_bf16: CudaFunction,
    rope: CudaFunction,
    qk_norm: CudaFunction,
}

/// The attention kernel compiled for one head dimension.
struct Attention {
    func: CudaFunction,
    smem: u32,
}

/// The CUDA backend on one GPU.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    device_name: String,
    gemm: Gemm,
    kernels: Kernels,
    compiler: Compiler,
    attention: Mutex<HashMap<usize, Arc<Attention>>>,
    rope: Mutex<Option<Arc<RopeTables>>>,
    matmuls: AtomicUsize,
    /// FP8 kernels and GEMM plans, made when the first FP8 matrix loads (cuda/fp8.rs).
    fp8: Mutex<Option<Arc<fp8::Fp8State>>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend(cuda:{}, {}, {})", self.ctx.ordinal(), self.device_name, self.arch)
    }
}

/// Launch geometry `(grid, block, dynamic shared memory)`.
fn cfg(grid: (u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem }
}

/// A count as the kernels' `int`, refusing what does not fit.
fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| EngineError::Backend(format!("{what} = {v} exceeds the kernels' 32-bit indices")))
}

/// A grid dimension, refusing what does not fit.
fn grid(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| EngineError::Backend(format!("{what} = {v} blocks exceeds a CUDA grid")))
}

/// The null pointer passed for absent optional kernel arguments.
const NULL: u64 = 0;

/// The arguments every norm kernel starts with (kernels/norm.cu, kernels/fp8.cu): the residual
/// stream, the delta added to it first (or null), gamma, and beta (or null).
pub(crate) fn push_norm_inputs<'a>(
    b: &mut cudarc::driver::LaunchArgs<'a>,
    x: &'a CudaSlice<f32>,
    delta: Option<&'a CudaSlice<u16>>,
    p: &'a CudaNorm,
) {
    b.arg(x);
    match delta {
        Some(d) => b.arg(d),
        None => b.arg(&NULL),
    };
    b.arg(&p.gamma);
    match &p.beta {
        Some(beta) => b.arg(beta),
        None => b.arg(&NULL),
    };
}

impl CudaBackend {
    /// Starts the backend on GPU `ordinal`: checks the CUDA libraries are there, opens the
    /// device, and compiles the norm and element-wise kernels for its architecture.
    ///
    /// Every failure is an error naming what is missing (driver, library, device, compiler),
    /// never a panic: cudarc panics on missing libraries, so they are checked first, and any
    /// panic that still escapes it is turned into an error.
    pub fn new(ordinal: usize) -> Result<Self> {
        probe::check_backend_libraries()?;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::start(ordinal))) {
            Ok(r) => r,
            Err(panic) => {
                let msg = crate::sync::panic_message(&*panic);
                Err(EngineError::Backend(format!("the CUDA backend failed to start on cuda:{ordinal}: {msg}")))
            }
        }
    }

    fn start(ordinal: usize) -> Result<Self> {
        let count = CudaContext::device_count().map_err(driver_err("initialize the driver and count GPUs"))?;
        if ordinal >= count.max(0) as usize {
            return Err(EngineError::Backend(format!(
                "there is no GPU cuda:{ordinal}: the driver sees {count} (CUDA_VISIBLE_DEVICES={})",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("open the GPU"))?;
        // One stream, used in call order: cudarc's per-buffer event tracking only pays with
        // several streams, and it would record two events per kernel argument.
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_err("create a stream"))?;
        keep_freed_memory(&ctx)?;
        let (major, minor) = ctx.compute_capability().map_err(driver_err("read the compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let compiler = Compiler::discover()
            .map_err(|e| EngineError::Backend(format!("cannot find NVRTC and the CUDA headers: {e}")))?;
        let load = |m: &Module, defines: &[(&str, String)]| -> Result<Arc<cudarc::driver::CudaModule>> {
            let ptx = compiler
                .compile(m, &arch, defines)
                .map_err(|e| EngineError::Backend(format!("cannot compile the {} kernels for {arch}: {e}", m.name)))?;
            load_ptx(&ctx, ptx, &format!("{} kernels", m.name), &compiler)
        };
        let norm = load(&arbiter_kernels::NORM, &[])?;
        let ew = load(&arbiter_kernels::ELEMENTWISE, &[])?;
        let f = |m: &Arc<cudarc::driver::CudaModule>, name: &str| {
            m.load_function(name)
                .map_err(|e| EngineError::Backend(format!("CUDA: no kernel {name:?} in the module: {e}")))
        };
        let kernels = Kernels {
            add_norm_bf16: f(&norm, "add_norm_bf16")?,
            add_norm_f32: f(&norm, "add_norm_f32")?,
            add_residual: f(&norm, "add_residual")?,
            embed: f(&ew, "embed")?,
            gather_rows: f(&ew, "gather_rows")?,
            gather_rows_bf16: f(&ew, "gather_rows_bf16")?,
            relu2: f(&ew, "relu2")?,
            relu: f(&ew, "relu")?,
            swiglu: f(&ew, "swiglu")?,
            geglu: f(&ew, "geglu")?,
            add_bias: f(&ew, "add_bias")?,
            to_bf16: f(&ew, "to_bf16")?,
            rope: f(&ew, "rope")?,
            qk_norm: f(&norm, "qk_norm")?,
        };
        let gemm = Gemm::new(stream.clone(), major)?;
        Ok(CudaBackend {
            ctx,
            stream,
            arch,
            device_name,
            gemm,
            kernels,
            compiler,
            attention: Mutex::new(HashMap::new()),
            rope: Mutex::new(None),
            matmuls: AtomicUsize::new(0),
            fp8: Mutex::new(None),
        })
    }

    /// The GPU's name as the driver reports it ("NVIDIA H100 80GB HBM3").
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The architecture the kernels were compiled for ("sm_90").
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The newest CUDA version the driver supports, `(major, minor)`.
    pub fn driver_cuda_version(&self) -> Result<(i32, i32)> {
        driver_cuda_version()
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The stream all of this backend's work goes to (NCCL enqueues its collectives there too).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Matrix multiplications issued so far.
    pub fn matmul_count(&self) -> usize {
        self.matmuls.load(Ordering::Relaxed)
    }

    /// Waits for all work issued so far; reports any asynchronous kernel failure.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("finish the queued work"))
    }

    /// Compiles (or fetches from the cache) the attention kernel for `head_dim`, so that the first
    /// forward pass does not pay for it.
    pub fn prepare_attention(&self, head_dim: usize) -> Result<()> {
        self.attention_kernel(head_dim).map(|_| ())
    }

    fn attention_kernel(&self, head_dim: usize) -> Result<Arc<Attention>> {
        let mut cache = crate::sync::lock(&self.attention);
        if let Some(a) = cache.get(&head_dim) {
            return Ok(a.clone());
        }
        // ARB_HEAD_DIM, and ARB_EXPECT_SMEM which makes the kernel fail to compile if its
        // shared-memory layout and the size this launch reserves disagree.
        let defines = arbiter_kernels::attention_defines(head_dim)
            .map_err(|e| EngineError::Backend(format!("attention kernel: {e}")))?;
        let ptx = self.compiler.compile(&arbiter_kernels::ATTENTION, &self.arch, &defines).map_err(|e| {
            EngineError::Backend(format!(
                "cannot compile the attention kernel (head_dim {head_dim}, {}): {e}",
                self.arch
            ))
        })?;
        let module = load_ptx(&self.ctx, ptx, &format!("attention kernel (head_dim {head_dim})"), &self.compiler)?;
        let func = module
            .load_function("flash_attn_varlen")
            .map_err(|e| EngineError::Backend(format!("CUDA: no kernel \"flash_attn_varlen\" in the module: {e}")))?;
        let smem = arbiter_kernels::attention_smem_bytes(head_dim);
        let optin = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(driver_err("read the shared memory limit"))? as usize;
        if smem > optin {
            return Err(EngineError::Backend(format!(
                "the attention kernel for head_dim {head_dim} needs {smem} bytes of shared memory; {} allows {optin}",
                self.device_name
            )));
        }
        if smem > 48 * 1024 {
            func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .map_err(driver_err("allow the attention kernel its shared memory"))?;
        }
        let a = Arc::new(Attention { func, smem: smem as u32 });
        cache.insert(head_dim, a.clone());
        Ok(a)
    }

    /// `out[i, :] = src[rows[i], :]` for the `rows` indices in `idx` (checked by the caller),
    /// with the gather kernel for `T`.
    fn gather<T: DeviceRepr>(
        &self,
        kernel: &CudaFunction,
        src: &CudaSlice<T>,
        idx: &CudaSlice<i32>,
        rows: usize,
        cols: usize,
    ) -> Result<CudaSlice<T>> {
        let mut out = self.alloc::<T>(rows * cols)?;
        if rows > 0 {
            let (n, c) = (int(rows, "rows")?, int(cols, "columns")?);
            let mut b = self.stream.launch_builder(kernel);
            b.arg(src).arg(idx).arg(&mut out).arg(&n).arg(&c);
            // SAFETY: ABI of kernels/elementwise.cu's gather_rows and gather_rows_bf16 (the same
            // but for the element type, which `kernel` matches to T); indices checked.
            unsafe { b.launch(cfg((grid(rows, "rows")?, 1), EW_THREADS, 0)) }.map_err(driver_err("launch a gather"))?;
        }
        Ok(out)
    }

    /// Device memory for `len` elements that the next kernel overwrites entirely. An empty
    /// tensor still gets one element: zero-byte allocations are an error for the driver, and
    /// tensors carry their shape separately.
    fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        alloc_on(&self.stream, len)
    }

    fn to_device<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.alloc(1);
        }
        self.stream.clone_htod(data).map_err(driver_err("copy data to the GPU"))
    }

    fn tensor(&self, data: Data, rows: usize, cols: usize) -> CudaTensor {
        CudaTensor { data, rows, cols }
    }

    /// Makes a bf16 tensor from host f32 data, rounded to nearest even (kernel checks and tests).
    pub fn upload_bf16(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            return Err(EngineError::Backend(format!("{} values cannot be a {rows} x {cols} tensor", data.len())));
        }
        let bits: Vec<u16> = data.iter().map(|&v| bf16_bits(v)).collect();
        Ok(self.tensor(Data::Bf16(self.to_device(&bits)?), rows, cols))
    }

    /// Seconds per `y[t, n] = x[t, k] @ w[n, k]^T` in bf16 through the same cuBLASLt path as
    /// `matmul`: the median of `reps` timed runs after two warm-ups, on random data (zeros run
    /// faster than real data).
    pub fn time_gemm(&self, t: usize, n: usize, k: usize, reps: usize) -> Result<f64> {
        let mut rng = crate::synth::SplitMix::new((t * 31 + n * 17 + k) as u64);
        let mut random = |len: usize| -> Result<CudaSlice<u16>> {
            let v: Vec<u16> = (0..len).map(|_| bf16_bits(rng.uniform())).collect();
            self.to_device(&v)
        };
        let (x, w) = (random(t * k)?, random(n * k)?);
        let mut y = self.alloc::<u16>(t * n)?;
        for _ in 0..2 {
            self.gemm.matmul(&x, &w, &mut y, t, n, k)?;
        }
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let start = self.stream.record_event(timing).map_err(driver_err("record an event"))?;
            self.gemm.matmul(&x, &w, &mut y, t, n, k)?;
            let end = self.stream.record_event(timing).map_err(driver_err("record an event"))?;
            times.push(start.elapsed_ms(&end).map_err(driver_err("time a GEMM"))? as f64 / 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    fn rope_tables(&self, inv_freq: &[f32], positions: usize) -> Result<Arc<RopeTables>> {
        let mut cached = crate::sync::lock(&self.rope);
        if let Some(t) = cached.as_ref() {
            if t.inv_freq == inv_freq && t.positions >= positions {
                return Ok(t.clone());
            }
        }
        // Grow by powers of two: a table covers every shorter batch, and rows [p][i] do not
        // depend on the table's length, so results do not depend on which batch built it.
        let len = positions.next_power_of_two().max(256);
        let (cos, sin) = rope::cos_sin(inv_freq, len);
        let t = Arc::new(RopeTables {
            inv_freq: inv_freq.to_vec(),
            positions: len,
            cos: self.to_device(&cos)?,
            sin: self.to_device(&sin)?,
        });
        *cached = Some(t.clone());
        Ok(t)
    }

    fn add_norm_launch(
        &self,
        x: &CudaSlice<f32>,
        delta: Option<&CudaSlice<u16>>,
        p: &CudaNorm,
        out: Data,
        rows: usize,
        cols: usize,
    ) -> Result<CudaTensor> {
        let (r, h) = (int(rows, "rows")?, int(cols, "hidden")?);
        let rms = p.rms as i32;
        let func = match out {
            Data::Bf16(_) => &self.kernels.add_norm_bf16,
            Data::F32(_) => &self.kernels.add_norm_f32,
            Data::E4m3 { .. } => {
                return Err(EngineError::Backend("an e4m3 norm output goes through add_norm_fp8".into()));
            }
        };
        let mut out = out;
        let mut b = self.stream.launch_builder(func);
        push_norm_inputs(&mut b, x, delta, p);
        match &mut out {
            Data::Bf16(o) => b.arg(o),
            Data::F32(o) => b.arg(o),
            Data::E4m3 { codes, .. } => b.arg(codes),
        };
        b.arg(&r).arg(&h).arg(&p.eps).arg(&rms);
        if rows > 0 {
            // SAFETY: argument list and launch geometry follow kernels/norm.cu's ABI; buffers hold
            // rows * hidden elements (checked by the callers).
            unsafe { b.launch(cfg((grid(rows, "rows")?, 1), NORM_THREADS, 0)) }
                .map_err(driver_err("launch add_norm"))?;
        }
        Ok(self.tensor(out, rows, cols))
    }

    /// `x` (f32, `n` values) rounded to bf16 in a new buffer.
    fn round_to_bf16(&self, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<u16>> {
        let mut out = self.alloc::<u16>(n)?;
        if n > 0 {
            let len = n as i64;
            let mut b = self.stream.launch_builder(&self.kernels.to_bf16);
            b.arg(x).arg(&mut out).arg(&len);
            // SAFETY: ABI of kernels/elementwise.cu `to_bf16`; both buffers hold n elements.
            unsafe { b.launch(cfg((grid(n.div_ceil(EW_THREADS as usize), "elements / 256")?, 1), EW_THREADS, 0)) }
                .map_err(driver_err("launch to_bf16"))?;
        }
        Ok(out)
    }

    /// `y[r, c] += bias[c]` over `rows x cols` bf16 values (`add_bias`).
    fn add_bias(&self, y: &mut CudaSlice<u16>, bias: &CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
        let (r, c) = (int(rows, "rows")?, int(cols, "columns")?);
        let mut b = self.stream.launch_builder(&self.kernels.add_bias);
        b.arg(y).arg(bias).arg(&r).arg(&c);
        let g = (grid(rows, "rows")?, grid(cols.div_ceil(EW_THREADS as usize), "columns / 256")?);
        // SAFETY: ABI of kernels/elementwise.cu `add_bias`; y is rows x cols, bias cols.
        unsafe { b.launch(cfg(g, EW_THREADS, 0)) }.map_err(driver_err("launch add_bias")).map(|_| ())
    }

    fn check_norm_width(x: &CudaTensor, p: &CudaNorm) -> Result<()> {
        if p.gamma.len() != x.cols {
            return Err(EngineError::Backend(format!(
                "norm of width {} applied to a tensor with {} columns",
                p.gamma.len(),
                x.cols
            )));
        }
        Ok(())
    }
}

/// `len` (at least one) uninitialized elements on `stream`; out of memory names the size and
/// what is free.
pub(crate) fn alloc_on<T: DeviceRepr>(stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller hands the buffer to a kernel or copy that writes all of its logical
    // elements before anything reads them.
    unsafe { stream.alloc::<T>(len.max(1)) }.map_err(|e| {
        let free = stream.context().mem_get_info().map(|(free, _)| free >> 20).unwrap_or(0);
        let message =
            format!("CUDA: cannot allocate {} MiB ({e}; {free} MiB free)", (len * std::mem::size_of::<T>()) >> 20);
        if is_out_of_memory(&e) {
            EngineError::OutOfMemory(message)
        } else {
            EngineError::Backend(message)
        }
    })
}

/// Keeps freed memory in the device's pool instead of returning it to the driver at every
/// synchronization: each forward allocates the same activations again, and re-mapping them costs
/// more than the kernels of a small batch.
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on this context's device; `threshold` outlives the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(driver_err("get the memory pool"))?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(driver_err("configure the memory pool"))
    }
}

fn same_shape(a: &CudaTensor, b: &CudaTensor, what: &str) -> Result<()> {
    check_same_shape(what, (a.rows, a.cols), (b.rows, b.cols))
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Matrix = CudaMatrix;
    type Norm = CudaNorm;
    type Embedding = CudaEmbedding;
    type BatchCtx = CudaBatch;

    fn name(&self) -> String {
        format!("cuda:{}", self.ctx.ordinal())
    }

    /// kernels/attention.cu reads one prefix per segment: trees of two levels (prompt, then
    /// branches); deeper ones are computed unshared.
    fn shares_prefixes(&self, batch: &PackedBatch) -> bool {
        (0..batch.segments()).all(|s| batch.parent(s).is_none_or(|p| batch.parent(p).is_none()))
    }

    fn matrix(&self, parts: &[MatrixPart<'_>]) -> Result<CudaMatrix> {
        let k = check_parts(parts)?;
        if parts[0].is_fp8() {
            return self.fp8_matrix(parts);
        }
        let n: usize = parts.iter().map(|p| p.rows.len()).sum();
        let mut bits = Vec::with_capacity(n * k);
        for p in parts {
            p.view.block_to_bf16_bits(p.rows.clone(), p.cols.clone(), &mut bits);
        }
        let bias = stacked_bias(parts).map(|b| self.to_device(&b)).transpose()?;
        Ok(CudaMatrix { weights: Weights::Bf16(self.to_device(&bits)?), n, k, bias })
    }

    fn norm_params(
        &self,
        kind: NormKind,
        eps: f32,
        weight: TensorView<'_>,
        bias: Option<TensorView<'_>>,
    ) -> Result<CudaNorm> {
        let mut gamma = weight.to_f32();
        // The same f32 addition as the CPU backend (and transformers) make.
        if kind.adds_one() {
            gamma.iter_mut().for_each(|g| *g += 1.0);
        }
        let beta = match bias {
            Some(b) => Some(self.to_device(&b.to_f32())?),
            None => None,
        };
        Ok(CudaNorm { gamma: self.to_device(&gamma)?, beta, eps, rms: kind.is_rms() })
    }

    fn embedding(&self, table: TensorView<'_>, scale: f32) -> Result<CudaEmbedding> {
        let (vocab, hidden) = (table.shape[0], table.row_len());
        let mut bits = Vec::with_capacity(vocab * hidden);
        table.block_to_bf16_bits(0..vocab, 0..hidden, &mut bits);
        Ok(CudaEmbedding { table: self.to_device(&bits)?, vocab, hidden, scale })
    }

    fn batch_ctx(&self, batch: &PackedBatch, inv_freq: &[f32]) -> Result<CudaBatch> {
        let tokens = batch.tokens().len();
        int(tokens, "tokens in a batch")?;
        let positions: Vec<i32> = batch.positions().into_iter().map(|p| p as i32).collect();
        let cu: Vec<i32> = batch.cu_seqlens().iter().map(|&c| c as i32).collect();
        let tiles = TileList::new(batch.cu_seqlens(), arbiter_kernels::ATTN_BLOCK_M);
        let mut prefix = Vec::with_capacity(2 * batch.segments());
        for s in 0..batch.segments() {
            let rows = match batch.ancestor_rows(s)[..] {
                [] => 0..0,
                [ref p] => p.clone(),
                _ => return Err(EngineError::Backend(format!("segment {s} continues more than one shared prefix"))),
            };
            prefix.extend([rows.start as i32, rows.len() as i32]);
        }
        Ok(CudaBatch {
            tokens,
            positions: self.to_device(&positions)?,
            cu_seqlens: self.to_device(&cu)?,
            seq_prefix: self.to_device(&prefix)?,
            tile_seq: self.to_device(&tiles.seq)?,
            tile_start: self.to_device(&tiles.start)?,
            n_tiles: tiles.len(),
            rope: self.rope_tables(inv_freq, batch.max_len())?,
        })
    }

    fn embed(&self, table: &CudaEmbedding, tokens: &[u32]) -> Result<CudaTensor> {
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= table.vocab) {
            return Err(EngineError::InvalidBatch(format!(
                "token id {t} is outside the vocabulary of {}",
                table.vocab
            )));
        }
        let ids = self.to_device(tokens)?;
        let mut x = self.alloc::<f32>(tokens.len() * table.hidden)?;
        let (n, h) = (int(tokens.len(), "tokens")?, int(table.hidden, "hidden")?);
        if n > 0 {
            let mut b = self.stream.launch_builder(&self.kernels.embed);
            b.arg(&table.table).arg(&ids).arg(&mut x).arg(&n).arg(&h).arg(&table.scale);
            // SAFETY: ABI of kernels/elementwise.cu `embed`; ids were checked against the vocabulary.
            unsafe { b.launch(cfg((grid(tokens.len(), "tokens")?, 1), EW_THREADS, 0)) }
                .map_err(driver_err("launch embed"))?;
        }
        Ok(self.tensor(Data::F32(x), tokens.len(), table.hidden))
    }

    fn norm(&self, x: &CudaTensor, p: &CudaNorm) -> Result<CudaTensor> {
        Self::check_norm_width(x, p)?;
        let out = Data::Bf16(self.alloc(x.rows * x.cols)?);
        self.add_norm_launch(x.f32("norm")?, None, p, out, x.rows, x.cols)
    }

    fn final_norm(&self, x: &CudaTensor, p: &CudaNorm) -> Result<CudaTensor> {
        Self::check_norm_width(x, p)?;
        let out = Data::F32(self.alloc(x.rows * x.cols)?);
        self.add_norm_launch(x.f32("final norm")?, None, p, out, x.rows, x.cols)
    }

    fn add_norm(&self, x: &mut CudaTensor, delta: &CudaTensor, p: &CudaNorm) -> Result<CudaTensor> {
        same_shape(x, delta, "residual add")?;
        Self::check_norm_width(x, p)?;
        let out = Data::Bf16(self.alloc(x.rows * x.cols)?);
        let (rows, cols) = (x.rows, x.cols);
        // The kernel writes x += delta in place through the same pointer.
        self.add_norm_launch(x.f32_mut("residual add")?, Some(delta.bf16("residual add")?), p, out, rows, cols)
    }

    fn branch_norm(&self, x: &CudaTensor, p: &CudaNorm) -> Result<CudaTensor> {
        // Widen the bf16 branch into a zeroed f32 buffer (0 + v is exact), then the usual norm.
        let n = x.rows * x.cols;
        let zeros = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(driver_err("allocate a branch buffer"))?;
        let mut wide = self.tensor(Data::F32(zeros), x.rows, x.cols);
        self.add(&mut wide, x)?;
        self.norm(&wide, p)
    }

    fn add(&self, x: &mut CudaTensor, delta: &CudaTensor) -> Result<()> {
        same_shape(x, delta, "residual add")?;
        let n = x.rows * x.cols;
        let len = n as i64;
        let d = delta.bf16("residual add")?;
        let xs = x.f32_mut("residual add")?;
        if n > 0 {
            let mut b = self.stream.launch_builder(&self.kernels.add_residual);
            b.arg(xs).arg(d).arg(&len);
            // SAFETY: ABI of kernels/norm.cu `add_residual`; both buffers hold n elements.
            unsafe { b.launch(cfg((grid(n.div_ceil(EW_THREADS as usize), "elements / 256")?, 1), EW_THREADS, 0)) }
                .map_err(driver_err("launch add_residual"))?;
        }
        Ok(())
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaMatrix) -> Result<CudaTensor> {
        if x.cols != w.k {
            return Err(EngineError::Backend(format!("matmul: input has {} columns, matrix takes {}", x.cols, w.k)));
        }
        self.matmuls.fetch_add(1, Ordering::Relaxed);
        let data = match &w.weights {
            Weights::Fp8(fp8) => return self.matmul_fp8(x, fp8, (w.n, w.k), w.bias.as_ref()),
            Weights::Bf16(d) => d,
        };
        let mut y = self.alloc::<u16>(x.rows * w.n)?;
        if x.rows > 0 {
            // f32 input (the final norm's, into a reward head's hidden layer) is rounded to bf16
            // first, as every other GEMM input is; e4m3 input (made for an FP8 matrix) is widened.
            let converted = match &x.data {
                Data::F32(f) => Some(self.round_to_bf16(f, x.rows * x.cols)?),
                Data::E4m3 { .. } => Some(self.dequantize(x)?),
                Data::Bf16(_) => None,
            };
            let input = match &converted {
                Some(r) => r,
                None => x.bf16("matmul")?,
            };
            self.gemm.matmul(input, data, &mut y, x.rows, w.n, w.k)?;
            if let Some(bias) = &w.bias {
                self.add_bias(&mut y, bias, x.rows, w.n)?;
            }
        }
        Ok(self.tensor(Data::Bf16(y), x.rows, w.n))
    }

    fn norm_for(&self, x: &CudaTensor, p: &CudaNorm, next: &CudaMatrix) -> Result<CudaTensor> {
        if !next.is_fp8() {
            return self.norm(x, p);
        }
        Self::check_norm_width(x, p)?;
        self.add_norm_fp8(x.f32("norm")?, None, p, x.rows, x.cols)
    }

    fn add_norm_for(
        &self,
        x: &mut CudaTensor,
        delta: &CudaTensor,
        p: &CudaNorm,
        next: &CudaMatrix,
    ) -> Result<CudaTensor> {
        if !next.is_fp8() {
            return self.add_norm(x, delta, p);
        }
        same_shape(x, delta, "residual add")?;
        Self::check_norm_width(x, p)?;
        let (rows, cols) = (x.rows, x.cols);
        // The kernel writes x += delta in place through the same pointer.
        self.add_norm_fp8(x.f32_mut("residual add")?, Some(delta.bf16("residual add")?), p, rows, cols)
    }

    fn activation_for(&self, x: &CudaTensor, kind: Activation, next: &CudaMatrix) -> Result<CudaTensor> {
        if next.is_fp8() {
            self.activation_fp8(x, kind)
        } else {
            self.activation(x, kind)
        }
    }

    fn rope(&self, qkv: &mut CudaTensor, layout: &AttnLayout, ctx: &CudaBatch) -> Result<()> {
        let half = layout.rotary_dim / 2;
        if half == 0 || qkv.rows == 0 {
            return Ok(());
        }
        if qkv.cols != layout.qkv_width() || qkv.rows != ctx.tokens || ctx.rope.inv_freq.len() != half {
            return Err(EngineError::Backend(format!(
                "rope: a [{}, {}] tensor for {} tokens of width {} with {} rotary frequencies (rotary_dim {})",
                qkv.rows,
                qkv.cols,
                ctx.tokens,
                layout.qkv_width(),
                ctx.rope.inv_freq.len(),
                layout.rotary_dim
            )));
        }
        let rot_heads = layout.heads + layout.kv_heads;
        let args = [
            int(qkv.rows, "tokens")?,
            int(qkv.cols, "qkv width")?,
            int(rot_heads, "rotated heads")?,
            int(layout.head_dim, "head_dim")?,
            int(layout.rotary_dim, "rotary_dim")?,
        ];
        let rows = qkv.rows;
        let data = qkv.bf16_mut("rope")?;
        let mut b = self.stream.launch_builder(&self.kernels.rope);
        b.arg(data).arg(&ctx.positions).arg(&ctx.rope.cos).arg(&ctx.rope.sin);
        for a in &args {
            b.arg(a);
        }
        // SAFETY: ABI of kernels/elementwise.cu `rope`; positions are below the table's length
        // (batch_ctx sized it for the longest sequence).
        unsafe {
            b.launch(cfg(
                (grid(rows, "tokens")?, grid(rot_heads, "heads")?),
                arbiter_kernels::rope_threads(layout.rotary_dim),
                0,
            ))
        }
        .map_err(driver_err("launch rope"))?;
        Ok(())
    }

    fn attention(&self, qkv: &CudaTensor, layout: &AttnLayout, ctx: &CudaBatch) -> Result<CudaTensor> {
        if layout.kv_heads == 0 || !layout.heads.is_multiple_of(layout.kv_heads) {
            return Err(EngineError::Backend(format!(
                "attention: {} query heads cannot share {} KV heads evenly",
                layout.heads, layout.kv_heads
            )));
        }
        if qkv.cols != layout.qkv_width() || qkv.rows != ctx.tokens {
            return Err(EngineError::Backend(format!(
                "attention: a [{}, {}] tensor for {} tokens of width {}",
                qkv.rows,
                qkv.cols,
                ctx.tokens,
                layout.qkv_width()
            )));
        }
        let kernel = self.attention_kernel(layout.head_dim)?;
        let width = layout.heads * layout.head_dim;
        let mut out = self.alloc::<u16>(qkv.rows * width)?;
        if ctx.n_tiles > 0 {
            let ints = [
                int(ctx.n_tiles, "attention tiles")?,
                int(layout.heads, "heads")?,
                int(layout.kv_heads, "kv heads")?,
                int(qkv.cols, "qkv width")?,
            ];
            let mut b = self.stream.launch_builder(&kernel.func);
            b.arg(qkv.bf16("attention")?)
                .arg(&mut out)
                .arg(&ctx.cu_seqlens)
                .arg(&ctx.seq_prefix)
                .arg(&ctx.tile_seq)
                .arg(&ctx.tile_start);
            for a in &ints {
                b.arg(a);
            }
            // 0 means none in the kernel's ABI.
            let softcap = layout.softcap.unwrap_or(0.0);
            let window = int(layout.window.unwrap_or(0), "sliding window")?;
            b.arg(&layout.scale).arg(&softcap).arg(&window);
            let threads = arbiter_kernels::ATTN_THREADS;
            // SAFETY: ABI of kernels/attention.cu; tiles were built from the same cu_seqlens.
            unsafe { b.launch(cfg((grid(ctx.n_tiles, "tiles")?, grid(layout.heads, "heads")?), threads, kernel.smem)) }
                .map_err(driver_err("launch flash_attn_varlen"))?;
        }
        Ok(self.tensor(Data::Bf16(out), qkv.rows, width))
    }

    fn qk_norm(&self, qkv: &mut CudaTensor, layout: &AttnLayout, q: &CudaNorm, k: &CudaNorm) -> Result<()> {
        check_qk_norm(qkv.cols, layout, q.gamma.len(), k.gamma.len())?;
        if qkv.rows == 0 {
            return Ok(());
        }
        let args = [
            int(qkv.rows, "tokens")?,
            int(qkv.cols, "qkv width")?,
            int(layout.heads, "query heads")?,
            int(layout.kv_heads, "key heads")?,
            int(layout.head_dim, "head_dim")?,
        ];
        let g = (grid(qkv.rows, "tokens")?, grid(layout.heads + layout.kv_heads, "heads")?);
        let data = qkv.bf16_mut("qk_norm")?;
        let mut b = self.stream.launch_builder(&self.kernels.qk_norm);
        b.arg(data).arg(&q.gamma).arg(&k.gamma);
        for a in &args {
            b.arg(a);
        }
        b.arg(&q.eps);
        // SAFETY: ABI of kernels/norm.cu `qk_norm` (one warp per token and head); shapes checked above.
        unsafe { b.launch(cfg(g, 32, 0)) }.map_err(driver_err("launch qk_norm"))?;
        Ok(())
    }

    fn activation(&self, x: &CudaTensor, kind: Activation) -> Result<CudaTensor> {
        let input = x.bf16("activation")?;
        match kind {
            Activation::Relu2 | Activation::Relu => {
                let n = x.rows * x.cols;
                let mut out = self.alloc::<u16>(n)?;
                if n > 0 {
                    let len = n as i64;
                    let func = if kind == Activation::Relu { &self.kernels.relu } else { &self.kernels.relu2 };
                    let mut b = self.stream.launch_builder(func);
                    b.arg(input).arg(&mut out).arg(&len);
                    // SAFETY: ABI of kernels/elementwise.cu `relu2` / `relu`; both buffers hold n elements.
                    unsafe {
                        b.launch(cfg((grid(n.div_ceil(EW_THREADS as usize), "elements / 256")?, 1), EW_THREADS, 0))
                    }
                    .map_err(driver_err("launch relu"))?;
                }
                Ok(self.tensor(Data::Bf16(out), x.rows, x.cols))
            }
            Activation::SwiGlu | Activation::GeGlu => {
                if !x.cols.is_multiple_of(2) {
                    return Err(EngineError::Backend(format!("{kind:?} needs an even width, got {}", x.cols)));
                }
                let ffn = x.cols / 2;
                let mut out = self.alloc::<u16>(x.rows * ffn)?;
                if x.rows > 0 && ffn > 0 {
                    let (r, f) = (int(x.rows, "rows")?, int(ffn, "ffn")?);
                    let func = if kind == Activation::GeGlu { &self.kernels.geglu } else { &self.kernels.swiglu };
                    let mut b = self.stream.launch_builder(func);
                    b.arg(input).arg(&mut out).arg(&r).arg(&f);
                    let g = (grid(x.rows, "rows")?, grid(ffn.div_ceil(EW_THREADS as usize), "ffn / 256")?);
                    // SAFETY: ABI of kernels/elementwise.cu `swiglu` / `geglu` (the same).
                    unsafe { b.launch(cfg(g, EW_THREADS, 0)) }.map_err(driver_err("launch swiglu"))?;
                }
                Ok(self.tensor(Data::Bf16(out), x.rows, ffn))
            }
        }
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        if let Some(&r) = rows.iter().find(|&&r| r >= x.rows) {
            return Err(EngineError::Backend(format!("gather: row {r} of a tensor with {} rows", x.rows)));
        }
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let idx = self.to_device(&idx)?;
        // The residual stream is f32; the last block's attention output, gathered before its
        // output projection, is bf16.
        let data = match &x.data {
            Data::F32(src) => Data::F32(self.gather(&self.kernels.gather_rows, src, &idx, rows.len(), x.cols)?),
            Data::Bf16(src) => {
                Data::Bf16(self.gather(&self.kernels.gather_rows_bf16, src, &idx, rows.len(), x.cols)?)
            }
            Data::E4m3 { .. } => return Err(EngineError::Backend("gather: e4m3 tensors are not gathered".into())),
        };
        Ok(self.tensor(data, rows.len(), x.cols))
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        x.read_host()
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            return Err(EngineError::Backend(format!("{} values cannot be a {rows} x {cols} tensor", data.len())));
        }
        Ok(self.tensor(Data::F32(self.to_device(data)?), rows, cols))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_32_bits_are_errors() {
        assert_eq!(int(5, "x").unwrap(), 5);
        assert!(int(1 << 31, "tokens").unwrap_err().to_string().contains("tokens = 2147483648"));
        assert!(grid(1 << 32, "rows").is_err());
    }

    #[test]
    fn a_driver_older_than_nvrtc_is_named_as_the_reason() {
        assert_eq!(ptx_version_hint((13, 0), (13, 0)), None);
        assert_eq!(ptx_version_hint((12, 8), (13, 0)), None);
        let hint = ptx_version_hint((13, 1), (13, 0)).unwrap();
        assert!(hint.contains("NVRTC 13.1 is newer than the driver's CUDA 13.0"), "{hint}");
        assert!(ptx_version_hint((14, 0), (13, 2)).unwrap().contains("CUDA 13.2 or older"));
    }

    #[test]
    fn without_a_driver_the_backend_is_an_error_not_a_panic() {
        let r = CudaBackend::new(0);
        if !probe::CudaLibrary::Driver.is_present() {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("libcuda") && e.contains("--device cpu"), "{e}");
        }
    }
}
