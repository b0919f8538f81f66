//! End-to-end tests of the event-sourced core against real PostgreSQL and NATS (started by
//! `factory-testkit`): the store's guarantees, the audit chain, and the relay.

mod evolution;
mod pipeline;
mod projections;
mod relay;
mod replay;
mod store;
mod support;
