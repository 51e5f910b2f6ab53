//! `import tca`: the tca library on numpy arrays (PyO3 + rust-numpy).
//!
//! Inputs are one layer's Q [Hq, L, d], K and V [Hkv, L, d] as numpy arrays of float64,
//! float32, float16 or bfloat16 (the `ml_dtypes` dtype, or a uint16 array of bf16 bits
//! with `dtype="bf16"`); each is widened to f64 exactly, as the CLI does when it reads
//! safetensors. Every function runs what the CLI subcommand of the same name runs (the
//! method: docs/algorithm.md) and raises `tca.TcaError` with the CLI's message on bad
//! input. The GIL is released while the library computes.

use ::tca::backend::{Backend, OracleRows};
use ::tca::bound::{summarize, QueryAudit};
use ::tca::calibration::{calibrate as calibrate_profile, Profile, PROFILE_VERSION};
use ::tca::data::{synth as make_synth, HeadKind, SynthSpec};
use ::tca::selection::{select as run_select, Budget};
use ::tca::{Config, Heads, TcaError as LibError};
use ndarray::{Array1, Array2, Array3};
use numpy::{
    IntoPyArray, PyArray3, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

create_exception!(
    tca,
    TcaError,
    PyValueError,
    "An error of the tca library; the message is the one the `tca` CLI prints."
);

/// The library's error as a Python exception with the CLI's message.
fn err(e: LibError) -> PyErr {
    TcaError::new_err(e.to_string())
}

/// A bad argument, worded like the CLI's `invalid argument` errors.
fn invalid(msg: String) -> PyErr {
    err(LibError::Invalid(msg))
}

/// One input tensor as f64 [heads, L, d]: float64/32/16 and bfloat16 are widened exactly;
/// `bf16_bits` reads a uint16 array as bf16 bit patterns.
fn tensor(name: &str, obj: &Bound<'_, PyAny>, bf16_bits: bool) -> PyResult<Array3<f64>> {
    let np = obj.py().import("numpy")?;
    let arr = np.call_method1("asarray", (obj,)).map_err(|e| {
        invalid(format!(
            "{name} cannot be read as a numpy array ({e}); pass a numpy array [heads, L, d]"
        ))
    })?;
    let arr = arr.cast::<PyUntypedArray>()?;
    if arr.ndim() != 3 {
        return Err(invalid(format!(
            "tensor '{name}': expected 3 dimensions [heads, L, d], got {:?}",
            arr.shape()
        )));
    }
    let dtype: String = arr.dtype().getattr("name")?.extract()?;
    let itemsize = arr.dtype().itemsize();
    // Copied in logical order, so the array has the standard layout the CLI's arrays have
    // (a reversed or strided view would otherwise keep its strides, and sums their order).
    fn widen<A: Copy>(a: ndarray::ArrayView3<'_, A>, f: impl Fn(A) -> f64) -> Array3<f64> {
        Array3::from_shape_fn(a.dim(), |ix| f(a[ix]))
    }
    let wide = |a: &Bound<'_, PyAny>| -> PyResult<Array3<f64>> {
        Ok(widen(
            a.cast::<PyArray3<f64>>()?.readonly().as_array(),
            |x| x,
        ))
    };
    let bits = |a: &Bound<'_, PyAny>| -> PyResult<Array3<f64>> {
        let a = a.cast::<PyArray3<u16>>()?.readonly();
        Ok(widen(a.as_array(), |b| half::bf16::from_bits(b).to_f64()))
    };
    match (dtype.as_str(), bf16_bits) {
        ("float64", false) => wide(arr.as_any()),
        ("float32", false) => Ok(widen(
            arr.cast::<PyArray3<f32>>()?.readonly().as_array(),
            f64::from,
        )),
        ("float16", false) => Ok(widen(
            arr.cast::<PyArray3<half::f16>>()?.readonly().as_array(),
            |x| x.to_f64(),
        )),
        ("bfloat16", _) if itemsize == 2 => bits(&arr.call_method1("view", ("uint16",))?),
        ("uint16", true) => bits(arr.as_any()),
        (other, true) => Err(invalid(format!(
            "tensor '{name}': dtype=\"bf16\" reads uint16 arrays of bf16 bits, got {other}"
        ))),
        (other, false) => Err(invalid(format!(
            "tensor '{name}': unsupported dtype {other} (use float64, float32, float16, \
             bfloat16, or uint16 bf16 bits with dtype=\"bf16\")"
        ))),
    }
}

/// Q, K, V as validated [`Heads`] (shapes, GQA, finite values: the CLI's checks).
fn heads(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    dtype: Option<&str>,
) -> PyResult<Heads> {
    let bits = match dtype {
        None => false,
        Some("bf16" | "bfloat16") => true,
        Some(other) => {
            return Err(invalid(format!(
                "dtype = \"{other}\": the only override is \"bf16\" (uint16 arrays of bf16 bits)"
            )))
        }
    };
    Heads::new(
        tensor("q", q, bits)?,
        tensor("k", k, bits)?,
        tensor("v", v, bits)?,
    )
    .map_err(err)
}

/// Is `obj` a path: a `str` without '=' (a TOML text sets at least one key) or an
/// `os.PathLike`.
fn as_path(obj: &Bound<'_, PyAny>) -> PyResult<Option<std::path::PathBuf>> {
    if let Ok(s) = obj.cast::<PyString>() {
        let s: String = s.extract()?;
        return Ok((!s.contains('=')).then(|| s.into()));
    }
    if obj.hasattr("__fspath__")? {
        return Ok(Some(
            obj.call_method0("__fspath__")?.extract::<String>()?.into(),
        ));
    }
    Ok(None)
}

/// `json.dumps(obj)`.
fn to_json(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    obj.py()
        .import("json")?
        .call_method1("dumps", (obj,))?
        .extract()
}

/// `json.loads(text)`.
fn from_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

/// The configuration: None (the defaults), a dict of TOML keys, a TOML text, or the path
/// of a TOML file; validated by the same code as the CLI's `--config`.
fn config(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Config> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(Config::default());
    };
    if let Some(path) = as_path(obj)? {
        return Config::from_file(&path).map_err(err);
    }
    if let Ok(text) = obj.cast::<PyString>() {
        return Config::from_toml_str(&text.extract::<String>()?).map_err(err);
    }
    if obj.cast::<PyDict>().is_ok() {
        let value: serde_json::Value = serde_json::from_str(&to_json(obj)?)
            .map_err(|e| err(LibError::Config(e.to_string())))?;
        let text = toml::to_string(&value).map_err(|e| err(LibError::Config(e.to_string())))?;
        return Config::from_toml_str(&text).map_err(err);
    }
    Err(err(LibError::Config(format!(
        "config must be None, a dict of TOML keys, a TOML text or a file path (got {})",
        obj.get_type().name()?
    ))))
}

/// A profile: the dict `tca.calibrate` returns, or the path of a profile JSON file.
fn profile(obj: &Bound<'_, PyAny>) -> PyResult<Profile> {
    if let Some(path) = as_path(obj)? {
        return Profile::load(&path).map_err(err);
    }
    let bad = |msg: String| {
        err(LibError::ProfileMismatch(format!(
            "not a calibration profile: {msg}"
        )))
    };
    if obj.cast::<PyDict>().is_err() {
        return Err(bad(format!(
            "expected the dict tca.calibrate returns or a file path, got {}",
            obj.get_type().name()?
        )));
    }
    let p: Profile = serde_json::from_str(&to_json(obj)?).map_err(|e| bad(e.to_string()))?;
    if p.version != PROFILE_VERSION {
        return Err(bad(format!(
            "profile version {} is not supported (this build reads {PROFILE_VERSION})",
            p.version
        )));
    }
    p.config.validate().map_err(err)?;
    Ok(p)
}

/// The budgets of a layer, as the CLI's `bound` finds them: from a profile checked
/// against the input and configuration, else by calibrating the input itself; with
/// whether they were calibrated on this very input (in-sample).
fn budgets(
    h: &Heads,
    cfg: &Config,
    prof: Option<Profile>,
    layer: usize,
) -> ::tca::Result<(Vec<Budget>, Option<bool>)> {
    match prof {
        Some(p) => {
            p.check_fits(h, cfg, layer)?;
            Ok((p.budgets(layer)?, p.in_sample(h, layer)))
        }
        None => Ok((
            calibrate_profile(h, cfg, layer)?.budgets(layer)?,
            Some(true),
        )),
    }
}

/// Calibrates one layer (docs/algorithm.md §2), as `tca calibrate` does.
///
/// q: [Hq, L, d], k and v: [Hkv, L, d]; config: None, a dict of TOML keys, a TOML text or
/// a file path; layer: the layer index recorded in the profile. Returns the profile as a
/// dict (the JSON `tca calibrate --out` writes), which `select` and `bound` accept.
#[pyfunction]
#[pyo3(signature = (q, k, v, config=None, *, layer=0, dtype=None))]
fn calibrate<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    config: Option<&Bound<'py, PyAny>>,
    layer: usize,
    dtype: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let h = heads(q, k, v, dtype)?;
    let cfg = self::config(config)?;
    let prof = py
        .detach(|| calibrate_profile(&h, &cfg, layer))
        .map_err(err)?;
    let text = serde_json::to_string(&prof).map_err(|e| invalid(e.to_string()))?;
    from_json(py, &text)
}

/// Online core-context selection of one layer (docs/algorithm.md §1).
///
/// The budgets come from `profile` (a dict from `calibrate` or a file path) or, when it is
/// None, from calibrating the input itself. Returns a dict: `global` (S_G of each KV head,
/// an int64 array of positions), `importance` [Hkv, L], `block_score` (h_j),
/// `block_budget` (t_j) [Hkv, nb], `kept` [Hq, L] (|S_i|), `window`, `block_size`.
#[pyfunction]
#[pyo3(signature = (q, k, v, config=None, *, profile=None, layer=0, dtype=None))]
#[allow(clippy::too_many_arguments)]
fn select<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    config: Option<&Bound<'py, PyAny>>,
    profile: Option<&Bound<'py, PyAny>>,
    layer: usize,
    dtype: Option<&str>,
) -> PyResult<Bound<'py, PyDict>> {
    let h = heads(q, k, v, dtype)?;
    let cfg = self::config(config)?;
    let prof = profile
        .filter(|p| !p.is_none())
        .map(self::profile)
        .transpose()?;
    let sel = py
        .detach(|| budgets(&h, &cfg, prof, layer).and_then(|(b, _)| run_select(&h, &cfg, &b)))
        .map_err(err)?;
    let (hq, hkv, l) = (h.num_q_heads(), h.num_kv_heads(), h.len());
    let nb = sel.heads.first().map_or(0, |s| s.block_budgets.len());
    let importance = Array2::from_shape_fn((hkv, l), |(kv, i)| sel.heads[kv].ranking.importance[i]);
    let score = Array2::from_shape_fn((hkv, nb), |(kv, j)| sel.heads[kv].ranking.scores.score[j]);
    let budget = Array2::from_shape_fn((hkv, nb), |(kv, j)| sel.heads[kv].block_budgets[j] as i64);
    let kept = Array2::from_shape_fn((hq, l), |(hh, i)| sel.kept(hh / h.group(), i) as i64);
    let global = PyList::empty(py);
    for s in &sel.heads {
        let g: Array1<i64> = s.global.iter().map(|&j| j as i64).collect();
        global.append(g.into_pyarray(py))?;
    }
    let d = PyDict::new(py);
    d.set_item("global", global)?;
    d.set_item("importance", importance.into_pyarray(py))?;
    d.set_item("block_score", score.into_pyarray(py))?;
    d.set_item("block_budget", budget.into_pyarray(py))?;
    d.set_item("kept", kept.into_pyarray(py))?;
    d.set_item("window", cfg.window)?;
    d.set_item("block_size", cfg.block_size)?;
    Ok(d)
}

/// The per-query fields of [`QueryAudit`] returned as [Hq, L] arrays.
const QUERY_FIELDS: [&str; 14] = [
    "gamma",
    "kept",
    "err_l1",
    "err_linf",
    "err_l2",
    "vmax_abs",
    "vrow_l1_max",
    "vdiam_l2",
    "identity_residual",
    "allow_linf",
    "allow_l1",
    "allow_l2",
    "allow_identity",
    "gamma_allowance",
];

fn query_field(a: &QueryAudit, name: &str) -> f64 {
    match name {
        "gamma" => a.gamma,
        "kept" => a.kept as f64,
        "err_l1" => a.err_l1,
        "err_linf" => a.err_linf,
        "err_l2" => a.err_l2,
        "vmax_abs" => a.vmax_abs,
        "vrow_l1_max" => a.vrow_l1_max,
        "vdiam_l2" => a.vdiam_l2,
        "allow_linf" => a.allow_linf,
        "allow_l1" => a.allow_l1,
        "allow_l2" => a.allow_l2,
        "allow_identity" => a.allow_identity,
        "gamma_allowance" => a.gamma_allowance,
        // NaN where not measured (never on the CPU oracle).
        _ => a.identity_residual.unwrap_or(f64::NAN),
    }
}

/// Theorem 1 audit of one layer (docs/algorithm.md §4) on the f64 CPU oracle, as
/// `tca bound` does: the same selection, the same per-query numbers, the same verdicts.
///
/// The budgets come from `profile` (a dict from `calibrate` or a file path) or, when it is
/// None, from calibrating the input itself. `inputs_bf16` rounds the inputs to bf16 first
/// (the CLI's `--inputs-bf16`). Returns a dict: `summary` (the dict of summary.json, with
/// a verdict per reading under `summary["readings"]`), `global` (S_G per KV head), and
/// per-query [Hq, L] arrays `gamma`, `kept` (int64), `err_l1`, `err_linf`, `err_l2`,
/// `vmax_abs`, `vrow_l1_max`, `vdiam_l2`, `identity_residual` and the rounding allowances
/// `allow_linf`, `allow_l1`, `allow_l2`, `allow_identity`, `gamma_allowance` (the columns
/// of queries.csv; a reading holds where lhs <= rhs + allowance, docs/theorem.md).
#[pyfunction]
#[pyo3(signature = (q, k, v, config=None, profile=None, *, layer=0, dtype=None, inputs_bf16=false))]
#[allow(clippy::too_many_arguments)]
fn bound<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    config: Option<&Bound<'py, PyAny>>,
    profile: Option<&Bound<'py, PyAny>>,
    layer: usize,
    dtype: Option<&str>,
    inputs_bf16: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let mut h = heads(q, k, v, dtype)?;
    if inputs_bf16 {
        h = h.rounded_to_bf16().map_err(err)?;
    }
    let cfg = self::config(config)?;
    let prof = profile
        .filter(|p| !p.is_none())
        .map(self::profile)
        .transpose()?;
    let (global, audits, summary) = py
        .detach(|| {
            let (b, in_sample) = budgets(&h, &cfg, prof, layer)?;
            let la = Backend::Cpu.audit_layer(&h, &cfg, &b, OracleRows::default())?;
            let mut summary = summarize(&la.audits, cfg.tau);
            summary.context.in_sample = in_sample;
            Ok::<_, LibError>((la.global, la.audits, summary))
        })
        .map_err(err)?;
    let text = serde_json::to_string(&summary).map_err(|e| invalid(e.to_string()))?;
    let (hq, l) = (h.num_q_heads(), h.len());
    let d = PyDict::new(py);
    d.set_item("summary", from_json(py, &text)?)?;
    for name in QUERY_FIELDS {
        let mut a = Array2::<f64>::from_elem((hq, l), f64::NAN);
        for x in &audits {
            a[(x.head, x.query)] = query_field(x, name);
        }
        if name == "kept" {
            d.set_item(name, a.mapv(|x| x as i64).into_pyarray(py))?;
        } else {
            d.set_item(name, a.into_pyarray(py))?;
        }
    }
    let g = PyList::empty(py);
    for s in &global {
        let a: Array1<i64> = s.iter().map(|&j| j as i64).collect();
        g.append(a.into_pyarray(py))?;
    }
    d.set_item("global", g)?;
    Ok(d)
}

/// Seeded synthetic heads, as `tca synth` makes them: kind is one of "uniform",
/// "bipolar", "terminal", "sink", "retrieval". Returns (q, k, v) as float64 arrays
/// [heads, len, dim], [kv_heads, len, dim]; with `needles=True` also the needle positions
/// of each KV head (retrieval; empty lists otherwise).
#[pyfunction]
#[pyo3(signature = (kind, *, heads=4, kv_heads=2, len=1024, dim=64, seed=0, needles=false))]
#[allow(clippy::too_many_arguments)]
fn synth<'py>(
    py: Python<'py>,
    kind: &str,
    heads: usize,
    kv_heads: usize,
    len: usize,
    dim: usize,
    seed: u64,
    needles: bool,
) -> PyResult<Bound<'py, pyo3::types::PyTuple>> {
    let kind = HeadKind::ALL
        .into_iter()
        .find(|k| k.name() == kind)
        .ok_or_else(|| {
            invalid(format!(
                "unknown kind \"{kind}\" (one of {})",
                HeadKind::ALL.map(|k| k.name()).join(", ")
            ))
        })?;
    let spec = SynthSpec {
        kind,
        q_heads: heads,
        kv_heads,
        len,
        dim,
        seed,
    };
    let s = py.detach(|| make_synth(&spec)).map_err(err)?;
    let (q, k, v) = s.heads.tensors();
    let mut items: Vec<Bound<'py, PyAny>> = vec![
        q.clone().into_pyarray(py).into_any(),
        k.clone().into_pyarray(py).into_any(),
        v.clone().into_pyarray(py).into_any(),
    ];
    if needles {
        items.push(pyo3::types::PyList::new(py, &s.needles)?.into_any());
    }
    pyo3::types::PyTuple::new(py, items)
}

/// The default configuration as a dict of its TOML keys (docs/algorithm.md §7).
#[pyfunction]
fn default_config(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let text = serde_json::to_string(&Config::default()).map_err(|e| invalid(e.to_string()))?;
    from_json(py, &text)
}

/// The Python module `tca`.
#[pymodule]
#[pyo3(name = "tca")]
fn tca_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TcaError", m.py().get_type::<TcaError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("QUERY_FIELDS", QUERY_FIELDS.to_vec())?;
    m.add_function(wrap_pyfunction!(calibrate, m)?)?;
    m.add_function(wrap_pyfunction!(select, m)?)?;
    m.add_function(wrap_pyfunction!(bound, m)?)?;
    m.add_function(wrap_pyfunction!(synth, m)?)?;
    m.add_function(wrap_pyfunction!(default_config, m)?)?;
    Ok(())
}
