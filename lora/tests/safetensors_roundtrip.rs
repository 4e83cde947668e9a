//! Write -> read round trips, half-precision reads against `half`, and the atomic
//! write contract.

// Panicking is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use fibecfed_core::NamedTensors;
use fibecfed_lora::io::{
    TensorIoError, read_i64_tensor, read_safetensors, read_safetensors_with_metadata,
    write_safetensors,
};
use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use tempfile::TempDir;

/// Shapes up to rank 4 with small dimensions: includes `[]` (0-d), `[1]`, and
/// zero-sized shapes such as `[3, 0]`.
fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![]),
        Just(vec![1]),
        Just(vec![0]),
        prop::collection::vec(0usize..5, 1..=4),
    ]
}

/// Every f32 bit pattern is possible; the special values are weighted up so that
/// each run sees them.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => any::<u32>().prop_map(f32::from_bits),
        1 => prop::sample::select(vec![
            0.0f32,
            -0.0,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7fa0_0001), // signalling NaN with a payload
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            f32::from_bits(1), // smallest subnormal
            f32::MAX,
        ]),
    ]
}

fn tensor() -> impl Strategy<Value = ArrayD<f32>> {
    shape().prop_flat_map(|shape| {
        let n = shape.iter().product::<usize>();
        prop::collection::vec(value(), n)
            .prop_map(move |v| ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap())
    })
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9_]{0,8}(\\.[a-z0-9_]{1,8}){0,5}",
        // Arbitrary printable text, including quotes and backslashes that the
        // JSON header must escape.
        "[ -~]{1,16}".prop_filter("reserved key", |s| s != "__metadata__"),
        // Non-ASCII names survive as UTF-8.
        "[α-ω漢字]{1,4}",
    ]
}

fn named_tensors() -> impl Strategy<Value = NamedTensors> {
    prop::collection::btree_map(name(), tensor(), 0..6)
}

fn metadata() -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
    prop::option::of(prop::collection::btree_map(
        "[ -~]{0,12}",
        "[ -~]{0,24}",
        0..4,
    ))
}

fn assert_bitwise_eq(expected: &NamedTensors, got: &NamedTensors) {
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (name, want) in expected {
        let have = &got[name];
        assert_eq!(want.shape(), have.shape(), "shape of {name:?}");
        let want_bits: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
        let have_bits: Vec<u32> = have.iter().map(|v| v.to_bits()).collect();
        assert_eq!(want_bits, have_bits, "bits of {name:?}");
    }
}

/// Writes one tensor of `dtype` with the safetensors crate directly, so the file
/// does not depend on our writer.
fn write_raw(path: &Path, name: &str, dtype: Dtype, shape: Vec<usize>, data: &[u8]) {
    let view = TensorView::new(dtype, shape, data).unwrap();
    safetensors::serialize_to_file([(name, view)], None, path).unwrap();
}

proptest! {
    // No regression files: failures are reported with the minimal input instead.
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn f32_roundtrip_is_bit_exact(tensors in named_tensors(), meta in metadata()) {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("adapter.safetensors");
        write_safetensors(&path, &tensors, meta.as_ref()).unwrap();
        let (got, got_meta) = read_safetensors_with_metadata(&path).unwrap();
        assert_bitwise_eq(&tensors, &got);
        prop_assert_eq!(got_meta, meta.unwrap_or_default());
        // The folder holds the file and nothing else: no temporary file is left.
        prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn f16_reads_as_half_conversion(shape in shape(), seed in any::<u64>()) {
        let n = shape.iter().product::<usize>();
        // Every bit pattern, NaNs and subnormals included.
        let bits: Vec<u16> = (0..n as u64)
            .map(|i| (seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i * 40_503) >> 17) as u16)
            .collect();
        let data: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();

        let dir = TempDir::new().unwrap();
        let f16_path = dir.path().join("f16.safetensors");
        write_raw(&f16_path, "h", Dtype::F16, shape.clone(), &data);
        let got = read_safetensors(&f16_path).unwrap();
        prop_assert_eq!(got["h"].shape(), shape.as_slice());
        let want: Vec<u32> = bits.iter().map(|&b| f16::from_bits(b).to_f32().to_bits()).collect();
        let have: Vec<u32> = got["h"].iter().map(|v| v.to_bits()).collect();
        prop_assert_eq!(&want, &have);

        let bf16_path = dir.path().join("bf16.safetensors");
        write_raw(&bf16_path, "b", Dtype::BF16, shape.clone(), &data);
        let got = read_safetensors(&bf16_path).unwrap();
        prop_assert_eq!(got["b"].shape(), shape.as_slice());
        let want: Vec<u32> = bits.iter().map(|&b| bf16::from_bits(b).to_f32().to_bits()).collect();
        let have: Vec<u32> = got["b"].iter().map(|v| v.to_bits()).collect();
        prop_assert_eq!(&want, &have);
    }
}

#[test]
fn half_special_values() {
    let dir = TempDir::new().unwrap();
    let values = [
        0.0f32,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        1e-7,
        f32::INFINITY,
        f32::NAN,
    ];

    let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    let data: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
    let path = dir.path().join("f16.safetensors");
    write_raw(&path, "x", Dtype::F16, vec![2, 4], &data);
    let got = read_safetensors(&path).unwrap();
    assert_eq!(got["x"].shape(), &[2, 4]);
    for (h, g) in halves.iter().zip(got["x"].iter()) {
        assert_eq!(h.to_f32().to_bits(), g.to_bits());
    }

    let bhalves: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    let data: Vec<u8> = bhalves.iter().flat_map(|h| h.to_le_bytes()).collect();
    let path = dir.path().join("bf16.safetensors");
    write_raw(&path, "x", Dtype::BF16, vec![8], &data);
    let got = read_safetensors(&path).unwrap();
    for (h, g) in bhalves.iter().zip(got["x"].iter()) {
        assert_eq!(h.to_f32().to_bits(), g.to_bits());
    }
}

#[test]
fn mixed_dtypes_in_one_file() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("mixed.safetensors");
    let a: Vec<u8> = [1.5f32, -3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let b: Vec<u8> = [f16::from_f32(0.5)]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let c: Vec<u8> = [bf16::from_f32(-8.0), bf16::from_f32(2.0)]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let d: Vec<u8> = 0.25f64.to_le_bytes().to_vec();
    let views: HashMap<&str, TensorView<'_>> = [
        ("a", TensorView::new(Dtype::F32, vec![2], &a).unwrap()),
        ("b", TensorView::new(Dtype::F16, vec![1, 1], &b).unwrap()),
        ("c", TensorView::new(Dtype::BF16, vec![2, 1], &c).unwrap()),
        ("d", TensorView::new(Dtype::F64, vec![], &d).unwrap()),
    ]
    .into_iter()
    .collect();
    safetensors::serialize_to_file(&views, None, &path).unwrap();

    let got = read_safetensors(&path).unwrap();
    assert_eq!(
        got["a"].iter().copied().collect::<Vec<_>>(),
        vec![1.5, -3.0]
    );
    assert_eq!(got["b"].shape(), &[1, 1]);
    assert_eq!(got["b"].iter().copied().collect::<Vec<_>>(), vec![0.5]);
    assert_eq!(
        got["c"].iter().copied().collect::<Vec<_>>(),
        vec![-8.0, 2.0]
    );
    assert_eq!(got["d"].ndim(), 0);
    assert_eq!(got["d"].first(), Some(&0.25));
}

#[test]
fn integer_tensors_read_as_i64() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("ids.safetensors");
    let ids64 = [i64::MIN, -1, 0, 1, i64::MAX, 50_256];
    let ids32 = [i32::MIN, -7, 0, i32::MAX];
    let d64: Vec<u8> = ids64.iter().flat_map(|v| v.to_le_bytes()).collect();
    let d32: Vec<u8> = ids32.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views: HashMap<&str, TensorView<'_>> = [
        (
            "input_ids",
            TensorView::new(Dtype::I64, vec![2, 3], &d64).unwrap(),
        ),
        (
            "labels",
            TensorView::new(Dtype::I32, vec![4], &d32).unwrap(),
        ),
        (
            "none",
            TensorView::new(Dtype::I64, vec![0, 5], &[]).unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    safetensors::serialize_to_file(&views, None, &path).unwrap();

    assert_eq!(
        read_i64_tensor(&path, "input_ids").unwrap(),
        (vec![2, 3], ids64.to_vec())
    );
    assert_eq!(
        read_i64_tensor(&path, "labels").unwrap(),
        (vec![4], ids32.iter().map(|&v| i64::from(v)).collect())
    );
    assert_eq!(
        read_i64_tensor(&path, "none").unwrap(),
        (vec![0, 5], vec![])
    );
}

#[test]
fn non_standard_layout_is_written_in_logical_order() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("t.safetensors");
    let base =
        ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let transposed = base.t().to_owned();
    // A negative stride: memory order differs from logical order.
    let mut strided = base.clone();
    strided.invert_axis(ndarray::Axis(0));
    let mut tensors = NamedTensors::new();
    tensors.insert("t".to_owned(), base.clone().reversed_axes());
    tensors.insert("s".to_owned(), strided.clone());
    write_safetensors(&path, &tensors, None).unwrap();
    let got = read_safetensors(&path).unwrap();
    assert_eq!(got["t"], transposed);
    assert_eq!(got["t"].shape(), &[3, 2]);
    assert_eq!(
        got["t"].iter().copied().collect::<Vec<_>>(),
        vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
    );
    assert_eq!(got["s"], strided);
}

#[test]
fn header_lists_names_in_sorted_order_with_increasing_offsets() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("sorted.safetensors");
    let mut tensors = NamedTensors::new();
    for name in ["zeta", "alpha", "mid.b", "mid.a", "Upper"] {
        tensors.insert(name.to_owned(), ArrayD::from_elem(IxDyn(&[2]), 1.0));
    }
    write_safetensors(&path, &tensors, None).unwrap();

    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // The data section is 8-byte aligned by the format.
    assert_eq!((8 + n) % 8, 0);
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut by_offset: Vec<(u64, String)> = header
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            assert_eq!(v["dtype"], "F32", "{k}");
            (v["data_offsets"][0].as_u64().unwrap(), k.clone())
        })
        .collect();
    by_offset.sort();
    let names: Vec<&str> = by_offset.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(names, ["Upper", "alpha", "mid.a", "mid.b", "zeta"]);
}

#[test]
fn overwrite_replaces_existing_file_and_leaves_no_tmp() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("adapter.safetensors");

    let mut first = NamedTensors::new();
    first.insert("a".to_owned(), ArrayD::from_elem(IxDyn(&[64, 64]), 1.0));
    let mut meta = BTreeMap::new();
    meta.insert("round".to_owned(), "1".to_owned());
    write_safetensors(&path, &first, Some(&meta)).unwrap();

    // Smaller replacement: a truncate-in-place bug would leave stale trailing bytes.
    let mut second = NamedTensors::new();
    second.insert("b".to_owned(), ArrayD::from_elem(IxDyn(&[3]), -2.0));
    write_safetensors(&path, &second, None).unwrap();

    let (got, got_meta) = read_safetensors_with_metadata(&path).unwrap();
    assert_bitwise_eq(&second, &got);
    assert!(got_meta.is_empty());

    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        entries,
        vec![std::ffi::OsString::from("adapter.safetensors")]
    );
}

#[cfg(unix)]
#[test]
fn overwrite_keeps_live_readers_of_old_file_intact() {
    // The rename leaves the old inode alone, so a handle opened before the
    // rewrite still sees the complete old file.
    use std::io::Read;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("adapter.safetensors");
    let mut first = NamedTensors::new();
    first.insert("a".to_owned(), ArrayD::from_elem(IxDyn(&[16]), 3.0));
    write_safetensors(&path, &first, None).unwrap();
    let old_bytes = std::fs::read(&path).unwrap();
    let mut old = std::fs::File::open(&path).unwrap();

    let mut second = NamedTensors::new();
    second.insert("b".to_owned(), ArrayD::from_elem(IxDyn(&[2]), 4.0));
    write_safetensors(&path, &second, None).unwrap();

    let mut seen = Vec::new();
    old.read_to_end(&mut seen).unwrap();
    assert_eq!(seen, old_bytes);
    assert_bitwise_eq(&second, &read_safetensors(&path).unwrap());
}

#[test]
fn write_into_missing_directory_names_the_path() {
    let dir = TempDir::new().unwrap();
    let path = dir
        .path()
        .join("no")
        .join("such")
        .join("adapter.safetensors");
    let mut tensors = NamedTensors::new();
    tensors.insert("a".to_owned(), ArrayD::from_elem(IxDyn(&[1]), 0.0));
    let err = write_safetensors(&path, &tensors, None).unwrap_err();
    assert!(matches!(err, TensorIoError::Write { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(!path.exists());
}

#[test]
fn reserved_tensor_name_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("adapter.safetensors");
    let mut tensors = NamedTensors::new();
    tensors.insert(
        "__metadata__".to_owned(),
        ArrayD::from_elem(IxDyn(&[1]), 0.0),
    );
    let err = write_safetensors(&path, &tensors, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("__metadata__"),
        "{msg}"
    );
    assert!(!path.exists());
}

#[test]
fn empty_tensor_set_roundtrips() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("empty.safetensors");
    write_safetensors(&path, &NamedTensors::new(), None).unwrap();
    assert!(read_safetensors(&path).unwrap().is_empty());
}
