//! Benchmarks (filled in below).
use crate::config::Config;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// store | relay | all
    pub which: String,
    #[arg(long)]
    pub quick: bool,
}

pub async fn run(_args: BenchArgs, _config: &Config) -> anyhow::Result<ExitCode> {
    anyhow::bail!("benchmarks are being written")
}
