//! The reader against llama.cpp's own `gguf` Python package (fixtures made by
//! tests/fixtures/make_fixtures.py, which says how to rerun it): metadata and dequantised
//! values bit for bit on a small file with every supported type, and on the real
//! SmolLM2 file when it is present; and malformed files, built byte by byte here, each
//! refused with a message naming the key, tensor or offset, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use fibecfed_gguf::{GgmlType, Gguf, GgufError, Value};
use proptest::prelude::*;
use serde_json::Value as Json;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn small_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("small.gguf")).unwrap()
}

fn expected(name: &str) -> Json {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn hex_bits(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| u32::from_str_radix(h.as_str().unwrap(), 16).unwrap())
        .collect()
}

/// A fixture row's tensor dequantised, its shape and type checked against the row.
fn dequantize_as_listed<'a>(g: &Gguf, t: &'a Json) -> (&'a str, Vec<f32>) {
    let name = t["name"].as_str().unwrap();
    let (shape, values) = g.dequantize(name).unwrap();
    let want_shape: Vec<usize> = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(shape, want_shape, "{name}");
    assert_eq!(
        format!("{:?}", g.tensor(name).unwrap().kind),
        t["type"].as_str().unwrap()
    );
    (name, values)
}

#[test]
fn small_file_matches_the_reference_bit_for_bit() {
    let g = Gguf::open(fixtures().join("small.gguf")).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 64);
    let want = expected("small.expected.json");
    for t in want["tensors"].as_array().unwrap() {
        let (name, values) = dequantize_as_listed(&g, t);
        let got: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        assert_eq!(
            got,
            hex_bits(&t["bits"]),
            "{name}: values differ from gguf.quants"
        );
    }
    let meta = &want["metadata"];
    let m = g.metadata();
    let int = |k: &str| meta[k].as_i64().unwrap();
    assert_eq!(m["test.u8"], Value::U8(int("test.u8") as u8));
    assert_eq!(m["test.i8"], Value::I8(int("test.i8") as i8));
    assert_eq!(m["test.u16"], Value::U16(int("test.u16") as u16));
    assert_eq!(m["test.i16"], Value::I16(int("test.i16") as i16));
    assert_eq!(m["test.u32"], Value::U32(int("test.u32") as u32));
    assert_eq!(m["test.i32"], Value::I32(int("test.i32") as i32));
    let f32_bits = u32::from_str_radix(meta["test.f32"].as_str().unwrap(), 16).unwrap();
    assert_eq!(m["test.f32"], Value::F32(f32::from_bits(f32_bits)));
    assert_eq!(
        m["test.u64"],
        Value::U64(meta["test.u64"].as_str().unwrap().parse().unwrap())
    );
    assert_eq!(
        m["test.i64"],
        Value::I64(meta["test.i64"].as_str().unwrap().parse().unwrap())
    );
    let f64_bits = u64::from_str_radix(meta["test.f64"].as_str().unwrap(), 16).unwrap();
    assert_eq!(m["test.f64"], Value::F64(f64::from_bits(f64_bits)));
    assert!(g.get_bool("test.true").unwrap());
    assert!(!g.get_bool("test.false").unwrap());
    assert_eq!(
        g.get_str("test.string").unwrap(),
        meta["test.string"].as_str().unwrap()
    );
    assert_eq!(
        g.get_strings("test.strings").unwrap(),
        ["a", "bc", "", "Ġthe"]
    );
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(
        m["test.ints"],
        Value::Array(vec![Value::I32(1), Value::I32(-2), Value::I32(3)])
    );
    assert_eq!(
        m["test.nested"],
        Value::Array(vec![
            Value::Array(vec![Value::I32(1), Value::I32(2)]),
            Value::Array(vec![Value::I32(3)]),
        ])
    );
    assert_eq!(g.get_u64("general.alignment").unwrap(), 64);
    // From memory, the same.
    let mem = Gguf::from_bytes("small.gguf", small_bytes()).unwrap();
    assert_eq!(mem.tensors(), g.tensors());
}

/// Keys and tensors the caller needs are named when absent or of another type.
#[test]
fn missing_and_mistyped_keys_are_named() {
    let g = Gguf::open(fixtures().join("small.gguf")).unwrap();
    let e = g.get_u64("llama.block_count").unwrap_err();
    assert!(matches!(&e, GgufError::MissingKey { key, .. } if key == "llama.block_count"));
    assert!(e.to_string().contains("small.gguf") && e.to_string().contains("llama.block_count"));
    let e = g.get_u64("test.string").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: metadata key \"test.string\" should be a non-negative integer, found string",
            g.path().display()
        )
    );
    assert!(g.get_u64("test.i8").is_err(), "negative is not a count");
    assert!(matches!(
        g.get_f64("test.u8"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        g.get_strings("test.ints"),
        Err(GgufError::WrongType { .. })
    ));
    let e = g.dequantize("output.weight").unwrap_err();
    assert!(e.to_string().contains("no tensor \"output.weight\""), "{e}");
    let e = Gguf::open(fixtures().join("absent.gguf")).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }), "{e}");
}

/// The real SmolLM2 file (tests/fixtures/smollm2.expected.json was made from it): every
/// tensor's shape, type, count, f64 sum and sum of squares (1e-9 relative: numpy sums
/// pairwise) and its first and last 16 values bit for bit. Needs the file: set
/// FIBECFED_SMOLLM2_GGUF to it; prints "skipped" otherwise.
#[test]
fn smollm2_file_matches_the_reference() {
    use std::io::Write as _;
    let Some(path) = std::env::var_os("FIBECFED_SMOLLM2_GGUF").map(PathBuf::from) else {
        let line =
            "skipped: smollm2_file_matches_the_reference: FIBECFED_SMOLLM2_GGUF is not set\n";
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        return;
    };
    let g = Gguf::open(&path).unwrap();
    let want = expected("smollm2.expected.json");
    let rows = want["tensors"].as_array().unwrap();
    assert_eq!(g.tensors().len(), rows.len());
    for t in rows {
        let (name, values) = dequantize_as_listed(&g, t);
        assert_eq!(values.len() as u64, t["count"].as_u64().unwrap(), "{name}");
        let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let sum_sq: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        for (got, key) in [(sum, "sum"), (sum_sq, "sum_sq")] {
            let w = t[key].as_f64().unwrap();
            assert!(
                (got - w).abs() <= 1e-9 * w.abs().max(1.0),
                "{name}: {key} {got} vs {w}"
            );
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(
            bits(&values[..16]),
            hex_bits(&t["head"]),
            "{name}: first values"
        );
        assert_eq!(
            bits(&values[values.len() - 16..]),
            hex_bits(&t["tail"]),
            "{name}: last values"
        );
    }
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
}

// ---- malformed files, written byte by byte ----

/// A GGUF writer for tests: metadata entries (key, type id, encoded value), tensor
/// infos (name, dims, type id, offset) and the data section's length.
/// A metadata entry as written: key, value type id, encoded value.
type Entry = (String, u32, Vec<u8>);

struct Build {
    version: u32,
    meta: Vec<Entry>,
    tensors: Vec<(String, Vec<u64>, u32, u64)>,
    data: usize,
    alignment: usize,
}

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

impl Build {
    fn new() -> Self {
        Self {
            version: 3,
            meta: vec![("general.architecture".into(), 8, gstr("llama"))],
            // One Q4_1 tensor of 64 values: 2 blocks of 20 bytes.
            tensors: vec![("w".into(), vec![64], 3, 0)],
            data: 40,
            alignment: 32,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.meta.len() as u64).to_le_bytes());
        for (k, t, v) in &self.meta {
            b.extend(gstr(k));
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        for (name, dims, kind, offset) in &self.tensors {
            b.extend(gstr(name));
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(kind.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        while !b.len().is_multiple_of(self.alignment) {
            b.push(0);
        }
        // Data: Q4_1 blocks with d = 1.0 (f16 0x3c00), m = 0, nibbles 0x21.
        for i in 0..self.data {
            b.push(match i % 20 {
                1 => 0x3c,
                0 | 2 | 3 => 0,
                _ => 0x21,
            });
        }
        b
    }

    fn open(&self) -> Result<Gguf, GgufError> {
        Gguf::from_bytes("built.gguf", self.bytes())
    }
}

fn malformed(result: Result<Gguf, GgufError>) -> String {
    match result {
        Err(e @ GgufError::Malformed { .. }) => {
            let text = e.to_string();
            assert!(text.starts_with("built.gguf: malformed GGUF: "), "{text}");
            text
        }
        Err(other) => panic!("expected a malformed-file error, got {other}"),
        Ok(_) => panic!("a malformed file was accepted"),
    }
}

#[test]
fn a_well_formed_built_file_reads() {
    let g = Build::new().open().unwrap();
    let (shape, values) = g.dequantize("w").unwrap();
    assert_eq!(shape, vec![64]);
    // q = 1 (low nibble) for the first 16 of each block, 2 (high) for the next 16.
    assert_eq!(&values[..16], &[1.0; 16]);
    assert_eq!(&values[16..32], &[2.0; 16]);
}

#[test]
fn truncated_files_are_refused_at_every_length() {
    for bytes in [Build::new().bytes(), small_bytes()] {
        // The last tensor's end: past it is only the writer's padding.
        let whole = Gguf::from_bytes("whole.gguf", bytes.clone()).unwrap();
        let end = whole.data_offset()
            + whole
                .tensors()
                .iter()
                .map(|t| t.offset + t.bytes)
                .max()
                .unwrap();
        for cut in 0..end as usize {
            let e = Gguf::from_bytes("cut.gguf", bytes[..cut].to_vec()).unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with("cut.gguf: malformed GGUF: "),
                "cut at {cut}: {text}"
            );
        }
        for cut in end as usize..=bytes.len() {
            assert!(Gguf::from_bytes("cut.gguf", bytes[..cut].to_vec()).is_ok());
        }
    }
    // Cut inside the data: the tensor is named.
    let bytes = Build::new().bytes();
    let e = Gguf::from_bytes("cut.gguf", bytes[..bytes.len() - 1].to_vec()).unwrap_err();
    assert!(
        e.to_string().contains("tensor \"w\"") && e.to_string().contains("run past"),
        "{e}"
    );
}

#[test]
fn bad_headers_are_refused() {
    let mut b = Build::new().bytes();
    b[0] = b'X';
    assert!(malformed(Gguf::from_bytes("built.gguf", b)).contains("not a GGUF file"));
    for version in [1, 4] {
        let mut build = Build::new();
        build.version = version;
        assert!(malformed(build.open()).contains(&format!("GGUF version {version}")));
    }
    // Counts beyond what the file can hold, before anything is allocated for them.
    let mut b = Build::new().bytes();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(malformed(Gguf::from_bytes("built.gguf", b)).contains("metadata entries"));
    let mut b = Build::new().bytes();
    b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(malformed(Gguf::from_bytes("built.gguf", b)).contains("tensors"));
}

#[test]
fn bad_metadata_is_refused_by_key() {
    let cases: Vec<(Vec<Entry>, &str)> = vec![
        (
            vec![("k.type".into(), 13, vec![0])],
            "metadata key \"k.type\" has unknown value type 13",
        ),
        (
            vec![("k.bool".into(), 7, vec![2])],
            "metadata key \"k.bool\" is a bool stored as 2",
        ),
        (
            vec![("k.str".into(), 8, u64::MAX.to_le_bytes().to_vec())],
            "metadata key \"k.str\" at byte",
        ),
        (
            vec![(
                "k.arr".into(),
                9,
                [
                    4u32.to_le_bytes().to_vec(),
                    (1u64 << 60).to_le_bytes().to_vec(),
                ]
                .concat(),
            )],
            "claims 1152921504606846976 elements",
        ),
        (
            vec![(
                "k.arr".into(),
                9,
                [77u32.to_le_bytes().to_vec(), 1u64.to_le_bytes().to_vec()].concat(),
            )],
            "array of unknown value type 77",
        ),
        (
            vec![(
                "k.utf8".into(),
                8,
                [2u64.to_le_bytes().to_vec(), vec![0xff, 0xfe]].concat(),
            )],
            "is not UTF-8",
        ),
        (
            vec![("general.alignment".into(), 4, 48u32.to_le_bytes().to_vec())],
            "\"general.alignment\" must be a uint32 power of two",
        ),
        (
            vec![("general.alignment".into(), 4, 0u32.to_le_bytes().to_vec())],
            "\"general.alignment\" must be a uint32 power of two",
        ),
        (
            vec![("dup".into(), 0, vec![1]), ("dup".into(), 0, vec![2])],
            "metadata key \"dup\" appears twice",
        ),
    ];
    for (meta, want) in cases {
        let mut b = Build::new();
        b.meta.extend(meta);
        let text = malformed(b.open());
        assert!(text.contains(want), "{text}\n  should contain: {want}");
    }
    // Arrays nested deeper than 8 levels.
    let mut nested = 0u32.to_le_bytes().to_vec();
    nested.extend(0u64.to_le_bytes());
    for _ in 0..10 {
        nested = [
            9u32.to_le_bytes().to_vec(),
            1u64.to_le_bytes().to_vec(),
            nested,
        ]
        .concat();
    }
    // `nested` is the value of an array (type id 9) of arrays, 11 levels down to an
    // empty array of uint8.
    let mut b = Build::new();
    b.meta.push(("deep".into(), 9, nested));
    let text = malformed(b.open());
    assert!(text.contains("deeper than 8"), "{text}");
}

#[test]
fn bad_tensor_tables_are_refused_by_tensor() {
    type Edit = fn(&mut Build);
    let cases: [(Edit, &str); 9] = [
        (
            |b| b.tensors[0].2 = 99,
            "tensor \"w\" has unknown ggml type id 99",
        ),
        (
            |b| b.tensors[0].3 = 8,
            "tensor \"w\": offset 8 is not a multiple of the alignment 32",
        ),
        (
            |b| b.tensors[0].3 = 1 << 40,
            "tensor \"w\": 40 bytes at offset 1099511627776",
        ),
        (
            |b| b.tensors[0].3 = u64::MAX - 31,
            "tensor \"w\": 40 bytes at offset",
        ),
        (
            |b| b.tensors[0].1 = vec![64, 0],
            "tensor \"w\" has dimension 1 of size 0",
        ),
        (
            |b| b.tensors[0].1 = vec![1; 5],
            "tensor \"w\" has 5 dimensions",
        ),
        (
            |b| b.tensors[0].1 = vec![48],
            "first dimension 48 is not a multiple of Q4_1's block of 32",
        ),
        (
            |b| b.tensors[0].1 = vec![1 << 32, 1 << 32, 1 << 32],
            "tensor \"w\": its dimensions [4294967296, 4294967296, 4294967296] overflow",
        ),
        (
            |b| {
                b.tensors.push(("v".into(), vec![32], 3, 0));
            },
            "tensors \"w\" and \"v\" overlap",
        ),
    ];
    for (edit, want) in cases {
        let mut b = Build::new();
        edit(&mut b);
        let text = malformed(b.open());
        assert!(text.contains(want), "{text}\n  should contain: {want}");
    }
    let mut b = Build::new();
    b.tensors.push(("w".into(), vec![32], 3, 64));
    b.data = 84;
    assert!(malformed(b.open()).contains("tensor \"w\" appears twice"));
}

/// A known type that is not dequantised is listed and sized, and refused by name when
/// its values are asked for.
#[test]
fn unsupported_types_are_refused_when_read() {
    let mut b = Build::new();
    b.tensors[0] = ("q6".into(), vec![256], 14, 0);
    b.data = 210;
    let g = b.open().unwrap();
    assert_eq!(g.tensor("q6").unwrap().kind, GgmlType::Q6_K);
    let e = g.dequantize("q6").unwrap_err();
    assert_eq!(
        e.to_string(),
        "built.gguf: tensor \"q6\": type Q6_K (ggml id 14) is not dequantised here (F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are)"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random byte edits of a real file: opening answers Ok or an error, never panics,
    /// and every tensor of a file that opens dequantises or says why.
    #[test]
    fn random_corruption_never_panics(
        edits in proptest::collection::vec((0usize..2000, any::<u8>()), 1..8),
        cut in 0usize..2100,
    ) {
        let mut bytes = small_bytes();
        for (at, v) in edits {
            if at < bytes.len() {
                bytes[at] = v;
            }
        }
        bytes.truncate(cut.max(1));
        if let Ok(g) = Gguf::from_bytes("fuzz.gguf", bytes) {
            for t in g.tensors().to_vec() {
                let _ = g.dequantize(&t.name);
            }
        }
    }
}
