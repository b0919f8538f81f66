//! The model router: an alias becomes an ordered chain of `provider:model` targets; each
//! target gets a deadline and retries with exponential backoff and full jitter on 429
//! (honouring `Retry-After`), 5xx, timeouts and unreachable servers, then the next target is
//! tried. The answer carries its cost (pricing table) and the targets that failed before it.
//! Budgets: at a team's limit its calls go to the downgrade alias; past the hard limit the
//! call is refused with [`ModelError::BudgetExceeded`] (the operative then answers BLOCKED).

use crate::providers::{ProviderSettings, RigProviders};
use crate::routing::{ProviderKind, RoutingConfig, Target, demo_chain};
use factory_teams::model::{Message, ModelError, ModelFuture, ModelProvider, ModelRequest, ModelResponse};
use factory_teams::scripted::should_fail_first_target;
use rand::Rng;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub struct Router {
    config: RoutingConfig,
    demo: bool,
    rig: RigProviders,
    scripted: Arc<dyn ModelProvider>,
    /// Chains changed at run time (`factory models set`), over the configured ones.
    overrides: RwLock<BTreeMap<String, Vec<Target>>>,
    unpriced: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("demo", &self.demo).field("providers", &self.rig).finish()
    }
}

/// Why one attempt failed, as the event records it (`http_500`, `timeout`, ...).
fn reason(error: &ModelError) -> String {
    match error {
        ModelError::Http { status, .. } => format!("http_{status}"),
        ModelError::Timeout => "timeout".into(),
        ModelError::Unreachable(_) => "unreachable".into(),
        ModelError::Protocol(_) => "bad_response".into(),
        ModelError::NotConfigured(_) => "not_configured".into(),
        ModelError::Exhausted { .. } => "exhausted".into(),
        ModelError::BudgetExceeded { .. } => "budget".into(),
    }
}

fn retryable(error: &ModelError) -> bool {
    match error {
        ModelError::Http { status, .. } => *status == 429 || *status == 408 || *status >= 500,
        ModelError::Timeout | ModelError::Unreachable(_) => true,
        _ => false,
    }
}

impl Router {
    /// `scripted` answers `scripted:` targets (the demo script, or a wrapper of it).
    pub fn new(config: RoutingConfig, settings: ProviderSettings, scripted: Arc<dyn ModelProvider>) -> Result<Self, ModelError> {
        let demo = config.demo.unwrap_or(!settings.any());
        Ok(Self {
            config,
            demo,
            rig: RigProviders::new(settings)?,
            scripted,
            overrides: RwLock::new(BTreeMap::new()),
            unpriced: Mutex::new(HashSet::new()),
        })
    }

    /// Demo mode: every alias is answered by the scripted provider.
    pub fn is_demo(&self) -> bool {
        self.demo
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    pub fn providers(&self) -> &ProviderSettings {
        self.rig.settings()
    }

    /// Replaces the run-time chains (read from the `model_routing` table).
    pub fn set_overrides(&self, overrides: BTreeMap<String, Vec<Target>>) {
        *self.overrides.write().expect("overrides lock") = overrides;
    }

    /// The chain an alias resolves to now, before unavailable targets are skipped.
    pub fn chain(&self, alias: &str) -> Vec<Target> {
        if let Some(chain) = self.overrides.read().expect("overrides lock").get(alias) {
            return chain.clone();
        }
        if self.demo {
            return demo_chain(alias);
        }
        self.config.chains.get(alias).cloned().unwrap_or_default()
    }

    /// Whether a target can be called here (its provider is configured).
    pub fn available(&self, target: &Target) -> bool {
        match target.provider {
            ProviderKind::Scripted => true,
            ProviderKind::Local => false,
            other => self.rig.is_configured(other),
        }
    }

    fn cost(&self, target: &Target, response: &ModelResponse) -> f64 {
        match self.config.price(target) {
            Some(price) => price.cost(response.input_tokens, response.output_tokens),
            None => {
                if self.unpriced.lock().expect("unpriced lock").insert(target.to_string()) {
                    tracing::warn!(%target, "no price for this model in models.pricing: its calls cost 0");
                }
                0.0
            }
        }
    }

    fn backoff(&self, retry: u32) -> Duration {
        let policy = &self.config.retry;
        let ceiling = policy.base_backoff.saturating_mul(1u32 << retry.min(16)).min(policy.max_backoff);
        let ceiling_ms = ceiling.as_millis() as u64;
        Duration::from_millis(if ceiling_ms == 0 { 0 } else { rand::rng().random_range(0..=ceiling_ms) })
    }

    async fn attempt(&self, target: &Target, first_in_chain: bool, request: &ModelRequest) -> Result<ModelResponse, ModelError> {
        let call = async {
            match target.provider {
                ProviderKind::Scripted => {
                    if first_in_chain && should_fail_first_target(first_user_message(request), &request.alias) {
                        return Err(ModelError::Http { status: 500, retry_after: None });
                    }
                    self.scripted.complete(request).await
                }
                _ => self.rig.call(target, request).await,
            }
        };
        match tokio::time::timeout(self.config.retry.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(ModelError::Timeout),
        }
    }

    async fn route(&self, request: &ModelRequest) -> Result<ModelResponse, ModelError> {
        let budget = self.config.budgets.for_team(&request.team);
        if request.spent_usd >= budget.hard_limit_usd {
            return Err(ModelError::BudgetExceeded { spent_usd: request.spent_usd, limit_usd: budget.hard_limit_usd });
        }
        let alias = if request.spent_usd >= budget.limit_usd {
            self.config.budgets.downgrade_alias.clone()
        } else {
            request.alias.clone()
        };
        let downgraded;
        let request = if alias == request.alias {
            request
        } else {
            downgraded = ModelRequest { alias: alias.clone(), ..request.clone() };
            &downgraded
        };
        let chain: Vec<Target> = self.chain(&alias).into_iter().filter(|t| self.available(t)).collect();
        if chain.is_empty() {
            return Err(ModelError::NotConfigured(format!(
                "no provider of {alias}'s chain is configured (set a key, OLLAMA_URL, or run in demo mode)"
            )));
        }
        let mut failed = Vec::new();
        for (index, target) in chain.iter().enumerate() {
            let mut retries = 0;
            let why = loop {
                match self.attempt(target, index == 0, request).await {
                    Ok(mut response) => {
                        response.provider = target.provider.prefix().to_string();
                        response.model = target.model.clone();
                        response.alias = alias.clone();
                        response.cost_usd = self.cost(target, &response);
                        response.failed_targets = failed;
                        return Ok(response);
                    }
                    Err(error) => {
                        tracing::warn!(%target, alias = %alias, retry = retries, error = %error, "model call failed");
                        if !retryable(&error) || retries >= self.config.retry.max_retries {
                            break format!("{} after {} attempt(s)", reason(&error), retries + 1);
                        }
                        let wait = match error {
                            ModelError::Http { retry_after: Some(after), .. } => {
                                if after > self.config.retry.max_retry_after {
                                    break format!("{} with Retry-After {}s", reason(&error), after.as_secs());
                                }
                                after
                            }
                            _ => self.backoff(retries),
                        };
                        retries += 1;
                        tokio::time::sleep(wait).await;
                    }
                }
            };
            failed.push(format!("{target} ({why})"));
        }
        Err(ModelError::Exhausted { alias, attempts: failed })
    }
}

fn first_user_message(request: &ModelRequest) -> &str {
    request
        .messages
        .iter()
        .find_map(|m| match m {
            Message::User { content } => Some(content.as_str()),
            _ => None,
        })
        .unwrap_or_default()
}

impl ModelProvider for Router {
    fn complete<'a>(&'a self, request: &'a ModelRequest) -> ModelFuture<'a> {
        Box::pin(self.route(request))
    }

    /// In demo mode, unless a run-time chain names a provider that can be called here
    /// other than the scripted one.
    fn answers_in_process(&self) -> bool {
        self.demo
            && self.overrides.read().expect("overrides lock").values().flatten().all(|target| {
                target.provider == ProviderKind::Scripted || !self.available(target)
            })
    }
}
