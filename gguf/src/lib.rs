//! Reading GGUF files (llama.cpp's model format): the header, the metadata, the tensor
//! table and the tensors' bytes, memory-mapped, and their dequantisation to f32.
//!
//! Owns the file format only: every length, count, offset and alignment is checked
//! against the file before anything is read, so a malformed file is a [`GgufError`]
//! naming the file and the key, tensor or byte offset at fault, never a panic or an
//! out-of-bounds read; no allocation is sized by the file beyond what the file itself
//! holds. Dequantises F32, F16, BF16, Q8_0, Q4_0 and Q4_1 (what the models fibecfed
//! fetches use); other known types are listed, sized and checked, and refused by name
//! when asked for values.
//!
//! Also builds the tokenizer the `tokenizer.ggml.*` keys describe ([`tokenizer()`]), as a
//! `tokenizers` tokenizer. Does not own what the tensors mean (the LLaMA decoder) nor how
//! text is turned into a model's batches.
//!
//! The format (GGUF v2 and v3, little-endian), as llama.cpp's `gguf` documents it:
//! magic `GGUF`, version u32, tensor count u64, metadata count u64; the metadata as
//! (string key, u32 value type, value); the tensor infos as (string name, u32 dimension
//! count, u64 dimensions fastest first, u32 ggml type, u64 offset); padding to
//! `general.alignment` (32 when absent); then the tensors' bytes, each at its offset from
//! there. A string is a u64 byte length and UTF-8 bytes; an array a u32 element type, a
//! u64 length and the elements.

mod dequant;
mod error;
mod tokenizer;
mod types;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use dequant::dequantize;
pub use error::GgufError;
pub use tokenizer::tokenizer;
pub use types::GgmlType;

/// The alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The most dimensions a tensor has (ggml's GGML_MAX_DIMS).
pub const MAX_DIMS: usize = 4;
/// How deep arrays of arrays may nest: deeper is refused rather than recursed into.
const MAX_NESTING: usize = 8;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Elements of one type (the file states it once for the array).
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "uint8",
            Self::I8(_) => "int8",
            Self::U16(_) => "uint16",
            Self::I16(_) => "int16",
            Self::U32(_) => "uint32",
            Self::I32(_) => "int32",
            Self::F32(_) => "float32",
            Self::Bool(_) => "bool",
            Self::Str(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "uint64",
            Self::I64(_) => "int64",
            Self::F64(_) => "float64",
        }
    }

    /// A non-negative integer of any integer type, as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(u64::from(v)),
            Self::U16(v) => Some(u64::from(v)),
            Self::U32(v) => Some(u64::from(v)),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// One tensor's entry in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as the file lists them, fastest-varying first (ggml's ne[]).
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// Offset of its bytes from the start of the data section.
    pub offset: u64,
    /// Its size in bytes (checked against the file).
    pub bytes: u64,
}

impl TensorInfo {
    /// The shape in row-major order (slowest first), as ndarray and PyTorch write it:
    /// a GGUF matrix with dims [n0, n1] is n1 rows of n0 values.
    pub fn shape(&self) -> Vec<usize> {
        // Each dimension fits usize: `open` checked the element count.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// The number of values.
    pub fn count(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }
}

/// An open GGUF file: its metadata and tensor table, and its bytes mapped.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
    map: Bytes,
}

/// The file's bytes: a read-only mapping (or, for tests and tiny files, a buffer).
enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.as_slice().len())
    }
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Map(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "{what} at byte {} needs {n} bytes, the file has {} left (truncated?)",
                self.pos,
                self.bytes.len() - self.pos
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let at = self.pos;
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.left())
            .ok_or_else(|| {
                format!(
                    "{what} at byte {at} claims {len} bytes, the file has {} left",
                    self.left()
                )
            })?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
    }

    fn value(&mut self, kind: u32, what: &str, depth: usize) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what} is a bool stored as {b}, not 0 or 1")),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(format!(
                        "{what} nests arrays deeper than {MAX_NESTING} levels"
                    ));
                }
                let at = self.pos;
                let elem = self.u32(what)?;
                let len = self.u64(what)?;
                // Every element takes at least one byte (a u64 length for strings and
                // arrays), so a length beyond the bytes left is a lie; checked before
                // anything is allocated.
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(format!(
                            "{what} at byte {at} is an array of unknown value type {other}"
                        ));
                    }
                };
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l.checked_mul(min).is_some_and(|b| b <= self.left()))
                    .ok_or_else(|| {
                        format!(
                            "{what} at byte {at} claims {len} elements, more than the {} bytes left hold",
                            self.left()
                        )
                    })?;
                let mut values = Vec::with_capacity(len);
                for _ in 0..len {
                    values.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{what} has unknown value type {other}")),
        })
    }
}

impl Gguf {
    /// Opens and checks `path`, mapping its bytes.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| GgufError::io(&path, &e))?;
        // SAFETY: the mapping is read-only and private to this value; a file changed
        // underneath by another process could change what is read (not memory safety
        // for plain bytes, which every read here bounds-checks), as for any mapped file.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| GgufError::io(&path, &e))?;
        Self::parse(path, Bytes::Map(map))
    }

    /// A GGUF held in memory (`path` only names it in messages).
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(path.as_ref().to_path_buf(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, map: Bytes) -> Result<Self, GgufError> {
        let bad = |what: String| GgufError::Malformed {
            path: path.clone(),
            what,
        };
        let bytes = map.as_slice();
        let mut c = Cursor { bytes, pos: 0 };
        let magic = c.array::<4>("the magic number").map_err(bad)?;
        if &magic != b"GGUF" {
            return Err(bad(format!(
                "not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""
            )));
        }
        let version = c.u32("the version").map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version}; versions 2 and 3 are read"
            )));
        }
        let tensor_count = c.u64("the tensor count").map_err(bad)?;
        let kv_count = c.u64("the metadata count").map_err(bad)?;
        // A metadata entry takes at least 12 bytes (key length, value type), a tensor
        // info at least 24 (name length, dimension count, type, offset).
        let fits = |count: u64, min: u64, left: usize| {
            count.checked_mul(min).is_some_and(|b| b <= left as u64)
        };
        if !fits(kv_count, 12, c.left()) {
            return Err(bad(format!(
                "the header claims {kv_count} metadata entries, more than the file's {} bytes hold",
                bytes.len()
            )));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = c
                .string(&format!("the key of metadata entry {i}"))
                .map_err(bad)?;
            let what = format!("metadata key {key:?}");
            let kind = c.u32(&what).map_err(bad)?;
            let value = c.value(kind, &what, 0).map_err(bad)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(bad(format!("metadata key {key:?} appears twice")));
            }
        }
        if !fits(tensor_count, 24, c.left()) {
            return Err(bad(format!(
                "the header claims {tensor_count} tensors, more than the file's {} bytes hold",
                bytes.len()
            )));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(other) => {
                return Err(bad(format!(
                    "metadata key \"general.alignment\" must be a uint32 power of two, found {} {other:?}",
                    other.type_name()
                )));
            }
        };
        let mut tensors: Vec<TensorInfo> = Vec::new();
        for i in 0..tensor_count {
            let name = c.string(&format!("the name of tensor {i}")).map_err(bad)?;
            let what = format!("tensor {name:?}");
            let info = Self::tensor_info(&mut c, name, &what).map_err(bad)?;
            tensors.push(info);
        }
        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(bad(format!("tensor {:?} appears twice", t.name)));
            }
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        for t in &tensors {
            if t.offset % alignment != 0 {
                return Err(bad(format!(
                    "tensor {:?}: offset {} is not a multiple of the alignment {alignment}",
                    t.name, t.offset
                )));
            }
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.bytes));
            if end.is_none_or(|e| e > file_len) {
                return Err(bad(format!(
                    "tensor {:?}: {} bytes at offset {} (byte {} of the file) run past its end ({file_len} bytes; truncated, or a lying offset)",
                    t.name,
                    t.bytes,
                    t.offset,
                    data_start.saturating_add(t.offset)
                )));
            }
        }
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for pair in by_offset.windows(2) {
            if pair[0].offset + pair[0].bytes > pair[1].offset {
                return Err(bad(format!(
                    "tensors {:?} and {:?} overlap (offsets {} + {} bytes and {})",
                    pair[0].name, pair[1].name, pair[0].offset, pair[0].bytes, pair[1].offset
                )));
            }
        }
        Ok(Self {
            path,
            version,
            metadata,
            tensors,
            alignment,
            data_start,
            map,
        })
    }

    fn tensor_info(c: &mut Cursor<'_>, name: String, what: &str) -> Result<TensorInfo, String> {
        let n_dims = c.u32(what)?;
        let n = usize::try_from(n_dims)
            .ok()
            .filter(|&n| (1..=MAX_DIMS).contains(&n))
            .ok_or_else(|| format!("{what} has {n_dims} dimensions; 1 to {MAX_DIMS} are read"))?;
        let mut dims = Vec::with_capacity(n);
        for _ in 0..n {
            dims.push(c.u64(what)?);
        }
        if let Some(d) = dims.iter().position(|&d| d == 0) {
            return Err(format!("{what} has dimension {d} of size 0"));
        }
        let count = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| i64::try_from(n).is_ok() && usize::try_from(n).is_ok())
            .ok_or_else(|| format!("{what}: its dimensions {dims:?} overflow"))?;
        let id = c.u32(what)?;
        let kind =
            GgmlType::from_id(id).ok_or_else(|| format!("{what} has unknown ggml type id {id}"))?;
        let (block, block_bytes) = kind.block();
        if dims[0] % block != 0 {
            return Err(format!(
                "{what}: its first dimension {} is not a multiple of {kind:?}'s block of {block}",
                dims[0]
            ));
        }
        let bytes = (count / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| format!("{what}: its byte size overflows"))?;
        let offset = c.u64(what)?;
        Ok(TensorInfo {
            name,
            dims,
            kind,
            offset,
            bytes,
        })
    }

    /// The file the GGUF came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the data section starts in the file (tensor offsets count from here).
    pub fn data_offset(&self) -> u64 {
        self.data_start
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// The tensor table in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_owned(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &Value) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_owned(),
            expected,
            found: found.type_name(),
        }
    }

    /// A non-negative integer key (any integer type).
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// A float key (float32 or float64).
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        match self.get(key)? {
            Value::F32(v) => Ok(f64::from(*v)),
            Value::F64(v) => Ok(*v),
            other => Err(self.wrong_type(key, "a float", other)),
        }
    }

    /// A string key.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key)? {
            Value::Str(s) => Ok(s),
            other => Err(self.wrong_type(key, "a string", other)),
        }
    }

    /// A bool key.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.get(key)? {
            Value::Bool(b) => Ok(*b),
            other => Err(self.wrong_type(key, "a bool", other)),
        }
    }

    /// An array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.as_str()),
                    other => Err(self.wrong_type(key, "an array of strings", other)),
                })
                .collect(),
            other => Err(self.wrong_type(key, "an array of strings", other)),
        }
    }

    /// A tensor's table entry, or an error naming the missing tensor.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_owned(),
            })
    }

    /// A tensor's raw bytes (checked against the file when it was opened).
    pub fn raw(&self, name: &str) -> Result<&[u8], GgufError> {
        let t = self.tensor(name)?;
        // In range: `parse` checked data_start + offset + bytes ≤ the file's length.
        let start = (self.data_start + t.offset) as usize;
        Ok(&self.map.as_slice()[start..start + t.bytes as usize])
    }

    /// A tensor's values as f32, row-major (slowest dimension first), with its shape.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        let t = self.tensor(name)?;
        let values =
            dequantize(t.kind, self.raw(name)?, t.count()).map_err(|what| GgufError::Tensor {
                path: self.path.clone(),
                tensor: name.to_owned(),
                what,
            })?;
        Ok((t.shape(), values))
    }
}
