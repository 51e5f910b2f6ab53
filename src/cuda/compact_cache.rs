//! TCA's compacted decoding cache on the GPU (docs/algorithm.md §3), compactions
//! included.
//!
//! The rows live in two places: the global part in its own buffers `[Hkv, gcap, d]`
//! (bf16), starting as the prefill's S_G, and the window, which is a run `[lo, p]` of
//! the full cache `[Hkv, stride, d]` that the caller keeps anyway (every position's K
//! and V). Which positions are held is [`CacheIndex`]'s business, on the host, the same
//! bookkeeping as the CPU cache ([`crate::decode::KvCache`]). When a step makes the
//! window w + b long, [`DevCompactCache::compact`] scores its oldest b tokens by the
//! step's softmax, p_hj = exp(q_h . k_j / sqrt(d) - lse_h) in f64 from the bf16 q and k
//! and the decode kernel's log-sum-exp, pooled over each KV head's g query heads by
//! `gqa_reduce` ([`pool`]), keeps [`crate::decode::compaction_keep`] of them (copied
//! row by row into the global part) and moves the window past the block. One
//! synchronisation per compaction, every b steps.

use cudarc::driver::CudaSlice;

use super::decode::{SegCount, Segment};
use super::selection::DevSelection;
use super::{bf16_to_f32, Ctx, Gpu, GpuError, GpuResult};
use crate::config::GqaReduce;
use crate::decode::CacheIndex;
use crate::selection::importance::pool;

/// The global part on the device and the index of what the cache holds.
pub struct DevCompactCache {
    pub index: CacheIndex,
    pub gk: CudaSlice<u16>,
    pub gv: CudaSlice<u16>,
    /// |global part| per KV head (what the decode kernel reads).
    pub gcount: CudaSlice<i32>,
    pub gcap: usize,
    pub d: usize,
    /// Peak tokens held per KV head over the steps so far.
    pub peak: Vec<usize>,
}

impl DevCompactCache {
    /// The cache after a prefill: `index` says what it holds; `sel` (the prefill's
    /// selection, whose `gk`/`gv` rows follow `index.global`) fills the global part,
    /// `None` when nothing was selected (L <= w). Room for `new_tokens` more steps.
    pub fn new(
        gpu: &Gpu,
        index: CacheIndex,
        sel: Option<&DevSelection>,
        d: usize,
        new_tokens: usize,
    ) -> GpuResult<Self> {
        let hkv = index.global.len();
        let held = index.global.iter().map(Vec::len).max().unwrap_or(0);
        // Each compaction adds at most b rows and comes after b steps.
        let gcap = held + new_tokens + index.block;
        let mut gk = gpu.alloc::<u16>(hkv * gcap * d)?;
        let mut gv = gpu.alloc::<u16>(hkv * gcap * d)?;
        match sel {
            Some(sel) => {
                for (kv, g) in index.global.iter().enumerate() {
                    let n = g.len();
                    if n > sel.gcap {
                        return Err(GpuError::Invalid(format!(
                            "S_G of KV head {kv} has {n} rows, the selection room for {}",
                            sel.gcap
                        )));
                    }
                    if n == 0 {
                        continue;
                    }
                    let (src, dst) = (kv * sel.gcap * d, kv * gcap * d);
                    gpu.stream
                        .memcpy_dtod(
                            &sel.gk.slice(src..src + n * d),
                            &mut gk.slice_mut(dst..dst + n * d),
                        )
                        .ctx("copy S_G's keys into the decode cache")?;
                    gpu.stream
                        .memcpy_dtod(
                            &sel.gv.slice(src..src + n * d),
                            &mut gv.slice_mut(dst..dst + n * d),
                        )
                        .ctx("copy S_G's values into the decode cache")?;
                }
            }
            None if held > 0 => {
                return Err(GpuError::Invalid(
                    "a global part without the selection that holds its rows".into(),
                ))
            }
            None => {}
        }
        let counts: Vec<i32> = index.global.iter().map(|g| g.len() as i32).collect();
        Ok(DevCompactCache {
            gcount: gpu.upload(&counts)?,
            peak: vec![0; hkv],
            index,
            gk,
            gv,
            gcap,
            d,
        })
    }

    /// The two runs the decode kernel reads once position `p` is in the full cache
    /// `k`/`v` (`[Hkv, stride, d]`): the global part, then the window `[lo, p]`.
    pub fn segments<'a>(
        &'a mut self,
        k: &'a CudaSlice<u16>,
        v: &'a CudaSlice<u16>,
        stride: usize,
        p: usize,
    ) -> (Segment<'a>, Segment<'a>) {
        let (lo, d) = (self.index.lo, self.d);
        for (kv, pk) in self.peak.iter_mut().enumerate() {
            *pk = (*pk).max(self.index.global[kv].len() + p + 1 - lo);
        }
        (
            Segment {
                k: self.gk.slice(..),
                v: self.gv.slice(..),
                count: SegCount::Device(&self.gcount),
                stride: self.gcap,
            },
            Segment {
                k: k.slice(lo * d..),
                v: v.slice(lo * d..),
                count: SegCount::Fixed(p + 1 - lo),
                stride,
            },
        )
    }

    /// After the step at position `p` decoded over [`Self::segments`]: compacts if the
    /// window is w + b long. `q` is the step's query of every query head (`[Hq, d]`,
    /// bf16 bits, on the host), `lse` its log-sum-exp over the cache (`[Hq]`), `k`/`v`
    /// the full cache. Returns whether it compacted.
    #[allow(clippy::too_many_arguments)]
    pub fn after_step(
        &mut self,
        gpu: &Gpu,
        p: usize,
        q: &[u16],
        lse: &[f32],
        (k, v, stride): (&CudaSlice<u16>, &CudaSlice<u16>, usize),
        reduce: GqaReduce,
    ) -> GpuResult<bool> {
        if !self.index.due(p) {
            return Ok(false);
        }
        let (d, b, lo) = (self.d, self.index.block, self.index.lo);
        let hkv = self.index.global.len();
        let hq = lse.len();
        if hq == 0 || hq % hkv != 0 || q.len() != hq * d {
            return Err(GpuError::Invalid(format!(
                "compaction: {} query values and {hq} log-sum-exps for {hkv} KV heads of dim {d}",
                q.len()
            )));
        }
        if let Some(h) = lse.iter().position(|x| !x.is_finite()) {
            return Err(GpuError::Invalid(format!(
                "compaction at position {p}: non-finite log-sum-exp of query head {h}"
            )));
        }
        let g = hq / hkv;
        let scale = 1.0 / (d as f64).sqrt();
        let mut scores = Vec::with_capacity(hkv);
        for kv in 0..hkv {
            let at = (kv * stride + lo) * d;
            let kb: Vec<f64> = gpu
                .stream
                .clone_dtoh(&k.slice(at..at + b * d))
                .ctx("download the block's keys")?
                .iter()
                .map(|&x| bf16_to_f32(x) as f64)
                .collect();
            let probs = (kv * g..(kv + 1) * g).map(|h| {
                let qh: Vec<f64> = q[h * d..(h + 1) * d]
                    .iter()
                    .map(|&x| bf16_to_f32(x) as f64)
                    .collect();
                kb.chunks_exact(d)
                    .map(|kr| {
                        let s: f64 = kr.iter().zip(&qh).map(|(a, b)| a * b).sum();
                        (s * scale - lse[h] as f64).exp()
                    })
                    .collect::<Vec<f64>>()
            });
            scores.push(pool(probs, g, reduce));
        }
        let moved = self
            .index
            .compact(&scores)
            .map_err(|e| GpuError::Invalid(e.to_string()))?;
        for (kv, m) in moved.iter().enumerate() {
            let n0 = self.index.global[kv].len() - m.len();
            for (i, &pos) in m.iter().enumerate() {
                let src = (kv * stride + pos) * d;
                let dst = (kv * self.gcap + n0 + i) * d;
                if n0 + i >= self.gcap {
                    return Err(GpuError::Invalid(format!(
                        "the decode cache's global part is full ({} rows)",
                        self.gcap
                    )));
                }
                gpu.stream
                    .memcpy_dtod(&k.slice(src..src + d), &mut self.gk.slice_mut(dst..dst + d))
                    .ctx("move a compacted key")?;
                gpu.stream
                    .memcpy_dtod(&v.slice(src..src + d), &mut self.gv.slice_mut(dst..dst + d))
                    .ctx("move a compacted value")?;
            }
        }
        let counts: Vec<i32> = self.index.global.iter().map(|g| g.len() as i32).collect();
        gpu.stream
            .memcpy_htod(&counts, &mut self.gcount)
            .ctx("upload the global part's counts")?;
        Ok(true)
    }
}
