//! FP8 weights: the e4m3 codec, the compressed-tensors "float-quantized" scheme arbiter reads
//! (per-output-channel weight scales, activations quantized per token at run time), and the
//! rounding rules every backend must reproduce.
//!
//! The format is OCP e4m3 ("e4m3fn", `torch.float8_e4m3fn`): 1 sign, 4 exponent (bias 7) and 3
//! mantissa bits, no infinities, `S.1111.111` is NaN, the largest finite value 448. Conversion
//! from f32 rounds to nearest, ties to even, and saturates at ±448, as llm-compressor's
//! clamp-then-cast and vLLM's kernels do.
//!
//! A quantized linear layer `y = x W^T` is computed as `y = q(x) dq(W)^T` where
//! `dq(W)[o] = e4m3(W[o] / s_w[o]) * s_w[o]` with `s_w[o] = max|W[o]| / 448` fixed in the folder,
//! and `q(x)` rounds each token (row) the same way with its own scale `max|x| / 448` computed at
//! run time. The CPU backend is the reference: it dequantizes at load and rounds activations
//! before each quantized GEMM, which is what a GPU computing `(e4m3 x) (e4m3 W)^T * s_x * s_w`
//! with f32 accumulation gives up to summation order.

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};
use crate::weights::{Dtype, TensorView, WeightStore};

/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The e4m3 NaN code (positive sign); the codec never produces it from a number.
pub const E4M3_NAN: u8 = 0x7F;

/// Smallest per-token activation scale, as vLLM clamps it (`1 / (448 * 512)`): an all-zero token
/// gets a finite scale instead of a division by zero, and tiny tokens are not blown up past f32.
pub const MIN_ACTIVATION_SCALE: f32 = 1.0 / (E4M3_MAX * 512.0);

/// The value of the e4m3 code `code` (exact in f32).
pub fn decode(code: u8) -> f32 {
    let exp = (code >> 3) & 0x0F;
    let man = (code & 0x07) as f32;
    let magnitude = match exp {
        0x0F if code & 0x07 == 0x07 => f32::NAN,
        // Subnormals: m/8 * 2^-6.
        0 => man * (1.0 / 512.0),
        e => (1.0 + man / 8.0) * f32::from_bits(((e as u32 + 127 - 7) & 0xFF) << 23),
    };
    if code & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// The e4m3 code nearest to `x` (ties to even), saturating at ±448; NaN gives [`E4M3_NAN`].
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return E4M3_NAN;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let magnitude = if a >= E4M3_MAX {
        0x7E
    } else if a < 1.0 / 64.0 {
        // Subnormal range: the grid is 2^-9 apart; a * 512 is exact, so rounding it is rounding x.
        // A result of 8 is the smallest normal, whose code is 8 as well.
        (a * 512.0).round_ties_even() as u8
    } else {
        let bits = a.to_bits();
        let exp = (bits >> 23) as i32 - 127;
        let man = bits & 0x7F_FFFF;
        let mut code = (((exp + 7) as u32) << 3) | (man >> 20);
        let rest = man & 0xF_FFFF;
        if rest > 0x8_0000 || (rest == 0x8_0000 && code & 1 == 1) {
            // A carry out of the mantissa moves to the next binade, which is the right code.
            code += 1;
        }
        code.min(0x7E) as u8
    };
    sign | magnitude
}

/// The per-output-channel scale of a weight row: `max|row| / 448`, or 1 for an all-zero row (its
/// codes are all zero whatever the scale; 1 keeps the folder free of zero scales, which loaders
/// refuse).
pub fn row_scale(row: &[f32]) -> f32 {
    let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if absmax == 0.0 {
        1.0
    } else {
        absmax / E4M3_MAX
    }
}

/// Quantizes one weight row: appends its e4m3 codes to `codes` and returns its scale.
pub fn quantize_row(row: &[f32], codes: &mut Vec<u8>) -> f32 {
    let s = row_scale(row);
    codes.extend(row.iter().map(|&v| encode(v / s)));
    s
}

/// Quantizes the row-major matrix `w` (`cols` wide) row by row: its e4m3 codes and one scale per
/// row.
pub fn quantize_matrix(w: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(w.len());
    let scales = w.chunks_exact(cols.max(1)).map(|row| quantize_row(row, &mut codes)).collect();
    (codes, scales)
}

/// Rounds every row of the row-major `x` (`cols` wide) to e4m3 with its own scale
/// `max(max|row| / 448, MIN_ACTIVATION_SCALE)`, in place: the values a GPU's per-token dynamic
/// quantization feeds its GEMM, dequantized.
pub fn round_per_token(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols.max(1)) {
        let s = activation_scale(row);
        for v in row.iter_mut() {
            *v = decode(encode(*v / s)) * s;
        }
    }
}

/// The per-token scale of an activation row: `max(max|row| / 448, MIN_ACTIVATION_SCALE)`.
pub fn activation_scale(row: &[f32]) -> f32 {
    let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    (absmax / E4M3_MAX).max(MIN_ACTIVATION_SCALE)
}

/// Quantizes one activation row as a GPU feeds it to an FP8 GEMM: appends its e4m3 codes
/// (`encode(x / s)`) to `codes` and returns its scale `s` ([`activation_scale`]);
/// `decode(code) * s` is what [`round_per_token`] leaves in place.
pub fn quantize_token(row: &[f32], codes: &mut Vec<u8>) -> f32 {
    let s = activation_scale(row);
    codes.extend(row.iter().map(|&v| encode(v / s)));
    s
}

/// The linear layers (module name suffixes inside `model.layers.{i}.`) the FP8 scheme quantizes.
/// Everything else (embeddings, norms, the reward head) is never quantized.
pub const LINEAR_MODULES: [&str; 7] = crate::tensors::module::LINEAR;

/// The module of a weight tensor name (`"...q_proj.weight"` -> `"...q_proj"`).
pub fn module_of(weight: &str) -> &str {
    weight.strip_suffix(".weight").unwrap_or(weight)
}

/// The name of the scale tensor that goes with a quantized weight tensor.
pub fn scale_name(weight: &str) -> String {
    format!("{}.weight_scale", module_of(weight))
}

/// Whether `weight` (a tensor name) is one of the linear layers the scheme may quantize.
pub fn is_linear_weight(weight: &str) -> bool {
    let module = module_of(weight);
    weight.ends_with(".weight")
        && module.starts_with("model.layers.")
        && LINEAR_MODULES.iter().any(|m| module.ends_with(&format!(".{m}")))
}

/// The reward head's module name, which `quantization_config.ignore` must list.
pub const HEAD_MODULE: &str = "score";

/// A folder's FP8 scheme, from `quantization_config` (see [`parse_quantization_config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fp8Scheme {
    /// Module names left unquantized (`ignore`); always holds [`HEAD_MODULE`].
    pub ignore: Vec<String>,
}

impl Fp8Scheme {
    /// Leaves the linear layers `modules` of block `layer` unquantized (adds them to `ignore`).
    pub fn keep_layer(&mut self, layer: usize, modules: &[&str]) {
        self.ignore.extend(modules.iter().map(|m| crate::tensors::layer_module(layer, m)));
    }

    /// Whether the weight tensor `weight` is stored in e4m3 with a scale under this scheme.
    pub fn quantizes(&self, weight: &str) -> bool {
        is_linear_weight(weight) && !self.ignore.iter().any(|i| i == module_of(weight))
    }

    /// The `quantization_config` object arbiter writes (and reads back): compressed-tensors'
    /// float-quantized format, e4m3 weights with a static per-channel scale, e4m3 activations
    /// with a dynamic per-token scale, the head ignored.
    pub fn to_config(&self) -> Value {
        // Field for field what compressed-tensors 0.20 serializes for its FP8_DYNAMIC preset
        // (tests/fixtures/check_fp8_config.py compares the two).
        let args = |strategy: &str, dynamic: bool| {
            serde_json::json!({
                "num_bits": 8, "type": "float", "symmetric": true, "group_size": null,
                "strategy": strategy, "dynamic": dynamic
            })
        };
        serde_json::json!({
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": args("channel", false),
                "input_activations": args("token", true),
                "output_activations": null,
                "format": null
            }},
            "quant_method": "compressed-tensors",
            "kv_cache_scheme": null,
            "format": "float-quantized",
            "quantization_status": "compressed",
            "global_compression_ratio": null,
            "ignore": self.ignore,
            "moe_sparsity_config": null
        })
    }
}

impl Default for Fp8Scheme {
    fn default() -> Self {
        Fp8Scheme { ignore: vec![HEAD_MODULE.to_string()] }
    }
}

/// Reads `quantization_config` (the object under that key of config.json). Accepts exactly the
/// scheme [`Fp8Scheme::to_config`] describes, in any of the spellings compressed-tensors writes
/// (format at the top or per group, defaults left out); anything else is refused with the field
/// that differs, so that a GPTQ, AWQ, INT8 or block-FP8 folder is never misread as this one.
/// `err` turns a message into the caller's error (it names config.json).
pub fn parse_quantization_config(q: &Value, err: &dyn Fn(String) -> EngineError) -> Result<Fp8Scheme> {
    let q = q.as_object().ok_or_else(|| err(format!("quantization_config must be an object, found {q}")))?;
    let str_field = |obj: &Map<String, Value>, key: &str, at: &str| -> Result<Option<String>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(err(format!("{at}.{key} must be a string, found {v}"))),
        }
    };
    let method = str_field(q, "quant_method", "quantization_config")?.unwrap_or_default();
    if method != "compressed-tensors" {
        return Err(err(format!(
            "quantization_config.quant_method {method:?} is not supported; arbiter reads \"compressed-tensors\" \
             FP8 (format \"float-quantized\") folders, as `arbiter quantize` writes them"
        )));
    }
    let top_format = str_field(q, "format", "quantization_config")?;
    if let Some(status) = str_field(q, "quantization_status", "quantization_config")? {
        if status != "compressed" {
            return Err(err(format!(
                "quantization_config.quantization_status {status:?}: only \"compressed\" folders hold e4m3 weights"
            )));
        }
    }
    if !matches!(q.get("kv_cache_scheme"), None | Some(Value::Null)) {
        return Err(err("quantization_config.kv_cache_scheme is not supported (arbiter keeps no KV cache)".into()));
    }
    match q.get("sparsity_config") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(v) => return Err(err(format!("quantization_config.sparsity_config {v} is not supported"))),
    }
    let groups = match q.get("config_groups") {
        Some(Value::Object(g)) if !g.is_empty() => g,
        _ => return Err(err("quantization_config.config_groups must be a non-empty object".into())),
    };
    if groups.len() != 1 {
        return Err(err(format!(
            "quantization_config.config_groups has {} groups; arbiter reads one group targeting \"Linear\"",
            groups.len()
        )));
    }
    let (gname, group) = groups.iter().next().expect("one group");
    let at = format!("quantization_config.config_groups.{gname}");
    let group = group.as_object().ok_or_else(|| err(format!("{at} must be an object")))?;
    let format = str_field(group, "format", &at)?.or(top_format);
    if format.as_deref() != Some("float-quantized") {
        return Err(err(format!(
            "quantization format {:?} is not supported; arbiter reads \"float-quantized\" (e4m3 weights)",
            format.unwrap_or_default()
        )));
    }
    match group.get("targets") {
        Some(Value::Array(t)) if t.len() == 1 && t[0] == "Linear" => {}
        other => {
            return Err(err(format!(
                "{at}.targets must be [\"Linear\"], found {}",
                other.map_or("nothing".to_string(), Value::to_string)
            )))
        }
    }
    // The two argument sets: weights static per channel, input activations dynamic per token.
    for (key, strategy, dynamic) in [("weights", "channel", false), ("input_activations", "token", true)] {
        let at = format!("{at}.{key}");
        let args = match group.get(key) {
            Some(Value::Object(a)) => a,
            _ => return Err(err(format!("{at} must be an object (FP8 W8A8 quantizes both)"))),
        };
        let want = |field: &str, expected: Value, default: Option<Value>| -> Result<()> {
            let found = match args.get(field) {
                None | Some(Value::Null) => default.unwrap_or(Value::Null),
                Some(v) => v.clone(),
            };
            if found != expected {
                return Err(err(format!("{at}.{field} is {found}, arbiter's FP8 scheme needs {expected}")));
            }
            Ok(())
        };
        want("num_bits", 8.into(), None)?;
        want("type", "float".into(), Some("int".into()))?;
        want("symmetric", true.into(), Some(true.into()))?;
        want("strategy", strategy.into(), None)?;
        want("dynamic", dynamic.into(), Some(false.into()))?;
        want("group_size", Value::Null, None)?;
        want("block_structure", Value::Null, None)?;
        match args.get("actorder") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(v) => return Err(err(format!("{at}.actorder is {v}; activation ordering is for integer groups"))),
        }
    }
    if !matches!(group.get("output_activations"), None | Some(Value::Null)) {
        return Err(err(format!("{at}.output_activations must be null: arbiter quantizes no outputs")));
    }
    let ignore: Vec<String> = match q.get("ignore") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v.as_str() {
                Some(s) if s.starts_with("re:") => Err(err(format!(
                    "quantization_config.ignore entry {s:?}: regular expressions are not supported; list module names"
                ))),
                Some(s) => Ok(s.to_string()),
                None => Err(err(format!("quantization_config.ignore entries must be strings, found {v}"))),
            })
            .collect::<Result<_>>()?,
        None | Some(Value::Null) => Vec::new(),
        Some(v) => return Err(err(format!("quantization_config.ignore must be a list, found {v}"))),
    };
    if !ignore.iter().any(|i| i == HEAD_MODULE) {
        return Err(err(format!(
            "quantization_config.ignore must list {HEAD_MODULE:?}: the reward head is never quantized \
             (a quantized head can zero every score)"
        )));
    }
    Ok(Fp8Scheme { ignore })
}

/// Reads and checks the scales of rows `rows` of the quantized weight `weight` (shape
/// `[out, in]`): the tensor `{module}.weight_scale` must exist, be F32, BF16 or F16 of shape
/// `[out, 1]` or `[out]`, and hold finite positive numbers. Errors name the tensor (and the row).
pub fn load_scales(store: &WeightStore, weight: &TensorView<'_>, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
    let name = scale_name(weight.name);
    let scale = store.get(&name)?;
    let out = weight.shape[0];
    if scale.shape != [out, 1] && scale.shape != [out] {
        return Err(EngineError::WrongShape { name, expected: vec![out, 1], found: scale.shape.to_vec() });
    }
    if scale.dtype == Dtype::F8E4M3 {
        return Err(EngineError::UnsupportedDtype { name, dtype: "F8_E4M3 (a scale must be F32, BF16 or F16)".into() });
    }
    let mut values = Vec::with_capacity(rows.len());
    scale.rows_to_f32(rows.clone(), &mut values);
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v > 0.0)) {
        return Err(EngineError::BadScale { name, row: rows.start + i, value: *v });
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every finite positive e4m3 value, in code order (which is value order).
    fn grid() -> Vec<(u8, f32)> {
        (0u8..0x7F).map(|c| (c, decode(c))).collect()
    }

    /// The nearest grid code by exhaustive search, ties to the even code, saturating: an
    /// oracle that shares nothing with `encode`'s bit manipulation.
    fn nearest(x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs();
        let mut best = (0u8, f32::INFINITY);
        for (c, v) in grid() {
            let d = (v - a).abs();
            if d < best.1 || (d == best.1 && c % 2 == 0) {
                best = (c, d);
            }
        }
        sign | best.0
    }

    #[test]
    fn all_256_codes_decode_as_the_format_defines_and_round_trip() {
        for code in 0..=255u8 {
            let v = decode(code);
            if code & 0x7F == 0x7F {
                assert!(v.is_nan(), "code {code:#04x} is NaN");
                continue;
            }
            let (e, m) = ((code >> 3) & 0xF, code & 7);
            let want =
                if e == 0 { m as f64 / 8.0 * 2f64.powi(-6) } else { (1.0 + m as f64 / 8.0) * 2f64.powi(e as i32 - 7) };
            let want = if code & 0x80 != 0 { -want } else { want };
            assert_eq!(v as f64, want, "code {code:#04x}");
            assert_eq!(encode(v), code, "code {code:#04x} ({v}) round trip");
        }
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert_eq!(decode(0x08), 2f32.powi(-6));
    }

    #[test]
    fn encoding_is_round_to_nearest_even_and_saturates() {
        let g = grid();
        let mut probes = Vec::new();
        for w in g.windows(2) {
            let (a, b) = (w[0].1, w[1].1);
            let mid = (a + b) / 2.0; // exact in f32: the grid has 3 mantissa bits
            probes.extend([mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1), a * 0.999]);
        }
        let mut rng = crate::synth::SplitMix::new(3);
        for _ in 0..20_000 {
            let u = rng.uniform();
            probes.push(u * 500.0);
            probes.push(u * 2f32.powi(-7));
            probes.push(u * 3.0);
        }
        probes.extend([448.0, 455.9, 464.0, 464.1, 1e9, f32::INFINITY, 0.0, 2f32.powi(-10), 2f32.powi(-10) * 1.0001]);
        for &p in &probes {
            for x in [p, -p] {
                assert_eq!(encode(x), nearest(x), "encode({x:e})");
            }
        }
        assert_eq!(encode(f32::NEG_INFINITY), 0xFE);
        assert_eq!(encode(f32::NAN), E4M3_NAN);
        // Ties: 2^-10 is halfway between 0 and the first subnormal (even wins: 0); 17.0 is
        // halfway between 16 and 18 (codes 0x58 and 0x59: even wins, 16).
        assert_eq!(encode(2f32.powi(-10)), 0);
        assert_eq!(encode(17.0), 0x58);
        assert_eq!(encode(19.0), 0x5A);
    }

    #[test]
    fn weight_rows_quantize_within_half_a_step_and_zero_rows_get_scale_one() {
        let row = [0.5f32, -1.25, 3.0e-4, 0.0, 2.0];
        let mut codes = Vec::new();
        let s = quantize_row(&row, &mut codes);
        assert_eq!(s, 2.0 / 448.0);
        assert_eq!(codes[4], 0x7E, "the largest element maps to 448");
        for (&w, &c) in row.iter().zip(&codes) {
            let back = decode(c) * s;
            // Half a step: 1/16 relative in the normal range, 2^-10 * s in the subnormal one.
            assert!((back - w).abs() <= (w.abs() / 16.0).max(s * 2f32.powi(-10)) * 1.000001, "{w} -> {back}");
        }
        let mut zero = Vec::new();
        assert_eq!(quantize_row(&[0.0; 4], &mut zero), 1.0);
        assert_eq!(zero, [0; 4]);
    }

    #[test]
    fn per_token_rounding_uses_each_rows_own_scale() {
        let mut x = vec![1.0f32, 17.0 / 16.0, 0.0, -448.0 * 3.0, 0.0, 0.0];
        round_per_token(&mut x, 2);
        // Row 0: scale 17/16/448, 17/16 maps to 448 exactly and 1.0 to 421.6.. -> 416 (0x7B).
        let s0 = 17.0f32 / 16.0 / 448.0;
        assert_eq!(x[1], 448.0 * s0);
        // 1.0 / s0 = 421.6, between the grid points 416 and 448 (32 apart in [256, 512)).
        assert_eq!(x[0], 416.0 * s0);
        // Row 1: the absmax element comes back exactly; row 2 is zeros and stays zeros.
        assert_eq!(x[2..4], [0.0, -1344.0]);
        assert_eq!(x[4..], [0.0, 0.0]);
    }

    #[test]
    fn linear_weights_are_recognized_by_name() {
        assert!(is_linear_weight("model.layers.3.self_attn.q_proj.weight"));
        assert!(is_linear_weight("model.layers.0.mlp.down_proj.weight"));
        assert!(!is_linear_weight("model.layers.0.mlp.down_proj.weight_scale"));
        assert!(!is_linear_weight("score.weight"));
        assert!(!is_linear_weight("model.embed_tokens.weight"));
        assert!(!is_linear_weight("model.layers.0.input_layernorm.weight"));
        assert_eq!(scale_name("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight_scale");
        let scheme = Fp8Scheme { ignore: vec!["score".into(), "model.layers.0.mlp.up_proj".into()] };
        assert!(!scheme.quantizes("model.layers.0.mlp.up_proj.weight"));
        assert!(scheme.quantizes("model.layers.1.mlp.up_proj.weight"));
    }

    fn parse(v: &Value) -> std::result::Result<Fp8Scheme, String> {
        parse_quantization_config(v, &|m| EngineError::InvalidInput(m)).map_err(|e| e.to_string())
    }

    #[test]
    fn compressed_tensors_own_fp8_dynamic_config_is_accepted() {
        // Written by compressed-tensors itself (tests/fixtures/check_fp8_config.py --write-reference).
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/fp8/compressed_tensors_fp8_dynamic.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(parse(&v).unwrap(), Fp8Scheme::default());
    }

    #[test]
    fn the_written_config_reads_back_and_other_schemes_are_refused_by_field() {
        let good = Fp8Scheme::default().to_config();
        assert_eq!(parse(&good).unwrap(), Fp8Scheme::default());
        let refused = |edit: &dyn Fn(&mut Value), needle: &str| {
            let mut v = good.clone();
            edit(&mut v);
            let e = parse(&v).unwrap_err();
            assert!(e.contains(needle), "expected {needle:?} in: {e}");
        };
        refused(&|v| v["quant_method"] = "gptq".into(), "quant_method \"gptq\"");
        refused(&|v| v["quant_method"] = "fp8".into(), "quant_method \"fp8\"");
        refused(
            &|v| {
                v["format"] = "int-quantized".into();
                v["config_groups"]["group_0"]["format"] = Value::Null;
            },
            "format \"int-quantized\"",
        );
        refused(&|v| v["config_groups"]["group_0"]["weights"]["strategy"] = "tensor".into(), "weights.strategy");
        refused(&|v| v["config_groups"]["group_0"]["weights"]["type"] = "int".into(), "weights.type");
        refused(&|v| v["config_groups"]["group_0"]["weights"]["num_bits"] = 4.into(), "weights.num_bits");
        refused(
            &|v| v["config_groups"]["group_0"]["weights"]["block_structure"] = serde_json::json!([128, 128]),
            "weights.block_structure",
        );
        refused(&|v| v["config_groups"]["group_0"]["input_activations"]["dynamic"] = false.into(), "dynamic");
        refused(&|v| v["config_groups"]["group_0"]["input_activations"] = Value::Null, "input_activations");
        refused(&|v| v["ignore"] = serde_json::json!(["lm_head"]), "must list \"score\"");
        refused(&|v| v["ignore"] = serde_json::json!(["re:.*score", "score"]), "regular expressions");
        refused(&|v| v["kv_cache_scheme"] = serde_json::json!({"num_bits": 8}), "kv_cache_scheme");
        refused(&|v| v["config_groups"]["group_1"] = v["config_groups"]["group_0"].clone(), "2 groups");
    }
}
