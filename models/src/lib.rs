//! The model router (contract §5): aliases (`factory/architect`, `factory/coder`, ...) to
//! ordered chains of `provider:model` targets, with deadlines, retries, fallback, pricing
//! and per-team budgets. Real providers speak through rig-core; `scripted:` targets are the
//! demo script.

pub mod overrides;
pub mod providers;
pub mod router;
pub mod routing;

pub use providers::ProviderSettings;
pub use router::Router;
pub use routing::{RoutingConfig, Target};
