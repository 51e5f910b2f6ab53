//! Selection launchers: importance (logits + softmax statistics), redundancy, ranking and
//! budgets, per-block top-t with compaction into the global cache, and the copy of the
//! window into the decode cache.

use super::{cfg, Ctx, DevHeads, Gpu, GpuError, GpuResult};
use crate::selection::policies::BlockMarks;
use cudarc::driver::{CudaEvent, CudaSlice, PushKernelArg};

/// Keys per CTA of the logits kernel.
const KPC: usize = 128;

/// The selection knobs the kernels take (docs/algorithm.md §1), and the budget of each rank per KV
/// head, `table[kv * nb + r]` = t_r before clipping (from the head's configuration p,
/// computed on the host by the oracle's `Budget::block_budget`).
#[derive(Clone, Debug)]
pub struct SelectParams {
    pub window: usize,
    pub block: usize,
    pub alpha: f32,
    pub mass_norm_max: bool,
    pub reduce_max: bool,
    pub table: Vec<i32>,
}

impl SelectParams {
    /// nb = ceil((L - w) / b) candidate blocks (0 when L <= w).
    pub fn num_blocks(len: usize, window: usize, block: usize) -> usize {
        len.saturating_sub(window).div_ceil(block)
    }
}

/// Device buffers of one layer's selection, and the compacted decode cache: the global
/// part GK/GV/gpos [Hkv, gcap, D] and the window part WK/WV [Hkv, wcap, D].
pub struct DevSelection {
    pub nb: usize,
    pub lc: usize,
    pub gcap: usize,
    pub wcap: usize,
    pub window: usize,
    pub block: usize,
    pub alpha: f32,
    pub mass_norm_max: bool,
    pub reduce_max: bool,
    pub nchunk: usize,
    pub x: CudaSlice<f32>,
    pub part: CudaSlice<f32>,
    pub hstats: CudaSlice<f32>,
    pub s: CudaSlice<f32>,
    /// Block-relative importance u_j = s_j / 2^(block max) (what top-t compares).
    pub u: CudaSlice<f32>,
    pub mblk: CudaSlice<f32>,
    pub cblk: CudaSlice<f32>,
    pub table: CudaSlice<i32>,
    pub budget: CudaSlice<i32>,
    pub rank: CudaSlice<i32>,
    pub offs: CudaSlice<i32>,
    pub gcount: CudaSlice<i32>,
    pub gk: CudaSlice<u16>,
    pub gv: CudaSlice<u16>,
    pub gpos: CudaSlice<i32>,
    pub wk: CudaSlice<u16>,
    pub wv: CudaSlice<u16>,
}

impl DevSelection {
    /// Allocates for `heads`' shape. gcap = max over KV heads of sum_r table[r] (an upper
    /// bound on |S_G| that does not depend on the data).
    pub fn new(gpu: &Gpu, heads: &DevHeads, p: &SelectParams) -> GpuResult<Self> {
        let (hq, hkv, l, d) = (heads.hq, heads.hkv, heads.len, heads.dim);
        if l <= p.window {
            return Err(GpuError::Invalid(format!(
                "L = {l} <= w = {}: no global selection (attention is exact)",
                p.window
            )));
        }
        let nb = SelectParams::num_blocks(l, p.window, p.block);
        if p.table.len() != hkv * nb {
            return Err(GpuError::Invalid(format!(
                "budget table has {} entries, expected Hkv * nb = {}",
                p.table.len(),
                hkv * nb
            )));
        }
        if p.block > 1024 || nb > 6000 {
            return Err(GpuError::Invalid("block size > 1024 or nb > 6000".into()));
        }
        let lc = l - p.window;
        let gcap = (0..hkv)
            .map(|kv| {
                p.table[kv * nb..(kv + 1) * nb]
                    .iter()
                    .map(|&t| t as usize)
                    .sum::<usize>()
            })
            .max()
            .unwrap_or(0)
            .clamp(1, lc);
        let wcap = p.window + p.block;
        let nchunk = l.div_ceil(KPC);
        Ok(DevSelection {
            nb,
            lc,
            gcap,
            wcap,
            window: p.window,
            block: p.block,
            alpha: p.alpha,
            mass_norm_max: p.mass_norm_max,
            reduce_max: p.reduce_max,
            nchunk,
            x: gpu.alloc(hq * l)?,
            part: gpu.alloc(hq * nchunk * 2)?,
            hstats: gpu.alloc(hq * 2)?,
            s: gpu.alloc(hkv * lc)?,
            u: gpu.alloc(hkv * lc)?,
            mblk: gpu.alloc(hkv * nb)?,
            cblk: gpu.alloc(hkv * nb)?,
            table: gpu.upload(&p.table)?,
            budget: gpu.alloc(hkv * nb)?,
            rank: gpu.alloc(hkv * nb)?,
            offs: gpu.alloc(hkv * nb)?,
            gcount: gpu.alloc(hkv)?,
            gk: gpu.alloc(hkv * gcap * d)?,
            gv: gpu.alloc(hkv * gcap * d)?,
            gpos: gpu.alloc(hkv * gcap)?,
            wk: gpu.alloc(hkv * wcap * d)?,
            wv: gpu.alloc(hkv * wcap * d)?,
        })
    }

    /// Bytes the compacted cache holds for the given |S_G| per KV head (global + window,
    /// K and V, bf16).
    pub fn cache_bytes(&self, counts: &[i32], dim: usize) -> usize {
        counts
            .iter()
            .map(|&n| (n as usize + self.window) * dim * 2 * 2)
            .sum()
    }
}

/// Runs the selection. When `ev` is given, events are recorded before importance and
/// after importance, redundancy, ranking and selection (5 events).
pub fn run_select(
    gpu: &Gpu,
    h: &DevHeads,
    sel: &mut DevSelection,
    ev: Option<&[CudaEvent]>,
) -> GpuResult<()> {
    let st = &gpu.stream;
    let rec = |i: usize| -> GpuResult<()> {
        if let Some(e) = ev {
            e[i].record(st).ctx("cuEventRecord")?;
        }
        Ok(())
    };
    let (l, d, g, hkv) = (h.len as i32, h.dim, h.group(), h.hkv);
    let sl2 = h.scale_log2();
    rec(0)?;
    // Importance: logits and per-chunk statistics, then per-head statistics.
    let (name, chunks) = super::shape::logits_kernel(d, g)?;
    let f = gpu.func(&name)?;
    let kpc = KPC as i32;
    let (hkv_i, g_i) = (hkv as i32, g as i32);
    unsafe {
        st.launch_builder(&f)
            .arg(&h.q)
            .arg(&h.k)
            .arg(&mut sel.x)
            .arg(&mut sel.part)
            .arg(&l)
            .arg(&hkv_i)
            .arg(&kpc)
            .arg(&sl2)
            .arg(&g_i)
            .launch(cfg(
                (sel.nchunk as u32, hkv as u32, chunks.chunks as u32),
                128,
                0,
            ))
    }
    .ctx("tca_logits")?;
    let f = gpu.func("tca_softmax_stats")?;
    let nchunk = sel.nchunk as i32;
    unsafe {
        st.launch_builder(&f)
            .arg(&sel.part)
            .arg(&mut sel.hstats)
            .arg(&nchunk)
            .launch(cfg((h.hq as u32, 1, 1), 32, 0))
    }
    .ctx("tca_softmax_stats")?;
    rec(1)?;
    // Redundancy.
    let bt = (sel.block.div_ceil(32) * 32) as u32;
    let (lc, b, gi, rmax) = (
        sel.lc as i32,
        sel.block as i32,
        g as i32,
        sel.reduce_max as i32,
    );
    let f = gpu.func("tca_redundancy")?;
    unsafe {
        st.launch_builder(&f)
            .arg(&sel.x)
            .arg(&sel.hstats)
            .arg(&mut sel.s)
            .arg(&mut sel.u)
            .arg(&mut sel.mblk)
            .arg(&mut sel.cblk)
            .arg(&l)
            .arg(&lc)
            .arg(&b)
            .arg(&gi)
            .arg(&rmax)
            .launch(cfg((sel.nb as u32, hkv as u32, 1), bt, 0))
    }
    .ctx("tca_redundancy")?;
    rec(2)?;
    // Ranking, budgets, offsets.
    let f = gpu.func("tca_rank_budget")?;
    let (nb, alpha, mnm) = (sel.nb as i32, sel.alpha, sel.mass_norm_max as i32);
    unsafe {
        st.launch_builder(&f)
            .arg(&sel.mblk)
            .arg(&sel.cblk)
            .arg(&sel.table)
            .arg(&mut sel.budget)
            .arg(&mut sel.rank)
            .arg(&mut sel.offs)
            .arg(&mut sel.gcount)
            .arg(&nb)
            .arg(&lc)
            .arg(&b)
            .arg(&alpha)
            .arg(&mnm)
            .launch(cfg((hkv as u32, 1, 1), 1024, (sel.nb * 8) as u32))
    }
    .ctx("tca_rank_budget")?;
    rec(3)?;
    run_compact(gpu, h, sel)?;
    rec(4)?;
    Ok(())
}

/// The last stage of [`run_select`]: per block the `budget` tokens of largest `u`
/// (`tca_select_compact`) into GK/GV/gpos at `offs`, then the window into WK/WV.
pub fn run_compact(gpu: &Gpu, h: &DevHeads, sel: &mut DevSelection) -> GpuResult<()> {
    let st = &gpu.stream;
    let (l, d) = (h.len as i32, h.dim);
    let bt = (sel.block.div_ceil(32) * 32) as u32;
    let (lc, b) = (sel.lc as i32, sel.block as i32);
    let hkv = h.hkv;
    let f = gpu.func("tca_select_compact")?;
    let (gcap, di) = (sel.gcap as i32, d as i32);
    unsafe {
        st.launch_builder(&f)
            .arg(&sel.u)
            .arg(&sel.budget)
            .arg(&sel.offs)
            .arg(&h.k)
            .arg(&h.v)
            .arg(&mut sel.gk)
            .arg(&mut sel.gv)
            .arg(&mut sel.gpos)
            .arg(&gcap)
            .arg(&l)
            .arg(&lc)
            .arg(&b)
            .arg(&di)
            .launch(cfg((sel.nb as u32, hkv as u32, 1), bt, 0))
    }
    .ctx("tca_select_compact")?;
    let f = gpu.func("tca_copy_rows")?;
    let (row0, n, wcap) = (lc, sel.window as i32, sel.wcap as i32);
    let chunks = sel.window * d / 8;
    unsafe {
        st.launch_builder(&f)
            .arg(&h.k)
            .arg(&h.v)
            .arg(&mut sel.wk)
            .arg(&mut sel.wv)
            .arg(&l)
            .arg(&row0)
            .arg(&n)
            .arg(&wcap)
            .arg(&di)
            .launch(cfg((chunks.div_ceil(256) as u32, hkv as u32, 1), 256, 0))
    }
    .ctx("tca_copy_rows")?;
    Ok(())
}

/// A selection whose S_G per KV head is a key set chosen on the host (`marks[kv]`, see
/// [`BlockMarks`]): u = the 0/1 marks, per-block budgets = the marked counts, offsets
/// and |S_G| from them, then [`run_compact`] fills the compacted cache with the existing
/// kernels (the top-t of a 0/1 block with t ones is its ones, in ascending order).
/// `importance` [Hkv, L - w] is stored as the selection's s (what
/// [`download_selection`] reports); ranks stay 0.
pub fn select_key_sets(
    gpu: &Gpu,
    h: &DevHeads,
    window: usize,
    block: usize,
    marks: &[BlockMarks],
    importance: &[f32],
) -> GpuResult<DevSelection> {
    let lc = h.len.saturating_sub(window);
    let nb = SelectParams::num_blocks(h.len, window, block);
    if marks.len() != h.hkv
        || importance.len() != h.hkv * lc
        || marks
            .iter()
            .any(|m| m.scores.len() != lc || m.counts.len() != nb || m.offsets.len() != nb)
    {
        return Err(GpuError::Invalid(format!(
            "key sets for {} KV heads over {} positions in {} blocks; expected {}, {lc}, {nb}",
            marks.len(),
            marks.first().map_or(0, |m| m.scores.len()),
            marks.first().map_or(0, |m| m.counts.len()),
            h.hkv
        )));
    }
    let p = SelectParams {
        window,
        block,
        alpha: 0.0,
        mass_norm_max: false,
        reduce_max: false,
        table: marks
            .iter()
            .flat_map(|m| m.counts.iter().copied())
            .collect(),
    };
    let mut sel = DevSelection::new(gpu, h, &p)?;
    let flat = |f: fn(&BlockMarks) -> &[i32]| -> Vec<i32> {
        marks.iter().flat_map(|m| f(m).iter().copied()).collect()
    };
    let scores: Vec<f32> = marks
        .iter()
        .flat_map(|m| m.scores.iter().copied())
        .collect();
    let counts: Vec<i32> = marks.iter().map(|m| m.counts.iter().sum()).collect();
    sel.u = gpu.upload(&scores)?;
    sel.s = gpu.upload(importance)?;
    sel.budget = gpu.upload(&flat(|m| &m.counts))?;
    sel.offs = gpu.upload(&flat(|m| &m.offsets))?;
    sel.gcount = gpu.upload(&counts)?;
    run_compact(gpu, h, &mut sel)?;
    Ok(sel)
}

/// What the selection produced, on the host.
#[derive(Clone, Debug)]
pub struct HostSelection {
    /// S_G per KV head, ascending positions.
    pub global: Vec<Vec<usize>>,
    /// Importance s over [0, L - w) per KV head.
    pub importance: Vec<Vec<f32>>,
    /// Block budgets (clipped) and ranks per KV head.
    pub budgets: Vec<Vec<i32>>,
    pub ranks: Vec<Vec<i32>>,
    pub counts: Vec<i32>,
}

/// Copies the selection back to the host.
pub fn download_selection(gpu: &Gpu, h: &DevHeads, sel: &DevSelection) -> GpuResult<HostSelection> {
    let counts = gpu.download(&sel.gcount)?;
    let gpos = gpu.download(&sel.gpos)?;
    let s = gpu.download(&sel.s)?;
    let bud = gpu.download(&sel.budget)?;
    let rank = gpu.download(&sel.rank)?;
    let mut out = HostSelection {
        global: vec![],
        importance: vec![],
        budgets: vec![],
        ranks: vec![],
        counts: counts.clone(),
    };
    for kv in 0..h.hkv {
        let n = counts[kv] as usize;
        if n > sel.gcap {
            return Err(GpuError::Invalid(format!(
                "|S_G| = {n} exceeds the capacity {}",
                sel.gcap
            )));
        }
        out.global.push(
            gpos[kv * sel.gcap..kv * sel.gcap + n]
                .iter()
                .map(|&p| p as usize)
                .collect(),
        );
        out.importance
            .push(s[kv * sel.lc..(kv + 1) * sel.lc].to_vec());
        out.budgets
            .push(bud[kv * sel.nb..(kv + 1) * sel.nb].to_vec());
        out.ranks
            .push(rank[kv * sel.nb..(kv + 1) * sel.nb].to_vec());
    }
    Ok(out)
}
