//! Read models folded from the event store (contract §2, §4): the runs list and detail, the
//! run graph, costs, and the activity feed. Each projection is a set of SQL statements per
//! event, applied with the projection's checkpoint in one transaction, so a crash or a
//! redelivery never applies an event twice or skips one.
//!
//! The statements use unqualified table names. The live runner applies them to the tables in
//! `public`; a rebuild applies the same statements to fresh tables in a schema of its own and
//! swaps them in; time travel applies them to temporary tables (which PostgreSQL puts first on
//! the search path) for one run, up to a position. One fold, three uses.

mod activity;
mod cost;
mod graph;
pub mod rebuild;
pub mod runner;
mod runs;
pub mod state;

use factory_nats::EventEnvelope;
use sqlx::PgConnection;

/// The read models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Projection {
    Runs,
    Graph,
    Cost,
    Activity,
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The event cannot be applied: the projection stops here rather than skip it.
    #[error("{projection} cannot apply event {position} ({event_type}): {problem}")]
    Apply { projection: &'static str, position: i64, event_type: String, problem: String },
    #[error("unknown projection `{0}`; projections: runs, graph, cost, activity")]
    Unknown(String),
    #[error("JetStream: {0}")]
    Stream(String),
}

impl Projection {
    pub const ALL: [Projection; 4] = [Self::Runs, Self::Graph, Self::Cost, Self::Activity];

    pub fn name(self) -> &'static str {
        match self {
            Self::Runs => "runs",
            Self::Graph => "graph",
            Self::Cost => "cost",
            Self::Activity => "activity",
        }
    }

    pub fn parse(name: &str) -> Result<Self, ProjectionError> {
        Self::ALL.into_iter().find(|p| p.name() == name).ok_or_else(|| ProjectionError::Unknown(name.to_string()))
    }

    /// The tables this projection owns (what a rebuild replaces).
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Self::Runs => &["rm_runs", "rm_run_stages"],
            Self::Graph => &["rm_graph_nodes", "rm_graph_edges"],
            Self::Cost => &["rm_cost_objectives", "rm_costs"],
            Self::Activity => &["rm_activity"],
        }
    }

    /// Applies one event's effect (nothing, for events this projection ignores).
    pub async fn apply(self, db: &mut PgConnection, event: &EventEnvelope) -> Result<(), ProjectionError> {
        let result = match self {
            Self::Runs => runs::apply(db, event).await,
            Self::Graph => graph::apply(db, event).await,
            Self::Cost => cost::apply(db, event).await,
            Self::Activity => activity::apply(db, event).await,
        };
        result.map_err(|error| match error {
            Problem::Database(e) => ProjectionError::Database(e),
            Problem::Invalid(problem) => ProjectionError::Apply {
                projection: self.name(),
                position: event.position,
                event_type: event.event_type.clone(),
                problem,
            },
        })
    }
}

/// What can go wrong inside a fold.
#[derive(Debug)]
enum Problem {
    Database(sqlx::Error),
    Invalid(String),
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        Problem::Database(e)
    }
}

fn text<'a>(event: &'a EventEnvelope, field: &str) -> Result<&'a str, Problem> {
    event.payload[field]
        .as_str()
        .ok_or_else(|| Problem::Invalid(format!("`{field}` is missing or not text")))
}

fn run_of(event: &EventEnvelope) -> Result<uuid::Uuid, Problem> {
    event.run_id.ok_or_else(|| Problem::Invalid("the event has no run".into()))
}

/// The stages of the pipeline a run was submitted with, in file order, with their inputs.
fn pipeline_stages(event: &EventEnvelope) -> Result<Vec<(String, String, Vec<String>)>, Problem> {
    let name = text(event, "pipeline")?;
    let definition = event.payload["pipeline_definition"].as_str().unwrap_or_default();
    let pipeline = if definition.is_empty() {
        factory_teams::Pipeline::builtin(name).ok_or_else(|| Problem::Invalid(format!("unknown pipeline `{name}`")))?
    } else {
        factory_teams::Pipeline::parse(name, definition).map_err(|e| Problem::Invalid(e.to_string()))?
    };
    Ok(pipeline.stages().iter().map(|s| (s.name.clone(), s.team.clone(), s.inputs.clone())).collect())
}
