//! Read models from the command line: `factory project` (the live runners), `replay rebuild`
//! (with a progress bar) and `replay state` (time travel).

use crate::config::Config;
use crate::stack;
use anyhow::{Result, bail};
use factory_domain::RunId;
use factory_projections::Projection;
use factory_projections::runner::ProjectionRunner;
use std::process::ExitCode;

fn parse_projections(names: &[String]) -> Result<Vec<Projection>> {
    if names.is_empty() || names.iter().any(|n| n == "all") {
        return Ok(Projection::ALL.to_vec());
    }
    names.iter().map(|n| Projection::parse(n).map_err(Into::into)).collect()
}

/// Spawns a live runner per projection; each task ends only if its projection stops on an event.
pub fn spawn_runners(
    pool: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
    topology: &factory_nats::Topology,
    projections: &[Projection],
) -> Vec<tokio::task::JoinHandle<factory_projections::ProjectionError>> {
    projections
        .iter()
        .map(|p| tokio::spawn(ProjectionRunner::new(pool.clone(), js.clone(), topology.clone(), *p).run()))
        .collect()
}

/// `factory project`: keeps the read models up to date until Ctrl-C, or until one stops on an
/// event it cannot apply (exit 1, the event named).
pub async fn project(config: &Config, names: Vec<String>) -> Result<ExitCode> {
    let projections = parse_projections(&names)?;
    let pool = stack::connect_db(config).await?;
    let js = async_nats::jetstream::new(stack::connect_nats(config).await?);
    let topology = config.topology();
    topology.ensure_streams(&js).await?;
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    eprintln!("projecting {} (Ctrl-C stops)", names.join(", "));
    let runners = spawn_runners(&pool, &js, &topology, &projections);
    tokio::select! {
        (stopped, _, _) = futures::future::select_all(runners) => {
            match stopped {
                Ok(error) => bail!("{error}"),
                Err(panic) => bail!("a projection runner panicked: {panic}"),
            }
        }
        _ = crate::up::shutdown_signal() => Ok(ExitCode::SUCCESS),
    }
}

pub async fn rebuild(config: &Config, name: &str) -> Result<ExitCode> {
    let projections = parse_projections(&[name.to_string()])?;
    let admin = stack::connect_admin(config).await?;
    // The projections are independent (tables, schema, lock of their own): they are rebuilt
    // side by side, each on its own connection, a progress bar each.
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} positions, {per_sec}, eta {eta}")?
        .progress_chars("=> ");
    let started = std::time::Instant::now();
    let rebuilds = projections.iter().map(|&projection| {
        let bar = bars.add(indicatif::ProgressBar::new(0).with_style(style.clone()));
        bar.set_prefix(projection.name());
        let admin = admin.clone();
        async move {
            let started = std::time::Instant::now();
            let report = factory_projections::rebuild::rebuild(&admin, projection, |_, position, target| {
                bar.set_length(target.max(0) as u64);
                bar.set_position(position.max(0) as u64);
            })
            .await;
            bar.finish_and_clear();
            report.map(|report| (projection, report, started.elapsed().as_secs_f64()))
        }
    });
    let reports = futures::future::try_join_all(rebuilds).await?;
    for (projection, report, seconds) in &reports {
        println!(
            "{}: rebuilt from {} events up to position {} in {:.1} s ({:.0} events/s), swapped in",
            projection.name(),
            report.events_applied,
            report.position,
            seconds,
            report.events_applied as f64 / seconds.max(1e-9)
        );
    }
    if reports.len() > 1 {
        println!("all rebuilt in {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn state(config: &Config, run: RunId, at: Option<i64>, json: bool) -> Result<ExitCode> {
    let pool = stack::connect_db(config).await?;
    let Some(state) = factory_projections::state::run_at(&pool, run.0, at).await? else {
        match at {
            Some(at) => bail!("run {run} has no events at or before position {at}"),
            None => bail!("no run {run} in the event store"),
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(ExitCode::SUCCESS);
    }
    let r = &state["run"];
    println!(
        "run {run} after position {}: {} ({}), {}/{} stages completed",
        state["position"], r["status"].as_str().unwrap_or("?"), r["title"].as_str().unwrap_or(""),
        r["stages_completed"], r["stages_total"]
    );
    if let Some(reason) = r["status_reason"].as_str() {
        println!("  reason: {reason}");
    }
    for s in state["stages"].as_array().into_iter().flatten() {
        println!(
            "  {:<24} {:<12} iterations {}",
            s["stage"].as_str().unwrap_or(""), s["status"].as_str().unwrap_or(""), s["iterations"]
        );
    }
    for e in state["edges"].as_array().into_iter().flatten() {
        println!(
            "  {} {} -> {} ({}){}",
            e["kind"].as_str().unwrap_or(""), e["source"].as_str().unwrap_or(""), e["target"].as_str().unwrap_or(""),
            e["state"].as_str().unwrap_or(""),
            e["label"].as_str().map(|l| format!(": {l}")).unwrap_or_default()
        );
    }
    let cost: f64 = state["costs"].as_array().into_iter().flatten().filter_map(|c| c["cost_usd"].as_f64()).sum();
    println!("  cost so far ${cost:.4}");
    Ok(ExitCode::SUCCESS)
}
