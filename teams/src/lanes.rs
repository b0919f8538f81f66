//! Stage ends of one run committed from this process one unit at a time, and together when
//! they come together.
//!
//! A stage's end is a unit of work on its run's aggregate (the objective's result, the
//! stage completed, the stages that makes ready started; see
//! [`crate::orchestrator::stage_end`]). Parallel stages of a run (a wave of a DAG) end at
//! about the same moment, and two ends decided on the same state of the run race for its
//! next sequence: one commits, the other is refused and decided again once the first has. So
//! a wave's ends used to commit one after another, each after the previous one's answer.
//!
//! Here an end waits while another unit of its run is being committed from this process (its
//! run's lane is busy), and the ends that waited meanwhile are decided together, on the state
//! just committed, and committed as one unit by the end that held the lane: a wave of four
//! ends takes two commits rather than four, and none is refused. An end that finds the lane
//! free commits alone, at once, as before. Ends committed by other processes (or by the
//! orchestrator) still race, and the loser is decided again (see
//! [`factory_commands::store::Store::pause_after_conflict`]).
//!
//! A lane is held by a [`Lead`]; dropped (its task aborted, say), it frees the lane and the
//! ends waiting on it are told nothing: they enter again, and one of them leads.

use factory_domain::RunId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The busy lanes: a run's entry holds the ends waiting for it.
pub(crate) struct Lanes<E, R> {
    busy: Mutex<HashMap<RunId, Vec<Waiting<E, R>>>>,
}

/// An end waiting for its lane, and where its outcome goes.
pub(crate) struct Waiting<E, R> {
    pub end: E,
    pub reply: oneshot::Sender<R>,
}

/// What entering a lane gave.
pub(crate) enum Entered<E, R> {
    /// The lane was free: the caller holds it, and commits its end.
    Lead(Lead<E, R>),
    /// The lane is busy: the holder commits this end with the others that waited, and says
    /// how that went; nothing said (the holder gone), the caller enters again.
    Wait(oneshot::Receiver<R>),
}

/// A run's lane, held.
pub(crate) struct Lead<E, R> {
    lanes: Arc<Lanes<E, R>>,
    run: RunId,
    held: bool,
}

impl<E, R> Default for Lanes<E, R> {
    fn default() -> Self {
        Self { busy: Mutex::new(HashMap::new()) }
    }
}

impl<E, R> Lanes<E, R> {
    /// Whether a unit of `run` is being committed from this process now.
    #[cfg(test)]
    pub fn is_busy(&self, run: RunId) -> bool {
        self.lock().contains_key(&run)
    }

    /// Takes `run`'s lane, or waits in it with `end`.
    pub fn enter(self: &Arc<Self>, run: RunId, end: E) -> Entered<E, R> {
        let mut busy = self.lock();
        match busy.get_mut(&run) {
            Some(waiting) => {
                let (reply, told) = oneshot::channel();
                waiting.push(Waiting { end, reply });
                Entered::Wait(told)
            }
            None => {
                busy.insert(run, Vec::new());
                Entered::Lead(Lead { lanes: self.clone(), run, held: true })
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, Vec<Waiting<E, R>>>> {
        // A panic while the lock is held leaves the map as it was: nothing is half done.
        self.busy.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<E, R> Lead<E, R> {
    /// The ends that came while the lane was held, the lane still held: they are the
    /// holder's to commit.
    pub fn take(&mut self) -> Vec<Waiting<E, R>> {
        if !self.held {
            return Vec::new();
        }
        self.lanes.lock().get_mut(&self.run).map(std::mem::take).unwrap_or_default()
    }

    /// As [`Lead::take`], and when none came, the lane is freed (this `Lead` then holds
    /// nothing, and takes nothing).
    pub fn next(&mut self) -> Vec<Waiting<E, R>> {
        if !self.held {
            return Vec::new();
        }
        let mut busy = self.lanes.lock();
        let waiting = busy.get_mut(&self.run).map(std::mem::take).unwrap_or_default();
        if waiting.is_empty() {
            busy.remove(&self.run);
            self.held = false;
        }
        waiting
    }
}

impl<E, R> Drop for Lead<E, R> {
    fn drop(&mut self) {
        if self.held {
            // The ends waiting are dropped with their replies: each enters again.
            let waiting = self.lanes.lock().remove(&self.run);
            drop(waiting);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestLanes = Lanes<&'static str, u32>;

    fn lead(entered: Entered<&'static str, u32>) -> Lead<&'static str, u32> {
        match entered {
            Entered::Lead(lead) => lead,
            Entered::Wait(_) => panic!("the lane was busy"),
        }
    }

    fn wait(entered: Entered<&'static str, u32>) -> oneshot::Receiver<u32> {
        match entered {
            Entered::Wait(told) => told,
            Entered::Lead(_) => panic!("the lane was free"),
        }
    }

    #[test]
    fn the_first_end_leads_and_the_ends_that_come_meanwhile_wait_for_it_in_order() {
        let lanes = Arc::new(TestLanes::default());
        let run = RunId::new();
        let mut first = lead(lanes.enter(run, "a"));
        assert!(lanes.is_busy(run));
        let b = wait(lanes.enter(run, "b"));
        let c = wait(lanes.enter(run, "c"));
        // Another run's lane is its own.
        let _other = lead(lanes.enter(RunId::new(), "x"));

        let waiting = first.next();
        assert_eq!(waiting.iter().map(|w| w.end).collect::<Vec<_>>(), ["b", "c"]);
        assert!(lanes.is_busy(run), "held while the ends taken are committed");
        for (told, waiting) in [b, c].into_iter().zip(waiting) {
            waiting.reply.send(7).unwrap();
            assert_eq!(told.blocking_recv().unwrap(), 7);
        }
        assert!(first.next().is_empty());
        assert!(!lanes.is_busy(run), "freed once nothing waits");
        let _again = lead(lanes.enter(run, "d"));
    }

    #[test]
    fn take_keeps_the_lane_held_even_when_nothing_waits() {
        let lanes = Arc::new(TestLanes::default());
        let run = RunId::new();
        let mut first = lead(lanes.enter(run, "a"));
        assert!(first.take().is_empty());
        assert!(lanes.is_busy(run));
        let _b = wait(lanes.enter(run, "b"));
        assert_eq!(first.take().len(), 1);
        assert!(lanes.is_busy(run));
    }

    #[test]
    fn a_lead_dropped_frees_the_lane_and_the_ends_waiting_hear_nothing() {
        let lanes = Arc::new(TestLanes::default());
        let run = RunId::new();
        let first = lead(lanes.enter(run, "a"));
        let b = wait(lanes.enter(run, "b"));
        drop(first);
        assert!(b.blocking_recv().is_err(), "told nothing: it enters again");
        assert!(!lanes.is_busy(run));
        let mut again = lead(lanes.enter(run, "b"));
        // A lead that freed its lane holds nothing after: it cannot free a later holder's.
        assert!(again.next().is_empty());
        let later = lead(lanes.enter(run, "c"));
        drop(again);
        assert!(lanes.is_busy(run));
        drop(later);
        assert!(!lanes.is_busy(run));
    }
}
