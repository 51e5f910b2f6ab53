//! Dequantisation of ggml tensor data to f32: F32, F16, Q8_0 and Q4_1.
//!
//! The block formats and their dequantisation formulas come from the `ggml-quants`
//! crate (`Q8_0`, `Q4_1`, with `half::f16` scales); this module only builds those
//! blocks from raw little-endian bytes (safely: no pointer casts, so no alignment
//! requirement on the file buffer) and runs them in parallel with rayon.
//!
//! - Q8_0 block, 34 bytes for 32 values: f16 scale `d`, then 32 `i8`; x = d * q.
//! - Q4_1 block, 20 bytes for 32 values: f16 scale `d`, f16 minimum `m`, then 16 bytes;
//!   byte j holds value j in its low nibble and value j + 16 in its high nibble;
//!   x = d * q + m.

use ggml_quants::{f16, DeltaMin, Quantize, Q4_1, Q8_0};
use rayon::prelude::*;

use super::gguf::GgmlType;

/// Bytes of one Q8_0 block.
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Bytes of one Q4_1 block.
pub const Q4_1_BLOCK_BYTES: usize = 20;
/// Values per Q8_0 / Q4_1 block.
pub const QK: usize = 32;

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

/// Dequantise one Q8_0 block.
pub fn dequantize_q8_0_block(b: &[u8; Q8_0_BLOCK_BYTES]) -> [f32; QK] {
    let mut quants = [0i8; QK];
    for (q, &x) in quants.iter_mut().zip(&b[2..]) {
        *q = x as i8;
    }
    let blk = Q8_0 {
        delta: f16_at(b, 0),
        quants,
    };
    blk.dequantize()
}

/// Dequantise one Q4_1 block.
pub fn dequantize_q4_1_block(b: &[u8; Q4_1_BLOCK_BYTES]) -> [f32; QK] {
    let mut quants = [0u8; QK / 2];
    quants.copy_from_slice(&b[4..]);
    let blk = Q4_1 {
        delta_min: DeltaMin {
            delta: f16_at(b, 0),
            min: f16_at(b, 2),
        },
        quants,
    };
    blk.dequantize()
}

fn blocks<const B: usize>(
    bytes: &[u8],
    n: usize,
    f: impl Fn(&[u8; B]) -> [f32; QK] + Sync,
) -> Result<Vec<f32>, String> {
    if n % QK != 0 || bytes.len() != n / QK * B {
        return Err(format!(
            "{} bytes do not hold {n} values in blocks of {QK} ({B} bytes each)",
            bytes.len()
        ));
    }
    let mut out = vec![0f32; n];
    out.par_chunks_mut(QK * 256)
        .zip(bytes.par_chunks(B * 256))
        .for_each(|(o, b)| {
            for (o, b) in o.chunks_exact_mut(QK).zip(b.chunks_exact(B)) {
                // chunks_exact(B) yields slices of length B exactly.
                let arr: &[u8; B] = b.try_into().unwrap_or(&[0u8; B]);
                o.copy_from_slice(&f(arr));
            }
        });
    Ok(out)
}

/// Dequantise `n` values of type `ty` from `bytes`. Errors on a type other than F32,
/// F16, Q8_0 or Q4_1, or on a byte count that does not match `n`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    match ty {
        GgmlType::F32 => {
            if bytes.len() != n * 4 {
                return Err(format!("{} bytes do not hold {n} f32", bytes.len()));
            }
            Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        }
        GgmlType::F16 => {
            if bytes.len() != n * 2 {
                return Err(format!("{} bytes do not hold {n} f16", bytes.len()));
            }
            Ok(bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect())
        }
        GgmlType::Q8_0 => blocks::<Q8_0_BLOCK_BYTES>(bytes, n, dequantize_q8_0_block),
        GgmlType::Q4_1 => blocks::<Q4_1_BLOCK_BYTES>(bytes, n, dequantize_q4_1_block),
        other => Err(format!(
            "ggml type {other:?} is not supported (supported: F32, F16, Q8_0, Q4_1)"
        )),
    }
}
