//! The Factory's teams at work: the 17 teams of the contract (their documents in
//! `teams/<id>/`), the pipelines that order them (data, in `teams/pipelines/*.toml`), the
//! gate every answer passes, and the runtime: the orchestrator (events in, commands out),
//! the workers (objectives from `FACTORY_WORK`), the operative loop with its tools, and the
//! scripted provider of demo mode.
//!
//! Depends on `factory-domain`, `factory-nats` and `factory-commands` (the write side); the
//! pure parts (`catalog`, `pipeline`, `gate`, `model`, `tools`, `scripted`) use none of the
//! runtime. Start reading at [`pipeline`] and [`gate`], then [`orchestrator`] and [`worker`].

pub mod catalog;
pub mod fork;
pub mod gate;
pub mod handoff;
mod lanes;
pub mod model;
pub mod operative;
pub mod orchestrator;
pub mod pipeline;
pub mod rerun;
pub mod scripted;
pub mod tools;
pub mod worker;

pub use gate::{GateError, parse_task_result, repair_prompt, task_result_schema};
pub use pipeline::{ALIASES, BUILTIN_PIPELINES, Pipeline, PipelineError, Problem, Stage, TEAM_IDS};
