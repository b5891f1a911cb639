//! Property tests of the merge algebra: combining sources is associative and
//! commutative for every kind; joining observations of one source is
//! idempotent and commutative, never goes backwards and never invents counts
//! (for any input, across folding with up to 30 restarts), and associative
//! when the sides' fold floors agree; cumulative pushes replayed in any
//! order, with duplicates, give the same fleet counter. Values are small
//! integers so that floating-point sums are exact.

use proptest::prelude::*;

use crate::accum::{Accum, FoldOrder, MAX_RUNS};
use crate::exponential::{Buckets, ExpHistogram};
use crate::histogram::Histogram;
use crate::merge::finite;
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
    (-2i32..6, -200i32..200, proptest::collection::vec(0u64..100, 0..40), 0u64..5).prop_map(
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

    #[test]
    fn replicas_under_many_restarts_and_partitions_never_go_backwards_and_converge(
        runs in proptest::collection::vec(proptest::collection::vec((0u32..50, 0u8..4), 1..6), 1..30),
    ) {
        // One source restarts up to 30 times (far beyond MAX_RUNS); each push
        // reaches replica A, B, both, or both and then they sync (join each
        // other's state), as a partition comes and goes.
        let (mut a, mut b) = (Accum::<f64>::default(), Accum::<f64>::default());
        let mut truth = 0.0;
        let mut time = 0u64;
        for (r, pushes) in runs.iter().enumerate() {
            let start = (r as u64 + 1) * 1_000;
            let mut value = 0.0;
            for (inc, route) in pushes {
                value += f64::from(*inc);
                time += 1;
                if *route != 1 { a.cumulative(start, start + time, value); }
                if *route != 0 { b.cumulative(start, start + time, value); }
                if *route == 3 {
                    let (ta, tb) = (a.total().unwrap_or(0.0), b.total().unwrap_or(0.0));
                    let mut joined = a.clone();
                    joined.join(&b);
                    let mut other = b.clone();
                    other.join(&a);
                    prop_assert_eq!(&joined, &other);
                    let total = joined.total().unwrap_or(0.0);
                    prop_assert!(total >= ta && total >= tb, "{} < {} or {}", total, ta, tb);
                    a = joined;
                    b = other;
                }
            }
            truth += value;
        }
        let mut joined = a.clone();
        joined.join(&b);
        let total = joined.total().unwrap_or(0.0);
        prop_assert!(total <= truth, "{} invented counts (truth {})", total, truth);
        prop_assert!(total >= a.total().unwrap_or(0.0) && total >= b.total().unwrap_or(0.0));
        // Idempotent and stable once exchanged.
        let mut again = joined.clone();
        again.join(&a);
        again.join(&b);
        prop_assert_eq!(again, joined);
    }

    #[test]
    fn joining_is_associative_when_floors_agree(a in folded(), b in folded(), c in folded()) {
        let join = |x: &Accum<f64>, y: &Accum<f64>| { let mut z = x.clone(); z.join(y); z };
        prop_assert_eq!(join(&join(&a, &b), &c), join(&a, &join(&b, &c)));
        prop_assert_eq!(join(&a, &b), join(&b, &a));
        prop_assert_eq!(join(&a, &a), a.clone());
    }

    #[test]
    fn sums_of_any_finite_values_stay_finite(x in any::<f64>(), y in any::<f64>()) {
        let (x, y) = (finite(x), finite(y));
        let mut z = x;
        z.add(&y);
        prop_assert!(z.is_finite());
    }
}

/// States that saw the same 16 runs (values differ: replicas that saw other
/// points of them), so all folded the oldest 8.
fn folded() -> impl Strategy<Value = Accum<f64>> {
    (proptest::collection::vec(0u32..100, 10), proptest::collection::vec(0u32..100, 6)).prop_map(|(early, late)| {
        let mut a = Accum::default();
        for (i, v) in early.iter().enumerate() {
            let start = (i as u64 + 1) * 10;
            a.cumulative(start, start + 5, f64::from(*v));
        }
        // Sixteen runs: eight are folded, every state's floor is run 8.
        for (i, v) in late.iter().enumerate() {
            let start = (i as u64 + 11) * 10;
            a.cumulative(start, start + 5, f64::from(*v));
        }
        a
    })
}

/// Three observers (replicas) of one source that restarts up to 30 times
/// (far beyond [`MAX_RUNS`]): every push reaches a random subset of them
/// (bit `i` of its route and of its run's mask: observer `i`), and after some pushes one
/// observer joins another's state (a sync, as a partition comes and goes).
/// Also the truth: the sum over runs of each run's last value.
fn observers() -> impl Strategy<Value = ([Accum<f64>; 3], f64)> {
    let run = (0u8..8, proptest::collection::vec((0u32..50, 0u8..8, 0u8..12), 1..6));
    proptest::collection::vec(run, 1..30).prop_map(|runs| {
        let mut seen: [Accum<f64>; 3] = Default::default();
        let mut truth = 0.0;
        let mut time = 0u64;
        for (r, (reached, pushes)) in runs.iter().enumerate() {
            let start = (r as u64 + 1) * 1_000;
            let mut value = 0.0;
            for (inc, route, sync) in pushes {
                value += f64::from(*inc);
                time += 1;
                for (i, observer) in seen.iter_mut().enumerate() {
                    // Bit `i` of the run's mask: observer `i` is reachable
                    // during this run at all (whole runs missed).
                    if route & reached & (1 << i) != 0 {
                        observer.cumulative(start, start + time, value);
                    }
                }
                // 0..6: observer `sync / 2` joins the next one's state, or
                // the other way round; 6..12: no sync.
                if *sync < 6 {
                    let (to, from) = (usize::from(sync / 2), usize::from(sync / 2 + 1) % 3);
                    let (to, from) = if sync % 2 == 0 { (to, from) } else { (from, to) };
                    let other = seen[from].clone();
                    seen[to].join(&other);
                }
            }
            truth += value;
        }
        (seen, truth)
    })
}

fn joined(x: &Accum<f64>, y: &Accum<f64>) -> Accum<f64> {
    let mut z = x.clone();
    z.join(y);
    z
}

fn total(x: &Accum<f64>) -> f64 {
    x.total().unwrap_or(0.0)
}

proptest! {
    #[test]
    fn joins_across_folding_are_commutative_idempotent_monotonic_and_sound(([a, b, c], truth) in observers()) {
        for (x, y) in [(&a, &b), (&b, &c), (&a, &c)] {
            let xy = joined(x, y);
            prop_assert_eq!(&xy, &joined(y, x));
            prop_assert_eq!(&joined(x, x), x);
            // Joining what is already known changes nothing.
            prop_assert_eq!(&joined(&xy, x), &xy);
            prop_assert_eq!(&joined(&xy, y), &xy);
            let t = total(&xy);
            prop_assert!(t >= total(x) && t >= total(y), "went backwards: {} < {} or {}", t, total(x), total(y));
            prop_assert!(t <= truth, "{} invented counts (truth {})", t, truth);
        }
        // Any order of three, and again: never backwards, never invented.
        for (x, y, z) in [(&a, &b, &c), (&b, &c, &a), (&c, &a, &b)] {
            let left = joined(&joined(x, y), z);
            let right = joined(x, &joined(y, z));
            for t in [total(&left), total(&right)] {
                prop_assert!(t >= total(x).max(total(y)).max(total(z)));
                prop_assert!(t <= truth);
            }
        }
    }
}

/// Delta points of an up-down counter (negative too), up to 100 of them
/// (beyond `MAX_DELTAS`, so older ones fold), each reaching replica A, B or
/// both; A also sees every one with `all`. Also the true level.
fn delta_replicas() -> impl Strategy<Value = (Accum<f64>, Accum<f64>, f64)> {
    (proptest::collection::vec((-50i32..50, 1u8..4), 1..100), any::<bool>()).prop_map(|(deltas, all)| {
        let (mut a, mut b) = (Accum::default(), Accum::default());
        let mut truth = 0.0;
        for (i, (delta, route)) in deltas.iter().enumerate() {
            let (time, value) = (i as u64 + 1, f64::from(*delta));
            if all || route & 1 != 0 {
                a.delta(time, value);
            }
            if route & 2 != 0 {
                b.delta(time, value);
            }
            truth += value;
        }
        (a, b, if all { truth } else { f64::NAN })
    })
}

proptest! {
    #[test]
    fn delta_up_down_counters_join_across_replicas((a, b, truth) in delta_replicas()) {
        let join = |x: &Accum<f64>, y: &Accum<f64>| { let mut z = x.clone(); z.join_by(y, FoldOrder::MorePoints); z };
        let ab = join(&a, &b);
        prop_assert_eq!(&ab, &join(&b, &a));
        prop_assert_eq!(&join(&a, &a), &a);
        // Joining a snapshot already joined (every checkpoint interval
        // reads them all again) changes nothing.
        prop_assert_eq!(&join(&ab, &b), &ab);
        prop_assert_eq!(&join(&ab, &a), &ab);
        if truth.is_finite() {
            // A saw every delta: whatever B saw, the joined level is true.
            prop_assert_eq!(total(&a), truth);
            prop_assert_eq!(total(&ab), truth, "B's partial fold won: A {}, B {}", total(&a), total(&b));
        }
    }
}
