//! GPT-2 byte-level BPE, built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Written by hand (the `tokenizers` crate is a heavy build for one model's tokenizer).
//! It follows the Hugging Face tokenizer of SmolLM2 (GGUF `tokenizer.ggml.pre =
//! "smollm"`):
//! 1. pre-tokenisation: every numeric character (`char::is_numeric`) is its own piece
//!    (the `Digits(individual_digits)` step), then each remaining run is split by the
//!    GPT-2 pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
//!    matched here by a hand-written scanner (Unicode general categories from
//!    `unicode-general-category`);
//! 2. each piece's UTF-8 bytes become the GPT-2 byte-to-unicode symbols, which are
//!    merged pair by pair in merge-rank order (lowest rank first, leftmost first).
//!
//! No BOS is added (`tokenizer.ggml.add_bos_token = false` for this model). Special
//! tokens such as `<|im_start|>` are not recognised inside text: text is encoded as
//! bytes, which is what a novel needs. `decode(encode(s)) == s` for every string
//! without the few bytes the vocabulary lacks (see [`Tokenizer::new`]); those become
//! the unknown token, as in the Hugging Face tokenizer.

use std::collections::HashMap;

use unicode_general_category::{get_general_category, GeneralCategory as Gc};

use super::gguf::{GgufFile, MetaValue};
use crate::error::{Result, TcaError};

/// A byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// Token strings as stored (byte-level symbols).
    vocab: Vec<String>,
    /// The bytes each token stands for.
    token_bytes: Vec<Vec<u8>>,
    /// Id of each single-byte token ([`NO_TOKEN`] for a byte without one).
    byte_id: [u32; 256],
    /// Id emitted for a byte without a token (`tokenizer.ggml.unknown_token_id`).
    unk_id: Option<u32>,
    /// (left, right) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    pub bos_id: u32,
    pub eos_id: u32,
}

/// Marks a byte that has no token of its own.
const NO_TOKEN: u32 = u32::MAX;

/// GPT-2's reversible map from bytes to printable characters.
pub fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        // All values are below 0x200: valid scalar values.
        map[b as usize] = char::from_u32(c).unwrap_or('\u{fffd}');
    }
    map
}

fn is_letter(c: char) -> bool {
    matches!(
        get_general_category(c),
        Gc::UppercaseLetter
            | Gc::LowercaseLetter
            | Gc::TitlecaseLetter
            | Gc::ModifierLetter
            | Gc::OtherLetter
    )
}

fn is_number(c: char) -> bool {
    matches!(
        get_general_category(c),
        Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber
    )
}

fn is_other(c: char) -> bool {
    !c.is_whitespace() && !is_letter(c) && !is_number(c)
}

/// Split `s` (one run without numeric characters, or any string) by the GPT-2 pattern.
fn gpt2_split<'a>(s: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| if i < n { chars[i].0 } else { s.len() };
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        let next = chars.get(i + 1).map(|x| x.1);
        let start = i;
        // 's 't 're 've 'm 'll 'd
        if c == '\'' {
            let rest = &s[at(i + 1)..];
            let m = ["s", "t", "re", "ve", "m", "ll", "d"]
                .iter()
                .find(|p| rest.starts_with(**p))
                .map(|p| p.len());
            if let Some(len) = m {
                i += 1 + len; // ASCII suffixes: one char per byte
                out.push(&s[at(start)..at(i)]);
                continue;
            }
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
        let classes: [fn(char) -> bool; 3] = [is_letter, is_number, is_other];
        let mut matched = false;
        for class in classes {
            let body = if class(c) {
                Some(i)
            } else if c == ' ' && next.is_some_and(class) {
                Some(i + 1)
            } else {
                None
            };
            if let Some(mut j) = body {
                while j < n && class(chars[j].1) {
                    j += 1;
                }
                out.push(&s[at(start)..at(j)]);
                i = j;
                matched = true;
                break;
            }
        }
        if matched {
            continue;
        }
        // `\s+(?!\S)` then `\s+`
        let mut j = i;
        while j < n && chars[j].1.is_whitespace() {
            j += 1;
        }
        debug_assert!(j > i, "a character is whitespace, letter, number or other");
        let j = if j == n || j - i == 1 { j } else { j - 1 };
        out.push(&s[at(start)..at(j)]);
        i = j;
    }
}

/// The pre-tokenisation pieces of `text` (their concatenation is `text`).
pub fn pretokenize(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut run_start = 0;
    for (i, c) in text.char_indices() {
        if c.is_numeric() {
            if run_start < i {
                gpt2_split(&text[run_start..i], &mut out);
            }
            out.push(&text[i..i + c.len_utf8()]);
            run_start = i + c.len_utf8();
        }
    }
    if run_start < text.len() {
        gpt2_split(&text[run_start..], &mut out);
    }
    out
}

impl Tokenizer {
    /// Build the tokenizer from GGUF metadata (`tokenizer.ggml.model = "gpt2"`).
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let model = g.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TcaError::Format {
                path: g.path.clone(),
                msg: format!("tokenizer model {model:?} is not supported (only gpt2 BPE)"),
            });
        }
        let vocab: Vec<String> = g
            .meta_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let types: Vec<u64> = match g.metadata.get("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; vocab.len()],
        };
        let merges = g.meta_str_array("tokenizer.ggml.merges")?;
        let bos = g.meta_usize("tokenizer.ggml.bos_token_id")?;
        let eos = g.meta_usize("tokenizer.ggml.eos_token_id")?;
        let unk = g.meta_usize("tokenizer.ggml.unknown_token_id").ok();
        Tokenizer::new(vocab, &types, &merges, bos, eos, unk).map_err(|msg| TcaError::Format {
            path: g.path.clone(),
            msg,
        })
    }

    /// Build from a vocabulary, token types (1 normal, 3 control, 4 user-defined, ...),
    /// merges ("left right"), the BOS/EOS ids and the id standing for a byte that has
    /// no token (SmolLM2's vocabulary lacks 21 bytes: 0xC0, 0xC1, 0xF5..=0xFF, which
    /// never occur in UTF-8, and the control characters 0x04, 0x06, 0x13, 0x14, 0x16,
    /// 0x1D); without one, such bytes are dropped.
    pub fn new(
        vocab: Vec<String>,
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
        let b2c = byte_to_char();
        let mut c2b: HashMap<char, u8> = HashMap::with_capacity(256);
        for (b, &c) in b2c.iter().enumerate() {
            c2b.insert(c, b as u8);
        }
        let mut id_of: HashMap<&str, u32> = HashMap::with_capacity(vocab.len());
        let mut token_bytes = Vec::with_capacity(vocab.len());
        for (i, t) in vocab.iter().enumerate() {
            id_of.entry(t.as_str()).or_insert(i as u32);
            let ty = types.get(i).copied().unwrap_or(1);
            let bytes: Option<Vec<u8>> = if ty == 1 {
                t.chars().map(|c| c2b.get(&c).copied()).collect()
            } else {
                None
            };
            token_bytes.push(bytes.unwrap_or_else(|| t.as_bytes().to_vec()));
        }
        let mut byte_id = [NO_TOKEN; 256];
        for (b, c) in b2c.iter().enumerate() {
            if let Some(&id) = id_of.get(c.to_string().as_str()) {
                byte_id[b] = id;
            }
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let (l, r) = m
                .split_once(' ')
                .ok_or_else(|| format!("merge {rank} ({m:?}) is not \"left right\""))?;
            let lookup = |s: &str| {
                id_of
                    .get(s)
                    .copied()
                    .ok_or_else(|| format!("merge {rank} ({m:?}): {s:?} not in vocabulary"))
            };
            let merged = format!("{l}{r}");
            let key = (lookup(l)?, lookup(r)?);
            let val = (rank as u32, lookup(&merged)?);
            merge_map.entry(key).or_insert(val);
        }
        Ok(Tokenizer {
            vocab,
            token_bytes,
            byte_id,
            merges: merge_map,
            unk_id: unk.map(|u| u as u32),
            bos_id: bos as u32,
            eos_id: eos as u32,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The stored string of a token (byte-level symbols), if the id exists.
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.vocab.get(id as usize).map(String::as_str)
    }

    fn bpe(&self, piece: &[u8], out: &mut Vec<u32>) {
        let mut syms: Vec<u32> = piece.iter().map(|&b| self.byte_id[b as usize]).collect();
        loop {
            let mut best: Option<(u32, usize, u32)> = None; // (rank, position, merged)
            for (i, w) in syms.windows(2).enumerate() {
                if let Some(&(rank, merged)) = self.merges.get(&(w[0], w[1])) {
                    if best.is_none_or(|b| rank < b.0) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((_, first, merged)) = best else {
                break;
            };
            let (a, b) = (syms[first], syms[first + 1]);
            let mut next = Vec::with_capacity(syms.len() - 1);
            next.extend_from_slice(&syms[..first]);
            let mut i = first;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(syms[i]);
                    i += 1;
                }
            }
            syms = next;
        }
        for s in syms {
            if s != NO_TOKEN {
                out.push(s);
            } else if let Some(u) = self.unk_id {
                out.push(u);
            }
        }
    }

    /// Token ids of `text` (no BOS).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut cache: HashMap<&str, Vec<u32>> = HashMap::new();
        for piece in pretokenize(text) {
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                continue;
            }
            let start = out.len();
            self.bpe(piece.as_bytes(), &mut out);
            if piece.len() <= 64 {
                cache.insert(piece, out[start..].to_vec());
            }
        }
        out
    }

    /// The bytes of a sequence of ids (unknown ids are skipped).
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if let Some(b) = self.token_bytes.get(id as usize) {
                out.extend_from_slice(b);
            }
        }
        out
    }

    /// The text of a sequence of ids (invalid UTF-8 replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretokenize_gpt2_rules() {
        assert_eq!(
            pretokenize("Hello world, it's 1813!  Yes\n\nNo  "),
            vec![
                "Hello", " world", ",", " it", "'s", " ", "1", "8", "1", "3", "!", " ", " Yes",
                "\n", "\n", "No", "  "
            ]
        );
        assert_eq!(pretokenize("a\nb"), vec!["a", "\n", "b"]);
        assert_eq!(pretokenize("x   y"), vec!["x", "  ", " y"]);
        assert_eq!(pretokenize("Café ... ¼"), vec!["Café", " ...", " ", "¼"]);
        for s in ["", " ", "  a", "\t\tz ", "_You_ want", "it'S'x"] {
            assert_eq!(pretokenize(s).concat(), s);
        }
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let m = byte_to_char();
        let mut seen: Vec<char> = m.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn bpe_merges_by_rank() {
        let b2c = byte_to_char();
        let mut vocab: Vec<String> = b2c.iter().map(|c| c.to_string()).collect();
        vocab.push("ab".into()); // 256
        vocab.push("bc".into()); // 257
        vocab.push("abc".into()); // 258
        let types = vec![1u64; vocab.len()];
        // "b c" has a better rank than "a b": "abc" -> a + bc, and no "a bc" merge.
        let t = Tokenizer::new(vocab, &types, &["b c", "a b", "ab c"], 0, 0, None).unwrap();
        assert_eq!(t.encode("abc"), vec![t.byte_id[b'a' as usize], 257]);
        assert_eq!(t.encode("abab"), vec![256, 256]);
        assert_eq!(t.decode(&t.encode("abc abd")), "abc abd");
    }
}
