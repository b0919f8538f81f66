//! Pipelines as data: which teams work a requirement, in what order, on which model.
//!
//! A pipeline is a TOML file. The built-ins (`phase1`, `full`) live in `teams/pipelines/`
//! and are compiled in; a user passes their own with `--pipeline FILE`.
//!
//! ```toml
//! name = "phase1"                  # optional; defaults to the file's stem
//! description = "..."              # optional
//! review = true                    # optional, default false: the run ends AWAITING_REVIEW
//! revision_stage = "solution-architecture"  # optional, default the first stage: where a
//!                                  # REVISE sends the run back (must name a stage)
//! max_revisions = 2                # optional, default 2, at most 10
//!
//! [[stages]]                       # at least one, at most 100
//! name = "business-analysis"       # unique; [a-z0-9][a-z0-9_-]*, at most 64 characters
//! team = "business-analysis"       # one of the 17 team ids of the contract (TEAM_IDS)
//! alias = "factory/fast"           # one of ALIASES
//! max_iterations = 3               # optional, default 3; from 1 to 10
//! inputs = []                      # optional, default []: stages whose output this one needs
//! ```
//!
//! Stages form a DAG through `inputs`: a stage is ready when every stage it names has
//! completed, so stages with no path between them run in parallel. A team may appear in
//! more than one stage (a second QA pass, say); stage names are what runs track.
//!
//! A file is refused, with a message naming the file, the stage and the problem, when it has
//! an unknown key, an unknown team or alias, a duplicate stage, an input naming a missing
//! stage or the stage itself, a cycle (the stages in it are named), no stages, a bad
//! `max_iterations`, or a `revision_stage` that is not a stage.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

pub use crate::catalog::TEAM_IDS;

/// The model aliases a stage may use. `local/embed` is the contract's fifth alias, but it is
/// an embedding model: no team can answer with it.
pub const ALIASES: [&str; 4] = [
    "factory/architect",
    "factory/coder",
    "factory/fast",
    "factory/cheap",
];

/// Names of the pipelines compiled into the binary.
pub const BUILTIN_PIPELINES: [&str; 2] = ["phase1", "full"];

/// Bounds a user's file must respect. Iterations bound the model calls one objective may
/// make; stages and revisions bound a run.
pub const MAX_ITERATIONS: u32 = 10;
pub const MAX_REVISIONS: u32 = 10;
pub const MAX_STAGES: usize = 100;
const MAX_NAME_CHARS: usize = 64;

const DEFAULT_MAX_ITERATIONS: u32 = 3;
const DEFAULT_MAX_REVISIONS: u32 = 2;

/// One step of a pipeline: a team's objective, on a model alias, after its inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    pub team: String,
    pub alias: String,
    #[serde(default = "default_max_iterations")]
    pub max_iterations: u32,
    #[serde(default)]
    pub inputs: Vec<String>,
}

fn default_max_iterations() -> u32 {
    DEFAULT_MAX_ITERATIONS
}

fn default_max_revisions() -> u32 {
    DEFAULT_MAX_REVISIONS
}

/// The file as written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    name: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    review: bool,
    revision_stage: Option<String>,
    #[serde(default = "default_max_revisions")]
    max_revisions: u32,
    #[serde(default)]
    stages: Vec<Stage>,
}

/// A validated pipeline: its stages form a DAG of known teams on known aliases. The only way
/// to get one is [`Pipeline::parse`] (or `builtin` / `load`, which call it), so every
/// `Pipeline` in the program is valid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pipeline {
    /// The text it was parsed from, which a run stores so that it carries its own plan.
    source: String,
    name: String,
    description: String,
    review: bool,
    revision_stage: String,
    max_revisions: u32,
    stages: Vec<Stage>,
}

/// Why a pipeline was refused.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(
        "no built-in pipeline is named `{0}` and no file exists at that path (built-ins: {builtins})",
        builtins = BUILTIN_PIPELINES.join(", ")
    )]
    NotFound(String),
    #[error("cannot read pipeline file `{path}`")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pipeline `{pipeline}` is not a well-formed pipeline file")]
    Toml {
        pipeline: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("pipeline `{pipeline}` is invalid: {problem}")]
    Invalid { pipeline: String, problem: Problem },
}

/// What is wrong with a pipeline whose TOML is well formed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    BadPipelineName(String),
    NoStages,
    TooManyStages(usize),
    BadStageName(String),
    DuplicateStage(String),
    UnknownTeam {
        stage: String,
        team: String,
    },
    UnknownAlias {
        stage: String,
        alias: String,
    },
    BadMaxIterations {
        stage: String,
        value: u32,
    },
    MissingInput {
        stage: String,
        input: String,
    },
    SelfInput(String),
    DuplicateInput {
        stage: String,
        input: String,
    },
    /// The stages of one cycle, in the order work would flow round it.
    Cycle(Vec<String>),
    UnknownRevisionStage(String),
    BadMaxRevisions(u32),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadPipelineName(name) => write!(
                f,
                "the pipeline name `{name}` must be 1 to {MAX_NAME_CHARS} characters of a-z, 0-9, `-`, `_`, starting with a letter or digit"
            ),
            Self::NoStages => write!(f, "it has no stages; add at least one [[stages]] table"),
            Self::TooManyStages(n) => {
                write!(f, "it has {n} stages; at most {MAX_STAGES} are allowed")
            }
            Self::BadStageName(name) => write!(
                f,
                "stage name `{name}` must be 1 to {MAX_NAME_CHARS} characters of a-z, 0-9, `-`, `_`, starting with a letter or digit"
            ),
            Self::DuplicateStage(name) => write!(f, "stage `{name}` is defined more than once"),
            Self::UnknownTeam { stage, team } => write!(
                f,
                "stage `{stage}` names unknown team `{team}` (teams: {})",
                TEAM_IDS.join(", ")
            ),
            Self::UnknownAlias { stage, alias } => write!(
                f,
                "stage `{stage}` names unknown model alias `{alias}` (aliases: {})",
                ALIASES.join(", ")
            ),
            Self::BadMaxIterations { stage, value } => write!(
                f,
                "stage `{stage}` has max_iterations = {value}; it must be from 1 to {MAX_ITERATIONS}"
            ),
            Self::MissingInput { stage, input } => {
                write!(
                    f,
                    "stage `{stage}` has input `{input}`, which is not a stage of this pipeline"
                )
            }
            Self::SelfInput(stage) => write!(f, "stage `{stage}` names itself as an input"),
            Self::DuplicateInput { stage, input } => {
                write!(f, "stage `{stage}` lists input `{input}` more than once")
            }
            Self::Cycle(stages) => {
                let mut path: Vec<String> = stages.iter().map(|s| format!("`{s}`")).collect();
                if let Some(first) = path.first().cloned() {
                    path.push(first);
                }
                write!(
                    f,
                    "stages form a cycle, so none of them can start: {}",
                    path.join(" -> ")
                )
            }
            Self::UnknownRevisionStage(stage) => {
                write!(
                    f,
                    "revision_stage `{stage}` is not a stage of this pipeline"
                )
            }
            Self::BadMaxRevisions(n) => {
                write!(f, "max_revisions = {n}; it must be at most {MAX_REVISIONS}")
            }
        }
    }
}

impl Pipeline {
    /// Parses and validates a pipeline file's text. `name_hint` names the source in errors
    /// (a built-in's name or a file path), and its file stem is the pipeline's name when the
    /// file does not set one.
    pub fn parse(name_hint: &str, text: &str) -> Result<Pipeline, PipelineError> {
        let file: PipelineFile = toml::from_str(text).map_err(|source| PipelineError::Toml {
            pipeline: name_hint.to_string(),
            source,
        })?;
        let invalid = |problem| PipelineError::Invalid {
            pipeline: name_hint.to_string(),
            problem,
        };

        let name = match file.name {
            Some(name) => name,
            None => Path::new(name_hint)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        if !is_valid_name(&name) {
            return Err(invalid(Problem::BadPipelineName(name)));
        }
        validate_stages(&file.stages).map_err(invalid)?;
        let revision_stage = match file.revision_stage {
            Some(stage) if file.stages.iter().any(|s| s.name == stage) => stage,
            Some(stage) => return Err(invalid(Problem::UnknownRevisionStage(stage))),
            None => file.stages[0].name.clone(),
        };
        if file.max_revisions > MAX_REVISIONS {
            return Err(invalid(Problem::BadMaxRevisions(file.max_revisions)));
        }
        Ok(Pipeline {
            source: text.to_string(),
            name,
            description: file.description,
            review: file.review,
            revision_stage,
            max_revisions: file.max_revisions,
            stages: file.stages,
        })
    }

    /// A pipeline compiled into the binary, by name (see [`BUILTIN_PIPELINES`]).
    pub fn builtin(name: &str) -> Option<Pipeline> {
        let text = match name {
            "phase1" => include_str!("../pipelines/phase1.toml"),
            "full" => include_str!("../pipelines/full.toml"),
            _ => return None,
        };
        // The built-ins are validated by this module's tests, so a failure here is a bug in
        // the shipped files, not in the user's input.
        Some(Pipeline::parse(name, text).expect("built-in pipelines are valid"))
    }

    /// A built-in pipeline by name, or else a pipeline file at the path `arg`. The only I/O
    /// of this crate.
    pub fn load(arg: &str) -> Result<Pipeline, PipelineError> {
        if let Some(pipeline) = Pipeline::builtin(arg) {
            return Ok(pipeline);
        }
        let text = std::fs::read_to_string(arg).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                PipelineError::NotFound(arg.to_string())
            } else {
                PipelineError::Read {
                    path: arg.to_string(),
                    source,
                }
            }
        })?;
        Pipeline::parse(arg, &text)
    }

    /// The pipeline file's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// Whether a run of this pipeline ends AWAITING_REVIEW rather than COMPLETED.
    pub fn review(&self) -> bool {
        self.review
    }

    /// The stage a REVISE sends the run back to.
    pub fn revision_stage(&self) -> &str {
        &self.revision_stage
    }

    pub fn max_revisions(&self) -> u32 {
        self.max_revisions
    }

    /// The stages, in file order.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Stages not yet started (nor done) whose inputs are all done, in file order. These are
    /// the stages the orchestrator may start now, all at once.
    pub fn ready_stages(&self, done: &BTreeSet<String>, started: &BTreeSet<String>) -> Vec<&Stage> {
        self.stages
            .iter()
            .filter(|s| !started.contains(&s.name) && !done.contains(&s.name))
            .filter(|s| s.inputs.iter().all(|input| done.contains(input)))
            .collect()
    }

    /// Whether every stage is done.
    pub fn is_finished(&self, done: &BTreeSet<String>) -> bool {
        self.stages.iter().all(|s| done.contains(&s.name))
    }

    /// Every stage, each after all of its inputs; among stages free to go next, file order
    /// decides, so the order is stable.
    pub fn topological_order(&self) -> Vec<&Stage> {
        let mut order: Vec<&Stage> = Vec::with_capacity(self.stages.len());
        let mut placed: BTreeSet<&str> = BTreeSet::new();
        while order.len() < self.stages.len() {
            // A validated pipeline is acyclic, so each pass places at least one stage.
            let next = self
                .stages
                .iter()
                .find(|s| {
                    !placed.contains(s.name.as_str())
                        && s.inputs.iter().all(|i| placed.contains(i.as_str()))
                })
                .expect("a validated pipeline is acyclic");
            placed.insert(&next.name);
            order.push(next);
        }
        order
    }

    /// The stage `name` and every stage that depends on it, directly or not, in file order:
    /// what must run again when a revision sends the run back to `name`. Empty when `name`
    /// is not a stage.
    pub fn downstream(&self, name: &str) -> Vec<&Stage> {
        if self.stage(name).is_none() {
            return Vec::new();
        }
        let mut reached: BTreeSet<&str> = BTreeSet::from([name]);
        // Stages may list inputs defined later in the file, so repeat until nothing changes.
        loop {
            let before = reached.len();
            for stage in &self.stages {
                if stage.inputs.iter().any(|i| reached.contains(i.as_str())) {
                    reached.insert(&stage.name);
                }
            }
            if reached.len() == before {
                break;
            }
        }
        self.stages
            .iter()
            .filter(|s| reached.contains(s.name.as_str()))
            .collect()
    }
}

fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.chars().count() <= MAX_NAME_CHARS
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Checks each stage on its own, then the names between stages, then the graph. The first
/// problem found is reported, in file order, so a user fixes one thing at a time.
fn validate_stages(stages: &[Stage]) -> Result<(), Problem> {
    if stages.is_empty() {
        return Err(Problem::NoStages);
    }
    if stages.len() > MAX_STAGES {
        return Err(Problem::TooManyStages(stages.len()));
    }
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for stage in stages {
        if !is_valid_name(&stage.name) {
            return Err(Problem::BadStageName(stage.name.clone()));
        }
        if !names.insert(&stage.name) {
            return Err(Problem::DuplicateStage(stage.name.clone()));
        }
        if !TEAM_IDS.contains(&stage.team.as_str()) {
            return Err(Problem::UnknownTeam {
                stage: stage.name.clone(),
                team: stage.team.clone(),
            });
        }
        if !ALIASES.contains(&stage.alias.as_str()) {
            return Err(Problem::UnknownAlias {
                stage: stage.name.clone(),
                alias: stage.alias.clone(),
            });
        }
        if !(1..=MAX_ITERATIONS).contains(&stage.max_iterations) {
            return Err(Problem::BadMaxIterations {
                stage: stage.name.clone(),
                value: stage.max_iterations,
            });
        }
    }
    for stage in stages {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for input in &stage.inputs {
            if *input == stage.name {
                return Err(Problem::SelfInput(stage.name.clone()));
            }
            if !names.contains(input.as_str()) {
                return Err(Problem::MissingInput {
                    stage: stage.name.clone(),
                    input: input.clone(),
                });
            }
            if !seen.insert(input) {
                return Err(Problem::DuplicateInput {
                    stage: stage.name.clone(),
                    input: input.clone(),
                });
            }
        }
    }
    match find_cycle(stages) {
        Some(cycle) => Err(Problem::Cycle(cycle)),
        None => Ok(()),
    }
}

/// One cycle among the stages, if any, in the order work would flow round it and starting at
/// the earliest of its stages in the file. Every input is known to name a stage.
fn find_cycle(stages: &[Stage]) -> Option<Vec<String>> {
    let position: BTreeMap<&str, usize> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    // Peel off stages whose inputs are all peeled (Kahn). What remains waits, directly or
    // not, on a cycle; every remaining stage has an input that also remains.
    let mut peeled = vec![false; stages.len()];
    loop {
        let mut progress = false;
        for (i, stage) in stages.iter().enumerate() {
            if !peeled[i]
                && stage
                    .inputs
                    .iter()
                    .all(|input| peeled[position[input.as_str()]])
            {
                peeled[i] = true;
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }
    let start = peeled.iter().position(|p| !p)?;
    // Walk backwards along remaining inputs until a stage repeats: that loop is a cycle.
    let mut walk: Vec<usize> = vec![start];
    loop {
        let current = *walk.last().expect("the walk is never empty");
        let next = stages[current]
            .inputs
            .iter()
            .map(|input| position[input.as_str()])
            .find(|&j| !peeled[j])
            .expect("a remaining stage has a remaining input");
        if let Some(at) = walk.iter().position(|&j| j == next) {
            let mut cycle: Vec<usize> = walk[at..].to_vec();
            // The walk followed inputs (against the flow of work); turn it round, then start
            // at the stage that comes first in the file.
            cycle.reverse();
            let first = (0..cycle.len())
                .min_by_key(|&k| cycle[k])
                .expect("a cycle is never empty");
            cycle.rotate_left(first);
            return Some(cycle.into_iter().map(|i| stages[i].name.clone()).collect());
        }
        walk.push(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn names(stages: &[&Stage]) -> Vec<String> {
        stages.iter().map(|s| s.name.clone()).collect()
    }

    fn problem(text: &str) -> Problem {
        match Pipeline::parse("test.toml", text) {
            Err(PipelineError::Invalid { pipeline, problem }) => {
                assert_eq!(pipeline, "test.toml");
                problem
            }
            other => panic!("expected an invalid pipeline, got {other:?}"),
        }
    }

    /// The error's whole chain, as the CLI shows it.
    fn chain(error: &dyn std::error::Error) -> String {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    const TWO: &str = r#"
        [[stages]]
        name = "a"
        team = "business-analysis"
        alias = "factory/fast"

        [[stages]]
        name = "b"
        team = "backend-engineering"
        alias = "factory/coder"
        inputs = ["a"]
    "#;

    #[test]
    fn defaults_fill_optional_keys() {
        let p = Pipeline::parse("/some/dir/my-flow.toml", TWO).unwrap();
        assert_eq!(p.name(), "my-flow");
        assert_eq!(p.description(), "");
        assert!(!p.review());
        assert_eq!(p.revision_stage(), "a");
        assert_eq!(p.max_revisions(), 2);
        assert_eq!(p.stages()[0].max_iterations, 3);
        assert!(p.stages()[0].inputs.is_empty());
        assert_eq!(p.stage("b").unwrap().team, "backend-engineering");
    }

    #[test]
    fn unknown_key_is_refused_naming_it() {
        let text = TWO.replace("inputs = [\"a\"]", "inputs = [\"a\"]\nmodel = \"gpt\"");
        let err = Pipeline::parse("test.toml", &text).unwrap_err();
        assert!(matches!(err, PipelineError::Toml { .. }));
        let message = chain(&err);
        assert!(message.contains("test.toml"), "{message}");
        assert!(message.contains("unknown field `model`"), "{message}");

        let err = Pipeline::parse("test.toml", &format!("colour = \"red\"\n{TWO}")).unwrap_err();
        assert!(
            chain(&err).contains("unknown field `colour`"),
            "{}",
            chain(&err)
        );
    }

    #[test]
    fn unknown_team_is_refused() {
        let text = TWO.replace("backend-engineering", "backend");
        let p = problem(&text);
        assert_eq!(
            p,
            Problem::UnknownTeam {
                stage: "b".into(),
                team: "backend".into()
            }
        );
        assert!(
            p.to_string()
                .contains("stage `b` names unknown team `backend`")
        );
    }

    #[test]
    fn unknown_alias_is_refused() {
        let text = TWO.replace("factory/coder", "local/embed");
        assert_eq!(
            problem(&text),
            Problem::UnknownAlias {
                stage: "b".into(),
                alias: "local/embed".into()
            }
        );
    }

    #[test]
    fn duplicate_stage_is_refused() {
        let text = TWO
            .replace("name = \"b\"", "name = \"a\"")
            .replace("inputs = [\"a\"]", "");
        assert_eq!(problem(&text), Problem::DuplicateStage("a".into()));
    }

    #[test]
    fn missing_input_is_refused() {
        let text = TWO.replace("inputs = [\"a\"]", "inputs = [\"a\", \"design\"]");
        let p = problem(&text);
        assert_eq!(
            p,
            Problem::MissingInput {
                stage: "b".into(),
                input: "design".into()
            }
        );
        assert_eq!(
            p.to_string(),
            "stage `b` has input `design`, which is not a stage of this pipeline"
        );
    }

    #[test]
    fn input_on_itself_is_refused() {
        let text = TWO.replace("inputs = [\"a\"]", "inputs = [\"b\"]");
        assert_eq!(problem(&text), Problem::SelfInput("b".into()));
    }

    #[test]
    fn duplicate_input_is_refused() {
        let text = TWO.replace("inputs = [\"a\"]", "inputs = [\"a\", \"a\"]");
        assert_eq!(
            problem(&text),
            Problem::DuplicateInput {
                stage: "b".into(),
                input: "a".into()
            }
        );
    }

    #[test]
    fn cycle_is_refused_naming_exactly_its_stages() {
        // root -> x -> y -> z -> x, and tail waits on the cycle without being in it.
        let text = r#"
            [[stages]]
            name = "tail"
            team = "documentation"
            alias = "factory/cheap"
            inputs = ["z"]
            [[stages]]
            name = "root"
            team = "business-analysis"
            alias = "factory/fast"
            [[stages]]
            name = "y"
            team = "backend-engineering"
            alias = "factory/coder"
            inputs = ["x"]
            [[stages]]
            name = "x"
            team = "solution-architecture"
            alias = "factory/architect"
            inputs = ["root", "z"]
            [[stages]]
            name = "z"
            team = "qa-engineering"
            alias = "factory/coder"
            inputs = ["y"]
        "#;
        let p = problem(text);
        assert_eq!(p, Problem::Cycle(vec!["y".into(), "z".into(), "x".into()]));
        assert_eq!(
            p.to_string(),
            "stages form a cycle, so none of them can start: `y` -> `z` -> `x` -> `y`"
        );
    }

    #[test]
    fn two_stage_cycle_is_refused() {
        let text = TWO.replace(
            "alias = \"factory/fast\"",
            "alias = \"factory/fast\"\ninputs = [\"b\"]",
        );
        assert_eq!(problem(&text), Problem::Cycle(vec!["a".into(), "b".into()]));
    }

    #[test]
    fn zero_stages_is_refused() {
        assert_eq!(problem("name = \"empty\"\n"), Problem::NoStages);
        assert_eq!(
            problem("name = \"empty\"\nstages = []\n"),
            Problem::NoStages
        );
    }

    #[test]
    fn bad_max_iterations_is_refused() {
        for value in [0, 11] {
            let text = TWO.replace(
                "inputs = [\"a\"]",
                &format!("inputs = [\"a\"]\nmax_iterations = {value}"),
            );
            assert_eq!(
                problem(&text),
                Problem::BadMaxIterations {
                    stage: "b".into(),
                    value
                }
            );
        }
        let text = TWO.replace("inputs = [\"a\"]", "inputs = [\"a\"]\nmax_iterations = -1");
        assert!(matches!(
            Pipeline::parse("t", &text),
            Err(PipelineError::Toml { .. })
        ));
        let text = TWO.replace("inputs = [\"a\"]", "inputs = [\"a\"]\nmax_iterations = 10");
        assert_eq!(
            Pipeline::parse("t", &text)
                .unwrap()
                .stage("b")
                .unwrap()
                .max_iterations,
            10
        );
    }

    #[test]
    fn revision_stage_must_be_a_stage() {
        let text = format!("review = true\nrevision_stage = \"design\"\n{TWO}");
        assert_eq!(
            problem(&text),
            Problem::UnknownRevisionStage("design".into())
        );
        let text = format!("review = true\nrevision_stage = \"b\"\n{TWO}");
        assert_eq!(Pipeline::parse("t", &text).unwrap().revision_stage(), "b");
    }

    #[test]
    fn bad_max_revisions_is_refused() {
        let text = format!("max_revisions = 11\n{TWO}");
        assert_eq!(problem(&text), Problem::BadMaxRevisions(11));
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(
            problem(&format!("name = \"My Flow\"\n{TWO}")),
            Problem::BadPipelineName("My Flow".into())
        );
        let text = TWO
            .replace("name = \"b\"", "name = \"../b\"")
            .replace("inputs = [\"a\"]", "");
        assert_eq!(problem(&text), Problem::BadStageName("../b".into()));
    }

    #[test]
    fn malformed_toml_is_refused_with_its_position() {
        let err = Pipeline::parse("test.toml", "name = \"x\"\n[[stages]\n").unwrap_err();
        assert!(matches!(err, PipelineError::Toml { .. }));
        assert!(chain(&err).contains("line 2"), "{}", chain(&err));
    }

    #[test]
    fn phase1_is_a_chain_of_five() {
        let p = Pipeline::builtin("phase1").unwrap();
        assert_eq!(p.name(), "phase1");
        assert!(p.review());
        assert_eq!(p.revision_stage(), "solution-architecture");
        let expected = [
            "business-analysis",
            "solution-architecture",
            "backend-engineering",
            "qa-engineering",
            "documentation",
        ];
        assert_eq!(names(&p.topological_order()), expected);
        // A chain: exactly one stage is ready at each step.
        let mut done = BTreeSet::new();
        for name in expected {
            let ready = p.ready_stages(&done, &BTreeSet::new());
            assert_eq!(names(&ready), [name]);
            assert_eq!(ready[0].team, name);
            done.insert(name.to_string());
        }
        assert!(p.ready_stages(&done, &BTreeSet::new()).is_empty());
        assert!(p.is_finished(&done));
        assert_eq!(
            p.stage("solution-architecture").unwrap().alias,
            "factory/architect"
        );
    }

    #[test]
    fn full_covers_every_team_once() {
        let p = Pipeline::builtin("full").unwrap();
        assert_eq!(p.stages().len(), 17);
        let teams: BTreeSet<&str> = p.stages().iter().map(|s| s.team.as_str()).collect();
        assert_eq!(teams, TEAM_IDS.into_iter().collect::<BTreeSet<_>>());
        assert_eq!(
            names(&p.topological_order()).last().unwrap(),
            "documentation"
        );
        // Documentation comes last because it depends, directly or not, on every other stage.
        for stage in p.stages() {
            assert!(names(&p.downstream(&stage.name)).contains(&"documentation".to_string()));
        }
    }

    #[test]
    fn full_runs_stages_in_parallel_after_architecture() {
        let p = Pipeline::builtin("full").unwrap();
        let none = BTreeSet::new();
        assert_eq!(
            names(&p.ready_stages(&none, &none)),
            ["product-management", "business-analysis"]
        );
        let done = set(&["product-management", "business-analysis"]);
        assert_eq!(
            names(&p.ready_stages(&done, &none)),
            ["ux-ui-design", "compliance-legal", "solution-architecture"]
        );
        let done = set(&[
            "product-management",
            "business-analysis",
            "ux-ui-design",
            "compliance-legal",
            "solution-architecture",
        ]);
        assert_eq!(
            names(&p.ready_stages(&done, &none)),
            ["api-design", "database-engineering", "data-engineering"]
        );
        // Started stages are not offered again.
        let started = set(&["database-engineering"]);
        assert_eq!(
            names(&p.ready_stages(&done, &started)),
            ["api-design", "data-engineering"]
        );

        let mut done = done;
        done.extend(set(&[
            "api-design",
            "database-engineering",
            "data-engineering",
        ]));
        assert_eq!(
            names(&p.ready_stages(&done, &none)),
            [
                "backend-engineering",
                "frontend-engineering",
                "feature-engineering",
                "ml-engineering"
            ]
        );
    }

    #[test]
    fn full_runs_in_eight_waves() {
        let p = Pipeline::builtin("full").unwrap();
        let mut done = BTreeSet::new();
        let mut waves = Vec::new();
        while !p.is_finished(&done) {
            let ready = names(&p.ready_stages(&done, &BTreeSet::new()));
            assert!(!ready.is_empty());
            done.extend(ready.iter().cloned());
            waves.push(ready.len());
        }
        assert_eq!(waves, [2, 3, 3, 4, 2, 1, 1, 1]);
    }

    #[test]
    fn topological_order_puts_inputs_first_even_when_written_later() {
        let text = r#"
            [[stages]]
            name = "late"
            team = "documentation"
            alias = "factory/cheap"
            inputs = ["early"]
            [[stages]]
            name = "early"
            team = "business-analysis"
            alias = "factory/fast"
        "#;
        let p = Pipeline::parse("t", text).unwrap();
        assert_eq!(names(&p.topological_order()), ["early", "late"]);
        assert_eq!(
            names(&p.ready_stages(&BTreeSet::new(), &BTreeSet::new())),
            ["early"]
        );
    }

    #[test]
    fn downstream_is_what_a_revision_reruns() {
        let p = Pipeline::builtin("phase1").unwrap();
        assert_eq!(
            names(&p.downstream(p.revision_stage())),
            [
                "solution-architecture",
                "backend-engineering",
                "qa-engineering",
                "documentation"
            ]
        );
        assert!(p.downstream("nope").is_empty());
    }

    #[test]
    fn builtin_knows_only_its_names() {
        for name in BUILTIN_PIPELINES {
            assert_eq!(Pipeline::builtin(name).unwrap().name(), name);
        }
        assert!(Pipeline::builtin("phase2").is_none());
    }

    #[test]
    fn load_takes_a_builtin_or_a_file() {
        assert_eq!(Pipeline::load("full").unwrap().name(), "full");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.toml");
        std::fs::write(&path, TWO).unwrap();
        let p = Pipeline::load(path.to_str().unwrap()).unwrap();
        assert_eq!(p.name(), "mine");
        assert_eq!(p.stages().len(), 2);

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, TWO.replace("factory/coder", "factory/gpt")).unwrap();
        let err = Pipeline::load(bad.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("bad.toml"), "{err}");
        assert!(
            err.to_string()
                .contains("unknown model alias `factory/gpt`"),
            "{err}"
        );

        let missing = dir.path().join("missing.toml");
        let err = Pipeline::load(missing.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, PipelineError::NotFound(_)));
        assert!(err.to_string().contains("built-ins: phase1, full"), "{err}");

        let err = Pipeline::load(dir.path().to_str().unwrap()).unwrap_err();
        assert!(matches!(err, PipelineError::Read { .. }), "{err:?}");
    }
}
