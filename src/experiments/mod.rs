//! The experiments that regenerate the paper's figures (docs/algorithm.md §6) into `figures/`:
//! each writes PNG and SVG plus its data as Parquet and CSV. One binary per figure under
//! `experiments/` calls [`main_for`]; `tca reproduce` runs them all through [`run_all`].
//!
//! Data: the embedded synthetic heads (always) and, where given, real layers captured
//! from a model (`--capture caps.safetensors` with tensors `layer{N}.q/k/v`).

pub mod bounds;
pub mod certificate;
pub mod fig1;
pub mod fig3;
pub mod fig4;
pub mod fig5;
pub mod fig5_model;
pub mod peers;
pub mod plot;
pub mod stats;
pub mod sweep;
pub mod table;

use crate::bound::{audit, summarize, QueryAudit, Summary};
use crate::calibration::{calibrate, Profile};
use crate::config::{Config, Criterion};
use crate::data::{synth, HeadKind, Heads, SynthSpec};
use crate::error::{Result, TcaError};
use crate::selection::{select, Selection};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// The configuration the experiments vary around (embedded `configs/synthetic.toml`).
pub const BASE_CONFIG: &str = include_str!("../../configs/synthetic.toml");

/// One layer of attention inputs with where it came from.
#[derive(Clone, Debug)]
pub struct Layer {
    /// "synthetic" or the model's name.
    pub source: String,
    /// Head type for synthetic layers, "layer N" for real ones.
    pub label: String,
    pub kind: Option<HeadKind>,
    pub layer: usize,
    pub heads: Heads,
}

impl Layer {
    /// "synthetic sink (Hq 9, Hkv 3, d 64, L 2048)".
    pub fn describe(&self) -> String {
        format!(
            "{} {} (Hq {}, Hkv {}, d {}, L {})",
            self.source,
            self.label,
            self.heads.num_q_heads(),
            self.heads.num_kv_heads(),
            self.heads.dim(),
            self.heads.len()
        )
    }
}

/// What every experiment reads: where to write, how large to run, the data.
pub struct Context {
    pub out: PathBuf,
    pub quick: bool,
    pub base: Config,
    pub synthetic: Vec<Layer>,
    pub real: Vec<Layer>,
    evals: std::sync::OnceLock<Vec<Evaluation>>,
}

/// Real layers captured in memory from the model on the embedded novel: all layers at
/// 2048 tokens, or layers 0, 10, 20, 29 at 512 tokens (`quick`). None when the model is
/// not fetched (scripts/fetch-assets).
pub fn capture_model_layers(quick: bool) -> Result<Option<Vec<Layer>>> {
    use crate::model::{assets, Model};
    let Ok(path) = assets::model_path(None) else {
        return Ok(None);
    };
    let model = Model::load(&path)?;
    let (n, layers): (usize, Vec<usize>) = if quick {
        (512, vec![0, 10, 20, 29])
    } else {
        (2048, (0..model.llama.config.n_layers).collect())
    };
    let layers: Vec<usize> = layers
        .into_iter()
        .filter(|&l| l < model.llama.config.n_layers)
        .collect();
    let mut tokens = model.tokenizer.encode(&assets::read_text(None)?)?;
    tokens.truncate(n);
    let pb = progress(1, "capture real layers");
    let cap = model.llama.capture(&tokens, &layers)?;
    pb.finish_and_clear();
    cap.captured
        .iter()
        .map(|(&layer, qkv)| {
            Ok(Layer {
                source: assets::MODEL_NAME.into(),
                label: format!("layer {layer}"),
                kind: None,
                layer,
                heads: qkv.to_heads()?,
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Shape of the synthetic layers: SmolLM2's attention at 2K tokens, or small (`quick`).
pub fn synthetic_spec(kind: HeadKind, quick: bool) -> SynthSpec {
    let (q_heads, kv_heads, len, dim) = if quick {
        (4, 2, 512, 32)
    } else {
        (9, 3, 2048, 64)
    };
    SynthSpec {
        kind,
        q_heads,
        kv_heads,
        len,
        dim,
        seed: 2512_09238 + kind as u64,
    }
}

impl Context {
    /// The synthetic layers, plus the real layers of `capture` if given, or else (with
    /// `use_model`) captured from the model when it is fetched.
    pub fn new(
        out: PathBuf,
        quick: bool,
        capture: Option<&Path>,
        model: &str,
        use_model: bool,
    ) -> Result<Self> {
        let synthetic = HeadKind::ALL
            .iter()
            .map(|&kind| {
                Ok(Layer {
                    source: "synthetic".into(),
                    label: kind.name().into(),
                    kind: Some(kind),
                    layer: kind as usize,
                    heads: synth(&synthetic_spec(kind, quick))?.heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let real = match capture {
            Some(p) => crate::data::io::load_capture_layers(p)?
                .into_iter()
                .map(|(layer, heads)| Layer {
                    source: model.into(),
                    label: format!("layer {layer}"),
                    kind: None,
                    layer,
                    heads,
                })
                .collect(),
            None if use_model => capture_model_layers(quick)?.unwrap_or_else(|| {
                eprintln!("note: model not fetched (scripts/fetch-assets): synthetic heads only");
                Vec::new()
            }),
            None => Vec::new(),
        };
        Ok(Context {
            out,
            quick,
            base: Config::from_toml_str(BASE_CONFIG)?,
            synthetic,
            real,
            evals: std::sync::OnceLock::new(),
        })
    }

    /// Every layer evaluated under its base configuration ([`Context::config_for`]),
    /// computed once and shared by the experiments.
    pub fn base_evals(&self) -> Result<&[Evaluation]> {
        if let Some(e) = self.evals.get() {
            return Ok(e);
        }
        let layers: Vec<&Layer> = self.layers().collect();
        let pb = progress(layers.len(), "calibrate + audit layers");
        let evals = layers
            .iter()
            .map(|l| {
                pb.inc(1);
                evaluate(&l.heads, &self.config_for(l))
            })
            .collect::<Result<Vec<_>>>()?;
        pb.finish_and_clear();
        Ok(self.evals.get_or_init(|| evals))
    }

    /// Synthetic then real layers.
    pub fn layers(&self) -> impl Iterator<Item = &Layer> {
        self.synthetic.iter().chain(&self.real)
    }

    /// Layers of the sweeps: the synthetic ones and at most 4 real layers, evenly spaced.
    pub fn sweep_layers(&self) -> Vec<&Layer> {
        let n = self.real.len();
        let step = n.div_ceil(4).max(1);
        self.synthetic
            .iter()
            .chain(self.real.iter().step_by(step))
            .collect()
    }

    /// "synthetic heads" or "synthetic heads and SmolLM2-135M layers".
    pub fn data_label(&self) -> String {
        match self.real.first() {
            Some(r) => format!("synthetic heads and {} layers", r.source),
            None => "synthetic heads".into(),
        }
    }

    /// Path stem of figure `name` in the output folder.
    pub fn stem(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    /// The base configuration adapted to a layer: real layers of length L keep the
    /// block size but cap the window at L / 4 so a candidate region exists.
    pub fn config_for(&self, layer: &Layer) -> Config {
        let mut c = self.base.clone();
        if layer.kind.is_none() {
            c.window = c.window.min((layer.heads.len() / 4).max(1));
        }
        c
    }
}

/// "tau 0.9, b 64, w 256, alpha 0.5, column".
pub fn config_label(c: &Config) -> String {
    format!(
        "tau {}, b {}, w {}, alpha {}, {}",
        c.tau,
        c.block_size,
        c.window,
        c.alpha,
        match c.criterion {
            Criterion::Column => "column",
            Criterion::Mass => "mass",
        }
    )
}

/// A layer calibrated, selected and audited under one configuration.
pub struct Evaluation {
    pub profile: Profile,
    pub selection: Selection,
    pub audits: Vec<QueryAudit>,
    pub summary: Summary,
}

impl Evaluation {
    /// Mean ||e_i||_2 / ||O_i||_2 over queries.
    pub fn mean_rel_err(&self) -> f64 {
        self.audits.iter().map(|a| a.rel_err()).sum::<f64>() / self.audits.len().max(1) as f64
    }
    /// Mean E_p[k] / b over KV heads: the share of a block the budget keeps on average.
    pub fn budget_fraction(&self) -> f64 {
        let h = &self.profile.layers[0].heads;
        h.iter().map(|x| x.expected_budget).sum::<f64>()
            / (h.len().max(1) * self.profile.config.block_size) as f64
    }
    /// KV heads whose calibration reached tau.
    pub fn reached(&self) -> usize {
        self.profile.layers[0]
            .heads
            .iter()
            .filter(|h| h.reached_tau)
            .count()
    }
}

/// Calibrates `heads` on itself under `cfg`, selects and audits every query.
pub fn evaluate(heads: &Heads, cfg: &Config) -> Result<Evaluation> {
    let profile = calibrate(heads, cfg, 0)?;
    let selection = select(heads, cfg, &profile.budgets(0)?)?;
    let audits = audit(heads, &selection)?;
    let summary = summarize(&audits, cfg.tau);
    Ok(Evaluation {
        profile,
        selection,
        audits,
        summary,
    })
}

/// A progress bar for `n` steps (hidden when stderr is not a terminal).
pub fn progress(n: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:<28} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// An experiment: writes its files and returns their paths.
pub type Experiment = fn(&Context) -> Result<Vec<PathBuf>>;

/// Every experiment by binary name, in the order `tca reproduce` runs them.
pub const EXPERIMENTS: [(&str, Experiment); 8] = [
    ("fig1_attention", fig1::run),
    ("fig3_overhead", fig3::run),
    ("fig5_model", fig5_model::run),
    ("bound_figures", bounds::run),
    ("certificate_tightness", certificate::run),
    ("peer_policies", peers::run),
    ("fig5_tau", fig5::run),
    ("fig4_ablations", fig4::run),
];

/// Runs every experiment; returns the files written.
pub fn run_all(ctx: &Context) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for (name, run) in EXPERIMENTS {
        let t = std::time::Instant::now();
        let f = run(ctx)?;
        eprintln!(
            "{name}: {} files in {:.1} s",
            f.len(),
            t.elapsed().as_secs_f64()
        );
        files.extend(f);
    }
    Ok(files)
}

/// Arguments of an experiment binary.
#[derive(Parser, Debug)]
pub struct ExperimentArgs {
    /// Output folder (default: figures/, or figures/quick with --quick).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Small shapes, for a run of seconds.
    #[arg(long)]
    pub quick: bool,
    /// Real layers captured from a model (tensors layer{N}.q/k/v).
    #[arg(long)]
    pub capture: Option<PathBuf>,
    /// Name of the captured model, for titles.
    #[arg(long, default_value = "SmolLM2-135M-Instruct")]
    pub model: String,
    /// Synthetic heads only: do not capture real layers from the fetched model.
    #[arg(long)]
    pub synthetic_only: bool,
}

impl ExperimentArgs {
    /// The context these arguments describe.
    pub fn context(&self) -> Result<Context> {
        let out = self.out.clone().unwrap_or_else(|| {
            if self.quick {
                PathBuf::from("figures/quick")
            } else {
                PathBuf::from("figures")
            }
        });
        Context::new(
            out,
            self.quick,
            self.capture.as_deref(),
            &self.model,
            !self.synthetic_only,
        )
    }
}

/// `main` of the experiment binary `name`.
pub fn main_for(name: &str) -> std::process::ExitCode {
    let args = ExperimentArgs::parse();
    let run = || -> Result<Vec<PathBuf>> {
        let (_, exp) = EXPERIMENTS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| TcaError::Invalid(format!("no experiment {name}")))?;
        exp(&args.context()?)
    };
    match run() {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
