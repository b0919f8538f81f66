//! The verbs that talk to a running stack: runs, events, replay, audit, schema.

use crate::config::Config;
use crate::stack;
use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use clap::Subcommand;
use factory_domain::RunId;
use factory_nats::{EventEnvelope, Topology};
use futures::StreamExt;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum EventsVerb {
    /// Print events as they arrive on JetStream. With `--run`, that run's events from its
    /// start; with `--from`, every event from that position; otherwise new events only.
    Tail {
        #[arg(long)]
        run: Option<RunId>,
        /// A store position (the `position` field of an event).
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        from: Option<i64>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON envelope per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ReplayVerb {
    /// The run's events in order, from the event store.
    Timeline {
        run_id: RunId,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild read models from the event store into new tables, then swap them in at once.
    Rebuild {
        /// `runs`, `graph`, `cost`, `activity`, or `all`.
        #[arg(long, default_value = "all")]
        projection: String,
    },
    /// The run as it was right after the event at `--at` (a store position; default: now):
    /// its status, stages, graph, costs and activity, folded from the store.
    State {
        run_id: RunId,
        #[arg(long)]
        at: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Execute the run's pipeline again with every model answer taken from its recorded
    /// `ModelCalled` events (no model is called, nothing is written) and report whether the
    /// same decisions follow. Exit 1 where they diverge.
    Rerun {
        run_id: RunId,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AuditVerb {
    /// Check every hash chain in the event store; exit 1 naming the first broken event.
    Verify {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum SchemaVerb {
    /// JSON Schemas of every event type.
    Events,
}

pub async fn events(verb: EventsVerb, config: &Config) -> Result<ExitCode> {
    let EventsVerb::Tail { run, from, count, json } = verb;
    let client = stack::connect_nats(config).await?;
    let js = jetstream::new(client);
    let topology = config.topology();
    let stream = js.get_stream(&topology.events_stream).await.with_context(|| {
        format!("no stream {} yet: the relay creates it (`./factory up`)", topology.events_stream)
    })?;
    let deliver_policy = match (from, run) {
        (Some(position), _) => match first_sequence_at(&stream, position).await? {
            Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            None => DeliverPolicy::New,
        },
        (None, Some(_)) => DeliverPolicy::All,
        (None, None) => DeliverPolicy::New,
    };
    let filter_subject = run
        .map(|r| topology.run_filter(&r.to_string()))
        .unwrap_or_else(|| topology.all_events_filter());
    let consumer = stream
        .create_consumer(OrderedConfig { filter_subject, deliver_policy, ..Default::default() })
        .await
        .context("creating an ordered consumer")?;
    let mut messages = consumer.messages().await.context("subscribing")?;
    let mut seen = 0u64;
    if count == Some(0) {
        return Ok(ExitCode::SUCCESS);
    }
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow!(e)).context("reading the stream")?;
        let envelope: EventEnvelope = match serde_json::from_slice(&message.payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(subject = %message.subject, %error, "not an event envelope; skipped");
                continue;
            }
        };
        if from.is_some_and(|f| envelope.position < f) {
            continue;
        }
        if json {
            println!("{}", serde_json::to_string(&envelope)?);
        } else {
            println!("{}", timeline_line(&envelope));
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The stream sequence of the first message whose position is at least `position`
/// (positions grow with stream sequences, so a binary search finds it).
async fn first_sequence_at(stream: &jetstream::stream::Stream, position: i64) -> Result<Option<u64>> {
    let info = stream.get_info().await.context("reading stream info")?;
    if info.state.messages == 0 {
        return Ok(None);
    }
    let (mut lo, mut hi) = (info.state.first_sequence, info.state.last_sequence + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let message = stream.get_raw_message(mid).await.context("reading a stream message")?;
        let envelope: EventEnvelope = serde_json::from_slice(&message.payload)?;
        if envelope.position < position {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok((lo <= info.state.last_sequence).then_some(lo))
}

/// A one-line summary of a payload: each field, long values shortened.
fn summary(payload: &serde_json::Value) -> String {
    fn short(text: &str, max: usize) -> String {
        let text = text.replace('\n', " ");
        if text.chars().count() <= max {
            text
        } else {
            format!("{}…", text.chars().take(max - 1).collect::<String>())
        }
    }
    let text = match payload {
        serde_json::Value::Object(fields) => fields
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={}", short(s, 48)),
                other => format!("{k}={}", short(&other.to_string(), 48)),
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    };
    short(&text, 200)
}

pub fn timeline_line(e: &EventEnvelope) -> String {
    format!(
        "#{:<6} {}  {:<9} {:<22} {}",
        e.position,
        e.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        e.aggregate_type,
        e.event_type,
        summary(&e.payload)
    )
}

async fn rerun(config: &Config, run_id: RunId, json: bool) -> Result<ExitCode> {
    let pool = stack::connect_db(config).await?;
    let scratch = config.scratch();
    let services: factory_domain::SharedServices = std::sync::Arc::new(factory_domain::SystemServices);
    let report = match factory_teams::rerun::rerun(&pool, run_id, scratch, services).await {
        Ok(report) => report,
        Err(error @ factory_teams::rerun::RerunError::NotFound(_)) => {
            eprintln!("error: {error}; `factory run list` shows the runs");
            return Ok(ExitCode::FAILURE);
        }
        Err(error) => return Err(anyhow::Error::new(error).context("re-running the run")),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "re-ran {run_id}: {} objectives, {} model answers replayed from the record, no model called",
            report.objectives, report.answers_replayed
        );
        println!("recorded status {}, re-run status {}", report.recorded_status, report.rerun_status);
        if report.unanswered > 0 {
            println!("{} requests had no recorded answer", report.unanswered);
        }
        if let Some(stopped) = &report.stopped {
            println!("stopped: {stopped}");
        }
        if report.identical() {
            println!("identical: the same {} decisions followed", report.decisions);
        } else {
            println!("DIVERGED in {} places:", report.divergences.len());
            for d in &report.divergences {
                println!("  {} [{}]", d.at, d.index);
                println!("    recorded: {}", d.recorded.as_deref().unwrap_or("(nothing)"));
                println!("    re-run:   {}", d.rerun.as_deref().unwrap_or("(nothing)"));
            }
        }
    }
    Ok(if report.identical() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub async fn replay(verb: ReplayVerb, config: &Config) -> Result<ExitCode> {
    let (run_id, json) = match verb {
        ReplayVerb::Timeline { run_id, json } => (run_id, json),
        ReplayVerb::Rebuild { projection } => return crate::projections::rebuild(config, &projection).await,
        ReplayVerb::State { run_id, at, json } => return crate::projections::state(config, run_id, at, json).await,
        ReplayVerb::Rerun { run_id, json } => return rerun(config, run_id, json).await,
    };
    let pool = stack::connect_db(config).await?;
    let events = factory_commands::events::run_events(&pool, run_id.0, None).await?;
    if events.is_empty() {
        bail!("no run {run_id} in the event store");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&events)?);
    } else {
        for event in &events {
            println!("{}", timeline_line(event));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(verb: AuditVerb, config: &Config) -> Result<ExitCode> {
    let AuditVerb::Verify { json } = verb;
    let pool = stack::connect_db(config).await?;
    let report = factory_commands::audit::verify(&pool).await?;
    if json {
        let broken: Vec<_> = report
            .broken
            .iter()
            .map(|b| {
                serde_json::json!({
                    "aggregate_type": b.aggregate_type, "aggregate_id": b.aggregate_id,
                    "sequence": b.sequence, "position": b.position, "reason": b.reason,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"events": report.events, "aggregates": report.aggregates,
                               "intact": broken.is_empty(), "broken": broken})
        );
    } else if report.broken.is_empty() {
        println!(
            "audit: {} events in {} aggregates; every hash chain is intact",
            report.events, report.aggregates
        );
    } else {
        let first = &report.broken[0];
        eprintln!(
            "audit: hash chain broken at {}/{} sequence {} (position {}): {}",
            first.aggregate_type, first.aggregate_id, first.sequence, first.position, first.reason
        );
        for other in report.broken.iter().skip(1).take(20) {
            eprintln!(
                "  also {}/{} sequence {} (position {}): {}",
                other.aggregate_type, other.aggregate_id, other.sequence, other.position, other.reason
            );
        }
    }
    Ok(if report.broken.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub fn schema(verb: SchemaVerb) -> Result<ExitCode> {
    let SchemaVerb::Events = verb;
    let topology = Topology::default();
    let events: Vec<_> = factory_domain::schema::all_event_schemas()
        .into_iter()
        .map(|s| {
            serde_json::json!({
                "aggregate_type": s.aggregate_type,
                "event_type": s.event_type,
                "event_version": s.event_version,
                "subject": topology.event_subject(Some("<run_id>"), s.aggregate_type, s.event_type).replace("_run_id_", "<run_id>"),
                "ce_type": format!("factory.{}.{}.v{}", s.aggregate_type, s.event_type, s.event_version),
                "schema": s.schema,
            })
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "events": events }))?);
    Ok(ExitCode::SUCCESS)
}
