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
//! than what was folded are dropped as late.

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
    /// Runs starting at or before this were folded (0: none).
    run_floor: u64,
    /// Deltas ending at or before this were folded (0: none).
    delta_floor: u64,
}

impl<T> Default for Accum<T> {
    fn default() -> Self {
        Self { runs: BTreeMap::new(), deltas: BTreeMap::new(), folded: None, run_floor: 0, delta_floor: 0 }
    }
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
            if let Some((start, run)) = self.runs.pop_first() {
                add_into(&mut self.folded, &run.point);
                self.run_floor = self.run_floor.max(start);
            }
        }
        while self.deltas.len() > MAX_DELTAS {
            if let Some((time, point)) = self.deltas.pop_first() {
                add_into(&mut self.folded, &point);
                self.delta_floor = self.delta_floor.max(time);
            }
        }
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

    /// The newest observation time.
    pub fn last_time(&self) -> u64 {
        let runs = self.runs.values().map(|r| r.time).max().unwrap_or(0);
        let deltas = self.deltas.keys().next_back().copied().unwrap_or(0);
        runs.max(deltas)
    }

    /// Joins what another observer (a replica, a checkpoint) saw of the same
    /// source: runs keep their newest point, deltas are unioned. Idempotent,
    /// commutative and associative while nothing is folded; once folding
    /// happened, the side that folded more wins the folded part.
    pub fn join(&mut self, other: &Accum<T>) {
        let mine = (self.run_floor, self.delta_floor);
        let theirs = (other.run_floor, other.delta_floor);
        let take_theirs = match theirs.cmp(&mine) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => match (&self.folded, &other.folded) {
                (None, Some(_)) => true,
                (Some(a), Some(b)) => b.rank(a).is_gt(),
                _ => false,
            },
        };
        if take_theirs {
            self.folded = other.folded.clone();
            self.run_floor = other.run_floor;
            self.delta_floor = other.delta_floor;
        }
        for (start, run) in &other.runs {
            match self.runs.get_mut(start) {
                None => {
                    self.runs.insert(*start, run.clone());
                }
                Some(mine) => {
                    if run.time > mine.time || (run.time == mine.time && run.point.rank(&mine.point).is_gt()) {
                        *mine = run.clone();
                    }
                }
            }
        }
        for (time, point) in &other.deltas {
            match self.deltas.get_mut(time) {
                None => {
                    self.deltas.insert(*time, point.clone());
                }
                Some(mine) => {
                    if point.rank(mine).is_gt() {
                        *mine = point.clone();
                    }
                }
            }
        }
        let (run_floor, delta_floor) = (self.run_floor, self.delta_floor);
        if run_floor > 0 {
            self.runs.retain(|start, _| *start == 0 || *start > run_floor);
        }
        self.deltas.retain(|time, _| *time > delta_floor);
        self.compact();
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
    fn join_is_idempotent() {
        let mut a = Accum::default();
        a.cumulative(1, 2, 4.0);
        a.delta(9, 1.0);
        let copy = a.clone();
        a.join(&copy);
        assert_eq!(a, copy);
    }
}
