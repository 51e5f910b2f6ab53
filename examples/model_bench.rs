//! Benchmark of the SmolLM2 forward pass on this machine (not a test).
//!
//!     cargo run --release --example model_bench -- [prefill lengths...] [--decode N]
//!
//! Defaults: prefill at 2048 and 8192 tokens of Pride and Prejudice with exact
//! attention (perplexity and top-1 printed as a sanity check), then greedy decoding of
//! 64 tokens after a 512-token prompt. Needs `scripts/fetch-assets`.

use std::time::Instant;

use tca::model::{assets, Exact, Model};

fn main() -> tca::Result<()> {
    let mut lens: Vec<usize> = Vec::new();
    let mut decode = 64usize;
    let mut prompt = 512usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--decode" => decode = args.next().and_then(|v| v.parse().ok()).unwrap_or(64),
            "--prompt" => prompt = args.next().and_then(|v| v.parse().ok()).unwrap_or(512),
            v => lens.push(
                v.parse()
                    .map_err(|_| tca::TcaError::Invalid(format!("bad length {v}")))?,
            ),
        }
    }
    if lens.is_empty() {
        lens = vec![2048, 8192];
    }
    println!("threads: {}", rayon::current_num_threads());
    let t = Instant::now();
    let model = Model::load(assets::model_path(None)?)?;
    println!("load: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let tokens = model.tokenizer.encode(assets::PRIDE_AND_PREJUDICE)?;
    println!(
        "tokenize: {} tokens of the novel in {:.2} s",
        tokens.len(),
        t.elapsed().as_secs_f64()
    );
    for &n in &lens {
        let t = Instant::now();
        let score = model.llama.score(&tokens[..n], &Exact::default(), 0)?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "prefill {n}: {s:.2} s, {:.0} tokens/s (with output head); perplexity {:.3}, top-1 {:.4}",
            n as f64 / s,
            score.perplexity(),
            score.top1()
        );
    }
    if decode > 0 {
        let mut cache = tca::model::KvCache::new(&model.llama.config, prompt + decode);
        let t = Instant::now();
        let mut logits =
            model
                .llama
                .prefill_cache(&tokens[..prompt], &Exact::default(), &mut cache)?;
        let tp = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut out = Vec::new();
        for _ in 0..decode {
            let next = tca::model::llama::argmax(logits.view());
            out.push(next);
            logits = model.llama.decode_step(next, &mut cache)?;
        }
        let td = t.elapsed().as_secs_f64();
        println!(
            "decode: prompt {prompt} prefilled in {tp:.2} s; {decode} greedy tokens in {td:.2} s, {:.1} tokens/s",
            decode as f64 / td
        );
        println!("continuation: {:?}", model.tokenizer.decode(&out)?);
    }
    Ok(())
}
