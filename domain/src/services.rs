//! What the aggregates need from outside, passed in so tests can fix it.

use chrono::{DateTime, Utc};
use std::sync::Arc;

/// The outside world as the aggregates see it.
pub trait Services: Send + Sync {
    /// The business time stamped into events that carry one (submission, deadlines).
    fn now(&self) -> DateTime<Utc>;
}

/// How aggregates hold their services (cqrs-es wants one concrete type).
pub type SharedServices = Arc<dyn Services>;

/// The production services: the system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemServices;

impl Services for SystemServices {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Services with a clock that never moves, so the events a test expects are exact.
#[cfg(test)]
pub(crate) mod fixed {
    use super::{Services, SharedServices};
    use chrono::{DateTime, TimeZone, Utc};
    use std::sync::Arc;

    /// The instant every test event is stamped with.
    pub(crate) fn instant() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap()
    }

    struct FixedClock;

    impl Services for FixedClock {
        fn now(&self) -> DateTime<Utc> {
            instant()
        }
    }

    pub(crate) fn services() -> SharedServices {
        Arc::new(FixedClock)
    }
}
