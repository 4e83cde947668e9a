//! The kernels against the f64 reference, and the checks that need no GPU.
//!
//! GPU tests draw fresh random inputs every run (the seed comes from the clock and is in
//! every failure message), poison every output with NaN before each launch, and cover
//! padded and holed masks and sizes that are multiples of no tile (B = 1, T = 1, d = 1,
//! r = 1, d = 1000, ranks on both sides of the 8/16/64 tile heights). Tolerances on
//! ‖out − ref‖ / ‖ref‖: 1e-5 for fp32 (fp32 sums of a few thousand terms land near 1e-6),
//! 2e-3 for tf32 (inputs rounded to 10-bit mantissas: about 3e-4 on a gradient entry,
//! twice that on its square; BENCHMARKS.md). Each also runs twice and must give
//! bitwise-identical results: the reductions have a fixed order, so any difference is a
//! race. Without a GPU, each prints "skipped: <test>: <why>" to stderr and returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fibecfed_kernels::reference::{
    self, DenseData, LoraData, MaskKind, SplitMix64, rel_error, time_seed,
};
use fibecfed_kernels::{
    DenseInputs, DenseShape, GpuFisher, KERNEL_NAMES, KernelError, LoraInputs, LoraProducts,
    LoraShape, Mode, ShapeError, compile_ptx, driver_present, gpu_for_test, nvrtc_present,
};

const FP32_TOL: f64 = 1e-5;
const TF32_TOL: f64 = 2e-3;

fn tol(mode: Mode) -> f64 {
    match mode {
        Mode::Fp32 => FP32_TOL,
        Mode::Tf32 => TF32_TOL,
    }
}

fn lora(batch: usize, seq_len: usize, d_in: usize, d_out: usize, rank: usize) -> LoraShape {
    LoraShape {
        batch,
        seq_len,
        d_in,
        d_out,
        rank,
    }
}

fn dense(batch: usize, seq_len: usize, d_in: usize, d_out: usize) -> DenseShape {
    DenseShape {
        batch,
        seq_len,
        d_in,
        d_out,
    }
}

/// Tiny, odd and tile-straddling LoRA shapes (rank 8, 16 and 64 are the tile heights).
const LORA_SHAPES: [(usize, usize, usize, usize, usize); 8] = [
    (1, 1, 1, 1, 1),
    (1, 3, 1, 2, 1),
    (3, 7, 1000, 33, 5),
    (5, 37, 130, 67, 8),
    (4, 29, 61, 1000, 9),
    (2, 65, 129, 130, 16),
    (3, 19, 70, 45, 17),
    (2, 33, 200, 96, 64),
];

const DENSE_SHAPES: [(usize, usize, usize, usize); 6] = [
    (1, 1, 1, 1),
    (2, 5, 1000, 3),
    (3, 17, 65, 129),
    (4, 33, 200, 70),
    (1, 40, 64, 64),
    (6, 9, 7, 1000),
];

fn check_lora(gpu: &GpuFisher, data: &LoraData, products: bool, mode: Mode, seed: u64) {
    let inputs = data.inputs(products);
    let want = reference::lora_site(&inputs).unwrap();
    let mut job = gpu.lora_job(&inputs).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        gpu.poison_lora(&mut job).unwrap();
        gpu.run_lora(&mut job, mode).unwrap();
        runs.push(gpu.read_lora(&job).unwrap());
    }
    let got = &runs[0];
    let what = format!(
        "seed {seed}, {:?}, mask {:?}, products given: {products}, {}",
        data.shape,
        data.mask.iter().filter(|&&m| m == 0.0).count(),
        mode.name()
    );
    for (name, g, w) in [
        ("sq_a", &got.sq_a, &want.sq_a),
        ("sq_b", &got.sq_b, &want.sq_b),
        ("diag_a", &got.diag_a, &want.diag_a),
        ("diag_b", &got.diag_b, &want.diag_b),
    ] {
        let err = rel_error(g, w);
        assert!(err <= tol(mode), "{name}: relative error {err:e} ({what})");
    }
    assert!(runs[0] == runs[1], "two runs differ: a race ({what})");
}

fn check_dense(gpu: &GpuFisher, data: &DenseData, mode: Mode, seed: u64) {
    let inputs = data.inputs();
    let want = reference::dense_site(&inputs).unwrap();
    let mut job = gpu.dense_job(&inputs).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        gpu.poison_dense(&mut job).unwrap();
        gpu.run_dense(&mut job, mode).unwrap();
        runs.push(gpu.read_dense(&job).unwrap());
    }
    let what = format!("seed {seed}, {:?}, {}", data.shape, mode.name());
    for (name, g, w) in [
        ("sq", &runs[0].sq, &want.sq),
        ("diag", &runs[0].diag, &want.diag),
    ] {
        let err = rel_error(g, w);
        assert!(err <= tol(mode), "{name}: relative error {err:e} ({what})");
    }
    assert!(runs[0] == runs[1], "two runs differ: a race ({what})");
}

/// The GPU and a fresh seed (printed) when the card can run `mode`; otherwise prints
/// why the test is skipped.
fn gpu_in_mode(test: &str, mode: Mode) -> Option<(&'static GpuFisher, u64)> {
    let gpu = gpu_for_test(test)?;
    if !gpu.supports(mode) {
        eprintln!(
            "skipped: {test}: {} cannot run {}",
            gpu.device_name(),
            mode.name()
        );
        return None;
    }
    let seed = time_seed();
    eprintln!("{test}: seed {seed}");
    Some((gpu, seed))
}

fn lora_against_reference(test: &str, mode: Mode) {
    let Some((gpu, seed)) = gpu_in_mode(test, mode) else {
        return;
    };
    let mut rng = SplitMix64::new(seed);
    for (b, t, d_in, d_out, r) in LORA_SHAPES {
        for kind in [MaskKind::Full, MaskKind::Padded, MaskKind::Holes] {
            let data = LoraData::random(lora(b, t, d_in, d_out, r), kind, &mut rng);
            for products in [false, true] {
                check_lora(gpu, &data, products, mode, seed);
            }
        }
    }
}

fn dense_against_reference(test: &str, mode: Mode) {
    let Some((gpu, seed)) = gpu_in_mode(test, mode) else {
        return;
    };
    let mut rng = SplitMix64::new(seed);
    for (b, t, d_in, d_out) in DENSE_SHAPES {
        for kind in [MaskKind::Full, MaskKind::Padded, MaskKind::Holes] {
            let data = DenseData::random(dense(b, t, d_in, d_out), kind, &mut rng);
            check_dense(gpu, &data, mode, seed);
        }
    }
}

#[test]
fn lora_fp32_matches_the_f64_reference() {
    lora_against_reference("lora_fp32_matches_the_f64_reference", Mode::Fp32);
}

#[test]
fn lora_tf32_is_within_its_documented_error() {
    lora_against_reference("lora_tf32_is_within_its_documented_error", Mode::Tf32);
}

#[test]
fn dense_fp32_matches_the_f64_reference() {
    dense_against_reference("dense_fp32_matches_the_f64_reference", Mode::Fp32);
}

#[test]
fn dense_tf32_is_within_its_documented_error() {
    dense_against_reference("dense_tf32_is_within_its_documented_error", Mode::Tf32);
}

/// Many samples and long rows: several sample groups per tile (partials summed in group
/// order) and several T chunks per sample.
#[test]
fn many_groups_and_long_sequences() {
    let test = "many_groups_and_long_sequences";
    let Some(gpu) = gpu_for_test(test) else {
        return;
    };
    let seed = time_seed();
    let mut rng = SplitMix64::new(seed);
    let data = LoraData::random(lora(67, 133, 384, 96, 8), MaskKind::Padded, &mut rng);
    check_lora(gpu, &data, true, Mode::Fp32, seed);
    let data = DenseData::random(dense(41, 70, 96, 160), MaskKind::Padded, &mut rng);
    check_dense(gpu, &data, Mode::Fp32, seed);
    if gpu.supports(Mode::Tf32) {
        check_dense(gpu, &data, Mode::Tf32, seed);
    }
}

/// Zero-sized batches answer with zeros of the right shapes without launching.
#[test]
fn empty_batches_are_zeros() {
    let Some(gpu) = gpu_for_test("empty_batches_are_zeros") else {
        return;
    };
    let shape = lora(0, 4, 3, 2, 1);
    let inputs = LoraInputs {
        shape,
        x: &[],
        delta: &[],
        mask: &[],
        a: &[0.5; 3],
        b: &[0.5; 2],
        scale: 1.0,
        products: None,
    };
    let out = gpu.lora_site(&inputs, Mode::Fp32).unwrap();
    assert!(out.sq_a.is_empty() && out.sq_b.is_empty());
    assert_eq!((out.diag_a, out.diag_b), (vec![0.0; 3], vec![0.0; 2]));
}

/// Makes one buffer the wrong length.
type Spoil = fn(&mut Buffers);

/// Placeholders of the right lengths for a LoRA shape.
struct Buffers {
    x: Vec<f32>,
    delta: Vec<f32>,
    mask: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    products: Vec<f32>,
}

fn buffers(s: LoraShape) -> Buffers {
    let n = s.batch * s.seq_len;
    Buffers {
        x: vec![1.0; n * s.d_in],
        delta: vec![1.0; n * s.d_out],
        mask: vec![1.0; n],
        a: vec![1.0; s.rank * s.d_in],
        b: vec![1.0; s.d_out * s.rank],
        products: vec![1.0; n * s.rank],
    }
}

fn inputs(s: LoraShape, b: &Buffers) -> LoraInputs<'_> {
    LoraInputs {
        shape: s,
        x: &b.x,
        delta: &b.delta,
        mask: &b.mask,
        a: &b.a,
        b: &b.b,
        scale: 2.0,
        products: None,
    }
}

fn shape_error(result: Result<(), KernelError>) -> ShapeError {
    match result {
        Err(KernelError::Shape(e)) => e,
        other => panic!("expected a shape error, got {other:?}"),
    }
}

/// Every buffer whose length disagrees with the shape is named, with the length it has
/// and the one the shape makes, before any device work; the reference and the GPU
/// refuse the same inputs.
#[test]
fn shape_errors_name_the_buffer() {
    let s = lora(2, 3, 4, 5, 2);
    let good = buffers(s);
    assert!(inputs(s, &good).check().is_ok());
    // (buffer, found, expected) after the spoiling.
    let cases: [(&str, usize, usize, Spoil); 5] = [
        ("x", 23, 24, |b| {
            b.x.pop();
        }),
        ("δ", 31, 30, |b| b.delta.push(0.0)),
        ("mask", 5, 6, |b| {
            b.mask.pop();
        }),
        ("A", 7, 8, |b| {
            b.a.pop();
        }),
        ("B", 11, 10, |b| b.b.push(0.0)),
    ];
    let gpu = GpuFisher::new().ok();
    for (name, has, wants, spoil) in cases {
        let mut bad = buffers(s);
        spoil(&mut bad);
        let e = shape_error(inputs(s, &bad).check());
        assert!(
            matches!(e, ShapeError::Length { buffer, found, expected, .. }
                if buffer == name && found == has && expected == wants),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("{name} has {has} elements")),
            "{e}"
        );
        assert_eq!(
            reference::lora_site(&inputs(s, &bad)).unwrap_err(),
            KernelError::Shape(e.clone())
        );
        if let Some(gpu) = &gpu {
            assert_eq!(
                gpu.lora_site(&inputs(s, &bad), Mode::Fp32).unwrap_err(),
                KernelError::Shape(e)
            );
        }
    }
    let short = vec![0.0; 11];
    let mut with_products = inputs(s, &good);
    with_products.products = Some(LoraProducts {
        u: &good.products,
        db: &short,
    });
    let e = shape_error(with_products.check());
    assert_eq!(
        e,
        ShapeError::Length {
            buffer: "δ·B",
            expected: 12,
            found: 11,
            meaning: "batch·seq_len × rank"
        }
    );
    assert_eq!(
        KernelError::Shape(e).to_string(),
        "shapes: δ·B has 11 elements, expected batch·seq_len × rank = 12"
    );

    let dense_bad = DenseInputs {
        shape: dense(2, 3, 4, 5),
        x: &[0.0; 24],
        delta: &[0.0; 30],
        mask: &[0.0; 7],
    };
    assert!(matches!(
        shape_error(dense_bad.check()),
        ShapeError::Length {
            buffer: "mask",
            expected: 6,
            found: 7,
            ..
        }
    ));
}

/// Sizes that overflow or that 32-bit kernel indices cannot reach are refused, not
/// wrapped around.
#[test]
fn impossible_sizes_are_refused() {
    let overflow = lora(usize::MAX, 2, 1, 1, 1);
    let e = shape_error(inputs(overflow, &buffers(lora(0, 0, 0, 0, 0))).check());
    assert_eq!(
        e,
        ShapeError::TooLarge {
            dim: "batch",
            value: usize::MAX,
            limit: i32::MAX as usize
        }
    );
    let rows = lora(1 << 20, 1 << 20, 1, 1, 1);
    let e = shape_error(inputs(rows, &buffers(lora(0, 0, 0, 0, 0))).check());
    assert!(
        matches!(e, ShapeError::TooLarge { dim: "batch × seq_len", value, .. } if value == 1 << 40),
        "{e:?}"
    );
    let wide = DenseInputs {
        shape: dense(1, 1, 1 << 31, 1),
        x: &[],
        delta: &[],
        mask: &[],
    };
    let e = shape_error(wide.check());
    assert!(
        matches!(e, ShapeError::TooLarge { dim: "d_in", value, .. } if value == 1 << 31),
        "{e:?}"
    );
    assert!(e.to_string().contains("limit"), "{e}");
}

/// A job with a zero dimension names it (the site calls answer such shapes with zeros).
#[test]
fn jobs_with_a_zero_dimension_name_it() {
    let Some(gpu) = gpu_for_test("jobs_with_a_zero_dimension_name_it") else {
        return;
    };
    let s = lora(2, 3, 4, 5, 0);
    let b = buffers(s);
    assert_eq!(
        gpu.lora_job(&inputs(s, &b)).unwrap_err(),
        KernelError::Shape(ShapeError::Empty { dim: "rank" })
    );
}

/// Without a driver the answer is a typed error, never a panic.
#[test]
fn a_missing_gpu_is_an_error_with_a_reason() {
    match GpuFisher::new() {
        Ok(gpu) => eprintln!("GPU present: {gpu:?}"),
        Err(why) => {
            assert!(!why.to_string().is_empty());
            if !driver_present() {
                assert_eq!(why, KernelError::NoDriver);
                assert_eq!(why.to_string(), "no CUDA driver (libcuda not found)");
            }
        }
    }
}

/// NVRTC compiles the sources for Hopper, Ampere and Turing and the PTX defines every
/// kernel the host launches. Needs libnvrtc (e.g. a pip `nvidia-cuda-nvrtc` wheel's lib
/// folder on LD_LIBRARY_PATH), not a GPU; prints "skipped" without it.
#[test]
fn nvrtc_compiles_every_kernel() {
    use std::io::Write as _;
    if !nvrtc_present() {
        let line = format!(
            "skipped: nvrtc_compiles_every_kernel: {}\n",
            KernelError::NoNvrtc
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        return;
    }
    for arch in ["compute_90", "compute_80", "compute_75"] {
        let ptx = compile_ptx(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        for name in KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: no kernel {name}"
            );
        }
        if arch != "compute_75" {
            assert!(ptx.contains("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"));
        }
    }
}

/// The reference on a case small enough to do by hand: two tokens, one masked by 0.5
/// (weight 0.25) and padding that holds NaN (never read).
#[test]
fn reference_by_hand() {
    let inputs = DenseInputs {
        shape: dense(1, 3, 2, 1),
        x: &[1.0, 2.0, 3.0, 4.0, f32::NAN, f32::NAN],
        delta: &[1.0, 2.0, f32::NAN],
        mask: &[1.0, 0.5, 0.0],
    };
    // ∂W = 1·(1, 2) + 0.25·2·(3, 4) = (2.5, 4): ‖·‖² = 6.25 + 16.
    let out = reference::dense_site(&inputs).unwrap();
    assert_eq!(out.sq, vec![22.25]);
    assert_eq!(out.diag, vec![6.25, 16.0]);
    assert_eq!(rel_error(&[f32::NAN], &[1.0]), f64::INFINITY);
    assert_eq!(rel_error(&[1.0, 2.0], &[1.0]), f64::INFINITY);
    assert_eq!(rel_error(&[0.0], &[0.0]), 0.0);
}
