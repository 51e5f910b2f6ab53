//! Each synthetic head type produces the attention pattern it is named for.

use tca::data::{synth, HeadKind, SynthSpec};
use tca::reference::causal_row;

const L: usize = 1024;

fn spec(kind: HeadKind) -> SynthSpec {
    SynthSpec {
        kind,
        q_heads: 4,
        kv_heads: 2,
        len: L,
        dim: 32,
        seed: 7,
    }
}

/// The last query's softmax row of query head h.
fn last_row(kind: HeadKind, h: usize) -> Vec<f64> {
    let s = synth(&spec(kind)).unwrap();
    causal_row(&s.heads, h, L - 1).0
}

fn mass(p: &[f64], r: std::ops::Range<usize>) -> f64 {
    p[r].iter().sum()
}

#[test]
fn uniform_head_spreads_its_mass() {
    for h in 0..4 {
        let p = last_row(HeadKind::Uniform, h);
        let entropy: f64 = -p.iter().map(|x| x * x.ln()).sum::<f64>();
        assert!(entropy > 0.95 * (L as f64).ln(), "entropy {entropy}");
        assert!(p.iter().all(|&x| x < 4.0 / L as f64));
    }
}

#[test]
fn sink_head_puts_most_mass_on_token_zero() {
    let s = synth(&spec(HeadKind::Sink)).unwrap();
    for h in 0..4 {
        let mean: f64 =
            (1..L).map(|i| causal_row(&s.heads, h, i).0[0]).sum::<f64>() / (L - 1) as f64;
        assert!(mean > 0.5, "head {h}: mean P_i0 = {mean}");
    }
}

#[test]
fn terminal_head_attends_to_the_end() {
    for h in 0..4 {
        let p = last_row(HeadKind::Terminal, h);
        assert!(mass(&p, L - L / 10..L) > 0.6);
        assert!(mass(&p, 0..L / 10) < 0.05);
    }
}

#[test]
fn bipolar_head_attends_to_both_ends() {
    for h in 0..4 {
        let p = last_row(HeadKind::Bipolar, h);
        let (start, end) = (mass(&p, 0..L / 20), mass(&p, L - L / 10..L));
        assert!(start > 0.2 && end > 0.2, "start {start}, end {end}");
        assert!(mass(&p, L / 10..L - L / 10) < 0.2);
    }
}

#[test]
fn retrieval_head_finds_its_needles() {
    let s = synth(&spec(HeadKind::Retrieval)).unwrap();
    for h in 0..4 {
        let needles = &s.needles[s.heads.kv_of(h)];
        assert!(needles.len() >= 2);
        let p = causal_row(&s.heads, h, L - 1).0;
        let on_needles: f64 = needles.iter().map(|&j| p[j]).sum();
        assert!(on_needles > 0.5, "needle mass {on_needles}");
        let mut top: Vec<usize> = (0..L).collect();
        top.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let mut top_n = top[..needles.len()].to_vec();
        top_n.sort_unstable();
        assert_eq!(&top_n, needles);
    }
}

#[test]
fn synth_is_seeded() {
    let a = synth(&spec(HeadKind::Bipolar)).unwrap();
    let b = synth(&spec(HeadKind::Bipolar)).unwrap();
    assert_eq!(a.heads, b.heads);
    let c = synth(&SynthSpec {
        seed: 8,
        ..spec(HeadKind::Bipolar)
    })
    .unwrap();
    assert_ne!(a.heads, c.heads);
}
