//! numpy `.npy` byte tensors: the "numpy.ndarray" tensor type of Flower's
//! `Parameters` (flwr's `ndarray_to_bytes` is `np.save(..., allow_pickle=False)`).
//!
//! Written: format 1.0, little-endian float32 (`'<f4'`), C order, header padded to a
//! multiple of 64 bytes as numpy does. Read: format 1.0, 2.0 and 3.0 headers, `'<f4'`
//! and `'<f8'` (a server may aggregate in float64; values are rounded to f32, the
//! precision the model trains in), C or Fortran order (returned in C order). Anything else is an [`NpyError`] naming
//! what was found.

use thiserror::Error;

const MAGIC: &[u8] = b"\x93NUMPY";

/// A dense float32 tensor in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NpyError {
    #[error("not a .npy tensor: {0}")]
    Format(String),
    #[error(".npy dtype {0:?} is not supported (expected '<f4' or '<f8')")]
    Dtype(String),
    #[error(".npy shape {shape:?} needs {expected} bytes of data, found {found}")]
    Size {
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
    #[error("shape {shape:?} holds {expected} values, the data has {found}")]
    Mismatch {
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
}

impl NpyArray {
    /// A tensor of `shape` holding `data`; the sizes must agree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, NpyError> {
        let expected = shape.iter().product::<usize>();
        if expected != data.len() {
            return Err(NpyError::Mismatch {
                shape,
                expected,
                found: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    /// The bytes of `np.save(f, array)` for a C-ordered float32 array.
    pub fn to_bytes(&self) -> Vec<u8> {
        let shape = match self.shape.as_slice() {
            [] => "()".to_owned(),
            [n] => format!("({n},)"),
            dims => format!(
                "({})",
                dims.iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        // magic (6) + version (2) + header length (2) + header + '\n' ≡ 0 mod 64.
        let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
        header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
        header.push('\n');
        let mut out = Vec::with_capacity(10 + header.len() + 4 * self.data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[1, 0]);
        // Headers of format 1.0 are < 64 KiB; ours are a few hundred bytes.
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for v in &self.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses the bytes of a `.npy` file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, NpyError> {
        let format = |m: &str| NpyError::Format(m.to_owned());
        if bytes.len() < 10 || &bytes[..6] != MAGIC {
            return Err(format("missing the \\x93NUMPY magic"));
        }
        let (header_len, start) = match bytes[6] {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
            2 | 3 => {
                let b = bytes
                    .get(8..12)
                    .ok_or_else(|| format("truncated header length"))?;
                (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
            }
            v => return Err(NpyError::Format(format!("format version {v} is unknown"))),
        };
        let end = start
            .checked_add(header_len)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| format("header runs past the end of the data"))?;
        let header =
            std::str::from_utf8(&bytes[start..end]).map_err(|_| format("header is not text"))?;
        let descr = dict_value(header, "descr")?;
        let descr = descr.trim_matches(|c| c == '\'' || c == '"');
        let width = match descr {
            "<f4" => 4,
            "<f8" => 8,
            other => return Err(NpyError::Dtype(other.to_owned())),
        };
        let fortran = match dict_value(header, "fortran_order")? {
            "False" => false,
            "True" => true,
            other => {
                return Err(NpyError::Format(format!(
                    "fortran_order is {other:?}, expected True or False"
                )));
            }
        };
        let shape = parse_shape(dict_value(header, "shape")?)?;
        let count = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format("shape overflows"))?;
        let body = &bytes[end..];
        let expected = count.saturating_mul(width);
        if body.len() != expected {
            return Err(NpyError::Size {
                shape,
                expected,
                found: body.len(),
            });
        }
        let data: Vec<f32> = if width == 4 {
            body.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            body.chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect()
        };
        let data = if fortran && shape.len() > 1 {
            to_c_order(&shape, &data)
        } else {
            data
        };
        Ok(Self { shape, data })
    }
}

/// Column-major values of `shape` in row-major order. numpy writes an array that is
/// Fortran- but not C-contiguous (a transpose, say) column-major.
fn to_c_order(shape: &[usize], data: &[f32]) -> Vec<f32> {
    // Column-major strides: the first axis moves fastest.
    let mut strides = vec![1usize; shape.len()];
    for k in 1..shape.len() {
        strides[k] = strides[k - 1] * shape[k - 1];
    }
    let mut index = vec![0usize; shape.len()];
    let mut out = Vec::with_capacity(data.len());
    for _ in 0..data.len() {
        let offset: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out.push(data[offset]);
        // Next row-major index: the last axis moves fastest.
        for k in (0..shape.len()).rev() {
            index[k] += 1;
            if index[k] < shape[k] {
                break;
            }
            index[k] = 0;
        }
    }
    out
}

/// The text of `key`'s value in numpy's header dict (a Python literal).
fn dict_value<'a>(header: &'a str, key: &str) -> Result<&'a str, NpyError> {
    let missing = || NpyError::Format(format!("header has no {key:?} entry: {header:?}"));
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))
        .ok_or_else(missing)?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')
        .ok_or_else(missing)?
        .trim_start();
    // A tuple runs to its closing parenthesis; other values to the next comma or brace.
    let len = if rest.starts_with('(') {
        rest.find(')').map(|i| i + 1)
    } else {
        rest.find([',', '}'])
    }
    .ok_or_else(missing)?;
    Ok(rest[..len].trim())
}

fn parse_shape(text: &str) -> Result<Vec<usize>, NpyError> {
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| NpyError::Format(format!("shape {text:?} is not a tuple")))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| NpyError::Format(format!("shape {text:?} has a bad dimension {s:?}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(shape in proptest::collection::vec(0usize..5, 0..4), seed in any::<u32>()) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| (i as f32 + seed as f32).sin()).collect();
            let a = NpyArray::new(shape, data).unwrap();
            let bytes = a.to_bytes();
            // numpy's alignment rule: the data starts on a 64-byte boundary.
            prop_assert_eq!((bytes.len() - 4 * n) % 64, 0);
            prop_assert_eq!(NpyArray::from_bytes(&bytes).unwrap(), a);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = NpyArray::from_bytes(&bytes);
        }
    }

    #[test]
    fn header_matches_numpy() {
        // np.save of np.zeros((2, 3), np.float32): the header numpy 2 writes.
        let a = NpyArray::new(vec![2, 3], vec![0.0; 6]).unwrap();
        let bytes = a.to_bytes();
        let header = std::str::from_utf8(&bytes[10..bytes.len() - 24]).unwrap();
        assert_eq!(
            header.trim_end(),
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
        );
        assert_eq!(bytes.len() - 24, 128);
    }

    /// A format-1.0 file with this header text and body.
    fn npy(header: &str, body: &[u8]) -> Vec<u8> {
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn reads_float64_and_rejects_others() {
        let body: Vec<u8> = [1.5f64, -2.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let header = |descr: &str, fortran: &str| {
            format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': (2,), }}\n")
        };
        let a = NpyArray::from_bytes(&npy(&header("<f8", "False"), &body)).unwrap();
        assert_eq!((a.shape, a.data), (vec![2], vec![1.5, -2.25]));
        assert_eq!(
            NpyArray::from_bytes(&npy(&header("<i8", "False"), &body)),
            Err(NpyError::Dtype("<i8".into()))
        );
        assert_eq!(
            NpyArray::from_bytes(&npy(&header(">f4", "False"), &body)),
            Err(NpyError::Dtype(">f4".into()))
        );
        // One axis: column- and row-major are the same bytes.
        let a = NpyArray::from_bytes(&npy(&header("<f8", "True"), &body)).unwrap();
        assert_eq!(a.data, [1.5, -2.25]);
        assert!(matches!(
            NpyArray::from_bytes(&npy(&header("<f8", "False"), &body[..13])),
            Err(NpyError::Size {
                expected: 16,
                found: 13,
                ..
            })
        ));
        assert!(matches!(
            NpyArray::from_bytes(&npy("{'descr': '<f4'}", &[])),
            Err(NpyError::Format(_))
        ));
    }

    #[test]
    fn reads_fortran_order() {
        // np.save(f, np.arange(6, dtype='f4').reshape(2, 3).T): shape (3, 2), written
        // column-major, i.e. the bytes of 0..6 in order.
        let body: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let h = "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 2), }\n";
        let a = NpyArray::from_bytes(&npy(h, &body)).unwrap();
        // The transpose of [[0, 1, 2], [3, 4, 5]], row-major.
        assert_eq!(a.shape, [3, 2]);
        assert_eq!(a.data, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        // Three axes: element (i, j, k) sits at i + 2j + 6k column-major.
        let body: Vec<u8> = (0..24).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let h = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3, 4), }\n";
        let a = NpyArray::from_bytes(&npy(h, &body)).unwrap();
        let mut expect = Vec::new();
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    expect.push((i + 2 * j + 6 * k) as f32);
                }
            }
        }
        assert_eq!(a.data, expect);
    }

    #[test]
    fn new_checks_sizes() {
        assert!(matches!(
            NpyArray::new(vec![2, 2], vec![1.0; 3]),
            Err(NpyError::Mismatch {
                expected: 4,
                found: 3,
                ..
            })
        ));
    }
}
