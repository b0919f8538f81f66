//! The real providers, through rig-core: OpenAI (chat completions), Anthropic (messages),
//! Ollama (native `/api/chat`) and any OpenAI-compatible server (a LiteLLM proxy, vLLM).
//! Our [`ModelRequest`] goes in, rig speaks the provider's wire format, a [`ModelResponse`]
//! comes out; a provider's failure becomes a [`ModelError`] the router can act on (status,
//! `Retry-After`). Keys come from the environment and are held as secrets: they are never in
//! a `Debug` output, a log line or an error.

use crate::routing::{ProviderKind, Target};
use factory_teams::model::{Message, ModelError, ModelFuture, ModelRequest, ModelResponse, ToolCall};
use rig_core::DynModel;
use rig_core::completion::message::{AssistantContent, AssistantMessage, CallId, ToolName, UserContent};
use rig_core::completion::{CompletionRequest, ToolDefinition};
use rig_core::error::ProviderError;
use rig_core::http_client::DynHttpClient;
use rig_core::operation::Completion;
use rig_core::providers::anthropic::AnthropicConfig;
use rig_core::providers::ollama::OllamaConfig;
use rig_core::providers::openai::OpenAIConfig;
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The answer length asked of Anthropic models (the API requires one).
pub const ANTHROPIC_MAX_TOKENS: u64 = 8192;

/// Where each real provider is and how to authenticate; `None` = not configured.
#[derive(Debug, Default, Clone)]
pub struct ProviderSettings {
    pub openai: Option<Endpoint>,
    pub anthropic: Option<Endpoint>,
    pub ollama: Option<Endpoint>,
    pub openai_compatible: Option<Endpoint>,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `None`: the provider's official URL.
    pub base_url: Option<String>,
    pub key: Option<SecretString>,
}

impl ProviderSettings {
    /// From `OPENAI_API_KEY` (+ `OPENAI_BASE_URL`), `ANTHROPIC_API_KEY` (+ `ANTHROPIC_BASE_URL`),
    /// `OLLAMA_URL`, `FACTORY_OPENAI_COMPATIBLE_URL` / `FACTORY_OPENAI_COMPATIBLE_KEY`.
    pub fn from_env(env: &[(String, String)]) -> Self {
        let get = |name: &str| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim().to_string()).filter(|v| !v.is_empty())
        };
        let keyed = |key: &str, url: &str| {
            get(key).map(|k| Endpoint { base_url: get(url), key: Some(SecretString::from(k)) })
        };
        Self {
            openai: keyed("OPENAI_API_KEY", "OPENAI_BASE_URL"),
            anthropic: keyed("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"),
            ollama: get("OLLAMA_URL").map(|url| Endpoint { base_url: Some(url), key: None }),
            openai_compatible: get("FACTORY_OPENAI_COMPATIBLE_URL").map(|url| Endpoint {
                base_url: Some(url),
                key: get("FACTORY_OPENAI_COMPATIBLE_KEY").map(SecretString::from),
            }),
        }
    }

    pub fn endpoint(&self, provider: ProviderKind) -> Option<&Endpoint> {
        match provider {
            ProviderKind::OpenAi => self.openai.as_ref(),
            ProviderKind::Anthropic => self.anthropic.as_ref(),
            ProviderKind::Ollama => self.ollama.as_ref(),
            ProviderKind::OpenAiCompatible => self.openai_compatible.as_ref(),
            ProviderKind::Local | ProviderKind::Scripted => None,
        }
    }

    /// Whether any real chat provider is configured (if none, the factory runs in demo mode).
    pub fn any(&self) -> bool {
        self.openai.is_some() || self.anthropic.is_some() || self.ollama.is_some() || self.openai_compatible.is_some()
    }

    /// The names of the configured providers, for the start-up banner.
    pub fn configured(&self) -> Vec<&'static str> {
        [ProviderKind::OpenAi, ProviderKind::Anthropic, ProviderKind::Ollama, ProviderKind::OpenAiCompatible]
            .into_iter()
            .filter(|p| self.endpoint(*p).is_some())
            .map(ProviderKind::prefix)
            .collect()
    }
}

/// The real providers, one rig model per target, built on first use over one HTTP client.
pub struct RigProviders {
    settings: ProviderSettings,
    http: DynHttpClient,
    models: Mutex<HashMap<Target, DynModel<Completion>>>,
}

impl std::fmt::Debug for RigProviders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RigProviders").field("configured", &self.settings.configured()).finish()
    }
}

impl RigProviders {
    pub fn new(settings: ProviderSettings) -> Result<Self, ModelError> {
        // reqwest is built without a crypto provider of its own: use ring, as the rest of the
        // factory does (a second install is refused, which is fine).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ModelError::NotConfigured(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            settings,
            http: DynHttpClient::new(rig_reqwest::ReqwestClient::from(client)),
            models: Mutex::new(HashMap::new()),
        })
    }

    pub fn settings(&self) -> &ProviderSettings {
        &self.settings
    }

    pub fn is_configured(&self, provider: ProviderKind) -> bool {
        self.settings.endpoint(provider).is_some()
    }

    fn model(&self, target: &Target) -> Result<DynModel<Completion>, ModelError> {
        let mut models = self.models.lock().expect("models lock");
        if let Some(model) = models.get(target) {
            return Ok(model.clone());
        }
        let endpoint = self
            .settings
            .endpoint(target.provider)
            .ok_or_else(|| ModelError::NotConfigured(format!("{} has no key or URL set", target.provider.prefix())))?;
        let key = endpoint.key.as_ref().map(|k| k.expose_secret().to_string()).unwrap_or_default();
        let http = self.http.clone();
        let model: DynModel<Completion> = match target.provider {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => {
                let mut config = OpenAIConfig::new(key);
                if endpoint.key.is_none() {
                    // A keyless proxy (vLLM, a local LiteLLM) gets no `Authorization` header.
                    config = config.with_auth(rig_core::providers::openai::wire::Auth::OptionalBearer);
                }
                if let Some(url) = &endpoint.base_url {
                    config = config.with_base_url(url.trim_end_matches('/'));
                }
                config.connect(http).chat(target.model.clone()).erase()
            }
            ProviderKind::Anthropic => {
                let mut config = AnthropicConfig::new(key);
                if let Some(url) = &endpoint.base_url {
                    config = config.with_base_url(url);
                }
                config.connect(http).completion(target.model.clone()).erase()
            }
            ProviderKind::Ollama => {
                let mut config = OllamaConfig::new();
                if let Some(url) = &endpoint.base_url {
                    config = config.with_base_url(url);
                }
                if let Some(key) = &endpoint.key {
                    config = config.with_api_key(key.expose_secret().to_string());
                }
                config.connect(http).native_completion(target.model.clone()).erase()
            }
            ProviderKind::Local | ProviderKind::Scripted => {
                return Err(ModelError::NotConfigured(format!("{target} is not a chat model")));
            }
        };
        models.insert(target.clone(), model.clone());
        Ok(model)
    }

    /// One call to one target (no retries: the router decides those).
    pub fn call<'a>(&'a self, target: &'a Target, request: &'a ModelRequest) -> ModelFuture<'a> {
        Box::pin(async move {
            let model = self.model(target)?;
            let mut rig_request = to_rig(request)?;
            if target.provider == ProviderKind::Anthropic && rig_request.max_tokens.is_none() {
                // Anthropic requires `max_tokens`; rig knows a default only for the models in
                // its catalog, and refuses to build the request for any other name.
                rig_request.max_tokens = Some(ANTHROPIC_MAX_TOKENS);
            }
            let response = model.call(rig_request).await.map_err(from_rig)?;
            let mut content = String::new();
            let mut tool_calls = Vec::new();
            for block in &response.choice {
                match block {
                    AssistantContent::Text(text) => content.push_str(&text.text),
                    AssistantContent::ToolCall(call) => tool_calls.push(ToolCall {
                        id: call.id.wire().into_owned(),
                        name: call.function.name.as_str().to_string(),
                        arguments: serde_json::Value::Object(call.function.arguments.clone()),
                    }),
                    _ => {}
                }
            }
            Ok(ModelResponse {
                content,
                tool_calls,
                provider: target.provider.prefix().to_string(),
                model: target.model.clone(),
                input_tokens: response.usage.input_tokens.unwrap_or(0),
                output_tokens: response.usage.output_tokens.unwrap_or(0),
                ..ModelResponse::default()
            })
        })
    }
}

fn tool_name(name: &str) -> Result<ToolName, ModelError> {
    ToolName::new(name).map_err(|_| ModelError::Protocol("a tool call without a tool name".into()))
}

/// Our conversation in rig's terms: the system prompt first, tool results grouped into the
/// user turn that follows the assistant's calls (as Anthropic requires), the TaskResult
/// schema as the structured-output schema where the provider has one.
pub fn to_rig(request: &ModelRequest) -> Result<CompletionRequest, ModelError> {
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut messages: Vec<rig_core::completion::Message> = Vec::new();
    let mut pending_results: Vec<UserContent> = Vec::new();
    for message in &request.messages {
        if !matches!(message, Message::Tool { .. }) && !pending_results.is_empty() {
            messages.push(rig_core::completion::Message::User { content: std::mem::take(&mut pending_results) });
        }
        match message {
            Message::User { content } => messages.push(rig_core::completion::Message::user(content.clone())),
            Message::Assistant { content, tool_calls } => {
                let mut blocks = Vec::new();
                if !content.is_empty() {
                    blocks.push(AssistantContent::text(content.clone()));
                }
                for call in tool_calls {
                    names.insert(&call.id, &call.name);
                    blocks.push(AssistantContent::tool_call(call.id.clone(), tool_name(&call.name)?, call.arguments.clone()));
                }
                if blocks.is_empty() {
                    blocks.push(AssistantContent::text("(no answer)"));
                }
                messages.push(rig_core::completion::Message::Assistant(AssistantMessage::new(blocks)));
            }
            Message::Tool { call_id, content } => {
                let name = names.get(call_id.as_str()).copied().unwrap_or("tool");
                pending_results.push(UserContent::tool_result(
                    CallId::from_wire(call_id.clone()),
                    tool_name(name)?,
                    vec![rig_core::completion::message::ToolResultContent::text(content.clone())],
                ));
            }
        }
    }
    if !pending_results.is_empty() {
        messages.push(rig_core::completion::Message::User { content: pending_results });
    }
    // rig's request is "the prompt" (the last message) plus the history before it.
    let prompt = messages.pop().ok_or_else(|| ModelError::Protocol("a request without messages".into()))?;
    let mut rig = CompletionRequest::new(prompt).messages(messages);
    if !request.system.is_empty() {
        rig = rig.preamble(request.system.clone());
    }
    let tools = request
        .tools
        .iter()
        .map(|t| Ok(ToolDefinition::new(tool_name(&t.name)?, t.description.clone(), t.parameters.clone())))
        .collect::<Result<Vec<_>, ModelError>>()?;
    rig = rig.tools(tools);
    if let Some(schema) = &request.response_schema {
        rig.output_schema = schemars::Schema::try_from(schema.clone()).ok();
    }
    Ok(rig)
}

/// A provider's failure as the router sees it. Bodies are cut short: they may be large, and
/// they never carry our key (the provider does not echo it).
pub fn from_rig(error: ProviderError) -> ModelError {
    match error {
        ProviderError::ProviderResponse(reply) | ProviderError::InvalidAuthentication(reply) => match reply.status {
            Some(status) => ModelError::Http {
                status: status.as_u16(),
                retry_after: reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("retry-after"))
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
            },
            None => ModelError::Protocol(format!("the provider reported a failure: {}", cut(&reply.body))),
        },
        ProviderError::Http(error) => ModelError::Unreachable(cut(&error.to_string())),
        other => ModelError::Protocol(cut(&other.to_string())),
    }
}

/// `Retry-After` in seconds (fractions allowed); an HTTP date is not honoured (backoff applies).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

fn cut(text: &str) -> String {
    const MAX: usize = 300;
    if text.chars().count() <= MAX { text.to_string() } else { format!("{}…", text.chars().take(MAX).collect::<String>()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_in_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn settings_come_from_the_environment_and_hide_keys() {
        let env = vec![
            ("OPENAI_API_KEY".to_string(), "sk-secret-123".to_string()),
            ("OLLAMA_URL".to_string(), "http://127.0.0.1:11434".to_string()),
            ("ANTHROPIC_API_KEY".to_string(), "  ".to_string()),
        ];
        let settings = ProviderSettings::from_env(&env);
        assert!(settings.any());
        assert_eq!(settings.configured(), vec!["openai", "ollama"]);
        let shown = format!("{settings:?}");
        assert!(!shown.contains("sk-secret-123"), "{shown}");
        assert!(!ProviderSettings::from_env(&[]).any());
    }

    #[test]
    fn tool_results_follow_the_assistant_turn_grouped() {
        let request = ModelRequest {
            alias: "factory/coder".into(),
            team: "backend-engineering".into(),
            system: "You are the backend team.".into(),
            messages: vec![
                Message::User { content: "Build it".into() },
                Message::Assistant {
                    content: String::new(),
                    tool_calls: vec![
                        ToolCall { id: "c1".into(), name: "write_file".into(), arguments: serde_json::json!({"path": "a"}) },
                        ToolCall { id: "c2".into(), name: "list_files".into(), arguments: serde_json::json!({}) },
                    ],
                },
                Message::Tool { call_id: "c1".into(), content: "ok".into() },
                Message::Tool { call_id: "c2".into(), content: "a".into() },
            ],
            tools: vec![],
            response_schema: Some(serde_json::json!({"type": "object"})),
            spent_usd: 0.0,
        };
        let rig = to_rig(&request).unwrap();
        assert_eq!(rig.system_instructions(), Some("You are the backend team."));
        // system, user, assistant, one user turn with both results
        assert_eq!(rig.chat_history.len(), 4);
        match &rig.chat_history[3] {
            rig_core::completion::Message::User { content } => assert_eq!(content.len(), 2),
            other => panic!("{other:?}"),
        }
        assert!(rig.output_schema.is_some());
    }
}
