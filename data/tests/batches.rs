//! `length_batches`: the batches hold exactly the ids given, each once, cut in order
//! of length with ties in the given order; proptest over random lengths and orders.
#![allow(clippy::unwrap_used)]

use fibecfed_data::{Sample, length_batches};
use fibecfed_transformer::Encoded;
use proptest::prelude::*;

fn samples(lens: &[usize]) -> Vec<Sample> {
    lens.iter()
        .map(|&n| Sample {
            encoded: Encoded {
                ids: vec![1; n],
                type_ids: vec![0; n],
            },
            label: 0,
        })
        .collect()
}

proptest! {
    #[test]
    fn length_batches_regroup_the_given_ids(
        lens in prop::collection::vec(1usize..40, 1..60),
        seed in any::<u64>(),
        batch in 1usize..9,
    ) {
        let data = samples(&lens);
        // A subset in a scrambled order, as a trainer passes it.
        let mut ids: Vec<usize> = (0..lens.len()).filter(|i| !(i ^ seed as usize).is_multiple_of(3)).collect();
        ids.reverse();
        let batches = length_batches(&data, &ids, batch);
        let flat: Vec<usize> = batches.concat();
        let mut got = flat.clone();
        let mut want = ids.clone();
        got.sort_unstable();
        want.sort_unstable();
        prop_assert_eq!(got, want);
        prop_assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= batch));
        prop_assert!(batches.iter().rev().skip(1).all(|b| b.len() == batch));
        // Non-decreasing lengths; equal lengths keep their order in `ids`.
        for w in flat.windows(2) {
            let (a, b) = (lens[w[0]], lens[w[1]]);
            prop_assert!(a <= b);
            if a == b {
                let pos = |x| ids.iter().position(|&i| i == x).unwrap();
                prop_assert!(pos(w[0]) < pos(w[1]));
            }
        }
    }
}
