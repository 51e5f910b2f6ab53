//! The model's tokenizer: Hugging Face's `tokenizers` crate, loaded from a
//! `tokenizer.json` or built from a GGUF's `tokenizer.ggml.*` metadata.
//!
//! From a GGUF (`tokenizer.ggml.model = "gpt2"`, e.g. SmolLM2 with
//! `tokenizer.ggml.pre = "smollm"`) the tokenizer is what SmolLM2's `tokenizer.json`
//! holds:
//! - model: byte-level BPE over `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`
//!   (merge rank = position in the list), unknown token `tokenizer.ggml.unknown_token_id`
//!   (SmolLM2's vocabulary lacks 21 bytes: 0xC0, 0xC1, 0xF5..=0xFF, which never occur in
//!   UTF-8, and the control characters 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D);
//! - pre-tokenizer: `Digits(individual_digits)` (every numeric character is its own
//!   piece), then `ByteLevel` (the GPT-2 pattern
//!   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, no
//!   prefix space, bytes mapped to GPT-2's printable symbols);
//! - decoder: `ByteLevel`; control tokens (`token_type` 3, e.g. `<|im_start|>`) are
//!   special added tokens, matched as a whole in text as the Hugging Face tokenizer does.
//!
//! No BOS is added (`tokenizer.ggml.add_bos_token = false` for SmolLM2; a
//! `tokenizer.json`'s post-processor is not applied either): ids are the text's alone.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::AddedToken;

use super::gguf::{GgufFile, MetaValue};
use crate::error::{Result, TcaError};

/// GGUF token type of a control token.
const TOKEN_TYPE_CONTROL: u64 = 3;

/// A tokenizer with the ids of its beginning and end of sequence.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from, for error messages.
    source: PathBuf,
    /// One more than the largest id it can produce.
    vocab_size: usize,
    pub bos_id: u32,
    pub eos_id: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn format_err(path: &Path, msg: impl std::fmt::Display) -> TcaError {
    TcaError::Format {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

impl Tokenizer {
    /// Build the tokenizer from GGUF metadata (`tokenizer.ggml.model = "gpt2"`).
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let model = g.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(format_err(
                &g.path,
                format!("tokenizer model {model:?} is not supported (only gpt2 BPE)"),
            ));
        }
        let vocab = g.meta_str_array("tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match g.metadata.get("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; vocab.len()],
        };
        let merges = g.meta_str_array("tokenizer.ggml.merges")?;
        let bos = g.meta_usize("tokenizer.ggml.bos_token_id")?;
        let eos = g.meta_usize("tokenizer.ggml.eos_token_id")?;
        let unk = g.meta_usize("tokenizer.ggml.unknown_token_id").ok();
        Tokenizer::from_bpe(&vocab, &types, &merges, bos, eos, unk)
            .map_err(|msg| format_err(&g.path, msg))
            .map(|t| Tokenizer {
                source: g.path.clone(),
                ..t
            })
    }

    /// A byte-level BPE tokenizer (see the module documentation) from a vocabulary
    /// (byte-level symbols), token types (3 = control, made a special added token),
    /// merges ("left right", by rank), the BOS/EOS ids and the id standing for a byte
    /// without a token (without one, such bytes are dropped).
    pub fn from_bpe(
        vocab: &[&str],
        types: &[u64],
        merges: &[&str],
        bos: usize,
        eos: usize,
        unk: Option<usize>,
    ) -> std::result::Result<Tokenizer, String> {
        if vocab.is_empty() || vocab.len() > u32::MAX as usize {
            return Err(format!("vocabulary of {} tokens", vocab.len()));
        }
        if bos >= vocab.len() || eos >= vocab.len() || unk.is_some_and(|u| u >= vocab.len()) {
            return Err(format!(
                "BOS {bos}, EOS {eos} or UNK {unk:?} outside the vocabulary"
            ));
        }
        // The first id of a duplicated token string wins.
        let mut map = Vocab::with_capacity(vocab.len());
        for (i, t) in vocab.iter().enumerate() {
            map.entry((*t).to_owned()).or_insert(i as u32);
        }
        let mut pairs = Vec::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let (l, r) = m
                .split_once(' ')
                .ok_or_else(|| format!("merge {rank} ({m:?}) is not \"left right\""))?;
            for s in [l, r, &format!("{l}{r}")] {
                if !map.contains_key(s) {
                    return Err(format!("merge {rank} ({m:?}): {s:?} not in vocabulary"));
                }
            }
            pairs.push((l.to_owned(), r.to_owned()));
        }
        let mut builder = BPE::builder().vocab_and_merges(map, pairs);
        if let Some(u) = unk {
            builder = builder.unk_token(vocab[u].to_owned());
        }
        let bpe = builder.build().map_err(|e| format!("BPE model: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        // As a decoder, ByteLevel maps the symbols back to bytes (its options are unused).
        inner.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<AddedToken> = vocab
            .iter()
            .zip(types)
            .filter(|(_, ty)| **ty == TOKEN_TYPE_CONTROL)
            .map(|(t, _)| AddedToken::from(*t, true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| format!("special tokens: {e}"))?;
        Ok(Tokenizer {
            inner,
            source: PathBuf::new(),
            vocab_size: vocab.len(),
            bos_id: bos as u32,
            eos_id: eos as u32,
        })
    }

    /// Load a Hugging Face `tokenizer.json`, with the given BOS and EOS ids.
    pub fn from_file(path: &Path, bos: u32, eos: u32) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| TcaError::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| format_err(path, e))?;
        let vocab_size = inner.get_vocab_size(true);
        if bos as usize >= vocab_size || eos as usize >= vocab_size {
            return Err(format_err(
                path,
                format!("BOS {bos} or EOS {eos} outside the vocabulary of {vocab_size}"),
            ));
        }
        Ok(Tokenizer {
            inner,
            source: path.to_path_buf(),
            vocab_size,
            bos_id: bos,
            eos_id: eos,
        })
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| format_err(&self.source, format!("serialising the tokenizer: {e}")))
    }

    /// One more than the largest token id (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The stored string of a token (byte-level symbols), if the id exists.
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Token ids of `text` (no BOS, special tokens matched as a whole).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| format_err(&self.source, format!("encoding a text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of a sequence of ids (special tokens kept, unknown ids skipped, invalid
    /// UTF-8 replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| format_err(&self.source, format!("decoding ids: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's printable symbol of each byte (for building test vocabularies).
    fn byte_symbols() -> Vec<String> {
        let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        chars.sort_unstable();
        chars.into_iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn bpe_merges_by_rank() {
        let mut vocab = byte_symbols();
        assert_eq!(vocab.len(), 256);
        let id = |v: &[String], s: &str| v.iter().position(|t| t == s).unwrap() as u32;
        vocab.push("ab".into()); // 256
        vocab.push("bc".into()); // 257
        vocab.push("abc".into()); // 258
        vocab.push("<|x|>".into()); // 259, control
        let mut types = vec![1u64; vocab.len()];
        types[259] = TOKEN_TYPE_CONTROL;
        let refs: Vec<&str> = vocab.iter().map(String::as_str).collect();
        // "b c" has a better rank than "a b": "abc" -> a + bc, and no "a bc" merge.
        let t = Tokenizer::from_bpe(&refs, &types, &["b c", "a b", "ab c"], 0, 0, None).unwrap();
        assert_eq!(t.encode("abc").unwrap(), vec![id(&vocab, "a"), 257]);
        assert_eq!(t.encode("abab").unwrap(), vec![256, 256]);
        // Digits one by one; the control token as a whole.
        let g1 = id(&vocab, "1");
        assert_eq!(
            t.encode("11<|x|>").unwrap(),
            vec![g1, g1, 259],
            "digits split, special token matched"
        );
        let s = "abc abd 12 <|x|>";
        assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), s);
        assert_eq!(t.vocab_size(), 260);
    }

    #[test]
    fn bad_vocabularies_are_errors() {
        let vocab = byte_symbols();
        let refs: Vec<&str> = vocab.iter().map(String::as_str).collect();
        let types = vec![1u64; refs.len()];
        for (merges, bos, unk) in [
            (vec!["ab"], 0, None),
            (vec!["a b"], 0, None), // "ab" is not in the vocabulary
            (vec![], 256, None),
            (vec![], 0, Some(999)),
        ] {
            assert!(Tokenizer::from_bpe(&refs, &types, &merges, bos, 0, unk).is_err());
        }
        assert!(Tokenizer::from_bpe(&[], &[], &[], 0, 0, None).is_err());
    }
}
