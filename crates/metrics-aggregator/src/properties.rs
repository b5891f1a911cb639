//! Property tests of the merge algebra: combining sources is associative and
//! commutative for every kind; joining observations of one source is
//! associative, commutative and idempotent; cumulative pushes replayed in any
//! order, with duplicates, give the same fleet counter. Values are small
//! integers so that floating-point sums are exact.

use proptest::prelude::*;

use crate::accum::{Accum, MAX_RUNS};
use crate::exponential::{Buckets, ExpHistogram};
use crate::histogram::Histogram;
use crate::merge::{Additive, CountSum, Level, Merged, Policy};

fn int() -> impl Strategy<Value = f64> {
    (0u32..1_000_000).prop_map(f64::from)
}

fn level() -> impl Strategy<Value = Merged> {
    (1u64..50, int()).prop_map(|(time, value)| Merged::Level(Level { time, value }))
}

fn histogram() -> impl Strategy<Value = Merged> {
    proptest::collection::vec(0u64..1000, 4).prop_map(|counts| {
        let count = counts.iter().sum();
        Merged::Histogram(
            Histogram::new(vec![0.1, 1.0, 10.0], counts, count, count as f64).unwrap_or_else(|e| panic!("{e}")),
        )
    })
}

fn exponential() -> impl Strategy<Value = Merged> {
    (-2i32..6, -400i32..400, proptest::collection::vec(0u64..100, 0..40), 0u64..5).prop_map(
        |(scale, offset, counts, zero_count)| {
            let count = counts.iter().sum::<u64>() + zero_count;
            let positive = Buckets { offset, counts };
            Merged::Exponential(
                ExpHistogram::new(scale, zero_count, 0.0, positive, Buckets::default(), count, count as f64)
                    .unwrap_or_else(|e| panic!("{e}")),
            )
        },
    )
}

fn summary() -> impl Strategy<Value = Merged> {
    (0u64..1000, int()).prop_map(|(count, sum)| Merged::Summary(CountSum { count, sum }))
}

fn any_kind() -> impl Strategy<Value = (Merged, Merged, Merged)> {
    prop_oneof![
        (int(), int(), int()).prop_map(|(a, b, c)| (Merged::Counter(a), Merged::Counter(b), Merged::Counter(c))),
        (level(), level(), level()),
        (histogram(), histogram(), histogram()),
        (exponential(), exponential(), exponential()),
        (summary(), summary(), summary()),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![Just(Policy::Last), Just(Policy::Sum), Just(Policy::Min), Just(Policy::Max)]
}

fn combined(a: &Merged, b: &Merged, policy: Policy) -> Merged {
    let mut out = a.clone();
    out.combine(b, policy);
    out
}

/// A run of cumulative points: (start, [(time, value)]) with values growing.
fn accum() -> impl Strategy<Value = Accum<f64>> {
    proptest::collection::vec((1u64..6, 1u64..20, 0u32..1000), 0..12).prop_map(|points| {
        let mut a = Accum::default();
        for (start, time, value) in points {
            // Within a run, a later time has a larger value (monotonic).
            a.cumulative(start, start * 100 + time, f64::from(value) + (time as f64) * 1000.0);
        }
        a
    })
}

proptest! {
    #[test]
    fn combining_sources_is_commutative((a, b, _) in any_kind(), policy in policy()) {
        prop_assert_eq!(combined(&a, &b, policy), combined(&b, &a, policy));
    }

    #[test]
    fn combining_sources_is_associative((a, b, c) in any_kind(), policy in policy()) {
        let left = combined(&combined(&a, &b, policy), &c, policy);
        let right = combined(&a, &combined(&b, &c, policy), policy);
        prop_assert_eq!(left, right);
    }

    #[test]
    fn merged_exponential_histograms_keep_every_point(a in exponential(), b in exponential()) {
        let (Merged::Exponential(x), Merged::Exponential(y)) = (&a, &b) else { unreachable!() };
        let mut m = x.clone();
        m.add(y);
        let buckets: u64 = m.positive.counts.iter().sum::<u64>() + m.zero_count;
        prop_assert_eq!(m.count, x.count + y.count);
        prop_assert_eq!(buckets, m.count);
        prop_assert!(m.scale <= x.scale.min(y.scale));
    }

    #[test]
    fn joining_observations_is_commutative_associative_and_idempotent(a in accum(), b in accum(), c in accum()) {
        let join = |x: &Accum<f64>, y: &Accum<f64>| { let mut z = x.clone(); z.join(y); z };
        prop_assert_eq!(join(&a, &b), join(&b, &a));
        prop_assert_eq!(join(&join(&a, &b), &c), join(&a, &join(&b, &c)));
        prop_assert_eq!(join(&a, &a), a.clone());
    }

    #[test]
    fn cumulative_pushes_replayed_in_any_order_give_the_same_counter(
        runs in proptest::collection::vec(proptest::collection::vec(0u32..100, 1..8), 1..=MAX_RUNS),
        order in any::<proptest::sample::Index>(),
        seed in any::<u64>(),
    ) {
        // Each run (a process lifetime) pushes its growing cumulative value.
        let mut pushes = Vec::new();
        let mut expected = 0.0;
        for (r, increments) in runs.iter().enumerate() {
            let start = (r as u64 + 1) * 1_000;
            let mut value = 0.0;
            for (i, inc) in increments.iter().enumerate() {
                value += f64::from(*inc);
                pushes.push((start, start + i as u64 + 1, value));
            }
            expected += value;
        }
        // Replay: duplicate some pushes, then shuffle deterministically.
        let extra = pushes[order.index(pushes.len())];
        pushes.push(extra);
        let mut state = seed;
        for i in (1..pushes.len()).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            pushes.swap(i, (state >> 33) as usize % (i + 1));
        }
        let mut a = Accum::default();
        for (start, time, value) in pushes {
            a.cumulative(start, time, value);
        }
        prop_assert_eq!(a.total(), Some(expected));
    }
}
