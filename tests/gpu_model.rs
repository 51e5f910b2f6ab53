//! The model forward on the GPU (feature `cuda`). The host-side pieces (GEMM argument
//! layout, f16 weight packing, the keep fraction and set difference) are tested on the
//! CPU; the forward itself against the CPU forward where a device is present (skipped,
//! with a message, elsewhere).
#![cfg(feature = "cuda")]

#[macro_use]
mod common;
use common::model::model;

use ndarray::{Array2, ShapeBuilder};
use tca::backend::symmetric_difference as sym_diff;
use tca::cli::model::{perplexity, AttentionKind, CalibrationArgs, PerplexityArgs};
use tca::cuda::model::gemm::GemmShape;
use tca::cuda::model::weights::{f32_to_f16, host_layer, stack_f16};
use tca::cuda::model::{keep_fraction, ForwardStats, GpuAttn, GpuModel};
use tca::model::sparse::{calibrate_model, SparsePolicy};
use tca::model::{assets, Exact, Model};
use tca::selection::key_set;
use tca::selection::policies::Policy;
use tca::Config;

/// A small deterministic matrix with varied values.
fn mat(rows: usize, cols: usize, seed: u32) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |(i, j)| {
        let h = (i as u32 * 7919 + j as u32 * 104_729 + seed * 31).wrapping_mul(2_654_435_761);
        (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    })
}

/// The first 20,000 characters of the embedded novel as tokens, the small configuration
/// (b = 16, w = 32) at `tau`, and its profile calibrated on tokens 2000..2128.
fn small_tca(m: &Model, tau: f64) -> (Vec<u32>, Config, tca::calibration::Profile) {
    let cfg = Config {
        block_size: 16,
        window: 32,
        tau,
        ..Config::default()
    };
    let all = m
        .tokenizer
        .encode(&assets::PRIDE_AND_PREJUDICE[..20_000])
        .unwrap();
    let prof = calibrate_model(&m.llama, &all[2000..2128], &cfg, &[cfg.tau])
        .unwrap()
        .pop()
        .unwrap();
    (all, cfg, prof)
}

#[test]
fn gemm_arguments_compute_x_times_w_transposed() {
    // Row-major x [n, in] and w [out, in] as cuBLAS sees them (column-major), through
    // the arguments the GPU forward passes: y [n, out] row-major = x · wᵀ (+ y).
    for (n, out, inn) in [(5, 3, 7), (1, 4, 2), (9, 16, 8)] {
        let x = mat(n, inn, 1);
        let w = mat(out, inn, 2);
        let s = GemmShape::for_linear(n, out, inn).unwrap();
        let (xs, ws) = (x.as_slice().unwrap(), w.as_slice().unwrap());
        let mut y = vec![0.0f32; n * out];
        s.reference(ws, xs, &mut y, 0.0);
        let want = x.dot(&w.t());
        let got = Array2::from_shape_vec((n, out), y.clone()).unwrap();
        let err = (&got - &want).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(err < 1e-5, "({n}, {out}, {inn}): {err}");
        // beta = 1 accumulates (the residual adds).
        s.reference(ws, xs, &mut y, 1.0);
        let got2 = Array2::from_shape_vec((n, out), y).unwrap();
        let err = (&got2 - &(2.0 * &want))
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(err < 1e-5, "accumulate ({n}, {out}, {inn}): {err}");
    }
    assert!(GemmShape::for_linear(0, 3, 4).is_err());
    assert!(GemmShape::for_linear(3, 0, 4).is_err());
    assert!(GemmShape::for_linear(3, 4, usize::MAX).is_err());
}

#[test]
fn stacked_f16_weights_keep_row_order_whatever_the_layout() {
    let a = mat(3, 4, 3);
    // The same values in column-major memory: the packing follows logical order.
    let mut b = Array2::<f32>::zeros((2, 4).f());
    b.assign(&mat(2, 4, 4));
    let s = stack_f16(&[&a, &b]).unwrap();
    assert_eq!(s.len(), 20);
    for (r, row) in a.rows().into_iter().chain(b.rows()).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            assert_eq!(s[r * 4 + c], f32_to_f16(v), "row {r} col {c}");
            let back = half::f16::from_bits(s[r * 4 + c]).to_f32();
            assert!((back - v).abs() <= v.abs() / 2048.0 + 6e-8, "{v} -> {back}");
        }
    }
    assert!(stack_f16(&[&a, &mat(2, 3, 5)]).is_err());
}

#[test]
fn model_weights_pack_into_the_device_layout() {
    let Some(m) = model() else { return };
    let c = &m.llama.config;
    let layer = c.n_layers - 1;
    let h = host_layer(&m.llama, layer).unwrap();
    let w = m.llama.layer_weights(layer).unwrap();
    let (d, hq, hkv, hid) = (c.head_dim, c.n_heads, c.n_kv_heads, c.hidden);
    assert_eq!(h.wqkv.len(), (hq + 2 * hkv) * d * hid);
    assert_eq!(h.w_gate_up.len(), 2 * c.ffn * hid);
    assert_eq!(h.w_down.len(), hid * c.ffn);
    // Q rows, then K, then V; gate rows, then up.
    let row = |v: &[u16], r: usize, n: usize| v[r * n..(r + 1) * n].to_vec();
    let bf = |a: ndarray::ArrayView1<f32>| a.iter().map(|&x| f32_to_f16(x)).collect::<Vec<_>>();
    assert_eq!(row(&h.wqkv, 0, hid), bf(w.wq.row(0)));
    assert_eq!(row(&h.wqkv, hq * d, hid), bf(w.wk.row(0)));
    assert_eq!(row(&h.wqkv, (hq + hkv) * d + 5, hid), bf(w.wv.row(5)));
    assert_eq!(row(&h.w_gate_up, c.ffn + 3, hid), bf(w.w_up.row(3)));
    assert_eq!(row(&h.wo, 2, hq * d), bf(w.wo.row(2)));
    assert_eq!(h.attn_norm, w.attn_norm.to_vec());
    assert!(m.llama.layer_weights(c.n_layers).is_none());
}

#[test]
fn keep_fraction_counts_the_key_sets() {
    let global = vec![vec![0, 3, 5], vec![], vec![1, 2, 3, 4, 5, 6]];
    let (w, l) = (3, 12);
    let mut want = 0.0;
    for g in &global {
        for i in 0..l {
            want += key_set(g, w, i).count() as f64 / (i + 1) as f64;
        }
    }
    want /= (global.len() * l) as f64;
    assert!((keep_fraction(&global, w, l) - want).abs() < 1e-12);
    assert_eq!(sym_diff(&[1, 4, 7], &[1, 5, 7, 9]), 3);
    assert_eq!(sym_diff(&[], &[2]), 1);
    assert_eq!(sym_diff(&[2, 3], &[2, 3]), 0);
}

fn gpu_model(m: &Model) -> Option<GpuModel> {
    match GpuModel::new(&m.llama) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("skipping GPU test: {e}");
            None
        }
    }
}

#[test]
fn gpu_forward_matches_the_cpu_forward() {
    let Some(m) = model() else { return };
    let Some(g) = gpu_model(m) else { return };
    let tokens = m
        .tokenizer
        .encode(&assets::PRIDE_AND_PREJUDICE[..3000])
        .unwrap();
    let tokens = &tokens[..300];
    let cpu = m.llama.score(tokens, &Exact::default(), 0).unwrap();
    let (gpu, _) = g.score(tokens, GpuAttn::Exact, 0, false, None).unwrap();
    let rel = (gpu.perplexity() / cpu.perplexity() - 1.0).abs();
    assert!(
        rel < 0.01,
        "perplexity cpu {} gpu {}",
        cpu.perplexity(),
        gpu.perplexity()
    );
    assert!(gpu.agreement(&cpu).unwrap() >= 0.95);
    let cc = m.llama.capture(tokens, &[0, 7]).unwrap();
    let gc = g.capture(tokens, &[0, 7]).unwrap();
    for l in [0, 7] {
        let (a, b) = (&gc.captured[&l].k, &cc.captured[&l].k);
        let num: f32 = (a - b).iter().map(|x| x * x).sum();
        let den: f32 = b.iter().map(|x| x * x).sum();
        assert!(
            (num / den).sqrt() < 1e-2,
            "layer {l} K rel. error {}",
            (num / den).sqrt()
        );
    }
    assert!(g
        .score(&tokens[..1], GpuAttn::Exact, 0, false, None)
        .is_err());
    assert!(g
        .score(&[u32::MAX, 1], GpuAttn::Exact, 0, false, None)
        .is_err());
    assert!(g.capture(tokens, &[m.llama.config.n_layers]).is_err());
}

/// Scores `tokens` with `pol` on the CPU and `attn` on the GPU (selection checked against
/// the CPU's), asserts one keep record per layer and perplexities within 2 %, and returns
/// the GPU's forward statistics.
fn gpu_scores_like_the_cpu(
    m: &Model,
    g: &GpuModel,
    tokens: &[u32],
    pol: &SparsePolicy,
    attn: GpuAttn,
    what: &str,
) -> ForwardStats {
    let cpu = m.llama.score(tokens, pol, 0).unwrap();
    let (gpu, stats) = g.score(tokens, attn, 0, true, None).unwrap();
    assert_eq!(stats.keep.len(), m.llama.config.n_layers);
    let rel = (gpu.perplexity() / cpu.perplexity() - 1.0).abs();
    assert!(
        rel < 0.02,
        "{what} perplexity cpu {} gpu {}",
        cpu.perplexity(),
        gpu.perplexity()
    );
    stats
}

#[test]
fn gpu_tca_matches_the_cpu_tca() {
    let Some(m) = model() else { return };
    let Some(g) = gpu_model(m) else { return };
    let (all, cfg, prof) = small_tca(m, 0.95);
    let tokens = &all[..256];
    let pol = SparsePolicy::new(Policy::Tca, cfg.clone(), prof.clone()).unwrap();
    let attn = GpuAttn::Tca {
        config: &cfg,
        profile: &prof,
    };
    let stats = gpu_scores_like_the_cpu(m, &g, tokens, &pol, attn, "tca");
    let keep = stats.keep.iter().map(|k| k.keep_fraction).sum::<f64>() / stats.keep.len() as f64;
    assert!(keep < 1.0 && (keep - pol.mean_keep_fraction()).abs() < 0.05);
    let ms = g.time_prefill(tokens, attn, 2).unwrap();
    assert!(ms.len() == 2 && ms.iter().all(|&t| t > 0.0));
}

#[test]
fn gpu_peers_match_the_cpu_peers() {
    use tca::cuda::model::generate::DecodeCache;
    use tca::cuda::model::GpuPeer;
    let Some(m) = model() else { return };
    let Some(g) = gpu_model(m) else { return };
    let (all, cfg, prof) = small_tca(m, 0.9);
    let tokens = &all[..256];
    for peer in [
        GpuPeer::BlockTopK,
        GpuPeer::CumulativeThreshold,
        GpuPeer::from_policy(Policy::OracleTopK).unwrap(),
        GpuPeer::from_policy(Policy::StreamingLlm).unwrap(),
    ] {
        let pol = SparsePolicy::new(peer.policy(), cfg.clone(), prof.clone()).unwrap();
        let attn = GpuAttn::Peer {
            peer,
            config: &cfg,
            profile: &prof,
        };
        let stats = gpu_scores_like_the_cpu(m, &g, tokens, &pol, attn, &format!("{peer:?}"));
        let (mut diff, mut total) = (0, 0);
        for k in &stats.keep {
            diff += k.oracle_diff.as_ref().unwrap().iter().sum::<usize>();
            total += k.global.iter().map(Vec::len).sum::<usize>();
        }
        assert!(
            total > 0 && diff * 50 <= total,
            "{peer:?}: {diff} of {total} positions differ from the CPU policy"
        );
        let keep =
            stats.keep.iter().map(|k| k.keep_fraction).sum::<f64>() / stats.keep.len() as f64;
        assert!(
            (keep - pol.mean_keep_fraction()).abs() < 0.02,
            "{peer:?} keep gpu {keep} cpu {}",
            pol.mean_keep_fraction()
        );
        if peer.rows().is_none() {
            // Decoding over the peer's compacted cache.
            let out = g
                .generate(tokens, 4, attn, DecodeCache::Compact { shadow: true }, None)
                .unwrap();
            assert_eq!(out.tokens.len(), 4);
            continue;
        }
        // Per-query peers: key sets row by row at the checked layers (StreamingLLM
        // exact, oracle top-k up to near-ties); no compacted cache, the full one decodes.
        let (rows_diff, rows) = stats
            .keep
            .iter()
            .filter_map(|k| k.key_set_diff)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        assert!(rows > 0, "{peer:?}: no key sets checked");
        match peer {
            GpuPeer::OracleTopK => assert!(rows_diff * 50 <= rows, "{rows_diff} of {rows}"),
            _ => assert_eq!(rows_diff, 0, "{peer:?}"),
        }
        let e = g
            .generate(tokens, 4, attn, DecodeCache::Compact { shadow: true }, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("full cache"), "{e}");
        let out = g
            .generate(tokens, 4, attn, DecodeCache::Full, None)
            .unwrap();
        assert_eq!(out.tokens.len(), 4);
    }
}

#[test]
fn perplexity_cli_on_the_cuda_backend() {
    let Some(_) = model() else { return };
    let args = PerplexityArgs {
        rope: Default::default(),
        text: None,
        tokens: 64,
        from: 0,
        attention: AttentionKind::Exact,
        calibration: CalibrationArgs {
            config: None,
            profile: None,
            calib_offset: 100_000,
            calib_tokens: 2048,
            calib_text: None,
        },
        model: None,
        backend: tca::backend::BackendKind::Cuda,
    };
    match perplexity(&args) {
        Ok(r) => assert_eq!(r.score.nll.len(), 63),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("backend"), "{e}");
            println!("skipping GPU part: {e}");
        }
    }
    // An attention the GPU does not run is refused on any machine, before the device.
    let e = perplexity(&PerplexityArgs {
        rope: Default::default(),
        attention: AttentionKind::TcaCertified,
        ..args
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("CPU only"), "{e}");
}

#[test]
fn gpu_generation_and_the_layer_audit() {
    use tca::cuda::model::audit::{AuditOptions, LayerAuditor};
    use tca::cuda::model::generate::DecodeCache;
    let Some(m) = model() else { return };
    let Some(g) = gpu_model(m) else { return };
    let (all, cfg, prof) = small_tca(m, 0.9);
    let prompt = &all[..300];
    // Exact greedy decoding equals the CPU's.
    let cpu = m
        .llama
        .generate_greedy(prompt, 6, &Exact::default(), None)
        .unwrap();
    let gpu = g
        .generate(prompt, 6, GpuAttn::Exact, DecodeCache::Full, None)
        .unwrap();
    assert_eq!(gpu.tokens, cpu);
    assert!(gpu.regret.is_empty());
    // TCA with the compacted cache and its shadow: regret per step, layer and head.
    let attn = GpuAttn::Tca {
        config: &cfg,
        profile: &prof,
    };
    let c = g
        .generate(prompt, 6, attn, DecodeCache::Compact { shadow: true }, None)
        .unwrap();
    assert_eq!(c.regret.len(), c.tokens.len() - 1);
    let n = m.llama.config.n_layers * m.llama.config.n_heads;
    for step in &c.regret {
        assert_eq!(step.iter().map(|l| l.len()).sum::<usize>(), n);
        assert!(step.iter().flatten().all(|r| (0.0..=1.0).contains(r)));
    }
    // Past b new tokens the cache compacts as the CPU's does: 40 tokens after a 300-token
    // prompt with w = 32, b = 16 make two compactions.
    let long = g
        .generate(
            prompt,
            40,
            attn,
            DecodeCache::Compact { shadow: false },
            None,
        )
        .unwrap();
    let mut pol = SparsePolicy::new(Policy::Tca, cfg.clone(), prof.clone()).unwrap();
    let (_, cpu_cache) =
        tca::model::sparse::generate_tca(&m.llama, prompt, 40, &mut pol, None).unwrap();
    assert_eq!(long.compactions, 2);
    assert_eq!(long.cache_tokens, cpu_cache.tokens_held());
    // Every layer audited: no violation of the true readings, gamma as the oracle's.
    let mut a = LayerAuditor::new(AuditOptions {
        tau: cfg.tau,
        oracle_rows: 512,
        seed: 3,
    });
    g.score(prompt, attn, 1, false, Some(&mut a)).unwrap();
    assert_eq!(a.rows.len(), n);
    for r in &a.rows {
        assert_eq!(r.oracle_true_violations, 0, "{r:?}");
        assert!(r.readings[..3].iter().all(|x| x.1 == 0), "{r:?}");
        assert!(r.oracle_max_gamma_diff < 1e-2, "{r:?}");
    }
}

#[test]
fn host_side_of_the_layer_audit() {
    use tca::cuda::audit::diameters_from_far2;
    use tca::cuda::model::audit::ClaimedSets;
    use tca::selection::{select, Budget, KeySets};
    // Diameters: running max of the squared distances, rooted, widened by 1 + d 2^-23;
    // a NaN poisons the rest of its head only.
    let d = diameters_from_far2(&[0.0, 4.0, 1.0, 9.0, 0.0, f32::NAN, 1.0, 0.0], 4, 64);
    let w = 1.0 + 64.0 * f64::powi(2.0, -23);
    assert_eq!(d[0], vec![0.0, 2.0 * w, 2.0 * w, 3.0 * w]);
    assert_eq!(d[1][0], 0.0);
    assert!(d[1][1..].iter().all(|x| x.is_nan()));
    // The GPU's claimed sets read as the CPU selection's with the same S_G.
    let heads = tca::Heads::new(
        ndarray::Array3::from_shape_fn((4, 80, 8), |(h, i, c)| {
            ((h * 7 + i * 3 + c) % 11) as f64 * 0.1
        }),
        ndarray::Array3::from_shape_fn((2, 80, 8), |(h, i, c)| {
            ((h + i * 5 + c * 2) % 13) as f64 * 0.1
        }),
        ndarray::Array3::from_shape_fn((2, 80, 8), |(h, i, c)| ((h + i + c) % 7) as f64),
    )
    .unwrap();
    let cfg = Config {
        block_size: 16,
        window: 24,
        ..Config::default()
    };
    let sel = select(
        &heads,
        &cfg,
        &[Budget::point(5, 16).unwrap(), Budget::point(2, 16).unwrap()],
    )
    .unwrap();
    let claimed = ClaimedSets {
        global: sel.heads.iter().map(|h| h.global.clone()).collect(),
        window: cfg.window,
        len: 80,
        group: 2,
    };
    assert_eq!(claimed.shape(), sel.shape());
    for h in 0..4 {
        for i in 0..80 {
            assert_eq!(claimed.keys(h, i), sel.keys(h, i));
            assert_eq!(claimed.kept(h / 2, i), sel.kept(h / 2, i));
        }
    }
}
