//! Element types the kernels accept, and conversions between them and f32.

use half::{bf16, f16};
use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// All dtypes, in the order tests and benches iterate them.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Suffix of the kernel names instantiated for this dtype (`layernorm_fwd_f16`, ...).
    pub const fn kernel_suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Unit roundoff u = 2^-(p) of the format (p = significand bits incl. the implicit one, minus 1):
    /// round-to-nearest puts any finite value within a relative u of its stored value.
    pub const fn unit_roundoff(self) -> f64 {
        match self {
            DType::F32 => 5.960_464_477_539_063e-8, // 2^-24
            DType::F16 => 4.882_812_5e-4,           // 2^-11
            DType::BF16 => 3.906_25e-3,             // 2^-8
        }
    }

    /// Largest finite value of the format; results beyond it are stored as ±inf.
    pub const fn max_finite(self) -> f64 {
        match self {
            DType::F32 => f32::MAX as f64,
            DType::F16 => 65504.0,
            DType::BF16 => 3.389_531_389_251_535e38,
        }
    }

    /// Rounds an f32 to this dtype and back, as storing it in a tensor of this dtype would.
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => f16::from_f32(v).to_f32(),
            DType::BF16 => bf16::from_f32(v).to_f32(),
        }
    }

    /// Parses `f32`, `f16`/`fp16`/`half`, `bf16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Some(DType::F32),
            "f16" | "fp16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_suffix())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::parse(s).ok_or_else(|| format!("unknown dtype `{s}` (expected f32, f16 or bf16)"))
    }
}

/// Encodes f32 values into the little-endian bytes of `dtype`.
pub fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size_bytes());
    match dtype {
        DType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
    }
    out
}

/// Decodes little-endian bytes of `dtype` into f32 values.
pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trips_values_representable_in_each_dtype() {
        let vals = [0.0f32, 1.0, -2.5, 0.125, 1024.0, -0.75];
        for dt in DType::ALL {
            assert_eq!(decode(dt, &encode(dt, &vals)), vals.to_vec(), "{dt}");
        }
    }

    #[test]
    fn rounding_error_is_within_unit_roundoff() {
        for dt in DType::ALL {
            for i in 1..1000 {
                let v = (i as f32) * 0.013_7 + 0.1;
                let r = dt.round(v);
                assert!(
                    ((r - v) as f64).abs() <= dt.unit_roundoff() * (v as f64).abs(),
                    "{dt} {v} -> {r}"
                );
            }
        }
    }
}
