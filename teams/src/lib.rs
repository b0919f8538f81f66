//! The Factory's teams: the 17 teams of the contract, the pipelines that order them (as data,
//! in `teams/pipelines/*.toml`), and the gate every team's answer passes through.
//!
//! Depends on `factory-domain` only (plus serde, toml, schemars). No I/O, except reading a
//! user's pipeline file in [`Pipeline::load`]; no async, no broker, no database.
//!
//! Start reading at [`pipeline`]: the file format and how stages become ready; then [`gate`]:
//! how a model's raw answer becomes a [`factory_domain::TaskResult`] or a repair request.

pub mod catalog;
pub mod gate;
pub mod model;
pub mod operative;
pub mod orchestrator;
pub mod pipeline;
pub mod scripted;
pub mod tools;
pub mod worker;

pub use gate::{GateError, parse_task_result, repair_prompt, task_result_schema};
pub use pipeline::{ALIASES, BUILTIN_PIPELINES, Pipeline, PipelineError, Problem, Stage, TEAM_IDS};
