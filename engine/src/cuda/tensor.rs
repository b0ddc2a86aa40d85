//! Activations on the GPU: the residual stream in f32, everything else in bf16 (stored as raw
//! `u16` bits so that no half-precision type crosses the FFI boundary), and the input of an FP8
//! GEMM as e4m3 codes with one scale per row (token).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::driver_err;
use crate::backend::HostTensor;
use crate::error::{EngineError, Result};

/// Element type of a [`CudaTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActDtype {
    /// IEEE single: the residual stream, the final norm's output, stage-to-stage transfers.
    F32,
    /// bfloat16: norm outputs, GEMM inputs and outputs, attention, the MLP.
    Bf16,
    /// e4m3 codes with an f32 scale per row: the input of an FP8 GEMM, as the fused norm and
    /// activation kernels produce it (engine/src/fp8.rs's per-token rounding).
    E4m3,
}

/// Device storage of one tensor.
#[derive(Debug)]
pub(crate) enum Data {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    /// `[rows, cols]` e4m3 codes and `[rows]` scales: value = e4m3(code) * scale of its row.
    E4m3 {
        codes: CudaSlice<u8>,
        scales: CudaSlice<f32>,
    },
}

/// Activations on one GPU, `[rows, cols]` row-major.
#[derive(Debug)]
pub struct CudaTensor {
    pub(crate) data: Data,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

/// f32 to bf16 bits, round to nearest even (NaN stays NaN): the rounding the kernels use.
pub fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// bf16 bits to f32 (exact).
pub fn bf16_value(bits: u16) -> f32 {
    half::bf16::from_bits(bits).to_f32()
}

impl CudaTensor {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element type.
    pub fn dtype(&self) -> ActDtype {
        match self.data {
            Data::F32(_) => ActDtype::F32,
            Data::Bf16(_) => ActDtype::Bf16,
            Data::E4m3 { .. } => ActDtype::E4m3,
        }
    }

    /// The stream the tensor's memory belongs to.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        match &self.data {
            Data::F32(s) => s.stream(),
            Data::Bf16(s) => s.stream(),
            Data::E4m3 { codes, .. } => codes.stream(),
        }
    }

    pub(crate) fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            Data::F32(s) => Ok(s),
            other => Err(wrong_dtype(what, "f32", other.name())),
        }
    }

    pub(crate) fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        match &mut self.data {
            Data::F32(s) => Ok(s),
            other => Err(wrong_dtype(what, "f32", other.name())),
        }
    }

    pub(crate) fn bf16(&self, what: &str) -> Result<&CudaSlice<u16>> {
        match &self.data {
            Data::Bf16(s) => Ok(s),
            other => Err(wrong_dtype(what, "bf16", other.name())),
        }
    }

    pub(crate) fn bf16_mut(&mut self, what: &str) -> Result<&mut CudaSlice<u16>> {
        match &mut self.data {
            Data::Bf16(s) => Ok(s),
            other => Err(wrong_dtype(what, "bf16", other.name())),
        }
    }
}

impl Data {
    fn name(&self) -> &'static str {
        match self {
            Data::F32(_) => "f32",
            Data::Bf16(_) => "bf16",
            Data::E4m3 { .. } => "e4m3",
        }
    }
}

fn wrong_dtype(what: &str, want: &str, got: &str) -> EngineError {
    EngineError::Backend(format!("{what} takes a {want} tensor, got {got}"))
}

impl HostTensor for CudaTensor {
    fn read_host(&self) -> Result<Vec<f32>> {
        let n = self.rows * self.cols;
        if n == 0 {
            return Ok(Vec::new());
        }
        let stream = self.stream().clone();
        let out = match &self.data {
            Data::F32(s) => stream.clone_dtoh(s).map_err(driver_err("copy a tensor to the host"))?,
            Data::Bf16(s) => {
                let bits = stream.clone_dtoh(s).map_err(driver_err("copy a tensor to the host"))?;
                bits.into_iter().map(bf16_value).collect()
            }
            Data::E4m3 { codes, scales } => {
                let codes = stream.clone_dtoh(codes).map_err(driver_err("copy a tensor to the host"))?;
                let scales = stream.clone_dtoh(scales).map_err(driver_err("copy a tensor to the host"))?;
                stream.synchronize().map_err(driver_err("finish the copy to the host"))?;
                dequantize(&codes[..n], &scales, self.cols)
            }
        };
        // The copy is asynchronous for the stream; wait so that `out` is complete and any earlier
        // kernel failure surfaces here.
        stream.synchronize().map_err(driver_err("finish the copy to the host"))?;
        // The buffer of an empty tensor holds one element; shape is what counts.
        Ok(out.into_iter().take(n).collect())
    }

    fn write_host(&mut self, data: &[f32]) -> Result<()> {
        if data.len() != self.rows * self.cols {
            return Err(EngineError::Backend(format!(
                "cannot write {} values into a {} x {} tensor",
                data.len(),
                self.rows,
                self.cols
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        let stream = self.stream().clone();
        match &mut self.data {
            Data::F32(s) => stream.memcpy_htod(data, s),
            Data::Bf16(s) => {
                let bits: Vec<u16> = data.iter().map(|&v| bf16_bits(v)).collect();
                stream.memcpy_htod(&bits, s)
            }
            Data::E4m3 { codes, scales } => {
                let (c, sc) = quantize_per_token(data, self.cols);
                stream.memcpy_htod(&c, codes).and_then(|_| stream.memcpy_htod(&sc, scales))
            }
        }
        .map_err(driver_err("copy a tensor to the GPU"))?;
        // Pageable host memory: the driver has staged it when the call returns, but wait anyway so
        // that an error is reported by this call and not a later one.
        stream.synchronize().map_err(driver_err("finish the copy to the GPU"))
    }
}

/// The values of e4m3 `codes` (`cols` per row) with one scale per row: `e4m3(code) * scale`, the
/// dequantization of engine/src/fp8.rs.
pub(crate) fn dequantize(codes: &[u8], scales: &[f32], cols: usize) -> Vec<f32> {
    codes
        .chunks(cols.max(1))
        .zip(scales)
        .flat_map(|(row, &s)| row.iter().map(move |&c| crate::fp8::decode(c) * s))
        .collect()
}

/// `x` (`cols` per row) as e4m3 codes and per-token scales, as [`crate::fp8::round_per_token`]
/// rounds it (the same scale and codes, kept apart instead of multiplied back).
pub(crate) fn quantize_per_token(x: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len());
    let scales = x.chunks(cols.max(1)).map(|row| crate::fp8::quantize_token(row, &mut codes)).collect();
    (codes, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.
        assert_eq!(bf16_value(bf16_bits(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
        assert_eq!(bf16_value(bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(-2.5)), -2.5);
    }

    #[test]
    fn per_token_codes_dequantize_to_what_the_cpu_reference_rounds_to() {
        let mut rng = crate::synth::SplitMix::new(19);
        let cols = 37;
        let mut x: Vec<f32> = (0..cols * 5).map(|_| (rng.uniform() - 0.5) * 8.0).collect();
        x[cols..2 * cols].fill(0.0); // a zero row: the scale floor, codes 0
        x[2 * cols + 3] = 1.0e4; // an outlier row
        let (codes, scales) = quantize_per_token(&x, cols);
        assert_eq!((codes.len(), scales.len()), (x.len(), 5));
        assert_eq!(scales[1], crate::fp8::MIN_ACTIVATION_SCALE);
        let mut reference = x.clone();
        crate::fp8::round_per_token(&mut reference, cols);
        let back = dequantize(&codes, &scales, cols);
        assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_ne!(back, x, "rounding changed something");
    }
}
