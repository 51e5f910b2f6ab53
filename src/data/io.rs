//! Files: Q/K/V as safetensors (tensors `q` [Hq, L, d], `k` and `v` [Hkv, L, d]; f64,
//! f32, f16 or bf16), and writing that never replaces a user's file unasked.

use super::Heads;
use crate::error::{Result, TcaError};
use ndarray::Array3;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

/// Writes `bytes` to `path`; an existing file is an error unless `force`.
pub fn write_new(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    if path.exists() && !force {
        return Err(TcaError::WouldOverwrite(path.into()));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| TcaError::io(dir, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| TcaError::io(path, e))
}

/// Element type used when saving.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveDtype {
    F64,
    F32,
}

/// Reads Q/K/V from a safetensors file. `prefix` selects tensors `{prefix}q`,
/// `{prefix}k`, `{prefix}v` (e.g. "layer3." for a multi-layer capture; "" for plain).
pub fn load_safetensors(path: &Path, prefix: &str) -> Result<Heads> {
    let bytes = std::fs::read(path).map_err(|e| TcaError::io(path, e))?;
    heads_from(&parse(path, &bytes)?, path, prefix)
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| TcaError::Format {
        path: path.into(),
        msg: format!("not a safetensors file: {e}"),
    })
}

/// The layer `{prefix}q/k/v` of an opened file.
fn heads_from(st: &SafeTensors<'_>, path: &Path, prefix: &str) -> Result<Heads> {
    let fmt = |msg: String| TcaError::Format {
        path: path.into(),
        msg,
    };
    let get = |name: &str| -> Result<Array3<f64>> {
        let full = format!("{prefix}{name}");
        let t = st.tensor(&full).map_err(|_| {
            let mut names: Vec<&str> = st.names();
            names.sort();
            fmt(format!("no tensor '{full}' (found: {})", names.join(", ")))
        })?;
        to_array3(&t).map_err(|m| fmt(format!("tensor '{full}': {m}")))
    };
    Heads::new(get("q")?, get("k")?, get("v")?)
}

fn to_array3(t: &TensorView<'_>) -> std::result::Result<Array3<f64>, String> {
    let shape = t.shape();
    if shape.len() != 3 {
        return Err(format!(
            "expected 3 dimensions [heads, L, d], got {shape:?}"
        ));
    }
    let data = t.data();
    let vals: Vec<f64> = match t.dtype() {
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        other => {
            return Err(format!(
                "unsupported dtype {other:?} (use f64, f32, f16 or bf16)"
            ))
        }
    };
    Array3::from_shape_vec((shape[0], shape[1], shape[2]), vals).map_err(|e| e.to_string())
}

/// Saves Q/K/V as tensors `q`, `k`, `v` with string `metadata`; refuses to replace an
/// existing file unless `force`.
pub fn save_safetensors(
    heads: &Heads,
    path: &Path,
    dtype: SaveDtype,
    metadata: HashMap<String, String>,
    force: bool,
) -> Result<()> {
    let (q, k, v) = heads.tensors();
    let enc = |a: &Array3<f64>| -> Vec<u8> {
        match dtype {
            SaveDtype::F64 => a.iter().flat_map(|x| x.to_le_bytes()).collect(),
            SaveDtype::F32 => a.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect(),
        }
    };
    let dt = match dtype {
        SaveDtype::F64 => Dtype::F64,
        SaveDtype::F32 => Dtype::F32,
    };
    let bufs = [("q", q, enc(q)), ("k", k, enc(k)), ("v", v, enc(v))];
    let views = bufs
        .iter()
        .map(|(n, a, b)| {
            TensorView::new(dt, a.shape().to_vec(), b)
                .map(|t| (n.to_string(), t))
                .map_err(|e| TcaError::Invalid(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| TcaError::Invalid(e.to_string()))?;
    write_new(path, &bytes, force)
}

/// Every layer of a multi-layer capture (tensors `layer{N}.q/k/v`), by layer index.
pub fn load_capture_layers(path: &Path) -> Result<Vec<(usize, Heads)>> {
    let bytes = std::fs::read(path).map_err(|e| TcaError::io(path, e))?;
    let st = parse(path, &bytes)?;
    let mut layers: Vec<usize> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("layer")?.strip_suffix(".q")?.parse().ok())
        .collect();
    layers.sort_unstable();
    if layers.is_empty() {
        return Err(TcaError::Format {
            path: path.into(),
            msg: "no tensors named layer{N}.q: not a multi-layer capture".into(),
        });
    }
    layers
        .into_iter()
        .map(|l| Ok((l, heads_from(&st, path, &format!("layer{l}."))?)))
        .collect()
}
