//! The router against real HTTP: each test starts local fake provider servers that record
//! what they are sent and answer from a script in the provider's own wire format (OpenAI
//! chat completions, Anthropic messages, Ollama `/api/chat`), then checks both sides: the
//! request rig put on the wire, and the `ModelResponse` / `ModelError` the router made of
//! the answer (retries, fallback, timeouts, budgets, pricing, secrecy of keys).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use factory_models::providers::Endpoint;
use factory_models::routing::{Budget, Price};
use factory_models::{ProviderSettings, Router, RoutingConfig, Target};
use factory_teams::model::{Message, ModelError, ModelProvider, ModelRequest, ModelResponse, ToolCall, ToolSpec};
use factory_teams::scripted::ScriptedProvider;
use secrecy::SecretString;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// A fake provider server
// ---------------------------------------------------------------------------------------------

/// One scripted answer.
#[derive(Clone, Debug)]
struct Reply {
    status: StatusCode,
    headers: Vec<(&'static str, &'static str)>,
    body: Value,
    delay: Duration,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self::status(200, body)
    }

    fn status(status: u16, body: Value) -> Self {
        Self { status: StatusCode::from_u16(status).unwrap(), headers: Vec::new(), body, delay: Duration::ZERO }
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// One request as the server received it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Value,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone)]
struct Shared {
    /// Answers in order; the last one repeats once the others are used.
    script: Arc<Mutex<VecDeque<Reply>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// A local HTTP server on 127.0.0.1:0, stopped when dropped.
struct FakeServer {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    async fn start(script: impl IntoIterator<Item = Reply>) -> Self {
        let shared = Shared {
            script: Arc::new(Mutex::new(script.into_iter().collect())),
            seen: Arc::new(Mutex::new(Vec::new())),
        };
        assert!(!shared.script.lock().unwrap().is_empty(), "a fake server needs at least one reply");
        let app = axum::Router::new().fallback(answer).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base, seen: shared.seen, task }
    }

    /// The server's root URL followed by `path` (`/v1` for OpenAI, empty for the others).
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The only request received.
    fn single(&self) -> Seen {
        let seen = self.requests();
        assert_eq!(seen.len(), 1, "expected exactly one request: {seen:#?}");
        seen.into_iter().next().unwrap()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(State(shared): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.seen.lock().unwrap().push(Seen { method, path: uri.path().to_string(), headers, body });
    let reply = {
        let mut script = shared.script.lock().unwrap();
        if script.len() > 1 { script.pop_front().unwrap() } else { script[0].clone() }
    };
    tokio::time::sleep(reply.delay).await;
    let mut response = (reply.status, axum::Json(reply.body)).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Provider wire formats (answers)
// ---------------------------------------------------------------------------------------------

fn openai_reply(message: Value, finish_reason: &str, prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": OPENAI_MODEL,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        }
    })
}

fn openai_text(content: &str, prompt_tokens: u64, completion_tokens: u64) -> Value {
    openai_reply(json!({"role": "assistant", "content": content, "refusal": null}), "stop", prompt_tokens, completion_tokens)
}

fn openai_tool_call(id: &str, name: &str, arguments: &Value, prompt_tokens: u64, completion_tokens: u64) -> Value {
    let call = json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments.to_string()}});
    openai_reply(
        json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [call]}),
        "tool_calls",
        prompt_tokens,
        completion_tokens,
    )
}

fn anthropic_reply(content: Value, stop_reason: &str, input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "id": "msg_01test",
        "type": "message",
        "role": "assistant",
        "model": ANTHROPIC_MODEL,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}
    })
}

fn anthropic_text(text: &str, input_tokens: u64, output_tokens: u64) -> Value {
    anthropic_reply(json!([{"type": "text", "text": text}]), "end_turn", input_tokens, output_tokens)
}

fn ollama_reply(message: Value, prompt_eval_count: u64, eval_count: u64) -> Value {
    json!({
        "model": OLLAMA_MODEL,
        "created_at": "2025-01-01T00:00:00.000000Z",
        "message": message,
        "done_reason": "stop",
        "done": true,
        "total_duration": 1_000_000,
        "load_duration": 1_000,
        "prompt_eval_count": prompt_eval_count,
        "prompt_eval_duration": 1_000,
        "eval_count": eval_count,
        "eval_duration": 1_000
    })
}

// ---------------------------------------------------------------------------------------------
// The router and its requests
// ---------------------------------------------------------------------------------------------

const OPENAI_KEY: &str = "sk-test-openai-4f1c9e0d7b2a";
const ANTHROPIC_KEY: &str = "sk-ant-test-8e3d5a1b6c0f";
const COMPATIBLE_KEY: &str = "sk-test-compatible-2b7e";
const OPENAI_MODEL: &str = "gpt-test";
/// A model in rig's Claude catalog; `anthropic_model_outside_rigs_catalog` covers the rest
/// (rig has no `max_tokens` default for them; the router sends one).
const ANTHROPIC_MODEL: &str = "claude-sonnet-4-test";
const OLLAMA_MODEL: &str = "qwen-test";
const SYSTEM: &str = "You are the backend-engineering team.";

fn target(text: &str) -> Target {
    text.parse().unwrap()
}

fn openai_target() -> Target {
    target(&format!("openai:{OPENAI_MODEL}"))
}

fn anthropic_target() -> Target {
    target(&format!("anthropic:{ANTHROPIC_MODEL}"))
}

/// Not demo; factory/coder = OpenAI then Anthropic; fast retries and a generous deadline.
fn config() -> RoutingConfig {
    let mut config = RoutingConfig { demo: Some(false), ..RoutingConfig::default() };
    config.chains.insert("factory/coder".into(), vec![openai_target(), anthropic_target()]);
    config.retry.base_backoff = Duration::from_millis(10);
    config.retry.max_backoff = Duration::from_millis(50);
    config.retry.timeout = Duration::from_secs(10);
    config
}

fn endpoint(url: String, key: Option<&str>) -> Option<Endpoint> {
    Some(Endpoint { base_url: Some(url), key: key.map(|k| SecretString::from(k.to_string())) })
}

/// OpenAI at `openai` (under `/v1`, as `OPENAI_BASE_URL` is written), Anthropic at
/// `anthropic` (its root, as `ANTHROPIC_BASE_URL` is written).
fn settings(openai: Option<&FakeServer>, anthropic: Option<&FakeServer>) -> ProviderSettings {
    ProviderSettings {
        openai: openai.and_then(|s| endpoint(s.url("/v1"), Some(OPENAI_KEY))),
        anthropic: anthropic.and_then(|s| endpoint(s.url(""), Some(ANTHROPIC_KEY))),
        ..ProviderSettings::default()
    }
}

fn router(config: RoutingConfig, settings: ProviderSettings) -> Router {
    Router::new(config, settings, Arc::new(ScriptedProvider::new())).unwrap()
}

fn request(messages: Vec<Message>) -> ModelRequest {
    ModelRequest {
        alias: "factory/coder".into(),
        team: "backend-engineering".into(),
        system: SYSTEM.into(),
        messages,
        tools: Vec::new(),
        response_schema: None,
        spent_usd: 0.0,
    }
}

fn ask(text: &str) -> ModelRequest {
    request(vec![Message::User { content: text.into() }])
}

fn write_file_parameters() -> Value {
    json!({
        "type": "object",
        "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        "required": ["path", "content"]
    })
}

fn write_file_tool() -> ToolSpec {
    ToolSpec { name: "write_file".into(), description: "Write a file of the workspace.".into(), parameters: write_file_parameters() }
}

fn write_file_arguments() -> Value {
    json!({"path": "src/main.rs", "content": "fn main() {}\n"})
}

/// The user asked, the assistant called `write_file` (id `call_id`), the tool answered.
fn after_tool_call(call_id: &str) -> ModelRequest {
    let mut request = request(vec![
        Message::User { content: "Build it".into() },
        Message::Assistant {
            content: "Writing the entry point.".into(),
            tool_calls: vec![ToolCall { id: call_id.into(), name: "write_file".into(), arguments: write_file_arguments() }],
        },
        Message::Tool { call_id: call_id.into(), content: "wrote src/main.rs".into() },
    ]);
    request.tools = vec![write_file_tool()];
    request
}

fn assert_cost(response: &ModelResponse, expected: f64) {
    assert!((response.cost_usd - expected).abs() < 1e-12, "cost {} != {expected}", response.cost_usd);
}

// ---------------------------------------------------------------------------------------------
// OpenAI chat completions
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn openai_sends_system_tools_and_key_and_reads_a_tool_call() {
    let arguments = write_file_arguments();
    let server = FakeServer::start([Reply::ok(openai_tool_call("call_abc123", "write_file", &arguments, 1200, 300))]).await;
    let mut config = config();
    config.pricing.insert(format!("openai:{OPENAI_MODEL}"), Price { input_per_mtok: 2.0, output_per_mtok: 8.0 });
    let router = router(config, settings(Some(&server), None));
    let mut request = ask("Build a URL shortener");
    request.tools = vec![write_file_tool()];

    let response = router.complete(&request).await.unwrap();

    let sent = server.single();
    assert_eq!(sent.method, Method::POST);
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.header("authorization"), Some(format!("Bearer {OPENAI_KEY}").as_str()));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_eq!(sent.body["model"], OPENAI_MODEL);
    let messages = sent.body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[0]["content"], json!([{"type": "text", "text": SYSTEM}]));
    assert_eq!(messages[1], json!({"role": "user", "content": "Build a URL shortener"}));
    assert_eq!(
        sent.body["tools"],
        json!([{"type": "function", "function": {
            "name": "write_file",
            "description": "Write a file of the workspace.",
            "parameters": write_file_parameters()
        }}])
    );
    assert!(sent.body.get("response_format").is_none(), "{}", sent.body);
    assert_ne!(sent.body["stream"], json!(true));

    assert_eq!(
        response.tool_calls,
        vec![ToolCall { id: "call_abc123".into(), name: "write_file".into(), arguments }]
    );
    assert_eq!(response.content, "");
    assert_eq!((response.input_tokens, response.output_tokens), (1200, 300));
    assert_eq!((response.provider.as_str(), response.model.as_str()), ("openai", OPENAI_MODEL));
    assert_eq!(response.alias, "factory/coder");
    // (1200 x $2 + 300 x $8) per million tokens
    assert_cost(&response, 0.0048);
    assert!(response.failed_targets.is_empty(), "{:?}", response.failed_targets);
}

#[tokio::test]
async fn openai_json_mode_sends_the_schema_as_response_format() {
    let answer = r#"{"status":"DONE","summary":"built"}"#;
    let server = FakeServer::start([Reply::ok(openai_text(answer, 50, 12))]).await;
    let router = router(config(), settings(Some(&server), None));
    let schema = json!({
        "title": "TaskResult",
        "type": "object",
        "properties": {"status": {"type": "string", "enum": ["DONE", "BLOCKED"]}, "summary": {"type": "string"}},
        "required": ["status", "summary"],
        "additionalProperties": false
    });
    let mut request = ask("Report");
    request.response_schema = Some(schema.clone());

    let response = router.complete(&request).await.unwrap();

    let sent = server.single();
    assert_eq!(
        sent.body["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "TaskResult", "strict": true, "schema": schema}})
    );
    assert!(sent.body.get("tools").is_none(), "{}", sent.body);
    assert_eq!(response.content, answer);
    assert!(response.tool_calls.is_empty());
    assert_eq!((response.input_tokens, response.output_tokens), (50, 12));
    // gpt-test has no price
    assert_eq!(response.cost_usd, 0.0);

    // With tools and no tool result yet, rig holds the schema back (OpenAI cannot combine
    // a forced JSON answer with tool calls in one turn).
    request.tools = vec![write_file_tool()];
    router.complete(&request).await.unwrap();
    let sent = server.requests().pop().unwrap();
    assert!(sent.body.get("response_format").is_none(), "{}", sent.body);
    assert!(sent.body.get("tools").is_some());
}

// ---------------------------------------------------------------------------------------------
// Anthropic messages
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn anthropic_sends_key_version_system_and_tools_and_reads_tool_use_and_text() {
    let arguments = write_file_arguments();
    let tool_use = anthropic_reply(
        json!([
            {"type": "text", "text": "Writing the entry point."},
            {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "write_file", "input": arguments}
        ]),
        "tool_use",
        900,
        120,
    );
    let server = FakeServer::start([Reply::ok(tool_use), Reply::ok(anthropic_text("All done.", 1000, 20))]).await;
    let mut config = config();
    config.chains.insert("factory/coder".into(), vec![anthropic_target()]);
    config.pricing.insert(anthropic_target().to_string(), Price { input_per_mtok: 3.0, output_per_mtok: 15.0 });
    let router = router(config, settings(None, Some(&server)));
    let mut request = ask("Build a URL shortener");
    request.tools = vec![write_file_tool()];

    let first = router.complete(&request).await.unwrap();
    let second = router.complete(&request).await.unwrap();

    let seen = server.requests();
    assert_eq!(seen.len(), 2);
    let sent = &seen[0];
    assert_eq!(sent.method, Method::POST);
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert!(sent.header("authorization").is_none());
    assert_eq!(sent.body["model"], ANTHROPIC_MODEL);
    assert!(sent.body["max_tokens"].as_u64().is_some_and(|n| n > 0), "{}", sent.body);
    assert_eq!(sent.body["system"], json!([{"type": "text", "text": SYSTEM}]));
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Build a URL shortener"}]}])
    );
    let tools = sent.body["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0]["name"], "write_file");
    assert_eq!(tools[0]["description"], "Write a file of the workspace.");
    assert_eq!(tools[0]["input_schema"], write_file_parameters());

    assert_eq!(first.content, "Writing the entry point.");
    assert_eq!(
        first.tool_calls,
        vec![ToolCall { id: "toolu_01A09q90qw90lq917835lq9".into(), name: "write_file".into(), arguments }]
    );
    assert_eq!((first.input_tokens, first.output_tokens), (900, 120));
    assert_eq!((first.provider.as_str(), first.model.as_str()), ("anthropic", ANTHROPIC_MODEL));
    // (900 x $3 + 120 x $15) per million tokens
    assert_cost(&first, 0.0045);
    assert!(first.failed_targets.is_empty());

    assert_eq!(second.content, "All done.");
    assert!(second.tool_calls.is_empty());
    assert_eq!((second.input_tokens, second.output_tokens), (1000, 20));
}

#[tokio::test]
async fn anthropic_tool_results_follow_the_tool_use_they_answer() {
    let server = FakeServer::start([Reply::ok(anthropic_text("Done.", 10, 2))]).await;
    let mut config = config();
    config.chains.insert("factory/coder".into(), vec![anthropic_target()]);
    let router = router(config, settings(None, Some(&server)));

    let response = router.complete(&after_tool_call("toolu_01XYZ")).await.unwrap();

    assert_eq!(response.content, "Done.");
    let sent = server.single();
    assert_eq!(
        sent.body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Build it"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Writing the entry point."},
                {"type": "tool_use", "id": "toolu_01XYZ", "name": "write_file", "input": write_file_arguments()}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01XYZ", "content": [{"type": "text", "text": "wrote src/main.rs"}]}
            ]}
        ])
    );
}

/// A Claude model rig does not know (an older name, a gateway's alias) still gets a request:
/// rig has no `max_tokens` default for it, so the router sets one.
#[tokio::test]
async fn anthropic_model_outside_rigs_catalog() {
    let server = FakeServer::start([Reply::ok(anthropic_text("Done.", 10, 2))]).await;
    let mut config = config();
    config.chains.insert("factory/coder".into(), vec![target("anthropic:claude-test")]);
    let router = router(config, settings(None, Some(&server)));

    let response = router.complete(&ask("Build it")).await;

    assert_eq!(response.map(|r| r.content).map_err(|e| e.to_string()), Ok("Done.".to_string()));
    let sent = server.single();
    assert_eq!(sent.body["model"], "claude-test");
    assert_eq!(sent.body["max_tokens"], factory_models::providers::ANTHROPIC_MAX_TOKENS);
}

// ---------------------------------------------------------------------------------------------
// Ollama /api/chat
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ollama_native_chat_sends_tools_and_reads_tool_calls_and_content() {
    let arguments = write_file_arguments();
    let tool_call = ollama_reply(
        json!({"role": "assistant", "content": "", "tool_calls": [
            {"function": {"index": 0, "name": "write_file", "arguments": arguments}}
        ]}),
        400,
        40,
    );
    let text = ollama_reply(json!({"role": "assistant", "content": "All done."}), 500, 5);
    let server = FakeServer::start([Reply::ok(tool_call), Reply::ok(text)]).await;
    let mut config = config();
    config.chains.insert("factory/coder".into(), vec![target(&format!("ollama:{OLLAMA_MODEL}"))]);
    let settings = ProviderSettings { ollama: endpoint(server.url(""), None), ..ProviderSettings::default() };
    let router = router(config, settings);
    let mut request = ask("Build a URL shortener");
    request.tools = vec![write_file_tool()];

    let first = router.complete(&request).await.unwrap();

    let sent = server.single();
    assert_eq!((sent.method.clone(), sent.path.as_str()), (Method::POST, "/api/chat"));
    assert!(sent.header("authorization").is_none());
    assert_eq!(sent.body["model"], OLLAMA_MODEL);
    assert_eq!(sent.body["stream"], json!(false));
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Build a URL shortener"}])
    );
    assert_eq!(
        sent.body["tools"],
        json!([{"type": "function", "function": {
            "name": "write_file",
            "description": "Write a file of the workspace.",
            "parameters": write_file_parameters()
        }}])
    );
    assert_eq!(first.tool_calls.len(), 1, "{first:?}");
    let call = &first.tool_calls[0];
    assert_eq!((call.name.as_str(), &call.arguments), ("write_file", &arguments));
    // Ollama sends no call id: rig issues one, which the next turn must carry back.
    assert!(!call.id.is_empty());
    assert_eq!(first.content, "");
    assert_eq!((first.input_tokens, first.output_tokens), (400, 40));
    assert_eq!((first.provider.as_str(), first.model.as_str()), ("ollama", OLLAMA_MODEL));

    let second = router.complete(&after_tool_call(&call.id)).await.unwrap();

    assert_eq!(second.content, "All done.");
    assert!(second.tool_calls.is_empty());
    assert_eq!((second.input_tokens, second.output_tokens), (500, 5));
    let sent = server.requests().pop().unwrap();
    let messages = sent.body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{messages:#?}");
    assert_eq!(messages[2]["role"], "assistant");
    assert_eq!(messages[2]["tool_calls"][0]["id"], call.id.as_str());
    assert_eq!(messages[2]["tool_calls"][0]["function"]["name"], "write_file");
    assert_eq!(
        messages[3],
        json!({"role": "tool", "content": "wrote src/main.rs", "tool_name": "write_file", "tool_call_id": call.id})
    );
}

// ---------------------------------------------------------------------------------------------
// Retries, fallback, timeouts, failures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_on_the_same_target() {
    let limited = json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}});
    let server = FakeServer::start([
        Reply::status(429, limited).header("retry-after", "1"),
        Reply::ok(openai_text("hello", 5, 1)),
    ])
    .await;
    let router = router(config(), settings(Some(&server), None));

    let started = Instant::now();
    let response = router.complete(&ask("Hi")).await.unwrap();
    let elapsed = started.elapsed();

    assert!(elapsed >= Duration::from_millis(950), "answered after {elapsed:?}, before Retry-After");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let seen = server.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.path == "/v1/chat/completions"));
    assert_eq!(seen[0].body, seen[1].body, "the retry sends the same request");
    assert_eq!(response.content, "hello");
    assert_eq!(response.provider, "openai");
    assert!(response.failed_targets.is_empty(), "{:?}", response.failed_targets);
}

#[tokio::test]
async fn a_failing_first_target_falls_back_to_the_second_after_its_retries() {
    let broken = json!({"error": {"message": "The server had an error", "type": "server_error"}});
    let openai = FakeServer::start([Reply::status(500, broken)]).await;
    let anthropic = FakeServer::start([Reply::ok(anthropic_text("from claude", 30, 4))]).await;
    let config = config();
    let attempts = config.retry.max_retries + 1;
    let router = router(config, settings(Some(&openai), Some(&anthropic)));

    let response = router.complete(&ask("Hi")).await.unwrap();

    assert_eq!(openai.requests().len(), attempts as usize);
    assert_eq!(anthropic.requests().len(), 1);
    assert_eq!(response.content, "from claude");
    assert_eq!((response.provider.as_str(), response.model.as_str()), ("anthropic", ANTHROPIC_MODEL));
    assert_eq!(response.failed_targets, vec![format!("openai:{OPENAI_MODEL} (http_500 after {attempts} attempt(s))")]);
}

#[tokio::test]
async fn a_target_slower_than_the_deadline_times_out_and_falls_back() {
    let openai = FakeServer::start([Reply::ok(openai_text("too late", 1, 1)).delayed(Duration::from_secs(3))]).await;
    let anthropic = FakeServer::start([Reply::ok(anthropic_text("in time", 30, 4))]).await;
    let mut config = config();
    config.retry.timeout = Duration::from_millis(300);
    config.retry.max_retries = 1;
    let router = router(config, settings(Some(&openai), Some(&anthropic)));

    let started = Instant::now();
    let response = router.complete(&ask("Hi")).await.unwrap();

    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(openai.requests().len(), 2);
    assert_eq!(response.content, "in time");
    assert_eq!(response.provider, "anthropic");
    assert_eq!(response.failed_targets, vec![format!("openai:{OPENAI_MODEL} (timeout after 2 attempt(s))")]);
}

#[tokio::test]
async fn when_every_target_fails_the_error_lists_them_and_hides_the_keys() {
    // Neither body echoes the key.
    let unauthorized = json!({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "code": "invalid_api_key"}});
    let overloaded = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
    let openai = FakeServer::start([Reply::status(401, unauthorized)]).await;
    let anthropic = FakeServer::start([Reply::status(529, overloaded)]).await;
    let config = config();
    let attempts = config.retry.max_retries + 1;
    let router = router(config, settings(Some(&openai), Some(&anthropic)));

    let error = router.complete(&ask("Hi")).await.unwrap_err();

    match &error {
        ModelError::Exhausted { alias, attempts: failed } => {
            assert_eq!(alias, "factory/coder");
            assert_eq!(
                failed,
                &vec![
                    format!("openai:{OPENAI_MODEL} (http_401 after 1 attempt(s))"),
                    format!("anthropic:{ANTHROPIC_MODEL} (http_529 after {attempts} attempt(s))"),
                ]
            );
        }
        other => panic!("expected Exhausted, got {other:?}"),
    }
    // A 401 is not retried; a 529 (overloaded) is.
    assert_eq!(openai.requests().len(), 1);
    assert_eq!(anthropic.requests().len(), attempts as usize);
    assert_eq!(openai.requests()[0].header("authorization"), Some(format!("Bearer {OPENAI_KEY}").as_str()));
    for shown in [error.to_string(), format!("{error:?}"), format!("{router:?}")] {
        for key in [OPENAI_KEY, ANTHROPIC_KEY] {
            assert!(!shown.contains(key), "the key {key} leaked: {shown}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Budgets and demo mode
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_team_over_its_budget_is_downgraded_then_refused() {
    let coder = FakeServer::start([Reply::ok(openai_text("from the coder model", 10, 2))]).await;
    let cheap = FakeServer::start([Reply::ok(openai_text("from the cheap model", 10, 2))]).await;
    let mut config = config();
    config.budgets.teams.insert("backend-engineering".into(), Budget { limit_usd: 0.001, hard_limit_usd: 0.002 });
    config.chains.insert("factory/coder".into(), vec![openai_target()]);
    config.chains.insert("factory/cheap".into(), vec![target("openai-compatible:cheap-test")]);
    let settings = ProviderSettings {
        openai: endpoint(coder.url("/v1"), Some(OPENAI_KEY)),
        openai_compatible: endpoint(cheap.url("/v1"), Some(COMPATIBLE_KEY)),
        ..ProviderSettings::default()
    };
    let router = router(config, settings);
    let with_spent = |spent_usd: f64| ModelRequest { spent_usd, ..ask("Hi") };

    let normal = router.complete(&with_spent(0.0)).await.unwrap();
    assert_eq!(normal.content, "from the coder model");
    assert_eq!((normal.alias.as_str(), normal.provider.as_str()), ("factory/coder", "openai"));
    assert_eq!(coder.single().body["model"], OPENAI_MODEL);
    assert!(cheap.requests().is_empty());

    let downgraded = router.complete(&with_spent(0.0015)).await.unwrap();
    assert_eq!(downgraded.content, "from the cheap model");
    assert_eq!(downgraded.alias, "factory/cheap");
    assert_eq!((downgraded.provider.as_str(), downgraded.model.as_str()), ("openai-compatible", "cheap-test"));
    let sent = cheap.single();
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.header("authorization"), Some(format!("Bearer {COMPATIBLE_KEY}").as_str()));
    assert_eq!(sent.body["model"], "cheap-test");
    assert_eq!(coder.requests().len(), 1);

    match router.complete(&with_spent(0.003)).await {
        Err(ModelError::BudgetExceeded { spent_usd, limit_usd }) => assert_eq!((spent_usd, limit_usd), (0.003, 0.002)),
        other => panic!("expected BudgetExceeded, got {other:?}"),
    }
    assert_eq!((coder.requests().len(), cheap.requests().len()), (1, 1), "a refused call makes no request");
}

#[tokio::test]
async fn demo_mode_fails_the_first_scripted_target_on_request() {
    let mut config = config();
    config.demo = Some(true);
    let router = router(config, ProviderSettings::default());
    assert!(router.is_demo());

    let response = router.complete(&ask("Build a URL shortener #fail=factory/coder")).await.unwrap();

    assert_eq!((response.provider.as_str(), response.model.as_str()), ("scripted", "coder-fallback"));
    assert_eq!(response.alias, "factory/coder");
    assert_eq!(response.failed_targets.len(), 1, "{:?}", response.failed_targets);
    assert!(response.failed_targets[0].starts_with("scripted:coder (http_500"), "{:?}", response.failed_targets);
    assert!(!response.content.is_empty() || !response.tool_calls.is_empty());
    assert!(response.cost_usd > 0.0, "scripted:coder-fallback has a price");
}
