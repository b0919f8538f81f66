//! Streams and subjects, as contract §4 names them.

use async_nats::jetstream::{self, stream};
use std::time::Duration;

/// The names of the Factory's streams and subject prefixes.
///
/// Production uses [`Topology::default`]; tests give every test its own names through
/// [`Topology::namespaced`] so that they can share one nats-server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The stream every stored event is published to (`FACTORY_EVENTS`).
    pub events_stream: String,
    /// Subjects are `<events_prefix>.<run_id|system>.<aggregate_type>.<EventType>`.
    pub events_prefix: String,
    /// The work-queue stream of objectives for teams (`FACTORY_WORK`).
    pub work_stream: String,
    /// Subjects are `<work_prefix>.<team>`.
    pub work_prefix: String,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop a repeat.
    pub duplicate_window: Duration,
    /// The key-value bucket where each worker process says it is alive
    /// (`FACTORY_WORKERS`; see [`WORKER_PRESENCE_TTL`]).
    pub workers_bucket: String,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            events_stream: "FACTORY_EVENTS".into(),
            events_prefix: "factory.events".into(),
            work_stream: "FACTORY_WORK".into(),
            work_prefix: "factory.work".into(),
            duplicate_window: Duration::from_secs(120),
            workers_bucket: "FACTORY_WORKERS".into(),
        }
    }
}

/// How long a worker process's presence in the workers bucket outlives its last renewal: a
/// worker that renews no more (it died) is taken for gone after this.
pub const WORKER_PRESENCE_TTL: Duration = Duration::from_secs(15);

/// How long `FACTORY_WORK` remembers a work message's id (the objective id).
pub const WORK_DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("could not create or update JetStream stream `{stream}`")]
    Stream {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Topology {
    /// Streams and subjects under a namespace, e.g. `t42` gives `T42_FACTORY_EVENTS` on
    /// `t42.factory.events.>`.
    pub fn namespaced(namespace: &str) -> Self {
        let base = Self::default();
        Self {
            events_stream: format!("{}_{}", namespace.to_uppercase(), base.events_stream),
            events_prefix: format!("{namespace}.{}", base.events_prefix),
            work_stream: format!("{}_{}", namespace.to_uppercase(), base.work_stream),
            work_prefix: format!("{namespace}.{}", base.work_prefix),
            workers_bucket: format!("{}_{}", namespace.to_uppercase(), base.workers_bucket),
            ..base
        }
    }

    /// The subject of one event. Tokens come from our own ids and type names, which hold
    /// no `.`, `*` or `>`; anything else is replaced so a subject can never be malformed.
    pub fn event_subject(&self, run_id: Option<&str>, aggregate_type: &str, event_type: &str) -> String {
        format!(
            "{}.{}.{}.{}",
            self.events_prefix,
            subject_token(run_id.unwrap_or("system")),
            subject_token(aggregate_type),
            subject_token(event_type)
        )
    }

    /// All events of one run.
    pub fn run_filter(&self, run_id: &str) -> String {
        format!("{}.{}.>", self.events_prefix, subject_token(run_id))
    }

    /// All events.
    pub fn all_events_filter(&self) -> String {
        format!("{}.>", self.events_prefix)
    }

    /// Every event of one type of one aggregate type, of any run.
    pub fn event_type_filter(&self, aggregate_type: &str, event_type: &str) -> String {
        format!("{}.*.{}.{}", self.events_prefix, subject_token(aggregate_type), subject_token(event_type))
    }

    /// Work for one team.
    pub fn work_subject(&self, team: &str) -> String {
        format!("{}.{}", self.work_prefix, subject_token(team))
    }

    /// Creates the streams, or updates their configuration to ours.
    pub async fn ensure_streams(&self, js: &jetstream::Context) -> Result<(), TopologyError> {
        let events = stream::Config {
            name: self.events_stream.clone(),
            subjects: vec![self.all_events_filter()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: self.duplicate_window,
            allow_direct: true,
            description: Some("Every event of the Factory's event store, in position order".into()),
            ..Default::default()
        };
        let work = stream::Config {
            name: self.work_stream.clone(),
            subjects: vec![format!("{}.>", self.work_prefix)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::WorkQueue,
            // Work is re-queued whenever its run advances while the stage is in progress (a
            // crash may have come before the first publish); an hour covers slow stages.
            duplicate_window: WORK_DUPLICATE_WINDOW,
            description: Some("Objectives waiting for a team's worker".into()),
            ..Default::default()
        };
        let workers = async_nats::jetstream::kv::Config {
            bucket: self.workers_bucket.clone(),
            description: "Worker processes alive, each renewing its key".into(),
            history: 1,
            max_age: WORKER_PRESENCE_TTL,
            storage: stream::StorageType::Memory,
            ..Default::default()
        };
        js.create_or_update_key_value(workers).await.map_err(|source| TopologyError::Stream {
            stream: format!("KV_{}", self.workers_bucket),
            source: Box::new(source),
        })?;
        for config in [events, work] {
            let name = config.name.clone();
            let result = match js.get_stream(&name).await {
                Ok(_) => js.update_stream(config).await.map(|_| ()).map_err(|e| e.into()),
                Err(_) => js.create_stream(config).await.map(|_| ()).map_err(|e| e.into()),
            };
            result.map_err(|source: Box<dyn std::error::Error + Send + Sync>| TopologyError::Stream {
                stream: name,
                source,
            })?;
        }
        Ok(())
    }
}

fn subject_token(raw: &str) -> String {
    let token: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if token.is_empty() { "_".into() } else { token }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_contract() {
        let t = Topology::default();
        assert_eq!(
            t.event_subject(Some("0193c0de-0000-7000-8000-000000000001"), "run", "StageStarted"),
            "factory.events.0193c0de-0000-7000-8000-000000000001.run.StageStarted"
        );
        assert_eq!(t.event_subject(None, "settings", "BudgetSet"), "factory.events.system.settings.BudgetSet");
        assert_eq!(t.work_subject("qa-engineering"), "factory.work.qa-engineering");
        assert_eq!(t.event_type_filter("run", "StageCompleted"), "factory.events.*.run.StageCompleted");
        assert_eq!(t.event_subject(Some("a.b>*"), "run", "X"), "factory.events.a_b__.run.X");
    }

    #[test]
    fn namespaces_keep_tests_apart() {
        let t = Topology::namespaced("t7");
        assert_eq!(t.events_stream, "T7_FACTORY_EVENTS");
        assert_eq!(t.all_events_filter(), "t7.factory.events.>");
        assert_eq!(t.run_filter("r"), "t7.factory.events.r.>");
    }
}
