//! GPU tests (feature `cuda`): skipped, with a message, where no CUDA device is present.
#![cfg(feature = "cuda")]

use tca::bound::Reading;
use tca::cuda::backend::{select_params, GpuBackend};
use tca::cuda::synth::generate;
use tca::selection::candidates;
use tca::Config;

fn small_cfg() -> Config {
    Config {
        block_size: 16,
        window: 64,
        ..Config::default()
    }
}

/// The opened GPU, or None (the test then returns, saying it skipped) where there is none.
fn device<T, E: std::fmt::Display>(opened: Result<T, E>) -> Option<T> {
    opened.map_err(|e| println!("skipping GPU test: {e}")).ok()
}

#[test]
fn synthetic_layer_feeds_the_oracle_selection() {
    // Host-only: the generator, the bf16 round trip and the oracle's selection on it.
    let layer = generate(4, 2, 320, 64, 3);
    let heads = layer.to_heads().unwrap();
    let cfg = small_cfg();
    let c = candidates(&cfg).unwrap();
    let budgets = vec![c[5].budget.clone(); 2];
    let sel = tca::selection::select(&heads, &cfg, &budgets).unwrap();
    assert_eq!(sel.heads.len(), 2);
    let p = select_params(320, &cfg, &budgets).unwrap();
    assert_eq!(p.table.len(), 2 * 16);
    assert!(!layer.needles[1].is_empty());
}

#[test]
fn gpu_matches_oracle_on_a_small_layer() {
    let Some(gpu) = device(GpuBackend::new()) else {
        return;
    };
    let layer = generate(4, 2, 320, 64, 3);
    let heads = layer.to_heads().unwrap();
    let cfg = small_cfg();
    let c = candidates(&cfg).unwrap();
    let budgets = vec![c[5].budget.clone(); 2];
    let cpu = tca::selection::select(&heads, &cfg, &budgets).unwrap();
    let (gsel, att) = gpu.sparse_prefill(&heads, &cfg, &budgets).unwrap();
    let mut s = cpu.clone();
    for kv in 0..2 {
        s.heads[kv].global = gsel.global[kv].clone();
    }
    let want = tca::selection::sparse_attention(&heads, &s).unwrap();
    let err = (&att.o - &want.o).iter().fold(0f64, |m, x| m.max(x.abs()));
    let scale = want.o.iter().fold(0f64, |m, x| m.max(x.abs()));
    assert!(
        err <= 1e-2 * scale,
        "sparse prefill error {err} (scale {scale})"
    );
    let dense = gpu.dense_prefill(&heads).unwrap();
    let full = tca::reference::exact::attention(&heads);
    let err = (&dense.o - &full.o)
        .iter()
        .fold(0f64, |m, x| m.max(x.abs()));
    assert!(
        err <= 1e-2 * scale.max(1e-3) * 10.0,
        "dense prefill error {err}"
    );
}

#[test]
fn cuda_backend_audit_agrees_with_the_oracle() {
    use tca::backend::{Backend, BackendKind, OracleRows};
    use tca::bound::{audit, summarize, Reading};
    let Some(gpu) = device(Backend::open(BackendKind::Cuda)) else {
        return;
    };
    let heads = generate(4, 2, 320, 64, 5).to_heads().unwrap();
    let cfg = small_cfg();
    let c = candidates(&cfg).unwrap();
    let budgets = vec![c[4].budget.clone(); 2];
    let la = gpu
        .audit_layer(&heads, &cfg, &budgets, OracleRows::default())
        .unwrap();
    // Every value the device produced is finite (NaN-propagating checks).
    let own = la.self_audits.as_ref().unwrap();
    assert!(la.audits.iter().chain(own).all(|a| a.finite));
    // The oracle on the values the device saw, with the device's S_G.
    let seen = heads.rounded_to_bf16().unwrap();
    let mut sel = tca::selection::select(&seen, &cfg, &budgets).unwrap();
    for (h, g) in sel.heads.iter_mut().zip(&la.global) {
        h.global = g.clone();
    }
    let want = audit(&seen, &sel).unwrap();
    let worst = own
        .iter()
        .zip(&want)
        .map(|(g, w)| (g.gamma - w.gamma).abs())
        .fold(0f64, |m, x| if x.is_nan() { f64::NAN } else { m.max(x) });
    assert!(
        worst <= 1e-3,
        "gamma from the device's log-sum-exps differs by {worst}"
    );
    let (sg, sw) = (summarize(&la.audits, cfg.tau), summarize(&want, cfg.tau));
    for r in [
        Reading::Identity,
        Reading::LinfEntrymax,
        Reading::L1Induced,
        Reading::L2Diameter,
    ] {
        assert!(
            sw.readings[r.key()].holds && sg.readings[r.key()].holds,
            "{r:?}: {:?}",
            sg.readings[r.key()]
        );
    }
}

/// The peers' device paths on a synthetic layer: a host-chosen key set compacted by
/// `select_key_sets` (positions and K/V rows exact), and both peers' S_G from TCA's
/// GPU selection against the CPU policies on the same bf16 inputs.
#[test]
fn gpu_peer_key_sets_match_the_cpu_policies() {
    use tca::cuda::model::peers::{peer_selection, GpuPeer};
    use tca::cuda::selection::{download_selection, run_select, select_key_sets, DevSelection};
    use tca::cuda::DevHeads;
    use tca::selection::policies::{block_topk, cumulative_threshold, BlockMarks};
    let Some(gpu) = device(GpuBackend::new()) else {
        return;
    };
    let g = &gpu.gpu;
    let layer = generate(4, 2, 320, 64, 3);
    let heads = layer.to_heads().unwrap();
    let cfg = Config {
        tau: 0.8,
        ..small_cfg()
    };
    let (l, d, lc) = (320, 64, 320 - cfg.window);
    let h = DevHeads::from_heads(g, &heads).unwrap();
    // Host-chosen sets: every third position of head 0, a few of head 1.
    let keep = [
        (0..lc).step_by(3).collect::<Vec<_>>(),
        vec![0, 17, 18, 19, 100, lc - 1],
    ];
    let marks: Vec<BlockMarks> = keep
        .iter()
        .map(|k| BlockMarks::new(k, lc, cfg.block_size).unwrap())
        .collect();
    let sel = select_key_sets(
        g,
        &h,
        cfg.window,
        cfg.block_size,
        &marks,
        &vec![0.0; 2 * lc],
    )
    .unwrap();
    g.sync().unwrap();
    let hs = download_selection(g, &h, &sel).unwrap();
    let (k, gk) = (g.download(&h.k).unwrap(), g.download(&sel.gk).unwrap());
    for kv in 0..2 {
        assert_eq!(hs.global[kv], keep[kv], "KV head {kv}");
        for (r, &j) in keep[kv].iter().enumerate() {
            let src = &k[(kv * l + j) * d..(kv * l + j + 1) * d];
            let dst = &gk[(kv * sel.gcap + r) * d..(kv * sel.gcap + r + 1) * d];
            assert_eq!(src, dst, "KV head {kv}, row {r} (position {j})");
        }
    }
    // Both peers from TCA's GPU selection against the CPU policies.
    let c = candidates(&cfg).unwrap();
    let budgets = vec![c[5].budget.clone(); 2];
    let cpu_tca = tca::selection::select(&heads, &cfg, &budgets).unwrap();
    for peer in [GpuPeer::BlockTopK, GpuPeer::CumulativeThreshold] {
        let cpu = match peer {
            GpuPeer::BlockTopK => block_topk(&heads, &cfg, &cpu_tca).unwrap(),
            GpuPeer::CumulativeThreshold => cumulative_threshold(&cpu_tca, cfg.tau),
            other => panic!("{other:?} has no S_G of its own"),
        };
        let mut tsel =
            DevSelection::new(g, &h, &select_params(l, &cfg, &budgets).unwrap()).unwrap();
        run_select(g, &h, &mut tsel, None).unwrap();
        let psel = peer_selection(g, &h, &tsel, peer, &cfg).unwrap();
        g.sync().unwrap();
        let hs = download_selection(g, &h, &psel).unwrap();
        let (mut diff, mut total) = (0, 0);
        for kv in 0..2 {
            diff += tca::backend::symmetric_difference(&cpu.heads[kv].global, &hs.global[kv]);
            total += cpu.heads[kv].global.len();
        }
        assert!(
            total > 0 && diff * 50 <= total,
            "{peer:?}: {diff} of {total} positions differ"
        );
    }
}

/// The per-query key-set kernel (kernels/peers.cu) for oracle top-k and StreamingLLM at
/// TCA's budgets, against the f64 key-set attention with the CPU policies on the same
/// bf16 inputs: O and LSE within 1e-2 (relative), and the kept keys row by row (exact
/// for StreamingLLM; oracle top-k may differ at f32/f64 near-ties). One case repeats a
/// key row so that equal scores occur (ties: lower index), one crosses a row band, one
/// asks for more sinks than some budgets.
#[test]
fn gpu_per_query_peers_match_the_cpu_key_set_attention() {
    use tca::cuda::keysets::{budgets_table, run_key_rows, RowRule};
    use tca::cuda::model::forward::count_key_set_diff;
    use tca::cuda::prefill::DevAttention;
    use tca::cuda::{bf16_to_f32, DevHeads};
    use tca::selection::policies::{OracleTopK, StreamingLlm};
    use tca::selection::{sparse_attention, KeySets};
    let Some(gpu) = device(GpuBackend::new()) else {
        return;
    };
    let g = &gpu.gpu;
    let cfg = Config {
        tau: 0.8,
        ..small_cfg()
    };
    for (l, d, hq, hkv, repeat) in [
        (300, 64, 6, 2, true),
        (1100, 128, 4, 2, false),
        (500, 96, 3, 1, false),
    ] {
        let layer = generate(hq, hkv, l, d, 11);
        let h0 = DevHeads::from_heads(g, &layer.to_heads().unwrap()).unwrap();
        let (q, mut k, v) = (
            g.download(&h0.q).unwrap(),
            g.download(&h0.k).unwrap(),
            g.download(&h0.v).unwrap(),
        );
        if repeat {
            // Key row 5 of every KV head again at 12, 19, 26, ...: exactly equal scores.
            for kv in 0..hkv {
                let src: Vec<u16> = k[(kv * l + 5) * d..(kv * l + 6) * d].to_vec();
                for j in (12..l).step_by(7) {
                    k[(kv * l + j) * d..(kv * l + j + 1) * d].copy_from_slice(&src);
                }
            }
        }
        let h = DevHeads::from_bf16(g, (hq, hkv, l, d), &q, &k, &v).unwrap();
        let arr = |x: &[u16], n: usize| {
            ndarray::Array3::from_shape_vec((n, l, d), x.iter().map(|&b| bf16_to_f32(b)).collect())
                .unwrap()
        };
        let heads = tca::model::llama::Qkv {
            q: arr(&q, hq),
            k: arr(&k, hkv),
            v: arr(&v, hkv),
        }
        .to_heads()
        .unwrap();
        let c = candidates(&cfg).unwrap();
        let budgets = vec![c[5].budget.clone(); hkv];
        let tca_sel = tca::selection::select(&heads, &cfg, &budgets).unwrap();
        let global: Vec<Vec<usize>> = tca_sel.heads.iter().map(|x| x.global.clone()).collect();
        let ks = budgets_table(&global, cfg.window, l);
        for rule in [
            RowRule::OracleTopK,
            RowRule::StreamingLlm { sinks: 4 },
            RowRule::StreamingLlm { sinks: 10_000 },
        ] {
            let oracle = OracleTopK {
                heads: &heads,
                tca: &tca_sel,
            };
            let stream = |sinks| StreamingLlm {
                tca: &tca_sel,
                sinks,
            };
            let s_rule;
            let keys: &(dyn KeySets + Sync) = match rule {
                RowRule::OracleTopK => &oracle,
                RowRule::StreamingLlm { sinks } => {
                    s_rule = stream(sinks);
                    &s_rule
                }
            };
            let mut out = DevAttention::new(g, &h).unwrap();
            out.poison(g).unwrap();
            let mut mask = g.alloc::<u32>(hq * l * l.div_ceil(32)).unwrap();
            run_key_rows(g, &h, &ks, rule, &mut out, Some(&mut mask)).unwrap();
            g.sync().unwrap();
            let bits = g.download(&mask).unwrap();
            let diff = count_key_set_diff(keys, &bits, hq, l);
            let want = sparse_attention(&heads, keys).unwrap();
            let o: Vec<f64> = g
                .download(&out.o)
                .unwrap()
                .iter()
                .map(|&b| bf16_to_f32(b) as f64)
                .collect();
            let lse = g.download(&out.lse).unwrap();
            let (mut num, mut den, mut lse_err) = (0.0, 0.0, 0f64);
            for (a, b) in o.iter().zip(want.o.iter()) {
                num += (a - b) * (a - b);
                den += b * b;
            }
            for (a, b) in lse.iter().zip(want.lse.iter()) {
                lse_err = lse_err.max((*a as f64 - b).abs() / b.abs().max(1.0));
            }
            let rel = (num / den).sqrt();
            println!("{rule:?} L {l} d {d}: O rel. error {rel:.2e}, LSE {lse_err:.2e}, {diff} of {} rows' key sets differ", hq * l);
            assert!(
                rel < 1e-2 && lse_err < 1e-2,
                "{rule:?} L {l} d {d}: O {rel}, LSE {lse_err}"
            );
            match rule {
                RowRule::OracleTopK => assert!(diff * 100 <= hq * l, "{diff} rows differ"),
                _ => assert_eq!(diff, 0, "{rule:?}"),
            }
        }
    }
}

/// `tca decode --backend cuda`'s engine: the compacted cache with its compactions on the
/// device against the CPU cache on the same bf16-rounded layer. Same positions held at
/// every step (up to near-ties of the compaction scores, counted), every step audited
/// with no violation of the true readings, eviction regret close to the CPU's.
#[test]
fn gpu_compacted_decode_follows_the_cpu_cache() {
    let Some(gpu) = device(tca::backend::Backend::open(tca::backend::BackendKind::Cuda)) else {
        return;
    };
    let layer = generate(4, 2, 600, 64, 5);
    let heads = layer.to_heads().unwrap().rounded_to_bf16().unwrap();
    let cfg = small_cfg();
    let c = candidates(&cfg).unwrap();
    let budgets = vec![c[5].budget.clone(); 2];
    // 600 - 400 = 200 steps with b = 16, w = 64: 12 compactions.
    let prefill = 400;
    let cpu = tca::decode::decode(&heads, &cfg, &budgets, prefill).unwrap();
    let gpu_r = gpu.decode(&heads, &cfg, &budgets, prefill).unwrap();
    assert_eq!(gpu_r.audits.len(), cpu.audits.len());
    for (a, b) in cpu.heads.iter().zip(&gpu_r.heads) {
        assert_eq!(a.compactions, b.compactions);
        assert_eq!(a.global_tokens, b.global_tokens);
        assert_eq!(a.window_tokens, b.window_tokens);
        assert_eq!(a.peak_tokens, b.peak_tokens);
    }
    assert!(cpu.heads[0].compactions >= 10, "{:?}", cpu.heads[0]);
    let mut far = 0;
    for (a, b) in cpu.audits.iter().zip(&gpu_r.audits) {
        assert_eq!((a.head, a.query), (b.head, b.query));
        if (a.gamma - b.gamma).abs() > 1e-3 {
            far += 1;
        }
        assert!(b.finite);
        for rd in [
            Reading::LinfEntrymax,
            Reading::L1Induced,
            Reading::L2Diameter,
        ] {
            assert!(rd.holds_at(b, cfg.tau), "{rd:?} at GPU decode step {b:?}");
        }
    }
    assert!(
        far * 50 <= cpu.audits.len(),
        "{far} of {} steps' regret differ by > 1e-3",
        cpu.audits.len()
    );
    assert!(
        gpu_r.max_rel_err < 2e-2,
        "max relative output error {}",
        gpu_r.max_rel_err
    );
}
