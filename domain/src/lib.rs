//! The Factory's domain: the `Run` and `Objective` aggregates, their commands and events,
//! and the `TaskResult` every team answers with.
//!
//! This crate is pure: no tokio, no database, no broker. It depends only on cqrs-es's
//! `Aggregate` trait, serde and schemars. Everything else in the workspace depends on it.
//!
//! Start reading at [`run::Run`]: a run is one requirement going through a pipeline; each
//! stage of it becomes an [`objective::Objective`] for one team.

pub mod ids;
pub mod objective;
pub mod run;
pub mod schema;
pub mod services;
pub mod task_result;
pub mod upcast;

pub use ids::{ObjectiveId, RunId};
pub use objective::{Objective, ObjectiveCommand, ObjectiveError, ObjectiveEvent};
pub use run::{Run, RunCommand, RunError, RunEvent, RunStatus};
pub use services::{Services, SharedServices, SystemServices};
pub use task_result::{TaskResult, TaskStatus};

/// Largest requirement text accepted, in bytes. A requirement is a paragraph or a page, not
/// a document dump; larger input is refused with a message saying so.
pub const MAX_REQUIREMENT_BYTES: usize = 64 * 1024;
/// Largest title accepted, in characters.
pub const MAX_TITLE_CHARS: usize = 200;

/// Every event of every aggregate names the version of its payload's shape; readers of an
/// older version go through an upcaster (see [`upcast`]).
pub const EVENT_VERSION_1: &str = "1";
