//! The kernels against the f64 reference, and the checks that need no GPU.
//!
//! GPU tests draw fresh random inputs every run (the seed comes from the clock and is in
//! every failure message), poison every output with NaN before each launch, and cover
//! padded and holed masks and sizes that are multiples of no tile (B = 1, T = 1, d = 1,
//! r = 1, d = 1000, ranks on both sides of the 8/16/64 tile heights). Every output entry
//! (each sample's S, each diagonal entry) is checked on its own, its error measured
//! against the reference computed on the inputs' magnitudes (`reference::bounded_error`:
//! a rounded sum's error is bounded relative to the size of its terms, and cancellation
//! can make the sum itself arbitrarily small). Tolerances: 1e-5 for fp32, 2e-3 for tf32
//! (inputs rounded to 10-bit mantissas: at most (1 + 2⁻¹¹)⁴ − 1 ≈ 1.95e-3 on a squared
//! product term; BENCHMARKS.md). Each also runs twice and must give
//! bitwise-identical results: the reductions have a fixed order, so any difference is a
//! race. Without a GPU, each prints "skipped: <test>: <why>" to stderr and returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fibecfed_kernels::reference::{
    self, DenseData, LoraData, MaskKind, SplitMix64, bounded_error, per_sample_error, rel_error,
    time_seed,
};
use fibecfed_kernels::{
    DenseInputs, DenseShape, GpuFisher, KERNEL_NAMES, KernelError, LoraInputs, LoraProducts,
    LoraShape, MAX_DIM, Mode, ShapeError, compile_ptx, driver_present, gpu_for_test, nvrtc_present,
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

/// Tiny, odd and tile-straddling LoRA shapes (rank 8, 16 and 64 are the tile heights;
/// 80 and 130 put the factors on two and three rows of 64 × 64 tiles).
const LORA_SHAPES: [(usize, usize, usize, usize, usize); 10] = [
    (1, 1, 1, 1, 1),
    (1, 3, 1, 2, 1),
    (3, 7, 1000, 33, 5),
    (5, 37, 130, 67, 8),
    (4, 29, 61, 1000, 9),
    (2, 65, 129, 130, 16),
    (3, 19, 70, 45, 17),
    (2, 33, 200, 96, 64),
    (2, 17, 90, 70, 80),
    (3, 9, 33, 129, 130),
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
    check_lora_grouped(gpu, data, products, mode, seed, None);
}

/// `check_lora` with at most `max_groups` sample groups per factor.
fn check_lora_grouped(
    gpu: &GpuFisher,
    data: &LoraData,
    products: bool,
    mode: Mode,
    seed: u64,
    max_groups: Option<usize>,
) {
    let inputs = data.inputs(products);
    let want = reference::lora_site(&inputs).unwrap();
    let sizes = data.magnitudes();
    let bound = reference::lora_site(&sizes.inputs(products)).unwrap();
    let mut job = gpu.lora_job_with(&inputs, max_groups).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        gpu.poison_lora(&mut job).unwrap();
        gpu.run_lora(&mut job, mode).unwrap();
        runs.push(gpu.read_lora(&job).unwrap());
    }
    let got = &runs[0];
    let what = format!(
        "seed {seed}, {:?}, masked rows {:?}, products given: {products}, {}, plan {:?}",
        data.shape,
        data.mask.iter().filter(|&&m| m == 0.0).count(),
        mode.name(),
        gpu.lora_plan(&job, mode).unwrap(),
    );
    // Entry by entry: a wrong small sample would hide in a norm over the batch.
    for (name, g, w, b) in [
        ("sq_a", &got.sq_a, &want.sq_a, &bound.sq_a),
        ("sq_b", &got.sq_b, &want.sq_b, &bound.sq_b),
        ("diag_a", &got.diag_a, &want.diag_a, &bound.diag_a),
        ("diag_b", &got.diag_b, &want.diag_b, &bound.diag_b),
    ] {
        let err = bounded_error(g, w, b);
        assert!(
            err <= tol(mode),
            "{name}: error {err:e} of its terms' size ({what})"
        );
    }
    assert!(runs[0] == runs[1], "two runs differ: a race ({what})");
}

fn check_dense(gpu: &GpuFisher, data: &DenseData, mode: Mode, seed: u64) {
    let inputs = data.inputs();
    let want = reference::dense_site(&inputs).unwrap();
    let bound = reference::dense_site(&data.magnitudes().inputs()).unwrap();
    let mut job = gpu.dense_job(&inputs).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        gpu.poison_dense(&mut job).unwrap();
        gpu.run_dense(&mut job, mode).unwrap();
        runs.push(gpu.read_dense(&job).unwrap());
    }
    let what = format!("seed {seed}, {:?}, {}", data.shape, mode.name());
    for (name, g, w, b) in [
        ("sq", &runs[0].sq, &want.sq, &bound.sq),
        ("diag", &runs[0].diag, &want.diag, &bound.diag),
    ] {
        let err = bounded_error(g, w, b);
        assert!(
            err <= tol(mode),
            "{name}: error {err:e} of its terms' size ({what})"
        );
    }
    assert!(runs[0] == runs[1], "two runs differ: a race ({what})");
}

/// The GPU and a fresh seed (printed) when the card can run `mode`; otherwise prints
/// why the test is skipped.
fn gpu_in_mode(test: &str, mode: Mode) -> Option<(&'static GpuFisher, u64)> {
    let gpu = gpu_for_test(test)?;
    if !gpu.supports(mode) {
        // Past the harness's capture, as gpu_for_test does: a skip is never silent.
        let line = format!(
            "skipped: {test}: {} cannot run {}\n",
            gpu.device_name(),
            mode.name()
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
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
            let mut data = LoraData::random(lora(b, t, d_in, d_out, r), kind, &mut rng);
            // NaN and ±Inf in every masked row (and so past every sample's length) of
            // x, δ, x·Aᵀ and δ·B: a kernel that read one would fail the comparison.
            data.poison_masked_rows();
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
            let mut data = DenseData::random(dense(b, t, d_in, d_out), kind, &mut rng);
            data.poison_masked_rows();
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

/// Several samples per block: the plan gives small batches one sample per block, so the
/// groups are capped (2 and 1: several samples walked by each block, and the one-group
/// path that writes the diagonal directly), in both modes, products given or formed.
#[test]
fn several_samples_per_block() {
    let test = "several_samples_per_block";
    let Some(gpu) = gpu_for_test(test) else {
        return;
    };
    let seed = time_seed();
    eprintln!("{test}: seed {seed}");
    let mut rng = SplitMix64::new(seed);
    for (b, t, d_in, d_out, r) in [
        (7, 21, 300, 130, 8),
        (5, 40, 65, 70, 16),
        (6, 9, 90, 64, 70),
    ] {
        let mut data = LoraData::random(lora(b, t, d_in, d_out, r), MaskKind::Holes, &mut rng);
        data.poison_masked_rows();
        for mode in [Mode::Fp32, Mode::Tf32]
            .into_iter()
            .filter(|&m| gpu.supports(m))
        {
            for cap in [2, 1] {
                let job = gpu.lora_job_with(&data.inputs(true), Some(cap)).unwrap();
                let plan = gpu.lora_plan(&job, mode).unwrap();
                assert!(plan.iter().all(|&(_, groups)| groups == cap), "{plan:?}");
                for products in [false, true] {
                    check_lora_grouped(gpu, &data, products, mode, seed, Some(cap));
                }
            }
        }
    }
    // A dense layer, several samples per block and several tiles: both reductions.
    let mut data = DenseData::random(dense(7, 13, 150, 70), MaskKind::Holes, &mut rng);
    data.poison_masked_rows();
    for mode in [Mode::Fp32, Mode::Tf32]
        .into_iter()
        .filter(|&m| gpu.supports(m))
    {
        let want = reference::dense_site(&data.inputs()).unwrap();
        let bound = reference::dense_site(&data.magnitudes().inputs()).unwrap();
        for cap in [3, 1] {
            let mut job = gpu.dense_job_with(&data.inputs(), Some(cap)).unwrap();
            gpu.poison_dense(&mut job).unwrap();
            gpu.run_dense(&mut job, mode).unwrap();
            let got = gpu.read_dense(&job).unwrap();
            let what = format!("seed {seed}, dense, {}, at most {cap} groups", mode.name());
            assert!(
                bounded_error(&got.diag, &want.diag, &bound.diag) <= tol(mode),
                "diag ({what})"
            );
            assert!(
                bounded_error(&got.sq, &want.sq, &bound.sq) <= tol(mode),
                "sq ({what})"
            );
        }
    }
}

/// Many launches of one job, every output compared bit for bit with the first launch's:
/// the last-block reductions rely on fences and atomic counters, and a visibility bug
/// would show as a rare difference, which two runs seldom catch. Shapes with many
/// groups and several tiles per factor, in both modes.
#[test]
fn repeated_launches_give_identical_bits() {
    let test = "repeated_launches_give_identical_bits";
    let Some(gpu) = gpu_for_test(test) else {
        return;
    };
    let seed = time_seed();
    eprintln!("{test}: seed {seed}");
    let mut rng = SplitMix64::new(seed);
    let data = LoraData::random(lora(64, 48, 384, 384, 8), MaskKind::Padded, &mut rng);
    for mode in [Mode::Fp32, Mode::Tf32]
        .into_iter()
        .filter(|&m| gpu.supports(m))
    {
        let mut job = gpu.lora_job(&data.inputs(true)).unwrap();
        gpu.run_lora(&mut job, mode).unwrap();
        let first = gpu.read_lora(&job).unwrap();
        let want = reference::lora_site(&data.inputs(true)).unwrap();
        assert!(
            rel_error(&first.diag_a, &want.diag_a) <= tol(mode),
            "seed {seed}"
        );
        for launch in 0..500 {
            gpu.run_lora(&mut job, mode).unwrap();
            let again = gpu.read_lora(&job).unwrap();
            assert!(
                again == first,
                "seed {seed}, {}: launch {launch} differs from the first (plan {:?})",
                mode.name(),
                gpu.lora_plan(&job, mode).unwrap()
            );
        }
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
            limit: MAX_DIM
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
    // A tile's width of headroom below i32::MAX: one past the cap is refused, the cap
    // itself gets as far as the buffer-length check.
    let past = DenseInputs {
        shape: dense(1, 1, MAX_DIM + 1, 1),
        x: &[],
        delta: &[],
        mask: &[],
    };
    assert!(matches!(
        shape_error(past.check()),
        ShapeError::TooLarge { dim: "d_in", .. }
    ));
    let at = DenseInputs {
        shape: dense(1, 1, MAX_DIM, 1),
        x: &[],
        delta: &[],
        mask: &[0.0],
    };
    assert!(matches!(
        shape_error(at.check()),
        ShapeError::Length { buffer: "x", .. }
    ));
    assert!(i32::try_from(MAX_DIM + 256).is_ok());
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

/// NVRTC compiles the sources to PTX for Turing, Ampere, Hopper and Blackwell and to a
/// CUBIN for sm_80, sm_90 and sm_100 (what `GpuFisher` loads first), every binary defines
/// every kernel the host launches, and ptxas reports no spilled registers. Needs libnvrtc
/// (e.g. a pip `nvidia-cuda-nvrtc` wheel's lib folder on LD_LIBRARY_PATH), not a GPU;
/// prints "skipped" without it. The resource report is printed (`--nocapture`).
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
    let version = fibecfed_kernels::nvrtc_version();
    eprintln!("NVRTC {version}");
    // Blackwell (compute_100, sm_100) needs NVRTC 12.8 or later.
    let (major, minor) = version
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .unwrap_or((0, 0));
    let blackwell = (major, minor) >= (12, 8);
    if !blackwell {
        eprintln!("note: NVRTC {version} predates sm_100; compute_100 and sm_100 not compiled");
    }
    let archs = ["compute_75", "compute_80", "compute_90", "compute_100"];
    for arch in archs
        .into_iter()
        .filter(|a| blackwell || !a.ends_with("100"))
    {
        let ptx = compile_ptx(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        for name in KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: no kernel {name}"
            );
        }
        if arch != "compute_75" {
            assert!(ptx.contains("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"));
            // tf32 rounding happens once, when staging: the cvt sits in the loads, so
            // there are far fewer of them than MMAs (the old loop had 16 per 8 MMAs).
            let cvt = ptx.matches("cvt.rna.tf32.f32").count();
            let mma = ptx.matches("mma.sync.aligned").count();
            assert!(cvt < mma, "{arch}: {cvt} cvt.rna for {mma} mma.sync");
        }
    }
    for sm in ["sm_80", "sm_90", "sm_100"]
        .into_iter()
        .filter(|a| blackwell || !a.ends_with("100"))
    {
        let c = fibecfed_kernels::compile(sm).unwrap_or_else(|e| panic!("{sm}: {e}"));
        // An ELF image, not PTX text.
        assert_eq!(&c.bytes[..4], b"\x7fELF", "{sm}: not a CUBIN");
        let report: Vec<&str> = c.log.lines().filter(|l| l.contains("ptxas info")).collect();
        eprintln!("{sm}:\n{}", report.join("\n"));
        for name in KERNEL_NAMES {
            assert!(
                report
                    .iter()
                    .any(|l| l.contains(&format!("Compiling entry function '{name}'"))),
                "{sm}: ptxas compiled no {name}"
            );
        }
        // No kernel keeps anything in local memory (a run-time index into a register
        // array, or a call that is not inlined, shows as a stack size here) or spills
        // (ptxas prints "0 bytes stack frame, ..." for some targets and nothing for
        // others). Each report line is named by the kernel it belongs to.
        let mut kernel = "";
        for line in c.log.lines() {
            if let Some(name) = line.split("Function properties for ").nth(1) {
                kernel = name.trim();
            }
            if line.contains("stack") || line.contains("spill") {
                assert!(
                    (line.contains(" 0 bytes stack frame") || !line.contains("stack frame"))
                        && !line.contains("cumulative stack")
                        && (line.contains("0 bytes spill stores, 0 bytes spill loads")
                            || !line.contains("spill")),
                    "{sm}: {kernel} uses local memory: {line}"
                );
            }
        }
    }
}

/// The Gram identity the bench checks its timed runs with agrees with the reference
/// (both f64, different arithmetic: 1e-12 with the products given; 1e-5 when each forms
/// them, as the Gram path rounds them to f32 like the GPU and the reference keeps f64),
/// on every mask kind; and poisoning the masked rows changes neither (never read).
#[test]
fn gram_identity_matches_the_reference() {
    let seed = time_seed();
    let mut rng = SplitMix64::new(seed);
    for (b, t, d_in, d_out, r) in [(1, 1, 1, 1, 1), (3, 7, 40, 33, 5), (2, 19, 70, 45, 17)] {
        for kind in [MaskKind::Full, MaskKind::Padded, MaskKind::Holes] {
            let mut data = LoraData::random(lora(b, t, d_in, d_out, r), kind, &mut rng);
            let clean = reference::lora_site(&data.inputs(true)).unwrap();
            data.poison_masked_rows();
            for products in [true, false] {
                let want = reference::lora_site(&data.inputs(products)).unwrap();
                let (ga, gb) = reference::lora_gram(&data.inputs(products)).unwrap();
                let tol = if products { 1e-12 } else { 1e-5 };
                for (name, g, w) in [("A", &ga, &want.sq_a), ("B", &gb, &want.sq_b)] {
                    for (x, y) in g.iter().zip(w.iter()) {
                        assert!(
                            (x - y).abs() <= tol * y.abs().max(1e-30),
                            "seed {seed}: {name}: gram {x} vs {y}"
                        );
                    }
                }
                if products {
                    assert_eq!(want, clean, "seed {seed}: a masked row was read");
                }
            }
            let mut dense_data = DenseData::random(dense(b, t, d_in, d_out), kind, &mut rng);
            let clean = reference::dense_site(&dense_data.inputs()).unwrap();
            dense_data.poison_masked_rows();
            let want = reference::dense_site(&dense_data.inputs()).unwrap();
            assert_eq!(want, clean, "seed {seed}: a masked row was read");
            let g = reference::dense_gram(&dense_data.inputs()).unwrap();
            for (x, y) in g.iter().zip(&want.sq) {
                assert!(
                    (x - y).abs() <= 1e-12 * y.abs().max(1e-30),
                    "seed {seed}: {x} vs {y}"
                );
            }
        }
    }
    assert_eq!(per_sample_error(&[1.0, 0.0], &[1.0, 0.0]), 0.0);
    assert_eq!(per_sample_error(&[f32::NAN], &[1.0]), f64::INFINITY);
    assert_eq!(per_sample_error(&[1.5], &[1.0]), 0.5);
    // Errors measured against the terms' size: a cancelled sum (want 0.5 of terms
    // summing to 2 in size) and entries without terms, which must be exact zeros.
    assert_eq!(bounded_error(&[1.0], &[0.5], &[2.0]), 0.25);
    assert_eq!(bounded_error(&[0.0], &[0.0], &[0.0]), 0.0);
    assert_eq!(bounded_error(&[1e-30], &[0.0], &[0.0]), f64::INFINITY);
    assert_eq!(bounded_error(&[f32::NAN], &[1.0], &[1.0]), f64::INFINITY);
    // The magnitudes' reference bounds the reference itself.
    let data = LoraData::random(lora(3, 5, 7, 6, 2), MaskKind::Holes, &mut rng);
    let want = reference::lora_site(&data.inputs(true)).unwrap();
    let bound = reference::lora_site(&data.magnitudes().inputs(true)).unwrap();
    for (w, b) in want.diag_a.iter().zip(&bound.diag_a) {
        assert!(w.abs() <= *b * (1.0 + 1e-12), "seed {seed}: {w} > {b}");
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
