//! `factory run ...`: submitting runs, following them, showing them, their artifacts, the
//! review gate and cancelling.

use crate::config::Config;
use crate::stack;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use factory_commands::{CommandError, Store};
use factory_domain::run::{ReviewDecision, StageState};
use factory_domain::{Run, RunCommand, RunId, RunStatus, SystemServices};
use factory_nats::EventEnvelope;
use factory_teams::Pipeline;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Subcommand)]
pub enum RunVerb {
    /// Start a run for a requirement; prints its id.
    Submit {
        /// What should be built, in plain words; `-` reads it from stdin.
        requirement: String,
        #[arg(long)]
        title: Option<String>,
        /// `phase1`, `full`, or a pipeline file.
        #[arg(long, default_value = "phase1")]
        pipeline: String,
        /// Complete the run without stopping at the review gate.
        #[arg(long)]
        auto_approve: bool,
        /// Follow the run's stages until it ends or waits for a human.
        #[arg(long)]
        wait: bool,
    },
    /// A run's status, stages, iterations and cost.
    Show {
        run_id: RunId,
        #[arg(long)]
        json: bool,
    },
    /// The latest runs.
    List {
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Write the files the run's teams produced into a folder.
    Artifacts {
        run_id: RunId,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Make the folder a git repository with one commit per stage, authored by its team
        /// (the folder must be new or empty).
        #[arg(long)]
        git: bool,
    },
    /// The review gate: approve the run, or send it back with feedback.
    Review {
        run_id: RunId,
        #[arg(long, conflicts_with = "revise", required_unless_present = "revise")]
        approve: bool,
        #[arg(long)]
        revise: Option<String>,
    },
    /// A new run that starts where this one stood right after the event at `--at` (a store
    /// position, as `replay timeline` shows): the stages completed by then are kept, the rest
    /// runs live. Prints the new run's id.
    Fork {
        run_id: RunId,
        #[arg(long)]
        at: i64,
        /// Follow the new run until it ends or waits for a human.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a run: no further stages start.
    Cancel {
        run_id: RunId,
        #[arg(long, default_value = "cancelled from the command line")]
        reason: String,
    },
}

pub async fn run(verb: RunVerb, config: &Config) -> Result<ExitCode> {
    match verb {
        RunVerb::Submit { requirement, title, pipeline, auto_approve, wait } => {
            let plan = Pipeline::load(&pipeline).map_err(|e| anyhow::anyhow!("{}", crate::telemetry::chain(&e)))?;
            let requirement = if requirement == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .context("reading the requirement from stdin")?;
                text
            } else {
                requirement
            };
            let store = store(config).await?;
            let run_id = RunId::new();
            let command = RunCommand::SubmitRequirement {
                title,
                requirement,
                pipeline: plan.name().to_string(),
                pipeline_definition: plan.source().to_string(),
                auto_approve,
                submitted_by: crate::who(),
            };
            refused_as_error(store.execute_run(run_id, command).await, "requirement refused")?;
            println!("{run_id}");
            if wait { follow(&store, run_id).await } else { Ok(ExitCode::SUCCESS) }
        }
        RunVerb::Show { run_id, json } => {
            let store = store(config).await?;
            let view = RunView::read(&store, run_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view.to_json())?);
            } else {
                view.print();
            }
            Ok(ExitCode::SUCCESS)
        }
        RunVerb::List { limit, json } => list(config, limit, json).await,
        RunVerb::Artifacts { run_id, out, git } => artifacts(config, run_id, out, git).await,
        RunVerb::Review { run_id, approve, revise } => {
            let decision = match (approve, revise) {
                (true, _) => ReviewDecision::Approve,
                (false, Some(feedback)) => ReviewDecision::Revise { feedback },
                (false, None) => bail!("say --approve or --revise \"<feedback>\""),
            };
            let store = store(config).await?;
            let reviewer = crate::who();
            refused_as_error(store.execute_run(run_id, RunCommand::ReviewRun { decision, reviewer }).await, "review refused")?;
            println!("reviewed {run_id}");
            Ok(ExitCode::SUCCESS)
        }
        RunVerb::Fork { run_id, at, wait } => {
            let store = store(config).await?;
            let fork = match factory_teams::fork::fork(&store, run_id, at, crate::who()).await {
                Ok(fork) => fork,
                Err(error @ (factory_teams::fork::ForkError::NotFound(_) | factory_teams::fork::ForkError::BeforeStart { .. })) => {
                    bail!("{error}; `factory replay timeline {run_id}` shows its positions")
                }
                Err(error) => return Err(anyhow::Error::new(error).context("forking the run")),
            };
            eprintln!(
                "forked {run_id} at position {at}: starts with {}",
                if fork.stages.is_empty() { "no stage completed".to_string() } else { fork.stages.join(", ") }
            );
            println!("{}", fork.run_id);
            if wait { follow(&store, fork.run_id).await } else { Ok(ExitCode::SUCCESS) }
        }
        RunVerb::Cancel { run_id, reason } => {
            let store = store(config).await?;
            let cancelled_by = crate::who();
            refused_as_error(store.execute_run(run_id, RunCommand::CancelRun { reason, cancelled_by }).await, "cancel refused")?;
            println!("cancelled {run_id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn store(config: &Config) -> Result<Store> {
    Ok(Store::new(stack::connect_db(config).await?, Arc::new(SystemServices)))
}

fn refused_as_error<E: std::error::Error + Send + Sync + 'static>(
    result: Result<(), CommandError<E>>,
    what: &str,
) -> Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(CommandError::Refused(reason)) => bail!("{what}: {reason}"),
        Err(other) => Err(other.into()),
    }
}

/// Prints the run's stages as they start and end, until it stops.
async fn follow(store: &Store, run_id: RunId) -> Result<ExitCode> {
    let mut seen = 0i64;
    let mut calls: BTreeMap<String, (String, u64, u64, f64)> = BTreeMap::new();
    let mut stage_of: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let events = factory_commands::events::run_events(store.pool(), run_id.0, None).await?;
        let after = seen;
        for e in events.iter().filter(|e| e.position > after) {
            seen = e.position;
            match (e.aggregate_type.as_str(), e.event_type.as_str()) {
                ("run", "StageStarted") => {
                    let stage = e.payload["stage"].as_str().unwrap_or_default();
                    stage_of.insert(e.payload["objective_id"].as_str().unwrap_or_default().to_string(), stage.to_string());
                    eprintln!("  > {stage:<24} started   (team {})", e.payload["team"].as_str().unwrap_or_default());
                }
                ("objective", "ModelCalled") => {
                    let p = &e.payload;
                    let target = format!("{}:{}", p["provider"].as_str().unwrap_or_default(), p["model"].as_str().unwrap_or_default());
                    let outcome = p["outcome"].as_str().unwrap_or("ok");
                    if outcome != "ok" {
                        let failed: Vec<&str> = p["failed_targets"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
                        let stage = stage_of.get(&e.aggregate_id).map(String::as_str).unwrap_or_default();
                        eprintln!(
                            "    {stage}: {outcome} -> {target} as {}{}",
                            p["alias"].as_str().unwrap_or_default(),
                            if failed.is_empty() { String::new() } else { format!(" (failed first: {})", failed.join("; ")) }
                        );
                    }
                    let entry = calls.entry(e.aggregate_id.clone()).or_default();
                    entry.0 = target;
                    entry.1 += e.payload["input_tokens"].as_u64().unwrap_or(0);
                    entry.2 += e.payload["output_tokens"].as_u64().unwrap_or(0);
                    entry.3 += e.payload["cost_usd"].as_f64().unwrap_or(0.0);
                }
                ("run", "StageCompleted") => {
                    let objective = e.payload["objective_id"].as_str().unwrap_or_default();
                    let (model, input, output, cost) = calls.get(objective).cloned().unwrap_or_default();
                    eprintln!(
                        "  ✓ {:<24} completed (model {model}, {input}+{output} tokens, ${cost:.4})",
                        e.payload["stage"].as_str().unwrap_or_default()
                    );
                }
                ("run", "RunBlocked") => eprintln!(
                    "  ✗ {} blocked: {}",
                    e.payload["stage"].as_str().unwrap_or_default(),
                    e.payload["reason"].as_str().unwrap_or_default()
                ),
                ("run", "RunNeedsClarification") => eprintln!(
                    "  ? {} asks: {}",
                    e.payload["stage"].as_str().unwrap_or_default(),
                    e.payload["question"].as_str().unwrap_or_default()
                ),
                _ => {}
            }
        }
        let run = store.load_run(run_id).await.map_err(|e| anyhow::anyhow!(e))?;
        match run.status {
            RunStatus::Completed => {
                eprintln!("run {run_id} COMPLETED");
                return Ok(ExitCode::SUCCESS);
            }
            RunStatus::AwaitingReview => {
                eprintln!("run {run_id} is AWAITING_REVIEW: approve with `factory run review {run_id} --approve`");
                return Ok(ExitCode::FAILURE);
            }
            RunStatus::Blocked => {
                eprintln!("run {run_id} is BLOCKED: a human must resolve the blocked stage");
                return Ok(ExitCode::FAILURE);
            }
            RunStatus::NeedsClarification => {
                eprintln!("run {run_id} NEEDS_CLARIFICATION: it waits for an answer to the question above");
                return Ok(ExitCode::FAILURE);
            }
            RunStatus::Failed | RunStatus::Cancelled => {
                eprintln!("run {run_id} {}", run.status.as_str());
                return Ok(ExitCode::FAILURE);
            }
            RunStatus::New | RunStatus::Running => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A run as `run show` presents it, folded from its events.
struct RunView {
    run_id: RunId,
    run: Run,
    stages: Vec<StageView>,
}

#[derive(Default, Clone)]
struct StageView {
    name: String,
    team: String,
    state: &'static str,
    iterations: u64,
    model_calls: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
}

impl RunView {
    async fn read(store: &Store, run_id: RunId) -> Result<Self> {
        let run = store.load_run(run_id).await.map_err(|e| anyhow::anyhow!(e))?;
        if run.status == RunStatus::New {
            bail!("no run {run_id} in the event store");
        }
        let events: Vec<EventEnvelope> = factory_commands::events::run_events(store.pool(), run_id.0, None).await?;
        let order: Vec<String> = Pipeline::parse(&run.pipeline, &run.pipeline_definition)
            .map(|p| p.stages().iter().map(|s| s.name.clone()).collect())
            .unwrap_or_else(|_| run.stages.keys().cloned().collect());
        let mut by_objective: BTreeMap<String, StageView> = BTreeMap::new();
        for e in &events {
            let entry = || StageView::default();
            match (e.aggregate_type.as_str(), e.event_type.as_str()) {
                ("objective", "ModelCalled") => {
                    let v = by_objective.entry(e.aggregate_id.clone()).or_insert_with(entry);
                    v.model_calls += 1;
                    v.input_tokens += e.payload["input_tokens"].as_u64().unwrap_or(0);
                    v.output_tokens += e.payload["output_tokens"].as_u64().unwrap_or(0);
                    v.cost_usd += e.payload["cost_usd"].as_f64().unwrap_or(0.0);
                }
                ("objective", "TaskResultRecorded") => {
                    by_objective.entry(e.aggregate_id.clone()).or_insert_with(entry).iterations += 1;
                }
                _ => {}
            }
        }
        let stages = order
            .into_iter()
            .map(|name| {
                let (state, team, objective) = match run.stages.get(&name) {
                    Some(StageState::InProgress { team, objective_id }) => ("IN_PROGRESS", team.clone(), Some(objective_id.to_string())),
                    Some(StageState::Completed { team, objective_id }) => ("COMPLETED", team.clone(), Some(objective_id.to_string())),
                    Some(StageState::Skipped) => ("SKIPPED", String::new(), None),
                    None => ("PENDING", String::new(), None),
                };
                let figures = objective.and_then(|o| by_objective.get(&o).cloned()).unwrap_or_default();
                StageView { name, team, state, ..figures }
            })
            .collect();
        Ok(Self { run_id, run, stages })
    }

    fn print(&self) {
        println!("run {}  {}", self.run_id, self.run.status.as_str());
        println!("title     {}", self.run.title);
        println!("pipeline  {}", self.run.pipeline);
        println!();
        println!("{:<24} {:<22} {:<12} {:>5} {:>6} {:>10} {:>9}", "STAGE", "TEAM", "STATUS", "ITER", "CALLS", "TOKENS", "COST");
        for s in &self.stages {
            println!(
                "{:<24} {:<22} {:<12} {:>5} {:>6} {:>10} {:>9}",
                s.name,
                s.team,
                s.state,
                s.iterations,
                s.model_calls,
                s.input_tokens + s.output_tokens,
                format!("${:.4}", s.cost_usd)
            );
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.run_id,
            "status": self.run.status.as_str(),
            "title": self.run.title,
            "pipeline": self.run.pipeline,
            "revisions": self.run.revisions,
            "stages": self.stages.iter().map(|s| serde_json::json!({
                "name": s.name, "team": s.team, "status": s.state, "iterations": s.iterations,
                "model_calls": s.model_calls, "input_tokens": s.input_tokens,
                "output_tokens": s.output_tokens, "cost_usd": s.cost_usd,
            })).collect::<Vec<_>>(),
        })
    }
}

async fn list(config: &Config, limit: i64, json: bool) -> Result<ExitCode> {
    let pool = stack::connect_db(config).await?;
    let rows: Vec<(String, serde_json::Value, chrono::DateTime<chrono::Utc>, String)> = sqlx::query_as(
        "SELECT s.aggregate_id, s.payload, s.recorded_at, \
                (SELECT l.event_type FROM events l WHERE l.aggregate_type = 'run' AND l.aggregate_id = s.aggregate_id \
                 AND l.event_type NOT IN ('StageStarted', 'StageCompleted', 'StageSkipped', 'RunReviewed') \
                 ORDER BY l.sequence DESC LIMIT 1) \
           FROM events s WHERE s.aggregate_type = 'run' AND s.event_type = 'RequirementSubmitted' \
          ORDER BY s.position DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&pool)
    .await?;
    let status = |last: &str| match last {
        "RunAwaitingReview" => "AWAITING_REVIEW",
        "RunCompleted" => "COMPLETED",
        "RunFailed" => "FAILED",
        "RunCancelled" => "CANCELLED",
        "RunBlocked" => "BLOCKED",
        "RunNeedsClarification" => "NEEDS_CLARIFICATION",
        _ => "RUNNING",
    };
    if json {
        let runs: Vec<_> = rows
            .iter()
            .map(|(id, p, at, last)| serde_json::json!({"id": id, "title": p["RequirementSubmitted"]["title"], "status": status(last), "submitted_at": at}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else {
        for (id, p, at, last) in &rows {
            println!("{id}  {:<20} {}  {}", status(last), at.format("%Y-%m-%d %H:%M"), p["RequirementSubmitted"]["title"].as_str().unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One stage's files, in the order the run produced them.
struct StageFiles {
    stage: String,
    team: String,
    files: BTreeMap<String, String>,
}

async fn artifacts(config: &Config, run_id: RunId, out: PathBuf, git: bool) -> Result<ExitCode> {
    let pool = stack::connect_db(config).await?;
    let events = factory_commands::events::run_events(&pool, run_id.0, None).await?;
    if events.is_empty() {
        bail!("no run {run_id} in the event store");
    }
    // Group by objective, in the order of their first artifact; later versions of a path win.
    let mut assigned: BTreeMap<&str, (String, String)> = BTreeMap::new();
    let mut groups: Vec<(String, StageFiles)> = Vec::new();
    for e in &events {
        match e.event_type.as_str() {
            "ObjectiveAssigned" => {
                let stage = e.payload["stage"].as_str().unwrap_or_default().to_string();
                let team = e.payload["team"].as_str().unwrap_or_default().to_string();
                assigned.insert(e.aggregate_id.as_str(), (stage, team));
            }
            "ArtifactProduced" => {
                let (Some(path), Some(sha)) = (e.payload["path"].as_str(), e.payload["sha256"].as_str()) else { continue };
                if path.starts_with('/') || path.split('/').any(|p| p == "..") {
                    bail!("refusing artifact path {path}");
                }
                let index = match groups.iter().position(|(objective, _)| objective == &e.aggregate_id) {
                    Some(i) => i,
                    None => {
                        let (stage, team) = assigned.get(e.aggregate_id.as_str()).cloned().unwrap_or_default();
                        groups.push((e.aggregate_id.clone(), StageFiles { stage, team, files: BTreeMap::new() }));
                        groups.len() - 1
                    }
                };
                groups[index].1.files.insert(path.to_string(), sha.to_string());
            }
            _ => {}
        }
    }
    if groups.is_empty() {
        bail!("run {run_id} has produced no artifacts yet");
    }
    if git {
        let empty = std::fs::read_dir(&out).map(|mut d| d.next().is_none()).unwrap_or(true);
        if !empty {
            bail!("{} is not empty: --git makes a new repository, give it a new folder", out.display());
        }
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        run_git(&out, &["init", "--quiet", "--initial-branch=main"], None)?;
    }
    let mut written = BTreeMap::new();
    for (_, group) in &groups {
        for (path, sha) in &group.files {
            let content: Vec<u8> = sqlx::query_scalar("SELECT content FROM artifacts WHERE sha256 = $1")
                .bind(sha)
                .fetch_optional(&pool)
                .await?
                .with_context(|| format!("the content of {path} ({sha}) is missing from the artifact store"))?;
            let target = out.join(path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(&target, content).with_context(|| format!("writing {}", target.display()))?;
            written.insert(target.display().to_string(), ());
        }
        if git {
            run_git(&out, &["add", "--all"], None)?;
            let message = format!("{}: {} file(s) from {}", group.stage, group.files.len(), group.team);
            run_git(&out, &["commit", "--quiet", "--allow-empty", "-m", &message], Some(&group.team))?;
        }
    }
    for path in written.keys() {
        println!("{path}");
    }
    eprintln!(
        "{} files written to {}{}",
        written.len(),
        out.display(),
        if git { format!(", {} commits", groups.len()) } else { String::new() }
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs git in `dir`; commits are authored by `team` when given.
fn run_git(dir: &std::path::Path, args: &[&str], team: Option<&str>) -> Result<()> {
    let mut command = std::process::Command::new("git");
    command.arg("-C").arg(dir);
    let (name, email) = match team {
        Some(team) => (team.to_string(), format!("{team}@teams.factory.local")),
        None => ("factory".to_string(), "factory@factory.local".to_string()),
    };
    command
        .env("GIT_AUTHOR_NAME", &name)
        .env("GIT_AUTHOR_EMAIL", &email)
        .env("GIT_COMMITTER_NAME", "factory")
        .env("GIT_COMMITTER_EMAIL", "factory@factory.local")
        .args(args);
    let output = command.output().context("running git (is it installed?)")?;
    if !output.status.success() {
        bail!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}
