//! JetStream for the Factory: stream topology, subjects, the event envelope published for
//! every stored event, and its CloudEvents headers.
//!
//! Depends on `factory-domain` for ids only; knows nothing of PostgreSQL. Start at
//! [`Topology`] (which streams and subjects exist) and [`EventEnvelope`] (what a message
//! on `FACTORY_EVENTS` carries).

mod envelope;
mod topology;

pub use envelope::{EventEnvelope, JsonText, PublishedEvent, RawEnvelope, cloud_event_headers};
pub use topology::{Topology, TopologyError, WORKER_PRESENCE_TTL};
