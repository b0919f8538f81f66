//! The relay: PostgreSQL -> JetStream, every event, in position order, exactly once in the
//! stream.
//!
//! * **Safe horizon.** Positions come from a sequence, so a transaction may hold a lower
//!   position and commit after one with a higher position. The relay never reads past a
//!   position some still-running transaction might hold: `events_horizon()` reads the highest
//!   position drawn so far (`V`), then takes a fresh transaction id (`bound`), then the oldest
//!   running *appender* below it (`xmin`). Every position `<= V` was drawn by a transaction
//!   whose id was assigned before `V` was read (the insert trigger takes the id before
//!   drawing the position), so its id is below `bound`, and that holds the appenders' lock
//!   until it ends (the trigger takes it before drawing, too). Once no holder below `bound`
//!   is left, every one of those transactions has committed or aborted and all events up to
//!   `V` are visible: `V` is safe. Transactions that append nothing (a rebuild, another
//!   database's batch job) are not waited for (migration 0006). Within the same call that is
//!   `xmin == bound`; otherwise a later call settles it.
//! * **Checkpoint after PubAck.** The checkpoint (position and stream sequence) is written to
//!   PostgreSQL only after JetStream acknowledged every message up to it. On restart, messages
//!   the stream holds past the checkpoint are read back and not published again; anything
//!   else in doubt is repeated with the same `Nats-Msg-Id`, which JetStream drops.
//! * **One active relay.** A session advisory lock; other processes wait as standbys.
//! * **Woken** in-process by the store, across processes by LISTEN/NOTIFY while idle, and
//!   by polling while busy: NOTIFY takes a database-wide lock at commit that stops
//!   concurrent commits from sharing a WAL flush, so the relay tells writers (the unlogged
//!   `relay_wake` row) to notify only when it is about to sleep. A backstop poll covers the
//!   rest.

use crate::events;
use async_nats::jetstream;
use factory_nats::{EventEnvelope, Topology, cloud_event_headers};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How soon to look again while busy or waiting for running transactions.
const MIN_SHORT_PAUSE: Duration = Duration::from_millis(5);
const MAX_SHORT_PAUSE: Duration = Duration::from_millis(20);
/// Empty polls (about 100 ms of backing-off pauses) before asking writers to NOTIFY again.
const QUIET_POLLS_BEFORE_IDLE: u32 = 8;
/// See [`RelayOptions::read_interval`].
pub const DEFAULT_READ_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Names the checkpoint and the advisory lock.
    pub name: String,
    pub batch_size: usize,
    /// The backstop poll when no wake-up arrives.
    pub poll_interval: Duration,
    /// How long to wait for JetStream's acknowledgement of a publish.
    pub ack_timeout: Duration,
    /// The shortest time from one look at the store to the next (a full batch aside, which
    /// is followed at once): a commit that wakes the relay sooner waits for the rest of it,
    /// so that commits close together are read, published and checkpointed as one batch. A
    /// commit after a quiet spell is looked at at once. Zero: every wake-up looks at once.
    pub read_interval: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            name: "relay".into(),
            batch_size: 2000,
            poll_interval: Duration::from_millis(500),
            ack_timeout: Duration::from_secs(5),
            read_interval: DEFAULT_READ_INTERVAL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the event store could not be read or the checkpoint written")]
    Database(#[from] sqlx::Error),
    #[error("JetStream did not accept the events")]
    Publish(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the relay's leadership lock connection was lost")]
    LostLock,
}

/// Progress the relay reports, for readiness and metrics.
#[derive(Debug, Default)]
pub struct RelayProgress {
    /// The last position acknowledged by JetStream.
    pub published: AtomicI64,
}

pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    topology: Topology,
    options: RelayOptions,
    wake: Arc<Notify>,
    progress: Arc<RelayProgress>,
}

impl Relay {
    pub fn new(pool: PgPool, js: jetstream::Context, topology: Topology, options: RelayOptions) -> Self {
        let mut js = js;
        js.set_timeout(options.ack_timeout);
        Self {
            pool,
            js,
            topology,
            options,
            wake: Arc::new(Notify::new()),
            progress: Arc::default(),
        }
    }

    /// Wake the relay when this process commits (see `Store::committed`).
    pub fn with_wake(mut self, wake: Arc<Notify>) -> Self {
        self.wake = wake;
        self
    }

    pub fn progress(&self) -> Arc<RelayProgress> {
        self.progress.clone()
    }

    /// Runs until the task is dropped. Errors are logged and retried with backoff; they
    /// never lose an event.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.lead().await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), ?backoff, "relay interrupted; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Takes the leadership lock (waiting as a standby while another relay holds it), then
    /// publishes until an error.
    async fn lead(&self) -> Result<(), RelayError> {
        let mut lock = PgConnection::connect_with(&self.pool.connect_options()).await?;
        let key = format!("factory-relay:{}", self.options.name);
        loop {
            let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(&key)
                .fetch_one(&mut lock)
                .await?;
            if acquired {
                break;
            }
            tracing::debug!("another relay is active; standing by");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tracing::info!(name = %self.options.name, "relay active");
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("factory_events").await?;
        self.topology
            .ensure_streams(&self.js)
            .await
            .map_err(|e| RelayError::Publish(Box::new(e)))?;
        let mut cursor = self.recover().await?;
        self.progress.published.store(cursor.position, Ordering::Relaxed);
        // A relay that died busy may have left the NOTIFY hint off.
        self.request_notify(true).await?;
        let mut notify_requested = true;
        let mut horizon = Horizon::default();
        let mut lock_checked = Instant::now();
        let mut short_pause = MIN_SHORT_PAUSE;
        let mut quiet_polls = 0;
        loop {
            let looked = Instant::now();
            let (drawn, bound, xmin): (i64, i64, i64) =
                sqlx::query_as("SELECT last_position, bound, xmin FROM events_horizon()")
                    .fetch_one(&self.pool)
                    .await?;
            let previous_safe = horizon.safe;
            let safe = horizon.observe(drawn, bound, xmin);
            let mut full_batch = false;
            if safe > cursor.position {
                full_batch = self.publish_up_to(&mut cursor, safe).await?;
            }
            if lock_checked.elapsed() > Duration::from_secs(1) {
                sqlx::query("SELECT 1").execute(&mut lock).await.map_err(|_| RelayError::LostLock)?;
                lock_checked = Instant::now();
            }
            if full_batch {
                continue;
            }
            // Busy (events flowing, or transactions in flight): poll soon, backing off while
            // nothing moves, and tell writers not to NOTIFY (it serialises their commits).
            // Quiet for a while: ask for NOTIFY again, look once more, then sleep until woken
            // or the backstop poll.
            let busy = safe > previous_safe || horizon.is_waiting();
            if busy {
                quiet_polls = 0;
            } else {
                quiet_polls += 1;
            }
            if safe > previous_safe {
                short_pause = MIN_SHORT_PAUSE;
            }
            let pause = if busy || quiet_polls <= QUIET_POLLS_BEFORE_IDLE {
                if busy && notify_requested {
                    self.request_notify(false).await?;
                    notify_requested = false;
                }
                let pause = short_pause;
                short_pause = (short_pause * 2).min(MAX_SHORT_PAUSE);
                pause
            } else if !notify_requested {
                self.request_notify(true).await?;
                notify_requested = true;
                continue;
            } else {
                self.options.poll_interval
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                notification = listener.recv() => {
                    if let Err(error) = notification {
                        tracing::debug!(%error, "LISTEN connection interrupted; it reconnects");
                    }
                }
                _ = tokio::time::sleep(pause) => {}
            }
            // At most one look per read interval (a full batch aside): each costs the same
            // whatever it finds (the horizon, a read, the publishes' round trip, the
            // checkpoint), and looking at every commit of a single run (one every
            // millisecond or two) took CPU that the next commit waited for.
            tokio::time::sleep_until((looked + self.options.read_interval).into()).await;
        }
    }

    /// Whether writers should NOTIFY on commit (the `relay_wake` hint).
    async fn request_notify(&self, requested: bool) -> Result<(), RelayError> {
        sqlx::query(
            "INSERT INTO relay_wake (id, requested) VALUES (true, $1) \
             ON CONFLICT (id) DO UPDATE SET requested = $1",
        )
        .bind(requested)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Where to resume: the checkpoint, reconciled with what the stream actually holds.
    async fn recover(&self) -> Result<Cursor, RelayError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT position, stream_sequence FROM relay_checkpoints WHERE name = $1",
        )
        .bind(&self.options.name)
        .fetch_optional(&self.pool)
        .await?;
        let (mut position, mut stream_sequence) = row.unwrap_or((0, 0));
        let mut already = HashMap::new();
        let publish_err = |e: Box<dyn std::error::Error + Send + Sync>| RelayError::Publish(e);
        let mut stream = self
            .js
            .get_stream(&self.topology.events_stream)
            .await
            .map_err(|e| publish_err(e.into()))?;
        let state = stream.info().await.map_err(|e| publish_err(e.into()))?.state.clone();
        let last = state.last_sequence;
        if state.messages == 0 || last < stream_sequence as u64 {
            // The stream holds less than we published (lost or recreated): publish again
            // from what it still has.
            let kept = if state.messages == 0 {
                0
            } else {
                self.position_at(&stream, last).await?
            };
            if position > kept {
                tracing::warn!(checkpoint = position, stream_has = kept, "stream is behind the store; republishing");
            }
            position = position.min(kept);
            stream_sequence = last as i64;
        } else if last > stream_sequence as u64 {
            // Published after the last checkpoint (a crash between PubAck and checkpoint):
            // remember those positions so they are not published a second time.
            const MAX_SCAN: u64 = 50_000;
            let from = (stream_sequence as u64 + 1).max(last.saturating_sub(MAX_SCAN));
            for seq in from..=last {
                let envelope = self.envelope_at(&stream, seq).await?;
                already.insert(envelope.position, envelope.hash);
            }
            stream_sequence = last as i64;
        }
        Ok(Cursor { position, stream_sequence, already })
    }

    async fn position_at(&self, stream: &jetstream::stream::Stream, seq: u64) -> Result<i64, RelayError> {
        Ok(self.envelope_at(stream, seq).await?.position)
    }

    async fn envelope_at(&self, stream: &jetstream::stream::Stream, seq: u64) -> Result<EventEnvelope, RelayError> {
        let message = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| RelayError::Publish(e.into()))?;
        serde_json::from_slice(&message.payload).map_err(|e| RelayError::Publish(e.into()))
    }

    /// Publishes one batch after `cursor` up to `safe`; true when more are waiting.
    async fn publish_up_to(&self, cursor: &mut Cursor, safe: i64) -> Result<bool, RelayError> {
        let limit = self.options.batch_size as i64;
        let batch = events::stored_range_raw(&self.pool, cursor.position, safe, limit).await?;
        let full = batch.len() as i64 == limit;
        let mut acks = Vec::with_capacity(batch.len());
        for envelope in &batch {
            // Skip only the very same event: after a database restore a position can be
            // drawn again for a different event, which must be published.
            if cursor.already.remove(&envelope.position).is_some_and(|hash| hash == envelope.hash) {
                continue;
            }
            let subject = self.topology.event_subject(
                envelope.run_id.map(|r| r.to_string()).as_deref(),
                &envelope.aggregate_type,
                &envelope.event_type,
            );
            let body = envelope.to_body();
            let ack = self
                .js
                .send_publish(subject, jetstream::message::PublishMessage::build().payload(body.into()).headers(cloud_event_headers(envelope)))
                .await
                .map_err(|e| RelayError::Publish(e.into()))?;
            acks.push(ack);
        }
        let mut stream_sequence = cursor.stream_sequence;
        for ack in acks {
            let ack = ack.await.map_err(|e| RelayError::Publish(e.into()))?;
            if !ack.duplicate {
                stream_sequence = stream_sequence.max(ack.sequence as i64);
            }
        }
        // Every position up to `safe` is settled; when the batch was not full we have seen
        // all of them, including gaps left by aborted transactions.
        let position = if full {
            batch.last().map(|e| e.position).unwrap_or(cursor.position)
        } else {
            safe
        };
        // Committed without waiting for its WAL flush (`synchronous_commit` off for this
        // transaction only): a checkpoint lost in a crash is an older one, and `recover`
        // reads what the stream holds past it instead of publishing it again. Waiting cost a
        // flush per batch, one per stage of a single run, each one queued with the appends'.
        sqlx::query(
            "WITH no_flush AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)) \
             INSERT INTO relay_checkpoints (name, position, stream_sequence) SELECT $1, $2, $3 FROM no_flush \
             ON CONFLICT (name) DO UPDATE SET position = $2, stream_sequence = $3, updated_at = now()",
        )
        .bind(&self.options.name)
        .bind(position)
        .bind(stream_sequence)
        .execute(&self.pool)
        .await?;
        cursor.position = position;
        cursor.stream_sequence = stream_sequence;
        self.progress.published.store(position, Ordering::Relaxed);
        Ok(full)
    }
}

struct Cursor {
    position: i64,
    stream_sequence: i64,
    /// Events (position -> hash) found in the stream past the checkpoint at start-up.
    already: HashMap<i64, String>,
}

/// The safe horizon (see the module docs): positions drawn, each waiting for every
/// transaction id below its bound to end.
#[derive(Debug, Default)]
struct Horizon {
    waiting: VecDeque<(i64, i64)>,
    safe: i64,
}

impl Horizon {
    fn observe(&mut self, drawn: i64, bound: i64, xmin: i64) -> i64 {
        if xmin >= bound {
            // Nothing older than this call is running: everything drawn so far is settled,
            // and so is everything observed before (bounds only grow).
            self.waiting.clear();
            self.safe = self.safe.max(drawn);
            return self.safe;
        }
        while let Some(&(position, until)) = self.waiting.front() {
            if until > xmin {
                break;
            }
            self.safe = self.safe.max(position);
            self.waiting.pop_front();
        }
        // An earlier entry with the same position settles sooner; keep only growth.
        if drawn > self.safe && self.waiting.back().is_none_or(|&(p, _)| p < drawn) {
            self.waiting.push_back((drawn, bound));
        }
        self.safe
    }

    fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::Horizon;

    #[test]
    fn nothing_older_running_makes_everything_drawn_safe() {
        let mut h = Horizon::default();
        // This call's own id is 500 and the oldest running transaction is itself.
        assert_eq!(h.observe(10, 500, 500), 10);
        assert!(!h.is_waiting());
    }

    #[test]
    fn running_transactions_hold_the_horizon_until_they_end() {
        let mut h = Horizon::default();
        // Position 11 drawn; transaction 100 still runs (bound 102).
        assert_eq!(h.observe(11, 102, 100), 0);
        assert!(h.is_waiting());
        // 100 ended, 101 still runs: ids below 102 have not all ended.
        assert_eq!(h.observe(12, 104, 101), 0);
        // Everything below 102 ended: 11 is safe; 12 waits for everything below 104.
        assert_eq!(h.observe(12, 106, 103), 11);
        assert_eq!(h.observe(12, 108, 104), 12);
        assert!(!h.is_waiting());
    }

    #[test]
    fn a_running_transaction_above_the_latest_completed_one_still_holds_it() {
        // The trap of using a snapshot's xmax: transactions 200 and 201 run with nothing
        // committed since 199, so a snapshot reads xmin = xmax = 200. Our bound (202) says
        // otherwise: position 7, drawn by one of them, is not safe.
        let mut h = Horizon::default();
        assert_eq!(h.observe(7, 202, 200), 0);
        assert_eq!(h.observe(7, 203, 201), 0);
        assert_eq!(h.observe(7, 204, 202), 7);
    }

    #[test]
    fn horizon_never_goes_back() {
        let mut h = Horizon::default();
        assert_eq!(h.observe(20, 7, 7), 20);
        assert_eq!(h.observe(20, 9, 8), 20);
        assert_eq!(h.observe(25, 10, 10), 25);
    }
}
