//! Dequantisation to f32, as ggml defines each block (ggml-quants.c's
//! `dequantize_row_*`; llama.cpp's `gguf.quants` writes the same in numpy):
//! - Q8_0: 32 values; an f16 scale d, then 32 i8 q: x = q·d.
//! - Q4_0: 32 values; f16 d, then 16 bytes whose low nibbles are values 0..16 and high
//!   nibbles values 16..32: x = (q − 8)·d.
//! - Q4_1: 32 values; f16 d, f16 m, then 16 bytes as Q4_0: x = q·d + m.
//! - F16, BF16 widened exactly; F32 as is.
//!
//! Each product and sum is one f32 operation, rounded, in the order above, without fused
//! multiply-adds: the same bits as the reference's numpy (checked by the tests).

use half::{bf16, f16};

use crate::GgmlType;

/// `count` values of type `kind` from `bytes` (which must hold exactly their blocks).
/// Errors say why in words: a type that is not dequantised, or a byte count that does
/// not match.
pub fn dequantize(kind: GgmlType, bytes: &[u8], count: usize) -> Result<Vec<f32>, String> {
    if !kind.dequantised() {
        return Err(format!(
            "type {kind:?} (ggml id {}) is not dequantised here (F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are)",
            kind.id()
        ));
    }
    let (block, block_bytes) = kind.block();
    let (block, block_bytes) = (block as usize, block_bytes as usize);
    if !count.is_multiple_of(block) || bytes.len() != count / block * block_bytes {
        return Err(format!(
            "{} bytes do not hold {count} values of type {kind:?}",
            bytes.len()
        ));
    }
    let mut out = Vec::with_capacity(count);
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    for b in bytes.chunks_exact(block_bytes) {
        match kind {
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(f16_at(b, 0)),
            GgmlType::BF16 => out.push(bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            GgmlType::Q8_0 => {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
            GgmlType::Q4_0 => {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| f32::from(i16::from(q & 0x0f) - 8) * d));
                out.extend(qs.iter().map(|&q| f32::from(i16::from(q >> 4) - 8) * d));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
            // Refused above by `dequantised()`; answered the same way if reached.
            other => return Err(format!("type {other:?} is not dequantised here")),
        }
    }
    Ok(out)
}
