//! What the router is told: aliases and their chains of `provider:model` targets, the retry
//! policy, the pricing table and the per-team budgets. Built-in defaults, overridden by the
//! `[models]` table of `factory.toml`; the chains can also be changed at run time (see
//! [`crate::overrides`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The aliases of contract §5.
pub const ALIASES: &[&str] = &["factory/architect", "factory/coder", "factory/fast", "factory/cheap", "local/embed"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
    Ollama,
    OpenAiCompatible,
    /// The built-in embedding model (`local/embed`); not a chat model.
    Local,
    /// The demo script.
    Scripted,
}

impl ProviderKind {
    pub fn prefix(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Ollama => "ollama",
            Self::OpenAiCompatible => "openai-compatible",
            Self::Local => "local",
            Self::Scripted => "scripted",
        }
    }

    const ALL: [ProviderKind; 6] =
        [Self::OpenAi, Self::Anthropic, Self::Ollama, Self::OpenAiCompatible, Self::Local, Self::Scripted];
}

/// One `provider:model` of a chain.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub provider: ProviderKind,
    pub model: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.provider.prefix(), self.model)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    #[error("`{0}` is not a target: write provider:model (providers: openai, anthropic, ollama, openai-compatible, local, scripted)")]
    BadTarget(String),
    #[error("unknown alias `{0}`; aliases: {aliases}", aliases = ALIASES.join(", "))]
    UnknownAlias(String),
    #[error("alias `{0}` has an empty chain")]
    EmptyChain(String),
    #[error("`{key}`: {problem}")]
    BadValue { key: String, problem: String },
}

impl FromStr for Target {
    type Err = RoutingError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        // `openai-compatible:` before `openai:`: the longest prefix wins.
        let mut kinds = ProviderKind::ALL;
        kinds.sort_by_key(|k| std::cmp::Reverse(k.prefix().len()));
        for kind in kinds {
            if let Some(model) = text.strip_prefix(kind.prefix()).and_then(|rest| rest.strip_prefix(':')) {
                let model = model.trim();
                if model.is_empty() || model.chars().any(char::is_whitespace) {
                    break;
                }
                return Ok(Target { provider: kind, model: model.to_string() });
            }
        }
        Err(RoutingError::BadTarget(text.to_string()))
    }
}

/// USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

impl Price {
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input_per_mtok + output_tokens as f64 * self.output_per_mtok) / 1_000_000.0
    }
}

/// Retries per target, then the next target of the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// One model call's deadline.
    pub timeout: Duration,
    /// Retries of one target after the first attempt (on 429, 5xx, timeouts, transport errors).
    pub max_retries: u32,
    /// The first backoff; doubled per retry, with full jitter, capped by `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// A `Retry-After` longer than this moves on to the next target instead of waiting.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
            max_retries: 2,
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// A team's spending limits per run, in USD.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// At this spend the team's calls go to [`Budgets::downgrade_alias`].
    pub limit_usd: f64,
    /// Past this spend the objective is BLOCKED (reason: budget).
    pub hard_limit_usd: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Budgets {
    pub default: Budget,
    pub teams: BTreeMap<String, Budget>,
    pub downgrade_alias: String,
}

impl Budgets {
    pub fn for_team(&self, team: &str) -> Budget {
        self.teams.get(team).copied().unwrap_or(self.default)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RoutingConfig {
    /// Alias -> ordered chain, used when a real provider is configured.
    pub chains: BTreeMap<String, Vec<Target>>,
    pub retry: RetryPolicy,
    /// `provider:model` -> price. A model without a price costs 0 (and a warning is logged once).
    pub pricing: BTreeMap<String, Price>,
    pub budgets: Budgets,
    /// Demo mode: every alias goes to the scripted provider, whatever the chains say.
    /// `None` decides from the environment (no provider configured -> demo).
    pub demo: Option<bool>,
}

fn chain(targets: &[&str]) -> Vec<Target> {
    targets.iter().map(|t| t.parse().expect("built-in targets parse")).collect()
}

impl Default for RoutingConfig {
    fn default() -> Self {
        let mut chains = BTreeMap::new();
        chains.insert(
            "factory/architect".into(),
            chain(&["anthropic:claude-sonnet-4-5", "openai:gpt-4.1", "openai-compatible:architect", "ollama:qwen2.5:14b"]),
        );
        chains.insert(
            "factory/coder".into(),
            chain(&["anthropic:claude-sonnet-4-5", "openai:gpt-4.1", "openai-compatible:coder", "ollama:qwen2.5-coder:14b"]),
        );
        chains.insert(
            "factory/fast".into(),
            chain(&["openai:gpt-4.1-mini", "anthropic:claude-haiku-4-5", "openai-compatible:fast", "ollama:llama3.2"]),
        );
        chains.insert(
            "factory/cheap".into(),
            chain(&["openai:gpt-4.1-nano", "anthropic:claude-haiku-4-5", "openai-compatible:cheap", "ollama:llama3.2"]),
        );
        chains.insert("local/embed".into(), chain(&["local:all-minilm-l6-v2"]));
        let mut pricing = BTreeMap::new();
        for (target, input, output) in [
            ("anthropic:claude-sonnet-4-5", 3.0, 15.0),
            ("anthropic:claude-haiku-4-5", 1.0, 5.0),
            ("openai:gpt-4.1", 2.0, 8.0),
            ("openai:gpt-4.1-mini", 0.4, 1.6),
            ("openai:gpt-4.1-nano", 0.1, 0.4),
            ("openai:gpt-4o", 2.5, 10.0),
            ("openai:gpt-4o-mini", 0.15, 0.6),
            // The demo script is priced like the models it stands in for, so that costs,
            // budgets and downgrades can be seen in demo mode.
            ("scripted:architect", 3.0, 15.0),
            ("scripted:architect-fallback", 2.0, 8.0),
            ("scripted:coder", 3.0, 15.0),
            ("scripted:coder-fallback", 2.0, 8.0),
            ("scripted:fast", 0.4, 1.6),
            ("scripted:fast-fallback", 1.0, 5.0),
            ("scripted:cheap", 0.1, 0.4),
            ("scripted:cheap-fallback", 0.15, 0.6),
        ] {
            pricing.insert(target.to_string(), Price { input_per_mtok: input, output_per_mtok: output });
        }
        Self {
            chains,
            retry: RetryPolicy::default(),
            pricing,
            budgets: Budgets {
                default: Budget { limit_usd: 5.0, hard_limit_usd: 10.0 },
                teams: BTreeMap::new(),
                downgrade_alias: "factory/cheap".into(),
            },
            demo: None,
        }
    }
}

/// The demo chain of an alias: the script, then its fallback (so that `#fail=` shows one).
pub fn demo_chain(alias: &str) -> Vec<Target> {
    let short = alias.rsplit('/').next().unwrap_or(alias);
    vec![
        Target { provider: ProviderKind::Scripted, model: short.to_string() },
        Target { provider: ProviderKind::Scripted, model: format!("{short}-fallback") },
    ]
}

pub fn check_alias(alias: &str) -> Result<(), RoutingError> {
    if ALIASES.contains(&alias) { Ok(()) } else { Err(RoutingError::UnknownAlias(alias.to_string())) }
}

/// Parses a chain written as strings, refusing an empty one.
pub fn parse_chain(alias: &str, targets: &[String]) -> Result<Vec<Target>, RoutingError> {
    check_alias(alias)?;
    if targets.is_empty() {
        return Err(RoutingError::EmptyChain(alias.to_string()));
    }
    targets.iter().map(|t| t.parse()).collect()
}

impl RoutingConfig {
    /// Applies the `[models]` table of `factory.toml` over the defaults. Unknown keys and bad
    /// values are refused with the key named (`models.retry.timeout_ms`, ...).
    pub fn from_toml(table: &toml::Table) -> Result<Self, RoutingError> {
        let mut config = Self::default();
        for (key, value) in table {
            match key.as_str() {
                "demo" => config.demo = Some(bool_of(value, "models.demo")?),
                "aliases" => {
                    for (alias, targets) in table_of(value, "models.aliases")? {
                        let key = format!("models.aliases.\"{alias}\"");
                        let targets: Vec<String> = targets
                            .as_array()
                            .ok_or_else(|| bad(&key, "expected a list of \"provider:model\" strings"))?
                            .iter()
                            .map(|t| t.as_str().map(str::to_string).ok_or_else(|| bad(&key, "expected strings")))
                            .collect::<Result<_, _>>()?;
                        let chain = parse_chain(alias, &targets).map_err(|e| bad(&key, &e.to_string()))?;
                        config.chains.insert(alias.clone(), chain);
                    }
                }
                "retry" => {
                    for (k, v) in table_of(value, "models.retry")? {
                        let key = format!("models.retry.{k}");
                        let ms = || u64_of(v, &key).map(Duration::from_millis);
                        match k.as_str() {
                            "timeout_ms" => config.retry.timeout = ms()?,
                            "max_retries" => config.retry.max_retries = u64_of(v, &key)? as u32,
                            "base_backoff_ms" => config.retry.base_backoff = ms()?,
                            "max_backoff_ms" => config.retry.max_backoff = ms()?,
                            "max_retry_after_ms" => config.retry.max_retry_after = ms()?,
                            _ => return Err(bad(&key, "unknown key (timeout_ms, max_retries, base_backoff_ms, max_backoff_ms, max_retry_after_ms)")),
                        }
                    }
                    if config.retry.timeout.is_zero() {
                        return Err(bad("models.retry.timeout_ms", "must be more than 0"));
                    }
                }
                "pricing" => {
                    for (target, price) in table_of(value, "models.pricing")? {
                        let key = format!("models.pricing.\"{target}\"");
                        target.parse::<Target>().map_err(|e| bad(&key, &e.to_string()))?;
                        let price = table_of(price, &key)?;
                        let mut parsed = Price { input_per_mtok: 0.0, output_per_mtok: 0.0 };
                        for (k, v) in price {
                            let key = format!("{key}.{k}");
                            match k.as_str() {
                                "input_per_mtok" => parsed.input_per_mtok = usd_of(v, &key)?,
                                "output_per_mtok" => parsed.output_per_mtok = usd_of(v, &key)?,
                                _ => return Err(bad(&key, "unknown key (input_per_mtok, output_per_mtok)")),
                            }
                        }
                        config.pricing.insert(target.clone(), parsed);
                    }
                }
                "budgets" => {
                    for (k, v) in table_of(value, "models.budgets")? {
                        let key = format!("models.budgets.{k}");
                        match k.as_str() {
                            "limit_usd" => config.budgets.default.limit_usd = usd_of(v, &key)?,
                            "hard_limit_usd" => config.budgets.default.hard_limit_usd = usd_of(v, &key)?,
                            "downgrade_alias" => {
                                let alias = v.as_str().ok_or_else(|| bad(&key, "expected an alias"))?;
                                check_alias(alias).map_err(|e| bad(&key, &e.to_string()))?;
                                config.budgets.downgrade_alias = alias.to_string();
                            }
                            "teams" => {
                                for (team, limits) in table_of(v, &key)? {
                                    let key = format!("{key}.{team}");
                                    if !factory_teams::catalog::TEAM_IDS.contains(&team.as_str()) {
                                        return Err(bad(&key, "unknown team"));
                                    }
                                    let mut budget = config.budgets.default;
                                    let mut hard_set = false;
                                    for (k, v) in table_of(limits, &key)? {
                                        let key = format!("{key}.{k}");
                                        match k.as_str() {
                                            "limit_usd" => budget.limit_usd = usd_of(v, &key)?,
                                            "hard_limit_usd" => {
                                                budget.hard_limit_usd = usd_of(v, &key)?;
                                                hard_set = true;
                                            }
                                            _ => return Err(bad(&key, "unknown key (limit_usd, hard_limit_usd)")),
                                        }
                                    }
                                    if !hard_set {
                                        budget.hard_limit_usd = budget.hard_limit_usd.max(budget.limit_usd * 2.0);
                                    }
                                    config.budgets.teams.insert(team.clone(), budget);
                                }
                            }
                            _ => return Err(bad(&key, "unknown key (limit_usd, hard_limit_usd, downgrade_alias, teams)")),
                        }
                    }
                }
                _ => return Err(bad(&format!("models.{key}"), "unknown key (demo, aliases, retry, pricing, budgets)")),
            }
        }
        for (team, budget) in std::iter::once(("default", &config.budgets.default))
            .chain(config.budgets.teams.iter().map(|(t, b)| (t.as_str(), b)))
        {
            if budget.hard_limit_usd < budget.limit_usd {
                return Err(bad(&format!("models.budgets ({team})"), "hard_limit_usd is below limit_usd"));
            }
        }
        Ok(config)
    }

    pub fn price(&self, target: &Target) -> Option<Price> {
        self.pricing.get(&target.to_string()).copied()
    }
}

fn bad(key: &str, problem: &str) -> RoutingError {
    RoutingError::BadValue { key: key.to_string(), problem: problem.to_string() }
}

fn table_of<'a>(value: &'a toml::Value, key: &str) -> Result<&'a toml::Table, RoutingError> {
    value.as_table().ok_or_else(|| bad(key, "expected a table"))
}

fn bool_of(value: &toml::Value, key: &str) -> Result<bool, RoutingError> {
    value.as_bool().ok_or_else(|| bad(key, "expected true or false"))
}

fn u64_of(value: &toml::Value, key: &str) -> Result<u64, RoutingError> {
    value
        .as_integer()
        .and_then(|i| u64::try_from(i).ok())
        .ok_or_else(|| bad(key, "expected a whole number >= 0"))
}

fn usd_of(value: &toml::Value, key: &str) -> Result<f64, RoutingError> {
    let usd = value
        .as_float()
        .or_else(|| value.as_integer().map(|i| i as f64))
        .ok_or_else(|| bad(key, "expected an amount in USD"))?;
    if !usd.is_finite() || usd < 0.0 {
        return Err(bad(key, "expected an amount in USD >= 0"));
    }
    Ok(usd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_the_longest_provider_prefix() {
        let t: Target = "openai-compatible:my-model".parse().unwrap();
        assert_eq!(t.provider, ProviderKind::OpenAiCompatible);
        assert_eq!(t.model, "my-model");
        let t: Target = "ollama:qwen2.5:14b".parse().unwrap();
        assert_eq!((t.provider, t.model.as_str()), (ProviderKind::Ollama, "qwen2.5:14b"));
        assert_eq!(t.to_string(), "ollama:qwen2.5:14b");
        for bad in ["gpt-4", "openai:", "mystery:model", "openai:two words", ""] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_models_table_overrides_defaults_and_names_bad_keys() {
        let table: toml::Table = toml::from_str(
            r#"
            [aliases]
            "factory/coder" = ["ollama:qwen2.5-coder", "scripted:coder"]
            [retry]
            timeout_ms = 5000
            max_retries = 1
            [pricing."ollama:qwen2.5-coder"]
            input_per_mtok = 0
            output_per_mtok = 0.5
            [budgets]
            limit_usd = 1.5
            [budgets.teams.backend-engineering]
            limit_usd = 0.001
            "#,
        )
        .unwrap();
        let config = RoutingConfig::from_toml(&table).unwrap();
        assert_eq!(config.chains["factory/coder"][0].to_string(), "ollama:qwen2.5-coder");
        assert_eq!(config.retry.timeout, Duration::from_secs(5));
        assert_eq!(config.retry.max_retries, 1);
        assert_eq!(config.pricing["ollama:qwen2.5-coder"].output_per_mtok, 0.5);
        assert_eq!(config.budgets.default.limit_usd, 1.5);
        let team = config.budgets.for_team("backend-engineering");
        assert_eq!(team.limit_usd, 0.001);
        assert!(team.hard_limit_usd >= team.limit_usd);

        for (text, key) in [
            ("[aliases]\n\"factory/nope\" = [\"openai:x\"]", "models.aliases.\"factory/nope\""),
            ("[aliases]\n\"factory/coder\" = []", "models.aliases.\"factory/coder\""),
            ("[retry]\ntimeout = 5", "models.retry.timeout"),
            ("[budgets.teams.nobody]\nlimit_usd = 1", "models.budgets.teams.nobody"),
            ("[budgets]\nlimit_usd = -1", "models.budgets.limit_usd"),
            ("colour = 1", "models.colour"),
        ] {
            let table: toml::Table = toml::from_str(text).unwrap();
            match RoutingConfig::from_toml(&table) {
                Err(RoutingError::BadValue { key: named, .. }) => assert_eq!(named, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn prices_are_per_million_tokens() {
        let price = Price { input_per_mtok: 3.0, output_per_mtok: 15.0 };
        assert!((price.cost(1_000, 100) - 0.0045).abs() < 1e-12);
    }
}
