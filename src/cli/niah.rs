//! `tca quality-niah`: needle-in-a-haystack retrieval on the real model, for exact
//! attention, TCA (with its compacted decoding cache, and with its prefill followed by
//! exact decoding over the full cache) and the peer policies, on the CPU (f32 forward)
//! or the GPU (`--backend cuda`: exact and TCA).
//!
//! Tasks: `niah`, one needle sentence planted at a depth of the haystack (the Paul
//! Graham essays); `mk_niah`, RULER's multi-key variant: the needle for one key among
//! three distractor needles for other keys (at seeded depths), and the question names
//! the key. A case is correct when the first run of digits in the greedy answer is the
//! needle's number. Each seed draws other numbers (and distractors) and reads the
//! haystack from another offset (4,096 tokens per seed index). The summary gives each
//! (task, length, attention, tau) its accuracy with a Wilson 95 % interval.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use super::gpu::Engine;
use super::model::{AttentionKind, CalibrationArgs, RopeArgs};
use crate::backend::BackendKind;
use crate::config::Config;
use crate::error::{Result, TcaError};
use crate::experiments::stats::wilson;
use crate::experiments::table::{Table, Val};
use crate::model::sparse::{generate_tca, SparsePolicy};
use crate::model::{assets, Exact, Model};
use crate::selection::policies::Policy;

use super::quality::{check_out, parse_kinds, parse_list};

/// Tokens of haystack offset between consecutive seeds.
pub const SEED_OFFSET: usize = 4096;

/// Arguments of `tca quality-niah`.
#[derive(Debug, Clone, Args)]
pub struct QualityNiahArgs {
    /// Haystack lengths in tokens (the whole prompt, question included; the prompt plus
    /// the answer tokens must fit in the model's context, see --rope-scaling).
    #[arg(long, default_value = "1024,2048,4096,8182")]
    pub lengths: String,
    /// Needle depths in percent of the haystack.
    #[arg(long, default_value = "0,25,50,75,100")]
    pub depths: String,
    /// Tasks: niah, mk_niah (the needle among three distractor keys), or both.
    #[arg(long, default_value = "niah")]
    pub tasks: String,
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
    /// Seed of the needles' random numbers (one trial per depth).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Several seeds, comma-separated (replaces --seed): one trial per depth and seed.
    #[arg(long)]
    pub seeds: Option<String>,
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
    #[command(flatten)]
    pub rope: RopeArgs,
    /// Where the model runs: cpu (f32; every attention) or cuda (every attention but
    /// tca_certified).
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
}

/// The needle's number of (length, depth): 7 digits from a seeded SplitMix64.
pub fn needle_number(seed: u64, len: usize, depth: u64) -> u64 {
    1_000_000 + splitmix(seed, len as u64, depth) % 9_000_000
}

fn splitmix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed
        .wrapping_add(a.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(b.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Keys of the multi-key task.
pub const KEYS: [&str; 12] = [
    "apple", "river", "candle", "harbor", "violet", "lantern", "meadow", "copper", "falcon",
    "glacier", "orchid", "saddle",
];

/// A needle-in-a-haystack case: the prompt tokens and the number asked for.
#[derive(Debug, Clone)]
pub struct NiahCase {
    pub prompt: Vec<u32>,
    pub number: u64,
}

/// `len` prompt tokens: `hay` with each needle (depth in percent of the haystack part,
/// tokens) planted at the start of a sentence near its depth (the nearest full stop
/// within 40 tokens before), then the question.
pub fn plant(
    model: &Model,
    hay: &[u32],
    len: usize,
    needles: &[(u64, Vec<u32>)],
    question: &[u32],
) -> Result<Vec<u32>> {
    let fixed: usize = needles.iter().map(|n| n.1.len()).sum::<usize>() + question.len();
    if len <= fixed + 16 {
        return Err(TcaError::Invalid(format!(
            "NIAH length {len} leaves no room for a haystack ({fixed} tokens of needles and question)"
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
    let dot = model.tokenizer.encode(".")?;
    let mut at: Vec<(usize, usize)> = needles
        .iter()
        .enumerate()
        .map(|(k, (depth, _))| {
            let mut a = (n_hay as u64 * (*depth).min(100) / 100) as usize;
            if a > 0 && a < n_hay {
                if let Some(p) = (a.saturating_sub(40)..a)
                    .rev()
                    .find(|&p| dot.contains(&hay[p]))
                {
                    a = p + 1;
                }
            }
            (a, k)
        })
        .collect();
    at.sort_unstable();
    let mut out = Vec::with_capacity(len);
    let mut from = 0;
    for (a, k) in at {
        out.extend_from_slice(&hay[from..a]);
        out.extend_from_slice(&needles[k].1);
        from = a;
    }
    out.extend_from_slice(&hay[from..]);
    out.extend_from_slice(question);
    Ok(out)
}

/// Prompt tokens of one single-needle case: `len` tokens in all, the needle sentence
/// planted at `depth` percent of the haystack part.
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
    plant(model, hay, len, &[(depth, needle)], &question)
}

/// One case of `task` ("niah" or "mk_niah") at (len, depth, seed).
pub fn niah_case(
    model: &Model,
    hay: &[u32],
    task: &str,
    len: usize,
    depth: u64,
    seed: u64,
) -> Result<NiahCase> {
    let number = needle_number(seed, len, depth);
    match task {
        "niah" => Ok(NiahCase {
            prompt: niah_prompt(model, hay, len, depth, number)?,
            number,
        }),
        "mk_niah" => {
            // Four distinct keys: the first is asked for; the others are distractors at
            // seeded depths with their own numbers.
            let mut keys: Vec<usize> = Vec::new();
            let mut i = 0u64;
            while keys.len() < 4 {
                let k = (splitmix(seed ^ 0x6b65_7973, len as u64 + i, depth) % KEYS.len() as u64)
                    as usize;
                if !keys.contains(&k) {
                    keys.push(k);
                }
                i += 1;
            }
            let tok = &model.tokenizer;
            let sentence = |key: &str, n: u64| {
                tok.encode(&format!(" The special magic number for {key} is {n}."))
            };
            let mut needles = vec![(depth, sentence(KEYS[keys[0]], number)?)];
            for (j, &k) in keys[1..].iter().enumerate() {
                let r = splitmix(seed ^ 0x6469_7374, len as u64, depth * 8 + j as u64);
                let n = 1_000_000 + (r >> 8) % 9_000_000;
                needles.push((r % 101, sentence(KEYS[k], n)?));
            }
            let question = tok.encode(&format!(
                "\n\nQuestion: What is the special magic number for {} mentioned in the text above?\nAnswer: The special magic number for {} is",
                KEYS[keys[0]], KEYS[keys[0]]
            ))?;
            Ok(NiahCase {
                prompt: plant(model, hay, len, &needles, &question)?,
                number,
            })
        }
        other => Err(TcaError::Invalid(format!(
            "unknown NIAH task {other:?} (niah, mk_niah)"
        ))),
    }
}

/// The first run of ASCII digits in `answer` (empty if none).
pub fn first_digits(answer: &str) -> String {
    answer
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect()
}

/// One (task, length, attention, tau) cell of the summary.
#[derive(Debug, Clone)]
struct Cell {
    task: String,
    length: usize,
    attention: String,
    tau: f64,
    n: usize,
    correct: usize,
    keep: f64,
    regret: f64,
    regret_n: usize,
}

impl Cell {
    /// The cell of (task, length, attention, tau) in `cells` (taus compared by bits, so
    /// NaN for exact attention matches itself), added empty where missing; cells keep
    /// the order in which they first ran.
    fn find_or_add<'a>(
        cells: &'a mut Vec<Cell>,
        task: &str,
        length: usize,
        attention: &str,
        tau: f64,
    ) -> &'a mut Cell {
        let at = cells.iter().position(|c| {
            c.task == task
                && c.length == length
                && c.attention == attention
                && c.tau.to_bits() == tau.to_bits()
        });
        let i = at.unwrap_or_else(|| {
            cells.push(Cell {
                task: task.into(),
                length,
                attention: attention.into(),
                tau,
                n: 0,
                correct: 0,
                keep: 0.0,
                regret: 0.0,
                regret_n: 0,
            });
            cells.len() - 1
        });
        &mut cells[i]
    }
}

fn summary_table(cells: &[Cell]) -> Result<Table> {
    let mut t = Table::default();
    for c in cells {
        let (lo, hi) = wilson(c.correct, c.n, 1.96);
        t.push(vec![
            ("task", Val::S(c.task.clone())),
            ("length", Val::U(c.length as u64)),
            ("attention", Val::S(c.attention.clone())),
            ("tau", Val::F(c.tau)),
            ("cases", Val::U(c.n as u64)),
            ("correct", Val::U(c.correct as u64)),
            ("accuracy", Val::F(c.correct as f64 / c.n.max(1) as f64)),
            ("wilson95_lo", Val::F(lo)),
            ("wilson95_hi", Val::F(hi)),
            ("mean_keep_fraction", Val::F(c.keep / c.n.max(1) as f64)),
            (
                "mean_decode_regret",
                Val::F(if c.regret_n == 0 {
                    f64::NAN
                } else {
                    c.regret / c.regret_n as f64
                }),
            ),
        ])?;
    }
    Ok(t)
}

/// `tca quality-niah`.
pub fn run_quality_niah(a: QualityNiahArgs) -> Result<()> {
    let stem = check_out(&a.out, "niah", a.force)?;
    let sum_stem = a.out.join("niah_summary");
    let lengths: Vec<usize> = parse_list("--lengths", &a.lengths)?;
    let depths: Vec<u64> = parse_list("--depths", &a.depths)?;
    let tasks: Vec<String> = parse_list("--tasks", &a.tasks)?;
    if let Some(t) = tasks.iter().find(|t| *t != "niah" && *t != "mk_niah") {
        return Err(TcaError::Invalid(format!(
            "--tasks: unknown task {t:?} (niah, mk_niah)"
        )));
    }
    let seeds: Vec<u64> = match &a.seeds {
        Some(s) => parse_list("--seeds", s)?,
        None => vec![a.seed],
    };
    let kinds = parse_kinds(&a.attention)?;
    let long_kinds = parse_kinds(&a.long_attention)?;
    if a.answer_tokens == 0 {
        return Err(TcaError::Invalid(
            "--answer-tokens must be at least 1".into(),
        ));
    }
    if a.backend == BackendKind::Cuda {
        if let Some(k) = kinds.iter().chain(&long_kinds).find(|k| !k.on_gpu()) {
            return Err(k.gpu_refusal());
        }
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
    let model = a.rope.load(a.model.as_deref())?;
    if let Some(&n) = lengths
        .iter()
        .find(|&&n| n + a.answer_tokens > model.llama.config.context)
    {
        return Err(TcaError::Invalid(format!(
            "NIAH length {n} plus the answer exceeds the model's context of {} (see --rope-scaling)",
            model.llama.config.context
        )));
    }
    let hay = model
        .tokenizer
        .encode(&assets::haystack(a.essays.as_deref())?)?;
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let max_off = (seeds.len() - 1) * SEED_OFFSET;
    if max_len + max_off > hay.len() {
        return Err(TcaError::Invalid(format!(
            "the haystack has {} tokens: too few for length {max_len} with {} seeds ({SEED_OFFSET} tokens apart)",
            hay.len(),
            seeds.len()
        )));
    }
    let engine = match a.backend {
        BackendKind::Cuda => Some(Engine::open(&model)?),
        BackendKind::Cpu => None,
    };
    let profiles = if kinds
        .iter()
        .chain(&long_kinds)
        .any(|k| k.policy().is_some())
    {
        a.calibration.profiles(&model, &cfg, &taus)?
    } else {
        Vec::new()
    };
    let backend = match &engine {
        Some(e) => format!("cuda ({})", e.device()),
        None => "cpu".to_string(),
    };
    let eos = Some(model.tokenizer.eos_id);
    let mut table = Table::default();
    let mut cells: Vec<Cell> = Vec::new();
    let t_all = Instant::now();
    for task in &tasks {
        for &n in &lengths {
            for (si, &seed) in seeds.iter().enumerate() {
                let off = si * SEED_OFFSET;
                for &depth in &depths {
                    let case = niah_case(&model, &hay[off..], task, n, depth, seed)?;
                    let number = case.number;
                    let mut exact_answer = String::new();
                    let ks = if n > a.long_from { &long_kinds } else { &kinds };
                    // TCA runs twice: with its compacted decoding cache (docs/algorithm.md
                    // §3), and with its prefill followed by exact decoding over the full
                    // cache (as the peers decode), to separate the two phases. Each sparse
                    // attention runs once per tau, with that tau's profile.
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
                        let profile = profiles.get(ti);
                        let need_profile = || {
                            profile.cloned().ok_or_else(|| {
                                TcaError::Invalid(format!(
                                    "{} needs a calibration profile",
                                    kind.name()
                                ))
                            })
                        };
                        let (out, keep, regret) = match (&engine, kind.policy()) {
                            (Some(e), p) => {
                                let prof = if p.is_some() {
                                    Some(need_profile()?)
                                } else {
                                    None
                                };
                                let tca = p.zip(prof.as_ref()).map(|(p, prof)| (p, &cfg, prof));
                                // TCA decodes over its compacted cache (or the full one
                                // with `full_decode`); the peers over the full cache, as
                                // on the CPU.
                                let compact = p == Some(Policy::Tca) && !full_decode;
                                let g =
                                    e.generate(&case.prompt, a.answer_tokens, tca, compact, eos)?;
                                let r = if compact { g.mean_regret() } else { f64::NAN };
                                (g.tokens, g.keep_fraction, r)
                            }
                            (None, Some(Policy::Tca)) if !full_decode => {
                                let mut pol =
                                    SparsePolicy::new(Policy::Tca, cfg.clone(), need_profile()?)?;
                                let (out, _) = generate_tca(
                                    &model.llama,
                                    &case.prompt,
                                    a.answer_tokens,
                                    &mut pol,
                                    eos,
                                )?;
                                (out, pol.mean_keep_fraction(), f64::NAN)
                            }
                            (None, Some(p)) => {
                                let pol = SparsePolicy::new(p, cfg.clone(), need_profile()?)?;
                                let out = model.llama.generate_greedy(
                                    &case.prompt,
                                    a.answer_tokens,
                                    &pol,
                                    eos,
                                )?;
                                (out, pol.mean_keep_fraction(), f64::NAN)
                            }
                            (None, None) => {
                                let out = model.llama.generate_greedy(
                                    &case.prompt,
                                    a.answer_tokens,
                                    &Exact::default(),
                                    eos,
                                )?;
                                (out, 1.0, f64::NAN)
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
                        let digits = first_digits(&answer);
                        let correct = digits == number.to_string();
                        if kind == AttentionKind::Exact {
                            exact_answer = digits.clone();
                        }
                        let agrees = !exact_answer.is_empty() && digits == exact_answer;
                        println!(
                            "{task} L = {n:>6} seed {seed} depth {depth:>3}%  {label:<24} tau {:<5} want {number} got {:<12} {} {}  {secs:.2} s",
                            if tau.is_nan() { "-".to_string() } else { tau.to_string() },
                            format!("{digits:?}"),
                            if correct { "correct" } else { "wrong  " },
                            if agrees { "(= exact)" } else { "" }
                        );
                        table.push(vec![
                            ("task", Val::S(task.clone())),
                            ("length", Val::U(n as u64)),
                            ("seed", Val::U(seed)),
                            ("haystack_offset", Val::U(off as u64)),
                            ("depth_pct", Val::U(depth)),
                            ("attention", Val::S(label.into())),
                            ("tau", Val::F(tau)),
                            ("needle", Val::U(number)),
                            ("answer", Val::S(answer.replace('\n', "\\n"))),
                            ("correct", Val::U(correct as u64)),
                            ("agrees_with_exact", Val::U(agrees as u64)),
                            ("prefill_keep_fraction", Val::F(keep)),
                            ("decode_regret_mean", Val::F(regret)),
                            ("backend", Val::S(backend.clone())),
                            ("seconds", Val::F(secs)),
                        ])?;
                        let c = Cell::find_or_add(&mut cells, task, n, label, tau);
                        c.n += 1;
                        c.correct += correct as usize;
                        c.keep += keep;
                        if regret.is_finite() {
                            c.regret += regret;
                            c.regret_n += 1;
                        }
                    }
                    table.write(&stem)?;
                }
            }
            summary_table(&cells)?.write(&sum_stem)?;
        }
    }
    println!("summary (accuracy with Wilson 95 % intervals):");
    for c in &cells {
        let (lo, hi) = wilson(c.correct, c.n, 1.96);
        println!(
            "  {:<7} L = {:>6}  {:<24} tau {:<5} {:>4}/{:<4} = {:.3}  [{lo:.3}, {hi:.3}]",
            c.task,
            c.length,
            c.attention,
            if c.tau.is_nan() {
                "-".to_string()
            } else {
                c.tau.to_string()
            },
            c.correct,
            c.n,
            c.correct as f64 / c.n.max(1) as f64
        );
    }
    println!(
        "backend {backend}; {:.1} s in all; wrote {}.csv and {}.csv (and .parquet)",
        t_all.elapsed().as_secs_f64(),
        stem.display(),
        sum_stem.display()
    );
    Ok(())
}
