//! End-to-end quality of TCA on SmolLM2-135M (docs/quality.md):
//!
//! - `tca quality-ppl`: perplexity, top-1 accuracy and top-1 agreement with exact
//!   attention over the first N tokens of a text, for exact attention and TCA across
//!   tau (and the peer policies at one tau), with the keep fraction;
//! - `tca quality-niah`: needle-in-a-haystack retrieval for each attention;
//! - `tca quality-heads`: per layer and KV head, the calibrated budget, keep fraction
//!   and the omitted mass gamma of every query (the bound audit).
//!
//! Each writes its table as CSV and Parquet (`crate::experiments::table::write`),
//! rewritten after every row so that a long run leaves what it measured.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use ndarray::ArrayView3;

use super::gpu::Engine;
use super::model::{AttentionKind, CalibrationArgs, RopeArgs};
use crate::backend::BackendKind;
use crate::bound::audit;
use crate::calibration::Profile;
use crate::config::Config;
use crate::error::{Result, TcaError};
use crate::experiments::table::{Table, Val};
use crate::model::attention::to_heads;
use crate::model::sparse::SparsePolicy;
use crate::model::{assets, Exact, QkvHook};
use crate::selection::policies::Policy;
use crate::selection::select;

pub(crate) fn parse_list<T: std::str::FromStr>(flag: &str, s: &str) -> Result<Vec<T>> {
    let v = s
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|_| TcaError::Invalid(format!("{flag}: {x:?} is not a valid value")))
        })
        .collect::<Result<Vec<T>>>()?;
    if v.is_empty() {
        return Err(TcaError::Invalid(format!("{flag}: empty list")));
    }
    Ok(v)
}

pub(crate) fn parse_kinds(s: &str) -> Result<Vec<AttentionKind>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            let x = x.trim();
            AttentionKind::ALL
                .into_iter()
                .find(|k| k.name() == x || k.name().replace('_', "-") == x)
                .ok_or_else(|| {
                    TcaError::Invalid(format!(
                        "unknown attention {x:?} (one of {})",
                        AttentionKind::ALL.map(|k| k.name()).join(", ")
                    ))
                })
        })
        .collect()
}

pub(crate) fn check_out(out: &Path, stem: &str, force: bool) -> Result<PathBuf> {
    let csv = out.join(format!("{stem}.csv"));
    if csv.exists() && !force {
        return Err(TcaError::WouldOverwrite(csv));
    }
    std::fs::create_dir_all(out).map_err(|e| TcaError::io(out, e))?;
    Ok(out.join(stem))
}

/// Arguments of `tca quality-ppl`.
#[derive(Debug, Clone, Args)]
pub struct QualityPplArgs {
    /// Evaluation text (default: the embedded Pride and Prejudice, from its start).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Context lengths (tokens from the start of the text), one prefill each.
    #[arg(long, default_value = "2048,4096,8192")]
    pub lengths: String,
    /// Calibration targets tau for TCA.
    #[arg(long, default_value = "0.3,0.5,0.7,0.8,0.9,0.95")]
    pub taus: String,
    /// Restrict TCA at lengths above this to the taus of `--long-taus`.
    #[arg(long, default_value_t = usize::MAX)]
    pub long_from: usize,
    /// Taus run at lengths above `--long-from`.
    #[arg(long, default_value = "0.9")]
    pub long_taus: String,
    /// Peer policies run at `--peer-tau`, at lengths up to `--peer-max-len`.
    #[arg(long, default_value = "")]
    pub peers: String,
    #[arg(long, default_value_t = 0.9)]
    pub peer_tau: f64,
    #[arg(long, default_value_t = 2048)]
    pub peer_max_len: usize,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Output folder (ppl.csv, ppl.parquet).
    #[arg(long, default_value = "results/quality")]
    pub out: PathBuf,
    #[arg(long)]
    pub force: bool,
    /// Model: a GGUF file or a Hugging Face folder (default: the cache's
    /// SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub rope: RopeArgs,
    /// Where the model runs: cpu (f32; every attention) or cuda (every attention but
    /// tca_certified).
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
}

/// `tca quality-ppl`.
pub fn run_quality_ppl(a: QualityPplArgs) -> Result<()> {
    let stem = check_out(&a.out, "ppl", a.force)?;
    let lengths: Vec<usize> = parse_list("--lengths", &a.lengths)?;
    let mut taus: Vec<f64> = parse_list("--taus", &a.taus)?;
    let long_taus: Vec<f64> = parse_list("--long-taus", &a.long_taus)?;
    let peers = if a.peers.trim().is_empty() {
        Vec::new()
    } else {
        parse_kinds(&a.peers)?
    };
    for t in long_taus.iter().chain([&a.peer_tau]) {
        if !taus.iter().any(|x| x == t) {
            taus.push(*t);
        }
    }
    if a.backend == BackendKind::Cuda {
        if let Some(k) = peers.iter().find(|k| !k.on_gpu()) {
            return Err(k.gpu_refusal());
        }
    }
    let cfg = a.calibration.config()?;
    let model = a.rope.load(a.model.as_deref())?;
    if let Some(&n) = lengths.iter().find(|&&n| n > model.llama.config.context) {
        return Err(TcaError::Invalid(format!(
            "--lengths: {n} exceeds the model's context of {} (see --rope-scaling)",
            model.llama.config.context
        )));
    }
    let text = assets::read_text(a.text.as_deref())?;
    let all = model.tokenizer.encode(&text)?;
    if let Some(&n) = lengths.iter().find(|&&n| n < 2 || n > all.len()) {
        return Err(TcaError::Invalid(format!(
            "--lengths: {n} is outside 2..={} (the text's tokens)",
            all.len()
        )));
    }
    let engine = match a.backend {
        BackendKind::Cuda => Some(Engine::open(&model)?),
        BackendKind::Cpu => None,
    };
    let t0 = Instant::now();
    let profiles = a.calibration.profiles(&model, &cfg, &taus)?;
    let calib_s = t0.elapsed().as_secs_f64();
    println!(
        "calibrated {} taus in {calib_s:.1} s (b = {}, w = {}, criterion {:?})",
        taus.len(),
        cfg.block_size,
        cfg.window,
        cfg.criterion
    );
    let backend = match &engine {
        Some(e) => format!("cuda ({})", e.device()),
        None => "cpu".to_string(),
    };
    let rope = format!("{:?}", model.llama.config.rope_scaling);
    let mut table = Table::default();
    for &n in &lengths {
        let tokens = &all[..n];
        let t = Instant::now();
        let exact = match &engine {
            Some(e) => e.score(tokens, None, 1)?.0,
            None => model.llama.score(tokens, &Exact::default(), 1)?,
        };
        let exact_s = t.elapsed().as_secs_f64();
        let mut rows: Vec<(AttentionKind, f64)> = vec![(AttentionKind::Exact, f64::NAN)];
        for &tau in &taus {
            let long_ok = n <= a.long_from || long_taus.contains(&tau);
            let from_list = parse_list::<f64>("--taus", &a.taus)?.contains(&tau);
            if from_list && long_ok {
                rows.push((AttentionKind::Tca, tau));
            }
        }
        if n <= a.peer_max_len {
            rows.extend(peers.iter().map(|&k| (k, a.peer_tau)));
        }
        for (kind, tau) in rows {
            let (score, keep, secs) = if kind == AttentionKind::Exact {
                (exact.clone(), 1.0, exact_s)
            } else {
                let i = taus.iter().position(|&x| x == tau).unwrap_or(0);
                let c = kind.config(&Config { tau, ..cfg.clone() });
                let t = Instant::now();
                match &engine {
                    Some(e) => {
                        let p = kind.policy().unwrap_or(Policy::Tca);
                        let (s, keep) = e.score(tokens, Some((p, &c, &profiles[i])), 1)?;
                        (s, keep, t.elapsed().as_secs_f64())
                    }
                    None => {
                        let pol = SparsePolicy::new(
                            kind.policy().unwrap_or(Policy::Tca),
                            c,
                            profiles[i].clone(),
                        )?;
                        let s = model.llama.score(tokens, &pol, 1)?;
                        (s, pol.mean_keep_fraction(), t.elapsed().as_secs_f64())
                    }
                }
            };
            let agree = score.agreement(&exact)?;
            println!(
                "L = {n:>5}  {:<20} tau {:<5} keep {keep:.4}  ppl {:>8.4}  top1 {:.4}  agree {agree:.4}  {secs:.1} s",
                kind.name(),
                if tau.is_nan() { "-".to_string() } else { tau.to_string() },
                score.perplexity(),
                score.top1()
            );
            table.push(vec![
                ("length", Val::U(n as u64)),
                ("attention", Val::S(kind.name().into())),
                ("tau", Val::F(tau)),
                ("block_size", Val::U(cfg.block_size as u64)),
                ("window", Val::U(cfg.window as u64)),
                ("keep_fraction", Val::F(keep)),
                ("perplexity", Val::F(score.perplexity())),
                ("top1_text", Val::F(score.top1())),
                ("top1_agreement_exact", Val::F(agree)),
                ("seconds", Val::F(secs)),
                ("tokens_per_s", Val::F(n as f64 / secs)),
                ("rope_scaling", Val::S(rope.clone())),
                ("backend", Val::S(backend.clone())),
            ])?;
            table.write(&stem)?;
        }
    }
    println!("wrote {}.csv and .parquet", stem.display());
    Ok(())
}

/// Arguments of `tca quality-heads`.
#[derive(Debug, Clone, Args)]
pub struct QualityHeadsArgs {
    /// Evaluation text (default: the embedded novel, from its start).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens of the evaluation passage.
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    #[arg(long, default_value = "results/quality")]
    pub out: PathBuf,
    #[arg(long)]
    pub force: bool,
    /// Model: a GGUF file or a Hugging Face folder (default: the cache's
    /// SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub rope: RopeArgs,
    /// cpu: the exact forward's Q, K, V audited under TCA's selection (f64 oracle,
    /// heads.csv). cuda: a TCA forward on the GPU with every layer audited
    /// (layers_L{N}.csv, one row per layer and query head) and the eviction regret of
    /// decoding over the compacted cache (regret_L{N}.csv).
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// cuda: decode steps measuring the eviction regret (after the first L - N tokens
    /// of the passage; at most b).
    #[arg(long, default_value_t = 16)]
    pub decode_tokens: usize,
    /// cuda: rows per layer the f64 oracle audits (a seeded sample).
    #[arg(long, default_value_t = 2048)]
    pub oracle_rows: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Audits every layer of an exact forward pass under the profile's TCA selection.
struct HeadsHook<'a> {
    cfg: &'a Config,
    profile: &'a Profile,
    table: Table,
    stem: PathBuf,
}

impl QkvHook for HeadsHook<'_> {
    fn record(
        &mut self,
        layer: usize,
        q: ArrayView3<f32>,
        k: ArrayView3<f32>,
        v: ArrayView3<f32>,
    ) -> Result<()> {
        let t = Instant::now();
        let heads = to_heads(q, k, v)?;
        self.profile.check_fits(&heads, self.cfg, layer)?;
        let sel = select(&heads, self.cfg, &self.profile.budgets(layer)?)?;
        let audits = audit(&heads, &sel)?;
        let l = heads.len();
        let lim = 1.0 - self.cfg.tau;
        for (kv, hp) in self.profile.layer(layer)?.heads.iter().enumerate() {
            let rows: Vec<_> = audits
                .iter()
                .filter(|a| heads.kv_of(a.head) == kv)
                .collect();
            let n = rows.len().max(1) as f64;
            let gam: Vec<f64> = rows.iter().map(|a| a.gamma).collect();
            let keep = rows
                .iter()
                .map(|a| a.kept as f64 / (a.query + 1) as f64)
                .sum::<f64>()
                / n;
            let above = gam.iter().filter(|&&g| g > lim).count() as f64 / n;
            self.table.push(vec![
                ("layer", Val::U(layer as u64)),
                ("kv_head", Val::U(kv as u64)),
                ("m", Val::U(hp.m as u64)),
                ("expected_budget", Val::F(hp.expected_budget)),
                ("reached_tau", Val::U(hp.reached_tau as u64)),
                ("calib_retained", Val::F(hp.retained)),
                ("global_tokens", Val::U(sel.heads[kv].global.len() as u64)),
                ("keep_fraction", Val::F(keep)),
                ("mean_gamma", Val::F(gam.iter().sum::<f64>() / n)),
                ("max_gamma", Val::F(gam.iter().copied().fold(0.0, f64::max))),
                ("frac_gamma_above_1_minus_tau", Val::F(above)),
                (
                    "mean_rel_err",
                    Val::F(rows.iter().map(|a| a.rel_err()).sum::<f64>() / n),
                ),
            ])?;
        }
        self.table.write(&self.stem)?;
        println!(
            "layer {layer:>2}: audited {} queries x {} heads in {:.1} s",
            l,
            heads.num_q_heads(),
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// `tca quality-heads`.
pub fn run_quality_heads(a: QualityHeadsArgs) -> Result<()> {
    if a.backend == BackendKind::Cuda {
        return run_quality_heads_gpu(a);
    }
    let stem = check_out(&a.out, "heads", a.force)?;
    let cfg = a.calibration.config()?;
    let model = a.rope.load(a.model.as_deref())?;
    let text = assets::read_text(a.text.as_deref())?;
    let mut tokens = model.tokenizer.encode(&text)?;
    if a.tokens < 2 || a.tokens > tokens.len() || a.tokens > model.llama.config.context {
        return Err(TcaError::Invalid(format!(
            "--tokens {} outside 2..={}",
            a.tokens,
            tokens.len().min(model.llama.config.context)
        )));
    }
    tokens.truncate(a.tokens);
    let profile = a
        .calibration
        .profiles(&model, &cfg, &[cfg.tau])?
        .pop()
        .ok_or_else(|| TcaError::Invalid("no profile".into()))?;
    let mut hook = HeadsHook {
        cfg: &cfg,
        profile: &profile,
        table: Table::default(),
        stem: stem.clone(),
    };
    model
        .llama
        .prefill_hidden(&tokens, &Exact::default(), Some(&mut hook), None)?;
    println!("wrote {}.csv and .parquet", stem.display());
    Ok(())
}

/// `tca quality-heads --backend cuda`: the per-layer audit of a TCA forward on the GPU
/// and the eviction regret of compact decoding.
fn run_quality_heads_gpu(a: QualityHeadsArgs) -> Result<()> {
    let n = a.tokens;
    let stem = check_out(&a.out, &format!("layers_L{n}"), a.force)?;
    let rstem = check_out(&a.out, &format!("regret_L{n}"), a.force)?;
    let cfg = a.calibration.config()?;
    let model = a.rope.load(a.model.as_deref())?;
    let text = assets::read_text(a.text.as_deref())?;
    let mut tokens = model.tokenizer.encode(&text)?;
    let ctx = model.llama.config.context;
    if n < 2 || n > tokens.len() || n > ctx {
        return Err(TcaError::Invalid(format!(
            "--tokens {n} outside 2..={} (the text's tokens and the model's context; see --rope-scaling)",
            tokens.len().min(ctx)
        )));
    }
    if a.decode_tokens == 0 || a.decode_tokens > cfg.block_size || a.decode_tokens >= n {
        return Err(TcaError::Invalid(format!(
            "--decode-tokens {} outside 1..={} (b, and fewer than --tokens)",
            a.decode_tokens,
            cfg.block_size.min(n - 1)
        )));
    }
    tokens.truncate(n);
    let engine = Engine::open(&model)?;
    let profile = a
        .calibration
        .profiles(&model, &cfg, &[cfg.tau])?
        .pop()
        .ok_or_else(|| TcaError::Invalid("no profile".into()))?;
    let rope = format!("{:?}", model.llama.config.rope_scaling);
    let t0 = Instant::now();
    let (score, rows, keep, audit_s) =
        engine.audited(&tokens, &cfg, &profile, a.oracle_rows, a.seed)?;
    let forward_s = t0.elapsed().as_secs_f64() - audit_s;
    let mut table = Table::default();
    for r in &rows {
        let mut row: Vec<(String, Val)> = vec![
            ("length".into(), Val::U(n as u64)),
            ("layer".into(), Val::U(r.layer as u64)),
            ("q_head".into(), Val::U(r.q_head as u64)),
            ("kv_head".into(), Val::U(r.kv_head as u64)),
            ("tau".into(), Val::F(cfg.tau)),
            ("queries".into(), Val::U(r.queries as u64)),
            ("keep_fraction".into(), Val::F(r.keep_fraction)),
            ("mean_gamma".into(), Val::F(r.mean_gamma)),
            ("max_gamma".into(), Val::F(r.max_gamma)),
            (
                "frac_gamma_above_1_minus_tau".into(),
                Val::F(r.frac_gamma_above),
            ),
            ("non_finite".into(), Val::U(r.non_finite as u64)),
        ];
        for &(k, v, m, p) in &r.readings {
            row.push((format!("{k}_violations"), Val::U(v as u64)));
            row.push((format!("{k}_measured"), Val::U(m as u64)));
            row.push((format!("{k}_with_power"), Val::U(p as u64)));
        }
        row.extend([
            ("oracle_rows".into(), Val::U(r.oracle_rows as u64)),
            (
                "oracle_true_violations".into(),
                Val::U(r.oracle_true_violations as u64),
            ),
            (
                "oracle_max_gamma_diff".into(),
                Val::F(r.oracle_max_gamma_diff),
            ),
            ("rope_scaling".into(), Val::S(rope.clone())),
            ("device".into(), Val::S(engine.device())),
        ]);
        table.push(row)?;
    }
    table.write(&stem)?;
    let agg = |f: &dyn Fn(&crate::bound::layers::HeadAuditRow) -> f64| {
        rows.iter().map(f).sum::<f64>() / rows.len().max(1) as f64
    };
    let true_viol: usize = rows
        .iter()
        .map(|r| r.readings[..3].iter().map(|x| x.1).sum::<usize>())
        .sum();
    let measured: usize = rows
        .iter()
        .map(|r| r.readings[..3].iter().map(|x| x.2).sum::<usize>())
        .sum();
    let oracle_rows: usize = rows.iter().map(|r| r.oracle_rows).sum();
    let oracle_viol: usize = rows.iter().map(|r| r.oracle_true_violations).sum();
    println!(
        "L = {n} ({rope}): perplexity {:.4} with TCA (tau {}, keep {keep:.4}); forward {forward_s:.1} s, audit {audit_s:.1} s",
        score.perplexity(),
        cfg.tau
    );
    println!(
        "  mean gamma {:.4}, share of queries with gamma > 1 - tau {:.4}; true readings (linf_entrymax, l1_induced, l2_diameter): {true_viol} violations in {measured} checks (self-audit, every query); oracle sample: {oracle_viol} violations of the identity and the true readings in {oracle_rows} rows x 4",
        agg(&|r| r.mean_gamma),
        agg(&|r| r.frac_gamma_above)
    );
    // Eviction regret: decode over the compacted cache after the first L - N tokens.
    let prompt = &tokens[..n - a.decode_tokens];
    let g = engine.generate(
        prompt,
        a.decode_tokens,
        Some((Policy::Tca, &cfg, &profile)),
        true,
        None,
    )?;
    let c = &model.llama.config;
    let group = c.n_heads / c.n_kv_heads;
    let mut rt = Table::default();
    let layers = g.regret.first().map_or(0, |s| s.len());
    for li in 0..layers {
        let per_step: Vec<Vec<f64>> = g.regret.iter().map(|s| s[li].clone()).collect();
        for (kv, (mean, max)) in crate::bound::layers::regret_by_kv(&per_step, group, c.n_kv_heads)
            .into_iter()
            .enumerate()
        {
            rt.push(vec![
                ("length", Val::U(prompt.len() as u64)),
                ("layer", Val::U(li as u64)),
                ("kv_head", Val::U(kv as u64)),
                ("steps", Val::U(per_step.len() as u64)),
                ("mean_regret", Val::F(mean)),
                ("max_regret", Val::F(max)),
                ("tau", Val::F(cfg.tau)),
                ("rope_scaling", Val::S(rope.clone())),
            ])?;
        }
    }
    rt.write(&rstem)?;
    println!(
        "  eviction regret over {} decode steps: mean {:.4}; decode {:.1} ms/token; wrote {}.csv and {}.csv",
        g.regret.len(),
        g.mean_regret(),
        1e3 * g.decode_s / g.tokens.len().saturating_sub(1).max(1) as f64,
        stem.display(),
        rstem.display()
    );
    Ok(())
}
