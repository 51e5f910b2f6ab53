//! Hugging Face checkpoints: load a model folder, and write one ([`export`]).
//!
//! A folder holds `config.json`, the weights (`model.safetensors`, or shards listed by
//! `model.safetensors.index.json`'s `weight_map`) and `tokenizer.json`. The shards are
//! memory-mapped and each tensor (BF16, F16 or F32) is converted to f32 once, at load.
//!
//! Architectures (`model_type`): `llama` (Llama 3.x, SmolLM2; `attention_bias` gives
//! q/k/v/o biases), `mistral` (a `sliding_window` shorter than the context caps the
//! context at it: within the window the attention is exact) and `qwen2` (q/k/v
//! biases; `use_sliding_window` is refused). RoPE: `rope_theta` and `rope_scaling`
//! (none, linear, llama3, yarn; see [`super::rope`]); the output head is tied to the
//! embedding when `tie_word_embeddings` says so, else `lm_head.weight`. BOS and EOS
//! come from `config.json` (else `generation_config.json`; the first of a list).
//!
//! Hugging Face stores q/k rows for `rotate_half`; the loader permutes them (and their
//! biases) into the adjacent-pairs order that [`super::llama`] rotates, as llama.cpp's
//! converter does, so the forward pass, its captures and the GGUF path agree. The export
//! undoes the permutation.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::{Array1, Array2};
use safetensors::{Dtype, SafeTensors, View};
use serde_json::{json, Value};

use super::llama::{Layer, Llama, LlamaConfig, Model};
use super::rope::{permute_rows_to_halves, permute_rows_to_pairs, RopeScaling};
use super::tokenizer::Tokenizer;
use crate::error::{Result, TcaError};

/// File names in a model folder.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const GENERATION_CONFIG_FILE: &str = "generation_config.json";

fn format_err(path: &Path, msg: impl std::fmt::Display) -> TcaError {
    TcaError::Format {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| TcaError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| format_err(path, format!("not JSON: {e}")))
}

/// The architecture of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

/// What `config.json` says, checked.
struct HfConfig {
    arch: Arch,
    llama: LlamaConfig,
    tied: bool,
    qkv_bias: bool,
    o_bias: bool,
    bos: Option<u32>,
    eos: Option<u32>,
}

/// A token id, or the first of a list of them.
fn token_id(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Array(a) => a.first().and_then(Value::as_u64),
        x => x.as_u64(),
    }
    .and_then(|x| u32::try_from(x).ok())
}

fn parse_config(path: &Path, v: &Value) -> Result<HfConfig> {
    let bad = |m: String| format_err(path, m);
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let arch = match model_type {
        "llama" => Arch::Llama,
        "mistral" => Arch::Mistral,
        "qwen2" => Arch::Qwen2,
        other => {
            let archs = v
                .get("architectures")
                .map_or("none".into(), Value::to_string);
            return Err(bad(format!(
                "architecture {other:?} (architectures {archs}) is not supported \
                 (llama, mistral, qwen2)"
            )));
        }
    };
    let usize_of = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(Value::as_u64)
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| bad(format!("{k} is missing or not a whole number")))
    };
    let opt_usize = |k: &str| -> Result<Option<usize>> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => usize_of(k).map(Some),
        }
    };
    let flag = |k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
    let act = v
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    if act != "silu" {
        return Err(bad(format!(
            "hidden_act {act:?} is not supported (only silu)"
        )));
    }
    if flag("mlp_bias", false) {
        return Err(bad("mlp_bias = true is not supported".into()));
    }
    if let Some(p) = v.get("partial_rotary_factor").and_then(Value::as_f64) {
        if p != 1.0 {
            return Err(bad(format!(
                "partial RoPE (partial_rotary_factor {p}) is not supported"
            )));
        }
    }
    let hidden = usize_of("hidden_size")?;
    let n_heads = usize_of("num_attention_heads")?;
    let mut context = usize_of("max_position_embeddings")?;
    match arch {
        Arch::Qwen2 if flag("use_sliding_window", false) => {
            return Err(bad(
                "use_sliding_window = true (sliding-window attention) is not supported".into(),
            ));
        }
        Arch::Mistral => {
            if let Some(w) = opt_usize("sliding_window")? {
                context = context.min(w);
            }
        }
        _ => {}
    }
    let rope_scaling = RopeScaling::from_hf(v.get("rope_scaling"), context).map_err(bad)?;
    let llama = LlamaConfig {
        n_layers: usize_of("num_hidden_layers")?,
        n_heads,
        n_kv_heads: opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim: match opt_usize("head_dim")? {
            Some(d) => d,
            None => hidden.checked_div(n_heads).unwrap_or(0),
        },
        hidden,
        ffn: usize_of("intermediate_size")?,
        context,
        vocab: usize_of("vocab_size")?,
        rope_base: v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(10000.0),
        rope_scaling,
        rms_eps: v
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("rms_norm_eps is missing".into()))? as f32,
    };
    llama.validate().map_err(bad)?;
    let attention_bias = flag("attention_bias", false);
    Ok(HfConfig {
        arch,
        tied: flag("tie_word_embeddings", false),
        qkv_bias: arch == Arch::Qwen2 || attention_bias,
        o_bias: arch != Arch::Qwen2 && attention_bias,
        bos: token_id(v.get("bos_token_id")),
        eos: token_id(v.get("eos_token_id")),
        llama,
    })
}

/// A memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Where the data section starts.
    data_start: usize,
}

/// Where a tensor is.
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: (usize, usize),
}

/// The tensors of a checkpoint, over one or more memory-mapped shards.
struct Weights {
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
    dir: PathBuf,
}

impl Weights {
    fn open(dir: &Path) -> Result<Weights> {
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(INDEX_FILE);
        let files: Vec<String> = if index.is_file() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| format_err(&index, "no weight_map object"))?;
            let mut files: Vec<String> = Vec::new();
            for f in map.values() {
                let f = f
                    .as_str()
                    .ok_or_else(|| format_err(&index, format!("weight_map value {f}")))?;
                if Path::new(f).components().count() != 1 {
                    return Err(format_err(
                        &index,
                        format!("shard {f:?} is not a file name"),
                    ));
                }
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_owned());
                }
            }
            files.sort();
            files
        } else if single.is_file() {
            vec![WEIGHTS_FILE.to_owned()]
        } else {
            return Err(TcaError::Invalid(format!(
                "{}: no {WEIGHTS_FILE} and no {INDEX_FILE}",
                dir.display()
            )));
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let path = dir.join(f);
            let file = std::fs::File::open(&path).map_err(|e| TcaError::io(&path, e))?;
            // SAFETY: the map is only read; a file changed by another process while it is
            // mapped could change the values read (never their bounds, which are checked
            // against the map's length here and once more when read).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| TcaError::io(&path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| format_err(&path, format!("not a safetensors file: {e}")))?;
            for (name, info) in meta.tensors() {
                entries.insert(
                    name,
                    Entry {
                        shard: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: info.data_offsets,
                    },
                );
            }
            shards.push(Shard {
                path,
                map,
                data_start: 8 + n,
            });
        }
        Ok(Weights {
            shards,
            entries,
            dir: dir.to_path_buf(),
        })
    }

    fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name` as f32, checked to have `shape`.
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.entries.get(name).ok_or_else(|| {
            format_err(
                &self.dir,
                format!("tensor {name} is missing from the checkpoint"),
            )
        })?;
        let shard = &self.shards[e.shard];
        if e.shape != shape {
            return Err(format_err(
                &shard.path,
                format!("tensor {name} has shape {:?}, expected {shape:?}", e.shape),
            ));
        }
        let bytes = shard
            .map
            .get(shard.data_start + e.range.0..shard.data_start + e.range.1)
            .ok_or_else(|| format_err(&shard.path, format!("tensor {name} out of bounds")))?;
        match e.dtype {
            Dtype::F32 => Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            Dtype::F16 => Ok(bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            Dtype::BF16 => Ok(bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            other => Err(format_err(
                &shard.path,
                format!("tensor {name} is {other:?}; only BF16, F16 and F32 are supported"),
            )),
        }
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        let data = self.f32(name, &[rows, cols])?;
        Array2::from_shape_vec((rows, cols), data)
            .map_err(|e| TcaError::Shape(format!("tensor {name}: {e}")))
    }

    fn vector(&self, name: &str, n: usize) -> Result<Array1<f32>> {
        Ok(Array1::from(self.f32(name, &[n])?))
    }

    /// A q or k matrix `[heads·d, cols]` with its rows put in adjacent-pairs order.
    fn qk_matrix(&self, name: &str, rows: usize, cols: usize, d: usize) -> Result<Array2<f32>> {
        let data = permute_rows_to_pairs(&self.f32(name, &[rows, cols])?, cols, d);
        Array2::from_shape_vec((rows, cols), data)
            .map_err(|e| TcaError::Shape(format!("tensor {name}: {e}")))
    }

    fn qk_bias(&self, name: &str, n: usize, d: usize) -> Result<Array1<f32>> {
        Ok(Array1::from(permute_rows_to_pairs(
            &self.f32(name, &[n])?,
            1,
            d,
        )))
    }
}

/// The name of layer `i`'s tensor `part` (e.g. `self_attn.q_proj.weight`).
fn layer_name(i: usize, part: &str) -> String {
    format!("model.layers.{i}.{part}")
}

/// Load a Hugging Face model folder (see the module documentation).
pub fn load(dir: &Path) -> Result<Model> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(TcaError::Invalid(format!(
            "{} is a folder without {CONFIG_FILE}: not a Hugging Face model folder",
            dir.display()
        )));
    }
    let hf = parse_config(&config_path, &read_json(&config_path)?)?;
    let tok_path = dir.join(TOKENIZER_FILE);
    if !tok_path.is_file() {
        return Err(TcaError::Invalid(format!(
            "{}: no {TOKENIZER_FILE}",
            dir.display()
        )));
    }
    let (mut bos, mut eos) = (hf.bos, hf.eos);
    let gen_path = dir.join(GENERATION_CONFIG_FILE);
    if (bos.is_none() || eos.is_none()) && gen_path.is_file() {
        let g = read_json(&gen_path)?;
        bos = bos.or_else(|| token_id(g.get("bos_token_id")));
        eos = eos.or_else(|| token_id(g.get("eos_token_id")));
    }
    let eos = eos.ok_or_else(|| {
        format_err(
            &config_path,
            format!("no eos_token_id (nor in {GENERATION_CONFIG_FILE})"),
        )
    })?;
    let tokenizer = Tokenizer::from_file(&tok_path, bos.unwrap_or(eos), eos)?;
    let c = hf.llama.clone();
    if tokenizer.vocab_size() > c.vocab {
        return Err(format_err(
            &tok_path,
            format!(
                "the tokenizer has {} tokens, more than the model's vocab_size {}",
                tokenizer.vocab_size(),
                c.vocab
            ),
        ));
    }
    let w = Weights::open(dir)?;
    for (part, used) in [("q_proj", hf.qkv_bias), ("o_proj", hf.o_bias)] {
        let name = layer_name(0, &format!("self_attn.{part}.bias"));
        if w.has(&name) && !used {
            return Err(format_err(
                dir,
                format!(
                    "tensor {name} is in the checkpoint, but a {:?} model with this \
                     config.json has no such bias",
                    hf.arch
                ),
            ));
        }
    }
    let (d, hq, hkv, h) = (c.head_dim, c.n_heads, c.n_kv_heads, c.hidden);
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let n = |p: &str| layer_name(i, p);
        let bias = |p: &str, len: usize, qk: bool| -> Result<Option<Array1<f32>>> {
            if qk {
                w.qk_bias(&n(p), len, d).map(Some)
            } else {
                w.vector(&n(p), len).map(Some)
            }
        };
        let (bq, bk, bv) = if hf.qkv_bias {
            (
                bias("self_attn.q_proj.bias", hq * d, true)?,
                bias("self_attn.k_proj.bias", hkv * d, true)?,
                bias("self_attn.v_proj.bias", hkv * d, false)?,
            )
        } else {
            (None, None, None)
        };
        layers.push(Layer {
            attn_norm: w.vector(&n("input_layernorm.weight"), h)?,
            wq: w.qk_matrix(&n("self_attn.q_proj.weight"), hq * d, h, d)?,
            wk: w.qk_matrix(&n("self_attn.k_proj.weight"), hkv * d, h, d)?,
            wv: w.matrix(&n("self_attn.v_proj.weight"), hkv * d, h)?,
            wo: w.matrix(&n("self_attn.o_proj.weight"), h, hq * d)?,
            bq,
            bk,
            bv,
            bo: if hf.o_bias {
                bias("self_attn.o_proj.bias", h, false)?
            } else {
                None
            },
            ffn_norm: w.vector(&n("post_attention_layernorm.weight"), h)?,
            w_gate: w.matrix(&n("mlp.gate_proj.weight"), c.ffn, h)?,
            w_up: w.matrix(&n("mlp.up_proj.weight"), c.ffn, h)?,
            w_down: w.matrix(&n("mlp.down_proj.weight"), h, c.ffn)?,
        });
    }
    let tok_embd = w.matrix("model.embed_tokens.weight", c.vocab, h)?;
    let output = if hf.tied {
        None
    } else {
        Some(w.matrix("lm_head.weight", c.vocab, h)?)
    };
    let out_norm = w.vector("model.norm.weight", h)?;
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    Ok(Model {
        name,
        llama: Llama {
            config: c,
            tok_embd,
            layers,
            out_norm,
            output,
        },
        tokenizer,
    })
}

/// An f32 tensor written as little-endian bytes on demand (q/k rows optionally put
/// back in Hugging Face's order), so that one tensor at a time is converted.
struct Out<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
    /// Head dim of a q/k tensor whose rows are un-permuted.
    unpermute: Option<usize>,
}

impl View for &Out<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let cols = if self.shape.len() == 2 {
            self.shape[1]
        } else {
            1
        };
        let rows: Cow<[f32]> = match self.unpermute {
            Some(d) => Cow::Owned(permute_rows_to_halves(self.data, cols, d)),
            None => Cow::Borrowed(self.data),
        };
        Cow::Owned(rows.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

fn out_of<'a, D: ndarray::Dimension>(
    name: &str,
    a: &'a ndarray::Array<f32, D>,
    unpermute: Option<usize>,
) -> Result<(String, Out<'a>)> {
    let data = a
        .as_slice()
        .ok_or_else(|| TcaError::Shape(format!("tensor {name} is not contiguous")))?;
    Ok((
        name.to_owned(),
        Out {
            shape: a.shape().to_vec(),
            data,
            unpermute,
        },
    ))
}

/// A JSON number of an f32 as its shortest decimal (1e-5, not 9.99999974e-6).
fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// The `config.json` of a model.
fn config_json(model: &Model) -> Value {
    let l = &model.llama;
    let c = &l.config;
    let layer0 = l.layers.first();
    let qkv_bias = layer0.is_some_and(|x| x.bq.is_some());
    let o_bias = layer0.is_some_and(|x| x.bo.is_some());
    let (arch, model_type) = if qkv_bias && !o_bias {
        ("Qwen2ForCausalLM", "qwen2")
    } else {
        ("LlamaForCausalLM", "llama")
    };
    let mut v = json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": c.hidden,
        "intermediate_size": c.ffn,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.context,
        "rms_norm_eps": f32_json(c.rms_eps),
        "rope_theta": c.rope_base,
        "rope_scaling": c.rope_scaling.to_hf(),
        "tie_word_embeddings": l.output.is_none(),
        "vocab_size": c.vocab,
        "bos_token_id": model.tokenizer.bos_id,
        "eos_token_id": model.tokenizer.eos_id,
        "torch_dtype": "float32",
    });
    if model_type == "llama" {
        v["attention_bias"] = json!(qkv_bias);
        v["mlp_bias"] = json!(false);
    }
    v
}

/// Write `model` as a Hugging Face folder: `config.json`, `model.safetensors` (f32,
/// Hugging Face tensor names, q/k rows in Hugging Face's order) and `tokenizer.json`.
/// `dir` is made if missing; an existing file there is replaced only with `force`.
pub fn export(model: &Model, dir: &Path, force: bool) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(TcaError::Invalid(format!(
            "{} exists and is not a folder",
            dir.display()
        )));
    }
    let files = [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE];
    if !force {
        for f in files.iter().chain([&INDEX_FILE]) {
            let p = dir.join(f);
            if p.exists() {
                return Err(TcaError::WouldOverwrite(p));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| TcaError::io(dir, e))?;
    let l = &model.llama;
    let d = l.config.head_dim;
    let mut tensors = vec![
        out_of("model.embed_tokens.weight", &l.tok_embd, None)?,
        out_of("model.norm.weight", &l.out_norm, None)?,
    ];
    if let Some(o) = &l.output {
        tensors.push(out_of("lm_head.weight", o, None)?);
    }
    for (i, x) in l.layers.iter().enumerate() {
        let n = |p: &str| layer_name(i, p);
        tensors.extend([
            out_of(&n("input_layernorm.weight"), &x.attn_norm, None)?,
            out_of(&n("self_attn.q_proj.weight"), &x.wq, Some(d))?,
            out_of(&n("self_attn.k_proj.weight"), &x.wk, Some(d))?,
            out_of(&n("self_attn.v_proj.weight"), &x.wv, None)?,
            out_of(&n("self_attn.o_proj.weight"), &x.wo, None)?,
            out_of(&n("post_attention_layernorm.weight"), &x.ffn_norm, None)?,
            out_of(&n("mlp.gate_proj.weight"), &x.w_gate, None)?,
            out_of(&n("mlp.up_proj.weight"), &x.w_up, None)?,
            out_of(&n("mlp.down_proj.weight"), &x.w_down, None)?,
        ]);
        for (part, b, qk) in [
            ("q_proj", &x.bq, true),
            ("k_proj", &x.bk, true),
            ("v_proj", &x.bv, false),
            ("o_proj", &x.bo, false),
        ] {
            if let Some(b) = b {
                let name = n(&format!("self_attn.{part}.bias"));
                tensors.push(out_of(&name, b, qk.then_some(d))?);
            }
        }
    }
    let write = |name: &str, f: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.partial"));
        f(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(|e| TcaError::io(&path, e))
    };
    write(WEIGHTS_FILE, &|tmp: &Path| {
        let views = tensors.iter().map(|(n, o)| (n.as_str(), o));
        let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        safetensors::serialize_to_file(views, Some(meta), tmp)
            .map_err(|e| format_err(tmp, format!("cannot write safetensors: {e}")))
    })?;
    let text_file = |text: String| {
        move |tmp: &Path| std::fs::write(tmp, &text).map_err(|e| TcaError::io(tmp, e))
    };
    let config = serde_json::to_string_pretty(&config_json(model))
        .map_err(|e| TcaError::Invalid(format!("config.json: {e}")))?;
    write(CONFIG_FILE, &text_file(config))?;
    write(TOKENIZER_FILE, &text_file(model.tokenizer.to_json()?))?;
    Ok(())
}
