//! `tca capture` and `tca perplexity`: the real model (SmolLM2-135M-Instruct) on a text.
//!
//! Both read a text (default: the embedded *Pride and Prejudice*), tokenise it, and
//! take its first `--tokens` tokens. The model is `--model PATH` (a GGUF file or a
//! Hugging Face folder, see `crate::model::hf`), or
//! `SmolLM2-135M-Instruct.Q4_1.gguf` in the cache folder (`$TCA_CACHE`, else
//! `./cache`, filled by `scripts/fetch-assets`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use safetensors::tensor::{Dtype, TensorView};

use crate::backend::BackendKind;
use crate::calibration::Profile;
use crate::config::Config;
use crate::error::{Result, TcaError};
use crate::model::sparse::{calibrate_from_capture, calibrate_model, SparsePolicy};
use crate::model::{assets, AttentionPolicy, Exact, Model, Score};
use crate::selection::policies::Policy;

/// Attention used by the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum AttentionKind {
    /// Exact causal softmax attention (f32).
    #[default]
    Exact,
    /// TCA with per-layer, per-KV-head calibrated budgets (f64 reference selection).
    Tca,
    /// Per query, the |S_i| keys of largest true attention (TCA's budget; upper limit).
    OracleTopk,
    /// First 4 tokens plus the most recent ones, |S_i| in all (TCA's budget).
    StreamingLlm,
    /// TCA's ranking with the same budget in every block (TCA's total).
    BlockTopk,
    /// Smallest set of the last query's importance reaching tau (own budget).
    CumulativeThreshold,
    /// TCA in certified-tau mode (`certified_tau = true`): TCA's sets widened per query
    /// until the certificate reads gamma_hat_i <= 1 - tau.
    TcaCertified,
}

impl AttentionKind {
    pub const ALL: [AttentionKind; 7] = [
        AttentionKind::Exact,
        AttentionKind::Tca,
        AttentionKind::OracleTopk,
        AttentionKind::StreamingLlm,
        AttentionKind::BlockTopk,
        AttentionKind::CumulativeThreshold,
        AttentionKind::TcaCertified,
    ];

    /// The selection policy, `None` for exact attention.
    pub fn policy(self) -> Option<Policy> {
        match self {
            AttentionKind::Exact => None,
            AttentionKind::Tca => Some(Policy::Tca),
            AttentionKind::OracleTopk => Some(Policy::OracleTopK),
            AttentionKind::StreamingLlm => Some(Policy::StreamingLlm),
            AttentionKind::BlockTopk => Some(Policy::BlockTopK),
            AttentionKind::CumulativeThreshold => Some(Policy::CumulativeThreshold),
            AttentionKind::TcaCertified => Some(Policy::Tca),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AttentionKind::TcaCertified => "tca_certified",
            _ => self.policy().map_or("exact", Policy::name),
        }
    }

    /// Whether `--backend cuda` runs this attention: exact, TCA and the four peers (all
    /// built from TCA's GPU selection); not certified-tau mode.
    pub fn on_gpu(self) -> bool {
        self != AttentionKind::TcaCertified
    }

    /// The error of `--backend cuda` with an attention it does not run.
    pub fn gpu_refusal(self) -> TcaError {
        TcaError::Invalid(format!(
            "attention {} runs on the CPU only (--backend cpu); the GPU runs exact, tca, oracle_topk, streaming_llm, block_topk and cumulative_threshold",
            self.name()
        ))
    }

    /// `cfg` as this attention runs it: certified-tau mode switched on for
    /// [`AttentionKind::TcaCertified`], unchanged otherwise.
    pub fn config(self, cfg: &Config) -> Config {
        Config {
            certified_tau: cfg.certified_tau || self == AttentionKind::TcaCertified,
            ..cfg.clone()
        }
    }
}

/// Where a sparse attention's calibration comes from.
#[derive(Debug, Clone, Args)]
pub struct CalibrationArgs {
    /// TOML configuration of TCA (docs/algorithm.md §7); default: configs/model.toml's
    /// scaled setting (b = 64, w = 256, tau = 0.9).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Calibration profile made by `tca calibrate-model` (else: calibrate on the fly on
    /// the calibration passage below); several, comma-separated, for several taus (each
    /// tau asked for takes the profile calibrated for it).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// First token of the calibration passage within the calibration text.
    #[arg(long, default_value_t = DEFAULT_CALIB_OFFSET)]
    pub calib_offset: usize,
    /// Tokens of the calibration passage.
    #[arg(long, default_value_t = 2048)]
    pub calib_tokens: usize,
    /// Calibration text (default: the embedded Pride and Prejudice).
    #[arg(long)]
    pub calib_text: Option<PathBuf>,
}

/// Where the default calibration passage starts in the novel: far from the first 8K
/// tokens that the evaluations read.
pub const DEFAULT_CALIB_OFFSET: usize = 100_000;

/// The scaled configuration used on SmolLM2 unless `--config` says otherwise.
pub const MODEL_CONFIG: &str = include_str!("../../configs/model.toml");

impl CalibrationArgs {
    /// The configuration (validated).
    pub fn config(&self) -> Result<Config> {
        match &self.config {
            Some(p) => Config::from_file(p),
            None => Config::from_toml_str(MODEL_CONFIG),
        }
    }

    /// The profile: loaded (and checked against the configuration's block size), or
    /// calibrated on the calibration passage for each of `taus`.
    pub fn profiles(&self, model: &Model, cfg: &Config, taus: &[f64]) -> Result<Vec<Profile>> {
        if let Some(list) = &self.profile {
            let mut profs = Vec::new();
            for p in list.to_string_lossy().split(',').filter(|x| !x.is_empty()) {
                let p = Path::new(p);
                let prof = Profile::load(p)?;
                if prof.config.block_size != cfg.block_size {
                    return Err(TcaError::ProfileMismatch(format!(
                        "{} was calibrated with block_size = {}, the configuration has {}",
                        p.display(),
                        prof.config.block_size,
                        cfg.block_size
                    )));
                }
                profs.push((p.to_path_buf(), prof));
            }
            return taus
                .iter()
                .map(|&t| {
                    profs
                        .iter()
                        .find(|(_, p)| p.config.tau == t)
                        .map(|(_, p)| p.clone())
                        .ok_or_else(|| {
                            TcaError::ProfileMismatch(format!(
                                "no profile in --profile {} was calibrated for tau = {t} (they have {}); \
                                 leave out --profile to calibrate each tau",
                                list.display(),
                                profs
                                    .iter()
                                    .map(|(p, x)| format!("{}: tau = {}", p.display(), x.config.tau))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ))
                        })
                })
                .collect();
        }
        let tokens = calibration_tokens(
            model,
            self.calib_text.as_deref(),
            self.calib_offset,
            self.calib_tokens,
        )?;
        calibrate_model(&model.llama, &tokens, cfg, taus)
    }
}

/// Tokens `offset .. offset + n` of a text (default: the novel).
pub fn calibration_tokens(
    model: &Model,
    text: Option<&Path>,
    offset: usize,
    n: usize,
) -> Result<Vec<u32>> {
    if n < 2 {
        return Err(TcaError::Invalid(
            "the calibration passage needs at least 2 tokens".into(),
        ));
    }
    if n > model.llama.config.context {
        return Err(TcaError::Invalid(format!(
            "a calibration passage of {n} tokens exceeds the model's context of {}",
            model.llama.config.context
        )));
    }
    let text = assets::read_text(text)?;
    let tokens = model.tokenizer.encode(&text)?;
    let end = offset.saturating_add(n);
    if end > tokens.len() {
        return Err(TcaError::Invalid(format!(
            "calibration passage {offset}..{end}: the text has only {} tokens",
            tokens.len()
        )));
    }
    Ok(tokens[offset..end].to_vec())
}

/// The attention policy of `kind` under `cfg` and `profile` (unused for exact).
pub fn make_policy(
    kind: AttentionKind,
    cfg: &Config,
    profile: Option<Profile>,
) -> Result<Box<dyn AttentionPolicy>> {
    match kind.policy() {
        None => Ok(Box::new(Exact::default())),
        Some(p) => {
            let prof = profile.ok_or_else(|| {
                TcaError::Invalid(format!("attention {} needs a profile", kind.name()))
            })?;
            Ok(Box::new(SparsePolicy::new(p, kind.config(cfg), prof)?))
        }
    }
}

/// Arguments of `tca calibrate-model`.
#[derive(Debug, Clone, Args)]
pub struct CalibrateModelArgs {
    /// TOML configuration (default: configs/model.toml's scaled setting).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Calibration text (default: the embedded Pride and Prejudice).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// First token of the calibration passage.
    #[arg(long, default_value_t = DEFAULT_CALIB_OFFSET)]
    pub offset: usize,
    /// Tokens of the calibration passage.
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Profile (JSON) to write: every layer and KV head.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` if it exists.
    #[arg(long)]
    pub force: bool,
    /// Model: a GGUF file or a Hugging Face folder (default: the cache's
    /// SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub rope: RopeArgs,
    /// Where the exact forward runs (cpu, or cuda: the GPU's Q/K/V, bf16); the
    /// calibration itself is the f64 reference on the host either way.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
}

/// `tca calibrate-model`: calibrate every layer and KV head of the model on a passage
/// (exact forward pass, f64 reference calibration) and write a multi-layer profile.
pub fn run_calibrate_model(a: CalibrateModelArgs) -> Result<()> {
    if a.out.exists() && !a.force {
        return Err(TcaError::WouldOverwrite(a.out.clone()));
    }
    let cfg = match &a.config {
        Some(p) => Config::from_file(p)?,
        None => Config::from_toml_str(MODEL_CONFIG)?,
    };
    let model = a.rope.load(a.model.as_deref())?;
    let tokens = calibration_tokens(&model, a.text.as_deref(), a.offset, a.tokens)?;
    let t0 = Instant::now();
    let profs = match a.backend {
        BackendKind::Cpu => calibrate_model(&model.llama, &tokens, &cfg, &[cfg.tau])?,
        BackendKind::Cuda => {
            let n = model.llama.config.n_layers;
            let cap =
                super::gpu::Engine::open(&model)?.capture(&tokens, &(0..n).collect::<Vec<_>>())?;
            calibrate_from_capture(&cap, n, &cfg, &[cfg.tau])?
        }
    };
    let prof = profs
        .into_iter()
        .next()
        .ok_or_else(|| TcaError::Invalid("no profile".into()))?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "calibrated {} layers x {} KV heads on tokens {}..{} (tau = {}, b = {}, w = {}, criterion {:?}) in {secs:.1} s",
        prof.layers.len(),
        prof.model.num_kv_heads,
        a.offset,
        a.offset + tokens.len(),
        cfg.tau,
        cfg.block_size,
        cfg.window,
        cfg.criterion
    );
    println!("layer  kv  m   E[k]   retained  reached  |S_G|");
    for l in &prof.layers {
        for h in &l.heads {
            println!(
                "{:>5} {:>3} {:>2} {:>6.2}  {:.5}   {:<7}  {}",
                l.layer,
                h.kv_head,
                h.m,
                h.expected_budget,
                h.retained,
                h.reached_tau,
                h.global_tokens
            );
        }
    }
    prof.save(&a.out, a.force)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// Arguments of `tca export-hf`.
#[derive(Debug, Clone, Args)]
pub struct ExportHfArgs {
    /// Output folder: config.json, model.safetensors (f32), tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace those files if they exist.
    #[arg(long)]
    pub force: bool,
    /// Model to export: a GGUF file or a Hugging Face folder (default: the cache's
    /// SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// `tca export-hf`: write the model as a Hugging Face folder (f32 weights as loaded,
/// q/k rows in Hugging Face's order), loadable with `--model DIR`.
pub fn run_export_hf(a: ExportHfArgs) -> Result<()> {
    let t0 = Instant::now();
    let model = Model::load(assets::model_path(a.model.as_deref())?)?;
    crate::model::hf::export(&model, &a.out, a.force)?;
    let c = &model.llama.config;
    println!(
        "wrote {} ({}: {} layers, hidden {}, vocab {}, f32) in {:.1} s",
        a.out.display(),
        model.name,
        c.n_layers,
        c.hidden,
        c.vocab,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Arguments of `tca capture`.
#[derive(Debug, Clone, Args)]
pub struct CaptureArgs {
    /// UTF-8 text file (default: the embedded Pride and Prejudice).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Number of tokens, from the start of the text.
    #[arg(long)]
    pub tokens: usize,
    /// Layers to capture: "all", or a list such as "0,5,10-12".
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite `--out` if it exists.
    #[arg(long)]
    pub force: bool,
    /// Model: a GGUF file or a Hugging Face folder (default: the cache's
    /// SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the forward runs: cpu (f32) or cuda (f16 weights, bf16 Q/K/V, f32
    /// accumulation; needs a `--features cuda` build and a GPU).
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    #[command(flatten)]
    pub rope: RopeArgs,
}

/// Arguments of `tca perplexity`.
#[derive(Debug, Clone, Args)]
pub struct PerplexityArgs {
    /// UTF-8 text file (default: the embedded Pride and Prejudice).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Number of tokens, from the start of the text (the context of one prefill).
    #[arg(long)]
    pub tokens: usize,
    /// First target position scored (targets are tokens[max(from,1)..N], each
    /// predicted from all tokens before it).
    #[arg(long, default_value_t = 0)]
    pub from: usize,
    /// Attention of the forward pass.
    #[arg(long, value_enum, default_value_t = AttentionKind::Exact)]
    pub attention: AttentionKind,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Model: a GGUF file or a Hugging Face folder (default: the cache's
    /// SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the forward runs: cpu (f32) or cuda (f16 weights, bf16 Q/K/V, f32
    /// accumulation; exact and tca attention; needs a `--features cuda` build and a GPU).
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    #[command(flatten)]
    pub rope: RopeArgs,
}

/// RoPE scaling of the model, for contexts beyond the one it was trained to.
#[derive(Debug, Clone, Default, Args)]
pub struct RopeArgs {
    /// RoPE scaling: none, or KIND:FACTOR with KIND linear, ntk or yarn (e.g. yarn:4
    /// runs SmolLM2, trained to 8,192 positions, at up to 32,768). Replaces the model's
    /// own scaling.
    #[arg(long)]
    pub rope_scaling: Option<String>,
}

impl RopeArgs {
    /// Loads the model at `path` (a GGUF file or a Hugging Face folder; the cache's
    /// SmolLM2 when `None`) with this scaling applied.
    pub fn load(&self, path: Option<&Path>) -> Result<Model> {
        let mut model = Model::load(assets::model_path(path)?)?;
        if let Some(spec) = &self.rope_scaling {
            model.rescale_rope(spec)?;
        }
        Ok(model)
    }
}

/// Parse a layer list ("all", "3", "0,5,10-12") against `n_layers`.
pub fn parse_layers(spec: &str, n_layers: usize) -> Result<Vec<usize>> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("all") {
        return Ok((0..n_layers).collect());
    }
    let bad = |m: String| TcaError::Invalid(format!("--layers {spec:?}: {m}"));
    let num = |s: &str| -> Result<usize> {
        s.trim()
            .parse::<usize>()
            .map_err(|_| bad(format!("{s:?} is not a layer number")))
    };
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let a = num(part)?;
                (a, a)
            }
        };
        if a > b {
            return Err(bad(format!("empty range {part:?}")));
        }
        if b >= n_layers {
            return Err(bad(format!(
                "layer {b} does not exist (the model has layers 0..={})",
                n_layers.saturating_sub(1)
            )));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(bad("no layers".into()));
    }
    Ok(out)
}

fn format_layers(layers: &[usize]) -> String {
    layers
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Load the model and the first `n` tokens of the text.
fn load_inputs(
    model: Option<&Path>,
    rope: &RopeArgs,
    text: Option<&Path>,
    n: usize,
) -> Result<(Model, Vec<u32>, usize)> {
    if n == 0 {
        return Err(TcaError::Invalid("--tokens must be at least 1".into()));
    }
    let text = assets::read_text(text)?;
    let model = rope.load(model)?;
    if n > model.llama.config.context {
        return Err(TcaError::Invalid(format!(
            "--tokens {n} exceeds the model's context of {}",
            model.llama.config.context
        )));
    }
    let mut tokens = model.tokenizer.encode(&text)?;
    let total = tokens.len();
    if n > total {
        return Err(TcaError::Invalid(format!(
            "--tokens {n}: the text has only {total} tokens"
        )));
    }
    tokens.truncate(n);
    Ok((model, tokens, total))
}

/// `tca capture`: write per-layer post-RoPE Q `[Hq, L, d]`, K and V `[Hkv, L, d]`
/// (f32) to a safetensors file, as `layer{i}.q/k/v` (and plain `q/k/v` when a single
/// layer is asked), with metadata `model`, `layers`, `tokens`.
pub fn run_capture(args: CaptureArgs) -> Result<()> {
    if args.out.exists() && !args.force {
        return Err(TcaError::WouldOverwrite(args.out.clone()));
    }
    let t0 = Instant::now();
    let (model, tokens, total) = load_inputs(
        args.model.as_deref(),
        &args.rope,
        args.text.as_deref(),
        args.tokens,
    )?;
    let layers = parse_layers(&args.layers, model.llama.config.n_layers)?;
    let t1 = Instant::now();
    let mut cap = match args.backend {
        BackendKind::Cpu => model.llama.capture(&tokens, &layers)?,
        BackendKind::Cuda => {
            super::gpu::cuda_supports(&model)?;
            capture_cuda(&model, &tokens, &layers)?
        }
    };
    let t2 = Instant::now();

    // Little-endian f32 bytes of each tensor, made once (the captured arrays are
    // dropped as they are converted); a single layer's plain q/k/v share the bytes.
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (l, c) in std::mem::take(&mut cap.captured) {
        for (part, a) in [("q", c.q), ("k", c.k), ("v", c.v)] {
            let bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
            bufs.push((format!("layer{l}.{part}"), a.shape().to_vec(), bytes));
        }
    }
    let mut views = Vec::with_capacity(bufs.len() + 3);
    for (name, shape, bytes) in &bufs {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
            .map_err(|e| TcaError::Shape(format!("tensor {name}: {e}")))?;
        if layers.len() == 1 {
            let plain = name.rsplit('.').next().unwrap_or(name).to_string();
            views.push((plain, view.clone()));
        }
        views.push((name.clone(), view));
    }
    let layer_list = format_layers(&layers);
    let meta = HashMap::from([
        ("model".to_string(), model.name.clone()),
        ("layers".to_string(), layer_list.clone()),
        ("tokens".to_string(), tokens.len().to_string()),
        (
            "rope".to_string(),
            "post-RoPE, adjacent pairs (2i, 2i+1), GGUF row order".to_string(),
        ),
    ]);
    let tmp = args.out.with_extension("safetensors.partial");
    safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| TcaError::Format {
        path: tmp.clone(),
        msg: format!("cannot write safetensors: {e}"),
    })?;
    std::fs::rename(&tmp, &args.out).map_err(|e| TcaError::io(&args.out, e))?;
    let c = &model.llama.config;
    println!(
        "captured layers {layer_list} of {} tokens (text: {total} tokens)",
        tokens.len()
    );
    println!(
        "q [{}, {}, {}], k and v [{}, {}, {}] per layer, f32",
        c.n_heads,
        tokens.len(),
        c.head_dim,
        c.n_kv_heads,
        tokens.len(),
        c.head_dim
    );
    println!(
        "load {:.1} s, forward {:.1} s",
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64()
    );
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The outcome of `tca perplexity`.
#[derive(Debug, Clone)]
pub struct PerplexityReport {
    /// The model's name.
    pub model: String,
    pub tokens: usize,
    pub text_tokens: usize,
    pub score: Score,
    pub load_s: f64,
    /// Seconds spent calibrating (0 for exact attention or a loaded profile).
    pub calibrate_s: f64,
    pub forward_s: f64,
    /// Mean keep fraction over layers (1 for exact attention).
    pub keep_fraction: f64,
}

/// Compute what `tca perplexity` prints.
pub fn perplexity(args: &PerplexityArgs) -> Result<PerplexityReport> {
    let t0 = Instant::now();
    let (model, tokens, total) = load_inputs(
        args.model.as_deref(),
        &args.rope,
        args.text.as_deref(),
        args.tokens,
    )?;
    let cfg = args.calibration.config()?;
    let t1 = Instant::now();
    if args.backend == BackendKind::Cuda {
        super::gpu::cuda_supports(&model)?;
        let (score, keep_fraction, calibrate_s, open_s, forward_s) =
            score_cuda(args, &model, &tokens, &cfg)?;
        return Ok(PerplexityReport {
            model: model.name.clone(),
            tokens: tokens.len(),
            text_tokens: total,
            score,
            load_s: (t1 - t0).as_secs_f64() + open_s,
            calibrate_s,
            forward_s,
            keep_fraction,
        });
    }
    let (score, keep_fraction, t2) = match args.attention.policy() {
        None => {
            let t2 = Instant::now();
            let score = model.llama.score(&tokens, &Exact::default(), args.from)?;
            (score, 1.0, t2)
        }
        Some(p) => {
            let prof = args
                .calibration
                .profiles(&model, &cfg, &[cfg.tau])?
                .pop()
                .ok_or_else(|| TcaError::Invalid("no profile".into()))?;
            let t2 = Instant::now();
            let pol = SparsePolicy::new(p, cfg.clone(), prof)?;
            let score = model.llama.score(&tokens, &pol, args.from)?;
            (score, pol.mean_keep_fraction(), t2)
        }
    };
    let t3 = Instant::now();
    Ok(PerplexityReport {
        model: model.name.clone(),
        tokens: tokens.len(),
        text_tokens: total,
        score,
        load_s: (t1 - t0).as_secs_f64(),
        calibrate_s: (t2 - t1).as_secs_f64(),
        forward_s: (t3 - t2).as_secs_f64(),
        keep_fraction,
    })
}

/// The GPU forward's capture (`--backend cuda`).
#[cfg(feature = "cuda")]
fn capture_cuda(model: &Model, tokens: &[u32], layers: &[usize]) -> Result<crate::model::Capture> {
    crate::cuda::model::cli::capture(&model.llama, tokens, layers)
}

/// The GPU forward's score, keep fraction, and seconds of calibration, device start
/// and forward (`--backend cuda`).
#[cfg(feature = "cuda")]
fn score_cuda(
    args: &PerplexityArgs,
    model: &Model,
    tokens: &[u32],
    cfg: &Config,
) -> Result<(Score, f64, f64, f64, f64)> {
    let r = crate::cuda::model::cli::score(
        model,
        tokens,
        args.attention,
        &args.calibration,
        cfg,
        args.from,
    )?;
    Ok((
        r.score,
        r.keep_fraction,
        r.calibrate_s,
        r.open_s,
        r.forward_s,
    ))
}

#[cfg(not(feature = "cuda"))]
fn capture_cuda(_: &Model, _: &[u32], _: &[usize]) -> Result<crate::model::Capture> {
    Err(super::gpu::no_cuda())
}

#[cfg(not(feature = "cuda"))]
fn score_cuda(
    _: &PerplexityArgs,
    _: &Model,
    _: &[u32],
    _: &Config,
) -> Result<(Score, f64, f64, f64, f64)> {
    Err(super::gpu::no_cuda())
}

/// `tca perplexity`: prints the details, then `perplexity: <number>` as the last line.
pub fn run_perplexity(args: PerplexityArgs) -> Result<()> {
    let r = perplexity(&args)?;
    let s = &r.score;
    println!("model: {}", r.model);
    if args.backend == BackendKind::Cuda {
        println!("backend: cuda (f16 weights, bf16 Q/K/V, f32 accumulation)");
    }
    println!("attention: {}", args.attention.name());
    if args.attention != AttentionKind::Exact {
        let cfg = args.calibration.config()?;
        println!(
            "config: tau = {}, b = {}, w = {}, criterion {:?}; profile: {}",
            cfg.tau,
            cfg.block_size,
            cfg.window,
            cfg.criterion,
            match &args.calibration.profile {
                Some(p) => p.display().to_string(),
                None => format!(
                    "calibrated on tokens {}..{} of the calibration text ({:.1} s)",
                    args.calibration.calib_offset,
                    args.calibration.calib_offset + args.calibration.calib_tokens,
                    r.calibrate_s
                ),
            }
        );
        println!(
            "keep fraction (mean |S_i|/(i+1) over layers, heads, queries): {:.4}",
            r.keep_fraction
        );
    }
    println!("context: {} tokens (text: {})", r.tokens, r.text_tokens);
    println!(
        "targets: tokens {}..{} ({})",
        s.first_target,
        r.tokens,
        s.nll.len()
    );
    println!("mean nll: {:.4}", s.mean_nll());
    println!("top-1 accuracy: {:.4}", s.top1());
    println!(
        "time: load {:.1} s, forward {:.1} s ({:.0} tokens/s)",
        r.load_s,
        r.forward_s,
        r.tokens as f64 / r.forward_s.max(1e-9)
    );
    println!("perplexity: {:.4}", s.perplexity());
    Ok(())
}
