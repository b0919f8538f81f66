//! The in-process handoff of work: an objective started by this process (a worker's final
//! commit, or the orchestrator's step) for a team this process's worker serves is given to
//! that worker in memory as its assignment is committed, instead of after a round trip
//! through `FACTORY_WORK`. When the store is otherwise idle, its work starts while that
//! commit is in flight, from what the commit writes, and waits for its outcome before it
//! writes, queues or calls anything outside the process ([`Ahead`]).
//!
//! No work message is queued for an objective handed over: the claim and the sweep keep its
//! work from being lost. The assignment that hands an objective over names this worker
//! process (`ObjectiveAssigned.claimed_by`, its instance id), in the same commit, so every
//! reader of the store knows who works it:
//!
//! - While this process lives it works the objective. A local attempt that fails (or
//!   panics) is retried here, as a redelivery would be, up to `max_deliver` attempts; then
//!   the objective is blocked. Attempts that end abandoned (see [`Attempts::Abandoned`])
//!   queue the run's stages in progress again before they let go of the claim.
//! - Each worker process renews, every few seconds, its key in the workers bucket (its
//!   presence, expiring after `WORKER_PRESENCE_TTL`) and its row in `worker_instances`
//!   (migration 0009), which says from which event position its claims may still be open
//!   ([`LocalWork::mark`]). Should the process die, both go stale; every other worker
//!   process sweeps for such rows and queues the work of the dead process's claims that are
//!   still open (`Worker::sweep`), again for a minute in case a statement it sent commits
//!   late, then deletes the row. A process that stops on purpose takes both back at once,
//!   so the sweep need not wait for them to expire.
//! - A work message for a claimed objective can still exist (a redelivered event queues the
//!   stages in progress again, the sweep queues a dead claimant's work). Reaching this
//!   process, it finds the attempt in flight here ([`LocalWork::in_flight`]) and is held,
//!   with in-progress acks, until the attempt ends; then it is settled as usual. Reaching a
//!   worker of another process, it is left to its claimant while the claimant's presence
//!   lasts, held likewise, and acked once there is nothing left to work; the claimant gone,
//!   that worker works the objective itself.
//!
//! An objective is claimed only when its team has a free slot here (at most
//! `WorkerOptions::concurrency` local attempts per team) and this process's presence is
//! announced; otherwise its work goes through the queue.

use crate::orchestrator::WorkItem;
use factory_commands::store::Staged;
use factory_domain::{Objective, ObjectiveId, Run, RunId};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

/// How an objective's local attempts ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempts {
    /// Ended as a message's attempt would: finished, blocked, waiting for a clarification,
    /// or dropped because the run ended.
    Ended,
    /// Dropped (the worker stopping: the sweep takes over its claim), or given up with the
    /// objective finished and its follow-up perhaps not queued (the run's stages in progress
    /// are queued again); a message of it is worked as if nothing had been handed over.
    Abandoned,
}

/// How long before its presence expires a process stops counting on its claims.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);

/// This process's worker, as the code that starts objectives sees it.
pub struct LocalWork {
    instance: String,
    slots: HashMap<String, Arc<Semaphore>>,
    /// When this process's presence was last renewed (claims are made and kept only while
    /// that is recent).
    renewed: std::sync::Mutex<Option<Instant>>,
    sender: mpsc::UnboundedSender<Handed>,
    /// The objectives whose local attempts run, each told `true` when they end.
    in_flight: std::sync::Mutex<HashMap<ObjectiveId, watch::Receiver<bool>>>,
    /// Objectives whose local attempts were abandoned, until their message settles here.
    abandoned: std::sync::Mutex<std::collections::HashSet<ObjectiveId>>,
    /// The claims held, to say from which position the open ones may begin.
    book: Arc<Mutex<Book>>,
}

/// The claims a process holds, numbered as taken, and the marks that turn them into an event
/// position (see [`LocalWork::mark`]).
#[derive(Debug, Default)]
struct Book {
    next: u64,
    open: BTreeSet<u64>,
    /// Marks not yet passed, oldest first: the last position read, and the number of the
    /// next claim when it was read.
    marks: VecDeque<(i64, u64)>,
    /// The last mark passed: every claim assigned at a position <= this has ended.
    since: Option<i64>,
}

/// Marks waiting at most (one per renewal; more wait only while an attempt runs for
/// minutes): past this the newest is replaced, which only makes the position lag.
const MARKS_KEPT: usize = 1024;

/// Abandoned objectives remembered at most (their messages may have gone elsewhere).
const ABANDONED_KEPT: usize = 10_000;

/// A free slot of a team, taken for an objective about to be assigned to this process; open
/// until dropped (its commit failed, or the objective's local attempts ended).
pub struct Claim {
    _permit: OwnedSemaphorePermit,
    number: u64,
    book: Arc<Mutex<Book>>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.book.lock().expect("not poisoned").open.remove(&self.number);
    }
}

/// How the commit that an objective was handed over ahead of ended (see [`Ahead`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed: the objective is assigned, the work stands.
    Committed,
    /// Refused (a conflict): nothing of it was written, the objective does not exist.
    Refused,
    /// Not known (the store failed while it was in flight): the store must be asked.
    Unknown,
}

/// An objective handed over while the commit that assigns it is still in flight: what that
/// commit writes, for the work to start from, and its outcome, which the work waits for
/// before it writes anything, calls anything outside the process, or queues anything
/// (architecture.md, "Work started ahead of its commit").
pub struct Ahead {
    staged: Staged,
    outcome: watch::Receiver<Option<Outcome>>,
}

/// Tells the objectives handed over ahead of a commit how it ended; dropped untold, it
/// tells them the outcome is not known.
pub struct Tell(watch::Sender<Option<Outcome>>);

impl Tell {
    pub fn tell(self, outcome: Outcome) {
        let _ = self.0.send(Some(outcome));
    }
}

impl Ahead {
    /// For work handed over ahead of the commit of a unit that stages `staged`
    /// ([`factory_commands::store::Changes::staged`]); the committer tells the outcome.
    pub fn new(staged: Staged) -> (Arc<Self>, Tell) {
        let (sender, outcome) = watch::channel(None);
        (Arc::new(Self { staged, outcome }), Tell(sender))
    }

    /// How the commit ended, once it has.
    pub async fn outcome(&self) -> Outcome {
        let mut outcome = self.outcome.clone();
        loop {
            if let Some(known) = *outcome.borrow_and_update() {
                return known;
            }
            if outcome.changed().await.is_err() {
                return Outcome::Unknown;
            }
        }
    }

    /// Whether the commit's outcome is known yet (it may still be in flight).
    pub(crate) fn is_known(&self) -> bool {
        self.outcome.borrow().is_some()
    }

    /// The run as the commit leaves it, if it changes it.
    pub(crate) fn run(&self, run_id: RunId) -> Option<&Run> {
        self.staged.runs.get(&run_id.to_string()).map(|later| &later.state)
    }

    /// An objective as the commit leaves it, if it changes it.
    pub(crate) fn objective(&self, objective_id: ObjectiveId) -> Option<&Objective> {
        self.staged.objectives.get(&objective_id.to_string()).map(|later| &later.state)
    }

    /// Everything the commit writes.
    pub(crate) fn staged(&self) -> &Staged {
        &self.staged
    }

    /// An artifact content the commit stores.
    pub(crate) fn content(&self, sha256: &str) -> Option<&Arc<Vec<u8>>> {
        self.staged.contents.get(sha256)
    }
}

/// An objective handed over, for the worker's local attempts.
pub(crate) struct Handed {
    pub(crate) item: WorkItem,
    /// Handed over ahead of the commit that assigns it (for its first attempt).
    pub(crate) ahead: Option<Arc<Ahead>>,
    /// Held while the attempts run (and their work, if abandoned, is queued).
    pub(crate) _claim: Claim,
    /// Told `true` when they have ended.
    pub(crate) done: watch::Sender<bool>,
}

impl LocalWork {
    /// For a worker serving `teams`, `concurrency` local attempts per team at most.
    pub(crate) fn new(teams: &[String], concurrency: usize) -> (Arc<Self>, mpsc::UnboundedReceiver<Handed>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let slots = teams.iter().map(|team| (team.clone(), Arc::new(Semaphore::new(concurrency.max(1))))).collect();
        let local = Self {
            instance: format!("worker-{}", uuid::Uuid::now_v7()),
            slots,
            renewed: std::sync::Mutex::new(None),
            sender,
            in_flight: std::sync::Mutex::default(),
            abandoned: std::sync::Mutex::default(),
            book: Arc::default(),
        };
        (Arc::new(local), receiver)
    }

    /// This worker process's instance id, as claims name it.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The presence was renewed by a put started at `at`.
    pub(crate) fn renewed(&self, at: Instant) {
        *self.renewed.lock().expect("not poisoned") = Some(at);
    }

    /// This process takes its presence back (it stops): no claim holds from now on.
    pub(crate) fn withdraw(&self) {
        *self.renewed.lock().expect("not poisoned") = None;
    }

    /// Whether this process's claims still hold: its presence was renewed recently enough
    /// that no other process can have taken it for gone.
    pub fn claims_hold(&self) -> bool {
        let ttl = factory_nats::WORKER_PRESENCE_TTL;
        self.renewed.lock().expect("not poisoned").is_some_and(|at| at.elapsed() + CLAIM_MARGIN < ttl)
    }

    /// A slot for an objective of `team`, when this process serves the team, its claims
    /// hold and a slot is free.
    pub fn try_claim(&self, team: &str) -> Option<Claim> {
        if !self.claims_hold() {
            return None;
        }
        let permit = self.slots.get(team)?.clone().try_acquire_owned().ok()?;
        let mut book = self.book.lock().expect("not poisoned");
        let number = book.next;
        book.next += 1;
        book.open.insert(number);
        Some(Claim { _permit: permit, number, book: self.book.clone() })
    }

    /// A position before every claim still open, from `last_position`, the highest event
    /// position drawn as read just now (read BEFORE this is called): every claim assigned
    /// at a position <= the answer has ended. `None` until the first mark is passed.
    ///
    /// Why it holds: a claim is taken before the commit that assigns its objective, so one
    /// taken after the mark was made draws its position after `last_position` was read,
    /// above it. Once every claim taken before the mark has ended, every claim still open
    /// was taken after it, and `last_position` is below all of them.
    pub(crate) fn mark(&self, last_position: i64) -> Option<i64> {
        let mut book = self.book.lock().expect("not poisoned");
        let next = book.next;
        match book.marks.back_mut() {
            // No claim taken since the newest mark: the same mark with a later position.
            Some(newest) if newest.1 == next => newest.0 = newest.0.max(last_position),
            _ => {
                if book.marks.len() >= MARKS_KEPT {
                    book.marks.pop_back();
                }
                book.marks.push_back((last_position, next));
            }
        }
        let oldest_open = book.open.first().copied().unwrap_or(u64::MAX);
        while let Some(&(position, taken_before)) = book.marks.front() {
            if oldest_open < taken_before {
                break;
            }
            book.since = Some(book.since.map_or(position, |since| since.max(position)));
            book.marks.pop_front();
        }
        book.since
    }

    /// Gives the claimed objective to this process's worker; whether it took it. Registered
    /// in flight before it returns, so that a work message of the objective, whenever it
    /// arrives here, finds it. Not taken (the worker has stopped), its work must be queued.
    ///
    /// `ahead`: handed over before the commit that assigns it has ended (see [`Ahead`]).
    #[must_use]
    pub fn hand_off(&self, claim: Claim, item: WorkItem, ahead: Option<Arc<Ahead>>) -> bool {
        let (done, finished) = watch::channel(false);
        self.in_flight.lock().expect("not poisoned").insert(item.objective_id, finished);
        let objective_id = item.objective_id;
        if self.sender.send(Handed { item, ahead, _claim: claim, done }).is_err() {
            self.in_flight.lock().expect("not poisoned").remove(&objective_id);
            return false;
        }
        true
    }

    /// The local attempts at `objective_id` in flight, if any, to wait for their end
    /// ([`until_ended`]).
    pub fn in_flight(&self, objective_id: ObjectiveId) -> Option<watch::Receiver<bool>> {
        self.in_flight.lock().expect("not poisoned").get(&objective_id).cloned()
    }

    /// The local attempts at `objective_id` have ended, as `how` says (abandoned ones are
    /// remembered for [`LocalWork::take_abandoned`]).
    pub(crate) fn ended(&self, objective_id: ObjectiveId, done: &watch::Sender<bool>, how: Attempts) {
        if how == Attempts::Abandoned {
            let mut abandoned = self.abandoned.lock().expect("not poisoned");
            if abandoned.len() >= ABANDONED_KEPT {
                abandoned.clear();
            }
            abandoned.insert(objective_id);
        }
        self.in_flight.lock().expect("not poisoned").remove(&objective_id);
        let _ = done.send(true);
    }

    /// Whether the local attempts at `objective_id` were abandoned (then forgotten: its
    /// message is being settled).
    pub(crate) fn take_abandoned(&self, objective_id: ObjectiveId) -> bool {
        self.abandoned.lock().expect("not poisoned").remove(&objective_id)
    }
}

/// Waits until the local attempts have ended (or their sender is gone).
pub async fn until_ended(mut ended: watch::Receiver<bool>) {
    while !*ended.borrow_and_update() {
        if ended.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Arc<LocalWork> {
        let (local, _handed) = LocalWork::new(&["backend-engineering".to_string()], 4);
        local.renewed(Instant::now());
        local
    }

    #[tokio::test]
    async fn work_handed_over_ahead_learns_how_its_commit_ended_and_an_untold_end_is_not_known() {
        let (ahead, tell) = Ahead::new(Staged::default());
        let waiting = {
            let ahead = ahead.clone();
            tokio::spawn(async move { ahead.outcome().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits while the commit is in flight");
        tell.tell(Outcome::Refused);
        assert_eq!(waiting.await.unwrap(), Outcome::Refused);
        assert_eq!(ahead.outcome().await, Outcome::Refused, "and says so again");

        let (ahead, tell) = Ahead::new(Staged::default());
        drop(tell);
        assert_eq!(ahead.outcome().await, Outcome::Unknown);
    }

    #[test]
    fn the_position_passes_a_mark_once_every_claim_taken_before_it_has_ended() {
        let local = local();
        assert_eq!(local.mark(10), Some(10), "no claim yet: the first mark passes at once");
        let first = local.try_claim("backend-engineering").unwrap();
        assert_eq!(local.mark(20), Some(10), "the claim taken before it is open");
        let second = local.try_claim("backend-engineering").unwrap();
        assert_eq!(local.mark(30), Some(10));
        drop(first);
        // The mark at 20 was made with only the first claim taken: passed. The one at 30
        // waits for the second.
        assert_eq!(local.mark(40), Some(20));
        drop(second);
        assert_eq!(local.mark(50), Some(50), "nothing open: every mark passes");
        assert_eq!(local.mark(45), Some(50), "it never moves back");
    }

    #[test]
    fn a_claim_taken_after_a_mark_does_not_hold_it_back() {
        let local = local();
        local.mark(5);
        let held = local.try_claim("backend-engineering").unwrap();
        local.mark(10);
        let later = local.try_claim("backend-engineering").unwrap();
        drop(held);
        // The mark at 10 was made before `later` was taken: it passes with `later` open.
        assert_eq!(local.mark(12), Some(10));
        drop(later);
        assert_eq!(local.mark(15), Some(15));
    }

    #[test]
    fn marks_made_while_an_attempt_runs_for_long_stay_bounded() {
        let local = local();
        local.mark(0);
        let long = local.try_claim("backend-engineering").unwrap();
        for position in 1..=5_000 {
            let short = local.try_claim("backend-engineering").unwrap();
            assert_eq!(local.mark(position), Some(0));
            drop(short);
        }
        assert!(local.book.lock().unwrap().marks.len() <= MARKS_KEPT);
        drop(long);
        assert_eq!(local.mark(5_001), Some(5_001));
    }

    #[test]
    fn no_claim_without_a_recent_presence_or_a_free_slot() {
        let (local, _handed) = LocalWork::new(&["backend-engineering".to_string()], 1);
        assert!(local.try_claim("backend-engineering").is_none(), "not announced yet");
        local.renewed(Instant::now());
        let only = local.try_claim("backend-engineering").unwrap();
        assert!(local.try_claim("backend-engineering").is_none(), "its one slot is taken");
        assert!(local.try_claim("qa-engineering").is_none(), "a team it does not serve");
        drop(only);
        assert!(local.try_claim("backend-engineering").is_some());
        local.withdraw();
        assert!(local.try_claim("backend-engineering").is_none(), "withdrawn");
    }
}
