//! The harness looking for its own counterexamples: a seeded search over small shapes,
//! configurations, budgets and values (random and adversarial constructions) for a
//! query where one reading of Theorem 1 fails against the f64 oracle, then a greedy
//! shrink that minimises d, then L (with b, w and the budget), then the values towards
//! small integers. The same seed gives the same witness.

use super::{audit, QueryAudit, Reading};
use crate::calibration::{HeadProfile, LayerProfile, ModelShape, Profile};
use crate::config::Config;
use crate::data::{save_safetensors, write_new, Heads, SaveDtype};
use crate::error::{Result, TcaError};
use crate::selection::{select, Budget, KeySets};
use ndarray::{Array3, Axis};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;
use std::collections::HashMap;
use std::path::Path;

/// One candidate: a layer (one KV head, group g), b, w and a point budget k per block.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub heads: Heads,
    pub block: usize,
    pub window: usize,
    pub keep: usize,
}

impl Case {
    /// The configuration the case runs under (tau only labels the corollary).
    pub fn config(&self) -> Config {
        Config {
            block_size: self.block,
            window: self.window,
            ..Config::default()
        }
    }

    fn budgets(&self) -> Result<Vec<Budget>> {
        let p = Budget::point(self.keep, self.block)?;
        Ok(vec![p; self.heads.num_kv_heads()])
    }

    /// The first query (in order h L + i) where `reading` fails, with its key set.
    pub fn violation(&self, reading: Reading) -> Result<Option<(QueryAudit, Vec<usize>)>> {
        let cfg = self.config();
        let sel = select(&self.heads, &cfg, &self.budgets()?)?;
        Ok(audit(&self.heads, &sel)?
            .into_iter()
            .find(|a| reading.measured_at(a) && !reading.holds_at(a, cfg.tau))
            .map(|a| {
                let keys = sel.keys(a.head, a.query);
                (a, keys)
            }))
    }

    fn fails(&self, reading: Reading) -> bool {
        matches!(self.violation(reading), Ok(Some(_)))
    }
}

/// What a search found.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// A shrunk case, its violating query and key set, and how many cases were tried.
    Found {
        case: Box<Case>,
        audit: Box<QueryAudit>,
        keys: Vec<usize>,
        tried: usize,
        shrink_steps: usize,
    },
    /// No case out of `tried` violated the reading.
    NotFound { tried: usize },
}

fn tensor(rng: &mut StdRng, shape: (usize, usize, usize), kind: u32) -> Array3<f64> {
    Array3::from_shape_simple_fn(shape, || match kind {
        0 => rng.sample::<f64, _>(StandardNormal) * 2.0,
        1 => f64::from(rng.random_range(-3i32..=3)),
        _ => 0.0,
    })
}

/// The `n`-th random case of a search.
fn draw(rng: &mut StdRng) -> Result<Case> {
    let d = rng.random_range(1usize..=6);
    let l = rng.random_range(2usize..=10);
    let g = rng.random_range(1usize..=2);
    let block = rng.random_range(1usize..=4);
    let window = rng.random_range(1usize..=4);
    let keep = rng.random_range(1..=block);
    // Constructions: Gaussian; uniform attention (q = k = 0) with integer values;
    // integer everything; two-point values (each row +a or -a on every entry).
    let construction = rng.random_range(0u32..4);
    let (qk_kind, v_kind) = match construction {
        0 => (0, 0),
        1 => (2, 1),
        2 => (1, 1),
        _ => (2, 3),
    };
    let q = tensor(rng, (g, l, d), qk_kind);
    let k = tensor(rng, (1, l, d), qk_kind);
    let v = if v_kind == 3 {
        let a = f64::from(rng.random_range(1i32..=3));
        let signs: Vec<f64> = (0..l)
            .map(|_| if rng.random_bool(0.5) { a } else { -a })
            .collect();
        Array3::from_shape_fn((1, l, d), |(_, j, _)| signs[j])
    } else {
        tensor(rng, (1, l, d), v_kind)
    };
    Ok(Case {
        heads: Heads::new(q, k, v)?,
        block,
        window,
        keep,
    })
}

fn with_heads(case: &Case, q: Array3<f64>, k: Array3<f64>, v: Array3<f64>) -> Option<Case> {
    Heads::new(q, k, v).ok().map(|heads| Case {
        heads,
        ..case.clone()
    })
}

/// Cases one step smaller than `case` in the order the shrink tries them: phase 3 sets
/// Q and K to 0 (uniform attention), phase 0 removes a column, phase 1 a query head, a
/// row, or lowers b, w or the budget, phase 2 moves one value towards a small integer
/// (rounds it, sets it to 0, to +-1, or one step towards 0).
fn smaller(case: &Case, phase: usize) -> Vec<Case> {
    let (q, k, v) = case.heads.tensors();
    let (l, d) = (case.heads.len(), case.heads.dim());
    let mut out = Vec::new();
    match phase {
        0 if d > 1 => {
            for c in (0..d).rev() {
                let keep: Vec<usize> = (0..d).filter(|&x| x != c).collect();
                let t = |a: &Array3<f64>| a.select(Axis(2), &keep);
                out.extend(with_heads(case, t(q), t(k), t(v)));
            }
        }
        1 => {
            let hq = case.heads.num_q_heads();
            if hq > case.heads.num_kv_heads() {
                for h in (0..hq).rev() {
                    let keep: Vec<usize> = (0..hq).filter(|&x| x != h).collect();
                    out.extend(with_heads(
                        case,
                        q.select(Axis(0), &keep),
                        k.clone(),
                        v.clone(),
                    ));
                }
            }
            if l > 1 {
                for j in (0..l).rev() {
                    let keep: Vec<usize> = (0..l).filter(|&x| x != j).collect();
                    let t = |a: &Array3<f64>| a.select(Axis(1), &keep);
                    out.extend(with_heads(case, t(q), t(k), t(v)));
                }
            }
            if case.block > 1 {
                out.push(Case {
                    block: case.block - 1,
                    keep: case.keep.min(case.block - 1),
                    ..case.clone()
                });
            }
            if case.window > 1 {
                out.push(Case {
                    window: case.window - 1,
                    ..case.clone()
                });
            }
            if case.keep > 1 {
                out.push(Case {
                    keep: case.keep - 1,
                    ..case.clone()
                });
            }
        }
        // Uniform attention.
        3 if q.iter().chain(k.iter()).any(|&x| x != 0.0) => {
            out.extend(with_heads(
                case,
                q.mapv(|_| 0.0),
                k.mapv(|_| 0.0),
                v.clone(),
            ));
        }
        2 => {
            // Value by value: V, then Q and K.
            for which in 0..3 {
                let a = [v, q, k][which];
                for (n, &x) in a.iter().enumerate() {
                    // Only simpler values, so the shrink terminates: an integer for a
                    // fraction, else a smaller magnitude.
                    let mut tries = Vec::new();
                    if x.round() != x {
                        tries.extend([x.round(), 1.0, -1.0]);
                    }
                    if x != 0.0 {
                        tries.push(0.0);
                    }
                    if x.round() == x && x.abs() > 1.0 {
                        tries.push(x.signum());
                        tries.push(x - x.signum());
                    }
                    for y in tries {
                        // (+ 0.0 turns -0.0 into 0.0.)
                        let y = y + 0.0;
                        let mut b = a.clone();
                        if let Some(slot) = b.iter_mut().nth(n) {
                            *slot = y;
                        }
                        let (nq, nk, nv) = match which {
                            0 => (q.clone(), k.clone(), b),
                            1 => (b, k.clone(), v.clone()),
                            _ => (q.clone(), b, v.clone()),
                        };
                        out.extend(with_heads(case, nq, nk, nv));
                    }
                }
            }
        }
        _ => {}
    }
    out
}

/// Greedy shrink: in each phase (uniform attention, d, then L with b, w and the budget,
/// then the values) take the first smaller case that still fails, until none does;
/// repeat the phases until nothing changes. Returns the case and the number
/// of accepted steps.
pub fn shrink(mut case: Case, reading: Reading) -> (Case, usize) {
    let mut steps = 0;
    loop {
        let before = steps;
        for phase in [3, 0, 1, 2] {
            while let Some(next) = smaller(&case, phase).into_iter().find(|c| c.fails(reading)) {
                case = next;
                steps += 1;
            }
        }
        if steps == before {
            return (case, steps);
        }
    }
}

/// How large a case is, compared lexicographically: d, L, query heads, b, w, the
/// budget, then the number of non-integer values and the sum of |values|.
fn size(case: &Case) -> (usize, usize, usize, usize, usize, usize, usize, u64) {
    let (q, k, v) = case.heads.tensors();
    let values = || q.iter().chain(k.iter()).chain(v.iter());
    (
        case.heads.dim(),
        case.heads.len(),
        case.heads.num_q_heads(),
        case.block,
        case.window,
        case.keep,
        values().filter(|x| x.round() != **x).count(),
        (values().map(|x| x.abs()).sum::<f64>() * 1e6) as u64,
    )
}

/// Violations shrunk before the smallest is kept (the greedy shrink can stop in a
/// local minimum; several starts make the result smaller, and it stays deterministic).
const STARTS: usize = 32;

/// Searches `cases` random cases drawn with `seed` for a violation of `reading`, shrinks
/// the first [`STARTS`] violations found and returns the smallest result.
pub fn search(reading: Reading, seed: u64, cases: usize) -> Result<Outcome> {
    if cases == 0 {
        return Err(TcaError::Invalid("--cases must be at least 1".into()));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut best: Option<(Case, usize, usize)> = None;
    let mut starts = 0;
    let mut tried = 0;
    while tried < cases && starts < STARTS {
        tried += 1;
        let case = draw(&mut rng)?;
        if case.fails(reading) {
            starts += 1;
            let (small, steps) = shrink(case, reading);
            if best.as_ref().is_none_or(|b| size(&small) < size(&b.0)) {
                best = Some((small, steps, tried));
            }
        }
    }
    match best {
        None => Ok(Outcome::NotFound { tried }),
        Some((case, shrink_steps, at)) => {
            let (audit, keys) = case.violation(reading)?.ok_or_else(|| {
                TcaError::Invalid("the shrunk case no longer fails (a bug in shrink)".into())
            })?;
            Ok(Outcome::Found {
                case: Box::new(case),
                audit: Box::new(audit),
                keys,
                tried: at,
                shrink_steps,
            })
        }
    }
}

/// The witness as text: shapes, configuration, Q, K, V, S_i, gamma, lhs and rhs.
pub fn describe(case: &Case, reading: Reading, a: &QueryAudit, keys: &[usize]) -> String {
    let (q, k, v) = case.heads.tensors();
    let (lhs, rhs, tol) = reading.sides(a, case.config().tau);
    let rows = |t: &Array3<f64>| {
        t.outer_iter()
            .map(|m| {
                m.rows()
                    .into_iter()
                    .map(|r| format!("{:?}", r.to_vec()))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    format!(
        "reading {} ({}) fails\n  d = {}, L = {}, query heads = {}, b = {}, w = {}, {} token(s) kept per block\n  q = [{}]\n  k = [{}]\n  v = [{}]\n  query {} of head {}: S_i = {:?}, gamma = {}\n  lhs = {} > rhs = {} (allowance {:e})",
        reading.key(),
        reading.statement(),
        case.heads.dim(),
        case.heads.len(),
        case.heads.num_q_heads(),
        case.block,
        case.window,
        case.keep,
        rows(q),
        rows(k),
        rows(v),
        a.query,
        a.head,
        keys,
        a.gamma,
        lhs,
        rhs,
        tol
    )
}

/// Writes DIR/witness.safetensors (f64 q, k, v), DIR/config.toml, DIR/profile.json (the
/// point budget as a calibration profile) and DIR/witness.json, so that
/// `tca bound --input DIR/witness.safetensors --config DIR/config.toml --profile
/// DIR/profile.json` reproduces the violation.
pub fn write(
    dir: &Path,
    case: &Case,
    reading: Reading,
    a: &QueryAudit,
    keys: &[usize],
    seed: u64,
    force: bool,
) -> Result<()> {
    let files = [
        "witness.safetensors",
        "config.toml",
        "profile.json",
        "witness.json",
    ];
    for f in files {
        let p = dir.join(f);
        if p.exists() && !force {
            return Err(TcaError::WouldOverwrite(p));
        }
    }
    let cfg = case.config();
    let meta = HashMap::from([
        ("generator".to_string(), "tca counterexample".to_string()),
        ("reading".to_string(), reading.key().to_string()),
        ("seed".to_string(), seed.to_string()),
    ]);
    save_safetensors(
        &case.heads,
        &dir.join(files[0]),
        SaveDtype::F64,
        meta,
        force,
    )?;
    let toml = toml::to_string(&cfg)
        .map_err(|e| TcaError::Invalid(format!("cannot encode the configuration: {e}")))?;
    write_new(&dir.join(files[1]), toml.as_bytes(), force)?;
    // A point budget at k is the log-normal with mu = ln k and a sigma so small that
    // every other weight underflows to 0 (Budget::lognormal normalises in log space).
    let sigma = 1e-3;
    let point = Budget::lognormal((case.keep as f64).ln(), sigma, case.block)?;
    if point != Budget::point(case.keep, case.block)? {
        return Err(TcaError::Invalid(
            "the point budget has no exact log-normal form".into(),
        ));
    }
    let sel = select(&case.heads, &cfg, &case.budgets()?)?;
    let audits = audit(&case.heads, &sel)?;
    let heads = (0..case.heads.num_kv_heads())
        .map(|kv| {
            // The mass criterion's retained score 1 - mean gamma over the KV head's
            // queries.
            let own: Vec<f64> = audits
                .iter()
                .filter(|x| case.heads.kv_of(x.head) == kv)
                .map(|x| x.gamma)
                .collect();
            let retained = 1.0 - own.iter().sum::<f64>() / own.len().max(1) as f64;
            HeadProfile {
                kv_head: kv,
                m: 1,
                mu: (case.keep as f64).ln(),
                sigma,
                expected_budget: case.keep as f64,
                retained,
                reached_tau: retained >= cfg.tau,
                global_tokens: sel.heads[kv].global.len(),
                retained_column: vec![],
                retained_mass: vec![retained],
            }
        })
        .collect();
    let profile = Profile::new(
        ModelShape::of(&case.heads),
        cfg.clone(),
        case.heads.len(),
        vec![LayerProfile {
            layer: 0,
            heads,
            data_hash: Some(crate::calibration::data_hash(&case.heads)),
        }],
    );
    profile.save(&dir.join(files[2]), force)?;
    let (lhs, rhs, tol) = reading.sides(a, cfg.tau);
    let json = serde_json::json!({
        "reading": reading.key(),
        "statement": reading.statement(),
        "seed": seed,
        "dim": case.heads.dim(),
        "len": case.heads.len(),
        "block_size": case.block,
        "window": case.window,
        "kept_per_block": case.keep,
        "head": a.head,
        "query": a.query,
        "key_set": keys,
        "gamma": a.gamma,
        "lhs": lhs,
        "rhs": rhs,
        "allowance": tol,
        "reproduce": "tca bound --input witness.safetensors --config config.toml --profile profile.json --out DIR",
    });
    write_new(
        &dir.join(files[3]),
        serde_json::to_string_pretty(&json)
            .map_err(|e| TcaError::Invalid(e.to_string()))?
            .as_bytes(),
        force,
    )
}
