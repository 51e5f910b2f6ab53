//! A bounds-checked reader of GGUF files (version 2 and 3, little-endian).
//!
//! GGUF layout: magic `GGUF`, version (u32), tensor count (u64), metadata count (u64),
//! the metadata key/values, the tensor infos (name, dims, ggml type, offset), padding
//! to `general.alignment` (default 32), then the tensor data. Every read is checked
//! against the file's length, so a truncated or corrupt file is an error
//! ([`TcaError::Format`]), never a panic or a huge allocation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Result, TcaError};

/// The ggml tensor types this crate knows the layout of (size of a block in bytes and
/// elements). Only F32, F16, Q8_0 and Q4_1 can be dequantised (see [`super::quant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    /// Any other type id (k-quants, i-quants, ...): readable as metadata, not as data.
    Other(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            other => GgmlType::Other(other),
        }
    }

    /// (elements per block, bytes per block), or None for a type of unknown layout.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q4_1 => Some((32, 20)),
            GgmlType::Q5_0 => Some((32, 22)),
            GgmlType::Q5_1 => Some((32, 24)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Q8_1 => Some((32, 36)),
            GgmlType::Other(_) => None,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// A tensor's header entry. `dims` are in GGUF order: `dims[0]` is the fastest-varying
/// (the row length); a weight matrix `[out, in]` in row-major terms has
/// `dims = [in, out]`.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: usize,
    /// Number of elements (product of dims).
    pub n_elements: usize,
    /// Size of the data in bytes.
    pub n_bytes: usize,
}

/// A parsed GGUF file; the tensor data stays in memory as raw bytes.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    bytes: Vec<u8>,
    data_start: usize,
}

const MAX_DIMS: u32 = 8;
/// Longest metadata array accepted (the largest real ones are vocabularies of ~10^5).
const MAX_ARRAY_LEN: usize = 1 << 24;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: impl Into<String>) -> TcaError {
        TcaError::Format {
            path: self.path.to_path_buf(),
            msg: format!("GGUF at byte {}: {}", self.pos, msg.into()),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.err(format!("truncated: {n} bytes wanted")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self, what: &str) -> Result<usize> {
        let v = self.u64()?;
        usize::try_from(v)
            .ok()
            .filter(|&n| n <= self.buf.len() - self.pos)
            .ok_or_else(|| self.err(format!("{what} length {v} exceeds the file")))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len("string")?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.err(format!("bool value {b}"))),
            },
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.err("arrays nested too deep"));
                }
                let elem = self.u32()?;
                let n = self.len("array")?;
                // Bound the allocation by what the rest of the file can hold.
                let min_size = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.err(format!("unknown array element type {t}"))),
                };
                if n > MAX_ARRAY_LEN || n.saturating_mul(min_size) > self.buf.len() - self.pos {
                    return Err(self.err(format!("array of {n} elements exceeds the file")));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Read and parse a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| TcaError::io(path, e))?;
        GgufFile::parse(bytes, path)
    }

    /// Parse GGUF bytes; `path` is only used in error messages.
    pub fn parse(bytes: Vec<u8>, path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
            path,
        };
        let magic = r.take(4).map_err(|_| r.err("file too short to be GGUF"))?;
        if magic != b"GGUF" {
            return Err(TcaError::Format {
                path: path.to_path_buf(),
                msg: format!("not a GGUF file (magic {magic:02x?}, want \"GGUF\")"),
            });
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.err(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.len("tensor count")?;
        let n_kv = r.len("metadata count")?;

        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(r.err(format!("duplicate metadata key {key}")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .and_then(|a| usize::try_from(a).ok())
                .filter(|a| a.is_power_of_two() && *a <= 1 << 20)
                .ok_or_else(|| r.err(format!("bad general.alignment {v:?}")))?,
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(r.err(format!("tensor {name}: {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                let d = r.u64()?;
                dims.push(
                    usize::try_from(d).map_err(|_| r.err(format!("tensor {name}: dim {d}")))?,
                );
            }
            let ty = GgmlType::from_id(r.u32()?);
            let offset = r.u64()?;
            let offset = usize::try_from(offset)
                .map_err(|_| r.err(format!("tensor {name}: offset {offset}")))?;
            let n_elements = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| r.err(format!("tensor {name}: element count overflows")))?;
            let n_bytes = match ty.block_layout() {
                Some((be, bb)) => {
                    if dims[0] % be != 0 {
                        return Err(r.err(format!(
                            "tensor {name}: row length {} not a multiple of the block size {be}",
                            dims[0]
                        )));
                    }
                    (n_elements / be)
                        .checked_mul(bb)
                        .ok_or_else(|| r.err(format!("tensor {name}: size overflows")))?
                }
                None => 0,
            };
            if offset % alignment != 0 {
                return Err(r.err(format!("tensor {name}: offset {offset} not aligned")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_elements,
                n_bytes,
            });
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let data_len = bytes.len().saturating_sub(data_start);
        for t in &tensors {
            if t.ty.block_layout().is_some()
                && t.offset.checked_add(t.n_bytes).is_none_or(|e| e > data_len)
            {
                return Err(TcaError::Format {
                    path: path.to_path_buf(),
                    msg: format!(
                        "GGUF tensor {} ({} bytes at data offset {}) runs past the end of the \
                         file (truncated?)",
                        t.name, t.n_bytes, t.offset
                    ),
                });
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            bytes,
            data_start,
        })
    }

    fn err(&self, msg: impl Into<String>) -> TcaError {
        TcaError::Format {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    pub fn meta(&self, key: &str) -> Result<&MetaValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| self.err(format!("metadata key {key} missing")))
    }

    pub fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self.meta(key)?;
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| self.err(format!("metadata {key} = {v:?} is not a count")))
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        let v = self.meta(key)?;
        v.as_f64()
            .ok_or_else(|| self.err(format!("metadata {key} = {v:?} is not a number")))
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        let v = self.meta(key)?;
        v.as_str()
            .ok_or_else(|| self.err(format!("metadata {key} is not a string")))
    }

    /// A metadata array of strings.
    pub fn meta_str_array(&self, key: &str) -> Result<Vec<&str>> {
        match self.meta(key)? {
            MetaValue::Array(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| self.err(format!("metadata {key}: non-string element")))
                })
                .collect(),
            _ => Err(self.err(format!("metadata {key} is not an array"))),
        }
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        if t.ty.block_layout().is_none() {
            return Err(self.err(format!(
                "tensor {} has unsupported ggml type {:?}",
                t.name, t.ty
            )));
        }
        // The range was checked at parse time; `get` keeps even an empty tensor at the
        // very end of a file without padding from panicking.
        self.data_start
            .checked_add(t.offset)
            .and_then(|start| self.bytes.get(start..start.checked_add(t.n_bytes)?))
            .ok_or_else(|| self.err(format!("tensor {} lies outside the file", t.name)))
    }

    /// A tensor dequantised to f32, with its dims in GGUF order (fastest first).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| self.err(format!("tensor {name} missing")))?;
        let bytes = self.tensor_bytes(t)?;
        let v = super::quant::dequantize(t.ty, bytes, t.n_elements)
            .map_err(|m| self.err(format!("tensor {name}: {m}")))?;
        Ok((t.dims.clone(), v))
    }
}
