//! Group commit: the appends of units of work committed at the same moment share one
//! statement.
//!
//! A unit of work is appended by one `INSERT` (its events, and its artifact contents in the
//! same statement). Under load, many units are ready at once (one per worker finishing its
//! objective), and each statement costs the database more than its rows do: parsing and
//! planning, the executor and the insert trigger set up, a transaction started and committed
//! (a WAL flush), a round trip and a pooled connection. So appends queue here, and at most
//! [`STATEMENTS_IN_FLIGHT`] statements run at once; whatever queued meanwhile goes into the
//! next statement together. An idle store appends a unit at once, as before.
//!
//! A unit stays all or nothing, and decided alone: a statement is one transaction, and when
//! the database refuses a shared statement for a race one of its units lost (a sequence
//! another writer took, say), nothing of it was written and its units are split in halves
//! down to that unit, so that each gets its own answer (committed, a conflict, or its own
//! error). Only a failure with no answer from the database (the connection lost) is every
//! unit's answer: whether that statement committed is unknown, as it would be for a unit
//! alone. docs/architecture.md, "Group commit", has the rest.

use crate::store::{ArtifactContent, CommitError, Rows};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Statements appending at once. More run side by side only when appends come faster than
/// one statement takes; each takes whatever queued while the others ran.
pub const STATEMENTS_IN_FLIGHT: usize = 4;

/// Units one statement takes at most, and events: a bound on its size, not a target.
const UNITS_PER_STATEMENT: usize = 64;
const EVENTS_PER_STATEMENT: usize = 1_024;

/// What a unit of work appends: its events, in order, and its artifact contents. Given back
/// once committed, for what the unit does then.
pub(crate) struct Append {
    pub rows: Rows,
    pub artifacts: Vec<ArtifactContent>,
}

struct Pending {
    append: Append,
    /// What it writes, worked out once (see [`spans`]).
    spans: Vec<Span>,
    answer: oneshot::Sender<Answer>,
}

/// A unit given back with its outcome.
type Answer = (Append, Result<(), CommitError>);

/// An aggregate, as the store keys it.
type Aggregate = (&'static str, String);

/// The sequences a unit writes of one aggregate.
struct Span {
    aggregate: Aggregate,
    first: i64,
    last: i64,
}

/// The aggregates `rows` write, each once, with the sequences written.
fn spans(rows: &Rows) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    let events = rows.aggregate_types.iter().zip(&rows.aggregate_ids).zip(&rows.sequences);
    for ((&aggregate_type, aggregate_id), &sequence) in events {
        match spans.iter_mut().find(|s| s.aggregate.0 == aggregate_type && s.aggregate.1 == *aggregate_id) {
            Some(span) => {
                span.first = span.first.min(sequence);
                span.last = span.last.max(sequence);
            }
            None => spans.push(Span { aggregate: (aggregate_type, aggregate_id.clone()), first: sequence, last: sequence }),
        }
    }
    spans
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// Statements appending now (a task each, or a caller appending alone).
    in_flight: usize,
    /// The aggregates those statements write. A unit that writes one of them waits for that
    /// statement to end: one of the two must lose the race for the aggregate's sequence, and
    /// waiting, it loses it alone, without failing a statement shared with others (a
    /// statement of its own would wait for the other's commit in the database anyway); when
    /// the statement took one of its sequences, it is told so at once (see [`Queue::ended`]).
    writing: HashSet<Aggregate>,
}

/// The queue of a store's appends (see the module's documentation).
pub(crate) struct GroupCommit {
    pool: PgPool,
    queue: Mutex<Queue>,
    sent: AtomicU64,
    sent_shared: AtomicU64,
    refused_shared: AtomicU64,
}

/// Counts of a store's append statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupCommitStats {
    /// Append statements sent.
    pub statements: u64,
    /// Of those, statements of more than one unit of work.
    pub shared: u64,
    /// Of those, statements the database refused (split in halves and tried again).
    pub refused_shared: u64,
}

/// How a unit is appended: by its caller, by a task started for it, or by a task already
/// appending. (A value of the moment, never stored: its variants' sizes do not matter.)
#[allow(clippy::large_enum_variant)]
enum Way {
    Alone(Append, Vec<Span>),
    Queued { start_task: bool },
}

/// A shared statement failed: refused by the database for a reason that meets every unit
/// alike (nothing was written), or without its answer (whether it committed is unknown).
#[derive(Debug, thiserror::Error)]
#[error("the append shared with {others} other unit(s) of work failed{}: {reason}", if *.written { "; whether it committed is unknown" } else { "" })]
struct SharedFailure {
    others: usize,
    reason: String,
    /// Perhaps written: the database's answer was lost.
    written: bool,
}

/// SQLSTATEs of a race between writers: a unique violation (a sequence another writer took)
/// or any other integrity violation of one unit (class 23), a deadlock, a serialization failure.
fn is_race(code: &str) -> bool {
    code.starts_with("23") || code == "40P01" || code == "40001"
}

/// The task appending a unit ended without answering (it panicked).
#[derive(Debug, thiserror::Error)]
#[error("the append was interrupted; whether it committed is unknown")]
struct Interrupted;

impl GroupCommit {
    pub fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            queue: Mutex::new(Queue::default()),
            sent: AtomicU64::new(0),
            sent_shared: AtomicU64::new(0),
            refused_shared: AtomicU64::new(0),
        })
    }

    /// Appends `append`, alone or with others queued at the same moment, and gives it back
    /// once committed.
    pub async fn append(self: &Arc<Self>, append: Append) -> Result<Append, CommitError> {
        let (answer, answered) = oneshot::channel();
        let spans = spans(&append.rows);
        let way = {
            let mut queue = self.queue.lock().expect("not poisoned");
            let free = queue.in_flight < STATEMENTS_IN_FLIGHT;
            if free {
                queue.in_flight += 1;
            }
            if free && queue.pending.is_empty() && !spans.iter().any(|s| queue.writing.contains(&s.aggregate)) {
                queue.writing.extend(spans.iter().map(|s| s.aggregate.clone()));
                Way::Alone(append, spans)
            } else {
                queue.pending.push(Pending { append, spans, answer });
                Way::Queued { start_task: free }
            }
        };
        match way {
            // Nothing waits and a statement is free: appended by the caller itself, without
            // a hop to another task. Its place goes to a new task if units queued meanwhile,
            // also when the caller is dropped mid-way.
            Way::Alone(append, spans) => {
                let mut place = Statements::new(self, spans.iter().map(|s| s.aggregate.clone()).collect());
                place.started = true;
                append_one(self, &append).await?;
                highest_sequences(&spans, &mut place.committed);
                Ok(append)
            }
            Way::Queued { start_task } => {
                if start_task {
                    // A task of its own, spawned with the lock released: a caller dropped
                    // mid-way (a cancelled worker) does not take the other units of its
                    // statement down with it.
                    tokio::spawn(Statements::new(self, Vec::new()).run());
                }
                match answered.await {
                    Ok((append, outcome)) => outcome.map(|()| append),
                    Err(_) => Err(CommitError::Store(Box::new(Interrupted))),
                }
            }
        }
    }

    /// Whether any unit is queued or being appended now.
    pub(crate) fn is_busy(&self) -> bool {
        let queue = self.queue.lock().expect("not poisoned");
        queue.in_flight > 0 || !queue.pending.is_empty()
    }

    /// How the group commit is doing, since the store was made.
    pub fn stats(&self) -> GroupCommitStats {
        GroupCommitStats {
            statements: self.sent.load(Ordering::Relaxed),
            shared: self.sent_shared.load(Ordering::Relaxed),
            refused_shared: self.refused_shared.load(Ordering::Relaxed),
        }
    }

    /// Ends the statement that wrote `written` (committing `committed`) and takes the next
    /// one's units: every queued unit that writes no aggregate a statement in flight writes,
    /// within the bounds. `None`, and one statement less, when there is none.
    fn next(&self, written: &mut Vec<Aggregate>, committed: &mut HashMap<Aggregate, i64>) -> Option<Vec<Pending>> {
        let mut queue = self.queue.lock().expect("not poisoned");
        let queue = &mut *queue;
        queue.ended(written, committed);
        let (mut taken, mut left, mut events) = (Vec::new(), Vec::new(), 0);
        for unit in queue.pending.drain(..) {
            // Its caller is gone (a cancelled worker): not appended at all, as a unit of work
            // dropped before its commit.
            if unit.answer.is_closed() {
                continue;
            }
            let size = unit.append.rows.len();
            let full = taken.len() >= UNITS_PER_STATEMENT || (!taken.is_empty() && events + size > EVENTS_PER_STATEMENT);
            if full || unit.spans.iter().any(|s| queue.writing.contains(&s.aggregate)) {
                left.push(unit);
                continue;
            }
            for span in &unit.spans {
                queue.writing.insert(span.aggregate.clone());
                written.push(span.aggregate.clone());
            }
            events += size;
            taken.push(unit);
        }
        queue.pending = left;
        if taken.is_empty() {
            // What is left waits for a statement in flight, whose task takes it next.
            queue.in_flight -= 1;
            return None;
        }
        Some(taken)
    }
}

/// A place among the statements in flight: a task appending statement after statement while
/// units are queued, or a caller appending alone.
struct Statements {
    group: Arc<GroupCommit>,
    /// The aggregates its statement writes.
    writing: Vec<Aggregate>,
    /// What its last statement committed: the highest sequence per aggregate.
    committed: HashMap<Aggregate, i64>,
    /// Run at least once (or a caller appending alone). A task dropped before it ever ran
    /// was refused by a runtime shutting down: it must not spawn another.
    started: bool,
    done: bool,
}

impl Statements {
    fn new(group: &Arc<GroupCommit>, writing: Vec<Aggregate>) -> Self {
        Self { group: group.clone(), writing, committed: HashMap::new(), started: false, done: false }
    }

    async fn run(mut self) {
        self.started = true;
        while let Some(units) = self.group.next(&mut self.writing, &mut self.committed) {
            append_units(&self.group, units, &mut self.committed).await;
        }
        self.done = true;
    }
}

impl Queue {
    /// A statement that wrote `written` ended, committing `committed` (the highest sequence
    /// per aggregate). Units queued meanwhile on an older state of those aggregates (one of
    /// their sequences is taken now) are told of the conflict without a statement: theirs
    /// would only have been refused.
    fn ended(&mut self, written: &mut Vec<Aggregate>, committed: &mut HashMap<Aggregate, i64>) {
        for aggregate in written.drain(..) {
            self.writing.remove(&aggregate);
        }
        if committed.is_empty() {
            return;
        }
        let (stale, left): (Vec<Pending>, Vec<Pending>) = self.pending.drain(..).partition(|unit| {
            unit.spans.iter().any(|s| committed.get(&s.aggregate).is_some_and(|&taken| s.first <= taken))
        });
        self.pending = left;
        committed.clear();
        for unit in stale {
            let _ = unit.answer.send((unit.append, Err(CommitError::Conflict)));
        }
    }
}

impl Drop for Statements {
    /// A place not given up by [`Statements::run`] (a caller that appended alone, or a task
    /// that panicked) goes to a new task if units are queued: their callers would otherwise
    /// wait for ever. Where no task can run any more (no runtime, or one shutting down,
    /// which drops a new task unrun), the queued units are answered instead: interrupted.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let runtime = if self.started { tokio::runtime::Handle::try_current().ok() } else { None };
        let (restart, abandoned) = {
            let mut queue = self.group.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            queue.ended(&mut self.writing, &mut self.committed);
            match &runtime {
                // The place goes to the new task (which gives it up if nothing is left).
                Some(_) if !queue.pending.is_empty() => (true, Vec::new()),
                _ => {
                    queue.in_flight -= 1;
                    (false, std::mem::take(&mut queue.pending))
                }
            }
        };
        for unit in abandoned {
            let _ = unit.answer.send((unit.append, Err(CommitError::Store(Box::new(Interrupted)))));
        }
        if restart && let Some(runtime) = runtime {
            runtime.spawn(Statements::new(&self.group, Vec::new()).run());
        }
    }
}

/// One statement for all of `units`. When the database refuses a shared statement (nothing
/// of it was written), its units are split in two and each half tried again, down to single
/// units, which get their own answer: a unit that lost a race to another process costs a few
/// statements, not one per unit. What committed goes into `committed` (see
/// [`highest_sequences`]).
async fn append_units(group_commit: &GroupCommit, units: Vec<Pending>, committed: &mut HashMap<Aggregate, i64>) {
    let mut groups = vec![units];
    while let Some(mut group) = groups.pop() {
        if group.len() == 1 {
            let unit = group.pop().expect("one unit");
            let outcome = append_one(group_commit, &unit.append).await;
            if outcome.is_ok() {
                highest_sequences(&unit.spans, committed);
            }
            let _ = unit.answer.send((unit.append, outcome));
            continue;
        }
        match group_commit.execute(group.iter().map(|unit| &unit.append)).await {
            Ok(()) => {
                for unit in group {
                    highest_sequences(&unit.spans, committed);
                    let _ = unit.answer.send((unit.append, Ok(())));
                }
            }
            // A race one of the units lost (a sequence taken, a deadlock with another
            // writer): nothing was written; halves tell whose it was.
            Err(sqlx::Error::Database(db)) if db.code().is_some_and(|code| is_race(&code)) => {
                group_commit.refused_shared.fetch_add(1, Ordering::Relaxed);
                let second = group.split_off(group.len() / 2);
                groups.push(second);
                groups.push(group);
            }
            // Any other refusal would meet every unit alike (a read-only database, a
            // timeout): nothing was written, and that is every unit's answer.
            Err(error @ sqlx::Error::Database(_)) => {
                let reason = error.to_string();
                let others = group.len() - 1;
                for unit in group {
                    let failure = SharedFailure { others, reason: reason.clone(), written: false };
                    let _ = unit.answer.send((unit.append, Err(CommitError::Store(Box::new(failure)))));
                }
            }
            Err(error) => {
                let reason = error.to_string();
                let others = group.len() - 1;
                for unit in group {
                    let failure = SharedFailure { others, reason: reason.clone(), written: true };
                    let _ = unit.answer.send((unit.append, Err(CommitError::Store(Box::new(failure)))));
                }
            }
        }
    }
}

/// The highest sequence of each aggregate the spans write, into `highest`.
fn highest_sequences(spans: &[Span], highest: &mut HashMap<Aggregate, i64>) {
    for span in spans {
        let entry = highest.entry(span.aggregate.clone()).or_insert(span.last);
        *entry = (*entry).max(span.last);
    }
}

/// One unit's append; a unique violation is another writer's event at one of its sequences.
async fn append_one(group_commit: &GroupCommit, append: &Append) -> Result<(), CommitError> {
    match group_commit.execute(std::iter::once(append)).await {
        Ok(()) => Ok(()),
        // Another writer's event at one of its sequences; or a deadlock or serialization
        // failure with another writer: nothing was written, decide again on fresh state.
        Err(sqlx::Error::Database(db)) if matches!(db.code().as_deref(), Some("23505" | "40P01" | "40001")) => Err(CommitError::Conflict),
        Err(error) => Err(CommitError::Store(Box::new(error))),
    }
}

impl GroupCommit {
    /// One statement for `appends`: one transaction, all of it or nothing. Each unit's events
    /// in the order staged, one unit after the other; every artifact content once (two units
    /// may store the same content: it is addressed by its digest), in digest order, as a
    /// unit's own are (`Changes::store_artifacts`), so that statements storing the same
    /// contents lock their keys in one order and cannot deadlock on them.
    async fn execute<'a>(&self, appends: impl Iterator<Item = &'a Append>) -> Result<(), sqlx::Error> {
        let mut columns = Columns::default();
        let mut by_digest = std::collections::BTreeMap::new();
        let mut units = 0;
        for append in appends {
            units += 1;
            columns.extend(&append.rows);
            for artifact in &append.artifacts {
                by_digest.entry(artifact.sha256.as_str()).or_insert(artifact);
            }
        }
        let mut artifacts = ArtifactColumns::default();
        for artifact in by_digest.into_values() {
            artifacts.push(artifact);
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        if units > 1 {
            self.sent_shared.fetch_add(1, Ordering::Relaxed);
        }
        let query = sqlx::query(if artifacts.shas.is_empty() { APPEND } else { APPEND_WITH_ARTIFACTS })
            .bind(&columns.aggregate_types)
            .bind(&columns.aggregate_ids)
            .bind(&columns.sequences)
            .bind(&columns.event_types)
            .bind(&columns.event_versions)
            .bind(&columns.payloads)
            .bind(&columns.metadata);
        let query = if artifacts.shas.is_empty() {
            query
        } else {
            query.bind(&artifacts.shas).bind(&artifacts.contents).bind(&artifacts.bytes)
        };
        query.execute(&self.pool).await.map(|_| ())
    }
}

/// The events of one statement, column by column, borrowed from the units' rows.
#[derive(Default)]
struct Columns<'a> {
    aggregate_types: Vec<&'a str>,
    aggregate_ids: Vec<&'a str>,
    sequences: Vec<i64>,
    event_types: Vec<&'a str>,
    event_versions: Vec<&'a str>,
    payloads: Vec<&'a str>,
    metadata: Vec<&'a str>,
}

impl<'a> Columns<'a> {
    fn extend(&mut self, rows: &'a Rows) {
        self.aggregate_types.extend(rows.aggregate_types.iter().copied());
        self.aggregate_ids.extend(rows.aggregate_ids.iter().map(String::as_str));
        self.sequences.extend(rows.sequences.iter().copied());
        self.event_types.extend(rows.event_types.iter().map(String::as_str));
        self.event_versions.extend(rows.event_versions.iter().map(String::as_str));
        self.payloads.extend(rows.payloads.iter().map(String::as_str));
        self.metadata.extend(rows.metadata.iter().map(String::as_str));
    }
}

#[derive(Default)]
struct ArtifactColumns<'a> {
    shas: Vec<&'a str>,
    contents: Vec<&'a [u8]>,
    bytes: Vec<i64>,
}

impl<'a> ArtifactColumns<'a> {
    fn push(&mut self, artifact: &'a ArtifactContent) {
        self.shas.push(&artifact.sha256);
        self.contents.push(&artifact.content);
        self.bytes.push(artifact.content.len() as i64);
    }
}

/// The events of a statement, in the order given (`WITH ORDINALITY`): positions are drawn in
/// that order, and each event's hash chains onto the one before it in its aggregate.
const APPEND: &str = "INSERT INTO events \
    (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
    SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload::json, e.metadata::json \
      FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[]) \
           WITH ORDINALITY AS e(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, n) \
     ORDER BY e.n";

/// The same, with artifact contents stored by the same statement.
const APPEND_WITH_ARTIFACTS: &str = "WITH stored AS (\
    INSERT INTO artifacts (sha256, content, bytes) \
    SELECT * FROM unnest($8::text[], $9::bytea[], $10::bigint[]) ON CONFLICT (sha256) DO NOTHING) \
    INSERT INTO events \
    (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
    SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload::json, e.metadata::json \
      FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[]) \
           WITH ORDINALITY AS e(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, n) \
     ORDER BY e.n";

#[cfg(test)]
mod tests {
    use super::*;

    /// A unit writing `aggregate_id`'s `sequences` (run events).
    fn unit(aggregate_id: &str, sequences: &[i64]) -> (Pending, oneshot::Receiver<Answer>) {
        let mut rows = Rows::default();
        for &sequence in sequences {
            rows.aggregate_types.push("run");
            rows.aggregate_ids.push(aggregate_id.into());
            rows.sequences.push(sequence);
            rows.event_types.push("StageStarted".into());
            rows.event_versions.push("1".into());
            rows.payloads.push("{}".into());
            rows.metadata.push("{}".into());
            rows.run_ids.push(factory_domain::RunId::new());
        }
        let (answer, answered) = oneshot::channel();
        (Pending { spans: spans(&rows), append: Append { rows, artifacts: Vec::new() }, answer }, answered)
    }

    #[test]
    fn a_queued_unit_whose_sequence_a_statement_just_committed_is_told_of_the_conflict_without_a_statement() {
        let mut queue = Queue::default();
        let (stale, mut stale_answer) = unit("a", &[3, 4]);
        let (newer, mut newer_answer) = unit("a", &[5]);
        let (other, mut other_answer) = unit("b", &[3]);
        queue.pending.extend([stale, newer, other]);
        queue.writing.insert(("run", "a".into()));
        let mut written = vec![("run", "a".to_string())];
        let mut committed = HashMap::from([(("run", "a".to_string()), 4)]);

        queue.ended(&mut written, &mut committed);

        assert!(queue.writing.is_empty() && written.is_empty() && committed.is_empty());
        let (_, outcome) = stale_answer.try_recv().expect("answered at once");
        assert!(matches!(outcome, Err(CommitError::Conflict)));
        assert!(newer_answer.try_recv().is_err() && other_answer.try_recv().is_err(), "the rest stay queued");
        assert_eq!(queue.pending.len(), 2);
    }
}
