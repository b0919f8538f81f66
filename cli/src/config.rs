//! Configuration: built-in defaults < `factory.toml` < `FACTORY_*` environment variables.
//!
//! One typed [`Config`], validated at start-up. An unknown key or a bad value stops
//! start-up with a message naming the key and where it came from. Secrets are
//! `SecretString`s: never printed, never in events or logs.

use secrecy::SecretString;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug)]
pub struct Config {
    /// Where the project lives (`FACTORY_HOME`): its teams, pipelines and `.factory` folder.
    pub home: PathBuf,
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Where workers keep each attempt's scratch workspace (dropped after the attempt; what
    /// a team produced is kept as artifacts in PostgreSQL): the process's memory when unset,
    /// else a folder per attempt under this directory. Use it through [`Config::scratch`].
    pub work_dir: Option<PathBuf>,
    pub embedded_nats_port: u16,
    pub embedded_pg_port: u16,
    pub nats_url: Option<String>,
    /// Prefixes stream names and subjects, so that several stacks can share one NATS.
    pub nats_namespace: Option<String>,
    pub database_url: Option<SecretString>,
    /// A role that may migrate (owner of the schema); defaults to `database_url`, or the
    /// embedded superuser.
    pub database_admin_url: Option<SecretString>,
    pub admin_token: Option<SecretString>,
    /// Forces demo mode on or off; unset, demo mode is on when no provider is configured.
    pub demo: Option<bool>,
    pub db_max_connections: u32,
    /// Objectives each team works at once in one worker process.
    pub worker_concurrency: usize,
    pub relay_batch_size: usize,
    pub relay_poll_interval: Duration,
    /// The shortest time between the relay's looks when commits wake it.
    pub relay_read_interval: Duration,
    /// The model router's settings: the `[models]` table over the built-in defaults.
    pub models: factory_models::RoutingConfig,
    /// Where the real providers are, from `OPENAI_API_KEY`, `ANTHROPIC_API_KEY`, `OLLAMA_URL`,
    /// `openai_compatible_url` / `_key` (keys are secrets: never printed).
    pub providers: factory_models::ProviderSettings,
    /// The log filter (`tracing` directives); `RUST_LOG` is read when unset.
    pub log: Option<String>,
    /// The Python venv holding nats-server and PostgreSQL.
    pub venv: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML")]
    Toml {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("unknown configuration key `{key}` in {origin}; known keys: {known}")]
    UnknownKey { key: String, origin: String, known: String },
    #[error("bad value for `{key}` in {origin}: {problem}")]
    BadValue { key: String, origin: String, problem: String },
}

/// Every key, as it is spelled in `factory.toml`; the variable is `FACTORY_` + upper case.
const KEYS: &[&str] = &[
    "home",
    "http_addr",
    "data_dir",
    "work_dir",
    "embedded_nats_port",
    "embedded_pg_port",
    "nats_url",
    "nats_namespace",
    "database_url",
    "database_admin_url",
    "admin_token",
    "demo",
    "db_max_connections",
    "worker_concurrency",
    "relay_batch_size",
    "relay_poll_interval_ms",
    "relay_read_interval_ms",
    "openai_compatible_url",
    "openai_compatible_key",
    "log",
    "venv",
    "models",
];

struct Value {
    text: String,
    origin: String,
}

impl Config {
    /// Reads `factory.toml` (from `FACTORY_HOME`, else the current directory) and the
    /// process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::from_sources(&env)
    }

    pub fn from_sources(env: &[(String, String)]) -> Result<Self, ConfigError> {
        let home = env
            .iter()
            .find(|(k, _)| k == "FACTORY_HOME")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")));
        let mut values: BTreeMap<String, Value> = BTreeMap::new();
        let mut models = factory_models::RoutingConfig::default();
        let file = home.join("factory.toml");
        if file.exists() {
            let origin = file.display().to_string();
            let text = std::fs::read_to_string(&file)
                .map_err(|source| ConfigError::Read { path: origin.clone(), source })?;
            let table: toml::Table = toml::from_str(&text)
                .map_err(|source| ConfigError::Toml { path: origin.clone(), source })?;
            for (key, value) in table {
                check_known(&key, &origin)?;
                if key == "home" {
                    return Err(ConfigError::BadValue {
                        key,
                        origin,
                        problem: "the file is found through `home`, so set it with FACTORY_HOME".into(),
                    });
                }
                if key == "models" {
                    let toml::Value::Table(table) = &value else {
                        return Err(ConfigError::BadValue {
                            key,
                            origin,
                            problem: "expected a table ([models])".into(),
                        });
                    };
                    models = factory_models::RoutingConfig::from_toml(table).map_err(|e| match e {
                        factory_models::routing::RoutingError::BadValue { key, problem } => {
                            ConfigError::BadValue { key, origin: origin.clone(), problem }
                        }
                        other => ConfigError::BadValue { key: "models".into(), origin: origin.clone(), problem: other.to_string() },
                    })?;
                    continue;
                }
                let text = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Table(_) | toml::Value::Array(_) => {
                        return Err(ConfigError::BadValue {
                            key,
                            origin,
                            problem: "expected a single value, not a table or array".into(),
                        });
                    }
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    toml::Value::Datetime(d) => d.to_string(),
                };
                values.insert(key, Value { text, origin: origin.clone() });
            }
        }
        for (name, text) in env {
            let Some(rest) = name.strip_prefix("FACTORY_") else { continue };
            let key = rest.to_ascii_lowercase();
            let origin = format!("environment variable {name}");
            check_known(&key, &origin)?;
            if key == "models" {
                return Err(ConfigError::BadValue { key, origin, problem: "the [models] table is set in factory.toml".into() });
            }
            values.insert(key, Value { text: text.clone(), origin });
        }
        let get = |key: &str| values.get(key);
        let home = get("home").map(|v| PathBuf::from(&v.text)).unwrap_or(home);
        let data_dir = get("data_dir")
            .map(|v| PathBuf::from(&v.text))
            .unwrap_or_else(|| PathBuf::from(".factory"));
        let data_dir = if data_dir.is_absolute() { data_dir } else { home.join(data_dir) };
        let work_dir = match get("work_dir") {
            Some(v) if v.text.trim().is_empty() => {
                return Err(ConfigError::BadValue {
                    key: "work_dir".into(),
                    origin: v.origin.clone(),
                    problem: "is empty; give a directory, or unset it to keep workspaces in memory".into(),
                });
            }
            Some(v) => {
                let dir = PathBuf::from(&v.text);
                Some(if dir.is_absolute() { dir } else { home.join(dir) })
            }
            None => None,
        };
        let mut config = Config {
            http_addr: parse(get("http_addr"), "http_addr", "127.0.0.1:8080".parse().unwrap())?,
            embedded_nats_port: parse(get("embedded_nats_port"), "embedded_nats_port", 14222)?,
            embedded_pg_port: parse(get("embedded_pg_port"), "embedded_pg_port", 15432)?,
            nats_url: optional(get("nats_url")),
            nats_namespace: match optional(get("nats_namespace")) {
                Some(ns) if !ns.chars().all(|c| c.is_ascii_alphanumeric()) => {
                    return Err(ConfigError::BadValue {
                        key: "nats_namespace".into(),
                        origin: get("nats_namespace").map(|v| v.origin.clone()).unwrap_or_default(),
                        problem: format!("`{ns}` must be letters and digits only"),
                    });
                }
                other => other,
            },
            database_url: optional(get("database_url")).map(SecretString::from),
            database_admin_url: optional(get("database_admin_url")).map(SecretString::from),
            admin_token: optional(get("admin_token")).map(SecretString::from),
            demo: match get("demo") {
                None => None,
                Some(v) => Some(parse_bool(v, "demo")?),
            },
            db_max_connections: parse_range(get("db_max_connections"), "db_max_connections", 16, 1, 1000)?,
            worker_concurrency: parse_range(
                get("worker_concurrency"),
                "worker_concurrency",
                factory_teams::worker::DEFAULT_CONCURRENCY,
                1,
                1024,
            )?,
            relay_batch_size: parse_range(get("relay_batch_size"), "relay_batch_size", 2000, 1, 100_000)?,
            relay_poll_interval: Duration::from_millis(parse_range(
                get("relay_poll_interval_ms"),
                "relay_poll_interval_ms",
                500,
                1,
                60_000,
            )?),
            relay_read_interval: Duration::from_millis(parse_range(
                get("relay_read_interval_ms"),
                "relay_read_interval_ms",
                factory_commands::relay::DEFAULT_READ_INTERVAL.as_millis() as u64,
                0,
                1_000,
            )?),
            providers: {
                let mut providers = factory_models::ProviderSettings::from_env(env);
                if let Some(url) = optional(get("openai_compatible_url")) {
                    providers.openai_compatible = Some(factory_models::providers::Endpoint {
                        base_url: Some(url),
                        key: optional(get("openai_compatible_key")).map(SecretString::from),
                    });
                }
                providers
            },
            models,
            log: optional(get("log")),
            venv: get("venv")
                .map(|v| PathBuf::from(&v.text))
                .unwrap_or_else(|| home.join(".factory").join("venv")),
            data_dir,
            work_dir,
            home,
        };
        if let Some(demo) = config.demo {
            config.models.demo = Some(demo);
        }
        if config.embedded_nats_port == config.embedded_pg_port {
            return Err(ConfigError::BadValue {
                key: "embedded_pg_port".into(),
                origin: "configuration".into(),
                problem: "must differ from embedded_nats_port".into(),
            });
        }
        Ok(config)
    }

    /// Where workers (and `replay rerun`) keep each attempt's workspace.
    pub fn scratch(&self) -> factory_teams::tools::Scratch {
        match &self.work_dir {
            Some(dir) => factory_teams::tools::Scratch::Dir(dir.clone()),
            None => factory_teams::tools::Scratch::Memory,
        }
    }

    /// Stream names and subjects: the contract's, or under `nats_namespace`.
    pub fn topology(&self) -> factory_nats::Topology {
        match &self.nats_namespace {
            Some(ns) => factory_nats::Topology::namespaced(ns),
            None => factory_nats::Topology::default(),
        }
    }

    pub fn venv(&self) -> PathBuf {
        self.venv.clone()
    }

    pub fn data_file(&self, name: &str) -> PathBuf {
        self.data_dir.join(name)
    }

    /// The log filter (`log`, then `RUST_LOG`, then `info` without the chatty crates).
    pub fn log_filter(&self) -> String {
        self.log
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info,sqlx=warn,async_nats=warn".into())
    }
}

fn check_known(key: &str, origin: &str) -> Result<(), ConfigError> {
    if KEYS.contains(&key) {
        Ok(())
    } else {
        Err(ConfigError::UnknownKey {
            key: key.to_string(),
            origin: origin.to_string(),
            known: KEYS.join(", "),
        })
    }
}

fn optional(v: Option<&Value>) -> Option<String> {
    v.map(|v| v.text.trim().to_string()).filter(|s| !s.is_empty())
}

fn parse<T: std::str::FromStr>(v: Option<&Value>, key: &str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match v {
        None => Ok(default),
        Some(v) => v.text.trim().parse().map_err(|e: T::Err| ConfigError::BadValue {
            key: key.into(),
            origin: v.origin.clone(),
            problem: format!("`{}`: {e}", v.text),
        }),
    }
}

fn parse_range<T>(v: Option<&Value>, key: &str, default: T, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    T::Err: std::fmt::Display,
{
    let value = parse(v, key, default)?;
    if value < min || value > max {
        return Err(ConfigError::BadValue {
            key: key.into(),
            origin: v.map(|v| v.origin.clone()).unwrap_or_default(),
            problem: format!("{value} is outside {min}..={max}"),
        });
    }
    Ok(value)
}

fn parse_bool(v: &Value, key: &str) -> Result<bool, ConfigError> {
    match v.text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(ConfigError::BadValue {
            key: key.into(),
            origin: v.origin.clone(),
            problem: format!("`{other}` is not a boolean (use 1 or 0)"),
        }),
    }
}

/// Writes a secret file (mode 600) unless it exists; returns its content.
pub fn secret_file(path: &Path, make: impl FnOnce() -> String) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(existing) = std::fs::read_to_string(path) {
        return Ok(existing.trim().to_string());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let value = make();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(value.as_bytes())?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let dir = std::env::temp_dir().join("factory-config-test-empty");
        std::fs::create_dir_all(&dir).unwrap();
        let mut v: Vec<(String, String)> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        v.push(("FACTORY_HOME".into(), dir.display().to_string()));
        v
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_sources(&env(&[])).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.embedded_nats_port, 14222);
        assert_eq!(c.embedded_pg_port, 15432);
        assert!(c.data_dir.ends_with(".factory"));
        assert!(c.nats_url.is_none() && c.database_url.is_none());
    }

    #[test]
    fn scratch_workspaces_stay_in_memory_unless_a_work_dir_is_configured() {
        let c = Config::from_sources(&env(&[])).unwrap();
        assert_eq!(c.scratch(), factory_teams::tools::Scratch::Memory);
        let c = Config::from_sources(&env(&[("FACTORY_WORK_DIR", "/var/tmp/factory-work")])).unwrap();
        assert_eq!(c.scratch(), factory_teams::tools::Scratch::Dir(PathBuf::from("/var/tmp/factory-work")));
        let c = Config::from_sources(&env(&[("FACTORY_WORK_DIR", "scratch")])).unwrap();
        let home = c.data_dir.parent().unwrap().to_path_buf();
        assert_eq!(c.scratch(), factory_teams::tools::Scratch::Dir(home.join("scratch")), "relative to home");
        let e = Config::from_sources(&env(&[("FACTORY_WORK_DIR", " ")])).unwrap_err();
        assert!(e.to_string().contains("work_dir") && e.to_string().contains("FACTORY_WORK_DIR"), "{e}");
    }

    #[test]
    fn environment_overrides_and_bad_values_name_the_key() {
        let c = Config::from_sources(&env(&[("FACTORY_EMBEDDED_PG_PORT", "25432")])).unwrap();
        assert_eq!(c.embedded_pg_port, 25432);
        let e = Config::from_sources(&env(&[("FACTORY_EMBEDDED_PG_PORT", "nope")])).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("embedded_pg_port") && text.contains("FACTORY_EMBEDDED_PG_PORT"), "{text}");
        let e = Config::from_sources(&env(&[("FACTORY_DEMO", "maybe")])).unwrap_err();
        assert!(e.to_string().contains("`demo`"), "{e}");
    }

    #[test]
    fn a_teams_objectives_at_once_default_to_the_workers_and_are_bounded() {
        let c = Config::from_sources(&env(&[])).unwrap();
        assert_eq!(c.worker_concurrency, factory_teams::worker::DEFAULT_CONCURRENCY);
        let c = Config::from_sources(&env(&[("FACTORY_WORKER_CONCURRENCY", "4")])).unwrap();
        assert_eq!(c.worker_concurrency, 4);
        refused_naming_the_key("worker_concurrency", &["0", "1025", "many"]);
    }

    /// Each of `values`, set for `key` in the environment, stops start-up with an error that
    /// names the key and its variable.
    fn refused_naming_the_key(key: &str, values: &[&str]) {
        let variable = format!("FACTORY_{}", key.to_uppercase());
        for value in values {
            let e = Config::from_sources(&env(&[(variable.as_str(), value)])).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(key) && text.contains(&variable), "{value}: {text}");
        }
    }

    #[test]
    fn the_relays_read_interval_defaults_to_the_relays_own_and_zero_turns_it_off() {
        let c = Config::from_sources(&env(&[])).unwrap();
        assert_eq!(c.relay_read_interval, factory_commands::relay::DEFAULT_READ_INTERVAL);
        let c = Config::from_sources(&env(&[("FACTORY_RELAY_READ_INTERVAL_MS", "0")])).unwrap();
        assert_eq!(c.relay_read_interval, Duration::ZERO);
        refused_naming_the_key("relay_read_interval_ms", &["1001", "-1", "soon"]);
    }

    #[test]
    fn unknown_keys_stop_start_up() {
        let e = Config::from_sources(&env(&[("FACTORY_HTTP_ADRESS", "x")])).unwrap_err();
        assert!(e.to_string().contains("http_adress"), "{e}");
    }

    #[test]
    fn the_file_sits_between_defaults_and_environment() {
        let dir = tempfile_dir();
        std::fs::write(dir.join("factory.toml"), "embedded_pg_port = 1111\nrelay_batch_size = 10\n").unwrap();
        let home = ("FACTORY_HOME".to_string(), dir.display().to_string());
        let c = Config::from_sources(std::slice::from_ref(&home)).unwrap();
        assert_eq!((c.embedded_pg_port, c.relay_batch_size), (1111, 10));
        let c = Config::from_sources(&[home.clone(), ("FACTORY_EMBEDDED_PG_PORT".into(), "2222".into())]).unwrap();
        assert_eq!(c.embedded_pg_port, 2222);
        std::fs::write(dir.join("factory.toml"), "colour = 1\n").unwrap();
        let e = Config::from_sources(std::slice::from_ref(&home)).unwrap_err();
        assert!(e.to_string().contains("`colour`") && e.to_string().contains("factory.toml"), "{e}");
        std::fs::write(dir.join("factory.toml"), "relay_batch_size = 0\n").unwrap();
        let e = Config::from_sources(&[home]).unwrap_err();
        assert!(e.to_string().contains("relay_batch_size"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("factory-config-test-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
