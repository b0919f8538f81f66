//! The in-process handoff of work: an objective started by this process (a worker's final
//! commit, or the orchestrator's step) for a team this process's worker serves is given to
//! that worker in memory, the moment its assignment commits, instead of after a round trip
//! through `FACTORY_WORK`.
//!
//! The work message is still published, as for any objective: the queue holds every
//! objective, and it is what brings the work back after a crash. What makes the handoff
//! safe is the claim. The assignment that hands an objective over names this worker process
//! (`ObjectiveAssigned.claimed_by`, its instance id), in the same commit, so every reader of
//! the store knows who works it:
//!
//! - The message reaching this process finds the attempt in flight here
//!   ([`LocalWork::in_flight`]) and is held, with in-progress acks, until the attempt ends;
//!   then it is settled as usual (an attempt that was abandoned is worked from the message).
//! - The message reaching a worker of another process: that worker leaves the objective to
//!   its claimant while the claimant's process is alive (its key in the workers bucket,
//!   renewed every few seconds, expiring after `WORKER_PRESENCE_TTL`), holding the message
//!   with in-progress acks, and acks it once there is nothing left to work. Should the
//!   claimant's process die, its key expires and that worker works the objective itself.
//! - A local attempt that fails (or panics) is retried here, as a redelivery would be, up
//!   to `max_deliver` attempts; then the objective is blocked.
//!
//! An objective is claimed only when its team has a free slot here (at most
//! `WorkerOptions::concurrency` local attempts per team) and this process's presence is
//! announced; otherwise its work goes through the queue as before.

use crate::orchestrator::WorkItem;
use factory_domain::ObjectiveId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

/// How an objective's local attempts ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempts {
    /// Ended as a message's attempt would: finished, blocked, waiting for a clarification,
    /// or dropped because the run ended.
    Ended,
    /// Dropped, or given up with the objective finished and its follow-up perhaps not
    /// queued: its message is worked as if nothing had been handed over.
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
}

/// Abandoned objectives remembered at most (their messages may have gone elsewhere).
const ABANDONED_KEPT: usize = 10_000;

/// A free slot of a team, taken for an objective about to be assigned to this process.
pub struct Claim {
    permit: OwnedSemaphorePermit,
}

/// An objective handed over, for the worker's local attempts.
pub(crate) struct Handed {
    pub(crate) item: WorkItem,
    /// Held while the attempts run.
    pub(crate) _permit: OwnedSemaphorePermit,
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
        Some(Claim { permit })
    }

    /// Gives the claimed objective to this process's worker. Registered in flight before it
    /// returns, so that the objective's work message, whenever it arrives here, finds it.
    pub fn hand_off(&self, claim: Claim, item: WorkItem) {
        let (done, finished) = watch::channel(false);
        self.in_flight.lock().expect("not poisoned").insert(item.objective_id, finished);
        let objective_id = item.objective_id;
        if self.sender.send(Handed { item, _permit: claim.permit, done }).is_err() {
            // The worker has stopped: the queued message brings the work to whoever serves it.
            self.in_flight.lock().expect("not poisoned").remove(&objective_id);
        }
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
