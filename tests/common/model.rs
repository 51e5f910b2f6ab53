//! The cached SmolLM2 model shared by the model tests: loaded once per test binary;
//! without it the tests fail, unless TCA_SKIP_MODEL_TESTS=1, which makes them skip.

use std::sync::OnceLock;

use tca::model::{assets, Model};

/// Whether TCA_SKIP_MODEL_TESTS=1.
pub fn skip_model_tests() -> bool {
    std::env::var("TCA_SKIP_MODEL_TESTS").is_ok_and(|v| v == "1")
}

/// The shared model, or None when absent and TCA_SKIP_MODEL_TESTS=1.
pub fn model() -> Option<&'static Model> {
    static MODEL: OnceLock<Option<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| match assets::model_path(None) {
            Ok(p) => Some(Model::load(&p).expect("the cached GGUF loads")),
            Err(e) => {
                if skip_model_tests() {
                    eprintln!("skipping model test (TCA_SKIP_MODEL_TESTS=1): {e}");
                    None
                } else {
                    panic!(
                        "{e}\nThe model tests need the SmolLM2 GGUF: run scripts/fetch-assets \
                         first (or set TCA_SKIP_MODEL_TESTS=1 to skip them)."
                    )
                }
            }
        })
        .as_ref()
}

/// The shared model, or return from the test (skipped).
#[allow(unused_macros)]
macro_rules! need_model {
    () => {
        match $crate::common::model::model() {
            Some(m) => m,
            None => return,
        }
    };
}
