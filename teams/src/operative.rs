//! One team working one objective: the conversation with a model, the tools it calls, and
//! the TaskResult gate at the end (with one repair request for a malformed answer).

use crate::catalog::Team;
use crate::gate::{parse_task_result, repair_prompt, task_result_schema};
use crate::model::{Message, ModelError, ModelProvider, ModelRequest, ModelResponse};
use crate::tools::{ToolRegistry, Workspace};
use factory_domain::{TaskResult, TaskStatus};
use sha2::{Digest, Sha256};
use std::time::Instant;

/// Turns (model calls) one objective may take, tool calls included.
pub const MAX_TURNS: usize = 12;

/// One model call, with what the `ModelCalled` event records.
#[derive(Debug, Clone)]
pub struct ModelCall {
    pub alias: String,
    pub provider: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// `ok`, `fallback` (an earlier target of the chain failed), `downgraded` (the budget
    /// sent the call to the downgrade alias), or both.
    pub outcome: String,
    pub failed_targets: Vec<String>,
    pub latency_ms: u64,
    pub request_digest: String,
    pub response: String,
}

impl From<ModelCall> for factory_domain::objective::ModelCalled {
    fn from(call: ModelCall) -> Self {
        Self {
            alias: call.alias,
            provider: call.provider,
            model: call.model,
            input_tokens: call.input_tokens,
            output_tokens: call.output_tokens,
            cost_usd: call.cost_usd,
            latency_ms: call.latency_ms,
            outcome: call.outcome,
            failed_targets: call.failed_targets,
            request_digest: call.request_digest,
            response: call.response,
        }
    }
}

#[derive(Debug)]
pub struct Outcome {
    pub result: TaskResult,
    /// Workspace paths the tools wrote, in order, without repeats.
    pub written: Vec<String>,
    /// When the answer stayed malformed after the repair request: the raw text.
    pub unparsed: Option<String>,
}

/// Works an objective to a TaskResult. Model errors end the attempt (the caller retries or
/// escalates), except a team past its budget, which answers BLOCKED (reason: budget);
/// `spent_usd` is what the team has spent in the run before this objective.
/// A malformed answer gets one repair request, then becomes BLOCKED. Each model
/// call is handed to `on_call` as soon as it returns, so that it is recorded even if the
/// attempt dies later (the only copy of it: the outcome does not keep the calls).
#[allow(clippy::too_many_arguments)]
pub async fn work(
    provider: &dyn ModelProvider,
    team: &Team,
    alias: &str,
    objective_prompt: String,
    tools: &ToolRegistry,
    granted: &[String],
    workspace: &Workspace,
    spent_usd: f64,
    on_call: &(dyn Fn(ModelCall) + Send + Sync),
) -> Result<Outcome, ModelError> {
    let mut request = ModelRequest {
        alias: alias.to_string(),
        team: team.id.to_string(),
        system: team.system_prompt(),
        messages: vec![Message::User { content: objective_prompt }],
        tools: tools.specs_for(granted),
        response_schema: Some(task_result_schema()),
        spent_usd,
    };
    let mut written: Vec<String> = Vec::new();
    let mut repaired = false;
    for _ in 0..MAX_TURNS {
        let started = Instant::now();
        let response = match provider.complete(&request).await {
            Ok(response) => response,
            Err(ModelError::BudgetExceeded { spent_usd, limit_usd }) => {
                let result = blocked(
                    format!("the team reached its hard budget limit for this run (${limit_usd:.4}); no further model calls"),
                    format!("budget: ${spent_usd:.4} spent of ${limit_usd:.4}"),
                );
                return Ok(Outcome { result, written, unparsed: None });
            }
            Err(error) => return Err(error),
        };
        let call = record(&request, &response, started);
        request.spent_usd += call.cost_usd;
        on_call(call);
        if !response.tool_calls.is_empty() {
            let mut results = Vec::new();
            for call in &response.tool_calls {
                let outcome = tools.call(workspace, granted, call);
                if let Some(path) = &outcome.written
                    && !written.contains(path)
                {
                    written.push(path.clone());
                }
                results.push(Message::Tool { call_id: call.id.clone(), content: outcome.output });
            }
            request.messages.push(Message::Assistant {
                content: response.content.clone(),
                tool_calls: response.tool_calls.clone(),
            });
            request.messages.extend(results);
            continue;
        }
        match parse_task_result(&response.content) {
            Ok(result) => return Ok(Outcome { result, written, unparsed: None }),
            Err(error) if !repaired => {
                repaired = true;
                request.messages.push(Message::Assistant { content: response.content.clone(), tool_calls: vec![] });
                request.messages.push(Message::User { content: repair_prompt(&error, &response.content) });
            }
            Err(error) => {
                let result = blocked(
                    "the team's answer was not a valid TaskResult, even after a repair request".into(),
                    format!("malformed answer: {error}"),
                );
                return Ok(Outcome { result, written, unparsed: Some(response.content) });
            }
        }
    }
    Ok(Outcome {
        result: blocked(format!("the team did not answer within {MAX_TURNS} model calls"), "too many tool-call turns".into()),
        written,
        unparsed: None,
    })
}

fn blocked(reasoning: String, blocker: String) -> TaskResult {
    TaskResult {
        status: TaskStatus::Blocked,
        reasoning,
        blockers: vec![blocker],
        assumptions_made: vec![],
        verified_facts: vec![],
        clarification_needed: None,
        artifacts: vec![],
    }
}

/// sha256 of a request as sent (the budget left out): what a re-run matches answers by.
pub fn request_digest(request: &ModelRequest) -> String {
    // The request's JSON, hashed as it is written (the same bytes as `to_vec`).
    let mut hasher = Sha256::new();
    let _ = serde_json::to_writer(&mut hasher, request);
    hex(&hasher.finalize())
}

fn record(request: &ModelRequest, response: &ModelResponse, started: Instant) -> ModelCall {
    /// The answer as recorded: the same JSON as a `{"content", "tool_calls"}` object,
    /// written from the response in place (no copy of its tool calls' arguments).
    #[derive(serde::Serialize)]
    struct Said<'a> {
        content: &'a str,
        tool_calls: &'a [crate::model::ToolCall],
    }
    let response_text =
        serde_json::to_string(&Said { content: &response.content, tool_calls: &response.tool_calls }).unwrap_or_default();
    let alias = if response.alias.is_empty() { request.alias.clone() } else { response.alias.clone() };
    let outcome = match (alias != request.alias, !response.failed_targets.is_empty()) {
        (false, false) => "ok",
        (false, true) => "fallback",
        (true, false) => "downgraded",
        (true, true) => "downgraded+fallback",
    };
    ModelCall {
        alias,
        outcome: outcome.to_string(),
        cost_usd: response.cost_usd,
        failed_targets: response.failed_targets.clone(),
        provider: response.provider.clone(),
        model: response.model.clone(),
        input_tokens: response.input_tokens,
        output_tokens: response.output_tokens,
        latency_ms: started.elapsed().as_millis() as u64,
        request_digest: request_digest(request),
        response: response_text,
    }
}

pub fn hex(bytes: &[u8]) -> String {
    factory_commands::events::hex(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ToolCall;

    #[test]
    fn a_call_records_the_answer_as_the_json_of_its_content_and_tool_calls() {
        let request = ModelRequest {
            alias: "factory/coder".into(),
            team: "backend-engineering".into(),
            system: "You build it.".into(),
            messages: vec![Message::User { content: "Build it".into() }],
            tools: vec![],
            response_schema: None,
            spent_usd: 0.0,
        };
        let response = ModelResponse {
            content: "done \"quoted\"\n".into(),
            tool_calls: vec![ToolCall {
                id: "call-1".into(),
                name: "write_file".into(),
                arguments: serde_json::json!({"path": "src/main.rs", "content": "fn main() {}\n", "mode": {"z": 1, "a": [true, null]}}),
            }],
            ..ModelResponse::default()
        };
        let call = record(&request, &response, Instant::now());
        let parsed: serde_json::Value = serde_json::from_str(&call.response).unwrap();
        assert_eq!(parsed, serde_json::json!({"content": response.content, "tool_calls": response.tool_calls}));
        // Fields in the order the types declare them, whatever serde_json's features (a
        // `Value` in between wrote them sorted, or not, depending on the build).
        assert!(call.response.starts_with(r#"{"content":"done \"quoted\"\n","tool_calls":[{"id":"call-1","name":"write_file","arguments":{"#), "{}", call.response);
    }
}
