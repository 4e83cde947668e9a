//! Partition invariants (property tests): every sample goes to exactly one client, the
//! sizes add up, and the Dirichlet split gives each client's test part the client's
//! own class prior.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fibecfed_data::PartitionConfig;
use fibecfed_data::{apportion, partition};
use proptest::prelude::*;

fn exactly_once(parts: &[Vec<usize>], n: usize) -> bool {
    let mut seen = vec![0u32; n];
    for p in parts {
        for &i in p {
            seen[i] += 1;
        }
    }
    seen.iter().all(|&c| c == 1)
}

fn configs() -> impl Strategy<Value = PartitionConfig> {
    prop_oneof![
        Just(PartitionConfig::Iid {}),
        (0.05f64..10.0, 0.05f64..10.0).prop_map(|(alpha, size_concentration)| {
            PartitionConfig::Dirichlet {
                alpha,
                size_concentration,
            }
        }),
        (1usize..4).prop_map(|shards_per_client| PartitionConfig::Shards { shards_per_client }),
    ]
}

proptest! {
    #[test]
    fn every_sample_goes_to_exactly_one_client(
        config in configs(),
        train in prop::collection::vec(0usize..3, 0..200),
        test in prop::collection::vec(0usize..3, 0..80),
        clients in 1usize..20,
        seed in any::<u64>(),
    ) {
        let p = partition(&config, &train, &test, 3, clients, seed).unwrap();
        prop_assert_eq!(p.train.len(), clients);
        prop_assert_eq!(p.test.len(), clients);
        prop_assert!(exactly_once(&p.train, train.len()));
        prop_assert!(exactly_once(&p.test, test.len()));
        // Same seed, same split.
        prop_assert_eq!(p, partition(&config, &train, &test, 3, clients, seed).unwrap());
    }

    #[test]
    fn apportion_sums_exactly(shares in prop::collection::vec(0.0f64..1.0, 1..30), n in 0usize..10_000) {
        let sizes = apportion(&shares, n);
        let total: f64 = shares.iter().sum();
        if total > 0.0 {
            prop_assert_eq!(sizes.iter().sum::<usize>(), n);
            for (s, w) in sizes.iter().zip(&shares) {
                let exact = w / total * n as f64;
                prop_assert!((*s as f64 - exact).abs() < 1.0 + 1e-9);
            }
        }
    }
}

#[test]
fn iid_sizes_differ_by_at_most_one() {
    let labels = vec![0usize; 103];
    let p = partition(&PartitionConfig::Iid {}, &labels, &labels, 1, 10, 1).unwrap();
    let sizes: Vec<usize> = p.train.iter().map(Vec::len).collect();
    assert!(
        sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
        "{sizes:?}"
    );
}

#[test]
fn dirichlet_test_parts_follow_the_training_prior() {
    // Small α: clients are dominated by one class each; their test parts must agree.
    let train: Vec<usize> = (0..4000).map(|i| i % 2).collect();
    let test: Vec<usize> = (0..4000).map(|i| i % 2).collect();
    let config = PartitionConfig::Dirichlet {
        alpha: 0.1,
        size_concentration: 5.0,
    };
    let p = partition(&config, &train, &test, 2, 5, 3).unwrap();
    let share = |ids: &[usize], labels: &[usize]| {
        ids.iter().filter(|&&i| labels[i] == 1).count() as f64 / ids.len().max(1) as f64
    };
    let mut agree = 0;
    for (tr, te) in p.train.iter().zip(&p.test) {
        if tr.len() > 100 && te.len() > 100 && (share(tr, &train) - share(te, &test)).abs() < 0.25 {
            agree += 1;
        }
    }
    // Classes run out as clients draw, so the last clients may drift: most agree.
    assert!(
        agree >= 3,
        "{agree} of 5 clients have test parts like their training parts"
    );
}

#[test]
fn bad_labels_are_refused() {
    let err = partition(&PartitionConfig::Iid {}, &[0, 5], &[0], 2, 2, 1).unwrap_err();
    assert!(err.to_string().contains("label id 5"), "{err}");
}
