//! Per-sample gradient squares and diagonal sums against per-sample gradients formed
//! explicitly, element by element, in f64: shapes include r = 1, one token, one
//! sample, right padding and masks with holes, batches that span several parallel
//! tasks, and widths on both sides of the ghost/materialise switch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fibecfed_fisher::{
    FisherError, NormMethod, Products, SiteRows, head_fisher, site_fisher, sq_norms,
};
use ndarray::{Array1, Array2};
use proptest::prelude::*;

#[derive(Debug)]
struct Case {
    x: Array2<f64>,
    delta: Array2<f64>,
    mask: Array1<f64>,
    a: Array2<f64>,
    b: Array2<f64>,
    batch: usize,
    seq: usize,
    scale: f64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..11,
        1usize..6,
        1usize..9,
        1usize..9,
        1usize..4,
        -2.0f64..2.0,
    )
        .prop_flat_map(|(batch, seq, d_in, d_out, r, scale)| {
            let n = batch * seq;
            (
                proptest::collection::vec(-1.0f64..1.0, n * d_in),
                proptest::collection::vec(-1.0f64..1.0, n * d_out),
                proptest::collection::vec(1usize..=seq, batch),
                // Some cases get holes in the mask instead of right padding.
                proptest::option::of(proptest::collection::vec(any::<bool>(), n)),
                proptest::collection::vec(-1.0f64..1.0, r * d_in),
                proptest::collection::vec(-1.0f64..1.0, d_out * r),
            )
                .prop_map(move |(x, delta, lengths, holes, a, b)| {
                    let mut mask = Array1::zeros(n);
                    for (i, &len) in lengths.iter().enumerate() {
                        for t in 0..len {
                            mask[i * seq + t] = 1.0;
                        }
                    }
                    if let Some(keep) = holes {
                        mask = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
                    }
                    Case {
                        x: Array2::from_shape_vec((n, d_in), x).unwrap(),
                        delta: Array2::from_shape_vec((n, d_out), delta).unwrap(),
                        mask,
                        a: Array2::from_shape_vec((r, d_in), a).unwrap(),
                        b: Array2::from_shape_vec((d_out, r), b).unwrap(),
                        batch,
                        seq,
                        scale,
                    }
                })
        })
}

/// Per-sample ∂A and ∂B by the definition, with explicit loops.
fn reference(c: &Case) -> (Vec<Array2<f64>>, Vec<Array2<f64>>) {
    let (r, d_in) = c.a.dim();
    let d_out = c.b.nrows();
    let (mut ga, mut gb) = (Vec::new(), Vec::new());
    for i in 0..c.batch {
        let mut da = Array2::zeros((r, d_in));
        let mut db = Array2::zeros((d_out, r));
        for t in 0..c.seq {
            let row = i * c.seq + t;
            if c.mask[row] == 0.0 {
                continue;
            }
            for k in 0..r {
                let u: f64 = (0..d_in).map(|j| c.a[[k, j]] * c.x[[row, j]]).sum();
                let v: f64 = c.scale
                    * (0..d_out)
                        .map(|o| c.b[[o, k]] * c.delta[[row, o]])
                        .sum::<f64>();
                for j in 0..d_in {
                    da[[k, j]] += v * c.x[[row, j]];
                }
                for o in 0..d_out {
                    db[[o, k]] += c.scale * c.delta[[row, o]] * u;
                }
            }
        }
        ga.push(da);
        gb.push(db);
    }
    (ga, gb)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-10 * (1.0 + b.abs())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn squares_and_diagonals_equal_materialised_gradients(c in case()) {
        // Without products, and with x·Aᵀ, δ·B handed in as the encoder does.
        let (u, db) = (c.x.dot(&c.a.t()), c.delta.dot(&c.b));
        let plain = SiteRows { x: c.x.view(), delta: c.delta.view(), mask: c.mask.view(), batch: c.batch, seq_len: c.seq, a: c.a.view(), b: c.b.view(), scale: c.scale, products: None };
        let given = SiteRows { products: Some(Products { u: u.view(), db: db.view() }), ..plain };
        let (ga, gb) = reference(&c);
        for rows in [plain, given] {
            let want_a: Vec<f64> = ga.iter().map(|g| g.iter().map(|v| v * v).sum()).collect();
            let want_b: Vec<f64> = gb.iter().map(|g| g.iter().map(|v| v * v).sum()).collect();
            for method in [NormMethod::Ghost, NormMethod::Materialize, NormMethod::Auto] {
                let (sa, sb) = sq_norms(&rows, method).unwrap();
                for i in 0..c.batch {
                    prop_assert!(close(sa[i], want_a[i]), "{method:?} sample {i}: ‖∂A‖² {} vs {}", sa[i], want_a[i]);
                    prop_assert!(close(sb[i], want_b[i]), "{method:?} sample {i}: ‖∂B‖² {} vs {}", sb[i], want_b[i]);
                }
            }
            let f = site_fisher(&rows).unwrap();
            for i in 0..c.batch {
                prop_assert!(close(f.sq_a[i], want_a[i]) && close(f.sq_b[i], want_b[i]));
            }
            let diag_a = ga.iter().fold(Array2::<f64>::zeros(c.a.raw_dim()), |acc, g| acc + g.mapv(|v| v * v));
            let diag_b = gb.iter().fold(Array2::<f64>::zeros(c.b.raw_dim()), |acc, g| acc + g.mapv(|v| v * v));
            for (got, want) in f.diag_a.iter().zip(diag_a.iter()).chain(f.diag_b.iter().zip(diag_b.iter())) {
                prop_assert!(close(*got, *want), "diagonal {got} vs {want}");
            }
        }
    }
}

#[test]
fn head_squares_match_outer_products() {
    let pooled = ndarray::array![[1.0_f64, 2.0, -1.0], [0.5, 0.0, 3.0]];
    let dlogits = ndarray::array![[0.2_f64, -0.2], [-0.7, 0.7]];
    let h = head_fisher(pooled.view(), dlogits.view()).unwrap();
    for i in 0..2 {
        let gw = dlogits
            .row(i)
            .insert_axis(ndarray::Axis(1))
            .dot(&pooled.row(i).insert_axis(ndarray::Axis(0)));
        assert!(close(h.sq_weight[i], gw.iter().map(|v| v * v).sum()));
        assert!(close(
            h.sq_bias[i],
            dlogits.row(i).iter().map(|v| v * v).sum()
        ));
    }
    assert!(close(
        h.diag_weight[[1, 2]],
        (-0.2_f64).powi(2) + (0.7_f64 * 3.0).powi(2)
    ));
    assert!(close(h.diag_bias[0], 0.04 + 0.49));
}

#[test]
fn mismatched_shapes_are_errors() {
    let x = Array2::<f64>::zeros((4, 3));
    let delta = Array2::<f64>::zeros((4, 2));
    let mask = Array1::<f64>::ones(4);
    let a = Array2::<f64>::zeros((2, 3));
    let b = Array2::<f64>::zeros((2, 1)); // rank 1, A has rank 2
    let rows = SiteRows {
        x: x.view(),
        delta: delta.view(),
        mask: mask.view(),
        batch: 2,
        seq_len: 2,
        a: a.view(),
        b: b.view(),
        scale: 1.0,
        products: None,
    };
    let err = site_fisher(&rows).unwrap_err();
    assert_eq!(
        err,
        FisherError::Shape {
            tensor: "B".into(),
            expected: vec![2, 2],
            found: vec![2, 1],
            meaning: "d_out × the rank of A: ranks differ",
        }
    );
    assert_eq!(
        err.to_string(),
        "Fisher shapes: B has shape [2, 1], expected [2, 2] (d_out × the rank of A: ranks differ)"
    );
    let b2 = Array2::<f64>::zeros((2, 2));
    let short = Array2::<f64>::zeros((3, 2));
    let err = site_fisher(&SiteRows {
        b: b2.view(),
        products: Some(Products {
            u: short.view(),
            db: short.view(),
        }),
        ..rows
    })
    .unwrap_err();
    assert!(
        matches!(&err, FisherError::Shape { tensor, expected, found, .. }
            if tensor == "products x·Aᵀ" && *expected == [4, 2] && *found == [3, 2]),
        "{err:?}"
    );
    let rows = SiteRows {
        b: b2.view(),
        batch: 3,
        ..rows
    };
    let err = sq_norms(&rows, NormMethod::Auto).unwrap_err();
    assert!(
        matches!(&err, FisherError::Shape { tensor, expected, found, .. }
            if tensor == "x" && *expected == [6, 3] && *found == [4, 3]),
        "{err:?}"
    );
    let huge = SiteRows {
        batch: usize::MAX,
        ..rows
    };
    assert_eq!(
        site_fisher(&huge).unwrap_err(),
        FisherError::RowsOverflow {
            batch: usize::MAX,
            seq_len: 2
        }
    );
}

#[test]
fn head_rows_must_match() {
    let pooled = Array2::<f64>::zeros((4, 3));
    let dlogits = Array2::<f64>::zeros((5, 2));
    assert_eq!(
        head_fisher(pooled.view(), dlogits.view()).unwrap_err(),
        FisherError::Shape {
            tensor: "dlogits".into(),
            expected: vec![4, 2],
            found: vec![5, 2],
            meaning: "one row per row of pooled",
        }
    );
}

#[test]
fn diagonal_sums_are_bitwise_the_same_on_any_number_of_threads() {
    let (batch, seq, d_in, d_out, r) = (13, 7, 9, 5, 3);
    let n = batch * seq;
    let wave = |k: usize, f: f64| ((k as f64) * f).sin();
    let x = Array2::from_shape_fn((n, d_in), |(i, j)| wave(i * d_in + j, 0.37) as f32);
    let delta = Array2::from_shape_fn((n, d_out), |(i, j)| wave(i * d_out + j, 0.11) as f32);
    let mask = Array1::from_shape_fn(n, |i| {
        if i % seq < 2 + i / seq % 5 {
            1.0f32
        } else {
            0.0
        }
    });
    let a = Array2::from_shape_fn((r, d_in), |(i, j)| wave(i + 3 * j, 0.5) as f32);
    let b = Array2::from_shape_fn((d_out, r), |(i, j)| wave(2 * i + j, 0.7) as f32);
    let rows = SiteRows {
        x: x.view(),
        delta: delta.view(),
        mask: mask.view(),
        batch,
        seq_len: seq,
        a: a.view(),
        b: b.view(),
        scale: 0.5,
        products: None,
    };
    let on = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| site_fisher(&rows).unwrap())
    };
    let one = on(1);
    for threads in [2, 3, 8] {
        assert_eq!(on(threads), one, "{threads} threads");
    }
}
