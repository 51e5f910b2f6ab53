//! The attention shapes the GPU path serves, and how a GQA group is laid out on the
//! kernels. Pure host logic (no device): tested on the CPU.
//!
//! Head dimension d in [`DIMS`] (the prefill, selection and decode kernels are
//! instantiated per d; d = 96 is 6 x 16 for the mma tiles and 12 elements per lane in
//! the row-per-lanes kernels). Group g = Hq / Hkv in [`GROUPS`] (1..=16): the prefill
//! kernels take g at run time; the logits and decode kernels hold the query vectors of C
//! heads in registers, with one instantiation per C in 1..=[`MAX_HEADS_PER_CTA`], and a
//! group is cut into `ceil(g / C)` chunks of C heads, one CTA per chunk (grid.z).

use super::{GpuError, GpuResult};

/// Group sizes g = Hq / Hkv the GPU path serves.
pub const GROUPS: &[usize] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
/// Head dimensions with compiled instantiations.
pub const DIMS: &[usize] = &[64, 96, 128];
/// Largest number of query heads one logits or decode CTA serves (its registers hold
/// C x E query elements and C x E accumulators, E = 8 or 12 per lane).
pub const MAX_HEADS_PER_CTA: usize = 8;

/// Checks that (d, Hq, Hkv) has kernels: d in [`DIMS`], Hkv >= 1, Hkv divides Hq and
/// g = Hq / Hkv in [`GROUPS`]. The error names the shape and what is supported.
pub fn check(dim: usize, hq: usize, hkv: usize) -> GpuResult<()> {
    let ok_dim = DIMS.contains(&dim);
    let ok_group = hkv > 0 && hq % hkv == 0 && GROUPS.contains(&(hq / hkv));
    if ok_dim && ok_group {
        return Ok(());
    }
    Err(GpuError::Invalid(format!(
        "unsupported attention shape: head dim d = {dim} (supported: {DIMS:?}), \
         Hq = {hq} query heads over Hkv = {hkv} KV heads (need Hkv > 0, Hkv dividing Hq \
         and g = Hq / Hkv in 1..={})",
        GROUPS[GROUPS.len() - 1]
    )))
}

/// How the g query heads of a KV head are split over the logits and decode CTAs: C
/// heads per CTA and the number of chunks, ceil(g / C). C = g when g <= 8 (each KV row
/// read once), else C = ceil(g / 2) (two chunks; the last is masked when g is odd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadChunks {
    pub per_cta: usize,
    pub chunks: usize,
}

impl HeadChunks {
    pub fn for_group(g: usize) -> GpuResult<Self> {
        if !GROUPS.contains(&g) {
            return Err(GpuError::Invalid(format!(
                "group g = {g} outside 1..={}",
                GROUPS[GROUPS.len() - 1]
            )));
        }
        let chunks = g.div_ceil(MAX_HEADS_PER_CTA);
        let per_cta = g.div_ceil(chunks);
        Ok(HeadChunks { per_cta, chunks })
    }
}

/// The decode kernel for head dim d and group g: its name and the chunking.
pub fn decode_kernel(dim: usize, g: usize) -> GpuResult<(String, HeadChunks)> {
    let c = chunks_for(dim, g)?;
    Ok((format!("tca_decode_d{dim}_c{}", c.per_cta), c))
}

/// The logits (selection importance) kernel for head dim d and group g.
pub fn logits_kernel(dim: usize, g: usize) -> GpuResult<(String, HeadChunks)> {
    let c = chunks_for(dim, g)?;
    Ok((format!("tca_logits_d{dim}_c{}", c.per_cta), c))
}

fn chunks_for(dim: usize, g: usize) -> GpuResult<HeadChunks> {
    check(dim, g, 1)?;
    HeadChunks::for_group(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_paper_shape_is_accepted_and_others_refused() {
        for &d in &[64, 96, 128] {
            for g in 1..=16 {
                for hkv in [1, 2, 4, 8] {
                    assert!(check(d, g * hkv, hkv).is_ok(), "d {d} g {g} hkv {hkv}");
                }
            }
        }
        // Qwen2.5-7B: 28 query heads over 4 KV heads, d 128.
        assert!(check(128, 28, 4).is_ok());
        let refused = [
            (32, 8, 8),
            (80, 8, 8),
            (256, 8, 8),
            (64, 17, 1),
            (64, 34, 2),
            (64, 6, 4),
            (64, 8, 0),
            (64, 0, 0),
        ];
        for (d, hq, hkv) in refused {
            let e = check(d, hq, hkv).unwrap_err().to_string();
            assert!(e.contains("unsupported attention shape"), "{e}");
            assert!(e.contains(&format!("d = {d}")), "{e}");
        }
    }

    #[test]
    fn chunks_cover_the_group_with_at_most_eight_heads_per_cta() {
        for g in 1..=16 {
            let c = HeadChunks::for_group(g).unwrap();
            assert!(c.per_cta >= 1 && c.per_cta <= MAX_HEADS_PER_CTA);
            // Every head is in exactly one chunk and no chunk is empty.
            assert!(c.per_cta * c.chunks >= g && c.per_cta * (c.chunks - 1) < g);
            if g <= 8 {
                assert_eq!(
                    c,
                    HeadChunks {
                        per_cta: g,
                        chunks: 1
                    }
                );
            } else {
                assert_eq!(c.chunks, 2);
            }
        }
        assert!(HeadChunks::for_group(0).is_err());
        assert!(HeadChunks::for_group(17).is_err());
    }

    #[test]
    fn kernel_names_exist_in_the_sources() {
        let dec = include_str!("../../kernels/decode.cu");
        let sel = include_str!("../../kernels/selection.cu");
        for &d in DIMS {
            // The macro lines that instantiate every C for this d.
            assert!(dec.contains(&format!("DECODE_ALL_C({d})")), "decode d {d}");
            assert!(sel.contains(&format!("LOGITS_ALL_C({d})")), "logits d {d}");
            for g in 1..=16 {
                let (n, c) = decode_kernel(d, g).unwrap();
                assert_eq!(n, format!("tca_decode_d{d}_c{}", c.per_cta));
                let (n, _) = logits_kernel(d, g).unwrap();
                assert_eq!(n, format!("tca_logits_d{d}_c{}", c.per_cta));
            }
        }
        for c in 1..=MAX_HEADS_PER_CTA {
            assert!(dec.contains(&format!("DECODE(D, {c})")), "decode C {c}");
            assert!(sel.contains(&format!("LOGITS(D, {c})")), "logits C {c}");
        }
        assert!(decode_kernel(80, 4).is_err());
        assert!(logits_kernel(64, 17).is_err());
    }
}
