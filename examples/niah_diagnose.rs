//! Diagnostic (not a test): which tokens of the NIAH needle's number end up in TCA's
//! global set S_G, i.e. in the compacted decoding cache after prefill.
//!
//!     cargo run --release --example niah_diagnose -- PROFILE.json [LEN] [DEPTH]
//!
//! Builds the prompt of `tca quality-niah` (seed 7) for one length and depth, captures
//! every layer's Q/K/V in an exact forward pass, runs `selection::select` with the
//! profile's budgets (configs/model.toml) and prints, per digit of each mention of the
//! number, the fraction of (layer, KV head) whose S_G holds it, with its mean
//! importance rank inside its block. Needs `scripts/fetch-assets`.

use tca::calibration::Profile;
use tca::cli::model::MODEL_CONFIG;
use tca::cli::niah::{needle_number, niah_prompt};
use tca::model::{assets, Model};
use tca::selection::select;
use tca::{Config, TcaError};

fn main() -> tca::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().ok_or_else(|| {
        TcaError::Invalid("usage: niah_diagnose PROFILE.json [LEN] [DEPTH]".into())
    })?;
    let num = |i: usize, d: u64| -> tca::Result<u64> {
        args.get(i).map_or(Ok(d), |s| {
            s.parse()
                .map_err(|_| TcaError::Invalid(format!("bad number {s}")))
        })
    };
    let (len, depth) = (num(1, 1024)? as usize, num(2, 50)?);
    let cfg = Config::from_toml_str(MODEL_CONFIG)?;
    let prof = Profile::load(std::path::Path::new(path))?;
    let model = Model::load(assets::model_path(None)?)?;
    let hay = model.tokenizer.encode(&assets::haystack(None)?)?;
    let number = needle_number(7, len, depth);
    let prompt = niah_prompt(&model, &hay, len, depth, number)?;
    let is_digit = |p: usize| {
        let s = model
            .tokenizer
            .decode(&prompt[p..p + 1])
            .unwrap_or_default();
        s.len() == 1 && s.chars().all(|c| c.is_ascii_digit())
    };
    let region = len.saturating_sub(cfg.window);
    // The needle's number: runs of 7 digit tokens (the haystack's own numbers are shorter).
    let digits: Vec<usize> = (0..region.saturating_sub(6))
        .filter(|&p| (p..p + 7).all(is_digit) && (p == 0 || !is_digit(p - 1)))
        .flat_map(|p| p..p + 7)
        .collect();
    println!(
        "L = {len}, depth {depth}%, number {number}, digit tokens at {digits:?}, candidate region [0, {})",
        len.saturating_sub(cfg.window)
    );
    let layers: Vec<usize> = (0..model.llama.config.n_layers).collect();
    let cap = model.llama.capture(&prompt, &layers)?;
    let mut kept = vec![0usize; digits.len()];
    let mut total = 0usize;
    let mut block_keep = Vec::new();
    for (&l, qkv) in &cap.captured {
        let heads = qkv.to_heads()?;
        let sel = select(&heads, &cfg, &prof.budgets(l)?)?;
        for h in &sel.heads {
            total += 1;
            for (n, &p) in digits.iter().enumerate() {
                if h.global.binary_search(&p).is_ok() {
                    kept[n] += 1;
                }
            }
            if let Some(&p) = digits.first() {
                if let Some(j) = h.ranking.blocks.iter().position(|b| b.contains(&p)) {
                    block_keep.push(h.block_budgets[j]);
                }
            }
        }
    }
    for (n, &p) in digits.iter().enumerate() {
        println!(
            "digit {:?} at {p}: in S_G of {}/{} (layer, KV head)",
            model.tokenizer.decode(&prompt[p..p + 1])?,
            kept[n],
            total
        );
    }
    if !block_keep.is_empty() {
        println!(
            "budget t of the block holding the first digit, over (layer, KV head): mean {:.1} of {}, min {}, max {}",
            block_keep.iter().sum::<usize>() as f64 / block_keep.len() as f64,
            cfg.block_size,
            block_keep.iter().min().unwrap_or(&0),
            block_keep.iter().max().unwrap_or(&0)
        );
    }
    Ok(())
}
