//! Greedy generation on the GPU: the prefill of [`GpuModel`] (exact or TCA), then one
//! token at a time with a KV cache per layer.
//!
//! Each layer keeps every position's K and V (`[Hkv, L + new, d]`, bf16). Decoding reads
//! either that full cache ([`DecodeCache::Full`]: exact decoding, also TCA's
//! "prefill then full decode" mode), or TCA's compacted cache
//! ([`DecodeCache::Compact`], docs/algorithm.md §3): S_G (the compacted rows of the
//! prefill selection) followed by the window, the positions L - w .. p of the full cache.
//! The full cache is also the compacted cache's shadow: with `shadow`, each compact step
//! also decodes over it, and the eviction regret of each layer and query head, the new query's softmax mass on the
//! keys the compacted cache dropped, is 1 - exp(lse_compact - lse_full)
//! ([`crate::bound::layers::regret`]).
//!
//! The compacted cache compacts as the CPU's does ([`DevCompactCache`]): once the window
//! holds w + b tokens, the top floor(E_p[k]) of its oldest b (by the step's softmax,
//! pooled over the group) join the global part, the rest leave the cache.

use cudarc::driver::CudaSlice;

use super::super::compact_cache::DevCompactCache;
use super::super::decode::{run_segments, DevDecode, SegCount, Segment};
use super::super::prefill::DevAttention;
use super::super::selection::{download_selection, DevSelection};
use super::super::{Ctx, DevHeads, GpuError, GpuResult};
use super::forward::{keep_fraction, ForwardStats, GpuAttn, GpuModel, LayerKeep, LayerKv};
use super::glue::{self, KvRows};
use crate::bound::layers::regret;
use crate::config::GqaReduce;
use crate::decode::CacheIndex;

/// Which cache decoding reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeCache {
    /// Every position (exact decoding).
    Full,
    /// TCA's S_G and window (exact attention at L <= w, where nothing is selected);
    /// with `shadow`, each step also decodes over the full cache for the eviction regret
    /// (a second pass and a host round trip per layer: off when timing).
    Compact { shadow: bool },
}

/// The outcome of [`GpuModel::generate`].
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// The greedy tokens (ending at `eos` if it came).
    pub tokens: Vec<u32>,
    /// TCA's prefill selection per layer.
    pub stats: ForwardStats,
    /// Compact decoding: per decode step, per layer, per query head, the eviction
    /// regret (empty otherwise, and at layers without a selection).
    pub regret: Vec<Vec<Vec<f64>>>,
    /// Compact decoding: compactions of each layer's cache (every layer compacts at
    /// the same steps), and the tokens each layer's KV heads hold at the end.
    pub compactions: usize,
    pub cache_tokens: Vec<Vec<usize>>,
    /// Seconds of the prefill (to the first token on the host) and of the decode steps.
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// The output head's buffers for one row.
struct Head {
    logits: CudaSlice<f32>,
    target: CudaSlice<u32>,
    nll: CudaSlice<f64>,
    arg: CudaSlice<u32>,
}

/// One-row buffers of a decode step.
struct Step {
    tok: CudaSlice<u32>,
    x: CudaSlice<f32>,
    xn: CudaSlice<u16>,
    qkv: CudaSlice<f32>,
    q: CudaSlice<u16>,
    merged: CudaSlice<u16>,
    gu: CudaSlice<f32>,
    act: CudaSlice<u16>,
    head: Head,
    /// The shape of one query per head (Hq, Hkv, 1, d) for the decode launcher.
    shape: DevHeads,
    dec: DevDecode,
    shadow: DevDecode,
}

impl GpuModel {
    /// Greedy decoding of up to `max_new` tokens after `prompt` (stopping after `eos`),
    /// with the attention `attn` in the prefill and the cache `cache` in decoding.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        attn: GpuAttn,
        cache: DecodeCache,
        eos: Option<u32>,
    ) -> GpuResult<Generation> {
        let c = self.config().clone();
        let g = &self.gpu;
        let (l, hid, d, hq, hkv) = (prompt.len(), c.hidden, c.head_dim, c.n_heads, c.n_kv_heads);
        if max_new == 0 {
            return Err(GpuError::Invalid("max_new must be at least 1".into()));
        }
        let tca = attn.sparse();
        if let (DecodeCache::Compact { .. }, Some(rule)) =
            (cache, attn.peer().and_then(|p| p.rows()))
        {
            return Err(GpuError::Invalid(format!(
                "{rule:?} chooses keys per query and has no compacted cache: it decodes with the full cache (as on the CPU)"
            )));
        }
        let t0 = std::time::Instant::now();
        let cap = l + max_new;
        let mut w = self.work(prompt, attn, false, max_new)?;
        let mut caches = (0..c.n_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: g.alloc(hkv * cap * d)?,
                    v: g.alloc(hkv * cap * d)?,
                    cap,
                })
            })
            .collect::<GpuResult<Vec<_>>>()?;
        let mut out = Generation::default();
        {
            let mut inspect = |li: usize,
                               h: &DevHeads,
                               sel: Option<&DevSelection>,
                               _: &DevAttention|
             -> GpuResult<()> {
                if let (Some(sel), Some((cfg, _))) = (sel, tca) {
                    let hs = download_selection(g, h, sel)?;
                    out.stats.keep.push(LayerKeep {
                        layer: li,
                        keep_fraction: keep_fraction(&hs.global, cfg.window, h.len),
                        global: hs.global,
                        oracle_diff: None,
                        key_set_diff: None,
                    });
                }
                Ok(())
            };
            let inspect: Option<super::forward::Inspect<'_>> = if tca.is_some() {
                Some(&mut inspect)
            } else {
                None
            };
            self.layers(&mut w, c.n_layers - 1, inspect, Some(&mut caches))?;
        }
        // The compacted caches, per layer, from the prefill's S_G (empty where L <= w);
        // they exist only with a sparse attention's configuration.
        let reduce = tca.map_or(GqaReduce::Mean, |(cfg, _)| cfg.gqa_reduce);
        let mut compact: Vec<Option<DevCompactCache>> = Vec::new();
        if let (DecodeCache::Compact { .. }, Some((cfg, profile))) = (cache, tca) {
            for li in 0..c.n_layers {
                let global = match out.stats.keep.iter().find(|k| k.layer == li) {
                    Some(k) => k.global.clone(),
                    None => vec![Vec::new(); hkv],
                };
                let keep = profile
                    .budgets(li)
                    .map_err(|e| GpuError::Invalid(e.to_string()))?
                    .iter()
                    .map(|b| b.decode_budget())
                    .collect();
                let index = CacheIndex::new(global, l, cfg, keep)
                    .map_err(|e| GpuError::Invalid(e.to_string()))?;
                let sel = w.sels[li].as_ref();
                compact.push(Some(DevCompactCache::new(g, index, sel, d, max_new)?));
            }
        }
        let mut st = Step {
            tok: g.alloc(1)?,
            x: g.alloc(hid)?,
            xn: g.alloc(hid)?,
            qkv: g.alloc((hq + 2 * hkv) * d)?,
            q: g.alloc(hq * d)?,
            merged: g.alloc(hq * d)?,
            gu: g.alloc(2 * c.ffn)?,
            act: g.alloc(c.ffn)?,
            head: Head {
                logits: g.alloc(c.vocab)?,
                target: g.alloc(1)?,
                nll: g.alloc(1)?,
                arg: g.alloc(1)?,
            },
            shape: DevHeads {
                q: g.alloc(1)?,
                k: g.alloc(1)?,
                v: g.alloc(1)?,
                hq,
                hkv,
                len: 1,
                dim: d,
            },
            dec: DevDecode::new(g, &w.heads, cap)?,
            shadow: DevDecode::new(g, &w.heads, cap)?,
        };
        // The last prompt row's normed hidden state gives the first token.
        glue::rmsnorm(
            g,
            &w.x,
            &self.weights.out_norm,
            &mut w.xn,
            (l, hid),
            c.rms_eps,
        )?;
        let last = w.xn.slice((l - 1) * hid..l * hid);
        let mut next = self.head_argmax(&last, &mut st.head)?;
        self.check_finite(&w)?;
        out.prefill_s = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        for s in 0..max_new {
            out.tokens.push(next);
            if Some(next) == eos || s + 1 == max_new {
                break;
            }
            if next as usize >= c.vocab {
                return Err(GpuError::Invalid(format!(
                    "token {next} outside the vocabulary"
                )));
            }
            let p = l + s;
            g.stream
                .memcpy_htod(&[next], &mut st.tok)
                .ctx("upload the token")?;
            glue::embed(g, &self.weights.embed, &st.tok, &mut st.x, hid)?;
            let mut step_regret = Vec::new();
            for (li, kv) in caches.iter_mut().enumerate() {
                let lw = &self.weights.layers[li];
                glue::rmsnorm(g, &st.x, &lw.attn_norm, &mut st.xn, (1, hid), c.rms_eps)?;
                self.blas.linear(
                    &st.xn,
                    &lw.wqkv,
                    &mut st.qkv,
                    (1, (hq + 2 * hkv) * d, hid),
                    0.0,
                    "Q|K|V",
                )?;
                glue::rope_split(
                    g,
                    &st.qkv,
                    &w.cos,
                    &w.sin,
                    &mut st.q,
                    &mut kv.k,
                    &mut kv.v,
                    (hq, hkv, 1, d),
                    KvRows { rows: cap, p0: p },
                )?;
                let full = Segment {
                    k: kv.k.slice(..),
                    v: kv.v.slice(..),
                    count: SegCount::Fixed(p + 1),
                    stride: cap,
                };
                st.dec.poison(g)?;
                match (cache, compact.get_mut(li).and_then(Option::as_mut)) {
                    (DecodeCache::Compact { shadow }, Some(cc)) => {
                        {
                            let (global, window) = cc.segments(&kv.k, &kv.v, cap, p);
                            let qv = st.q.slice(..);
                            run_segments(g, &st.shape, qv, d, &global, Some(&window), &mut st.dec)?;
                        }
                        // The compact pass's log-sum-exp, on the host once, where the
                        // regret or a compaction needs it.
                        let due = cc.index.due(p);
                        let lc = if shadow || due {
                            g.download(&st.dec.lse)?
                        } else {
                            Vec::new()
                        };
                        if shadow {
                            st.shadow.poison(g)?;
                            let qv = st.q.slice(..);
                            run_segments(g, &st.shape, qv, d, &full, None, &mut st.shadow)?;
                            let lf = g.download(&st.shadow.lse)?;
                            step_regret.push(regret(&lc, &lf));
                        }
                        if due {
                            let q = g.download(&st.q)?;
                            cc.after_step(g, p, &q, &lc, (&kv.k, &kv.v, cap), reduce)?;
                        }
                    }
                    _ => {
                        let qv = st.q.slice(..);
                        run_segments(g, &st.shape, qv, d, &full, None, &mut st.dec)?;
                    }
                }
                glue::to_f16(g, &st.dec.o, &mut st.merged)?;
                self.after_attention(
                    li,
                    1,
                    &mut st.x,
                    &st.merged,
                    (&mut st.xn, &mut st.gu, &mut st.act),
                )?;
            }
            if !step_regret.is_empty() {
                out.regret.push(step_regret);
            }
            glue::rmsnorm(
                g,
                &st.x,
                &self.weights.out_norm,
                &mut st.xn,
                (1, hid),
                c.rms_eps,
            )?;
            let xs = st.xn.slice(..);
            next = self.head_argmax(&xs, &mut st.head)?;
        }
        out.decode_s = t1.elapsed().as_secs_f64();
        out.compactions = compact
            .first()
            .and_then(Option::as_ref)
            .map_or(0, |cc| cc.index.compactions);
        // The last decode step put position l + steps - 1 into the caches.
        let end = l + out.tokens.len() - 1;
        out.cache_tokens = compact
            .iter()
            .flatten()
            .map(|cc| {
                let ix = &cc.index;
                ix.global.iter().map(|g| g.len() + end - ix.lo).collect()
            })
            .collect();
        Ok(out)
    }

    /// The arg-max of the output head over one normed hidden row (f16), checked finite.
    fn head_argmax(&self, xs: &cudarc::driver::CudaView<'_, u16>, st: &mut Head) -> GpuResult<u32> {
        let c = self.config();
        let g = &self.gpu;
        g.poison(&mut st.logits)?;
        self.blas.linear(
            xs,
            self.weights.head(),
            &mut st.logits,
            (1, c.vocab, c.hidden),
            0.0,
            "output head",
        )?;
        glue::row_nll(
            g,
            &st.logits,
            &st.target,
            &mut st.nll,
            &mut st.arg,
            (0, 1, c.vocab),
        )?;
        g.sync()?;
        let nll = g.download(&st.nll)?;
        let arg = g.download(&st.arg)?;
        if !nll[0].is_finite() || arg[0] as usize >= c.vocab {
            return Err(GpuError::Invalid(
                "non-finite logits in a decode step (the output head)".into(),
            ));
        }
        Ok(arg[0])
    }
}
