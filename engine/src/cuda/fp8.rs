//! FP8 (e4m3) linear layers on the CUDA backend: e4m3 weights with per-output-channel scales
//! times e4m3 activations with per-token scales, f32 accumulation, bf16 output, which is what
//! engine/src/fp8.rs (the CPU reference) computes up to the order of the f32 sums.
//!
//! Two ways to apply the scales, chosen by the device ([`Fp8Path::for_sm`]):
//!
//! - sm_90 and newer: cuBLASLt's outer-vector scaling (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F`
//!   on A and B, cuBLAS 12.9+): the GEMM multiplies row `n` of the weights by `s_w[n]` and token
//!   `t` by `s_x[t]` in its epilogue and writes bf16, one pass, one rounding;
//! - sm_89 (Ada), where cuBLASLt scales FP8 operands only tensor-wide: the GEMM runs with unit
//!   scales into an f32 buffer and `scale_rows_cols` (kernels/fp8.cu) applies `s_x[t] * s_w[n]`
//!   (and the bias) and rounds to bf16 once. It costs a `[t, n]` f32 round trip through memory.
//!
//! Below sm_89 there are neither e4m3 conversions nor FP8 tensor cores: an FP8 folder is refused
//! when it loads, naming the GPU. Layout as for bf16 (cuda/gemm.rs): row-major `y = x W^T` is the
//! column-major `y^T = W x^T` with `TRANSA = T`, the "TN" layout FP8 GEMMs require.
//!
//! Activations reach the GEMM already quantized where a kernel produces them (the norm before
//! q/k/v and up, the MLP activation before down: `add_norm_fp8`, `act_fp8`); the attention output
//! before o goes through the standalone `quantize_rows`.
//!
//! Accumulation: cuBLASLt's FP8 "fast accumulation" (`CUBLASLT_MATMUL_DESC_FAST_ACCUM = 1`) lets
//! the tensor cores keep partial sums in their reduced internal precision for the whole K loop
//! instead of promoting them to full f32 at intervals; it is faster and less accurate, and with
//! K = 18432 (the 340B model's hidden size) and K = 9216 (its per-rank FFN) the sums are long. The
//! default is slow (exact f32) accumulation, for accuracy: arbiter's FP8 error budget is already
//! spent on the rounding of weights and activations (docs/fp8.md). `gpu_check --sections fp8`
//! measures both; the numbers are owed to a GPU (docs/gpu-owed.md, item 15).

use std::ffi::c_void;
use std::mem::size_of_val;
use std::sync::{Arc, Mutex};

use arbiter_kernels::{Fp8Act, FP8_THREADS, NORM_THREADS};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::gemm::{lt_err, Gemm, Lru, Plan, PLAN_CAPACITY};
use super::tensor::Data;
use super::{
    cfg, driver_err, grid, int, load_ptx, push_norm_inputs, CudaBackend, CudaMatrix, CudaNorm, CudaTensor, Weights,
    NULL,
};
use crate::backend::{check_parts, stacked_bias, Activation, MatrixPart};
use crate::error::{EngineError, Result};

/// How an FP8 GEMM applies the per-token and per-channel scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp8Path {
    /// cuBLASLt's outer-vector scale modes, bf16 output straight from the GEMM (sm_90+).
    OuterVector,
    /// Unit (tensor-wide) scales into f32, then the `scale_rows_cols` kernel (sm_89 and newer).
    TensorWide,
}

impl Fp8Path {
    /// The path for a GPU of compute capability `sm` (`major * 10 + minor`): outer vectors from
    /// Hopper on, tensor-wide scales on Ada, none before Ada (no e4m3 tensor cores).
    pub fn for_sm(sm: u32) -> Option<Self> {
        match sm {
            90.. => Some(Fp8Path::OuterVector),
            89 => Some(Fp8Path::TensorWide),
            _ => None,
        }
    }
}

/// The FP8 GEMM settings of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fp8Settings {
    /// Where the scales are applied.
    pub path: Fp8Path,
    /// cuBLASLt's `CUBLASLT_MATMUL_DESC_FAST_ACCUM`; off by default (see the module's notes).
    pub fast_accum: bool,
}

/// An FP8 weight matrix on the device: `[n, k]` e4m3 codes and `[n]` f32 scales.
#[derive(Debug)]
pub struct Fp8Weights {
    codes: CudaSlice<u8>,
    scales: CudaSlice<f32>,
}

/// The entry points of kernels/fp8.cu.
struct Fp8Kernels {
    quantize_rows: CudaFunction,
    add_norm_fp8: CudaFunction,
    act_fp8: CudaFunction,
    dequantize_rows: CudaFunction,
    scale_rows_cols: CudaFunction,
}

/// Plan key: shape `(t, n, k)` and settings.
type PlanKey = (usize, usize, usize, Fp8Settings);

/// The FP8 kernels, plans and settings of one backend, made when the first FP8 matrix loads.
pub(super) struct Fp8State {
    kernels: Fp8Kernels,
    plans: Mutex<Lru<PlanKey, Plan>>,
    settings: Mutex<Fp8Settings>,
}

// SAFETY: as for `Gemm`: plans are plain cuBLASLt heap objects reached only through the mutex,
// and the functions are cudarc's (Send + Sync) handles.
unsafe impl Send for Fp8State {}
unsafe impl Sync for Fp8State {}

/// The output of an FP8 GEMM: bf16 (outer-vector path) or f32 (tensor-wide path).
enum GemmOut<'a> {
    Bf16(&'a mut CudaSlice<u16>),
    F32(&'a mut CudaSlice<f32>),
}

/// cuBLASLt's FP8 kernels read operand rows 16 bytes at a time: a `k` that is not a multiple of
/// 16 has no algorithm. Checked at load so the error names the tensor rather than a GEMM shape.
const K_MULTIPLE: usize = 16;

/// Points the outer-vector scales of `plan` at `(weights, tokens)`: A is the weights (outer
/// dimension n, one scale per output channel), B the tokens (outer dimension t, one per token).
/// cuBLASLt copies the pointer values; the buffers must live until the matmul has run.
fn set_scale_pointers(plan: &Plan, (w_scales, x_scales): (u64, u64)) -> Result<()> {
    use sys::cublasLtMatmulDescAttributes_t as A;
    // SAFETY: the pointer values outlive the calls, which copy them.
    unsafe {
        lt::set_matmul_desc_attribute(
            plan.desc,
            A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
            &w_scales as *const u64 as *const c_void,
            size_of_val(&w_scales),
        )
        .and_then(|_| {
            lt::set_matmul_desc_attribute(
                plan.desc,
                A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                &x_scales as *const u64 as *const c_void,
                size_of_val(&x_scales),
            )
        })
    }
    .map_err(lt_err("set the FP8 scale pointers"))
}

/// Why an FP8 folder cannot run on `device` (`arch` below sm_89), and what to do instead.
fn unsupported_gpu(device: &str, arch: &str) -> EngineError {
    EngineError::Backend(format!(
        "FP8 (e4m3) weights need a GPU of compute capability 8.9 or newer (Ada, Hopper): {device} is {arch}; \
         serve this folder with --device cpu, or serve the unquantized folder on this GPU"
    ))
}

fn act_kind(kind: Activation) -> Fp8Act {
    match kind {
        Activation::Relu2 => Fp8Act::Relu2,
        Activation::Relu => Fp8Act::Relu,
        Activation::SwiGlu => Fp8Act::SwiGlu,
        Activation::GeGlu => Fp8Act::GeGlu,
    }
}

impl CudaBackend {
    /// The FP8 path this GPU takes by default, or `None` below sm_89.
    pub fn fp8_path(&self) -> Option<Fp8Path> {
        arbiter_kernels::sm_number(&self.arch).and_then(Fp8Path::for_sm)
    }

    /// The FP8 GEMM settings in force (the device's default path, slow accumulation, until
    /// changed with [`CudaBackend::set_fp8_settings`]).
    pub fn fp8_settings(&self) -> Result<Fp8Settings> {
        Ok(*crate::sync::lock(&self.fp8_state()?.settings))
    }

    /// Changes how FP8 GEMMs apply their scales and accumulate (the GPU check measures both
    /// accumulations, and runs the tensor-wide path on Hopper too). The outer-vector path is
    /// refused where cuBLASLt lacks it (before sm_90).
    pub fn set_fp8_settings(&self, settings: Fp8Settings) -> Result<()> {
        let state = self.fp8_state()?;
        if settings.path == Fp8Path::OuterVector && self.fp8_path() != Some(Fp8Path::OuterVector) {
            return Err(EngineError::Backend(format!(
                "{} ({}) has no per-row FP8 scaling in cuBLASLt (sm_90 or newer); use the tensor-wide path",
                self.device_name, self.arch
            )));
        }
        *crate::sync::lock(&state.settings) = settings;
        Ok(())
    }

    /// The FP8 kernels and plans, compiled on first use; an error naming the GPU below sm_89.
    pub(super) fn fp8_state(&self) -> Result<Arc<Fp8State>> {
        let mut slot = crate::sync::lock(&self.fp8);
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let Some(path) = self.fp8_path() else {
            return Err(unsupported_gpu(&self.device_name, &self.arch));
        };
        let m = &arbiter_kernels::FP8;
        let ptx = self
            .compiler
            .compile(m, &self.arch, &[])
            .map_err(|e| EngineError::Backend(format!("cannot compile the fp8 kernels for {}: {e}", self.arch)))?;
        let module = load_ptx(&self.ctx, ptx, "fp8 kernels", &self.compiler)?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| EngineError::Backend(format!("CUDA: no kernel {name:?} in the fp8 module: {e}")))
        };
        let state = Arc::new(Fp8State {
            kernels: Fp8Kernels {
                quantize_rows: f("quantize_rows")?,
                add_norm_fp8: f("add_norm_fp8")?,
                act_fp8: f("act_fp8")?,
                dequantize_rows: f("dequantize_rows")?,
                scale_rows_cols: f("scale_rows_cols")?,
            },
            plans: Mutex::new(Lru::new(PLAN_CAPACITY)),
            settings: Mutex::new(Fp8Settings { path, fast_accum: false }),
        });
        *slot = Some(state.clone());
        Ok(state)
    }

    /// An FP8 matrix from e4m3 parts (`check_parts` has made sure every part is e4m3 with one
    /// scale per row): codes copied as stored, scales concatenated.
    pub(super) fn fp8_matrix(&self, parts: &[MatrixPart<'_>]) -> Result<CudaMatrix> {
        let k = check_parts(parts)?;
        let name = parts[0].view.name;
        self.fp8_state().map_err(|e| EngineError::Backend(format!("{name:?} is FP8: {e}")))?;
        if !k.is_multiple_of(K_MULTIPLE) {
            return Err(EngineError::Backend(format!(
                "{name:?} is FP8 with {k} input columns on this rank; cuBLASLt's FP8 GEMMs need a multiple of \
                 {K_MULTIPLE} (serve this folder with --device cpu)"
            )));
        }
        let n: usize = parts.iter().map(|p| p.rows.len()).sum();
        let mut codes = Vec::with_capacity(n * k);
        let mut scales = Vec::with_capacity(n);
        for p in parts {
            p.view.for_each_row(p.rows.clone(), p.cols.clone(), |row| codes.extend_from_slice(row));
            scales.extend_from_slice(p.scales.as_deref().unwrap_or_default());
        }
        if codes.len() != n * k || scales.len() != n {
            return Err(EngineError::Backend(format!(
                "{name:?}: {} codes and {} scales for a [{n}, {k}] FP8 matrix",
                codes.len(),
                scales.len()
            )));
        }
        let bias = stacked_bias(parts).map(|b| self.to_device(&b)).transpose()?;
        let weights = Fp8Weights { codes: self.to_device(&codes)?, scales: self.to_device(&scales)? };
        Ok(CudaMatrix { weights: Weights::Fp8(weights), n, k, bias })
    }

    /// `x += delta` (when given), then the norm of each row as e4m3 codes with per-token scales:
    /// `add_norm_bf16` and the quantization of the next GEMM's input in one kernel.
    pub(super) fn add_norm_fp8(
        &self,
        x: &CudaSlice<f32>,
        delta: Option<&CudaSlice<u16>>,
        p: &CudaNorm,
        rows: usize,
        cols: usize,
    ) -> Result<CudaTensor> {
        let st = self.fp8_state()?;
        let (r, h) = (int(rows, "rows")?, int(cols, "hidden")?);
        let rms = p.rms as i32;
        let mut codes = self.alloc::<u8>(rows * cols)?;
        let mut scales = self.alloc::<f32>(rows)?;
        if rows > 0 {
            let mut b = self.stream.launch_builder(&st.kernels.add_norm_fp8);
            push_norm_inputs(&mut b, x, delta, p);
            b.arg(&mut codes).arg(&mut scales).arg(&r).arg(&h).arg(&p.eps).arg(&rms);
            // SAFETY: ABI of kernels/fp8.cu `add_norm_fp8` (norm.cu's add_norm_bf16 with codes and
            // scales for the output); buffers hold rows x hidden elements and rows scales.
            unsafe { b.launch(cfg((grid(rows, "rows")?, 1), NORM_THREADS, 0)) }
                .map_err(driver_err("launch add_norm_fp8"))?;
        }
        Ok(self.tensor(Data::E4m3 { codes, scales }, rows, cols))
    }

    /// The MLP activation of `x` as e4m3 codes with per-token scales (`act_fp8`).
    pub(super) fn activation_fp8(&self, x: &CudaTensor, kind: Activation) -> Result<CudaTensor> {
        let st = self.fp8_state()?;
        let input = x.bf16("activation")?;
        let gated = matches!(kind, Activation::SwiGlu | Activation::GeGlu);
        if gated && !x.cols.is_multiple_of(2) {
            return Err(EngineError::Backend(format!("{kind:?} needs an even width, got {}", x.cols)));
        }
        let cols = if gated { x.cols / 2 } else { x.cols };
        let mut codes = self.alloc::<u8>(x.rows * cols)?;
        let mut scales = self.alloc::<f32>(x.rows)?;
        if x.rows > 0 && cols > 0 {
            let (r, c, k) = (int(x.rows, "rows")?, int(cols, "columns")?, act_kind(kind) as i32);
            let mut b = self.stream.launch_builder(&st.kernels.act_fp8);
            b.arg(input).arg(&mut codes).arg(&mut scales).arg(&r).arg(&c).arg(&k);
            // SAFETY: ABI of kernels/fp8.cu `act_fp8`; the input holds rows x (2 x) cols elements.
            unsafe { b.launch(cfg((grid(x.rows, "rows")?, 1), FP8_THREADS, 0)) }
                .map_err(driver_err("launch act_fp8"))?;
        }
        Ok(self.tensor(Data::E4m3 { codes, scales }, x.rows, cols))
    }

    /// `x` (bf16) quantized per token by the standalone `quantize_rows` (the attention output).
    fn quantize_rows(&self, st: &Fp8State, x: &CudaSlice<u16>, rows: usize, cols: usize) -> Result<Data> {
        let mut codes = self.alloc::<u8>(rows * cols)?;
        let mut scales = self.alloc::<f32>(rows)?;
        if rows > 0 && cols > 0 {
            let (r, c) = (int(rows, "rows")?, int(cols, "columns")?);
            let mut b = self.stream.launch_builder(&st.kernels.quantize_rows);
            b.arg(x).arg(&mut codes).arg(&mut scales).arg(&r).arg(&c);
            // SAFETY: ABI of kernels/fp8.cu `quantize_rows`; x holds rows x cols elements.
            unsafe { b.launch(cfg((grid(rows, "rows")?, 1), FP8_THREADS, 0)) }
                .map_err(driver_err("launch quantize_rows"))?;
        }
        Ok(Data::E4m3 { codes, scales })
    }

    /// An e4m3 tensor back to bf16 (`dequantize_rows`), for a consumer that is not an FP8 GEMM.
    pub(super) fn dequantize(&self, x: &CudaTensor) -> Result<CudaSlice<u16>> {
        let Data::E4m3 { codes, scales } = &x.data else {
            return Err(EngineError::Backend("dequantize takes an e4m3 tensor".into()));
        };
        let st = self.fp8_state()?;
        let mut out = self.alloc::<u16>(x.rows * x.cols)?;
        if x.rows > 0 && x.cols > 0 {
            let (r, c) = (int(x.rows, "rows")?, int(x.cols, "columns")?);
            let mut b = self.stream.launch_builder(&st.kernels.dequantize_rows);
            b.arg(codes).arg(scales).arg(&mut out).arg(&r).arg(&c);
            let g = (grid(x.rows, "rows")?, grid(x.cols.div_ceil(FP8_THREADS as usize), "columns / 256")?);
            // SAFETY: ABI of kernels/fp8.cu `dequantize_rows`; shapes from the tensor.
            unsafe { b.launch(cfg(g, FP8_THREADS, 0)) }.map_err(driver_err("launch dequantize_rows"))?;
        }
        Ok(out)
    }

    /// `y = x W^T` for an FP8 matrix: `x` as e4m3 with per-token scales (quantized here unless a
    /// fused kernel already did), the GEMM on the path in force, the bias, bf16 out.
    pub(super) fn matmul_fp8(
        &self,
        x: &CudaTensor,
        weights: &Fp8Weights,
        (n, k): (usize, usize),
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<CudaTensor> {
        let st = self.fp8_state()?;
        let t = x.rows;
        let mut y = self.alloc::<u16>(t * n)?;
        if t == 0 {
            return Ok(self.tensor(Data::Bf16(y), t, n));
        }
        let quantized;
        let (codes, scales) = match &x.data {
            Data::E4m3 { codes, scales } => (codes, scales),
            Data::Bf16(b) => {
                quantized = self.quantize_rows(&st, b, t, k)?;
                let Data::E4m3 { codes, scales } = &quantized else { unreachable!("quantize_rows gives e4m3") };
                (codes, scales)
            }
            Data::F32(f) => {
                // Not reached by the graph (only the head's hidden layers take f32, and they are
                // never quantized); rounded to bf16 first like every other GEMM input.
                let b = self.round_to_bf16(f, t * k)?;
                quantized = self.quantize_rows(&st, &b, t, k)?;
                let Data::E4m3 { codes, scales } = &quantized else { unreachable!("quantize_rows gives e4m3") };
                (codes, scales)
            }
        };
        let settings = *crate::sync::lock(&st.settings);
        match settings.path {
            Fp8Path::OuterVector => {
                self.gemm_fp8(&st, settings, codes, scales, weights, GemmOut::Bf16(&mut y), t, n, k)?;
                if let Some(bias) = bias {
                    self.add_bias(&mut y, bias, t, n)?;
                }
            }
            Fp8Path::TensorWide => {
                let mut acc = self.alloc::<f32>(t * n)?;
                self.gemm_fp8(&st, settings, codes, scales, weights, GemmOut::F32(&mut acc), t, n, k)?;
                let (r, c) = (int(t, "rows")?, int(n, "columns")?);
                let mut b = self.stream.launch_builder(&st.kernels.scale_rows_cols);
                b.arg(&acc).arg(scales).arg(&weights.scales);
                match bias {
                    Some(bias) => b.arg(bias),
                    None => b.arg(&NULL),
                };
                b.arg(&mut y).arg(&r).arg(&c);
                let g = (grid(t, "rows")?, grid(n.div_ceil(FP8_THREADS as usize), "columns / 256")?);
                // SAFETY: ABI of kernels/fp8.cu `scale_rows_cols`; acc and y are t x n, scales t and n.
                unsafe { b.launch(cfg(g, FP8_THREADS, 0)) }.map_err(driver_err("launch scale_rows_cols"))?;
            }
        }
        Ok(self.tensor(Data::Bf16(y), t, n))
    }

    /// The plan of one FP8 shape. `scale_ptrs` (weights', tokens') are set before the heuristic
    /// runs on the outer-vector path, so that it sees the descriptor as the matmul will.
    fn fp8_plan(&self, t: usize, n: usize, k: usize, settings: Fp8Settings, scale_ptrs: (u64, u64)) -> Result<Plan> {
        let e4m3 = sys::cudaDataType_t::CUDA_R_8F_E4M3;
        let out = match settings.path {
            Fp8Path::OuterVector => sys::cudaDataType_t::CUDA_R_16BF,
            Fp8Path::TensorWide => sys::cudaDataType_t::CUDA_R_32F,
        };
        let mut plan = Plan::empty();
        plan.desc =
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(lt_err("create FP8 matmul descriptor"))?;
        use sys::cublasLtMatmulDescAttributes_t as A;
        // Attribute types from cublasLt.h: TRANSA cublasOperation_t (int32, CUBLAS_OP_T = 1),
        // FAST_ACCUM int8_t, the scale modes int32 (cublasLtMatmulMatrixScale_t).
        let trans: i32 = 1;
        let fast: i8 = settings.fast_accum as i8;
        let outer = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as i32;
        // SAFETY: each value outlives the call, which copies it.
        unsafe {
            let set = |attr, p: *const c_void, size| lt::set_matmul_desc_attribute(plan.desc, attr, p, size);
            set(A::CUBLASLT_MATMUL_DESC_TRANSA, &trans as *const _ as *const c_void, size_of_val(&trans))
                .and_then(|_| set(A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast as *const _ as *const c_void, 1))
                .and_then(|_| match settings.path {
                    Fp8Path::OuterVector => {
                        let p = &outer as *const _ as *const c_void;
                        set(A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, p, size_of_val(&outer))
                            .and_then(|_| set(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, p, size_of_val(&outer)))
                    }
                    Fp8Path::TensorWide => Ok(()),
                })
        }
        .map_err(lt_err("set the FP8 matmul attributes"))?;
        if settings.path == Fp8Path::OuterVector {
            set_scale_pointers(&plan, scale_ptrs)?;
        }
        plan.a = lt::create_matrix_layout(e4m3, k as u64, n as u64, k as i64).map_err(lt_err("layout of w"))?;
        plan.b = lt::create_matrix_layout(e4m3, k as u64, t as u64, k as i64).map_err(lt_err("layout of x"))?;
        plan.c = lt::create_matrix_layout(out, n as u64, t as u64, n as i64).map_err(lt_err("layout of y"))?;
        self.gemm.choose_algo(&mut plan).map_err(|e| {
            EngineError::Backend(format!(
                "cuBLASLt has no FP8 algorithm for [{t}, {k}] x [{n}, {k}]^T with {settings:?} on {} ({}): {e:?}",
                self.device_name, self.arch
            ))
        })?;
        Ok(plan)
    }

    /// One FP8 cuBLASLt call: `out = x_codes w_codes^T`, scaled by the per-token and per-channel
    /// scales on the outer-vector path, unscaled (f32) on the tensor-wide one.
    #[allow(clippy::too_many_arguments)]
    fn gemm_fp8(
        &self,
        st: &Fp8State,
        settings: Fp8Settings,
        x_codes: &CudaSlice<u8>,
        x_scales: &CudaSlice<f32>,
        w: &Fp8Weights,
        out: GemmOut<'_>,
        t: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let out_len = match &out {
            GemmOut::Bf16(y) => y.len(),
            GemmOut::F32(y) => y.len(),
        };
        if x_codes.len() < t * k || x_scales.len() < t || w.codes.len() < n * k || w.scales.len() < n || out_len < t * n
        {
            return Err(EngineError::Backend(format!(
                "FP8 GEMM [{t}, {k}] x [{n}, {k}]^T with buffers of {}, {}, {} and {} elements",
                x_codes.len(),
                w.codes.len(),
                out_len,
                x_scales.len()
            )));
        }
        let gemm: &Gemm = &self.gemm;
        self.stream.context().bind_to_thread().map_err(driver_err("bind the GPU for cuBLASLt"))?;
        let mut plans = crate::sync::lock(&st.plans);
        let s = &self.stream;
        let (xp, _gx) = x_codes.device_ptr(s);
        let (wp, _gw) = w.codes.device_ptr(s);
        let (xsp, _gxs) = x_scales.device_ptr(s);
        let (wsp_scale, _gws) = w.scales.device_ptr(s);
        let plan =
            plans.get_or_try_insert((t, n, k, settings), || self.fp8_plan(t, n, k, settings, (wsp_scale, xsp)))?;
        let (yp, _gy) = match out {
            GemmOut::Bf16(y) => y.device_ptr_mut(s),
            GemmOut::F32(y) => y.device_ptr_mut(s),
        };
        if settings.path == Fp8Path::OuterVector {
            // New token scales with every batch: set on the cached descriptor per call.
            set_scale_pointers(plan, (wsp_scale, xsp))?;
        }
        // SAFETY: sizes checked above against the plan's shape.
        unsafe { gemm.run(plan, (wp, xp, yp), "FP8 matmul") }
    }

    /// Seconds per FP8 `y[t, n] = x[t, k] W[n, k]^T` under each of `settings` (input already
    /// e4m3, as the fused kernels hand it over; the tensor-wide path includes its
    /// `scale_rows_cols`): the median of `reps` timed runs after two warm-ups, on random codes
    /// (every finite e4m3 value equally likely; zeros would run faster than real data) made once
    /// for all settings. The backend's own settings are left as they were.
    pub fn time_gemm_fp8(
        &self,
        t: usize,
        n: usize,
        k: usize,
        settings: &[Fp8Settings],
        reps: usize,
    ) -> Result<Vec<f64>> {
        let mut rng = crate::synth::SplitMix::new((t * 31 + n * 17 + k) as u64);
        // A code below 0x7F with a random sign: never NaN (0x7F / 0xFF). Bit arithmetic, since
        // the 16k x 18432 inputs of the 340B shapes are hundreds of millions of values.
        let mut codes = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| {
                    let r = rng.next_u64();
                    ((r % 0x7F) as u8) | ((r >> 63) as u8) << 7
                })
                .collect()
        };
        let (xc, wc) = (codes(t * k), codes(n * k));
        let x = self.tensor(
            Data::E4m3 { codes: self.to_device(&xc)?, scales: self.to_device(&vec![1.0f32 / 448.0; t])? },
            t,
            k,
        );
        let weights = Fp8Weights { codes: self.to_device(&wc)?, scales: self.to_device(&vec![1.0f32 / 448.0; n])? };
        let before = self.fp8_settings()?;
        let result = settings
            .iter()
            .map(|&set| {
                self.set_fp8_settings(set)?;
                self.time_fp8_inner(&x, &weights, (n, k), reps)
            })
            .collect();
        self.set_fp8_settings(before)?;
        result
    }

    fn time_fp8_inner(&self, x: &CudaTensor, weights: &Fp8Weights, nk: (usize, usize), reps: usize) -> Result<f64> {
        for _ in 0..2 {
            self.matmul_fp8(x, weights, nk, None)?;
        }
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let start = self.stream.record_event(timing).map_err(driver_err("record an event"))?;
            self.matmul_fp8(x, weights, nk, None)?;
            let end = self.stream.record_event(timing).map_err(driver_err("record an event"))?;
            times.push(start.elapsed_ms(&end).map_err(driver_err("time a GEMM"))? as f64 / 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// Seconds per `quantize_rows` of a `[t, k]` bf16 tensor (the standalone quantization of the
    /// attention output): its share of the forward is owed to a GPU (docs/gpu-owed.md, item 15).
    pub fn time_quantize_rows(&self, t: usize, k: usize, reps: usize) -> Result<f64> {
        let st = self.fp8_state()?;
        let mut rng = crate::synth::SplitMix::new((t * 7 + k) as u64);
        let v: Vec<u16> = (0..t * k).map(|_| super::bf16_bits(rng.uniform() - 0.5)).collect();
        let x = self.to_device(&v)?;
        self.quantize_rows(&st, &x, t, k)?;
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let start = self.stream.record_event(timing).map_err(driver_err("record an event"))?;
            self.quantize_rows(&st, &x, t, k)?;
            let end = self.stream.record_event(timing).map_err(driver_err("record an event"))?;
            times.push(start.elapsed_ms(&end).map_err(driver_err("time quantize_rows"))? as f64 / 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_follows_the_compute_capability() {
        assert_eq!(Fp8Path::for_sm(80), None);
        assert_eq!(Fp8Path::for_sm(86), None);
        assert_eq!(Fp8Path::for_sm(89), Some(Fp8Path::TensorWide));
        assert_eq!(Fp8Path::for_sm(90), Some(Fp8Path::OuterVector));
        assert_eq!(Fp8Path::for_sm(100), Some(Fp8Path::OuterVector));
    }

    #[test]
    fn a_gpu_before_ada_is_refused_by_name_with_what_to_do() {
        let e = unsupported_gpu("NVIDIA A100-SXM4-80GB", "sm_80").to_string();
        for needle in ["NVIDIA A100-SXM4-80GB is sm_80", "8.9 or newer", "--device cpu", "unquantized folder"] {
            assert!(e.contains(needle), "{needle:?} missing: {e}");
        }
    }

    #[test]
    fn every_activation_has_its_kernel_kind() {
        assert_eq!(act_kind(Activation::Relu2), Fp8Act::Relu2);
        assert_eq!(act_kind(Activation::Relu), Fp8Act::Relu);
        assert_eq!(act_kind(Activation::SwiGlu), Fp8Act::SwiGlu);
        assert_eq!(act_kind(Activation::GeGlu), Fp8Act::GeGlu);
    }
}
