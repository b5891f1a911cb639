//! One source's additive series (counter, histogram, exponential histogram,
//! summary) over its life, from cumulative or delta points.
//!
//! A cumulative point belongs to a *run*, named by its start time: a process
//! restart begins a new run. The source's value is the sum over its runs of
//! each run's newest point, plus every distinct delta point. So:
//!
//! - the same cumulative point pushed twice counts once (it is the same
//!   run's same point);
//! - pushes replayed in any order give the same value (a run keeps its
//!   newest point whatever order they arrive in);
//! - a restart never makes the value go backwards (the old run's last point
//!   stays, the new run adds to it);
//! - a run without a start time (`start_time_unix_nano = 0`) is reset when a
//!   newer point is smaller than the run's last one.
//!
//! Memory is bounded: beyond [`MAX_RUNS`] runs or [`MAX_DELTAS`] delta
//! points, the oldest are folded into one `folded` value, and points older
//! than what was folded are dropped as late. Joining two observers that
//! folded differently is idempotent and commutative but depends on the
//! grouping (see [`Accum::join`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::merge::Additive;

/// Runs kept apart per series before the oldest is folded.
pub const MAX_RUNS: usize = 8;
/// Delta points kept apart (for de-duplication) before the oldest is folded.
pub const MAX_DELTAS: usize = 32;

/// A point with the time it was observed (ns since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stamped<T> {
    pub time: u64,
    pub point: T,
}

/// What became of a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// It changed the value.
    Accepted,
    /// Already known (the same or a newer point of its run).
    Duplicate,
    /// Older than what was folded away.
    Late,
}

/// The accumulated state of one additive series of one source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accum<T> {
    /// Run start time → the run's newest point.
    runs: BTreeMap<u64, Stamped<T>>,
    /// Delta end time → the delta point.
    deltas: BTreeMap<u64, T>,
    folded: Option<T>,
    /// How many runs and delta points `folded` holds (absent in checkpoints
    /// written before it existed: 0).
    #[serde(default)]
    folded_points: u64,
    /// Runs starting at or before this were folded (0: none).
    run_floor: u64,
    /// Deltas ending at or before this were folded (0: none).
    delta_floor: u64,
}

impl<T> Default for Accum<T> {
    fn default() -> Self {
        Self {
            runs: BTreeMap::new(),
            deltas: BTreeMap::new(),
            folded: None,
            folded_points: 0,
            run_floor: 0,
            delta_floor: 0,
        }
    }
}

/// How [`Accum::join`] picks one of two folds at the same floors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldOrder {
    /// The larger value (by [`Additive::rank`]): for values that only grow
    /// (counters, histograms), so a join never goes below either side.
    Larger,
    /// The fold of more points, then the larger value: for signed values
    /// (delta up-down counters), where a larger sum may just have missed a
    /// negative delta, so a replica that saw every point keeps its level.
    MorePoints,
}

fn add_into<T: Additive>(slot: &mut Option<T>, point: &T) {
    match slot {
        Some(acc) => acc.add(point),
        None => *slot = Some(point.clone()),
    }
}

impl<T: Additive> Accum<T> {
    /// Applies a cumulative point of the run that started at `start`.
    pub fn cumulative(&mut self, start: u64, time: u64, point: T) -> Applied {
        if start != 0 && start <= self.run_floor {
            return Applied::Late;
        }
        let applied = match self.runs.get_mut(&start) {
            None => {
                self.runs.insert(start, Stamped { time, point });
                Applied::Accepted
            }
            Some(run) if time > run.time || (time == run.time && point.rank(&run.point).is_gt()) => {
                if start == 0 && time > run.time && point.rank(&run.point).is_lt() {
                    // No start time: a smaller newer point means a restart.
                    let old = std::mem::replace(run, Stamped { time, point });
                    add_into(&mut self.folded, &old.point);
                    self.folded_points = self.folded_points.saturating_add(1);
                } else {
                    *run = Stamped { time, point };
                }
                Applied::Accepted
            }
            Some(_) => Applied::Duplicate,
        };
        self.compact();
        applied
    }

    /// Applies a delta point covering `(start, time]`.
    pub fn delta(&mut self, time: u64, point: T) -> Applied {
        if time <= self.delta_floor {
            return Applied::Late;
        }
        let applied = match self.deltas.get_mut(&time) {
            None => {
                self.deltas.insert(time, point);
                Applied::Accepted
            }
            Some(existing) if point.rank(existing).is_gt() => {
                *existing = point;
                Applied::Accepted
            }
            Some(_) => Applied::Duplicate,
        };
        self.compact();
        applied
    }

    fn compact(&mut self) {
        while self.runs.len() > MAX_RUNS {
            // The oldest run with a start time (the one without, if any,
            // keeps its place: it is the process still running).
            let Some(start) = self.runs.keys().copied().find(|s| *s != 0) else {
                break;
            };
            if let Some(run) = self.runs.remove(&start) {
                add_into(&mut self.folded, &run.point);
                self.folded_points = self.folded_points.saturating_add(1);
                self.run_floor = self.run_floor.max(start);
            }
        }
        while self.deltas.len() > MAX_DELTAS {
            if let Some((time, point)) = self.deltas.pop_first() {
                add_into(&mut self.folded, &point);
                self.folded_points = self.folded_points.saturating_add(1);
                self.delta_floor = self.delta_floor.max(time);
            }
        }
    }

    /// Folds this observer's own runs and deltas up to the given floors.
    fn lift(&mut self, run_floor: u64, delta_floor: u64) {
        let kept = self.runs.split_off(&run_floor.saturating_add(1));
        for (start, run) in std::mem::replace(&mut self.runs, kept) {
            if start == 0 {
                self.runs.insert(0, run);
            } else {
                add_into(&mut self.folded, &run.point);
                self.folded_points = self.folded_points.saturating_add(1);
            }
        }
        let kept = self.deltas.split_off(&delta_floor.saturating_add(1));
        for point in std::mem::replace(&mut self.deltas, kept).values() {
            add_into(&mut self.folded, point);
            self.folded_points = self.folded_points.saturating_add(1);
        }
        self.run_floor = self.run_floor.max(run_floor);
        self.delta_floor = self.delta_floor.max(delta_floor);
    }

    /// Whether a point with this key would be new (not replace a kept one).
    pub fn is_new_key(&self, delta: bool, start: u64, time: u64) -> bool {
        if delta { !self.deltas.contains_key(&time) } else { !self.runs.contains_key(&start) }
    }

    /// Checks a state that did not come through this process (a checkpoint):
    /// within the bounds, every point valid and not later than `max_time`.
    ///
    /// # Errors
    ///
    /// What is wrong, in words.
    pub fn check(&self, max_time: u64) -> Result<(), String> {
        if self.runs.len() > MAX_RUNS || self.deltas.len() > MAX_DELTAS {
            return Err(format!("more than {MAX_RUNS} runs or {MAX_DELTAS} delta points"));
        }
        if self.runs.values().any(|r| r.time > max_time) || self.deltas.keys().any(|t| *t > max_time) {
            return Err("a point is stamped in the future".into());
        }
        let mut points = self.runs.values().map(|r| &r.point).chain(self.deltas.values()).chain(self.folded.as_ref());
        points.try_for_each(Additive::check)
    }

    /// Approximate heap bytes (for the store's byte budget).
    pub fn heap_bytes(&self) -> usize {
        const NODE: usize = 48;
        let point = |p: &T| std::mem::size_of::<T>() + NODE + p.heap_bytes();
        self.runs.values().map(|r| point(&r.point) + 8).sum::<usize>()
            + self.deltas.values().map(point).sum::<usize>()
            + self.folded.as_ref().map_or(0, point)
    }

    /// The source's value: folded + every run's newest point + every delta.
    pub fn total(&self) -> Option<T> {
        let mut total = self.folded.clone();
        for run in self.runs.values() {
            add_into(&mut total, &run.point);
        }
        for point in self.deltas.values() {
            add_into(&mut total, point);
        }
        total
    }

    /// Adds the source's value (as [`Accum::total`]) into `slot`, point by
    /// point, without building the total first.
    pub fn add_total_into(&self, slot: &mut Option<T>) {
        for point in self.points_iter() {
            add_into(slot, point);
        }
    }

    /// The newest observation time.
    pub fn last_time(&self) -> u64 {
        let runs = self.runs.values().map(|r| r.time).max().unwrap_or(0);
        let deltas = self.deltas.keys().next_back().copied().unwrap_or(0);
        runs.max(deltas)
    }

    /// Joins what another observer (a replica, a checkpoint) saw of the same
    /// source, keeping the larger of two folds ([`FoldOrder::Larger`]: for
    /// values that only grow). Both sides are first brought to the same
    /// floors by folding their own runs and deltas up to the higher floor of
    /// the two; then one fold is kept, runs keep their newest point and
    /// deltas are unioned.
    ///
    /// For all inputs (property-tested in `properties.rs` with up to 30
    /// restarts and random partitions): idempotent, commutative, joining a
    /// state already joined changes nothing, and for values that only grow
    /// the total is never below either side's nor above the truth.
    /// Associative when the sides agree on the floors (the case once
    /// replicas have exchanged snapshots); across folding the grouping can
    /// change the value, because a fold keeps one sum and a bounded state
    /// cannot remember which run contributed what (see
    /// `joins_across_folding_depend_on_grouping_but_never_go_backwards`).
    pub fn join(&mut self, other: &Accum<T>) {
        self.join_by(other, FoldOrder::Larger);
    }

    /// [`Accum::join`], picking between the two folds by `order`
    /// ([`FoldOrder::MorePoints`] for signed values: a replica that saw every
    /// point keeps its exact value whatever partial state it joins).
    pub fn join_by(&mut self, other: &Accum<T>, order: FoldOrder) {
        let run_floor = self.run_floor.max(other.run_floor);
        let delta_floor = self.delta_floor.max(other.delta_floor);
        let mut theirs = other.clone();
        self.lift(run_floor, delta_floor);
        theirs.lift(run_floor, delta_floor);
        let take_theirs = match (&self.folded, &theirs.folded) {
            (None, Some(_)) => true,
            (Some(a), Some(b)) => match order {
                // Equal folds: the one that took in more points, so the
                // join stays commutative in what it keeps.
                FoldOrder::Larger => b.rank(a).then(theirs.folded_points.cmp(&self.folded_points)).is_gt(),
                FoldOrder::MorePoints => theirs.folded_points.cmp(&self.folded_points).then_with(|| b.rank(a)).is_gt(),
            },
            _ => false,
        };
        if take_theirs {
            self.folded = theirs.folded;
            self.folded_points = theirs.folded_points;
        }
        for (start, run) in theirs.runs {
            match self.runs.get_mut(&start) {
                None => {
                    self.runs.insert(start, run);
                }
                Some(mine) => {
                    if run.time > mine.time || (run.time == mine.time && run.point.rank(&mine.point).is_gt()) {
                        *mine = run;
                    }
                }
            }
        }
        for (time, point) in theirs.deltas {
            match self.deltas.get_mut(&time) {
                None => {
                    self.deltas.insert(time, point);
                }
                Some(mine) => {
                    if point.rank(mine).is_gt() {
                        *mine = point;
                    }
                }
            }
        }
        self.compact();
    }

    /// Every point kept, to share histogram bounds after a checkpoint load.
    pub fn points_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.runs.values_mut().map(|r| &mut r.point).chain(self.deltas.values_mut()).chain(self.folded.as_mut())
    }

    /// Every point kept.
    pub fn points_iter(&self) -> impl Iterator<Item = &T> {
        self.runs.values().map(|r| &r.point).chain(self.deltas.values()).chain(self.folded.as_ref())
    }

    /// Points kept (for memory accounting).
    pub fn points(&self) -> usize {
        self.runs.len() + self.deltas.len() + usize::from(self.folded.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_cumulative_point_twice_counts_once() {
        let mut a = Accum::default();
        assert_eq!(a.cumulative(100, 200, 5.0), Applied::Accepted);
        assert_eq!(a.cumulative(100, 200, 5.0), Applied::Duplicate);
        assert_eq!(a.cumulative(100, 150, 3.0), Applied::Duplicate);
        assert_eq!(a.total(), Some(5.0));
    }

    #[test]
    fn a_restart_adds_a_run_and_never_goes_backwards() {
        let mut a = Accum::default();
        a.cumulative(100, 200, 50.0);
        a.cumulative(300, 400, 2.0);
        assert_eq!(a.total(), Some(52.0));
        a.cumulative(300, 500, 7.0);
        assert_eq!(a.total(), Some(57.0));
    }

    #[test]
    fn without_a_start_time_a_drop_is_a_reset() {
        let mut a = Accum::default();
        a.cumulative(0, 1, 10.0);
        a.cumulative(0, 2, 3.0);
        assert_eq!(a.total(), Some(13.0));
    }

    #[test]
    fn deltas_add_up_once_each() {
        let mut a = Accum::default();
        a.delta(10, 1.0);
        a.delta(20, 2.0);
        assert_eq!(a.delta(20, 2.0), Applied::Duplicate);
        assert_eq!(a.total(), Some(3.0));
    }

    #[test]
    fn old_runs_and_deltas_fold_and_memory_stays_bounded() {
        let mut a = Accum::default();
        for i in 1..=100u64 {
            a.cumulative(i, i + 1, 1.0);
            a.delta(1000 + i, 1.0);
        }
        assert_eq!(a.total(), Some(200.0));
        assert!(a.points() <= MAX_RUNS + MAX_DELTAS + 1);
        assert_eq!(a.cumulative(1, 5, 9.0), Applied::Late);
        assert_eq!(a.delta(1001, 9.0), Applied::Late);
    }

    #[test]
    fn replicas_that_folded_different_runs_do_not_go_backwards() {
        // A source restarts 10 times; replica A saw runs 1..=9, B runs 2..=10
        // (partitioned). Each run counted 10 + its number.
        let (mut a, mut b) = (Accum::default(), Accum::default());
        for run in 1..=10u64 {
            let value = 10.0 + run as f64;
            if run <= 9 {
                a.cumulative(run * 100, run * 100 + 50, value);
            }
            if run >= 2 {
                b.cumulative(run * 100, run * 100 + 50, value);
            }
        }
        let (ta, tb) = (a.total().unwrap(), b.total().unwrap());
        let mut joined = a.clone();
        joined.join(&b);
        let total = joined.total().unwrap();
        assert!(total >= ta && total >= tb, "{total} < {ta} or {tb}");
        // Every run's value is there: 10 runs of 10 + n.
        assert_eq!(total, 155.0);
        let mut other = b.clone();
        other.join(&a);
        assert_eq!(other, joined);
    }

    #[test]
    fn joins_across_folding_depend_on_grouping_but_never_go_backwards() {
        // The limit of a bounded state (docs/aggregator.md, "Bounded memory
        // per series"). Runs 1 and 2 count 1 then 5. B saw run 1's last
        // point and run 2's first, C the other way round; A saw neither
        // run's last point and folded both (it saw 8 newer runs).
        let (mut a, mut b, mut c) = (Accum::default(), Accum::default(), Accum::default());
        for run in [1u64, 2] {
            a.cumulative(run * 100, run * 100 + 10, 1.0);
        }
        b.cumulative(100, 120, 5.0);
        b.cumulative(200, 210, 1.0);
        c.cumulative(100, 110, 1.0);
        c.cumulative(200, 220, 5.0);
        for run in 3..=10u64 {
            a.cumulative(run * 100, run * 100 + 10, 0.0);
        }
        let join = |x: &Accum<f64>, y: &Accum<f64>| {
            let mut z = x.clone();
            z.join(y);
            z
        };
        // B and C first: per run the newest point, 5 + 5; then A's fold.
        let right = join(&a, &join(&b, &c));
        assert_eq!(right.total(), Some(10.0));
        // A and B first: B's runs fold into one sum (6), and C's later
        // points of them can only be compared with that sum, not added.
        let left = join(&join(&a, &b), &c);
        assert_eq!(left.total(), Some(6.0));
        // Neither goes below any side (2, 6, 6), nor above the truth (10);
        // the two groupings converge on the larger once they meet.
        assert_eq!(join(&left, &right), right);
        assert_eq!(join(&right, &left), right);
    }

    #[test]
    fn a_checkpoint_written_before_fold_counts_still_decodes() {
        let old = r#"{"runs":{"5":{"time":6,"point":2.0}},"deltas":{},"folded":3.0,"run_floor":4,"delta_floor":0}"#;
        let a: Accum<f64> = serde_json::from_str(old).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.total(), a.folded_points), (Some(5.0), 0));
    }

    #[test]
    fn join_is_idempotent() {
        let mut a = Accum::default();
        a.cumulative(1, 2, 4.0);
        a.delta(9, 1.0);
        let copy = a.clone();
        a.join(&copy);
        assert_eq!(a, copy);
    }
}
