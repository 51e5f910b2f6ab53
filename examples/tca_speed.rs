//! Benchmark (not a test): prefill and greedy-decoding speed of SmolLM2-135M with exact
//! attention and with TCA (prefill: the f64 reference selection, f32 attention over the
//! selected keys; decoding over the compacted cache of docs/algorithm.md §3), on Pride and
//! Prejudice.
//!
//!     cargo run --release --example tca_speed -- [--prompt 2048] [--decode 64] [--profile P.json]
//!
//! Without `--profile`, calibrates on tokens 100000..102048 of the novel under
//! configs/model.toml (not timed). Needs `scripts/fetch-assets`.

use std::time::Instant;

use tca::cli::model::{calibration_tokens, DEFAULT_CALIB_OFFSET, MODEL_CONFIG};
use tca::model::sparse::{calibrate_model, generate_tca, SparsePolicy};
use tca::model::{assets, Exact, KvCache, Model};
use tca::selection::policies::Policy;
use tca::{Config, TcaError};

fn main() -> tca::Result<()> {
    let (mut prompt, mut decode, mut profile) = (2048usize, 64usize, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| TcaError::Invalid(format!("{a} needs a value")))
        };
        match a.as_str() {
            "--prompt" => {
                prompt = val()?
                    .parse()
                    .map_err(|_| TcaError::Invalid("--prompt".into()))?
            }
            "--decode" => {
                decode = val()?
                    .parse()
                    .map_err(|_| TcaError::Invalid("--decode".into()))?
            }
            "--profile" => profile = Some(std::path::PathBuf::from(val()?)),
            v => return Err(TcaError::Invalid(format!("unknown argument {v}"))),
        }
    }
    let cfg = Config::from_toml_str(MODEL_CONFIG)?;
    let model = Model::load(assets::model_path(None)?)?;
    let tokens = model.tokenizer.encode(assets::PRIDE_AND_PREJUDICE)?;
    if prompt + decode > tokens.len() || prompt == 0 || decode < 2 {
        return Err(TcaError::Invalid("bad --prompt/--decode".into()));
    }
    let tokens = &tokens[..prompt];
    let prof = match profile {
        Some(p) => tca::calibration::Profile::load(&p)?,
        None => {
            let calib = calibration_tokens(&model, None, DEFAULT_CALIB_OFFSET, 2048)?;
            calibrate_model(&model.llama, &calib, &cfg, &[cfg.tau])?
                .pop()
                .ok_or_else(|| TcaError::Invalid("no profile".into()))?
        }
    };
    println!(
        "threads {}, prompt {prompt}, decode {decode}, tau {}, b {}, w {}",
        rayon::current_num_threads(),
        cfg.tau,
        cfg.block_size,
        cfg.window
    );

    // Exact: prefill into the full cache, then decode.
    let mut cache = KvCache::new(&model.llama.config, prompt + decode);
    let t = Instant::now();
    let mut logits = model
        .llama
        .prefill_cache(tokens, &Exact::default(), &mut cache)?;
    let pre = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut exact_out = Vec::new();
    for _ in 0..decode {
        let next = tca::model::llama::argmax(logits.view());
        exact_out.push(next);
        logits = model.llama.decode_step(next, &mut cache)?;
    }
    let dec = t.elapsed().as_secs_f64();
    println!(
        "exact: prefill {pre:.1} s ({:.0} tok/s), decode {decode} tokens {dec:.2} s ({:.1} tok/s), KV f32 bytes {}",
        prompt as f64 / pre,
        decode as f64 / dec,
        cache.bytes()
    );

    // TCA: the prefill is timed by a first call with one new token; the second call's
    // extra time is the decoding.
    let mut pol = SparsePolicy::new(Policy::Tca, cfg.clone(), prof.clone())?;
    let t = Instant::now();
    generate_tca(&model.llama, tokens, 1, &mut pol, None)?;
    let pre_t = t.elapsed().as_secs_f64();
    let mut pol = SparsePolicy::new(Policy::Tca, cfg.clone(), prof)?;
    let t = Instant::now();
    let (out, cache_t) = generate_tca(&model.llama, tokens, decode + 1, &mut pol, None)?;
    let total = t.elapsed().as_secs_f64();
    let dec_t = total - pre_t;
    let held: usize = cache_t.tokens_held().iter().flatten().sum();
    let n_heads = cache_t.tokens_held().iter().map(|l| l.len()).sum::<usize>();
    let same = out
        .iter()
        .zip(&exact_out)
        .take_while(|(a, b)| a == b)
        .count();
    println!(
        "tca:   prefill {pre_t:.1} s ({:.0} tok/s), decode {decode} tokens {dec_t:.2} s ({:.1} tok/s), \
         cache {:.0} tokens per KV head (full: {}), KV f64 bytes {}; first {same} tokens equal exact's",
        prompt as f64 / pre_t,
        decode as f64 / dec_t,
        held as f64 / n_heads as f64,
        prompt + decode,
        cache_t.kv_bytes()
    );
    Ok(())
}
