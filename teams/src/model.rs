//! What an operative says to a model and what comes back, independent of any provider.
//!
//! The operative loop (`operative`) sends a [`ModelRequest`]; a [`ModelProvider`] answers with
//! text and/or tool calls. Real providers (OpenAI, Anthropic, Ollama, OpenAI-compatible) sit
//! behind the router; the scripted provider (`scripted`) plays them in demo mode and in tests.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Message {
    /// The objective, a repair request, or other instructions.
    User { content: String },
    /// What the model said before: text and the tools it called.
    Assistant { content: String, tool_calls: Vec<ToolCall> },
    /// The result of one tool call.
    Tool { call_id: String, content: String },
}

/// A tool the model may call (its arguments as a JSON Schema).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRequest {
    /// `factory/architect`, `factory/coder`, ... (the router resolves it to targets).
    pub alias: String,
    /// The team asking (providers may use it; the scripted one does).
    pub team: String,
    /// The team's identity (SOUL.md, AGENTS.md) as the system prompt.
    pub system: String,
    pub messages: Vec<Message>,
    pub tools: Vec<ToolSpec>,
    /// The JSON Schema the final answer must follow, where the provider supports it.
    pub response_schema: Option<Value>,
    /// What the team has spent in this run so far, in USD (the router applies its budget).
    /// Not part of the question: left out of the request's digest.
    #[serde(skip)]
    pub spent_usd: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelResponse {
    /// The final answer when there are no tool calls (a TaskResult, for an objective).
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub provider: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The alias that answered: the one asked for, or the budget's downgrade alias.
    /// Empty when the provider was called directly (no router).
    #[serde(default)]
    pub alias: String,
    /// From the router's pricing table; 0 when the model has no price.
    #[serde(default)]
    pub cost_usd: f64,
    /// Targets of the chain that failed before this one: `provider:model (why)`.
    #[serde(default)]
    pub failed_targets: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// HTTP status from the provider (429, 5xx, ...); `retry_after` from its header.
    #[error("the provider answered HTTP {status}")]
    Http { status: u16, retry_after: Option<std::time::Duration> },
    #[error("the provider did not answer in time")]
    Timeout,
    #[error("the provider's answer could not be read: {0}")]
    Protocol(String),
    #[error("the provider is not configured: {0}")]
    NotConfigured(String),
    #[error("the provider could not be reached: {0}")]
    Unreachable(String),
    /// Every target of the alias's chain failed; each as `provider:model (why)`.
    #[error("every target of {alias} failed: {}", attempts.join("; "))]
    Exhausted { alias: String, attempts: Vec<String> },
    /// The team is past its hard budget limit in this run.
    #[error("budget: the team has spent ${spent_usd:.4} of its ${limit_usd:.4} hard limit in this run")]
    BudgetExceeded { spent_usd: f64, limit_usd: f64 },
}

pub type ModelFuture<'a> = Pin<Box<dyn Future<Output = Result<ModelResponse, ModelError>> + Send + 'a>>;

/// Anything that answers model requests.
pub trait ModelProvider: Send + Sync {
    fn complete<'a>(&'a self, request: &'a ModelRequest) -> ModelFuture<'a>;

    /// Whether every call is answered inside this process, costing nothing and reaching
    /// nothing outside it (the scripted provider, a replay of recorded answers). Only such
    /// calls are made by work started ahead of the commit that assigns it, before that
    /// commit is known to stand (docs/architecture.md, "Work started ahead of its commit").
    fn answers_in_process(&self) -> bool {
        false
    }
}

/// The first line of every repair request, so that providers and tests can recognise one.
pub const REPAIR_MARKER: &str = "Your previous answer was not a valid TaskResult.";
