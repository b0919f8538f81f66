//! The write side of the Factory: commands go through cqrs-es into the PostgreSQL event
//! store, and the relay publishes every stored event to JetStream.
//!
//! Depends on `factory-domain` (aggregates) and `factory-nats` (subjects, envelopes).
//! Start reading at [`store::Store`] (executing commands), then [`relay::Relay`]
//! (PostgreSQL -> JetStream) and [`audit`] (verifying the hash chains).

pub mod audit;
pub mod claims;
pub mod db;
pub mod events;
pub mod group_commit;
pub mod relay;
pub mod repository;
pub mod store;

pub use db::{DbError, connect, migrate, migrator};
pub use store::{CommandError, Committed, Store};
