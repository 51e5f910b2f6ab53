//! `tca capture` and `tca perplexity`: the real model (SmolLM2-135M-Instruct) on a text.
//!
//! Both read a text (default: the embedded *Pride and Prejudice*), tokenise it, and
//! take its first `--tokens` tokens. The model is `--model PATH`, or
//! `SmolLM2-135M-Instruct.Q4_1.gguf` in the cache folder (`$TCA_CACHE`, else
//! `./cache`, filled by `scripts/fetch-assets`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Result, TcaError};
use crate::model::{assets, AttentionPolicy, Exact, Model, Score};

/// Attention used by the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum AttentionKind {
    /// Exact causal softmax attention (f32).
    #[default]
    Exact,
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
    /// GGUF model file (default: the cache's SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
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
    /// GGUF model file (default: the cache's SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: Option<PathBuf>,
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
    text: Option<&Path>,
    n: usize,
) -> Result<(Model, Vec<u32>, usize)> {
    if n == 0 {
        return Err(TcaError::Invalid("--tokens must be at least 1".into()));
    }
    let path = assets::model_path(model)?;
    let text = assets::read_text(text)?;
    let model = Model::load(&path)?;
    if n > model.llama.config.context {
        return Err(TcaError::Invalid(format!(
            "--tokens {n} exceeds the model's context of {}",
            model.llama.config.context
        )));
    }
    let mut tokens = model.tokenizer.encode(&text);
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
    let (model, tokens, total) =
        load_inputs(args.model.as_deref(), args.text.as_deref(), args.tokens)?;
    let layers = parse_layers(&args.layers, model.llama.config.n_layers)?;
    let t1 = Instant::now();
    let mut cap = model.llama.capture(&tokens, &layers)?;
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
        ("model".to_string(), assets::MODEL_NAME.to_string()),
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
    pub tokens: usize,
    pub text_tokens: usize,
    pub score: Score,
    pub load_s: f64,
    pub forward_s: f64,
}

/// Compute what `tca perplexity` prints.
pub fn perplexity(args: &PerplexityArgs) -> Result<PerplexityReport> {
    let t0 = Instant::now();
    let (model, tokens, total) =
        load_inputs(args.model.as_deref(), args.text.as_deref(), args.tokens)?;
    let policy: Box<dyn AttentionPolicy> = match args.attention {
        AttentionKind::Exact => Box::new(Exact::default()),
    };
    let t1 = Instant::now();
    let score = model.llama.score(&tokens, policy.as_ref(), args.from)?;
    let t2 = Instant::now();
    Ok(PerplexityReport {
        tokens: tokens.len(),
        text_tokens: total,
        score,
        load_s: (t1 - t0).as_secs_f64(),
        forward_s: (t2 - t1).as_secs_f64(),
    })
}

/// `tca perplexity`: prints the details, then `perplexity: <number>` as the last line.
pub fn run_perplexity(args: PerplexityArgs) -> Result<()> {
    let r = perplexity(&args)?;
    let s = &r.score;
    println!("model: {}", assets::MODEL_NAME);
    println!("attention: {:?}", args.attention);
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
