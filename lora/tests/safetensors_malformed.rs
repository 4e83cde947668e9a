//! Hand-built, byte-exact malformed safetensors files. Each must be rejected with an
//! error naming the file and the problem, never a panic. The cases mirror the ones
//! the `safetensors` project checks in its own suite, seen through our reader.

// Panicking is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use fibecfed_core::NamedTensors;
use fibecfed_lora::io::{
    TensorIoError, read_i64_tensor, read_safetensors, read_safetensors_with_metadata,
    write_safetensors,
};
use ndarray::{ArrayD, IxDyn};
use tempfile::TempDir;

/// A safetensors file: 8-byte little-endian header length, header, data.
fn st_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn put(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Asserts an error whose message names `path` and contains one of `words`
/// (case-insensitively).
fn assert_err<T: std::fmt::Debug>(path: &Path, result: Result<T, TensorIoError>, words: &[&str]) {
    let err = result.expect_err("malformed file must be rejected");
    let msg = err.to_string();
    let shown = path.display().to_string();
    assert!(
        msg.contains(&shown),
        "message {msg:?} does not name {shown:?}"
    );
    let lower = msg.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(&w.to_lowercase())),
        "message {msg:?} mentions none of {words:?}"
    );
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn empty_file() {
    let dir = TempDir::new().unwrap();
    let path = put(&dir, "empty.safetensors", b"");
    assert_err(&path, read_safetensors(&path), &["too small"]);
    assert_err(&path, read_i64_tensor(&path, "x"), &["too small"]);
}

#[test]
fn shorter_than_length_prefix() {
    let dir = TempDir::new().unwrap();
    for len in 1..8 {
        let path = put(&dir, &format!("short{len}.safetensors"), &[0u8; 7][..len]);
        assert_err(&path, read_safetensors(&path), &["too small"]);
    }
}

#[test]
fn header_length_larger_than_file() {
    let dir = TempDir::new().unwrap();
    // Claims a 60-byte header, supplies 2.
    let mut bytes = 60u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let path = put(&dir, "long_header.safetensors", &bytes);
    assert_err(&path, read_safetensors(&path), &["invalid header length"]);

    // Only the length prefix, nothing after it.
    let path = put(&dir, "prefix_only.safetensors", &16u64.to_le_bytes());
    assert_err(&path, read_safetensors(&path), &["invalid header length"]);
}

#[test]
fn header_length_over_crate_limit() {
    let dir = TempDir::new().unwrap();
    let body = br#"{"test":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    for (i, claimed) in [100_000_001u64, 0xffff_ff00_0000_003c, u64::MAX]
        .into_iter()
        .enumerate()
    {
        let mut bytes = claimed.to_le_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(&[0u8; 16]);
        let path = put(&dir, &format!("huge{i}.safetensors"), &bytes);
        assert_err(&path, read_safetensors(&path), &["too large"]);
    }
}

#[test]
fn header_not_utf8() {
    let dir = TempDir::new().unwrap();
    let mut bytes = 1u64.to_le_bytes().to_vec();
    bytes.push(0xff);
    let path = put(&dir, "utf8.safetensors", &bytes);
    assert_err(&path, read_safetensors(&path), &["UTF-8"]);

    // A truncated multi-byte sequence inside otherwise plausible JSON.
    let mut bytes = 4u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"\xe2\x82");
    let path = put(&dir, "utf8_cut.safetensors", &bytes);
    assert_err(&path, read_safetensors(&path), &["UTF-8"]);
}

#[test]
fn header_not_json() {
    let dir = TempDir::new().unwrap();
    for (i, header) in ["{", "not json", "[]", "{\"a\":", "null"]
        .into_iter()
        .enumerate()
    {
        let path = put(
            &dir,
            &format!("json{i}.safetensors"),
            &st_bytes(header, b""),
        );
        assert_err(&path, read_safetensors(&path), &["JSON"]);
    }
}

#[test]
fn header_json_with_wrong_tensor_fields() {
    let dir = TempDir::new().unwrap();
    let cases = [
        // Unknown dtype name.
        r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
        // Missing offsets.
        r#"{"a":{"dtype":"F32","shape":[1]}}"#,
        // Negative dimension.
        r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
        // Offsets that are not a pair.
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#,
    ];
    for (i, header) in cases.into_iter().enumerate() {
        let path = put(
            &dir,
            &format!("fields{i}.safetensors"),
            &st_bytes(header, &[0u8; 4]),
        );
        assert_err(&path, read_safetensors(&path), &["JSON"]);
    }
}

#[test]
fn data_offsets_past_end_of_buffer() {
    let dir = TempDir::new().unwrap();
    // Shape and offsets agree (16 bytes) but only 8 bytes of data follow.
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let path = put(&dir, "past_end.safetensors", &st_bytes(header, &[0u8; 8]));
    assert_err(&path, read_safetensors(&path), &["incomplete"]);

    // Offsets far beyond any plausible file.
    let header = r#"{"a":{"dtype":"F32","shape":[268435456],"data_offsets":[0,1073741824]}}"#;
    let path = put(
        &dir,
        "far_past_end.safetensors",
        &st_bytes(header, &[0u8; 8]),
    );
    assert_err(&path, read_safetensors(&path), &["incomplete"]);
}

#[test]
fn trailing_bytes_after_data() {
    let dir = TempDir::new().unwrap();
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut data = f32_bytes(&[1.0, 2.0]);
    data.extend_from_slice(b"polyglot payload");
    let path = put(&dir, "trailing.safetensors", &st_bytes(header, &data));
    assert_err(&path, read_safetensors(&path), &["incomplete"]);
}

#[test]
fn offsets_disagree_with_dtype_and_shape() {
    let dir = TempDir::new().unwrap();
    let cases = [
        // [2,2] F32 needs 16 bytes, offsets give 4.
        (
            r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,4]}}"#,
            4,
        ),
        // F16 [3] needs 6 bytes, offsets give 12 (as if F32).
        (
            r#"{"a":{"dtype":"F16","shape":[3],"data_offsets":[0,12]}}"#,
            12,
        ),
        // Scalar F64 needs 8 bytes, offsets give 4.
        (
            r#"{"a":{"dtype":"F64","shape":[],"data_offsets":[0,4]}}"#,
            4,
        ),
    ];
    for (i, (header, n)) in cases.into_iter().enumerate() {
        let path = put(
            &dir,
            &format!("info{i}.safetensors"),
            &st_bytes(header, &vec![0u8; n]),
        );
        assert_err(
            &path,
            read_safetensors(&path),
            &["invalid shape, data type, or offset"],
        );
    }
}

#[test]
fn shape_overflow() {
    let dir = TempDir::new().unwrap();
    let header = r#"{"a":{"dtype":"F32","shape":[2,18446744073709551614],"data_offsets":[0,16]}}"#;
    let path = put(&dir, "overflow.safetensors", &st_bytes(header, &[0u8; 16]));
    assert_err(&path, read_safetensors(&path), &["overflow"]);

    let header = r#"{"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,16]}}"#;
    let path = put(
        &dir,
        "overflow_bytes.safetensors",
        &st_bytes(header, &[0u8; 16]),
    );
    assert_err(&path, read_safetensors(&path), &["overflow"]);
}

#[test]
fn overlapping_and_gapped_offsets() {
    let dir = TempDir::new().unwrap();
    let cases = [
        // b starts inside a.
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        ),
        // Gap of 4 bytes between a and b.
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#,
            20,
        ),
        // Both claim the same bytes.
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            8,
        ),
        // The first tensor does not start at the beginning of the data section.
        (
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        ),
        // End before start.
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#,
            8,
        ),
    ];
    for (i, (header, n)) in cases.into_iter().enumerate() {
        let path = put(
            &dir,
            &format!("offsets{i}.safetensors"),
            &st_bytes(header, &vec![0u8; n]),
        );
        assert_err(&path, read_safetensors(&path), &["invalid offset"]);
    }
}

#[test]
fn zero_sized_tensor_loads_as_empty_array() {
    let dir = TempDir::new().unwrap();
    let header = r#"{"empty":{"dtype":"F32","shape":[2,0],"data_offsets":[0,0]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let path = put(
        &dir,
        "zero.safetensors",
        &st_bytes(header, &f32_bytes(&[1.5, -2.0])),
    );
    let tensors = read_safetensors(&path).unwrap();
    assert_eq!(tensors.len(), 2);
    assert_eq!(tensors["empty"].shape(), &[2, 0]);
    assert_eq!(tensors["empty"].len(), 0);
    assert_eq!(tensors["w"].as_slice().unwrap(), &[1.5, -2.0]);

    // A zero-sized tensor alone: the data section is empty.
    let header = r#"{"e":{"dtype":"BF16","shape":[0],"data_offsets":[0,0]}}"#;
    let path = put(&dir, "zero_only.safetensors", &st_bytes(header, b""));
    let tensors = read_safetensors(&path).unwrap();
    assert_eq!(tensors["e"].shape(), &[0]);
}

#[test]
fn zero_sized_tensor_with_huge_dimension_does_not_panic() {
    let dir = TempDir::new().unwrap();
    // The element count is 0, so the header is valid, but no array can have a
    // dimension this large; the reader must answer with an error, not a panic.
    let header = r#"{"e":{"dtype":"F32","shape":[0,18446744073709551615,2],"data_offsets":[0,0]}}"#;
    let path = put(&dir, "zero_huge.safetensors", &st_bytes(header, b""));
    let err = read_safetensors(&path).unwrap_err();
    assert!(
        matches!(err, TensorIoError::ShapeMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("`e`"), "{msg}");
}

#[test]
fn empty_and_whitespace_padded_headers_load() {
    let dir = TempDir::new().unwrap();
    for (i, header) in ["{}", "{}    ", "\t\n{} \r"].into_iter().enumerate() {
        let path = put(&dir, &format!("ws{i}.safetensors"), &st_bytes(header, b""));
        let (tensors, metadata) = read_safetensors_with_metadata(&path).unwrap();
        assert!(tensors.is_empty());
        assert!(metadata.is_empty());
    }
}

#[test]
fn scalar_tensor_loads_as_zero_dim_array() {
    let dir = TempDir::new().unwrap();
    let header = r#"{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#;
    let path = put(
        &dir,
        "scalar.safetensors",
        &st_bytes(header, &f32_bytes(&[3.25])),
    );
    let tensors = read_safetensors(&path).unwrap();
    assert_eq!(tensors["s"].ndim(), 0);
    assert_eq!(tensors["s"].first(), Some(&3.25));
}

#[test]
fn truncated_real_file_fails_at_every_cut() {
    let dir = TempDir::new().unwrap();
    let full = dir.path().join("full.safetensors");
    let mut tensors = NamedTensors::new();
    tensors.insert(
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight".to_owned(),
        ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap(),
    );
    tensors.insert(
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight".to_owned(),
        ArrayD::from_shape_vec(IxDyn(&[3, 2]), vec![-1.0; 6]).unwrap(),
    );
    write_safetensors(&full, &tensors, None).unwrap();
    let bytes = std::fs::read(&full).unwrap();
    assert_eq!(read_safetensors(&full).unwrap(), tensors);

    let cut = dir.path().join("cut.safetensors");
    for len in 0..bytes.len() {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        assert_err(
            &cut,
            read_safetensors(&cut),
            &["too small", "invalid header length", "incomplete"],
        );
    }
    // The cut inside the data section is the common real-world case (interrupted
    // download); it must be reported as an incomplete file.
    std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
    assert_err(&cut, read_safetensors(&cut), &["incomplete"]);
}

#[test]
fn unsupported_dtypes_name_tensor_and_dtype() {
    let dir = TempDir::new().unwrap();
    let cases = [
        ("BOOL", 1usize),
        ("U8", 1),
        ("I8", 1),
        ("I16", 2),
        ("U32", 4),
        ("I64", 8),
        ("C64", 8),
        ("F8_E4M3", 1),
    ];
    for (dtype, width) in cases {
        let header = format!(
            r#"{{"mask.weight":{{"dtype":"{dtype}","shape":[3],"data_offsets":[0,{}]}}}}"#,
            3 * width
        );
        let path = put(
            &dir,
            &format!("{dtype}.safetensors"),
            &st_bytes(&header, &vec![1u8; 3 * width]),
        );
        let err = read_safetensors(&path).unwrap_err();
        assert!(
            matches!(err, TensorIoError::UnsupportedDtype { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("mask.weight"), "{msg}");
        assert!(msg.contains(dtype), "{msg}");
        assert!(msg.contains("unsupported dtype"), "{msg}");
    }
}

#[test]
fn metadata_with_non_string_value() {
    let dir = TempDir::new().unwrap();
    let cases = [
        r#"{"__metadata__":{"format":1},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"__metadata__":{"nested":{"x":"y"}},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        r#"{"__metadata__":"pt","a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
    ];
    for (i, header) in cases.into_iter().enumerate() {
        let path = put(
            &dir,
            &format!("meta{i}.safetensors"),
            &st_bytes(header, &[0u8; 4]),
        );
        assert_err(&path, read_safetensors_with_metadata(&path), &["JSON"]);
    }
}

#[test]
fn string_metadata_is_returned() {
    let dir = TempDir::new().unwrap();
    let header = r#"{"__metadata__":{"format":"pt","rank":"8"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let path = put(
        &dir,
        "meta_ok.safetensors",
        &st_bytes(header, &f32_bytes(&[7.0])),
    );
    let (tensors, metadata) = read_safetensors_with_metadata(&path).unwrap();
    assert_eq!(tensors["a"].first(), Some(&7.0));
    assert_eq!(metadata.get("format").map(String::as_str), Some("pt"));
    assert_eq!(metadata.get("rank").map(String::as_str), Some("8"));
}

#[test]
fn float64_is_narrowed() {
    let dir = TempDir::new().unwrap();
    let values = [0.1f64, -1e300, 1e-300, f64::NAN];
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = r#"{"d":{"dtype":"F64","shape":[4],"data_offsets":[0,32]}}"#;
    let path = put(&dir, "f64.safetensors", &st_bytes(header, &data));
    let tensors = read_safetensors(&path).unwrap();
    let got = tensors["d"].as_slice().unwrap();
    assert_eq!(got[0].to_bits(), 0.1f32.to_bits());
    assert_eq!(got[1].to_bits(), f32::NEG_INFINITY.to_bits());
    assert_eq!(got[2].to_bits(), 0.0f32.to_bits());
    assert!(got[3].is_nan(), "NaN must be passed through, not rejected");
}

#[test]
fn missing_file_and_directory() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("nope.safetensors");
    assert_err(&missing, read_safetensors(&missing), &["cannot read"]);
    assert_err(&missing, read_i64_tensor(&missing, "ids"), &["cannot read"]);
    assert!(matches!(
        read_safetensors(&missing),
        Err(TensorIoError::Read { .. })
    ));

    // A directory opens on Unix but cannot be read as a file.
    let path = dir.path().to_path_buf();
    assert_err(
        &path,
        read_safetensors(&path),
        &["cannot read", "directory"],
    );
}

#[test]
fn integer_reader_errors() {
    let dir = TempDir::new().unwrap();
    let header = r#"{"ids":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
    let mut data: Vec<u8> = [-5i32, 70_000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    data.extend(f32_bytes(&[1.0]));
    let path = put(&dir, "ids.safetensors", &st_bytes(header, &data));

    assert_eq!(
        read_i64_tensor(&path, "ids").unwrap(),
        (vec![2], vec![-5, 70_000])
    );

    let err = read_i64_tensor(&path, "absent").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("absent"),
        "{msg}"
    );
    assert!(msg.contains("not found"), "{msg}");

    let err = read_i64_tensor(&path, "w").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("`w`") && msg.contains("F32") && msg.contains("unsupported"),
        "{msg}"
    );

    // The float reader refuses the integer tensor rather than guessing a conversion.
    assert_err(&path, read_safetensors(&path), &["unsupported dtype"]);

    // Malformed files are reported the same way by the integer reader.
    let bad = put(&dir, "bad_ids.safetensors", &st_bytes("{", b""));
    assert_err(&bad, read_i64_tensor(&bad, "ids"), &["JSON"]);
}
