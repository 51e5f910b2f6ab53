//! Hugging Face checkpoints without downloads:
//! - SmolLM2 exported from the GGUF by `tca export-hf` and loaded back through the
//!   Hugging Face path gives the GGUF path's logits, perplexity, captures, calibration
//!   profile and quality tables (needs the cached GGUF, see tests/model.rs);
//! - a tiny random qwen2 checkpoint (q/k/v biases, bf16, two shards, linear RoPE
//!   scaling, untied head, padded vocabulary) against a small independent f64 forward
//!   written here with Hugging Face's conventions (`rotate_half` on the stored rows);
//! - folders that are not a supported checkpoint are clear errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use tca::backend::BackendKind;
use tca::cli::model::{
    perplexity, run_calibrate_model, run_capture, run_export_hf, AttentionKind, CalibrateModelArgs,
    CalibrationArgs, CaptureArgs, ExportHfArgs, PerplexityArgs,
};
use tca::cli::quality::{run_quality_heads, run_quality_ppl, QualityHeadsArgs, QualityPplArgs};
use tca::model::{assets, Exact, KvCache, Model};
use tca::TcaError;

/// `max |a - b| / max |b|` over all entries.
fn max_rel_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
    diff / scale
}

// ---------------------------------------------------------------------------------
// SmolLM2: the GGUF and its Hugging Face export

fn gguf_path() -> Option<PathBuf> {
    match assets::model_path(None) {
        Ok(p) => Some(p),
        Err(e) if std::env::var("TCA_SKIP_MODEL_TESTS").is_ok_and(|v| v == "1") => {
            eprintln!("skipping (TCA_SKIP_MODEL_TESTS=1): {e}");
            None
        }
        Err(e) => panic!("{e}\nrun scripts/fetch-assets (or set TCA_SKIP_MODEL_TESTS=1)"),
    }
}

/// Table rows of a CSV without the columns that measure time.
fn csv_without_timings(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| !matches!(header[i], "seconds" | "tokens_per_s"))
        .collect();
    std::iter::once(header.iter().map(|s| s.to_string()).collect())
        .chain(lines.map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            keep.iter().map(|&i| f[i].to_string()).collect()
        }))
        .collect()
}

#[test]
fn smollm2_export_runs_like_the_gguf() {
    let Some(gguf) = gguf_path() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-hf");
    let export = ExportHfArgs {
        out: dir.clone(),
        force: false,
        model: None,
    };
    run_export_hf(export.clone()).unwrap();
    let e = run_export_hf(export.clone()).unwrap_err();
    assert!(matches!(e, TcaError::WouldOverwrite(_)), "{e}");

    // The folder is a Hugging Face checkpoint: names, un-permuted q/k rows, config.
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["rope_theta"], 100000.0);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.names().len(), 2 + 30 * 9);
        let q0 = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!((q0.dtype(), q0.shape()), (Dtype::F32, &[576usize, 576][..]));
        // Row h*64 + 32 + i of HF's q is row h*64 + 2i + 1 of the GGUF's.
        let g = tca::model::GgufFile::open(&gguf).unwrap();
        let (_, gq) = g.tensor_f32("blk.0.attn_q.weight").unwrap();
        let row = |data: &[u8], r: usize| -> Vec<f32> {
            data[r * 576 * 4..(r + 1) * 576 * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        for (h, i) in [(0, 0), (3, 5), (8, 31)] {
            assert_eq!(
                row(q0.data(), h * 64 + 32 + i),
                gq[(h * 64 + 2 * i + 1) * 576..][..576]
            );
            assert_eq!(
                row(q0.data(), h * 64 + i),
                gq[(h * 64 + 2 * i) * 576..][..576]
            );
        }
    }

    let a = Model::load(&gguf).unwrap();
    let b = Model::load(&dir).unwrap();
    assert_eq!(a.llama.config, b.llama.config);
    assert_eq!((b.tokenizer.bos_id, b.tokenizer.eos_id), (1, 2));
    // The exported tokenizer.json gives the same ids on the whole novel.
    let novel = assets::PRIDE_AND_PREJUDICE;
    assert_eq!(
        a.tokenizer.encode(novel).unwrap(),
        b.tokenizer.encode(novel).unwrap()
    );
    assert_eq!(
        b.tokenizer.encode("<|im_start|>user").unwrap()[0],
        a.tokenizer.encode("<|im_start|>").unwrap()[0]
    );

    // Logits agree (f32) on the novel's opening.
    let tokens = &a.tokenizer.encode(&novel[..2000]).unwrap()[..64];
    let la = a.llama.prefill(tokens, &Exact::default()).unwrap();
    let lb = b.llama.prefill(tokens, &Exact::default()).unwrap();
    let la64: Vec<f64> = la.iter().map(|&x| x as f64).collect();
    let rel = max_rel_diff(lb.as_slice().unwrap(), &la64);
    eprintln!("SmolLM2 HF export vs GGUF: max relative logit difference {rel:e}");
    assert!(rel < 1e-4, "{rel}");
    drop((a, b, la, lb));

    // The CLI commands give the same results through either path.
    let calib = CalibrationArgs {
        config: None,
        profile: None,
        calib_offset: 30_000,
        calib_tokens: 128,
        calib_text: None,
    };
    let ppl = |model: &Path| {
        perplexity(&PerplexityArgs {
            rope: Default::default(),
            text: None,
            tokens: 256,
            from: 0,
            attention: AttentionKind::Exact,
            calibration: calib.clone(),
            model: Some(model.to_path_buf()),
            backend: BackendKind::Cpu,
        })
        .unwrap()
    };
    let (pa, pb) = (ppl(&gguf), ppl(&dir));
    eprintln!(
        "perplexity on 256 tokens: GGUF {}, HF {}",
        pa.score.perplexity(),
        pb.score.perplexity()
    );
    assert!((pa.score.perplexity() - pb.score.perplexity()).abs() < 1e-4 * pa.score.perplexity());
    assert_eq!(pa.score.argmax, pb.score.argmax);
    assert_eq!(pb.model, "smollm2-hf");

    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let cfgfile = out.join("c.toml");
    std::fs::write(&cfgfile, "tau = 0.9\nblock_size = 16\nwindow = 32\n").unwrap();
    for (tag, model) in [("gguf", &gguf), ("hf", &dir)] {
        run_capture(CaptureArgs {
            rope: Default::default(),
            text: None,
            tokens: 48,
            layers: "0,17,29".into(),
            out: out.join(format!("{tag}.safetensors")),
            force: false,
            model: Some(model.clone()),
            backend: BackendKind::Cpu,
        })
        .unwrap();
        run_calibrate_model(CalibrateModelArgs {
            rope: Default::default(),
            backend: tca::backend::BackendKind::Cpu,
            config: Some(cfgfile.clone()),
            text: None,
            offset: 30_000,
            tokens: 128,
            out: out.join(format!("{tag}.json")),
            force: false,
            model: Some(model.clone()),
        })
        .unwrap();
        let small = CalibrationArgs {
            config: Some(cfgfile.clone()),
            ..calib.clone()
        };
        run_quality_ppl(QualityPplArgs {
            rope: Default::default(),
            backend: tca::backend::BackendKind::Cpu,
            text: None,
            lengths: "96".into(),
            taus: "0.9".into(),
            long_from: usize::MAX,
            long_taus: "0.9".into(),
            peers: "streaming_llm".into(),
            peer_tau: 0.9,
            peer_max_len: 2048,
            calibration: small.clone(),
            out: out.join(tag),
            force: false,
            model: Some(model.clone()),
        })
        .unwrap();
        run_quality_heads(QualityHeadsArgs {
            rope: Default::default(),
            backend: tca::backend::BackendKind::Cpu,
            decode_tokens: 16,
            oracle_rows: 2048,
            seed: 0,
            text: None,
            tokens: 64,
            calibration: small,
            out: out.join(tag),
            force: false,
            model: Some(model.clone()),
        })
        .unwrap();
    }
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    let (ca, cb) = (
        read(out.join("gguf.safetensors")),
        read(out.join("hf.safetensors")),
    );
    let (sa, sb) = (
        safetensors::SafeTensors::deserialize(&ca).unwrap(),
        safetensors::SafeTensors::deserialize(&cb).unwrap(),
    );
    assert_eq!(sa.names().len(), 9);
    for name in sa.names() {
        let (x, y) = (sa.tensor(name).unwrap(), sb.tensor(name).unwrap());
        assert_eq!(x.shape(), y.shape(), "{name}");
        assert_eq!(x.data(), y.data(), "capture {name} differs");
    }
    let json = |p: PathBuf| -> Value { serde_json::from_slice(&read(p)).unwrap() };
    assert_eq!(json(out.join("gguf.json")), json(out.join("hf.json")));
    for stem in ["ppl", "heads"] {
        let (x, y) = (
            csv_without_timings(&out.join("gguf").join(format!("{stem}.csv"))),
            csv_without_timings(&out.join("hf").join(format!("{stem}.csv"))),
        );
        assert!(x.len() > 2, "{stem}: {x:?}");
        assert_eq!(x, y, "{stem}.csv");
    }
}

// ---------------------------------------------------------------------------------
// A tiny random qwen2 checkpoint and an independent reference forward

const VOCAB: usize = 40; // the tokenizer has 30 tokens: padded like Qwen's
const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FFN: usize = 48;
const LAYERS: usize = 2;
const THETA: f64 = 1000.0;
const ROPE_FACTOR: f64 = 2.0;
const EPS: f64 = 1e-6;

/// xorshift64*: deterministic values in [-scale, scale].
struct Rng(u64);

impl Rng {
    fn next(&mut self, scale: f32) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
        scale * (2.0 * u - 1.0)
    }
}

/// Tensors by name: shape and values (already bf16-representable).
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn tiny_tensors(seed: u64) -> Tensors {
    let mut rng = Rng(seed);
    let mut t = Tensors::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| half::bf16::from_f32(offset + rng.next(scale)).to_f32())
            .collect();
        t.insert(name, (shape, v));
    };
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    put(
        "model.embed_tokens.weight".into(),
        vec![VOCAB, HIDDEN],
        1.0,
        0.0,
    );
    put("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.3, 0.0);
    put("model.norm.weight".into(), vec![HIDDEN], 0.2, 1.0);
    for i in 0..LAYERS {
        let n = |p: &str| format!("model.layers.{i}.{p}");
        put(n("input_layernorm.weight"), vec![HIDDEN], 0.2, 1.0);
        put(n("post_attention_layernorm.weight"), vec![HIDDEN], 0.2, 1.0);
        put(n("self_attn.q_proj.weight"), vec![q, HIDDEN], 0.4, 0.0);
        put(n("self_attn.k_proj.weight"), vec![kv, HIDDEN], 0.4, 0.0);
        put(n("self_attn.v_proj.weight"), vec![kv, HIDDEN], 0.4, 0.0);
        put(n("self_attn.q_proj.bias"), vec![q], 0.5, 0.0);
        put(n("self_attn.k_proj.bias"), vec![kv], 0.5, 0.0);
        put(n("self_attn.v_proj.bias"), vec![kv], 0.5, 0.0);
        put(n("self_attn.o_proj.weight"), vec![HIDDEN, q], 0.3, 0.0);
        put(n("mlp.gate_proj.weight"), vec![FFN, HIDDEN], 0.3, 0.0);
        put(n("mlp.up_proj.weight"), vec![FFN, HIDDEN], 0.3, 0.0);
        put(n("mlp.down_proj.weight"), vec![HIDDEN, FFN], 0.3, 0.0);
    }
    t
}

fn tiny_config() -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 64,
        "rms_norm_eps": EPS,
        "rope_theta": THETA,
        "rope_scaling": {"type": "linear", "factor": ROPE_FACTOR},
        "tie_word_embeddings": false,
        "use_sliding_window": false,
        "sliding_window": 32,
        "vocab_size": VOCAB,
        "bos_token_id": 0,
        "eos_token_id": [0, 1],
        "torch_dtype": "bfloat16"
    })
}

/// A byte-level BPE `tokenizer.json` as the ecosystem writes it: `<|endoftext|>`,
/// the letters a..z, `Ġ` (space), and the merges `a b`, `Ġ a`.
fn tiny_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), json!(0));
    for (i, c) in ('a'..='z').enumerate() {
        vocab.insert(c.to_string(), json!(i + 1));
    }
    vocab.insert("Ġ".into(), json!(27));
    vocab.insert("ab".into(), json!(28));
    vocab.insert("Ġa".into(), json!(29));
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false,
                          "lstrip": false, "rstrip": false, "normalized": false,
                          "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                          "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["a b", "Ġ a"]}
    })
    .to_string()
}

/// Write a checkpoint folder: tensors in `dtype` (BF16, F16 or F32), split over
/// `shards` files (with an index when more than one).
fn write_checkpoint(dir: &Path, config: &Value, tensors: &Tensors, dtype: Dtype, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, (shape, v))| {
            let b: Vec<u8> = match dtype {
                Dtype::BF16 => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
                Dtype::F16 => v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F64 => v.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect(),
                other => panic!("{other:?}"),
            };
            (name.clone(), shape.clone(), b)
        })
        .collect();
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (s, chunk) in bytes.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", s + 1)
        };
        let views: Vec<(String, TensorView)> = chunk
            .iter()
            .map(|(n, shape, b)| {
                weight_map.insert(n.clone(), json!(file));
                (n.clone(), TensorView::new(dtype, shape.clone(), b).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

fn rms_norm(x: &[f64], w: &[f32]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + EPS).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * inv * g as f64).collect()
}

/// `W x + b` for W `[out, in]` row-major.
fn mat_vec(w: &[f32], b: Option<&[f32]>, x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len())
        .enumerate()
        .map(|(r, row)| {
            let dot: f64 = row.iter().zip(x).map(|(&a, b)| a as f64 * b).sum();
            dot + b.map_or(0.0, |b| b[r] as f64)
        })
        .collect()
}

/// Hugging Face's RoPE on one head at position `p`: `x cos + rotate_half(x) sin`,
/// `rotate_half(x) = (-x[d/2..], x[..d/2])`, frequencies divided by the linear factor.
fn rope_hf(x: &mut [f64], p: usize) {
    let h = x.len() / 2;
    let orig = x.to_vec();
    for i in 0..h {
        let f = THETA.powf(-2.0 * i as f64 / x.len() as f64) / ROPE_FACTOR;
        let (c, s) = ((p as f64 * f).cos(), (p as f64 * f).sin());
        x[i] = orig[i] * c - orig[i + h] * s;
        x[i + h] = orig[i + h] * c + orig[i] * s;
    }
}

/// Logits `[L, VOCAB]` of the qwen2 forward in f64, written from the architecture's
/// definition (not from the crate's code).
fn reference_logits(t: &Tensors, tokens: &[u32]) -> Vec<Vec<f64>> {
    let w = |n: &str| t[n].1.as_slice();
    let d = HEAD_DIM;
    let g = HEADS / KV_HEADS;
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&tok| {
            let e = w("model.embed_tokens.weight");
            e[tok as usize * HIDDEN..][..HIDDEN]
                .iter()
                .map(|&v| v as f64)
                .collect()
        })
        .collect();
    for i in 0..LAYERS {
        let n = |p: &str| format!("model.layers.{i}.{p}");
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (pos, x) in xs.iter().enumerate() {
            let h = rms_norm(x, w(&n("input_layernorm.weight")));
            let proj = |p: &str| {
                mat_vec(
                    w(&n(&format!("self_attn.{p}.weight"))),
                    Some(w(&n(&format!("self_attn.{p}.bias")))),
                    &h,
                )
            };
            let (mut q, mut k) = (proj("q_proj"), proj("k_proj"));
            q.chunks_exact_mut(d).for_each(|head| rope_hf(head, pos));
            k.chunks_exact_mut(d).for_each(|head| rope_hf(head, pos));
            qs.push(q);
            ks.push(k);
            vs.push(proj("v_proj"));
        }
        for (t_pos, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0f64; HEADS * d];
            for head in 0..HEADS {
                let kv = head / g;
                let q = &qs[t_pos][head * d..(head + 1) * d];
                let scores: Vec<f64> = (0..=t_pos)
                    .map(|j| {
                        let k = &ks[j][kv * d..(kv + 1) * d];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - m).exp() / z;
                    for c in 0..d {
                        attn[head * d + c] += p * vs[j][kv * d + c];
                    }
                }
            }
            let o = mat_vec(w(&n("self_attn.o_proj.weight")), None, &attn);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms_norm(x, w(&n("post_attention_layernorm.weight")));
            let gate = mat_vec(w(&n("mlp.gate_proj.weight")), None, &h);
            let up = mat_vec(w(&n("mlp.up_proj.weight")), None, &h);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = mat_vec(w(&n("mlp.down_proj.weight")), None, &act);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
    }
    xs.iter()
        .map(|x| {
            mat_vec(
                w("lm_head.weight"),
                None,
                &rms_norm(x, w("model.norm.weight")),
            )
        })
        .collect()
}

#[test]
fn tiny_qwen2_matches_an_independent_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors = tiny_tensors(0x9e37_79b9_7f4a_7c15);
    for (dtype, shards) in [(Dtype::BF16, 2), (Dtype::F16, 1), (Dtype::F32, 3)] {
        let dir = tmp.path().join(format!("qwen2-{dtype:?}-{shards}"));
        write_checkpoint(&dir, &tiny_config(), &tensors, dtype, shards);
        let m = Model::load(&dir).unwrap();
        let c = &m.llama.config;
        assert_eq!((c.vocab, c.head_dim, c.context), (VOCAB, HEAD_DIM, 64));
        assert_eq!((m.tokenizer.bos_id, m.tokenizer.eos_id), (0, 0));
        // "ab" merges first (rank 0), so " ab" is Ġ + ab and " a" is Ġa.
        let mut tokens = m.tokenizer.encode("ab ab a zz").unwrap();
        assert_eq!(
            tokens,
            [28, 27, 28, 29, 27, 26, 26],
            "tokenizer.json merges"
        );
        // Every id of the model, also those past the tokenizer's 30.
        tokens.extend((0..VOCAB as u32).rev());
        let want = reference_logits(&tensors, &tokens);
        let got = m.llama.prefill(&tokens, &Exact::default()).unwrap();
        let want_flat: Vec<f64> = want.iter().flatten().copied().collect();
        let rel = max_rel_diff(got.as_slice().unwrap(), &want_flat);
        eprintln!("tiny qwen2 ({dtype:?}, {shards} shards): max relative difference {rel:e}");
        assert!(rel < 1e-4, "{dtype:?}: {rel}");
        // KV-cache decoding (biases on the decode path) reproduces the reference.
        let p = 20;
        let mut cache = KvCache::new(c, tokens.len());
        let mut last = m
            .llama
            .prefill_cache(&tokens[..p], &Exact::default(), &mut cache)
            .unwrap();
        for pos in p..tokens.len() {
            let rel = max_rel_diff(last.as_slice().unwrap(), &want[pos - 1]);
            assert!(rel < 1e-4, "decode position {pos}: {rel}");
            last = m.llama.decode_step(tokens[pos], &mut cache).unwrap();
        }
        // The comparison can fail: logits with the vocabulary reversed disagree.
        let reversed: Vec<f32> = got.slice(ndarray::s![.., ..;-1]).iter().copied().collect();
        assert!(max_rel_diff(&reversed, &want_flat) > 1e-2);
    }
}

#[test]
fn tiny_qwen2_round_trips_through_export() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors = tiny_tensors(7);
    let src = tmp.path().join("src");
    write_checkpoint(&src, &tiny_config(), &tensors, Dtype::F32, 1);
    let out = tmp.path().join("out");
    run_export_hf(ExportHfArgs {
        out: out.clone(),
        force: false,
        model: Some(src.clone()),
    })
    .unwrap();
    // The exported weights are the stored ones, names and row order included.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), tensors.len());
    for (name, (shape, v)) in &tensors {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        let got: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(&got, v, "{name}");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen2");
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["rope_scaling"]["rope_type"], "linear");
    let (a, b) = (Model::load(&src).unwrap(), Model::load(&out).unwrap());
    assert_eq!(a.llama.config, b.llama.config);
    let tokens: Vec<u32> = (0..30).collect();
    let (la, lb) = (
        a.llama.prefill(&tokens, &Exact::default()).unwrap(),
        b.llama.prefill(&tokens, &Exact::default()).unwrap(),
    );
    assert_eq!(la, lb);
}

#[test]
fn unsupported_checkpoints_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors = tiny_tensors(3);
    let mut n = 0;
    let mut case = |what: &str, config: Value, tensors: &Tensors, dtype: Dtype, want: &str| {
        n += 1;
        let dir = tmp.path().join(format!("case{n}"));
        write_checkpoint(&dir, &config, tensors, dtype, 1);
        let e = match Model::load(&dir) {
            Ok(_) => panic!("{what}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{what}: {e:?} does not name {want:?}");
    };
    let with = |k: &str, v: Value| {
        let mut c = tiny_config();
        c[k] = v;
        c
    };
    case(
        "gpt2",
        with("model_type", json!("gpt2")),
        &tensors,
        Dtype::F32,
        "\"gpt2\"",
    );
    case(
        "gelu",
        with("hidden_act", json!("gelu")),
        &tensors,
        Dtype::F32,
        "gelu",
    );
    case(
        "sliding window",
        with("use_sliding_window", json!(true)),
        &tensors,
        Dtype::F32,
        "use_sliding_window",
    );
    case(
        "dynamic rope",
        with(
            "rope_scaling",
            json!({"rope_type": "dynamic", "factor": 2.0}),
        ),
        &tensors,
        Dtype::F32,
        "dynamic",
    );
    case(
        "no hidden size",
        with("hidden_size", Value::Null),
        &tensors,
        Dtype::F32,
        "hidden_size",
    );
    case(
        "no eos",
        with("eos_token_id", Value::Null),
        &tensors,
        Dtype::F32,
        "eos_token_id",
    );
    let mut missing = tensors.clone();
    missing.remove("model.layers.1.self_attn.k_proj.bias");
    case(
        "missing bias",
        tiny_config(),
        &missing,
        Dtype::F32,
        "model.layers.1.self_attn.k_proj.bias",
    );
    let mut missing = tensors.clone();
    missing.remove("lm_head.weight");
    case(
        "missing head",
        tiny_config(),
        &missing,
        Dtype::F32,
        "lm_head.weight",
    );
    case("f64 weights", tiny_config(), &tensors, Dtype::F64, "F64");
    let mut bad_shape = tensors.clone();
    bad_shape.insert(
        "model.norm.weight".into(),
        (vec![HIDDEN + 1], vec![1.0; HIDDEN + 1]),
    );
    case(
        "bad shape",
        tiny_config(),
        &bad_shape,
        Dtype::F32,
        "model.norm.weight",
    );
    // A llama config on a checkpoint with biases: refused, not silently ignored.
    case(
        "llama with biases",
        with("model_type", json!("llama")),
        &tensors,
        Dtype::F32,
        "q_proj.bias",
    );

    // Folders that are not checkpoints.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = Model::load(&empty).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
    let dir = tmp.path().join("no-weights");
    write_checkpoint(&dir, &tiny_config(), &tensors, Dtype::F32, 1);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = Model::load(&dir).err().unwrap().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = Model::load(&dir).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::write(dir.join("model.safetensors"), b"not safetensors").unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    let e = Model::load(&dir).err().unwrap().to_string();
    assert!(e.contains("not a safetensors file"), "{e}");
    // The export refuses to overwrite a checkpoint without --force.
    let src = tmp.path().join("src");
    write_checkpoint(&src, &tiny_config(), &tensors, Dtype::F32, 1);
    // The GPU forward does not apply biases yet: refused before any device is sought.
    let e = perplexity(&PerplexityArgs {
        rope: Default::default(),
        text: None,
        tokens: 8,
        from: 0,
        attention: AttentionKind::Exact,
        calibration: CalibrationArgs {
            config: None,
            profile: None,
            calib_offset: 0,
            calib_tokens: 8,
            calib_text: None,
        },
        model: Some(src.clone()),
        backend: BackendKind::Cuda,
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("attention biases"), "{e}");
    let e = run_export_hf(ExportHfArgs {
        out: src.clone(),
        force: false,
        model: Some(src.clone()),
    })
    .unwrap_err();
    assert!(matches!(e, TcaError::WouldOverwrite(_)), "{e}");
}
