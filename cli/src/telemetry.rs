//! Logging: `tracing` to stderr, filtered by `FACTORY_LOG` (or `RUST_LOG`).

use tracing_subscriber::EnvFilter;

pub fn init(config: &crate::config::Config) {
    let filter = EnvFilter::try_new(config.log_filter())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// An error and its sources on one line, for the user.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
