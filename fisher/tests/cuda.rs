//! The GPU path against the CPU path.
//!
//! - `fibecfed_kernels::reference` (the f64 reference every GPU test compares with) is
//!   itself checked against this crate's `site_fisher` in f64 on random inputs: full,
//!   right-padded and holed masks with weights other than 1, products given or formed.
//!   Both are f64 with different summation orders: 1e-12 relative.
//! - `CudaBackend` against `CpuBackend` on the same rows, strided views included, and the
//!   same shape errors: 1e-5 relative (f32 GPU vs f64 CPU, as the kernels' own tests).
//!   Needs a GPU; without one it prints "skipped: …" and returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fibecfed_fisher::{
    CpuBackend, CudaBackend, FisherBackend, FisherError, GpuMode, KernelError, KernelShapeError,
    Products, SiteRows, site_fisher,
};
use fibecfed_kernels::reference::{self, LoraData, MaskKind, SplitMix64, bounded_error, time_seed};
use fibecfed_kernels::{LoraShape, gpu_for_test};
use ndarray::{Array1, Array2, ArrayView2};

fn to_f64(v: &[f32], rows: usize, cols: usize) -> Array2<f64> {
    Array2::from_shape_vec((rows, cols), v.iter().map(|&x| f64::from(x)).collect()).unwrap()
}

fn flat(a: &Array2<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

/// Shapes of every kind the encoder produces and a few odd ones; the last three put
/// several tiles in each factor (so the site kernel's last-block reductions run) and a
/// rank above 64.
const SHAPES: [(usize, usize, usize, usize, usize); 8] = [
    (1, 1, 1, 1, 1),
    (3, 7, 40, 33, 5),
    (4, 12, 16, 24, 8),
    (2, 9, 30, 11, 17),
    (5, 4, 3, 50, 2),
    (3, 7, 300, 200, 8),
    (6, 11, 384, 384, 16),
    (2, 9, 90, 70, 80),
];

fn shape((batch, seq_len, d_in, d_out, rank): (usize, usize, usize, usize, usize)) -> LoraShape {
    LoraShape {
        batch,
        seq_len,
        d_in,
        d_out,
        rank,
    }
}

#[test]
fn kernels_reference_matches_site_fisher() {
    let seed = time_seed();
    let mut rng = SplitMix64::new(seed);
    for dims in SHAPES {
        for kind in [MaskKind::Full, MaskKind::Padded, MaskKind::Holes] {
            let data = LoraData::random(shape(dims), kind, &mut rng);
            let s = data.shape;
            let n = s.batch * s.seq_len;
            let x = to_f64(&data.x, n, s.d_in);
            let delta = to_f64(&data.delta, n, s.d_out);
            let mask = Array1::from_iter(data.mask.iter().map(|&m| f64::from(m)));
            let a = to_f64(&data.a, s.rank, s.d_in);
            let b = to_f64(&data.b, s.d_out, s.rank);
            let u = to_f64(&data.u, n, s.rank);
            let db = to_f64(&data.db, n, s.rank);
            for with_products in [false, true] {
                let rows = SiteRows {
                    x: x.view(),
                    delta: delta.view(),
                    mask: mask.view(),
                    batch: s.batch,
                    seq_len: s.seq_len,
                    a: a.view(),
                    b: b.view(),
                    scale: f64::from(data.scale),
                    products: with_products.then(|| Products {
                        u: u.view(),
                        db: db.view(),
                    }),
                };
                let cpu = site_fisher(&rows).unwrap();
                let reference = reference::lora_site(&data.inputs(with_products)).unwrap();
                let what = format!("seed {seed}, {s:?}, {kind:?}, products {with_products}");
                for (name, got, want) in [
                    ("sq_a", cpu.sq_a.clone(), &reference.sq_a),
                    ("sq_b", cpu.sq_b.clone(), &reference.sq_b),
                    ("diag_a", flat(&cpu.diag_a), &reference.diag_a),
                    ("diag_b", flat(&cpu.diag_b), &reference.diag_b),
                ] {
                    let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
                    let norm: f64 = want.iter().map(|w| w * w).sum();
                    assert_eq!(got.len(), want.len(), "{name}: {what}");
                    assert!(
                        diff.sqrt() <= 1e-12 * norm.sqrt().max(1e-300),
                        "{name}: {got:?} vs {want:?} ({what})"
                    );
                }
            }
        }
    }
}

/// Rows of `data` in f32, the A input given as a transposed copy viewed back (strided),
/// so that the backend's contiguity handling is exercised.
fn check_backend(gpu: &CudaBackend, data: &LoraData, with_products: bool, seed: u64, tol: f64) {
    let s = data.shape;
    let n = s.batch * s.seq_len;
    let arr = |v: &[f32], r, c| Array2::from_shape_vec((r, c), v.to_vec()).unwrap();
    let x = arr(&data.x, n, s.d_in);
    let delta = arr(&data.delta, n, s.d_out);
    let mask = Array1::from_vec(data.mask.clone());
    let a_t = arr(&data.a, s.rank, s.d_in)
        .t()
        .as_standard_layout()
        .into_owned();
    let a: ArrayView2<'_, f32> = a_t.t();
    let b = arr(&data.b, s.d_out, s.rank);
    let u = arr(&data.u, n, s.rank);
    let db = arr(&data.db, n, s.rank);
    let rows = SiteRows {
        x: x.view(),
        delta: delta.view(),
        mask: mask.view(),
        batch: s.batch,
        seq_len: s.seq_len,
        a,
        b: b.view(),
        scale: data.scale,
        products: with_products.then(|| Products {
            u: u.view(),
            db: db.view(),
        }),
    };
    let got = gpu.site(&rows).unwrap();
    // The second call reuses the first one's device buffers and pinned staging (and the
    // counters its last blocks reset): it must give the same bits.
    let again = gpu.site(&rows).unwrap();
    assert!(
        got.sq_a == again.sq_a
            && got.sq_b == again.sq_b
            && got.diag_a == again.diag_a
            && got.diag_b == again.diag_b,
        "a repeated call differs (seed {seed}, {s:?})"
    );
    let want = reference::lora_site(&data.inputs(with_products)).unwrap();
    // Errors relative to the size of the summed terms (the reference on the inputs'
    // magnitudes), entry by entry: cancellation cannot make a correct result fail.
    let bound = reference::lora_site(&data.magnitudes().inputs(with_products)).unwrap();
    let what = format!("seed {seed}, {s:?}, products {with_products}");
    for (name, g, w, b) in [
        ("sq_a", got.sq_a.clone(), &want.sq_a, &bound.sq_a),
        ("sq_b", got.sq_b.clone(), &want.sq_b, &bound.sq_b),
        (
            "diag_a",
            got.diag_a.iter().copied().collect(),
            &want.diag_a,
            &bound.diag_a,
        ),
        (
            "diag_b",
            got.diag_b.iter().copied().collect(),
            &want.diag_b,
            &bound.diag_b,
        ),
    ] {
        let err = bounded_error(&g, w, b);
        assert!(
            err <= tol,
            "{name}: error {err:e} of its terms' size ({what})"
        );
    }
    assert_eq!(got.diag_a.dim(), (s.rank, s.d_in));
    assert_eq!(got.diag_b.dim(), (s.d_out, s.rank));
    // The CPU backend's layout, element for element.
    let cpu = CpuBackend.site(&rows).unwrap();
    assert_eq!(cpu.diag_a.dim(), got.diag_a.dim());
    assert_eq!(cpu.diag_b.dim(), got.diag_b.dim());
}

#[test]
fn cuda_backend_matches_the_cpu_backend() {
    let test = "cuda_backend_matches_the_cpu_backend";
    if gpu_for_test(test).is_none() {
        return;
    }
    let gpu = CudaBackend::new(GpuMode::Fp32).unwrap();
    let seed = time_seed();
    let mut rng = SplitMix64::new(seed);
    // Twice over the shapes, the second time in reverse: it finds the last shapes' jobs
    // kept by the first round (8 are kept; other shapes ran in between), with new inputs
    // staged through the pinned buffer.
    for round in 0..2 {
        let order: Vec<_> = if round == 0 {
            SHAPES.to_vec()
        } else {
            SHAPES.iter().rev().copied().collect()
        };
        for dims in order {
            for kind in [MaskKind::Padded, MaskKind::Holes] {
                let mut data = LoraData::random(shape(dims), kind, &mut rng);
                // NaN and ±Inf in the rows the kernels must not read.
                data.poison_masked_rows();
                for with_products in [false, true] {
                    check_backend(&gpu, &data, with_products, seed, 1e-5);
                }
            }
        }
    }
}

/// tf32 through the backend, within its documented error (2e-3, as the kernels' tests),
/// with and without the products handed in.
#[test]
fn cuda_backend_in_tf32() {
    let test = "cuda_backend_in_tf32";
    let Some(kernels) = gpu_for_test(test) else {
        return;
    };
    if !kernels.supports(GpuMode::Tf32) {
        // Past the harness's capture: a skip is never silent.
        let line = format!("skipped: {test}: {} has no tf32\n", kernels.device_name());
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
        return;
    }
    let gpu = CudaBackend::new(GpuMode::Tf32).unwrap();
    let seed = time_seed();
    let mut rng = SplitMix64::new(seed);
    for dims in SHAPES {
        let mut data = LoraData::random(shape(dims), MaskKind::Holes, &mut rng);
        data.poison_masked_rows();
        for with_products in [false, true] {
            check_backend(&gpu, &data, with_products, seed, 2e-3);
        }
    }
}

/// Shapes the CPU backend refuses, the GPU backend refuses with the same message.
#[test]
fn cuda_backend_refuses_what_the_cpu_backend_refuses() {
    let test = "cuda_backend_refuses_what_the_cpu_backend_refuses";
    if gpu_for_test(test).is_none() {
        return;
    }
    let gpu = CudaBackend::new(GpuMode::Fp32).unwrap();
    let x = Array2::<f32>::ones((6, 4));
    let delta = Array2::<f32>::ones((5, 3));
    let mask = Array1::<f32>::ones(6);
    let a = Array2::<f32>::ones((2, 4));
    let b = Array2::<f32>::ones((3, 2));
    let rows = SiteRows {
        x: x.view(),
        delta: delta.view(),
        mask: mask.view(),
        batch: 2,
        seq_len: 3,
        a: a.view(),
        b: b.view(),
        scale: 1.0,
        products: None,
    };
    let cpu = CpuBackend.site(&rows).unwrap_err();
    assert!(
        matches!(&cpu, FisherError::Shape { tensor, expected, found, .. }
            if tensor == "δ" && *expected == [6, 3] && *found == [5, 3]),
        "{cpu:?}"
    );
    assert_eq!(gpu.site(&rows).unwrap_err(), cpu);
}

/// Without a GPU, asking for the backend is an error that says why, not a panic.
#[test]
fn no_gpu_means_an_error_with_a_reason() {
    match CudaBackend::new(GpuMode::Fp32) {
        Ok(gpu) => eprintln!("GPU present: {}", gpu.device_name()),
        Err(why) => assert!(!why.to_string().is_empty()),
    }
}

/// A kernel error keeps its variant and fields inside [`FisherError::Device`], and its
/// message after "GPU: ".
#[test]
fn kernel_errors_keep_their_fields_in_fisher_errors() {
    let shape = KernelShapeError::TooLarge {
        dim: "d_in",
        value: 1 << 31,
        limit: i32::MAX as usize,
    };
    let e = FisherError::from(KernelError::Shape(shape.clone()));
    assert!(matches!(&e, FisherError::Device(KernelError::Shape(s)) if *s == shape));
    assert_eq!(e.to_string(), format!("GPU: shapes: {shape}"));
    let e = FisherError::from(KernelError::NoDriver);
    assert_eq!(e.to_string(), "GPU: no CUDA driver (libcuda not found)");
}
