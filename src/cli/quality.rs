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
use polars::prelude::*;

use super::model::{AttentionKind, CalibrationArgs};
use crate::bound::audit;
use crate::calibration::Profile;
use crate::config::Config;
use crate::error::{Result, TcaError};
use crate::experiments::table::{pe, write};
use crate::model::attention::to_heads;
use crate::model::sparse::{generate_tca, SparsePolicy};
use crate::model::{assets, Exact, Model, QkvHook};
use crate::selection::policies::Policy;
use crate::selection::select;

fn parse_list<T: std::str::FromStr>(flag: &str, s: &str) -> Result<Vec<T>> {
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

fn parse_kinds(s: &str) -> Result<Vec<AttentionKind>> {
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

fn check_out(out: &Path, stem: &str, force: bool) -> Result<PathBuf> {
    let csv = out.join(format!("{stem}.csv"));
    if csv.exists() && !force {
        return Err(TcaError::WouldOverwrite(csv));
    }
    std::fs::create_dir_all(out).map_err(|e| TcaError::io(out, e))?;
    Ok(out.join(stem))
}

/// Columns of f64/str/u64 values, turned into a DataFrame at each write.
#[derive(Default)]
struct Table {
    names: Vec<&'static str>,
    cols: Vec<Col>,
}

enum Col {
    F(Vec<f64>),
    S(Vec<String>),
    U(Vec<u64>),
}

enum Val {
    F(f64),
    S(String),
    U(u64),
}

impl Table {
    fn push(&mut self, row: Vec<(&'static str, Val)>) -> Result<()> {
        if self.names.is_empty() {
            for (n, v) in &row {
                self.names.push(n);
                self.cols.push(match v {
                    Val::F(_) => Col::F(Vec::new()),
                    Val::S(_) => Col::S(Vec::new()),
                    Val::U(_) => Col::U(Vec::new()),
                });
            }
        }
        if row.len() != self.names.len() {
            return Err(TcaError::Shape("table row of another width".into()));
        }
        for ((_, v), c) in row.into_iter().zip(&mut self.cols) {
            match (v, c) {
                (Val::F(x), Col::F(c)) => c.push(x),
                (Val::S(x), Col::S(c)) => c.push(x),
                (Val::U(x), Col::U(c)) => c.push(x),
                _ => return Err(TcaError::Shape("table column of another type".into())),
            }
        }
        Ok(())
    }

    fn write(&self, stem: &Path) -> Result<()> {
        let cols: Vec<Column> = self
            .names
            .iter()
            .zip(&self.cols)
            .map(|(n, c)| match c {
                Col::F(v) => Column::new((*n).into(), v),
                Col::S(v) => Column::new((*n).into(), v),
                Col::U(v) => Column::new((*n).into(), v),
            })
            .collect();
        let height = cols.first().map_or(0, |c| c.len());
        let mut df = DataFrame::new(height, cols).map_err(pe(stem))?;
        write(stem, &mut df)?;
        Ok(())
    }
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
    let cfg = a.calibration.config()?;
    let model = Model::load(assets::model_path(a.model.as_deref())?)?;
    let text = assets::read_text(a.text.as_deref())?;
    let all = model.tokenizer.encode(&text)?;
    if let Some(&n) = lengths.iter().find(|&&n| n < 2 || n > all.len()) {
        return Err(TcaError::Invalid(format!(
            "--lengths: {n} is outside 2..={} (the text's tokens)",
            all.len()
        )));
    }
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
    let mut table = Table::default();
    for &n in &lengths {
        let tokens = &all[..n];
        let t = Instant::now();
        let exact = model.llama.score(tokens, &Exact::default(), 1)?;
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
                let pol = SparsePolicy::new(
                    kind.policy().unwrap_or(Policy::Tca),
                    c,
                    profiles[i].clone(),
                )?;
                let t = Instant::now();
                let s = model.llama.score(tokens, &pol, 1)?;
                (s, pol.mean_keep_fraction(), t.elapsed().as_secs_f64())
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
            ])?;
            table.write(&stem)?;
        }
    }
    println!("wrote {}.csv and .parquet", stem.display());
    Ok(())
}

/// Arguments of `tca quality-niah`.
#[derive(Debug, Clone, Args)]
pub struct QualityNiahArgs {
    /// Haystack lengths in tokens (the whole prompt, question included; the prompt plus
    /// the answer tokens must fit in the model's 8,192-token context).
    #[arg(long, default_value = "1024,2048,4096,8182")]
    pub lengths: String,
    /// Needle depths in percent of the haystack.
    #[arg(long, default_value = "0,25,50,75,100")]
    pub depths: String,
    /// Attentions to compare.
    #[arg(
        long,
        default_value = "exact,tca,oracle_topk,streaming_llm,block_topk,cumulative_threshold"
    )]
    pub attention: String,
    /// Lengths above this run only `--long-attention`.
    #[arg(long, default_value_t = usize::MAX)]
    pub long_from: usize,
    #[arg(long, default_value = "exact,tca")]
    pub long_attention: String,
    /// Calibration targets tau for TCA and the peers (default: the configuration's tau).
    #[arg(long, default_value = "")]
    pub taus: String,
    /// Seed of the needles' random numbers.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Tokens generated for the answer.
    #[arg(long, default_value_t = 10)]
    pub answer_tokens: usize,
    /// Folder of the essays (default: the cache's PaulGrahamEssays).
    #[arg(long)]
    pub essays: Option<PathBuf>,
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
}

/// The needle's number of (length, depth): 7 digits from a seeded SplitMix64.
pub fn needle_number(seed: u64, len: usize, depth: u64) -> u64 {
    let mut z = seed
        .wrapping_add((len as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(depth.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    1_000_000 + z % 9_000_000
}

/// Prompt tokens of one NIAH case: `len` tokens in all, the needle sentence planted at
/// `depth` percent of the haystack part, at the start of a sentence when one begins
/// nearby.
pub fn niah_prompt(
    model: &Model,
    hay: &[u32],
    len: usize,
    depth: u64,
    number: u64,
) -> Result<Vec<u32>> {
    let tok = &model.tokenizer;
    let needle = tok.encode(&format!(
        " The special magic number is {number}. Remember it: the special magic number is {number}."
    ))?;
    let question = tok.encode(
        "\n\nQuestion: What is the special magic number mentioned in the text above?\nAnswer: The special magic number is",
    )?;
    let fixed = needle.len() + question.len();
    if len <= fixed + 16 {
        return Err(TcaError::Invalid(format!(
            "NIAH length {len} leaves no room for a haystack ({fixed} tokens of needle and question)"
        )));
    }
    let n_hay = len - fixed;
    if n_hay > hay.len() {
        return Err(TcaError::Invalid(format!(
            "NIAH length {len}: the haystack has only {} tokens",
            hay.len()
        )));
    }
    let hay = &hay[..n_hay];
    let mut at = (n_hay as u64 * depth.min(100) / 100) as usize;
    // Move to just after the nearest full stop within 40 tokens before, if any.
    let dot = tok.encode(".")?;
    if at > 0 && at < n_hay {
        if let Some(p) = (at.saturating_sub(40)..at)
            .rev()
            .find(|&p| dot.contains(&hay[p]))
        {
            at = p + 1;
        }
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&hay[..at]);
    out.extend_from_slice(&needle);
    out.extend_from_slice(&hay[at..]);
    out.extend_from_slice(&question);
    Ok(out)
}

/// `tca quality-niah`.
pub fn run_quality_niah(a: QualityNiahArgs) -> Result<()> {
    let stem = check_out(&a.out, "niah", a.force)?;
    let lengths: Vec<usize> = parse_list("--lengths", &a.lengths)?;
    let depths: Vec<u64> = parse_list("--depths", &a.depths)?;
    let kinds = parse_kinds(&a.attention)?;
    let long_kinds = parse_kinds(&a.long_attention)?;
    if a.answer_tokens == 0 {
        return Err(TcaError::Invalid(
            "--answer-tokens must be at least 1".into(),
        ));
    }
    let cfg = a.calibration.config()?;
    let taus: Vec<f64> = if a.taus.trim().is_empty() {
        vec![cfg.tau]
    } else {
        parse_list("--taus", &a.taus)?
    };
    for &tau in &taus {
        Config { tau, ..cfg.clone() }.validate()?;
    }
    let model = Model::load(assets::model_path(a.model.as_deref())?)?;
    if let Some(&n) = lengths
        .iter()
        .find(|&&n| n + a.answer_tokens > model.llama.config.context)
    {
        return Err(TcaError::Invalid(format!(
            "NIAH length {n} plus the answer exceeds the model's context"
        )));
    }
    let hay = model
        .tokenizer
        .encode(&assets::haystack(a.essays.as_deref())?)?;
    let profiles = if kinds
        .iter()
        .chain(&long_kinds)
        .any(|k| k.policy().is_some())
    {
        a.calibration.profiles(&model, &cfg, &taus)?
    } else {
        Vec::new()
    };
    let eos = Some(model.tokenizer.eos_id);
    let mut table = Table::default();
    for &n in &lengths {
        for &depth in &depths {
            let number = needle_number(a.seed, n, depth);
            let prompt = niah_prompt(&model, &hay, n, depth, number)?;
            let mut exact_answer = String::new();
            let ks = if n > a.long_from { &long_kinds } else { &kinds };
            // TCA runs twice: with its compacted decoding cache (docs/algorithm.md §3), and
            // with its prefill followed by exact decoding over the full cache (as the
            // peers decode), to separate the two phases.
            // Each sparse attention runs once per tau, with that tau's profile.
            let mut runs: Vec<(AttentionKind, bool, usize)> = Vec::new();
            for &k in ks {
                if k.policy().is_none() {
                    runs.push((k, false, 0));
                    continue;
                }
                for ti in 0..taus.len() {
                    runs.push((k, false, ti));
                    if k == AttentionKind::Tca {
                        runs.push((k, true, ti));
                    }
                }
            }
            for (kind, full_decode, ti) in runs {
                let t = Instant::now();
                let cfg = kind.config(&Config {
                    tau: taus[ti],
                    ..cfg.clone()
                });
                let profile = profiles.get(ti).cloned();
                let (out, keep) = match kind.policy() {
                    Some(Policy::Tca) if !full_decode => {
                        let prof = profile.clone().ok_or_else(|| {
                            TcaError::Invalid("TCA needs a calibration profile".into())
                        })?;
                        let mut pol = SparsePolicy::new(Policy::Tca, cfg.clone(), prof)?;
                        let (out, _) =
                            generate_tca(&model.llama, &prompt, a.answer_tokens, &mut pol, eos)?;
                        (out, pol.mean_keep_fraction())
                    }
                    Some(p) => {
                        let prof = profile.clone().ok_or_else(|| {
                            TcaError::Invalid(format!("{} needs a calibration profile", p.name()))
                        })?;
                        let pol = SparsePolicy::new(p, cfg.clone(), prof)?;
                        let out =
                            model
                                .llama
                                .generate_greedy(&prompt, a.answer_tokens, &pol, eos)?;
                        (out, pol.mean_keep_fraction())
                    }
                    None => {
                        let out = model.llama.generate_greedy(
                            &prompt,
                            a.answer_tokens,
                            &Exact::default(),
                            eos,
                        )?;
                        (out, 1.0)
                    }
                };
                let label = match (kind, full_decode) {
                    (AttentionKind::Tca, true) => "tca_prefill_full_decode",
                    _ => kind.name(),
                };
                let tau = if kind.policy().is_some() {
                    cfg.tau
                } else {
                    f64::NAN
                };
                let secs = t.elapsed().as_secs_f64();
                let answer = model.tokenizer.decode(&out)?;
                let digits: String = answer
                    .chars()
                    .skip_while(|c| !c.is_ascii_digit())
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                let correct = digits == number.to_string();
                if kind == AttentionKind::Exact {
                    exact_answer = digits.clone();
                }
                let agrees = !exact_answer.is_empty() && digits == exact_answer;
                println!(
                    "L = {n:>5} depth {depth:>3}%  {label:<24} tau {:<5} want {number} got {:<12} {} {}  {secs:.1} s",
                    if tau.is_nan() { "-".to_string() } else { tau.to_string() },
                    format!("{digits:?}"),
                    if correct { "correct" } else { "wrong  " },
                    if agrees { "(= exact)" } else { "" }
                );
                table.push(vec![
                    ("length", Val::U(n as u64)),
                    ("depth_pct", Val::U(depth)),
                    ("attention", Val::S(label.into())),
                    ("tau", Val::F(tau)),
                    ("needle", Val::U(number)),
                    ("answer", Val::S(answer.replace('\n', "\\n"))),
                    ("correct", Val::U(correct as u64)),
                    ("agrees_with_exact", Val::U(agrees as u64)),
                    ("prefill_keep_fraction", Val::F(keep)),
                    ("seconds", Val::F(secs)),
                ])?;
                table.write(&stem)?;
            }
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
    let stem = check_out(&a.out, "heads", a.force)?;
    let cfg = a.calibration.config()?;
    let model = Model::load(assets::model_path(a.model.as_deref())?)?;
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
