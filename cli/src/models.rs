//! `factory models`: the routing the workers use (aliases, chains, which providers are
//! configured, prices, budgets), and changing a chain at run time.

use crate::config::Config;
use crate::stack;
use anyhow::Result;
use clap::Subcommand;
use factory_models::{Router, overrides};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum ModelsVerb {
    /// Print each alias's chain as the workers resolve it now (run-time changes included).
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Route an alias to these targets (`provider:model`, first tried first); every running
    /// worker follows within seconds.
    Set {
        alias: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// Send an alias back to its configured chain.
    Reset { alias: String },
}

pub async fn run(verb: ModelsVerb, config: &Config) -> Result<ExitCode> {
    let pool = stack::connect_db(config).await?;
    match verb {
        ModelsVerb::Set { alias, targets } => {
            let chain = overrides::set(&pool, &alias, &targets, &crate::who()).await?;
            let chain: Vec<String> = chain.iter().map(ToString::to_string).collect();
            println!("{alias} -> {}", chain.join(" -> "));
            Ok(ExitCode::SUCCESS)
        }
        ModelsVerb::Reset { alias } => {
            if overrides::reset(&pool, &alias, &crate::who()).await? {
                println!("{alias} is back on its configured chain");
            } else {
                println!("{alias} was on its configured chain already");
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsVerb::Show { json } => {
            let router = Router::new(
                config.models.clone(),
                config.providers.clone(),
                Arc::new(factory_teams::scripted::ScriptedProvider::new()),
            )?;
            let changed = overrides::load(&pool).await?;
            router.set_overrides(changed.clone());
            let routing = &router.config();
            let aliases: Vec<serde_json::Value> = factory_models::routing::ALIASES
                .iter()
                .map(|alias| {
                    let targets: Vec<serde_json::Value> = router
                        .chain(alias)
                        .iter()
                        .map(|t| {
                            serde_json::json!({
                                "target": t.to_string(),
                                "available": router.available(t),
                                "price": routing.price(t).map(|p| serde_json::json!({
                                    "input_per_mtok": p.input_per_mtok,
                                    "output_per_mtok": p.output_per_mtok,
                                })),
                            })
                        })
                        .collect();
                    serde_json::json!({
                        "alias": alias,
                        "changed_at_run_time": changed.contains_key(*alias),
                        "targets": targets,
                    })
                })
                .collect();
            let budgets = &routing.budgets;
            let shown = serde_json::json!({
                "demo": router.is_demo(),
                "providers": router.providers().configured(),
                "aliases": aliases,
                "budgets": {
                    "limit_usd": budgets.default.limit_usd,
                    "hard_limit_usd": budgets.default.hard_limit_usd,
                    "downgrade_alias": budgets.downgrade_alias,
                    "teams": budgets.teams.iter().map(|(team, b)| (team.clone(), serde_json::json!({
                        "limit_usd": b.limit_usd, "hard_limit_usd": b.hard_limit_usd,
                    }))).collect::<serde_json::Map<_, _>>(),
                },
                "retry": {
                    "timeout_ms": routing.retry.timeout.as_millis() as u64,
                    "max_retries": routing.retry.max_retries,
                    "base_backoff_ms": routing.retry.base_backoff.as_millis() as u64,
                    "max_backoff_ms": routing.retry.max_backoff.as_millis() as u64,
                },
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
                return Ok(ExitCode::SUCCESS);
            }
            if router.is_demo() {
                println!("DEMO MODE: every alias is answered by the scripted provider");
            } else {
                println!("providers configured: {}", router.providers().configured().join(", "));
            }
            for alias in &aliases {
                let mut line = format!("{:<18}", alias["alias"].as_str().unwrap_or_default());
                let targets: Vec<String> = alias["targets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        let name = t["target"].as_str().unwrap_or_default();
                        if t["available"] == true { name.to_string() } else { format!("({name}: not configured)") }
                    })
                    .collect();
                line.push_str(&targets.join(" -> "));
                if alias["changed_at_run_time"] == true {
                    line.push_str("   [set at run time]");
                }
                println!("{line}");
            }
            println!(
                "budgets per team and run: ${} then {}, blocked past ${}{}",
                budgets.default.limit_usd,
                budgets.downgrade_alias,
                budgets.default.hard_limit_usd,
                if budgets.teams.is_empty() { String::new() } else { format!(" ({} teams set their own)", budgets.teams.len()) }
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
