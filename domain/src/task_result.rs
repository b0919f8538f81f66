//! The answer every team gives for an objective.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whether the team finished, needs another team's answer, or cannot go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    Complete,
    NeedsClarification,
    Blocked,
}

/// A team's answer to an objective, as the contract defines it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskResult {
    pub status: TaskStatus,
    /// Why the team decided what it did.
    pub reasoning: String,
    #[serde(default)]
    pub blockers: Vec<String>,
    #[serde(default)]
    pub assumptions_made: Vec<String>,
    #[serde(default)]
    pub verified_facts: Vec<String>,
    /// The question, when `status` is `NEEDS_CLARIFICATION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clarification_needed: Option<String>,
    /// Paths (in the run's workspace) of the files this answer produced.
    #[serde(default)]
    pub artifacts: Vec<String>,
}

impl TaskResult {
    /// An answer with `status` and `reasoning` and nothing else (no blockers, assumptions,
    /// facts, question or artifacts).
    pub fn new(status: TaskStatus, reasoning: impl Into<String>) -> Self {
        Self {
            status,
            reasoning: reasoning.into(),
            blockers: Vec::new(),
            assumptions_made: Vec::new(),
            verified_facts: Vec::new(),
            clarification_needed: None,
            artifacts: Vec::new(),
        }
    }
}
