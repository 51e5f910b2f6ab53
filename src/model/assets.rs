//! Where the model assets are: the GGUF and the NIAH essays live in the ignored
//! folder `cache/` (filled by `scripts/fetch-assets`); the default text is embedded.
//!
//! The cache folder is, in order: `$TCA_CACHE` if set; `./cache` if it exists (the
//! repository root as working directory); the `cache/` folder of the source tree this
//! crate was built from.

use std::path::{Path, PathBuf};

use crate::error::{Result, TcaError};

/// File name of the model in the cache.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Name recorded in capture metadata.
pub const MODEL_NAME: &str = "SmolLM2-135M-Instruct";
/// Folder of the Paul Graham essays (NIAH haystack) in the cache.
pub const ESSAYS_DIR: &str = "PaulGrahamEssays";

/// Jane Austen, *Pride and Prejudice* (public domain; see `data/README.md`).
pub const PRIDE_AND_PREJUDICE: &str = include_str!("../../data/pride-and-prejudice.txt");

/// The cache folder (see the module documentation).
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("TCA_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("cache");
    if local.is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cache")
}

fn missing(what: &str, path: &Path) -> TcaError {
    TcaError::Invalid(format!(
        "{what} not found at {}: run scripts/fetch-assets (or set TCA_CACHE, or pass the \
         path)",
        path.display()
    ))
}

/// The model: `explicit` if given (a GGUF file or a Hugging Face folder; it must
/// exist), else `<cache>/MODEL_FILE`.
pub fn model_path(explicit: Option<&Path>) -> Result<PathBuf> {
    let p = match explicit {
        Some(p) => p.to_path_buf(),
        None => cache_dir().join(MODEL_FILE),
    };
    if p.is_file() || (explicit.is_some() && p.is_dir()) {
        Ok(p)
    } else {
        Err(missing("model", &p))
    }
}

/// The NIAH essays folder: `explicit` if given, else `<cache>/ESSAYS_DIR`.
pub fn essays_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let p = match explicit {
        Some(p) => p.to_path_buf(),
        None => cache_dir().join(ESSAYS_DIR),
    };
    if p.is_dir() {
        Ok(p)
    } else {
        Err(missing("essays folder", &p))
    }
}

/// The Paul Graham essays concatenated in file-name order, as the NIAH haystack.
pub fn haystack(explicit: Option<&Path>) -> Result<String> {
    let dir = essays_dir(explicit)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| TcaError::io(&dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut out = String::new();
    for f in files {
        out.push_str(&std::fs::read_to_string(&f).map_err(|e| TcaError::io(&f, e))?);
    }
    Ok(out)
}

/// The text of `path`, or the embedded novel when `None`.
pub fn read_text(path: Option<&Path>) -> Result<String> {
    match path {
        None => Ok(PRIDE_AND_PREJUDICE.to_owned()),
        Some(p) => std::fs::read_to_string(p).map_err(|e| TcaError::io(p, e)),
    }
}
