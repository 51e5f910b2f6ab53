//! Arguments and bodies of the `tca` subcommands.

use super::report::{non_finite_error, verdict_table, write_audit};
use crate::backend::{Backend, BackendKind, OracleRows};
use crate::bound::counterexample::{describe, write as write_witness, Outcome};
use crate::bound::{summarize, AuditContext, Reading, Summary};
use crate::calibration::{calibrate as calibrate_layer_profile, Profile};
use crate::config::{Config, Criterion};
use crate::data::{
    load_safetensors, save_safetensors, synth as make_synth, write_new, HeadKind, Heads, SaveDtype,
    SynthSpec,
};
use crate::error::{Result, TcaError};
use crate::selection::Budget;
use clap::Args;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The configuration of the main job, embedded in the binary.
pub use crate::experiments::BASE_CONFIG as SYNTHETIC_CONFIG;

/// Where the Q/K/V come from and under which configuration.
#[derive(Args, Debug, Clone)]
pub struct InputArgs {
    /// safetensors file with `q` [Hq, L, d], `k` and `v` [Hkv, L, d] (f64/f32/f16/bf16).
    #[arg(long)]
    pub input: PathBuf,
    /// Read tensors `layer{N}.q/k/v` of a multi-layer capture (and layer N of a profile).
    #[arg(long)]
    pub layer: Option<usize>,
    /// TOML configuration (docs/algorithm.md §7); the defaults when omitted.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl InputArgs {
    fn load(&self) -> Result<(Heads, Config, usize)> {
        let cfg = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        let prefix = self.layer.map(|n| format!("layer{n}.")).unwrap_or_default();
        let heads = load_safetensors(&self.input, &prefix)?;
        Ok((heads, cfg, self.layer.unwrap_or(0)))
    }
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Profile (JSON) to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct BoundArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Calibration profile; without it the input calibrates itself.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Folder for queries.csv and summary.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace existing output files.
    #[arg(long)]
    pub force: bool,
    /// Where selection and attention run: the f64 oracle, or the CUDA kernels (bf16
    /// outputs audited with a stated rounding allowance; the identity is not measured).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// Round the inputs to bf16 before calibrating and auditing (always done for
    /// `--backend cuda`): the CPU oracle then sees the values the GPU computes on.
    #[arg(long)]
    pub inputs_bf16: bool,
    /// With `--backend cuda`: audit at most this many (query head, query) rows against
    /// the f64 oracle (all when Hq L is not larger; 0 = all), a seeded sample otherwise.
    #[arg(long, default_value_t = 20_000)]
    pub oracle_queries: usize,
    /// Seed of that sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use a profile calibrated under another configuration (tau, b, w, alpha,
    /// criterion, ...); what differs is written into summary.json.
    #[arg(long)]
    pub allow_profile_mismatch: bool,
    /// Testing the audit (with `--backend cuda`): the device computes with V scaled by
    /// this factor, an error common to its dense and sparse passes.
    #[arg(long, hide = true)]
    pub fault_v_scale: Option<f64>,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[arg(long, value_enum)]
    pub kind: HeadKind,
    /// Query heads Hq.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// KV heads Hkv (Hq must be a multiple).
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// Sequence length L.
    #[arg(long, default_value_t = 1024)]
    pub len: usize,
    /// Head dimension d (>= 4).
    #[arg(long, default_value_t = 64)]
    pub dim: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = SaveDtype::F64)]
    pub dtype: SaveDtype,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Calibration profile; without it the prefill part calibrates itself.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Decode the last N tokens of the input one by one after prefilling the rest.
    #[arg(long)]
    pub steps: usize,
    /// Folder for the decode steps' audit (queries.csv, summary.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace existing output files.
    #[arg(long)]
    pub force: bool,
    /// Use a profile calibrated under another configuration; recorded in summary.json.
    #[arg(long)]
    pub allow_profile_mismatch: bool,
    /// Where the prefill and the compacted cache run: the f64 oracle, or the CUDA
    /// kernels (inputs rounded to bf16; every step audited against the f64 oracle on the
    /// rounded values with the bf16 allowance).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
}

#[derive(Args, Debug)]
pub struct CounterexampleArgs {
    /// The reading to look for a violation of.
    #[arg(long, value_enum)]
    pub reading: ReadingArg,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Random cases to try before giving up.
    #[arg(long, default_value_t = 20_000)]
    pub cases: usize,
    /// Folder for the witness (safetensors, config.toml, profile.json, witness.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace existing output files.
    #[arg(long)]
    pub force: bool,
}

/// The readings of Theorem 1 on the command line (their summary.json keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum ReadingArg {
    Identity,
    LinfEntrymax,
    L1Entrymax,
    L1Induced,
    L2Diameter,
    GammaLe1MinusTau,
}

impl ReadingArg {
    pub fn reading(self) -> Reading {
        match self {
            ReadingArg::Identity => Reading::Identity,
            ReadingArg::LinfEntrymax => Reading::LinfEntrymax,
            ReadingArg::L1Entrymax => Reading::L1Entrymax,
            ReadingArg::L1Induced => Reading::L1Induced,
            ReadingArg::L2Diameter => Reading::L2Diameter,
            ReadingArg::GammaLe1MinusTau => Reading::GammaTau,
        }
    }
}

#[derive(Args, Debug)]
pub struct ReproduceArgs {
    /// Folder for the verdict tables; reproduce owns it and replaces what it wrote before.
    #[arg(long, default_value = "results/reproduce")]
    pub out: PathBuf,
    /// Folder for the figures (default figures/, or figures/quick with --quick).
    #[arg(long)]
    pub figures: Option<PathBuf>,
    /// Smaller shapes, for a run of seconds.
    #[arg(long)]
    pub quick: bool,
    /// Real layers captured from a model (tensors layer{N}.q/k/v) for the figures.
    #[arg(long)]
    pub capture: Option<PathBuf>,
    /// Only the verdict tables, no figures.
    #[arg(long)]
    pub no_figures: bool,
    /// Figures from synthetic heads only (no real layers from the fetched model).
    #[arg(long)]
    pub synthetic_only: bool,
}

/// The budgets of a layer and how they relate to the audited data.
struct Budgets {
    budgets: Vec<Budget>,
    /// Calibrated on the audited data itself.
    in_sample: Option<bool>,
    /// Configuration keys that differ from the profile's, used anyway.
    profile_override: Option<String>,
}

/// The budgets of a layer: from a profile checked against the input and configuration
/// (a configuration mismatch only with `allow_mismatch`), else calibrated on `calib`
/// (the input itself, or the prefill part when decoding).
fn budgets_for(
    profile: Option<&Path>,
    heads: &Heads,
    calib: &Heads,
    cfg: &Config,
    layer: usize,
    allow_mismatch: bool,
) -> Result<Budgets> {
    match profile {
        Some(p) => {
            let prof = Profile::load(p)?;
            let profile_override = if allow_mismatch {
                prof.check_shape(heads, layer)?;
                prof.config_mismatch(cfg)
            } else {
                prof.check_fits(heads, cfg, layer)?;
                None
            };
            Ok(Budgets {
                budgets: prof.budgets(layer)?,
                in_sample: prof.in_sample(calib, layer),
                profile_override,
            })
        }
        None => Ok(Budgets {
            budgets: calibrate_layer_profile(calib, cfg, layer)?.budgets(layer)?,
            in_sample: Some(std::ptr::eq(heads, calib)),
            profile_override: None,
        }),
    }
}

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    let (heads, cfg, layer) = a.input.load()?;
    if a.out.exists() && !a.force {
        return Err(TcaError::WouldOverwrite(a.out));
    }
    let prof = calibrate_layer_profile(&heads, &cfg, layer)?;
    prof.save(&a.out, a.force)?;
    println!("kv_head  m  mu      E[k]    retained  reached_tau  |S_G|");
    for h in &prof.layers[0].heads {
        println!(
            "{:>7} {:>2}  {:.3}  {:>6.2}  {:.5}   {:<11}  {}",
            h.kv_head, h.m, h.mu, h.expected_budget, h.retained, h.reached_tau, h.global_tokens
        );
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

/// Selection, audit and summary of one layer on the CPU oracle (budgets calibrated on
/// the same data: in-sample).
fn audit_layer(
    heads: &Heads,
    cfg: &Config,
    budgets: &[Budget],
) -> Result<(Vec<crate::bound::QueryAudit>, Summary)> {
    let la = Backend::Cpu.audit_layer(heads, cfg, budgets, OracleRows::default())?;
    let mut summary = summarize(&la.audits, cfg.tau);
    summary.context.in_sample = Some(true);
    Ok((la.audits, summary))
}

pub fn bound(a: BoundArgs) -> Result<()> {
    let (heads, cfg, layer) = a.input.load()?;
    let heads = if a.inputs_bf16 || a.backend == BackendKind::Cuda {
        heads.rounded_to_bf16()?
    } else {
        heads
    };
    let mut files: Vec<PathBuf> = ["queries.csv", "summary.json", "selection.json"]
        .iter()
        .map(|f| a.out.join(f))
        .collect();
    if a.backend == BackendKind::Cuda {
        files.push(a.out.join("queries_gpu_self.csv"));
    }
    for p in &files {
        if p.exists() && !a.force {
            return Err(TcaError::WouldOverwrite(p.clone()));
        }
    }
    let backend = Backend::open(a.backend)?;
    let b = budgets_for(
        a.profile.as_deref(),
        &heads,
        &heads,
        &cfg,
        layer,
        a.allow_profile_mismatch,
    )?;
    let rows = OracleRows {
        limit: a.oracle_queries,
        seed: a.seed,
        fault_v_scale: a.fault_v_scale,
    };
    let la = backend.audit_layer(&heads, &cfg, &b.budgets, rows)?;
    let mut summary = summarize(&la.audits, cfg.tau);
    summary.context = AuditContext {
        in_sample: b.in_sample,
        profile_override: b.profile_override.clone(),
        ..la.context.clone()
    };
    println!("backend: {}", backend.name());
    let mut extra = Vec::new();
    let mut all = la.audits.clone();
    if let Some(own) = &la.self_audits {
        let mut s = summarize(own, cfg.tau);
        s.context = AuditContext {
            reference: "the GPU's own dense pass (bf16) and log-sum-exps".into(),
            rows: format!("all {}", own.len()),
            ..summary.context.clone()
        };
        println!("== the GPU's own audit (its dense outputs against its sparse ones)");
        print!("{}", verdict_table(&s));
        extra.push((
            "gpu_self",
            serde_json::to_value(&s).map_err(|e| TcaError::Invalid(e.to_string()))?,
        ));
        if let Some(d) = la.selection_differences {
            extra.push(("selection_differences", serde_json::json!(d)));
        }
        let csv = crate::cli::report::queries_csv(own);
        write_new(&files[3], csv.as_bytes(), a.force)?;
        all.extend(own.iter().cloned());
        println!("== against the f64 oracle (the verdict)");
    }
    write_audit(&a.out, &la.audits, &summary, &extra, a.force)?;
    // S_G per KV head, so that two backends' selections can be compared.
    let sel = serde_json::json!({ "backend": backend.name(), "global": la.global });
    write_new(&files[2], sel.to_string().as_bytes(), a.force)?;
    print!("{}", verdict_table(&summary));
    println!(
        "wrote {}/queries.csv, summary.json and selection.json",
        a.out.display()
    );
    match non_finite_error("tca bound", &all) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub fn synth(a: SynthArgs) -> Result<()> {
    let spec = SynthSpec {
        kind: a.kind,
        q_heads: a.heads,
        kv_heads: a.kv_heads,
        len: a.len,
        dim: a.dim,
        seed: a.seed,
    };
    let s = make_synth(&spec)?;
    let meta = HashMap::from([
        ("generator".to_string(), "tca synth".to_string()),
        ("kind".to_string(), a.kind.name().to_string()),
        ("seed".to_string(), a.seed.to_string()),
        ("needles".to_string(), format!("{:?}", s.needles)),
    ]);
    save_safetensors(&s.heads, &a.out, a.dtype, meta, a.force)?;
    println!(
        "wrote {} ({} q heads, {} kv heads, L = {}, d = {})",
        a.out.display(),
        a.heads,
        a.kv_heads,
        a.len,
        a.dim
    );
    Ok(())
}

pub fn decode(a: DecodeArgs) -> Result<()> {
    let (heads, cfg, layer) = a.input.load()?;
    // The GPU computes on bf16: calibration and the oracle see the same rounded values.
    let heads = if a.backend == BackendKind::Cuda {
        heads.rounded_to_bf16()?
    } else {
        heads
    };
    if a.steps == 0 || a.steps >= heads.len() {
        return Err(TcaError::Invalid(format!(
            "--steps must lie in [1, L - 1] = [1, {}]",
            heads.len() - 1
        )));
    }
    if let Some(out) = &a.out {
        for f in ["queries.csv", "summary.json"] {
            let p = out.join(f);
            if p.exists() && !a.force {
                return Err(TcaError::WouldOverwrite(p));
            }
        }
    }
    let prefill = heads.len() - a.steps;
    let prefix = heads.prefix(prefill)?;
    let b = budgets_for(
        a.profile.as_deref(),
        &heads,
        &prefix,
        &cfg,
        layer,
        a.allow_profile_mismatch,
    )?;
    let backend = Backend::open(a.backend)?;
    let r = backend.decode(&heads, &cfg, &b.budgets, prefill)?;
    println!("backend: {}", backend.name());
    println!(
        "prefill {} tokens, decoded {} steps (b = {}, w = {})",
        r.prefill_len, r.steps, cfg.block_size, cfg.window
    );
    println!(
        "kv_head  global  window  cache  peak  ceiling  keep/block  compactions  kv_bytes  vs_full"
    );
    for h in &r.heads {
        println!(
            "{:>7} {:>7} {:>7} {:>6} {:>5} {:>8} {:>11} {:>12} {:>9} {:>7.2}%",
            h.kv_head,
            h.global_tokens,
            h.window_tokens,
            h.global_tokens + h.window_tokens,
            h.peak_tokens,
            h.ceiling_tokens,
            h.block_keep,
            h.compactions,
            h.kv_bytes,
            100.0 * h.kv_bytes as f64 / r.full_kv_bytes as f64
        );
    }
    let total: usize = r.heads.iter().map(|h| h.kv_bytes).sum();
    let full = r.full_kv_bytes * r.heads.len();
    println!(
        "KV bytes ({} K and V): TCA {} vs full attention {} ({:.2}%); positions held: {} bytes",
        if a.backend == BackendKind::Cuda {
            "bf16"
        } else {
            "f64"
        },
        total,
        full,
        100.0 * total as f64 / full as f64,
        r.heads.iter().map(|h| h.index_bytes).sum::<usize>()
    );
    println!(
        "decode quality: mean gamma {:.3e}, max gamma {:.3e} (gamma here is the eviction regret: the step's softmax mass on keys the cache no longer holds), max relative output error {:.3e}",
        r.mean_gamma, r.max_gamma, r.max_rel_err
    );
    // Every decode step audited against every reading: S_i is the cache.
    let mut summary = summarize(&r.audits, cfg.tau);
    summary.context = AuditContext {
        rows: format!(
            "the {} decode steps of each of {} query heads (S_i = the compacted cache)",
            r.steps,
            heads.num_q_heads()
        ),
        backend: backend.name(),
        reference: match a.backend {
            BackendKind::Cuda => "f64 oracle on the bf16-rounded inputs (exact row at each step, S_i = what the GPU's cache held, its output with the bf16 allowance)".into(),
            BackendKind::Cpu => String::new(),
        },
        in_sample: b.in_sample,
        profile_override: b.profile_override,
    };
    println!("== Theorem 1 at every decode step");
    print!("{}", verdict_table(&summary));
    if let Some(out) = &a.out {
        let stats = serde_json::json!({
            "prefill_len": r.prefill_len,
            "steps": r.steps,
            "heads": r.heads,
            "max_rel_err": r.max_rel_err,
        });
        write_audit(out, &r.audits, &summary, &[("decode", stats)], a.force)?;
        println!("wrote {}/queries.csv and summary.json", out.display());
    }
    match non_finite_error("tca decode", &r.audits) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub fn counterexample(a: CounterexampleArgs) -> Result<()> {
    let reading = a.reading.reading();
    let start = std::time::Instant::now();
    match crate::bound::counterexample::search(reading, a.seed, a.cases)? {
        Outcome::Found {
            case,
            audit,
            keys,
            tried,
            shrink_steps,
        } => {
            println!(
                "found at case {tried} of at most {} (seed {}), shrunk in {shrink_steps} steps ({:.1} s):",
                a.cases,
                a.seed,
                start.elapsed().as_secs_f64()
            );
            println!("{}", describe(&case, reading, &audit, &keys));
            if let Some(out) = &a.out {
                write_witness(out, &case, reading, &audit, &keys, a.seed, a.force)?;
                println!(
                    "wrote {0}/witness.safetensors, config.toml, profile.json, witness.json; reproduce with\n  tca bound --input {0}/witness.safetensors --config {0}/config.toml --profile {0}/profile.json --out {0}/bound",
                    out.display()
                );
            }
        }
        Outcome::NotFound { tried } => {
            println!(
                "no violation of {} ({}) in {tried} cases (seed {}, {:.1} s)",
                reading.key(),
                reading.statement(),
                a.seed,
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

pub fn reproduce(a: ReproduceArgs) -> Result<()> {
    let base = Config::from_toml_str(SYNTHETIC_CONFIG)?;
    let mut rows = String::from("criterion,kind,reading,holds,violations,worst_ratio,mean_gamma,frac_gamma_above_1_minus_tau,mean_kept_fraction,reached_tau\n");
    let mut overview = String::new();
    for criterion in [Criterion::Column, Criterion::Mass] {
        let cfg = Config {
            criterion,
            ..base.clone()
        };
        let crit = if criterion == Criterion::Column {
            "column"
        } else {
            "mass"
        };
        for kind in HeadKind::ALL {
            let spec = crate::experiments::synthetic_spec(kind, a.quick);
            let heads = make_synth(&spec)?.heads;
            let prof = calibrate_layer_profile(&heads, &cfg, 0)?;
            let budgets = prof.budgets(0)?;
            let (audits, summary) = audit_layer(&heads, &cfg, &budgets)?;
            let dir = a.out.join(crit).join(kind.name());
            write_audit(&dir, &audits, &summary, &[], true)?;
            prof.save(&dir.join("profile.json"), true)?;
            let heads_p = &prof.layers[0].heads;
            let reached = heads_p.iter().filter(|h| h.reached_tau).count();
            println!(
                "== {} head, criterion {crit}: Hq = {}, Hkv = {}, L = {}, d = {}, seed {}; tau = {}, b = {}, w = {}; E[k] per KV head {:?}, {reached}/{} reached tau",
                kind.name(),
                spec.q_heads,
                spec.kv_heads,
                spec.len,
                spec.dim,
                spec.seed,
                cfg.tau,
                cfg.block_size,
                cfg.window,
                heads_p
                    .iter()
                    .map(|h| (h.expected_budget * 10.0).round() / 10.0)
                    .collect::<Vec<_>>(),
                heads_p.len()
            );
            print!("{}", verdict_table(&summary));
            let fails: Vec<&str> = summary
                .readings
                .iter()
                .filter(|(_, r)| !r.holds)
                .map(|(k, _)| *k)
                .collect();
            overview.push_str(&format!(
                "{crit:<7} {:<10} {:>9.4} {:>11.3e} {:>13.2}% {:>7}/{}  {}\n",
                kind.name(),
                summary.mean_kept_fraction,
                summary.mean_gamma,
                100.0 * summary.frac_gamma_above_1_minus_tau,
                reached,
                heads_p.len(),
                if fails.is_empty() {
                    "-".to_string()
                } else {
                    fails.join(", ")
                }
            ));
            for (key, r) in &summary.readings {
                rows.push_str(&format!(
                    "{crit},{},{},{},{},{:e},{:e},{},{},{}\n",
                    kind.name(),
                    key,
                    r.holds,
                    r.violations,
                    r.worst_ratio,
                    summary.mean_gamma,
                    summary.frac_gamma_above_1_minus_tau,
                    summary.mean_kept_fraction,
                    reached
                ));
            }
        }
    }
    let path = a.out.join("verdicts.csv");
    crate::data::write_new(&path, rows.as_bytes(), true)?;
    let expected = if a.quick {
        EXPECTED_VERDICTS_QUICK
    } else {
        EXPECTED_VERDICTS
    };
    let mismatches = verdict_mismatches(&rows, expected);
    println!("\n== overview (identity, linf_entrymax, l1_induced, l2_diameter are checked too)");
    println!(
        "criterion kind       kept_frac  mean_gamma  gamma>1-tau  reached  readings that fail"
    );
    print!("{overview}");
    println!(
        "wrote {} and one folder per criterion and head type",
        path.display()
    );
    if !a.no_figures {
        let exp = crate::experiments::ExperimentArgs {
            out: a.figures.clone(),
            quick: a.quick,
            capture: a.capture.clone(),
            model: crate::model::assets::MODEL_NAME.into(),
            synthetic_only: a.synthetic_only,
        };
        let ctx = exp.context()?;
        let files = crate::experiments::run_all(&ctx)?;
        println!(
            "wrote {} figure and table files to {}",
            files.len(),
            ctx.out.display()
        );
    }
    if mismatches.is_empty() {
        println!(
            "verdicts as expected ({}): the identity, linf_entrymax, l1_induced, l2_diameter and gamma <= gamma_hat hold on every head",
            if a.quick { "configs/expected-verdicts-quick.csv" } else { "configs/expected-verdicts.csv" }
        );
        Ok(())
    } else {
        Err(TcaError::Verdict(format!(
            "verdicts differ from the expected ones:\n  {}",
            mismatches.join("\n  ")
        )))
    }
}

/// The verdicts the README states for the main job (criterion, kind, reading, holds).
pub const EXPECTED_VERDICTS: &str = include_str!("../../configs/expected-verdicts.csv");
/// The same for `--quick`.
pub const EXPECTED_VERDICTS_QUICK: &str = include_str!("../../configs/expected-verdicts-quick.csv");
/// Readings that are theorems: they must hold on every input, whatever the expectation
/// file says.
const TRUE_READINGS: [&str; 5] = [
    "identity",
    "linf_entrymax",
    "l1_induced",
    "l2_diameter",
    "gamma_le_gamma_hat",
];

/// Differences between the verdicts.csv text `got` and the expected table (header
/// criterion,kind,reading,holds), plus every true reading that fails.
pub fn verdict_mismatches(got: &str, expected: &str) -> Vec<String> {
    let parse = |text: &str| -> std::collections::BTreeMap<(String, String, String), String> {
        text.lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f.len() >= 4).then(|| {
                    (
                        (f[0].to_string(), f[1].to_string(), f[2].to_string()),
                        f[3].to_string(),
                    )
                })
            })
            .collect()
    };
    let (g, e) = (parse(got), parse(expected));
    let mut out = Vec::new();
    for (key, holds) in &g {
        if TRUE_READINGS.contains(&key.2.as_str()) && holds != "true" {
            out.push(format!(
                "{} on {} {}: a true reading fails",
                key.2, key.0, key.1
            ));
        }
        match e.get(key) {
            Some(want) if want != holds => out.push(format!(
                "{} on {} {}: holds = {holds}, expected {want}",
                key.2, key.0, key.1
            )),
            None => out.push(format!(
                "{} on {} {}: no expected verdict",
                key.2, key.0, key.1
            )),
            _ => {}
        }
    }
    for key in e.keys().filter(|k| !g.contains_key(*k)) {
        out.push(format!(
            "{} on {} {}: expected but not computed",
            key.2, key.0, key.1
        ));
    }
    out
}
