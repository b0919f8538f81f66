//! The scripted provider: plays every team's model in demo mode (no LLM on the machine) and in
//! tests, so that a run produces real artifacts and every path of the contract can be shown.
//!
//! It answers like a diligent operative. Turn 1: one `write_file` call per deliverable of the
//! team (plus `record_decision` for teams that record decisions), the content derived from the
//! requirement. Turn 2, once the tool results are back: one TaskResult naming what it wrote.
//! Markers in the requirement (contract §6) steer it down the other paths: `#clarify`,
//! `#ask-human`, `#block`, `#malformed`, `#loop`, `#slow=<ms>`; `#fail=<alias>` is the
//! router's business, through [`should_fail_first_target`].
//!
//! Everything is deterministic (no clock, no randomness): the same request gives the same
//! answer, so demo runs can be compared. Start reading at [`respond`]; the per-team content
//! lives in [`TEAMS`] and the templates at the end of the file.

use crate::model::{
    Message, ModelFuture, ModelProvider, ModelRequest, ModelResponse, REPAIR_MARKER, ToolCall,
};
use factory_domain::{TaskResult, TaskStatus};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// The provider name in every response (and in `ModelCalled` events).
pub const PROVIDER: &str = "scripted";

/// `#slow=<ms>` is capped here, so a typo cannot park a worker for hours.
pub const MAX_SLOW_MS: u64 = 60_000;

/// A line starting with this in the objective prompt carries the answer to an earlier
/// clarification; a team that asked then completes instead of asking again.
pub const CLARIFICATION_ANSWER_PREFIX: &str = "Clarification answer:";

/// Plays the model of every team. Stateless: what to say next is read from the conversation.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScriptedProvider;

impl ScriptedProvider {
    pub fn new() -> Self {
        Self
    }
}

impl ModelProvider for ScriptedProvider {
    fn complete<'a>(&'a self, request: &'a ModelRequest) -> ModelFuture<'a> {
        Box::pin(async move {
            let markers = Markers::scan(first_user_message(&request.messages));
            if let Some(delay) = markers.slow {
                tokio::time::sleep(delay).await;
            }
            Ok(respond(request, &markers))
        })
    }

    fn answers_in_process(&self) -> bool {
        true
    }
}

/// Whether the first target of `alias` should fail with HTTP 500 (the `#fail=<alias>` marker),
/// so that the router shows its fallback chain. `requirement_text` may be the requirement or
/// the whole objective prompt; `#fail=factory/coder` and `#fail=coder` both name
/// `factory/coder`.
pub fn should_fail_first_target(requirement_text: &str, alias: &str) -> bool {
    let alias = alias.trim();
    let short = alias.strip_prefix("factory/").unwrap_or(alias);
    Markers::scan(requirement_text).fail.iter().any(|named| {
        named == alias || named == short || named.strip_prefix("factory/") == Some(short)
    })
}

/// A short, file-name-safe name for the product a requirement asks for:
/// "Build a URL shortener with expiry" gives `url-shortener`.
pub fn project_slug(requirement: &str) -> String {
    ProductName::of(&strip_markers(requirement)).slug
}

// ---------------------------------------------------------------------------------------------
// The conversation
// ---------------------------------------------------------------------------------------------

/// The answer to one request, given its markers (already scanned, the delay already served).
fn respond(request: &ModelRequest, markers: &Markers) -> ModelResponse {
    let prompt = first_user_message(&request.messages);
    let script = team_script(&request.team);
    let project = Project::of(&request.team, prompt);
    let turn = Turn::read(&request.messages);
    let verdict = verdict(script, markers, &project, prompt);

    let answered = turn.tool_results_seen || turn.repair_requested;
    let (content, tool_calls) = match verdict {
        Verdict::Complete if !answered => {
            (String::new(), deliverable_calls(script, &project, request))
        }
        verdict => {
            let artifacts = if turn.written_paths.is_empty() && verdict == Verdict::Complete {
                planned_paths(script, &project)
            } else {
                turn.written_paths.clone()
            };
            let result = task_result(script, &project, verdict, artifacts);
            let json =
                serde_json::to_string_pretty(&result).expect("a TaskResult always serialises");
            if markers.malformed && !turn.repair_requested {
                (cut_off(&json), Vec::new())
            } else {
                (json, Vec::new())
            }
        }
    };

    let output_chars = content.chars().count()
        + tool_calls
            .iter()
            .map(|call| call.name.len() + json_text_len(&call.arguments).chars)
            .sum::<usize>();
    ModelResponse {
        content,
        tool_calls,
        provider: PROVIDER.to_string(),
        model: format!(
            "{PROVIDER}-{}",
            request
                .alias
                .strip_prefix("factory/")
                .unwrap_or(&request.alias)
        ),
        input_tokens: tokens(request_chars(request)),
        output_tokens: tokens(output_chars),
        ..ModelResponse::default()
    }
}

/// What the history says about where the conversation stands.
struct Turn {
    /// Tool results came back: the deliverables were written (or attempted).
    tool_results_seen: bool,
    /// The gate refused an earlier answer and asked for a corrected one.
    repair_requested: bool,
    /// Paths of the `write_file` calls made so far, in order, without repeats.
    written_paths: Vec<String>,
}

impl Turn {
    fn read(messages: &[Message]) -> Turn {
        let mut turn = Turn {
            tool_results_seen: false,
            repair_requested: false,
            written_paths: Vec::new(),
        };
        for message in messages {
            match message {
                Message::Tool { .. } => turn.tool_results_seen = true,
                Message::User { content } => {
                    turn.repair_requested |= content.trim_start().starts_with(REPAIR_MARKER);
                }
                Message::Assistant { tool_calls, .. } => {
                    let paths = tool_calls
                        .iter()
                        .filter(|call| call.name == "write_file")
                        .filter_map(|call| call.arguments.get("path")?.as_str());
                    for path in paths {
                        if !turn.written_paths.iter().any(|p| p == path) {
                            turn.written_paths.push(path.to_string());
                        }
                    }
                }
            }
        }
        turn
    }
}

fn first_user_message(messages: &[Message]) -> &str {
    messages
        .iter()
        .find_map(|message| match message {
            Message::User { content } => Some(content.as_str()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Tokens as providers roughly count them: four characters each.
fn tokens(chars: usize) -> u64 {
    (chars / 4) as u64
}

/// The length of a JSON value's compact text (`Value::to_string`), counted as serde writes
/// it, without building the text.
#[derive(Debug, Default, PartialEq, Eq)]
struct TextLen {
    bytes: usize,
    chars: usize,
}

impl std::io::Write for TextLen {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes += buf.len();
        // Every byte but a UTF-8 continuation byte (0b10xx_xxxx) starts a character.
        self.chars += buf.iter().filter(|&&b| (b & 0xC0) != 0x80).count();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_text_len(value: &serde_json::Value) -> TextLen {
    let mut len = TextLen::default();
    serde_json::to_writer(&mut len, value).expect("a JSON value always serializes");
    len
}

fn request_chars(request: &ModelRequest) -> usize {
    let messages: usize = request
        .messages
        .iter()
        .map(|message| match message {
            Message::User { content } | Message::Tool { content, .. } => content.chars().count(),
            Message::Assistant {
                content,
                tool_calls,
            } => {
                content.chars().count()
                    + tool_calls
                        .iter()
                        .map(|call| call.name.len() + json_text_len(&call.arguments).chars)
                        .sum::<usize>()
            }
        })
        .sum();
    let tools: usize = request
        .tools
        .iter()
        .map(|tool| {
            tool.name.len() + tool.description.chars().count() + json_text_len(&tool.parameters).bytes
        })
        .sum();
    request.system.chars().count() + messages + tools
}

/// A TaskResult cut in the middle: the `#malformed` answer, which the gate must refuse as
/// truncated JSON and the repair request must recover.
fn cut_off(json: &str) -> String {
    let half = json.len() / 2;
    let cut = (0..=half)
        .rev()
        .find(|&i| json.is_char_boundary(i))
        .unwrap_or(0);
    json[..cut].to_string()
}

// ---------------------------------------------------------------------------------------------
// Markers
// ---------------------------------------------------------------------------------------------

/// The demo markers of contract §6 found in a text.
#[derive(Debug, Default, PartialEq)]
struct Markers {
    clarify: bool,
    ask_human: bool,
    block: bool,
    malformed: bool,
    looping: bool,
    slow: Option<Duration>,
    /// The aliases named by `#fail=`, as written.
    fail: Vec<String>,
}

impl Markers {
    fn scan(text: &str) -> Markers {
        let mut markers = Markers::default();
        for marker in marker_tokens(text) {
            match (marker.name, marker.value) {
                ("clarify", None) => markers.clarify = true,
                ("ask-human", None) => markers.ask_human = true,
                ("block", None) => markers.block = true,
                ("malformed", None) => markers.malformed = true,
                ("loop", None) => markers.looping = true,
                ("slow", Some(value)) => {
                    if let Some(ms) = parse_millis(value) {
                        markers.slow = Some(Duration::from_millis(ms));
                    }
                }
                ("fail", Some(value)) if !value.is_empty() => markers.fail.push(value.to_string()),
                _ => {}
            }
        }
        markers
    }
}

/// One `#name` or `#name=value` token, and where it sits in the text.
struct MarkerToken<'a> {
    name: &'a str,
    value: Option<&'a str>,
    start: usize,
    end: usize,
}

const MARKER_NAMES: [&str; 7] = [
    "clarify",
    "ask-human",
    "block",
    "malformed",
    "loop",
    "slow",
    "fail",
];

/// The known markers in `text`. A marker starts with `#` not preceded by a letter or digit
/// (so `C#` or `issue#3` are not markers) and ends at the first character that cannot be part
/// of an alias; trailing `.`, `,` `:` and `;` are punctuation of the sentence, not the marker.
fn marker_tokens(text: &str) -> Vec<MarkerToken<'_>> {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || "-_=/:.".contains(c);
    let mut tokens = Vec::new();
    for (start, _) in text.match_indices('#') {
        if text[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric())
        {
            continue;
        }
        let body_start = start + 1;
        let body_len = text[body_start..]
            .find(|c: char| !is_token_char(c))
            .unwrap_or(text.len() - body_start);
        let body = text[body_start..body_start + body_len].trim_end_matches(['.', ':', ',', ';']);
        let (name, value) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (body, None),
        };
        if MARKER_NAMES.contains(&name) {
            tokens.push(MarkerToken {
                name,
                value,
                start,
                end: body_start + body.len(),
            });
        }
    }
    tokens
}

/// The leading digits of a `#slow=` value, in milliseconds, capped at [`MAX_SLOW_MS`]:
/// `2000`, `2000ms` and ` 2000` all give 2000; no digits gives `None`.
fn parse_millis(value: &str) -> Option<u64> {
    let digits: String = value
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if digits.is_empty() {
        return None;
    }
    let ms = digits.bytes().fold(0u64, |ms, digit| {
        ms.saturating_mul(10)
            .saturating_add(u64::from(digit - b'0'))
    });
    Some(ms.min(MAX_SLOW_MS))
}

/// The text with its markers taken out, so they do not end up in the artifacts.
fn strip_markers(text: &str) -> String {
    let mut clean = String::with_capacity(text.len());
    let mut at = 0;
    for marker in marker_tokens(text) {
        clean.push_str(&text[at..marker.start]);
        at = marker.end;
    }
    clean.push_str(&text[at..]);
    clean
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// What the team decides
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Verdict {
    Complete,
    /// The question, already addressed (`business-analysis: ...`, `human: ...`).
    Clarify(String),
    Blocked,
}

/// Said in the `#clarify` question and recognised in business-analysis's prompt, so that the
/// answer it gives fits the question asked.
const CLARIFY_TOPIC: &str = "owned by a single user or shared";

fn verdict(script: &TeamScript, markers: &Markers, project: &Project, prompt: &str) -> Verdict {
    let answered = prompt
        .lines()
        .any(|line| line.trim_start().starts_with(CLARIFICATION_ANSWER_PREFIX));
    let is = |team: &str| script.id == team;
    if markers.looping {
        let to = script.asks.unwrap_or("human");
        return Verdict::Clarify(project.fill(&format!(
            "{to}: {} cannot finish {{{{name}}}} yet: which of {{{{fr_range}}}} belong in this \
             delivery, and which can wait for the next one?",
            script.role
        )));
    }
    if is("solution-architecture") && markers.ask_human && !answered {
        return Verdict::Clarify(project.fill(
            "human: May {{name}} store its data outside the EU, and is a managed cloud database \
             allowed? This decides the hosting region and the data store, and only the product \
             owner can decide it.",
        ));
    }
    if is("solution-architecture") && markers.clarify && !answered {
        return Verdict::Clarify(project.fill(&format!(
            "business-analysis: docs/requirements.md does not say whether a {{{{entity}}}} is \
             {CLARIFY_TOPIC} between users. Which is it? The answer decides whether the data \
             model needs an owner column and whether the API needs authorisation per {{{{entity}}}}."
        )));
    }
    if is("backend-engineering") && markers.block {
        return Verdict::Blocked;
    }
    Verdict::Complete
}

/// The `write_file` calls for every deliverable, then `record_decision` where the team
/// records one and the tool is offered.
fn deliverable_calls(
    script: &TeamScript,
    project: &Project,
    request: &ModelRequest,
) -> Vec<ToolCall> {
    script
        .deliverables
        .iter()
        .filter(|deliverable| deliverable.when.holds(project))
        .map(|deliverable| {
            (
                "write_file",
                json!({"path": project.fill(deliverable.path), "content": deliverable.content.write(project)}),
            )
        })
        .chain(
            script
                .decision
                .as_ref()
                .filter(|_| offers(request, "record_decision"))
                .map(|decision| {
                    (
                        "record_decision",
                        json!({
                            "title": project.fill(decision.title),
                            "decision": project.fill(decision.decision),
                            "rationale": project.fill(decision.rationale),
                        }),
                    )
                }),
        )
        .enumerate()
        .map(|(i, (name, arguments))| ToolCall {
            id: format!("call-{}", i + 1),
            name: name.to_string(),
            arguments,
        })
        .collect()
}

/// Whether the request offers a tool. A request that lists no tools at all (a bare test or a
/// caller that grants by convention) is taken to offer the team's usual ones.
fn offers(request: &ModelRequest, tool: &str) -> bool {
    request.tools.is_empty() || request.tools.iter().any(|spec| spec.name == tool)
}

fn planned_paths(script: &TeamScript, project: &Project) -> Vec<String> {
    script
        .deliverables
        .iter()
        .filter(|deliverable| deliverable.when.holds(project))
        .map(|deliverable| project.fill(deliverable.path))
        .collect()
}

fn task_result(
    script: &TeamScript,
    project: &Project,
    verdict: Verdict,
    artifacts: Vec<String>,
) -> TaskResult {
    let fill_all = |items: &[&str]| {
        items
            .iter()
            .map(|item| project.fill(item))
            .collect::<Vec<_>>()
    };
    let mut verified_facts =
        vec![project.fill("Requirement as submitted: \"{{requirement_line}}\"")];
    verified_facts.extend(fill_all(script.answer.facts));
    verified_facts.extend(
        project
            .clarification_answers
            .iter()
            .map(|answer| format!("{CLARIFICATION_ANSWER_PREFIX} {answer}")),
    );
    match verdict {
        Verdict::Complete => {
            let mut reasoning = project.fill(script.answer.reasoning);
            if script.id == "business-analysis" && project.prompt_mentions(CLARIFY_TOPIC) {
                reasoning = format!(
                    "Answer for solution-architecture: each {} is owned by the single user who \
                     created it and is not shared; store the owner's id with it and let only \
                     that user change or delete it. {reasoning}",
                    project.described.entity
                );
            }
            TaskResult {
                status: TaskStatus::Complete,
                reasoning,
                blockers: Vec::new(),
                assumptions_made: fill_all(script.answer.assumptions),
                verified_facts,
                clarification_needed: None,
                artifacts,
            }
        }
        Verdict::Clarify(question) => TaskResult {
            status: TaskStatus::NeedsClarification,
            reasoning: format!(
                "{} stopped before writing its deliverables: the answer to the question below \
                 changes them, and no default would be defensible.",
                script.role
            ),
            blockers: Vec::new(),
            assumptions_made: Vec::new(),
            verified_facts,
            clarification_needed: Some(question),
            artifacts,
        },
        Verdict::Blocked => TaskResult {
            status: TaskStatus::Blocked,
            reasoning: project.fill(
                "Backend Engineering cannot build {{name}}: ADR-0001 fixes the stack on axum 0.8 \
                 and tokio 1, but the build environment cannot reach the crate registry, so the \
                 service can neither be compiled nor tested. Writing code that was never built \
                 would hide the gap, so the work stops here until the environment is fixed.",
            ),
            blockers: vec![
                "No access to the crate registry (crates.io or a mirror) from the build environment: the dependencies of ADR-0001 cannot be fetched".to_string(),
                "Needed from an operator: a registry mirror or vendored crates for axum 0.8, tokio 1, serde 1 and serde_json 1".to_string(),
            ],
            assumptions_made: Vec::new(),
            verified_facts,
            clarification_needed: None,
            artifacts,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The project, as read from the requirement
// ---------------------------------------------------------------------------------------------

/// Everything the templates say about the product: what the team's prompt says (its
/// clarification answers, its inputs) and what the requirement gives (the values the
/// templates refer to as `{{key}}`, worked out once per requirement).
struct Project<'p> {
    /// The `{{team}}` value: the only one that is not the requirement's.
    team: String,
    described: std::sync::Arc<Described>,
    clarification_answers: Vec<String>,
    prompt: &'p str,
    inputs: &'p str,
}

/// What a requirement gives a team's templates.
struct Described {
    entity: String,
    values: BTreeMap<&'static str, String>,
}

/// Requirements described at most, remembered; then the memory starts over.
const REMEMBERED_DESCRIPTIONS: usize = 1024;

impl<'p> Project<'p> {
    /// The project of a team's objective prompt. Its values come from the requirement alone,
    /// so they are worked out once per requirement: every stage of a run, and every turn of
    /// an objective's conversation, asks for them again.
    fn of(team: &str, prompt: &'p str) -> Self {
        type Remembered = std::collections::HashMap<String, std::sync::Arc<Described>>;
        static REMEMBERED: std::sync::Mutex<Option<Remembered>> = std::sync::Mutex::new(None);
        let key = requirement_of(prompt);
        let remembered = REMEMBERED.lock().expect("not poisoned").as_ref().and_then(|r| r.get(&key).cloned());
        let described = match remembered {
            Some(described) => described,
            None => {
                let described = std::sync::Arc::new(Described::of(&key));
                let mut memory = REMEMBERED.lock().expect("not poisoned");
                let remembered = memory.get_or_insert_with(Default::default);
                if remembered.len() >= REMEMBERED_DESCRIPTIONS {
                    remembered.clear();
                }
                remembered.insert(key, described.clone());
                described
            }
        };
        Project::with(team, described, prompt)
    }

    #[cfg(test)]
    fn new(team: &str, prompt: &'p str) -> Self {
        Project::with(team, std::sync::Arc::new(Described::of(&requirement_of(prompt))), prompt)
    }

    fn with(team: &str, described: std::sync::Arc<Described>, prompt: &'p str) -> Self {
        Project {
            team: team_slug(team),
            described,
            clarification_answers: clarification_answers(prompt),
            prompt,
            inputs: section(prompt, "## Inputs").unwrap_or_default(),
        }
    }

    /// `template` with every known `{{key}}` replaced, in one pass: text that came from the
    /// requirement is never substituted again, and unknown `{{...}}` stay as written.
    fn fill(&self, template: &str) -> String {
        let mut out = String::with_capacity(template.len() + 256);
        let mut rest = template;
        while let Some(open) = rest.find("{{") {
            out.push_str(&rest[..open]);
            let after = &rest[open + 2..];
            let known = after
                .find("}}")
                .and_then(|close| Some((self.value(&after[..close])?, close)));
            match known {
                Some((value, close)) => {
                    out.push_str(value);
                    rest = &after[close + 2..];
                }
                None => {
                    out.push('{');
                    rest = &rest[open + 1..];
                }
            }
        }
        out.push_str(rest);
        out
    }

    fn value(&self, key: &str) -> Option<&str> {
        if key == "team" { Some(&self.team) } else { self.described.values.get(key).map(String::as_str) }
    }

    fn prompt_mentions(&self, text: &str) -> bool {
        self.prompt.contains(text)
    }
}

impl Described {
    fn of(requirement: &str) -> Described {
        let product = ProductName::of(requirement);
        let entity = product.entity.clone();
        let entities = plural(&entity);
        let features = features(requirement, &product);
        let frs = functional_requirements(&entity, &entities, &features);
        let flags: Vec<String> = features.iter().map(|feature| flag_name(feature)).collect();

        let requirement_line = requirement.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut values = BTreeMap::new();
        values.insert("name", product.display.clone());
        values.insert("title", title_case(&product.display));
        values.insert("slug", product.slug.clone());
        values.insert("slug_snake", product.slug.replace('-', "_"));
        values.insert("Entity", capitalise(&entity));
        values.insert("Entities", capitalise(&entities));
        values.insert("entity", entity.clone());
        values.insert("entities", entities.clone());
        values.insert(
            "requirement_quoted",
            requirement
                .lines()
                .map(|line| format!("> {line}"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        values.insert(
            "requirement_json",
            serde_json::Value::String(requirement_line.clone()).to_string(),
        );
        values.insert("requirement_line", requirement_line);
        values.insert("fr_count", frs.len().to_string());
        values.insert("fr_range", format!("FR-1..FR-{}", frs.len()));
        values.insert("feature_list", feature_list(&features));
        values.insert(
            "fr_bullets",
            frs.iter()
                .map(|fr| format!("- **{}** {}", fr.id, fr.text))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        values.insert(
            "nfr_bullets",
            NFRS.iter()
                .map(|(id, text)| format!("- **{id}** {text}"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        values.insert("acceptance", acceptance_criteria(&frs, &entity, &entities));
        values.insert("fr_component_map", fr_component_map(&frs));
        values.insert("feature_stories", feature_stories(&features));
        values.insert("feature_flags_toml", feature_flags_toml(&features, &flags));
        values.insert("feature_map_rows", feature_map_rows(&frs, &entities));
        values.insert("coverage_rows", coverage_rows(&frs));
        values.insert("feature_ops", feature_user_guide(&features, &flags));
        Described { entity, values }
    }
}

/// The requirement of an objective prompt, markers stripped.
fn requirement_of(prompt: &str) -> String {
    let requirement = strip_markers(requirement_section(prompt));
    if requirement.is_empty() { "An unspecified product".to_string() } else { requirement }
}

/// The requirement inside an objective prompt: the lines under the `## Requirement` heading
/// (business-analysis's template says `## Requirement as submitted`) up to the next `## `
/// heading; the whole message when there is no such heading.
fn requirement_section(prompt: &str) -> &str {
    match section(prompt, "## Requirement") {
        Some(text) if !text.trim().is_empty() => text.trim(),
        _ => prompt.trim(),
    }
}

/// The text between the line starting with `heading` and the next `## ` line.
fn section<'a>(text: &'a str, heading: &str) -> Option<&'a str> {
    let mut offset = 0;
    let mut start = None;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        match start {
            None if trimmed.starts_with(heading) => start = Some(offset + line.len()),
            Some(from) if trimmed.starts_with("## ") => return Some(&text[from..offset]),
            _ => {}
        }
        offset += line.len();
    }
    start.map(|from| &text[from.min(text.len())..])
}

fn clarification_answers(prompt: &str) -> Vec<String> {
    prompt
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix(CLARIFICATION_ANSWER_PREFIX))
        .map(|answer| answer.trim().to_string())
        .filter(|answer| !answer.is_empty())
        .collect()
}

/// The product's name as the requirement gives it, its slug, and the main record it manages.
struct ProductName {
    /// "URL shortener"
    display: String,
    /// "url-shortener"
    slug: String,
    /// "url": a valid identifier in every generated language.
    entity: String,
    /// How many words of the first sentence the name took (leading verbs included).
    words_used: usize,
}

/// Words that open a requirement without naming the product.
const LEAD_WORDS: &[&str] = &[
    "build",
    "create",
    "make",
    "write",
    "implement",
    "develop",
    "design",
    "add",
    "provide",
    "deliver",
    "ship",
    "we",
    "i",
    "need",
    "want",
    "would",
    "like",
    "to",
    "please",
    "a",
    "an",
    "the",
    "our",
    "my",
    "simple",
    "small",
    "basic",
    "new",
    "minimal",
    "tiny",
    "lightweight",
];
/// Words after which the name is over.
const NAME_STOP_WORDS: &[&str] = &[
    "with",
    "for",
    "that",
    "which",
    "and",
    "using",
    "in",
    "on",
    "of",
    "where",
    "so",
    "supporting",
    "featuring",
    "including",
    "by",
    "from",
    "via",
    "who",
    "whose",
    "when",
    "plus",
    "or",
    "but",
    "to",
    "where",
    "backed",
    "written",
];
/// Words that say what kind of software it is, not what it manages.
const GENERIC_WORDS: &[&str] = &[
    "rest",
    "http",
    "web",
    "api",
    "app",
    "application",
    "service",
    "microservice",
    "system",
    "platform",
    "tool",
    "backend",
    "server",
    "website",
    "site",
    "online",
    "mini",
    "cli",
    "json",
    "graphql",
    "saas",
];
/// Names that would clash with a keyword or with the generated code's own types.
const RESERVED_ENTITIES: &[&str] = &[
    "as",
    "async",
    "await",
    "box",
    "break",
    "const",
    "continue",
    "crate",
    "default",
    "delete",
    "do",
    "dyn",
    "else",
    "enum",
    "error",
    "export",
    "extern",
    "false",
    "fn",
    "for",
    "function",
    "health",
    "if",
    "impl",
    "import",
    "in",
    "interface",
    "let",
    "loop",
    "match",
    "mod",
    "move",
    "mut",
    "new",
    "option",
    "page",
    "path",
    "pub",
    "query",
    "ref",
    "response",
    "result",
    "return",
    "router",
    "self",
    "state",
    "static",
    "store",
    "string",
    "struct",
    "super",
    "trait",
    "true",
    "type",
    "unsafe",
    "use",
    "var",
    "vec",
    "where",
    "while",
    "yield",
];
/// Words that name what holds or handles the records rather than the records themselves.
const ROLE_NOUNS: &[&str] = &[
    "registry",
    "catalog",
    "catalogue",
    "library",
    "directory",
    "board",
    "queue",
    "engine",
    "hub",
    "portal",
    "log",
    "list",
    "management",
    "repository",
    "index",
    "feed",
    "wiki",
    "center",
    "centre",
    "bot",
    "dashboard",
    "suite",
    "workflow",
    "pipeline",
];
const MAX_NAME_WORDS: usize = 4;
const MIN_ENTITY_CHARS: usize = 2;
const MAX_ENTITY_CHARS: usize = 16;

impl ProductName {
    fn of(requirement: &str) -> ProductName {
        let sentence = first_sentence(requirement);
        let mut name_words: Vec<String> = Vec::new();
        let mut words_used = 0;
        for raw in sentence.split_whitespace() {
            let ends_clause = raw.ends_with([',', ';', ':']);
            let word: String = raw.trim_matches(|c: char| !c.is_alphanumeric()).to_string();
            let lower = word.to_lowercase();
            if word.is_empty() {
                words_used += 1;
                continue;
            }
            if name_words.is_empty() && LEAD_WORDS.contains(&lower.as_str()) {
                words_used += 1;
                continue;
            }
            if NAME_STOP_WORDS.contains(&lower.as_str()) {
                break;
            }
            words_used += 1;
            name_words.push(
                word.chars()
                    .filter(|c| c.is_alphanumeric() || *c == '-')
                    .collect(),
            );
            if ends_clause || name_words.len() == MAX_NAME_WORDS {
                break;
            }
        }
        let ascii_words: Vec<String> = name_words
            .iter()
            .map(|word| {
                word.to_lowercase()
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .collect::<String>()
            })
            .filter(|word| !word.is_empty())
            .collect();
        let mut slug = ascii_words.join("-");
        if slug.is_empty() {
            slug = "project".to_string();
        } else if slug.starts_with(|c: char| c.is_ascii_digit()) {
            slug = format!("app-{slug}");
        }
        let entity = entity_of(&name_words);
        let display = if name_words.is_empty() {
            "the product".to_string()
        } else {
            name_words.join(" ")
        };
        ProductName {
            display,
            slug,
            entity,
            words_used,
        }
    }
}

/// The main record the product manages, named by one word of its name: the last one that is
/// not a kind of software or a role ("URL shortener" gives `url`, "recipe sharing platform"
/// gives `recipe`), else the first usable one, else `item`. Words longer than
/// [`MAX_ENTITY_CHARS`] are passed over so that generated code keeps its layout.
fn entity_of(name_words: &[String]) -> String {
    let candidates: Vec<String> = name_words
        .iter()
        .filter(|word| word.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(|word| singular(&word.to_lowercase()))
        .filter(|word| {
            (MIN_ENTITY_CHARS..=MAX_ENTITY_CHARS).contains(&word.len())
                && word.starts_with(|c: char| c.is_ascii_alphabetic())
                && !GENERIC_WORDS.contains(&word.as_str())
                && !RESERVED_ENTITIES.contains(&word.as_str())
        })
        .collect();
    let is_role = |word: &&String| {
        ["er", "or", "ing"]
            .iter()
            .any(|suffix| word.ends_with(suffix))
            || ROLE_NOUNS.contains(&word.as_str())
    };
    candidates
        .iter()
        .rev()
        .find(|word| !is_role(word))
        .or(candidates.first())
        .cloned()
        .unwrap_or_else(|| "item".to_string())
}

/// The requirement up to the end of its first sentence or line.
fn first_sentence(text: &str) -> &str {
    let line = text
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default();
    let end = line
        .char_indices()
        .find(|&(i, c)| {
            matches!(c, '.' | '!' | '?')
                && line[i + 1..].chars().next().is_none_or(char::is_whitespace)
        })
        .map_or(line.len(), |(i, _)| i);
    &line[..end]
}

/// The capabilities the requirement names besides the product itself: "Build a URL
/// shortener with expiry and click statistics" gives `expiry`, `click statistics`.
fn features(requirement: &str, product: &ProductName) -> Vec<String> {
    const SEPARATORS: [&str; 12] = [
        " with ",
        " and ",
        " that ",
        " which ",
        " including ",
        " plus ",
        " so that ",
        " where ",
        " supporting ",
        " featuring ",
        " as well as ",
        " also ",
    ];
    const LEADING: [&str; 12] = [
        "with ",
        "and ",
        "support for ",
        "supports ",
        "support ",
        "it ",
        "a ",
        "an ",
        "the ",
        "also ",
        "should ",
        "can ",
    ];
    const MAX_FEATURES: usize = 6;
    const MAX_FEATURE_CHARS: usize = 80;
    let flat = requirement.split_whitespace().collect::<Vec<_>>().join(" ");
    let rest: String = flat
        .split(' ')
        .skip(product.words_used)
        .collect::<Vec<_>>()
        .join(" ");
    let mut pieces = vec![format!(" {rest} ")];
    for separator in SEPARATORS {
        pieces = pieces
            .iter()
            .flat_map(|piece| piece.split(separator).map(|p| format!(" {p} ")))
            .collect();
    }
    let mut found: Vec<String> = Vec::new();
    for piece in pieces
        .iter()
        .flat_map(|piece| piece.split(['.', ',', ';', ':', '!', '?', '\n']))
    {
        let mut piece = piece.trim().to_string();
        loop {
            let lower = piece.to_lowercase();
            match LEADING.iter().find(|lead| lower.starts_with(**lead)) {
                Some(lead) => piece = piece[lead.len()..].trim_start().to_string(),
                None => break,
            }
        }
        let piece: String = piece.chars().take(MAX_FEATURE_CHARS).collect();
        let piece = piece.trim().to_string();
        let meaningful = piece.chars().filter(|c| c.is_alphanumeric()).count() >= 3;
        if meaningful
            && !found.iter().any(|f| flag_name(f) == flag_name(&piece))
            && found.len() < MAX_FEATURES
        {
            found.push(piece);
        }
    }
    found
}

fn feature_list(features: &[String]) -> String {
    match features {
        [] => "the core operations only".to_string(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// A feature flag's name: the feature in snake case, at most four words.
fn flag_name(feature: &str) -> String {
    let words: Vec<String> = feature
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
        .take(4)
        .map(str::to_lowercase)
        .collect();
    if words.is_empty() {
        "feature".to_string()
    } else {
        words.join("_")
    }
}

fn singular(word: &str) -> String {
    if let Some(stem) = word.strip_suffix("ies").filter(|stem| stem.len() > 1) {
        format!("{stem}y")
    } else if word.ends_with("ss") || word.ends_with("us") || word.len() <= 3 {
        word.to_string()
    } else if let Some(stem) = word.strip_suffix('s') {
        stem.to_string()
    } else {
        word.to_string()
    }
}

fn plural(word: &str) -> String {
    let consonant_y = word.ends_with('y') && !word.ends_with(['a', 'e', 'i', 'o', 'u']) && {
        let before = word.chars().rev().nth(1);
        before.is_some_and(|c| !"aeiou".contains(c))
    };
    if consonant_y {
        format!("{}ies", &word[..word.len() - 1])
    } else if word.ends_with(['s', 'x', 'z']) || word.ends_with("ch") || word.ends_with("sh") {
        format!("{word}es")
    } else {
        format!("{word}s")
    }
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

fn title_case(text: &str) -> String {
    text.split(' ')
        .map(capitalise)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A team id made safe for a file name.
fn team_slug(team: &str) -> String {
    let slug: String = team
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let slug = slug.trim_matches('-').to_string();
    if slug.is_empty() {
        "team".to_string()
    } else {
        slug
    }
}

// ---------------------------------------------------------------------------------------------
// Requirements shared by every team's documents, so their IDs agree
// ---------------------------------------------------------------------------------------------

struct FunctionalRequirement {
    id: String,
    text: String,
    /// The feature it covers, for the FRs beyond the four core operations.
    feature: Option<String>,
}

const NFRS: [(&str, &str); 5] = [
    (
        "NFR-1",
        "Performance: 95 % of requests answer within 200 ms at 50 requests/s.",
    ),
    (
        "NFR-2",
        "Availability: `/health` answers 200 in at least 99.5 % of the minutes of a month.",
    ),
    (
        "NFR-3",
        "Robustness: request bodies up to 64 KiB are accepted; malformed input answers 4xx within 100 ms, never 5xx.",
    ),
    (
        "NFR-4",
        "Configuration: every setting comes from an environment variable; 0 secrets in the repository.",
    ),
    (
        "NFR-5",
        "Operability: the service is ready to serve at most 2 s after it starts.",
    ),
];

fn functional_requirements(
    entity: &str,
    entities: &str,
    features: &[String],
) -> Vec<FunctionalRequirement> {
    let core = [
        format!(
            "A client creates a {entity} by sending its name (1 to 200 characters) and an optional \
             description; the service assigns a unique id and answers with the stored {entity}."
        ),
        format!(
            "A client lists {entities}, newest first, in pages of at most 100 (20 by default)."
        ),
        format!("A client fetches one {entity} by its id."),
        format!(
            "A client deletes a {entity} by its id; afterwards it is neither listed nor fetched."
        ),
    ];
    core.into_iter()
        .map(|text| (text, None))
        .chain(features.iter().map(|feature| {
            (
                format!("The service supports {feature} for {entities}, as the requirement asks."),
                Some(feature.clone()),
            )
        }))
        .enumerate()
        .map(|(i, (text, feature))| FunctionalRequirement {
            id: format!("FR-{}", i + 1),
            text,
            feature,
        })
        .collect()
}

fn acceptance_criteria(frs: &[FunctionalRequirement], entity: &str, entities: &str) -> String {
    let core = [
        (
            format!("Given no {entities}, when a client sends `POST /{entities}` with name \"first\", then the answer is 201 with id 1 and name \"first\"."),
            format!("Given any state, when the name is empty or longer than 200 characters, then the answer is 422 with error code `invalid_{entity}` and nothing is stored."),
        ),
        (
            format!("Given 3 {entities}, when a client sends `GET /{entities}?limit=2`, then 2 {entities} come back, newest first, with `total` 3."),
            "Given any state, when `limit` is 0 or above 100, then the answer is 400 with error code `invalid_limit`.".to_string(),
        ),
        (
            format!("Given {entity} 1 exists, when a client sends `GET /{entities}/1`, then the answer is 200 with that {entity}."),
            format!("Given no {entity} 999, when a client sends `GET /{entities}/999`, then the answer is 404 with error code `not_found`."),
        ),
        (
            format!("Given {entity} 1 exists, when a client sends `DELETE /{entities}/1`, then the answer is 204 and a later `GET /{entities}/1` answers 404."),
            format!("Given no {entity} 999, when a client sends `DELETE /{entities}/999`, then the answer is 404 and nothing changes."),
        ),
    ];
    frs.iter()
        .enumerate()
        .map(|(i, fr)| {
            let (success, failure) = match (core.get(i), &fr.feature) {
                (Some((success, failure)), _) => (success.clone(), failure.clone()),
                (None, feature) => {
                    let feature = feature.as_deref().unwrap_or("the feature");
                    let flag = flag_name(feature);
                    (
                        format!("Given the flag `{flag}` is on, when a client uses {feature}, then the service behaves as `docs/feature-map.md` describes for {fr_id}.", fr_id = fr.id),
                        format!("Given the flag `{flag}` is off or the input for {feature} is invalid, then the service answers 4xx with the common error shape, never 5xx."),
                    )
                }
            };
            format!("### {}\n- {success}\n- Failure: {failure}", fr.id)
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn fr_component_map(frs: &[FunctionalRequirement]) -> String {
    let mut rows = vec![
        "| Requirement | Component | Owner team |".to_string(),
        "| --- | --- | --- |".to_string(),
    ];
    for fr in frs {
        let (component, owner) = match fr.feature {
            None => ("HTTP API + Domain", "backend-engineering"),
            Some(_) => (
                "Domain, behind a feature flag",
                "backend-engineering, feature-engineering",
            ),
        };
        rows.push(format!("| {} | {component} | {owner} |", fr.id));
    }
    rows.push("| NFR-1, NFR-3 | HTTP API + Domain | backend-engineering |".to_string());
    rows.push("| NFR-2, NFR-5 | Container and CI | devops, sre-operations |".to_string());
    rows.push("| NFR-4 | Configuration (`PORT`) | backend-engineering, devops |".to_string());
    rows.join("\n")
}

fn feature_stories(features: &[String]) -> String {
    features
        .iter()
        .enumerate()
        .map(|(i, feature)| {
            format!(
                "| US-{} | As a client I can use {feature}, so that the product does what the requirement asks. | Should | Named in the requirement; shipped behind a flag until it is verified end to end. |",
                i + 5
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn feature_flags_toml(features: &[String], flags: &[String]) -> String {
    if features.is_empty() {
        return "# No feature of the requirement needs a flag: the four core operations ship on.\n"
            .to_string();
    }
    features
        .iter()
        .zip(flags)
        .map(|(feature, flag)| {
            format!(
                "[flags.{flag}]\ndescription = {}\ndefault = false\nowner = \"feature-engineering\"\nremove_when = \"its acceptance tests pass in CI for two consecutive releases\"\n",
                serde_json::Value::String(feature.clone())
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn feature_map_rows(frs: &[FunctionalRequirement], entities: &str) -> String {
    let core = [
        (
            "Create form",
            format!("POST /{entities}"),
            "fr1_create_answers_201_with_an_id",
        ),
        (
            "List",
            format!("GET /{entities}"),
            "fr2_list_is_newest_first_and_paginated",
        ),
        (
            "Detail",
            format!("GET /{entities}/{{id}}"),
            "fr3_unknown_id_answers_404",
        ),
        (
            "List (delete button)",
            format!("DELETE /{entities}/{{id}}"),
            "fr4_deleted_items_are_gone",
        ),
    ];
    frs.iter()
        .enumerate()
        .map(|(i, fr)| match (core.get(i), &fr.feature) {
            (Some((screen, operation, test)), _) => format!(
                "| {} | {screen} | `{operation}` | `{entities}` | `src/routes.rs`, `src/domain.rs` | `tests/api.rs::{test}` | complete |",
                fr.id
            ),
            (None, feature) => format!(
                "| {} | List | (extends the {entities} operations) | `{entities}` | `src/domain.rs` | not yet | partial behind flag `{}` |",
                fr.id,
                flag_name(feature.as_deref().unwrap_or("feature"))
            ),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn coverage_rows(frs: &[FunctionalRequirement]) -> String {
    let core = [
        "`fr1_create_answers_201_with_an_id`, `fr1_empty_name_is_refused_with_the_error_shape`",
        "`fr2_list_is_newest_first_and_paginated`, `fr2_limit_out_of_range_is_refused`",
        "`fr3_unknown_id_answers_404`, `fr3_non_numeric_id_is_refused`",
        "`fr4_deleted_items_are_gone`",
    ];
    let mut rows: Vec<String> = frs
        .iter()
        .enumerate()
        .map(|(i, fr)| match core.get(i) {
            Some(tests) => format!("| {} | {tests} | automated |", fr.id),
            None => format!(
                "| {} | none yet | untested: behind a flag that defaults to off |",
                fr.id
            ),
        })
        .collect();
    rows.push("| NFR-2 | `health_answers_200` | automated |".to_string());
    rows.push("| NFR-3 | `nfr3_malformed_body_answers_400` | automated |".to_string());
    rows.push("| NFR-1, NFR-5 | load and start-up measurements | manual, see below |".to_string());
    rows.join("\n")
}

fn feature_user_guide(features: &[String], flags: &[String]) -> String {
    if features.is_empty() {
        return "The requirement names no feature beyond the core operations above.".to_string();
    }
    features
        .iter()
        .zip(flags)
        .map(|(feature, flag)| {
            format!(
                "### {}\n{} is part of the requirement and ships behind the feature flag `{flag}`, off by default. \
                 Ask your operator to turn it on; `docs/feature-map.md` tracks its status.",
                capitalise(feature),
                capitalise(feature)
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

// ---------------------------------------------------------------------------------------------
// The teams: what each one writes, records and answers
// ---------------------------------------------------------------------------------------------

/// One team's script. Paths and texts are templates over [`Project`]'s values.
struct TeamScript {
    id: &'static str,
    /// The team's name in prose.
    role: &'static str,
    /// Whom the team asks in the `#loop` scenario (the stage before it); `None`: a human.
    asks: Option<&'static str>,
    deliverables: &'static [Deliverable],
    decision: Option<Decision>,
    answer: Answer,
}

struct Deliverable {
    path: &'static str,
    content: Content,
    when: When,
}

enum Content {
    Template(&'static str),
}

impl Content {
    fn write(&self, project: &Project) -> String {
        match self {
            Content::Template(template) => project.fill(template),
        }
    }
}

/// When a deliverable is written.
enum When {
    Always,
    /// Only when the objective's inputs do not already include a file under this folder
    /// (backend-engineering writes the schema only if database-engineering did not).
    InputsLack(&'static str),
}

impl When {
    fn holds(&self, project: &Project) -> bool {
        match self {
            When::Always => true,
            When::InputsLack(folder) => !project.inputs.contains(folder),
        }
    }
}

/// The arguments of the team's `record_decision` call.
struct Decision {
    title: &'static str,
    decision: &'static str,
    rationale: &'static str,
}

/// The COMPLETE answer's texts.
struct Answer {
    reasoning: &'static str,
    assumptions: &'static [&'static str],
    facts: &'static [&'static str],
}

const fn write(path: &'static str, template: &'static str) -> Deliverable {
    Deliverable {
        path,
        content: Content::Template(template),
        when: When::Always,
    }
}

fn team_script(team: &str) -> &'static TeamScript {
    TEAMS
        .iter()
        .find(|script| script.id == team)
        .unwrap_or(&UNKNOWN_TEAM)
}

/// Any team not in the contract still gets a valid answer: one note.
static UNKNOWN_TEAM: TeamScript = TeamScript {
    id: "",
    role: "This team",
    asks: None,
    deliverables: &[write("notes/{{team}}.md", NOTES)],
    decision: None,
    answer: Answer {
        reasoning: "The {{team}} team has no scripted role, so it wrote its reading of the requirement and the next steps it sees in notes/{{team}}.md.",
        assumptions: &["The {{team}} team's objective is read from the requirement alone."],
        facts: &[],
    },
};

static TEAMS: [TeamScript; 17] = [
    TeamScript {
        id: "business-analysis",
        role: "Business Analysis",
        asks: None,
        deliverables: &[write("docs/requirements.md", REQUIREMENTS)],
        decision: None,
        answer: Answer {
            reasoning: "Derived {{fr_count}} functional requirements ({{fr_range}}) and 5 measurable non-functional requirements from the requirement. The core operations on {{entities}} (create, list, fetch, delete) are FR-1..FR-4; each capability the requirement names ({{feature_list}}) has its own FR. Every FR has a success and a failure acceptance criterion. Gaps got stated defaults (A-1..A-4) rather than questions, because each has a defensible default.",
            assumptions: &[
                "A-1: clients use a JSON API over HTTP; no graphical interface is required for the first delivery",
                "A-2: the service has no user accounts; it runs behind the operator's gateway, which authenticates",
                "A-3: a {{entity}} name is 1 to 200 characters",
                "A-4: lists are paginated, 20 items by default and 100 at most",
            ],
            facts: &[
                "The requirement names the product: {{name}}",
                "Capabilities named in the requirement: {{feature_list}}",
            ],
        },
    },
    TeamScript {
        id: "solution-architecture",
        role: "Solution Architecture",
        asks: Some("business-analysis"),
        deliverables: &[
            write("docs/architecture.md", ARCHITECTURE),
            write("docs/adr/0001-rust-axum-stack.md", ADR_STACK),
        ],
        decision: Some(Decision {
            title: "ADR-0001: Rust, axum and an in-process store for {{name}}",
            decision: "Build {{slug}} as one Rust service (edition 2021, Cargo) on axum 0.8 and tokio 1, with an in-process store for the MVP and the PostgreSQL 16 schema kept in migrations/.",
            rationale: "One small binary meets the latency and start-up NFRs with no extra moving parts; the store sits behind one type, so moving to PostgreSQL changes one module.",
        }),
        answer: Answer {
            reasoning: "Designed {{name}} as a single Rust/axum service: an HTTP API layer, a domain layer with the {{Entity}} record and its store, the schema in migrations/, a container and CI. Every requirement ({{fr_range}}, NFR-1..NFR-5) maps to a component with an owner team (docs/architecture.md). ADR-0001 fixes language, framework and build tool so that backend-engineering can start. Nothing beyond what the requirement needs was added.",
            assumptions: &[
                "One instance is enough for the MVP (NFR-1 asks for 50 requests/s)",
                "Data may live in memory for the first delivery; persistence in PostgreSQL 16 is the next increment",
                "The service runs behind the operator's gateway, which terminates TLS and authenticates",
            ],
            facts: &["docs/requirements.md defines {{fr_range}} and NFR-1..NFR-5"],
        },
    },
    TeamScript {
        id: "backend-engineering",
        role: "Backend Engineering",
        asks: Some("solution-architecture"),
        deliverables: &[
            write("Cargo.toml", CARGO_TOML),
            write("src/main.rs", MAIN_RS),
            write("src/routes.rs", ROUTES_RS),
            write("src/domain.rs", DOMAIN_RS),
            Deliverable {
                path: "migrations/0001_{{slug_snake}}.sql",
                content: Content::Template(MIGRATION),
                when: When::InputsLack("migrations/"),
            },
        ],
        decision: None,
        answer: Answer {
            reasoning: "Implemented {{name}} as the axum service of ADR-0001: src/domain.rs holds the {{Entity}} record, its validation and the store (with unit tests), src/routes.rs the five endpoints with one error shape, src/main.rs reads PORT and serves. FR-1..FR-4 are implemented in full; the capabilities beyond them are tracked behind feature flags. Build: `cargo build --release`; run: `PORT=8080 cargo run --release`; test: `cargo test`.",
            assumptions: &[
                "PORT defaults to 8080 when unset",
                "Ids are assigned in creation order, starting at 1",
                "Request bodies are limited to 64 KiB (NFR-3)",
            ],
            facts: &["docs/architecture.md names Rust, axum 0.8 and tokio 1 (ADR-0001)"],
        },
    },
    TeamScript {
        id: "qa-engineering",
        role: "QA Engineering",
        asks: Some("backend-engineering"),
        deliverables: &[
            write("docs/test-plan.md", TEST_PLAN),
            write("tests/api.rs", TESTS_API_RS),
        ],
        decision: None,
        answer: Answer {
            reasoning: "Wrote end-to-end tests for {{name}} in tests/api.rs: each test starts the real binary on a free port and talks HTTP to it, so it checks what a client sees. Every acceptance criterion of FR-1..FR-4 has a success and a failure test, each named after its requirement; NFR-2 and NFR-3 are covered too. The capabilities behind flags are listed as untested in docs/test-plan.md. No production code was changed. Run: `cargo test`.",
            assumptions: &[
                "The service binary is named {{slug}}, as in Cargo.toml",
                "Tests may bind free local ports",
            ],
            facts: &["The service reads its port from the PORT variable (src/main.rs)"],
        },
    },
    TeamScript {
        id: "documentation",
        role: "Documentation",
        asks: Some("qa-engineering"),
        deliverables: &[
            write("README.md", README),
            write("docs/user-guide.md", USER_GUIDE),
            write("CHANGELOG.md", CHANGELOG),
        ],
        decision: None,
        answer: Answer {
            reasoning: "Documented {{name}}: README.md (what it does, quick start, configuration, tests, layout), docs/user-guide.md (one section per user goal, with requests, answers and error messages) and CHANGELOG.md (this delivery, its limitations). For the reviewer: FR-1..FR-4 are built and tested end to end; the capabilities behind flags ({{feature_list}}) remain open, as does persistence across restarts.",
            assumptions: &["Readers call the API with curl; any HTTP client works the same"],
            facts: &[
                "The only configuration variable the code reads is PORT (src/main.rs)",
                "`cargo test` runs the tests in tests/api.rs",
            ],
        },
    },
    TeamScript {
        id: "product-management",
        role: "Product Management",
        asks: None,
        deliverables: &[
            write("docs/product/brief.md", PRODUCT_BRIEF),
            write("docs/product/backlog.md", PRODUCT_BACKLOG),
        ],
        decision: Some(Decision {
            title: "MVP scope of {{name}}",
            decision: "The MVP is the four core operations on {{entities}} (US-1..US-4); the further capabilities ship behind flags; accounts and a graphical console are out.",
            rationale: "The core operations alone deliver the requirement's outcome end to end; the rest adds value only once they work.",
        }),
        answer: Answer {
            reasoning: "Framed {{name}} as a small API product: the brief states the problem, users, value, non-goals and four success metrics with targets; the backlog has US-1..US-4 as Must (the MVP cut) and one Should story per capability named in the requirement ({{feature_list}}). Won't items carry their reasons.",
            assumptions: &[
                "MVP cut: US-1..US-4 (create, list, fetch, delete {{entities}})",
                "Target users (inferred): developers integrating {{name}} into their own tools",
            ],
            facts: &["The requirement asks for {{name}}"],
        },
    },
    TeamScript {
        id: "ux-ui-design",
        role: "UX and UI Design",
        asks: Some("product-management"),
        deliverables: &[
            write("docs/ux/user-flows.md", UX_FLOWS),
            write("docs/ux/screens.md", UX_SCREENS),
        ],
        decision: None,
        answer: Answer {
            reasoning: "Designed the flows and screens of {{name}}: three flows (create, browse and open, delete) cover FR-1..FR-4, and two screens ({{Entities}} list, {{Entity}} detail) each have empty, loading, error and success states with exact copy, accessible names and keyboard paths. Every error message says what to do next.",
            assumptions: &[
                "A single-page web client is the human interface; the API stays usable on its own",
            ],
            facts: &["FR-1..FR-4 are the user-facing requirements"],
        },
    },
    TeamScript {
        id: "compliance-legal",
        role: "Compliance and Legal",
        asks: Some("business-analysis"),
        deliverables: &[
            write("docs/compliance/assessment.md", COMPLIANCE),
            write("docs/compliance/licenses.md", LICENSES),
        ],
        decision: Some(Decision {
            title: "GDPR baseline for {{name}}",
            decision: "Treat free-text fields of {{entities}} as possible personal data: delete on request (FR-4), keep no backups beyond 30 days, log no request bodies.",
            rationale: "The requirement does not exclude personal data in names or descriptions; the GDPR baseline costs little and covers the EU market.",
        }),
        answer: Answer {
            reasoning: "Assessed {{name}}: GDPR applies as a baseline because free-text fields may hold personal data; the inventory lists each field with purpose, legal basis and retention, and the obligations are restated as testable engineering requirements. All declared dependencies are MIT or Apache-2.0, compatible with distribution. For counsel: whether the operator acts as controller or processor for its clients' data.",
            assumptions: &[
                "Jurisdictions: EU (GDPR) and the United States",
                "No payment or health data is processed",
            ],
            facts: &[
                "The declared dependencies are axum, tokio, serde and serde_json (Cargo.toml)",
            ],
        },
    },
    TeamScript {
        id: "api-design",
        role: "API Design",
        asks: Some("solution-architecture"),
        deliverables: &[
            write("api/openapi.yaml", OPENAPI),
            write("docs/api-design.md", API_DESIGN),
        ],
        decision: Some(Decision {
            title: "API conventions of {{name}}",
            decision: "REST over JSON, plural resource paths (/{{entities}}), one error shape {\"error\": {\"code\", \"message\"}}, limit/offset pagination capped at 100, no version prefix until the first breaking change (then /v2).",
            rationale: "The smallest set of conventions that covers every FR; one error shape lets clients handle every failure the same way.",
        }),
        answer: Answer {
            reasoning: "Wrote the OpenAPI 3.1 contract of {{name}}: five operations (create, list, fetch and delete {{entities}}, health), every one with its error responses and examples; all errors share one schema and every list is paginated. docs/api-design.md records the conventions and maps FR-1..FR-4 to operations. Create is not idempotent and says why.",
            assumptions: &[
                "Authentication is done by the gateway in front of the service, so the contract declares no security scheme",
            ],
            facts: &["docs/architecture.md chose REST over JSON"],
        },
    },
    TeamScript {
        id: "database-engineering",
        role: "Database Engineering",
        asks: Some("solution-architecture"),
        deliverables: &[
            write("migrations/0001_{{slug_snake}}.sql", MIGRATION),
            write("docs/data-model.md", DATA_MODEL),
        ],
        decision: Some(Decision {
            title: "Schema of {{name}}",
            decision: "One table {{entities}} with a bigint identity key, a checked name, an optional description, attributes as JSONB and created_at; one index on (created_at DESC, id DESC) for the newest-first list.",
            rationale: "It maps the one domain entity directly and gives the only list query an index; the capabilities behind flags fit in attributes without a migration.",
        }),
        answer: Answer {
            reasoning: "Wrote the PostgreSQL 16 schema of {{name}}: the {{entities}} table with keys and constraints matching the domain rules (name 1 to 200 characters) and the index the newest-first paginated list needs. docs/data-model.md explains every column and index and marks the free-text columns as possible personal data with their retention.",
            assumptions: &[
                "Retention: a {{entity}} is kept until deleted; deleted rows are removed at once",
                "Cardinality: tens of thousands of {{entities}}, no partitioning needed",
            ],
            facts: &["docs/architecture.md names PostgreSQL 16 for the persistent store"],
        },
    },
    TeamScript {
        id: "data-engineering",
        role: "Data Engineering",
        asks: Some("solution-architecture"),
        deliverables: &[
            write("docs/data/flows.md", DATA_FLOWS),
            write(
                "data/contracts/{{entity}}-events.schema.json",
                DATA_CONTRACT,
            ),
            write("etl/{{entity}}_daily.sql", ETL_DAILY),
        ],
        decision: None,
        answer: Answer {
            reasoning: "Defined the one data flow {{name}} needs for its success metrics: {{entity}} lifecycle events (created, deleted) under a versioned contract, rolled up daily by an idempotent job (it upserts by day, so re-running it duplicates nothing). The events carry ids only, no free text, so no personal field leaves the primary store.",
            assumptions: &[
                "The success metrics of the product brief are daily counts; no real-time analytics is needed",
            ],
            facts: &["The product brief measures creation and error rates"],
        },
    },
    TeamScript {
        id: "frontend-engineering",
        role: "Frontend Engineering",
        asks: Some("api-design"),
        deliverables: &[
            write("web/package.json", WEB_PACKAGE_JSON),
            write("web/index.html", WEB_INDEX_HTML),
            write("web/src/main.tsx", WEB_MAIN_TSX),
            write("web/src/App.tsx", WEB_APP_TSX),
            write("web/src/api/client.ts", WEB_CLIENT_TS),
            write("web/src/App.test.tsx", WEB_APP_TEST_TSX),
        ],
        decision: None,
        answer: Answer {
            reasoning: "Built the web client of {{name}} with React, Vite and TypeScript: the {{Entities}} screen with its empty, loading, error and success states and a labelled create form, every call going through the typed client in web/src/api/client.ts that matches api/openapi.yaml. Build with `npm run build`, test with `npm test`.",
            assumptions: &["The API is served from the same origin, or VITE_API_URL names it"],
            facts: &["api/openapi.yaml defines the operations the client calls"],
        },
    },
    TeamScript {
        id: "feature-engineering",
        role: "Feature Engineering",
        asks: Some("api-design"),
        deliverables: &[
            write("docs/feature-map.md", FEATURE_MAP),
            write("config/feature-flags.toml", FEATURE_FLAGS),
        ],
        decision: None,
        answer: Answer {
            reasoning: "Traced every requirement of {{name}} across the layers: FR-1..FR-4 are complete from screen to table to test; each further capability ({{feature_list}}) is partial behind a flag that defaults to off. The layers already connect, so no glue code was needed.",
            assumptions: &["Flags are read at start-up from config/feature-flags.toml"],
            facts: &[
                "POST /{{entities}} answers 201 in api/openapi.yaml, src/routes.rs and web/src/api/client.ts",
                "The error shape {error: {code, message}} is the same in src/routes.rs and web/src/api/client.ts",
            ],
        },
    },
    TeamScript {
        id: "ml-engineering",
        role: "ML Engineering",
        asks: Some("data-engineering"),
        deliverables: &[write("docs/ml/assessment.md", ML_ASSESSMENT)],
        decision: None,
        answer: Answer {
            reasoning: "Assessed whether {{name}} needs learned behaviour: none of {{fr_range}} does; each is met exactly by rules (validation, ordering, lookups), which are cheaper, testable and explainable. No model, data set or ML code was added.",
            assumptions: &["No requirement asks for ranking, recommendation or prediction"],
            facts: &["The requirements are deterministic operations on {{entities}}"],
        },
    },
    TeamScript {
        id: "security-engineering",
        role: "Security Engineering",
        asks: Some("backend-engineering"),
        deliverables: &[
            write("docs/security/threat-model.md", THREAT_MODEL),
            write("docs/security/review.md", SECURITY_REVIEW),
        ],
        decision: Some(Decision {
            title: "Accepted risk: no authentication inside {{name}}",
            decision: "The service itself does not authenticate; it must only be reachable through the operator's gateway, which does.",
            rationale: "The requirement names no users or roles; the gateway already authenticates and rate-limits, and the compose file publishes no port beyond it in production.",
        }),
        answer: Answer {
            reasoning: "Threat-modelled {{name}} with STRIDE over its five entry points and reviewed authentication, authorisation, input validation, secrets and dependencies. No critical or high finding is open: input is validated and bounded (64 KiB), errors leak no internals, no secret is in the repository. Two medium findings (no rate limiting, data lost on restart) are accepted risks with decisions recorded.",
            assumptions: &["The gateway in front of the service authenticates and rate-limits"],
            facts: &[
                "src/routes.rs limits request bodies to 64 KiB",
                "src/main.rs reads only PORT from the environment",
            ],
        },
    },
    TeamScript {
        id: "devops",
        role: "DevOps and Infrastructure",
        asks: Some("backend-engineering"),
        deliverables: &[
            write("Dockerfile", DOCKERFILE),
            write("compose.yaml", COMPOSE),
            write(".github/workflows/ci.yml", CI_YML),
            write("docs/deployment.md", DEPLOYMENT),
        ],
        decision: None,
        answer: Answer {
            reasoning: "Packaged {{name}}: a multi-stage Dockerfile on pinned images with a non-root user and a health check, a compose file with only the service (the MVP store is in process), a CI workflow running the project's own cargo commands, and a deployment guide with every variable, deploy and rollback step.",
            assumptions: &[
                "The service listens on port 8080 (PORT)",
                "Images are tagged with the git commit SHA",
            ],
            facts: &["Cargo.toml builds the binary {{slug}}"],
        },
    },
    TeamScript {
        id: "sre-operations",
        role: "SRE and Operations",
        asks: Some("devops"),
        deliverables: &[
            write("docs/operations/slos.md", SLOS),
            write("ops/alerts.yaml", ALERTS),
            write("docs/operations/runbook.md", RUNBOOK),
        ],
        decision: None,
        answer: Answer {
            reasoning: "Set SLOs for {{name}} from NFR-1 (latency) and NFR-2 (availability), each with an error budget and burn-rate alerts that link to their runbook sections. Availability is measured by probing /health; the latency SLI needs a request-duration histogram the service does not yet expose, listed for backend-engineering.",
            assumptions: &[
                "Availability SLO 99.5 % over 30 days; latency SLO 95 % under 200 ms",
                "Capacity: 50 requests/s on one instance",
            ],
            facts: &["The service exposes GET /health (src/routes.rs)"],
        },
    },
];

// ---------------------------------------------------------------------------------------------
// Templates. `{{key}}` is replaced by the project's value of that name (see `Project::new`).
// ---------------------------------------------------------------------------------------------

const NOTES: &str = r#"# Notes of {{team}}: {{title}}

Requirement:

{{requirement_quoted}}

## Reading
{{title}} manages {{entities}}. The requirements under discussion are {{fr_range}}:

{{fr_bullets}}

## Next steps
1. Confirm which of these requirements concern this team.
2. Write the team's deliverables against them.
"#;

// --- business-analysis ---

const REQUIREMENTS: &str = r#"# Requirements: {{title}}

The requirement as submitted:

{{requirement_quoted}}

## Purpose
{{title}} gives its clients one reliable place to create, find and remove {{entities}},
with {{feature_list}}. This document is the reference every later team maps its work to;
the IDs below are stable across revisions (new requirements are appended).

## Actors
- **Client**: a person or a program that calls the {{name}} API.
- **Operator**: deploys the service, watches its health and answers incidents.

## Functional requirements
{{fr_bullets}}

## Non-functional requirements
{{nfr_bullets}}

## Acceptance criteria
{{acceptance}}

## Glossary
- **{{Entity}}**: the record {{name}} manages. It has an id (assigned by the service), a name
  (1 to 200 characters) and an optional description.
- **Page**: one slice of a list, chosen with `limit` (1 to 100, default 20) and `offset`.
- **Error shape**: every failure answers `{"error": {"code": "...", "message": "..."}}`.

## Out of scope
- User accounts, sign-in and per-user permissions (A-2): the requirement names no users.
- Billing, quotas and multi-tenancy.
- A native mobile client.

## Assumptions
- **A-1** Clients use a JSON API over HTTP; a graphical interface is not required for the
  first delivery (default: API first, a small web client may follow).
- **A-2** The service has no accounts; it runs behind the operator's gateway, which
  authenticates (default: gateway authentication).
- **A-3** A {{entity}} name is 1 to 200 characters (default chosen for storage and display).
- **A-4** Lists are paginated: 20 items by default, 100 at most.

## Open questions
None blocking: every gap above has a stated default that a reviewer may overturn.
"#;

// --- solution-architecture ---

const ARCHITECTURE: &str = r#"# Architecture: {{title}}

Requirement: "{{requirement_line}}".
Requirements: `docs/requirements.md` ({{fr_range}}, NFR-1..NFR-5). Decisions: `docs/adr/`.

## Context
{{title}} is one HTTP service. Clients call its JSON API; an operator deploys it as one
container behind a gateway (TLS, authentication) and watches its health endpoint. The service
calls nothing else.

```
client ──HTTPS──▶ gateway ──HTTP──▶ {{slug}} (axum) ──▶ {{Entity}}Store
```

## Components
| Component | Responsibility | Owner team |
| --- | --- | --- |
| HTTP API (`src/routes.rs`) | routing, input validation, error shape, pagination, body limit | backend-engineering |
| Domain (`src/domain.rs`) | the {{Entity}} record, its rules, the {{entity}} store | backend-engineering |
| Schema (`migrations/`) | PostgreSQL tables and indexes of the persistent store | database-engineering (backend-engineering in phase 1) |
| Container and CI (`Dockerfile`, `.github/`) | image, local compose file, build pipeline | devops |
| End-to-end tests (`tests/`) | the API as a client sees it | qa-engineering |

## Technology stack
- Language: Rust, edition 2021, toolchain 1.85 or later. Build tool: Cargo.
- HTTP: axum 0.8 on tokio 1; JSON with serde 1 and serde_json 1.
- Data store: an in-process store (an ordered map behind a mutex) for the MVP; the
  PostgreSQL 16 schema is kept in `migrations/` for the persistent store that follows.
- Configuration: environment variables only (`PORT`, default 8080).

## Data model
`{{entities}}`: `id` (integer, assigned in creation order), `name` (1 to 200 characters),
`description` (optional text), `created_at` (in the persistent store).

## API sketch
| Method | Path | Requirement | Success | Errors |
| --- | --- | --- | --- | --- |
| POST | `/{{entities}}` | FR-1 | 201 with the {{entity}} | 400 `invalid_body`, 422 `invalid_{{entity}}` |
| GET | `/{{entities}}?limit=&offset=` | FR-2 | 200 with `items` and `total` | 400 `invalid_limit` |
| GET | `/{{entities}}/{id}` | FR-3 | 200 with the {{entity}} | 400 `invalid_id`, 404 `not_found` |
| DELETE | `/{{entities}}/{id}` | FR-4 | 204 | 400 `invalid_id`, 404 `not_found` |
| GET | `/health` | NFR-2 | 200 `{"status": "ok"}` | none |

Every error answers `{"error": {"code": "...", "message": "..."}}`.

## Data flow
A request enters the axum router, which rejects oversized or malformed bodies (400); the
handler validates the input against the domain rules (422), takes the store's lock for the
duration of one map operation and answers JSON.

## Deployment view
One container built by the `Dockerfile`, listening on `PORT` (8080), health-checked on
`/health`; `compose.yaml` runs it locally. One instance serves the MVP's load.

## Requirement mapping
{{fr_component_map}}

## How each NFR is met
- **NFR-1** (p95 ≤ 200 ms): every operation is one lookup in an in-memory ordered map; no
  network hop to a database on the request path.
- **NFR-2** (99.5 %): the container restarts on failure; the health check feeds the probe.
- **NFR-3** (64 KiB, 4xx not 5xx): a body limit on the router and validation in the domain;
  extractor failures are mapped to the error shape.
- **NFR-4** (environment only): `PORT` is the only setting; the service has no secret.
- **NFR-5** (ready ≤ 2 s): one static binary with no start-up work beyond binding a port.

## Accepted risks
- The MVP keeps {{entities}} in memory: a restart loses them. Acceptable for a first delivery;
  the PostgreSQL store (schema already in `migrations/`) is the next increment.
- The service does not authenticate; it must only be reachable through the gateway.
"#;

const ADR_STACK: &str = r#"# ADR-0001: Rust, axum and an in-process store for {{name}}

- Status: accepted
- Deciders: solution-architecture
- Requirements: {{fr_range}}, NFR-1, NFR-5

## Context
{{title}} is a small HTTP service ("{{requirement_line}}"). Backend engineering needs a
concrete language, framework and build tool to start. NFR-1 asks for p95 ≤ 200 ms and NFR-5 for
readiness within 2 s.

## Options
1. **Rust + axum 0.8 + tokio 1, Cargo**: one static binary, low latency, strong typing of
   requests; slower to compile.
2. **TypeScript + Fastify on Node.js 22, npm**: quick to write; a runtime to ship and
   patch, weaker guarantees on input shapes.
3. **Python 3.12 + FastAPI, uv**: quick to write; higher latency under load and a heavier
   image.

## Decision
Option 1. The crate is `{{slug}}`, built with `cargo build --release`. The MVP stores
{{entities}} in process behind the `{{Entity}}Store` type; the PostgreSQL 16 schema lives in
`migrations/` so that the persistent store replaces one module.

## Consequences
- Every team builds, tests and packages with Cargo (`cargo test`, `cargo build --release`).
- The image is a slim Debian base with one binary and no runtime.
- Data does not survive a restart until the PostgreSQL store lands (accepted risk in
  `docs/architecture.md`).
"#;

// --- backend-engineering ---

const CARGO_TOML: &str = r#"[package]
name = "{{slug}}"
version = "0.1.0"
edition = "2021"
description = {{requirement_json}}
publish = false

[dependencies]
axum = "0.8"
serde = { version = "1", features = ["derive"] }
serde_json = "1"
tokio = { version = "1", features = ["macros", "rt-multi-thread", "net"] }
"#;

const MAIN_RS: &str = r#"//! {{title}}: {{requirement_line}}
//!
//! One HTTP service (see docs/architecture.md). Configuration comes from the environment:
//! `PORT` (default 8080).

mod domain;
mod routes;

use std::net::SocketAddr;

const DEFAULT_PORT: u16 = 8080;

#[tokio::main]
async fn main() {
    let port = match std::env::var("PORT") {
        Ok(value) => value.parse().unwrap_or_else(|_| {
            eprintln!("PORT must be a port number, got {value:?}");
            std::process::exit(2);
        }),
        Err(_) => DEFAULT_PORT,
    };
    let address = SocketAddr::from(([0, 0, 0, 0], port));
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .unwrap_or_else(|error| {
            eprintln!("cannot listen on {address}: {error}");
            std::process::exit(1);
        });
    println!("{} listening on {address}", env!("CARGO_PKG_NAME"));
    if let Err(error) = axum::serve(listener, routes::router(routes::AppState::default())).await {
        eprintln!("the server stopped: {error}");
        std::process::exit(1);
    }
}
"#;

const ROUTES_RS: &str = r#"//! The HTTP API of {{name}}: routes, input checks and the one error shape
//! `{"error": {"code": "...", "message": "..."}}`.

use crate::domain;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::{Arc, Mutex, MutexGuard};

/// Largest request body accepted (NFR-3).
const MAX_BODY_BYTES: usize = 64 * 1024;
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;

#[derive(Clone, Default)]
pub struct AppState {
    store: Arc<Mutex<domain::{{Entity}}Store>>,
}

impl AppState {
    fn store(&self) -> MutexGuard<'_, domain::{{Entity}}Store> {
        // A panic while holding the lock cannot leave the map half-changed: every
        // operation is a single insert or remove, so the data is still consistent.
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/{{entities}}", get(list).post(create))
        .route("/{{entities}}/{id}", get(fetch).delete(remove))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn not_found(id: u64) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no {{entity}} has the id {id}"),
    )
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn list(
    State(state): State<AppState>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(page)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            "limit and offset must be whole numbers",
        );
    };
    let limit = page.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            "limit must be between 1 and 100",
        );
    }
    let store = state.store();
    let items = store.list(page.offset.unwrap_or(0), limit);
    Json(json!({"items": items, "total": store.count()})).into_response()
}

async fn create(
    State(state): State<AppState>,
    body: Result<Json<domain::New{{Entity}}>, JsonRejection>,
) -> Response {
    let Json(new) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                &rejection.body_text(),
            )
        }
    };
    match state.store().create(new) {
        Ok(created) => (StatusCode::CREATED, Json(created)).into_response(),
        Err(invalid) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_{{entity}}",
            &invalid.to_string(),
        ),
    }
}

async fn fetch(State(state): State<AppState>, id: Result<Path<u64>, PathRejection>) -> Response {
    let Ok(Path(id)) = id else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "the id must be a positive whole number",
        );
    };
    match state.store().get(id) {
        Some(found) => Json(found.clone()).into_response(),
        None => not_found(id),
    }
}

async fn remove(State(state): State<AppState>, id: Result<Path<u64>, PathRejection>) -> Response {
    let Ok(Path(id)) = id else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "the id must be a positive whole number",
        );
    };
    if state.store().delete(id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        not_found(id)
    }
}
"#;

const DOMAIN_RS: &str = r#"//! The {{Entity}} record of {{name}}, its rules and its store.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Longest name accepted, in characters (requirement A-3).
pub const MAX_NAME_CHARS: usize = 200;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct {{Entity}} {
    pub id: u64,
    pub name: String,
    pub description: Option<String>,
}

/// What a client sends to create a {{entity}} (FR-1).
#[derive(Debug, Deserialize)]
pub struct New{{Entity}} {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// Why a name is refused (FR-1, A-3).
#[derive(Debug, PartialEq, Eq)]
pub enum InvalidName {
    Empty,
    TooLong { chars: usize },
}

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "the name must not be empty"),
            Self::TooLong { chars } => {
                write!(
                    f,
                    "the name has {chars} characters; at most {MAX_NAME_CHARS} are allowed"
                )
            }
        }
    }
}

impl std::error::Error for InvalidName {}

/// The {{entities}}, by id. Ids grow in creation order, so the newest has the highest id.
#[derive(Debug, Default)]
pub struct {{Entity}}Store {
    last_id: u64,
    by_id: BTreeMap<u64, {{Entity}}>,
}

impl {{Entity}}Store {
    /// FR-1: validates and stores a new {{entity}}.
    pub fn create(&mut self, new: New{{Entity}}) -> Result<{{Entity}}, InvalidName> {
        let name = new.name.trim();
        if name.is_empty() {
            return Err(InvalidName::Empty);
        }
        let chars = name.chars().count();
        if chars > MAX_NAME_CHARS {
            return Err(InvalidName::TooLong { chars });
        }
        self.last_id += 1;
        let created = {{Entity}} {
            id: self.last_id,
            name: name.to_string(),
            description: new.description.filter(|text| !text.trim().is_empty()),
        };
        self.by_id.insert(created.id, created.clone());
        Ok(created)
    }

    /// FR-2: one page, newest first.
    pub fn list(&self, offset: usize, limit: usize) -> Vec<{{Entity}}> {
        self.by_id
            .values()
            .rev()
            .skip(offset)
            .take(limit)
            .cloned()
            .collect()
    }

    /// FR-3.
    pub fn get(&self, id: u64) -> Option<&{{Entity}}> {
        self.by_id.get(&id)
    }

    /// FR-4: whether there was such a {{entity}}.
    pub fn delete(&mut self, id: u64) -> bool {
        self.by_id.remove(&id).is_some()
    }

    /// How many {{entities}} there are.
    pub fn count(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(name: &str) -> New{{Entity}} {
        New{{Entity}} {
            name: name.to_string(),
            description: None,
        }
    }

    #[test]
    fn create_assigns_ids_in_order_and_trims_the_name() {
        let mut store = {{Entity}}Store::default();
        assert_eq!(store.create(new("  first ")).unwrap().id, 1);
        let second = store.create(new("second")).unwrap();
        assert_eq!((second.id, second.name.as_str()), (2, "second"));
        assert_eq!(store.get(1).unwrap().name, "first");
    }

    #[test]
    fn invalid_names_are_refused_and_nothing_is_stored() {
        let mut store = {{Entity}}Store::default();
        assert_eq!(store.create(new("   ")), Err(InvalidName::Empty));
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        assert_eq!(
            store.create(new(&long)),
            Err(InvalidName::TooLong {
                chars: MAX_NAME_CHARS + 1
            })
        );
        assert_eq!(store.count(), 0);
    }

    #[test]
    fn list_is_newest_first_and_paginated() {
        let mut store = {{Entity}}Store::default();
        for name in ["a", "b", "c"] {
            store.create(new(name)).unwrap();
        }
        let names: Vec<String> = store.list(0, 2).into_iter().map(|item| item.name).collect();
        assert_eq!(names, ["c", "b"]);
        assert_eq!(store.list(2, 2).len(), 1);
        assert!(store.list(3, 2).is_empty());
    }

    #[test]
    fn deleted_items_are_gone() {
        let mut store = {{Entity}}Store::default();
        let id = store.create(new("a")).unwrap().id;
        assert!(store.delete(id));
        assert!(store.get(id).is_none());
        assert!(!store.delete(id));
    }
}
"#;

const MIGRATION: &str = r#"-- {{title}}: the schema of the persistent store (PostgreSQL 16).
-- Applies on an empty database with no manual step; later changes go in new numbered files.

CREATE TABLE {{entities}} (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Free text: may hold personal data (see docs/data-model.md for retention).
    name        TEXT NOT NULL CHECK (char_length(btrim(name)) BETWEEN 1 AND 200),
    description TEXT,
    -- Values of the capabilities behind feature flags ({{feature_list}}).
    attributes  JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Serves FR-2: the newest-first, paginated list.
CREATE INDEX {{entities}}_newest_first ON {{entities}} (created_at DESC, id DESC);
"#;

// --- qa-engineering ---

const TEST_PLAN: &str = r#"# Test plan: {{title}}

## Scope
The HTTP API of {{name}} as a client sees it: {{fr_range}} and the NFRs that can be checked
automatically. Production code is not changed by QA; defects are reported here.

## Strategy
- **End to end** (`tests/api.rs`): each test starts the real `{{slug}}` binary on a free port
  and talks HTTP/1.1 to it; no mocks. Tests are independent (one service per test) and
  deterministic (no sleeps except polling for start-up with a 10 s deadline).
- **Unit** (`src/domain.rs`, written by backend-engineering): the domain rules.
- Run everything with `cargo test`.

## Coverage matrix
| Requirement | Tests | Status |
| --- | --- | --- |
{{coverage_rows}}

## Known defects
None found in this pass. Each failing test is reported with its reproduction (the test name
and the request it sends) in this section.

## Not tested, and why
- Capabilities behind feature flags (see `config/feature-flags.toml`): off by default, tested
  when their flag is turned on.
- NFR-1 (latency) and NFR-5 (start-up): measured in a load run (`oha -z 60s -q 50
  http://localhost:8080/{{entities}}`) and by timing the start-up, not in CI.
- Persistence across restarts: the MVP keeps data in memory (accepted risk in the
  architecture).
"#;

const TESTS_API_RS: &str = r##"//! End-to-end tests of {{name}} through its HTTP API. Each test starts the service binary on
//! a free port and names the requirement it checks (docs/requirements.md).

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The service under test, built by Cargo for this test binary.
const BINARY: &str = env!("CARGO_BIN_EXE_{{slug}}");
/// Where the {{entities}} live in the API.
const COLLECTION: &str = "/{{entities}}";

struct Service {
    child: Child,
    port: u16,
}

impl Service {
    fn start() -> Service {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(BINARY)
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("the service binary starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the service did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Service { child, port }
    }

    /// One request; the status code and the body parsed as JSON (`Null` when empty).
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let body = body.unwrap_or("");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).unwrap();
        let status = raw
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("a status line");
        let text = raw.split_once("\r\n\r\n").map_or("", |(_, text)| text);
        let json = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(text).expect("a JSON body")
        };
        (status, json)
    }

    fn create(&self, name: &str) -> Value {
        let (status, body) = self.call(
            "POST",
            COLLECTION,
            Some(&serde_json::json!({"name": name}).to_string()),
        );
        assert_eq!(status, 201, "{body}");
        body
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .expect("the common error shape")
}

#[test]
fn health_answers_200() {
    let service = Service::start();
    assert_eq!(service.call("GET", "/health", None).0, 200);
}

#[test]
fn fr1_create_answers_201_with_an_id() {
    let service = Service::start();
    let created = service.create("first");
    assert_eq!(created["id"], 1);
    assert_eq!(created["name"], "first");
}

#[test]
fn fr1_empty_name_is_refused_with_the_error_shape() {
    let service = Service::start();
    let (status, body) = service.call("POST", COLLECTION, Some(r#"{"name": "  "}"#));
    assert_eq!(status, 422);
    assert_eq!(error_code(&body), "invalid_{{entity}}");
    assert_eq!(service.call("GET", COLLECTION, None).1["total"], 0);
}

#[test]
fn fr2_list_is_newest_first_and_paginated() {
    let service = Service::start();
    for name in ["a", "b", "c"] {
        service.create(name);
    }
    let (status, page) = service.call("GET", &format!("{COLLECTION}?limit=2"), None);
    assert_eq!(status, 200);
    let names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c", "b"]);
    assert_eq!(page["total"], 3);
}

#[test]
fn fr2_limit_out_of_range_is_refused() {
    let service = Service::start();
    for limit in ["0", "101", "many"] {
        let (status, body) = service.call("GET", &format!("{COLLECTION}?limit={limit}"), None);
        assert_eq!(status, 400, "limit={limit}");
        assert_eq!(error_code(&body), "invalid_limit");
    }
}

#[test]
fn fr3_unknown_id_answers_404() {
    let service = Service::start();
    let (status, body) = service.call("GET", &format!("{COLLECTION}/999"), None);
    assert_eq!(status, 404);
    assert_eq!(error_code(&body), "not_found");
}

#[test]
fn fr3_non_numeric_id_is_refused() {
    let service = Service::start();
    let (status, body) = service.call("GET", &format!("{COLLECTION}/abc"), None);
    assert_eq!(status, 400);
    assert_eq!(error_code(&body), "invalid_id");
}

#[test]
fn fr4_deleted_items_are_gone() {
    let service = Service::start();
    let id = service.create("short-lived")["id"].as_u64().unwrap();
    assert_eq!(
        service
            .call("DELETE", &format!("{COLLECTION}/{id}"), None)
            .0,
        204
    );
    assert_eq!(
        service.call("GET", &format!("{COLLECTION}/{id}"), None).0,
        404
    );
    assert_eq!(
        service
            .call("DELETE", &format!("{COLLECTION}/{id}"), None)
            .0,
        404
    );
}

#[test]
fn nfr3_malformed_body_answers_400() {
    let service = Service::start();
    let (status, body) = service.call("POST", COLLECTION, Some("{not json"));
    assert_eq!(status, 400);
    assert_eq!(error_code(&body), "invalid_body");
}
"##;

// --- documentation ---

const README: &str = r#"# {{title}}

{{requirement_quoted}}

{{title}} is a small HTTP service that lets clients create, list, fetch and delete
{{entities}}. It is one Rust binary with no external dependencies at run time.

## Prerequisites
- Rust 1.85 or later (`rustup toolchain install stable`), or Docker 24 or later.

## Quick start
```sh
cargo run --release            # listens on http://localhost:8080
curl -s -X POST localhost:8080/{{entities}} -H 'Content-Type: application/json' -d '{"name": "first"}'
curl -s localhost:8080/{{entities}}
```
With Docker: `docker compose up --build`.

## Configuration
| Variable | Default | Meaning |
| --- | --- | --- |
| `PORT` | `8080` | TCP port the service listens on |

## Tests
```sh
cargo test        # unit tests (src/domain.rs) and end-to-end tests (tests/api.rs)
```

## Project layout
| Path | What it holds |
| --- | --- |
| `src/main.rs` | start-up and configuration |
| `src/routes.rs` | the HTTP API and its error shape |
| `src/domain.rs` | the {{Entity}} record, its rules, its store |
| `migrations/` | the PostgreSQL schema of the persistent store |
| `tests/api.rs` | end-to-end tests |
| `docs/` | requirements, architecture, ADRs, test plan, user guide |

See `docs/user-guide.md` for every operation and `CHANGELOG.md` for what this delivery contains.
"#;

const USER_GUIDE: &str = r#"# User guide: {{title}}

Every request and answer is JSON. Every error has the same shape:
`{"error": {"code": "...", "message": "..."}}`; the `code` tells a program what happened,
the `message` tells a person what to change.

## Create a {{entity}} (FR-1)
```sh
curl -s -X POST localhost:8080/{{entities}} -H 'Content-Type: application/json' \
  -d '{"name": "first", "description": "optional"}'
```
Answer: `201` with `{"id": 1, "name": "first", "description": "optional"}`.

| Error | Code | What to do |
| --- | --- | --- |
| 422 | `invalid_{{entity}}` | give a name of 1 to 200 characters |
| 400 | `invalid_body` | send a JSON object with a `name` string |

## List {{entities}} (FR-2)
```sh
curl -s 'localhost:8080/{{entities}}?limit=20&offset=0'
```
Answer: `200` with `{"items": [...], "total": N}`, newest first. `limit` is 1 to 100
(default 20); otherwise `400 invalid_limit`.

## Open one {{entity}} (FR-3)
```sh
curl -s localhost:8080/{{entities}}/1
```
Answer: `200` with the {{entity}}; `404 not_found` if there is none with that id; `400
invalid_id` if the id is not a whole number.

## Delete a {{entity}} (FR-4)
```sh
curl -s -X DELETE localhost:8080/{{entities}}/1
```
Answer: `204`; `404 not_found` if there is none with that id. A deleted {{entity}} is gone
for good.

## Capabilities behind feature flags
{{feature_ops}}

## Check that the service is up
`curl -s localhost:8080/health` answers `{"status": "ok"}`.
"#;

const CHANGELOG: &str = r#"# Changelog

## 0.1.0: first delivery of {{title}}

### Features
- Create, list (newest first, paginated), fetch and delete {{entities}} over a JSON API
  (FR-1..FR-4).
- One error shape for every failure; request bodies limited to 64 KiB.
- Health endpoint `/health`; container image and CI workflow.

### Known limitations
- {{entities}} are kept in memory: a restart loses them (the PostgreSQL store is next).
- The service does not authenticate; run it behind a gateway that does.
- Capabilities behind feature flags ({{feature_list}}) are off by default and not yet tested
  end to end.

### Open defects
None reported by QA in this delivery.
"#;

// --- product-management ---

const PRODUCT_BRIEF: &str = r#"# Product brief: {{title}}

## Problem statement
The requirement: "{{requirement_line}}". Today the people who need {{name}} keep their
{{entities}} by hand, in scattered notes and scripts, with no single place to create, find or
remove them.

## Target users
- **Integrating developers** (inferred): call the API from their own tools and scripts.
- **Operators**: run the service and need it to stay up without attention.

## Value proposition
One small, dependable service for {{entities}}: create, find and remove them in milliseconds,
with {{feature_list}}, through one consistent API.

## Non-goals
- A graphical administration console in the first release.
- User accounts, billing, quotas.
- Anything the requirement does not imply; inferred scope is marked as such in the backlog.

## Success metrics
| Metric | Target | How it is measured |
| --- | --- | --- |
| Time for a new developer to create a first {{entity}} | under 5 minutes | timed walk-through of the README quick start |
| Requests answered within 200 ms | at least 95 % | latency SLI (docs/operations/slos.md) |
| Monthly availability | at least 99.5 % | probe of `/health` |
| Requests failing with a server error | under 0.1 % | 5xx share of all answers, daily roll-up (docs/data/flows.md) |
"#;

const PRODUCT_BACKLOG: &str = r#"# Backlog: {{title}}

Priorities: Must / Should / Could / Won't. Stories marked *(inferred)* are not stated in the
requirement but follow from it.

| ID | Story | Priority | Rationale |
| --- | --- | --- | --- |
| US-1 | As a client I can create a {{entity}} with a name and a description. | Must | The core of "{{name}}". |
| US-2 | As a client I can list my {{entities}}, newest first, page by page. | Must | Without it nothing created can be found. |
| US-3 | As a client I can open one {{entity}} by its id. | Must | Integrations refer to {{entities}} by id. |
| US-4 | As a client I can delete a {{entity}}. | Must | Mistakes must be undoable; also needed for data-protection requests. |
{{feature_stories}}
| US-90 | As a user I can manage {{entities}} in a web page. *(inferred)* | Could | Convenient, but the API delivers the outcome on its own. |
| US-91 | As a user I sign in with my own account. | Won't | The requirement names no users; the gateway authenticates. Revisit if ownership is needed. |
| US-92 | As an operator I bill clients per request. | Won't | No business model is stated in the requirement. |

## MVP cut line
US-1..US-4. Taken alone they deliver the requirement's core outcome end to end: a client can
create, find and remove {{entities}}. Should stories follow behind feature flags.
"#;

// --- ux-ui-design ---

const UX_FLOWS: &str = r#"# User flows: {{title}}

Glossary terms follow `docs/requirements.md`: a **{{Entity}}** has a name and an optional
description.

## Flow 1: create a {{entity}} (FR-1)
Entry point: the {{Entities}} screen, "New {{entity}}" form at the top.
1. The user types a name (required) and a description (optional).
2. The user presses **Create {{entity}}** (or Enter in the name field).
3. The new {{entity}} appears at the top of the list, and the form is cleared.

- Success: the {{entity}} is listed first; focus returns to the name field.
- Failure: an empty or too long name shows "Give the {{entity}} a name of 1 to 200 characters."
  under the field; nothing is created.

## Flow 2: browse and open {{entities}} (FR-2, FR-3)
Entry point: the {{Entities}} screen.
1. The list shows the 20 newest {{entities}}; **Next page** loads the next 20.
2. The user opens a {{entity}} by its name; the detail screen shows name and description.

- Success: the detail screen shows the {{entity}}.
- Failure: a {{entity}} deleted meanwhile shows "This {{entity}} no longer exists. Back to the list."

## Flow 3: delete a {{entity}} (FR-4)
Entry point: the detail screen, **Delete** button.
1. The user presses **Delete**; a confirmation asks "Delete this {{entity}}? This cannot be undone."
2. The user confirms; the list returns without it.

- Success: the {{entity}} is gone from the list.
- Failure: if the service cannot be reached: "Could not delete. Check your connection and try again."
"#;

const UX_SCREENS: &str = r#"# Screens: {{title}}

## {{Entities}} (list)
Purpose: create {{entities}} and find existing ones.
Layout: header (product name) · "New {{entity}}" form · list · pagination.
Components: text field "Name", text area "Description", button "Create {{entity}}", list of
links, button "Next page".

| State | What the user sees |
| --- | --- |
| Loading | "Loading {{entities}}…" with `aria-busy="true"` on the list |
| Empty | "No {{entities}} yet. Create the first one above." |
| Error | "Could not load {{entities}}. Check your connection, then try again." and a **Try again** button |
| Success | the {{entities}}, newest first, 20 per page |

Accessibility: the form fields have visible labels; the list is a `<ul>` with an accessible
name "{{Entities}}"; every action is reachable with Tab and activated with Enter or Space;
errors are announced through `role="alert"`.

## {{Entity}} detail
Purpose: read one {{entity}}; delete it.
Layout: back link · name (heading) · description · **Delete** button.

| State | What the user sees |
| --- | --- |
| Loading | "Loading…" |
| Error (not found) | "This {{entity}} no longer exists. Back to the list." |
| Error (network) | "Could not load this {{entity}}. Try again." |
| Success | name, description (or "No description") |

Accessibility: the name is the page's `h1`; the confirmation dialog traps focus and closes
with Escape.

## Tokens
| Token | Value | Use |
| --- | --- | --- |
| `color-text` | #1f2328 | body text |
| `color-accent` | #0969da | links, primary button |
| `color-danger` | #cf222e | delete button, error text |
| `space-2` | 8px | gaps between fields |
| `font-body` | system-ui, 16px / 1.5 | all text |
"#;

// --- compliance-legal ---

const COMPLIANCE: &str = r#"# Compliance assessment: {{title}}

Assumed markets: the EU and the United States. Requirement: "{{requirement_line}}".

## Applicable regimes
| Regime | Applies? | Basis |
| --- | --- | --- |
| GDPR (EU 2016/679) | yes, as a baseline | free-text fields (name, description) may hold personal data of EU residents |
| CCPA/CPRA (California) | possibly | only if the operator meets its thresholds; the GDPR measures below cover it |
| PCI DSS, HIPAA | no | no payment or health data is processed |

## Personal-data inventory
| Field | Purpose | Legal basis | Retention |
| --- | --- | --- | --- |
| `{{entities}}.name` | identify the {{entity}} | contract (the client's own use) | until deleted (FR-4) |
| `{{entities}}.description` | describe the {{entity}} | contract | until deleted (FR-4) |
| gateway access logs (IP address) | security, abuse prevention | legitimate interest | 30 days |

## Obligations as engineering requirements
- **C-1** Erasure: deleting a {{entity}} removes it at once from the store (FR-4); backups expire
  within 30 days. Test: delete, then fetch answers 404.
- **C-2** Minimisation: the service logs no request bodies. Test: create a {{entity}} and check
  the logs contain no name.
- **C-3** Security of processing: reachable only through the authenticating gateway (see the
  security review).
- **C-4** Licences: only dependencies with permissive licences (see `licenses.md`).

## For counsel
- Whether the operator acts as controller or processor for its clients' data, and the data
  processing agreement that follows.
- Whether hosting outside the EU needs standard contractual clauses.
"#;

const LICENSES: &str = r#"# Dependency licences: {{title}}

| Dependency | Version | Licence | Verdict |
| --- | --- | --- | --- |
| axum | 0.8 | MIT | compatible |
| tokio | 1 | MIT | compatible |
| serde | 1 | MIT OR Apache-2.0 | compatible |
| serde_json | 1 | MIT OR Apache-2.0 | compatible |
| react, react-dom (web client) | 19 | MIT | compatible |
| vite (build only) | 6 | MIT | compatible |
| typescript (build only) | 5 | Apache-2.0 | compatible |
| vitest, @testing-library/react (tests only) | 3, 16 | MIT | compatible |

Transitive dependencies are checked in CI with `cargo deny check licenses` (allow list: MIT,
Apache-2.0, BSD-2-Clause, BSD-3-Clause, ISC, Unicode-3.0). No copyleft licence is present.
"#;

// --- api-design ---

const OPENAPI: &str = r#"openapi: 3.1.0
info:
  title: {{title}} API
  version: 0.1.0
  description: {{requirement_json}}
paths:
  /health:
    get:
      operationId: getHealth
      summary: Whether the service is up
      responses:
        '200':
          description: The service is up
          content:
            application/json:
              example: {status: ok}
  /{{entities}}:
    get:
      operationId: list{{Entities}}
      summary: List {{entities}}, newest first (FR-2)
      parameters:
        - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 100, default: 20}}
        - {name: offset, in: query, schema: {type: integer, minimum: 0, default: 0}}
      responses:
        '200':
          description: One page of {{entities}}
          content:
            application/json:
              schema: {$ref: '#/components/schemas/{{Entity}}Page'}
              example: {items: [{id: 2, name: second, description: null}], total: 2}
        '400': {$ref: '#/components/responses/BadRequest'}
    post:
      operationId: create{{Entity}}
      summary: Create a {{entity}} (FR-1)
      description: Not idempotent; a client that did not get an answer lists before retrying.
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: '#/components/schemas/New{{Entity}}'}
            example: {name: first, description: an example}
      responses:
        '201':
          description: The {{entity}} as stored
          content:
            application/json:
              schema: {$ref: '#/components/schemas/{{Entity}}'}
              example: {id: 1, name: first, description: an example}
        '400': {$ref: '#/components/responses/BadRequest'}
        '422':
          description: The {{entity}} breaks a rule (code invalid_{{entity}})
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Error'}
              example: {error: {code: invalid_{{entity}}, message: the name must not be empty}}
  /{{entities}}/{id}:
    parameters:
      - {name: id, in: path, required: true, schema: {type: integer, minimum: 1}}
    get:
      operationId: get{{Entity}}
      summary: Fetch one {{entity}} (FR-3)
      responses:
        '200':
          description: The {{entity}}
          content:
            application/json:
              schema: {$ref: '#/components/schemas/{{Entity}}'}
        '400': {$ref: '#/components/responses/BadRequest'}
        '404': {$ref: '#/components/responses/NotFound'}
    delete:
      operationId: delete{{Entity}}
      summary: Delete a {{entity}} (FR-4)
      responses:
        '204': {description: Deleted}
        '400': {$ref: '#/components/responses/BadRequest'}
        '404': {$ref: '#/components/responses/NotFound'}
components:
  schemas:
    {{Entity}}:
      type: object
      required: [id, name, description]
      properties:
        id: {type: integer, minimum: 1}
        name: {type: string, minLength: 1, maxLength: 200}
        description: {type: [string, 'null']}
    New{{Entity}}:
      type: object
      required: [name]
      properties:
        name: {type: string, minLength: 1, maxLength: 200}
        description: {type: [string, 'null']}
    {{Entity}}Page:
      type: object
      required: [items, total]
      properties:
        items: {type: array, items: {$ref: '#/components/schemas/{{Entity}}'}}
        total: {type: integer, minimum: 0}
    Error:
      type: object
      required: [error]
      properties:
        error:
          type: object
          required: [code, message]
          properties:
            code: {type: string, enum: [invalid_body, invalid_{{entity}}, invalid_limit, invalid_id, not_found]}
            message: {type: string}
  responses:
    BadRequest:
      description: Malformed input (codes invalid_body, invalid_limit, invalid_id)
      content:
        application/json:
          schema: {$ref: '#/components/schemas/Error'}
          example: {error: {code: invalid_limit, message: limit must be between 1 and 100}}
    NotFound:
      description: No {{entity}} has this id (code not_found)
      content:
        application/json:
          schema: {$ref: '#/components/schemas/Error'}
          example: {error: {code: not_found, message: no {{entity}} has the id 999}}
"#;

const API_DESIGN: &str = r#"# API design: {{title}}

The contract is `api/openapi.yaml` (OpenAPI 3.1). This document records its conventions.

## Conventions
- REST over JSON; resources are plural nouns (`/{{entities}}`), ids are path segments.
- Field names in snake_case; absent optional values are `null`.
- Operation IDs are stable across revisions; breaking changes are marked and versioned.

## Authentication
None in the service: the operator's gateway authenticates every request before it reaches
`{{slug}}` (architecture, accepted risk). The contract therefore declares no security scheme.

## Errors
One shape for every failure: `{"error": {"code": "...", "message": "..."}}`.

| Code | HTTP status | When |
| --- | --- | --- |
| `invalid_body` | 400 | the body is not a JSON object of the expected shape, or over 64 KiB |
| `invalid_limit` | 400 | `limit` outside 1..100, or `limit`/`offset` not whole numbers |
| `invalid_id` | 400 | the id in the path is not a positive whole number |
| `invalid_{{entity}}` | 422 | the {{entity}} breaks a rule (empty or too long name) |
| `not_found` | 404 | no {{entity}} has this id |

## Pagination
Every list takes `limit` (1..100, default 20) and `offset` (default 0) and answers
`{"items": [...], "total": N}`, newest first.

## Idempotency
`GET` and `DELETE` are idempotent (a second `DELETE` answers 404 and changes nothing).
`POST /{{entities}}` is not: a {{entity}} has no natural key to deduplicate on, so a client that
lost an answer lists the newest {{entities}} before retrying. An `Idempotency-Key` header is the
planned remedy if duplicates become a problem.

## Versioning and deprecation
No version prefix until the first breaking change; then `/v2/...` is added and `/...` stays
for 6 months with a `Deprecation` header.

## Requirement to operation
| Requirement | Operation |
| --- | --- |
| FR-1 | `create{{Entity}}` (POST /{{entities}}) |
| FR-2 | `list{{Entities}}` (GET /{{entities}}) |
| FR-3 | `get{{Entity}}` (GET /{{entities}}/{id}) |
| FR-4 | `delete{{Entity}}` (DELETE /{{entities}}/{id}) |
| NFR-2 | `getHealth` (GET /health) |
"#;

// --- database-engineering ---

const DATA_MODEL: &str = r#"# Data model: {{title}}

PostgreSQL 16. Migrations: `migrations/0001_{{slug_snake}}.sql` (apply in order; never edit
an applied one).

## Entities and relationships
One entity, **{{Entity}}** (table `{{entities}}`). It has no relationship to another table in
this delivery; the capabilities behind flags ({{feature_list}}) live in its `attributes`.

## Table `{{entities}}`
| Column | Type | Meaning | Personal data |
| --- | --- | --- | --- |
| `id` | bigint identity, primary key | the id clients use (FR-3, FR-4) | no |
| `name` | text, 1..200 characters after trimming | what the {{entity}} is called (FR-1) | possibly: free text |
| `description` | text, nullable | optional details | possibly: free text |
| `attributes` | jsonb, default `{}` | values of flagged capabilities | no (ids and settings only) |
| `created_at` | timestamptz, default `now()` | ordering of the list (FR-2) | no |

## Indexes
| Index | Serves |
| --- | --- |
| primary key on `id` | fetch and delete by id (FR-3, FR-4) |
| `{{entities}}_newest_first` on `(created_at DESC, id DESC)` | the newest-first paginated list (FR-2) |

## Retention
A {{entity}} is kept until deleted; `DELETE` removes the row at once (compliance C-1).
Backups that may still hold it expire after 30 days.
"#;

// --- data-engineering ---

const DATA_FLOWS: &str = r#"# Data flows: {{title}}

{{title}} needs one flow: the product's success metrics (docs/product/brief.md) are daily
counts of {{entities}} created and deleted and of failed requests.

## Flow 1: {{entity}} lifecycle events → daily roll-up
| | |
| --- | --- |
| Source | the service emits one event per create and delete (`{{entity}}.created`, `{{entity}}.deleted`) |
| Schema | `data/contracts/{{entity}}-events.schema.json`, version 1 |
| Sink | table `{{entity}}_daily` in the analytics schema |
| Job | `etl/{{entity}}_daily.sql`, daily at 01:00 UTC, for the previous day |
| Lineage | events → `analytics.{{entity}}_events` (raw, append-only) → `analytics.{{entity}}_daily` |
| Quality checks | every event validates against the contract; a day with zero events while `/health` was up raises a warning; invalid events are quarantined in `analytics.{{entity}}_events_rejected` and the job fails if more than 1 % are rejected |

## Idempotency
The roll-up upserts one row per day (`ON CONFLICT (day) DO UPDATE`), so re-running a day
replaces its row instead of adding one.

## Personal data
Events carry the {{entity}} id and the event time only, never its name or description: no
personal field leaves the primary store.
"#;

const DATA_CONTRACT: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "$id": "https://example.invalid/contracts/{{entity}}-events/1",
  "title": "{{Entity}} lifecycle event",
  "description": "One event per {{entity}} created or deleted in {{name}}. Version 1.",
  "type": "object",
  "additionalProperties": false,
  "required": ["version", "type", "{{entity}}_id", "occurred_at"],
  "properties": {
    "version": { "const": 1 },
    "type": { "enum": ["{{entity}}.created", "{{entity}}.deleted"] },
    "{{entity}}_id": { "type": "integer", "minimum": 1 },
    "occurred_at": { "type": "string", "format": "date-time" }
  }
}
"#;

const ETL_DAILY: &str = r#"-- Daily roll-up of {{entity}} lifecycle events (docs/data/flows.md, flow 1).
-- Idempotent: re-running a day replaces its row. Parameter :day is the day to compute (UTC).

CREATE TABLE IF NOT EXISTS analytics.{{entity}}_daily (
    day     DATE PRIMARY KEY,
    created BIGINT NOT NULL,
    deleted BIGINT NOT NULL
);

INSERT INTO analytics.{{entity}}_daily (day, created, deleted)
SELECT :day::date,
       count(*) FILTER (WHERE type = '{{entity}}.created'),
       count(*) FILTER (WHERE type = '{{entity}}.deleted')
FROM analytics.{{entity}}_events
WHERE occurred_at >= :day::date AND occurred_at < :day::date + 1
ON CONFLICT (day) DO UPDATE
SET created = EXCLUDED.created,
    deleted = EXCLUDED.deleted;
"#;

// --- frontend-engineering ---

const WEB_PACKAGE_JSON: &str = r#"{
  "name": "{{slug}}-web",
  "private": true,
  "version": "0.1.0",
  "type": "module",
  "scripts": {
    "dev": "vite",
    "build": "tsc --noEmit && vite build",
    "test": "vitest run"
  },
  "dependencies": {
    "react": "^19.0.0",
    "react-dom": "^19.0.0"
  },
  "devDependencies": {
    "@testing-library/react": "^16.1.0",
    "@types/react": "^19.0.0",
    "@types/react-dom": "^19.0.0",
    "@vitejs/plugin-react": "^4.3.4",
    "jsdom": "^25.0.1",
    "typescript": "^5.7.2",
    "vite": "^6.0.5",
    "vitest": "^3.0.0"
  }
}
"#;

const WEB_INDEX_HTML: &str = r#"<!doctype html>
<html lang="en">
  <head>
    <meta charset="UTF-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1.0" />
    <title>{{title}}</title>
  </head>
  <body>
    <div id="root"></div>
    <script type="module" src="/src/main.tsx"></script>
  </body>
</html>
"#;

const WEB_MAIN_TSX: &str = r#"import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App } from "./App";

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
"#;

const WEB_CLIENT_TS: &str = r#"/// <reference types="vite/client" />
// Typed client of api/openapi.yaml. Every network call of the app goes through here.

export interface {{Entity}} {
  id: number;
  name: string;
  description: string | null;
}

export interface {{Entity}}Page {
  items: {{Entity}}[];
  total: number;
}

/** A failure in the API's one error shape: `{"error": {"code", "message"}}`. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

const BASE = import.meta.env.VITE_API_URL ?? "";

async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const response = await fetch(`${BASE}${path}`, {
    method,
    headers: body === undefined ? undefined : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) {
    return undefined as T;
  }
  const json = await response.json();
  if (!response.ok) {
    throw new ApiError(response.status, json.error?.code ?? "unknown", json.error?.message ?? response.statusText);
  }
  return json as T;
}

export const list{{Entities}} = (limit = 20, offset = 0) =>
  call<{{Entity}}Page>("GET", `/{{entities}}?limit=${limit}&offset=${offset}`);
export const get{{Entity}} = (id: number) => call<{{Entity}}>("GET", `/{{entities}}/${id}`);
export const create{{Entity}} = (name: string, description?: string) =>
  call<{{Entity}}>("POST", "/{{entities}}", { name, description: description || null });
export const delete{{Entity}} = (id: number) => call<void>("DELETE", `/{{entities}}/${id}`);
"#;

const WEB_APP_TSX: &str = r#"import { type FormEvent, useCallback, useEffect, useState } from "react";
import { ApiError, create{{Entity}}, list{{Entities}}, type {{Entity}} } from "./api/client";

type ListState =
  | { kind: "loading" }
  | { kind: "error"; message: string }
  | { kind: "ready"; items: {{Entity}}[] };

export function App() {
  const [list, setList] = useState<ListState>({ kind: "loading" });
  const [name, setName] = useState("");
  const [formError, setFormError] = useState<string | null>(null);

  const load = useCallback(async () => {
    setList({ kind: "loading" });
    try {
      const page = await list{{Entities}}();
      setList({ kind: "ready", items: page.items });
    } catch {
      setList({ kind: "error", message: "Could not load {{entities}}. Check your connection, then try again." });
    }
  }, []);

  useEffect(() => {
    void load();
  }, [load]);

  async function submit(event: FormEvent) {
    event.preventDefault();
    try {
      await create{{Entity}}(name);
      setName("");
      setFormError(null);
      await load();
    } catch (error) {
      setFormError(
        error instanceof ApiError && error.code === "invalid_{{entity}}"
          ? "Give the {{entity}} a name of 1 to 200 characters."
          : "Could not create the {{entity}}. Try again.",
      );
    }
  }

  return (
    <main>
      <h1>{{title}}</h1>
      <form onSubmit={submit} aria-label="New {{entity}}">
        <label htmlFor="name">Name</label>
        <input id="name" value={name} onChange={(event) => setName(event.target.value)} />
        <button type="submit">Create {{entity}}</button>
        {formError && <p role="alert">{formError}</p>}
      </form>
      {list.kind === "loading" && <p aria-busy="true">Loading {{entities}}…</p>}
      {list.kind === "error" && (
        <div role="alert">
          <p>{list.message}</p>
          <button onClick={() => void load()}>Try again</button>
        </div>
      )}
      {list.kind === "ready" && list.items.length === 0 && <p>No {{entities}} yet. Create the first one above.</p>}
      {list.kind === "ready" && list.items.length > 0 && (
        <ul aria-label="{{Entities}}">
          {list.items.map((item) => (
            <li key={item.id}>{item.name}</li>
          ))}
        </ul>
      )}
    </main>
  );
}
"#;

const WEB_APP_TEST_TSX: &str = r#"// @vitest-environment jsdom
import { render, screen } from "@testing-library/react";
import { afterEach, expect, test, vi } from "vitest";
import { App } from "./App";

function answer(status: number, body: unknown) {
  vi.stubGlobal("fetch", vi.fn(async () => new Response(JSON.stringify(body), { status })));
}

afterEach(() => vi.unstubAllGlobals());

test("shows the empty state when there are no {{entities}}", async () => {
  answer(200, { items: [], total: 0 });
  render(<App />);
  expect(await screen.findByText("No {{entities}} yet. Create the first one above.")).toBeDefined();
});

test("lists {{entities}} newest first", async () => {
  answer(200, { items: [{ id: 2, name: "second", description: null }, { id: 1, name: "first", description: null }], total: 2 });
  render(<App />);
  const items = await screen.findAllByRole("listitem");
  expect(items.map((item) => item.textContent)).toEqual(["second", "first"]);
});

test("shows an error with a way to retry when the API fails", async () => {
  answer(500, { error: { code: "internal", message: "boom" } });
  render(<App />);
  expect(await screen.findByText(/Could not load {{entities}}/)).toBeDefined();
  expect(screen.getByRole("button", { name: "Try again" })).toBeDefined();
});
"#;

// --- feature-engineering ---

const FEATURE_MAP: &str = r#"# Feature map: {{title}}

One row per requirement, across the layers. Status: complete, partial behind a flag, missing.

| Requirement | Screen | API operation | Table | Code | Test | Status |
| --- | --- | --- | --- | --- | --- | --- |
{{feature_map_rows}}

## Cross-layer checks
- `POST /{{entities}}` answers 201 with `{id, name, description}` in `api/openapi.yaml`,
  `src/routes.rs` and `web/src/api/client.ts`.
- Errors share `{"error": {"code", "message"}}` in the contract, the service and the client;
  the client maps `invalid_{{entity}}` to the form's message.
- The list is `{items, total}`, newest first, in the contract, `src/domain.rs` and the client.

## Glue code
None needed: the layers already connect. Flags are declared in `config/feature-flags.toml`.
"#;

const FEATURE_FLAGS: &str = r#"# Feature flags of {{title}}. Every flag defaults to off until its acceptance tests pass.

{{feature_flags_toml}}"#;

// --- ml-engineering ---

const ML_ASSESSMENT: &str = r#"# ML assessment: {{title}}

## Question
Does any part of "{{requirement_line}}" need learned behaviour?

## Requirements examined
{{fr_bullets}}

## Alternatives
| Need | Non-ML approach | ML approach | Verdict |
| --- | --- | --- | --- |
| Validate input | rules (length, presence) | none sensible | rules |
| Order and page lists | sort by creation | learned ranking | rules: the requirement asks for newest first |
| Capabilities named in the requirement ({{feature_list}}) | explicit rules behind flags | a model | rules: each is stated precisely enough to implement |

## Decision
No ML. Every requirement has an exact, testable rule-based answer; a model would add a
training data need, an evaluation burden and failure modes without improving any metric of
the product brief. Revisit if a requirement asks for ranking, recommendation, prediction or
free-text understanding.
"#;

// --- security-engineering ---

const THREAT_MODEL: &str = r#"# Threat model: {{title}}

## Assets
- The {{entities}} and their free-text fields (possibly personal data).
- The service's availability (NFR-2).

## Actors
- Legitimate clients, authenticated by the gateway.
- An attacker on the internet (stopped at the gateway, unless it is misconfigured).
- A client abusing its access (floods, oversized input).

## Entry points
| Entry point | Trust boundary crossed |
| --- | --- |
| `POST /{{entities}}` | gateway → service |
| `GET /{{entities}}` | gateway → service |
| `GET /{{entities}}/{id}` | gateway → service |
| `DELETE /{{entities}}/{id}` | gateway → service |
| `GET /health` | probe → service |

## STRIDE
| Threat | Example | Mitigation |
| --- | --- | --- |
| Spoofing | calling the service directly, bypassing the gateway | the port is published only to the gateway's network (deployment); accepted risk R-1 |
| Tampering | a client deletes another client's {{entity}} | no ownership in the MVP (requirements A-2); accepted risk R-1, revisit with accounts |
| Repudiation | a delete nobody admits to | the gateway's access log keeps who called what for 30 days |
| Information disclosure | error messages leaking internals | errors carry a code and a fixed message; no stack traces, no request bodies in logs |
| Denial of service | huge bodies, huge pages, floods | 64 KiB body limit, page size ≤ 100; flood control at the gateway (R-2) |
| Elevation of privilege | none: the service has no roles | n/a |
"#;

const SECURITY_REVIEW: &str = r#"# Security review: {{title}}

## Findings
| ID | Severity | Location | Scenario | Fix | Status |
| --- | --- | --- | --- | --- | --- |
| S-1 | medium | `src/routes.rs` (router) | a client floods `POST /{{entities}}` and exhausts memory | rate limit at the gateway; cap the store's size | accepted (R-2) |
| S-2 | medium | `src/domain.rs` (`{{Entity}}Store`) | a restart loses every {{entity}} | PostgreSQL store (schema in `migrations/`) | accepted (architecture) |
| S-3 | low | `src/routes.rs` (`create`) | a JSON parse error echoes a fragment of the body in the message | keep: the fragment is the client's own input, and bodies are not logged | accepted |

No critical or high finding is open.

## Reviewed
- **Authentication**: delegated to the gateway (R-1).
- **Authorisation**: none needed in the MVP (no ownership, requirements A-2).
- **Input validation**: body limit 64 KiB, typed extraction with errors mapped to 400, name
  rules enforced in the domain (422), page size capped.
- **Secrets**: none in the service; `PORT` is the only setting; no secret in the repository.
- **Dependencies**: axum, tokio, serde, serde_json, all maintained; CI runs `cargo audit`.

## Accepted risks
- **R-1** No authentication inside the service: it must be reachable only through the gateway.
- **R-2** No rate limiting inside the service: the gateway limits each client.
"#;

// --- devops ---

const DOCKERFILE: &str = r#"# {{title}}: build with the Rust toolchain, run on a slim Debian with one binary.
FROM rust:1.85-slim-bookworm AS build
WORKDIR /app
COPY Cargo.toml Cargo.lock* ./
COPY src ./src
RUN cargo build --release

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home app
COPY --from=build /app/target/release/{{slug}} /usr/local/bin/{{slug}}
USER app
ENV PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PORT} && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '200 OK' <&3"]
CMD ["/usr/local/bin/{{slug}}"]
"#;

const COMPOSE: &str = r#"# Local run of {{title}}. The MVP keeps its data in process: no database service.
services:
  {{slug}}:
    build: .
    image: {{slug}}:local
    environment:
      PORT: "8080"
    ports:
      - "127.0.0.1:8080:8080"
    restart: on-failure
    healthcheck:
      test: ["CMD", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080"]
      interval: 10s
      timeout: 2s
      retries: 3
"#;

const CI_YML: &str = r#"name: ci

on:
  push:
    branches: [main]
  pull_request:

jobs:
  lint:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@v4
      - uses: dtolnay/rust-toolchain@stable
        with:
          components: rustfmt, clippy
      - run: cargo fmt --check
      - run: cargo clippy --all-targets -- -D warnings
  test:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@v4
      - uses: dtolnay/rust-toolchain@stable
      - run: cargo build --release
      - run: cargo test
  image:
    runs-on: ubuntu-24.04
    needs: [lint, test]
    steps:
      - uses: actions/checkout@v4
      - run: docker build -t {{slug}}:${GITHUB_SHA} .
"#;

const DEPLOYMENT: &str = r#"# Deployment: {{title}}

## Environments
| Environment | Where | Image tag |
| --- | --- | --- |
| local | `docker compose up --build` | `{{slug}}:local` |
| staging | one container behind the staging gateway | the commit SHA |
| production | one container behind the production gateway | the commit SHA, promoted from staging |

## Environment variables
| Variable | Default | Meaning |
| --- | --- | --- |
| `PORT` | `8080` | TCP port the service listens on |

The service reads no secret. Gateway credentials stay in the gateway's own secret store.

## Deploy
1. CI builds `{{slug}}:<sha>` on every push to `main` (`.github/workflows/ci.yml`).
2. `docker run -d --name {{slug}} --restart on-failure -e PORT=8080 {{slug}}:<sha>` on the
   host, in the gateway's network only.
3. Check: `curl -fsS http://<host>:8080/health` answers `{"status": "ok"}`.

## Rollback
1. Find the previous tag: `docker inspect --format '{{.Config.Image}}' {{slug}}` before the
   deploy, or the previous successful CI run.
2. `docker rm -f {{slug}} && docker run -d --name {{slug}} --restart on-failure -e PORT=8080
   {{slug}}:<previous-sha>`.
3. Check `/health` as above. Data held in memory is lost on any restart (accepted risk).
"#;

// --- sre-operations ---

const SLOS: &str = r#"# SLOs: {{title}}

## SLIs and SLOs
| NFR | SLI | SLO (30 days) | Error budget |
| --- | --- | --- | --- |
| NFR-2 availability | share of 1-minute probes of `/health` answering 200 (`probe_success`) | 99.5 % | 216 minutes |
| NFR-1 latency | share of requests answered within 200 ms (`http_request_duration_seconds`) | 95 % | 5 % of requests |

## Signals
- `probe_success{job="{{slug}}"}`: from the blackbox exporter probing `/health`; available now.
- `http_request_duration_seconds_bucket{service="{{slug}}"}`: **missing**, the service exposes no
  metrics yet. Owner: backend-engineering (add a `/metrics` endpoint with a request-duration
  histogram). Until then the latency SLO is measured from the gateway's access logs.

## Capacity
NFR-1 sets 50 requests/s. One instance handles this with margin: each request is one map
operation under a lock (microseconds). Memory grows with the number of {{entities}}: about
1 KiB each, so 100 000 {{entities}} need about 100 MiB. Assumptions: bodies well under the
64 KiB limit; one instance (the in-process store cannot be shared).
"#;

const ALERTS: &str = r#"# Prometheus alert rules for {{title}}: multi-window burn-rate alerts on the SLOs of
# docs/operations/slos.md. Each alert links to its runbook section.
groups:
  - name: {{slug}}-slos
    rules:
      - alert: {{Entity}}ServiceAvailabilityFastBurn
        expr: |
          (1 - avg_over_time(probe_success{job="{{slug}}"}[1h])) > (14.4 * 0.005)
          and
          (1 - avg_over_time(probe_success{job="{{slug}}"}[5m])) > (14.4 * 0.005)
        labels:
          severity: page
        annotations:
          summary: "{{slug}} is burning its availability budget 14x too fast"
          runbook: "docs/operations/runbook.md#alert-availability-fast-burn"
      - alert: {{Entity}}ServiceAvailabilitySlowBurn
        expr: |
          (1 - avg_over_time(probe_success{job="{{slug}}"}[6h])) > (6 * 0.005)
          and
          (1 - avg_over_time(probe_success{job="{{slug}}"}[30m])) > (6 * 0.005)
        labels:
          severity: ticket
        annotations:
          summary: "{{slug}} is burning its availability budget 6x too fast"
          runbook: "docs/operations/runbook.md#alert-availability-slow-burn"
      - alert: {{Entity}}ServiceLatencyFastBurn
        expr: |
          (
            1 - sum(rate(http_request_duration_seconds_bucket{service="{{slug}}", le="0.2"}[1h]))
              / sum(rate(http_request_duration_seconds_count{service="{{slug}}"}[1h]))
          ) > (14.4 * 0.05)
        labels:
          severity: page
        annotations:
          summary: "{{slug}} answers too many requests slower than 200 ms"
          runbook: "docs/operations/runbook.md#alert-latency-fast-burn"
"#;

const RUNBOOK: &str = r#"# Runbook: {{title}}

## Start
`docker run -d --name {{slug}} --restart on-failure -e PORT=8080 {{slug}}:<sha>`

## Stop
`docker stop {{slug}}` (data in memory is lost: warn the product owner first).

## Health check
`curl -fsS http://<host>:8080/health` must answer `{"status": "ok"}` within 1 s.

## Rollback
As in `docs/deployment.md`: `docker rm -f {{slug}}`, then start the previous `<sha>` tag, then
the health check.

## Alert: availability fast burn
1. `curl -fsS http://<host>:8080/health`: no answer means the process is down.
2. `docker ps -a --filter name={{slug}}`: if it exited, `docker logs --tail 200 {{slug}}` shows why.
3. If a deploy happened in the last hour, roll back (above). Otherwise restart:
   `docker restart {{slug}}`.
4. If it keeps dying with out-of-memory, check the number of {{entities}} (`GET /{{entities}}?limit=1`,
   field `total`) against the capacity estimate in `slos.md`.

## Alert: availability slow burn
1. Look at the probe history: `probe_success{job="{{slug}}"}` over 6 h. Short gaps at the same
   minute each hour point at the host, not the service.
2. Open a ticket with the gaps' times and the output of `docker logs --since 6h {{slug}}`.

## Alert: latency fast burn
1. Check the request rate at the gateway: above 50 requests/s is beyond the capacity estimate.
2. Check CPU and memory: `docker stats --no-stream {{slug}}`.
3. If one client floods, ask the gateway owner to lower its rate limit; then restart if memory
   stays high.
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::parse_task_result;
    use crate::model::{ModelError, ToolSpec};
    use crate::pipeline::TEAM_IDS;
    use std::time::Instant;

    const REQUIREMENT: &str = "Build a URL shortener with expiry";

    /// The objective prompt as the workers build it: the team's real OBJECTIVE.md, filled in.
    fn prompt(team: &str, requirement: &str, inputs: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(team)
            .join("OBJECTIVE.md");
        let template =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        template
            .replace("{{title}}", "URL shortener")
            .replace("{{iteration}}", "1")
            .replace("{{max_iterations}}", "3")
            .replace("{{requirement}}", requirement)
            .replace("{{inputs}}", inputs)
            .replace("{{feedback}}", "")
    }

    fn request(team: &str, first_message: String) -> ModelRequest {
        ModelRequest {
            alias: "factory/coder".into(),
            team: team.into(),
            system: format!("You are {team}."),
            messages: vec![Message::User {
                content: first_message,
            }],
            tools: Vec::new(),
            response_schema: None,
            spent_usd: 0.0,
        }
    }

    async fn ask(request: &ModelRequest) -> ModelResponse {
        ScriptedProvider::new()
            .complete(request)
            .await
            .expect("the scripted provider never fails")
    }

    /// The history after turn 1: the assistant's calls and one result per call.
    fn with_tool_results(mut request: ModelRequest, turn1: &ModelResponse) -> ModelRequest {
        request.messages.push(Message::Assistant {
            content: turn1.content.clone(),
            tool_calls: turn1.tool_calls.clone(),
        });
        for call in &turn1.tool_calls {
            request.messages.push(Message::Tool {
                call_id: call.id.clone(),
                content: "ok".into(),
            });
        }
        request
    }

    fn written(response: &ModelResponse) -> Vec<(String, String)> {
        response
            .tool_calls
            .iter()
            .filter(|call| call.name == "write_file")
            .map(|call| {
                (
                    call.arguments["path"].as_str().expect("a path").to_string(),
                    call.arguments["content"]
                        .as_str()
                        .expect("a content")
                        .to_string(),
                )
            })
            .collect()
    }

    /// Turn 1 then turn 2 for one team; the written files and the final answer.
    async fn run_team(team: &str, requirement: &str) -> (Vec<(String, String)>, TaskResult) {
        let first = request(team, prompt(team, requirement, "(none)"));
        let turn1 = ask(&first).await;
        let files = written(&turn1);
        let turn2 = ask(&with_tool_results(first, &turn1)).await;
        assert!(turn2.tool_calls.is_empty(), "{team}: turn 2 calls no tool");
        let result = parse_task_result(&turn2.content)
            .unwrap_or_else(|e| panic!("{team}: {e}\n{}", turn2.content));
        (files, result)
    }

    #[tokio::test]
    async fn every_team_writes_its_deliverables_then_completes() {
        for team in TEAM_IDS {
            let first = request(team, prompt(team, REQUIREMENT, "(none)"));
            let turn1 = ask(&first).await;
            assert_eq!(turn1.content, "", "{team}: turn 1 is tool calls only");
            let ids: Vec<&str> = turn1
                .tool_calls
                .iter()
                .map(|call| call.id.as_str())
                .collect();
            let expected: Vec<String> = (1..=ids.len()).map(|i| format!("call-{i}")).collect();
            assert_eq!(ids, expected, "{team}");
            let files = written(&turn1);
            assert!(!files.is_empty(), "{team} writes at least one file");
            for (path, content) in &files {
                assert!(!content.trim().is_empty(), "{team}: {path} is empty");
                assert!(
                    !path.starts_with('/') && !path.split('/').any(|part| part == ".."),
                    "{team}: {path}"
                );
                assert!(
                    !content.contains("{{name}}") && !content.contains("{{entity}}"),
                    "{team}: {path} has an unfilled key"
                );
                assert!(!content.contains("#malformed"), "{team}: {path}");
            }

            let turn2 = ask(&with_tool_results(first, &turn1)).await;
            let result =
                parse_task_result(&turn2.content).unwrap_or_else(|e| panic!("{team}: {e}"));
            assert_eq!(result.status, TaskStatus::Complete, "{team}");
            let paths: Vec<String> = files.into_iter().map(|(path, _)| path).collect();
            assert_eq!(result.artifacts, paths, "{team}");
            assert!(result.reasoning.len() > 80, "{team}: reasoning says why");
            assert!(!result.verified_facts.is_empty(), "{team}");
        }
    }

    #[tokio::test]
    async fn deliverables_are_those_of_the_objectives() {
        let expected: [(&str, &[&str]); 17] = [
            ("business-analysis", &["docs/requirements.md"]),
            (
                "solution-architecture",
                &["docs/architecture.md", "docs/adr/0001-rust-axum-stack.md"],
            ),
            (
                "backend-engineering",
                &[
                    "Cargo.toml",
                    "src/main.rs",
                    "src/routes.rs",
                    "src/domain.rs",
                    "migrations/0001_url_shortener.sql",
                ],
            ),
            ("qa-engineering", &["docs/test-plan.md", "tests/api.rs"]),
            (
                "documentation",
                &["README.md", "docs/user-guide.md", "CHANGELOG.md"],
            ),
            (
                "product-management",
                &["docs/product/brief.md", "docs/product/backlog.md"],
            ),
            (
                "ux-ui-design",
                &["docs/ux/user-flows.md", "docs/ux/screens.md"],
            ),
            (
                "compliance-legal",
                &[
                    "docs/compliance/assessment.md",
                    "docs/compliance/licenses.md",
                ],
            ),
            ("api-design", &["api/openapi.yaml", "docs/api-design.md"]),
            (
                "database-engineering",
                &["migrations/0001_url_shortener.sql", "docs/data-model.md"],
            ),
            (
                "data-engineering",
                &[
                    "docs/data/flows.md",
                    "data/contracts/url-events.schema.json",
                    "etl/url_daily.sql",
                ],
            ),
            (
                "frontend-engineering",
                &[
                    "web/package.json",
                    "web/index.html",
                    "web/src/main.tsx",
                    "web/src/App.tsx",
                    "web/src/api/client.ts",
                    "web/src/App.test.tsx",
                ],
            ),
            (
                "feature-engineering",
                &["docs/feature-map.md", "config/feature-flags.toml"],
            ),
            ("ml-engineering", &["docs/ml/assessment.md"]),
            (
                "security-engineering",
                &["docs/security/threat-model.md", "docs/security/review.md"],
            ),
            (
                "devops",
                &[
                    "Dockerfile",
                    "compose.yaml",
                    ".github/workflows/ci.yml",
                    "docs/deployment.md",
                ],
            ),
            (
                "sre-operations",
                &[
                    "docs/operations/slos.md",
                    "ops/alerts.yaml",
                    "docs/operations/runbook.md",
                ],
            ),
        ];
        for (team, paths) in expected {
            let (files, _) = run_team(team, REQUIREMENT).await;
            let written: Vec<&str> = files.iter().map(|(path, _)| path.as_str()).collect();
            assert_eq!(written, paths, "{team}");
        }
    }

    #[tokio::test]
    async fn content_is_role_specific_and_derived_from_the_requirement() {
        let (files, _) = run_team("business-analysis", REQUIREMENT).await;
        let requirements = &files[0].1;
        for part in [
            "## Functional requirements",
            "**FR-1**",
            "**FR-5** The service supports expiry",
            "**NFR-1**",
            "Given ",
            "## Acceptance criteria",
            REQUIREMENT,
        ] {
            assert!(requirements.contains(part), "{part}\n{requirements}");
        }

        let (files, _) = run_team("backend-engineering", REQUIREMENT).await;
        let file = |name: &str| {
            files
                .iter()
                .find(|(path, _)| path == name)
                .map(|(_, content)| content.clone())
                .unwrap()
        };
        assert!(file("Cargo.toml").contains("name = \"url-shortener\""));
        assert!(file("src/domain.rs").contains("pub struct UrlStore"));
        assert!(
            file("src/routes.rs").contains(".route(\"/urls/{id}\", get(fetch).delete(remove))")
        );
        let manifest: toml::Value =
            toml::from_str(&file("Cargo.toml")).expect("Cargo.toml is valid TOML");
        assert_eq!(
            manifest["package"]["description"].as_str(),
            Some(REQUIREMENT)
        );

        let (files, _) = run_team("qa-engineering", REQUIREMENT).await;
        assert!(files[0].1.contains("| FR-5 | none yet |"), "{}", files[0].1);
        assert!(files[1].1.contains("env!(\"CARGO_BIN_EXE_url-shortener\")"));

        let (files, _) = run_team("data-engineering", REQUIREMENT).await;
        let contract: serde_json::Value =
            serde_json::from_str(&files[1].1).expect("the data contract is JSON");
        assert_eq!(contract["properties"]["version"]["const"], 1);

        let (files, _) = run_team("feature-engineering", REQUIREMENT).await;
        let flags: toml::Value = toml::from_str(&files[1].1).expect("the flag file is TOML");
        assert_eq!(flags["flags"]["expiry"]["default"].as_bool(), Some(false));

        let (files, _) = run_team("frontend-engineering", REQUIREMENT).await;
        let package: serde_json::Value =
            serde_json::from_str(&files[0].1).expect("package.json is JSON");
        assert_eq!(package["name"], "url-shortener-web");
    }

    #[tokio::test]
    async fn architecture_records_its_decision() {
        let first = request(
            "solution-architecture",
            prompt("solution-architecture", REQUIREMENT, "(none)"),
        );
        let turn1 = ask(&first).await;
        let decision = turn1
            .tool_calls
            .iter()
            .find(|call| call.name == "record_decision")
            .expect("a record_decision call");
        for field in ["title", "decision", "rationale"] {
            assert!(
                !decision.arguments[field].as_str().unwrap().is_empty(),
                "{field}"
            );
        }
        assert_eq!(decision.id, format!("call-{}", turn1.tool_calls.len()));

        // Not offered, not called.
        let mut restricted = first.clone();
        restricted.tools = vec![ToolSpec {
            name: "write_file".into(),
            description: "w".into(),
            parameters: json!({}),
        }];
        assert!(
            ask(&restricted)
                .await
                .tool_calls
                .iter()
                .all(|call| call.name == "write_file")
        );
        // Teams without the tool do not call it.
        let backend = ask(&request(
            "backend-engineering",
            prompt("backend-engineering", REQUIREMENT, "(none)"),
        ))
        .await;
        assert!(
            backend
                .tool_calls
                .iter()
                .all(|call| call.name == "write_file")
        );
    }

    #[tokio::test]
    async fn backend_leaves_the_schema_to_database_engineering_when_it_exists() {
        let inputs =
            "- database-engineering: migrations/0001_url_shortener.sql, docs/data-model.md";
        let turn1 = ask(&request(
            "backend-engineering",
            prompt("backend-engineering", REQUIREMENT, inputs),
        ))
        .await;
        assert!(
            written(&turn1)
                .iter()
                .all(|(path, _)| !path.starts_with("migrations/"))
        );
    }

    #[tokio::test]
    async fn malformed_breaks_the_first_answer_and_the_repair_recovers_it() {
        for team in TEAM_IDS {
            let requirement = format!("{REQUIREMENT} #malformed");
            let first = request(team, prompt(team, &requirement, "(none)"));
            let turn1 = ask(&first).await;
            assert!(
                !turn1.tool_calls.is_empty(),
                "{team}: the files are still written"
            );
            let mut history = with_tool_results(first, &turn1);
            let broken = ask(&history).await;
            let error =
                parse_task_result(&broken.content).expect_err("the first answer is broken JSON");
            history.messages.push(Message::Assistant {
                content: broken.content.clone(),
                tool_calls: vec![],
            });
            history.messages.push(Message::User {
                content: crate::gate::repair_prompt(&error, &broken.content),
            });
            let repaired = ask(&history).await;
            let result =
                parse_task_result(&repaired.content).unwrap_or_else(|e| panic!("{team}: {e}"));
            assert_eq!(result.status, TaskStatus::Complete, "{team}");
            assert_eq!(
                result.artifacts.len(),
                turn1
                    .tool_calls
                    .iter()
                    .filter(|c| c.name == "write_file")
                    .count(),
                "{team}"
            );
        }
    }

    #[tokio::test]
    async fn clarify_asks_business_analysis_until_answered() {
        let requirement = format!("{REQUIREMENT} #clarify");
        let first = request(
            "solution-architecture",
            prompt("solution-architecture", &requirement, "(none)"),
        );
        let answer = ask(&first).await;
        assert!(answer.tool_calls.is_empty());
        let result = parse_task_result(&answer.content).unwrap();
        assert_eq!(result.status, TaskStatus::NeedsClarification);
        let question = result.clarification_needed.unwrap();
        assert!(question.starts_with("business-analysis: "), "{question}");
        assert!(question.contains('?'));

        // Business analysis, asked the question, answers it in its reasoning.
        let ba_prompt = prompt(
            "business-analysis",
            &requirement,
            &format!("Question from solution-architecture: {question}"),
        );
        let ba = request("business-analysis", ba_prompt);
        let ba_turn1 = ask(&ba).await;
        let ba_result =
            parse_task_result(&ask(&with_tool_results(ba, &ba_turn1)).await.content).unwrap();
        assert_eq!(ba_result.status, TaskStatus::Complete);
        assert!(
            ba_result
                .reasoning
                .starts_with("Answer for solution-architecture:"),
            "{}",
            ba_result.reasoning
        );

        // With the answer in its prompt, architecture completes.
        let answered = format!(
            "{}\nClarification answer: each url is owned by the single user who created it.",
            prompt("solution-architecture", &requirement, "(none)")
        );
        let first = request("solution-architecture", answered);
        let turn1 = ask(&first).await;
        assert!(!turn1.tool_calls.is_empty());
        let result =
            parse_task_result(&ask(&with_tool_results(first, &turn1)).await.content).unwrap();
        assert_eq!(result.status, TaskStatus::Complete);
        assert!(
            result
                .verified_facts
                .iter()
                .any(|fact| fact.contains("owned by the single user"))
        );

        // Other teams are unaffected.
        for team in TEAM_IDS
            .iter()
            .filter(|team| **team != "solution-architecture")
        {
            assert_eq!(
                run_team(team, &requirement).await.1.status,
                TaskStatus::Complete,
                "{team}"
            );
        }
    }

    #[tokio::test]
    async fn ask_human_asks_a_human_until_answered() {
        let requirement = format!("{REQUIREMENT} #ask-human");
        let answer = ask(&request(
            "solution-architecture",
            prompt("solution-architecture", &requirement, "(none)"),
        ))
        .await;
        let result = parse_task_result(&answer.content).unwrap();
        assert_eq!(result.status, TaskStatus::NeedsClarification);
        assert!(result.clarification_needed.unwrap().starts_with("human: "));

        let answered = format!(
            "{}\nClarification answer: EU only.",
            prompt("solution-architecture", &requirement, "(none)")
        );
        let turn1 = ask(&request("solution-architecture", answered)).await;
        assert!(
            !turn1.tool_calls.is_empty(),
            "answered: it goes on with its deliverables"
        );
        assert_eq!(
            run_team("business-analysis", &requirement).await.1.status,
            TaskStatus::Complete
        );
    }

    #[tokio::test]
    async fn block_stops_only_backend_engineering() {
        let requirement = format!("{REQUIREMENT} #block");
        let answer = ask(&request(
            "backend-engineering",
            prompt("backend-engineering", &requirement, "(none)"),
        ))
        .await;
        assert!(answer.tool_calls.is_empty());
        let result = parse_task_result(&answer.content).unwrap();
        assert_eq!(result.status, TaskStatus::Blocked);
        assert!(!result.blockers.is_empty());
        assert!(result.reasoning.contains("cannot"));
        for team in TEAM_IDS
            .iter()
            .filter(|team| **team != "backend-engineering")
        {
            assert_eq!(
                run_team(team, &requirement).await.1.status,
                TaskStatus::Complete,
                "{team}"
            );
        }
    }

    #[tokio::test]
    async fn loop_makes_every_team_ask_every_time() {
        let requirement = format!("{REQUIREMENT} #loop");
        let expected_addressee = [
            ("business-analysis", "human: "),
            ("solution-architecture", "business-analysis: "),
            ("backend-engineering", "solution-architecture: "),
            ("qa-engineering", "backend-engineering: "),
            ("documentation", "qa-engineering: "),
        ];
        for (team, to) in expected_addressee {
            let answered = format!(
                "{}\nClarification answer: all of them.",
                prompt(team, &requirement, "(none)")
            );
            for text in [prompt(team, &requirement, "(none)"), answered] {
                let result = parse_task_result(&ask(&request(team, text)).await.content).unwrap();
                assert_eq!(result.status, TaskStatus::NeedsClarification, "{team}");
                assert!(
                    result.clarification_needed.unwrap().starts_with(to),
                    "{team}"
                );
            }
        }
        for team in TEAM_IDS {
            let result = parse_task_result(
                &ask(&request(team, prompt(team, &requirement, "(none)")))
                    .await
                    .content,
            )
            .unwrap();
            assert_eq!(result.status, TaskStatus::NeedsClarification, "{team}");
        }
    }

    #[tokio::test]
    async fn slow_delays_every_response() {
        let started = Instant::now();
        let response = ask(&request(
            "documentation",
            prompt(
                "documentation",
                &format!("{REQUIREMENT} #slow=300"),
                "(none)",
            ),
        ))
        .await;
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        assert!(!response.tool_calls.is_empty());

        let started = Instant::now();
        ask(&request(
            "documentation",
            prompt("documentation", REQUIREMENT, "(none)"),
        ))
        .await;
        assert!(started.elapsed() < Duration::from_millis(300));
    }

    #[test]
    fn slow_values_are_parsed_robustly_and_capped() {
        let slow = |text: &str| Markers::scan(text).slow.map(|d| d.as_millis());
        assert_eq!(slow("#slow=2000"), Some(2000));
        assert_eq!(slow("do it #slow=2000ms, please"), Some(2000));
        assert_eq!(slow("#slow=0"), Some(0));
        assert_eq!(
            slow("#slow=999999999999999999999999"),
            Some(u128::from(MAX_SLOW_MS))
        );
        assert_eq!(slow("#slow=fast"), None);
        assert_eq!(slow("#slow"), None);
        assert_eq!(slow("no marker"), None);
    }

    #[test]
    fn fail_names_the_alias_whose_first_target_fails() {
        let text = "Build a URL shortener #fail=factory/coder.";
        assert!(should_fail_first_target(text, "factory/coder"));
        assert!(!should_fail_first_target(text, "factory/architect"));
        assert!(should_fail_first_target("x #fail=coder", "factory/coder"));
        assert!(should_fail_first_target(
            "#fail=factory/fast #fail=factory/cheap",
            "factory/cheap"
        ));
        assert!(!should_fail_first_target(
            "Build a URL shortener",
            "factory/coder"
        ));
        assert!(!should_fail_first_target(
            "issue#fail=factory/coder",
            "factory/coder"
        ));
    }

    #[tokio::test]
    async fn fail_marker_does_not_make_the_provider_fail() {
        let requirement = format!("{REQUIREMENT} #fail=factory/coder");
        let outcome: Result<ModelResponse, ModelError> = ScriptedProvider
            .complete(&request(
                "backend-engineering",
                prompt("backend-engineering", &requirement, "(none)"),
            ))
            .await;
        assert!(!outcome.unwrap().tool_calls.is_empty());
    }

    #[tokio::test]
    async fn markers_stay_out_of_the_artifacts() {
        let (files, _) = run_team(
            "business-analysis",
            "#clarify #slow=1 Build a URL shortener with expiry #fail=factory/fast",
        )
        .await;
        assert!(
            !files[0].1.contains("#slow")
                && !files[0].1.contains("#fail")
                && !files[0].1.contains("#clarify")
        );
        assert!(files[0].1.contains("> Build a URL shortener with expiry\n"));
    }

    #[tokio::test]
    async fn answers_are_deterministic() {
        for team in [
            "business-analysis",
            "backend-engineering",
            "sre-operations",
            "no-such-team",
        ] {
            let first = request(team, prompt_or_plain(team));
            let (a, b) = (ask(&first).await, ask(&first).await);
            assert_eq!(a, b, "{team}: turn 1");
            let second = with_tool_results(first, &a);
            assert_eq!(ask(&second).await, ask(&second).await, "{team}: turn 2");
        }
    }

    fn prompt_or_plain(team: &str) -> String {
        if TEAM_IDS.contains(&team) {
            prompt(team, REQUIREMENT, "(none)")
        } else {
            REQUIREMENT.to_string()
        }
    }

    #[tokio::test]
    async fn an_unknown_team_writes_a_note_and_completes() {
        let first = request("Growth Hacking!", REQUIREMENT.to_string());
        let turn1 = ask(&first).await;
        let files = written(&turn1);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, "notes/growth-hacking.md");
        assert!(files[0].1.contains("URL Shortener"));
        let result =
            parse_task_result(&ask(&with_tool_results(first, &turn1)).await.content).unwrap();
        assert_eq!(
            (result.status, result.artifacts),
            (
                TaskStatus::Complete,
                vec!["notes/growth-hacking.md".to_string()]
            )
        );
    }

    #[tokio::test]
    async fn tokens_provider_and_model_are_reported() {
        let first = request(
            "business-analysis",
            prompt("business-analysis", REQUIREMENT, "(none)"),
        );
        let response = ask(&first).await;
        assert_eq!(response.provider, "scripted");
        assert_eq!(response.model, "scripted-coder");
        let input_chars = first.system.chars().count()
            + prompt("business-analysis", REQUIREMENT, "(none)")
                .chars()
                .count();
        assert_eq!(response.input_tokens, (input_chars / 4) as u64);
        let args: usize = response
            .tool_calls
            .iter()
            .map(|c| c.name.len() + c.arguments.to_string().chars().count())
            .sum();
        assert_eq!(response.output_tokens, (args / 4) as u64);
        assert!(response.output_tokens > 100);

        let mut other = first.clone();
        other.alias = "factory/architect".into();
        assert_eq!(ask(&other).await.model, "scripted-architect");
    }

    #[test]
    fn the_requirement_is_read_under_its_heading() {
        let text = "# Objective: x\n\n## Requirement\nBuild a URL shortener\nwith expiry\n\n## Inputs from earlier stages\nnone\n";
        assert_eq!(
            requirement_section(text),
            "Build a URL shortener\nwith expiry"
        );
        let ba = "## Requirement as submitted\nA todo app\n## Inputs\n";
        assert_eq!(requirement_section(ba), "A todo app");
        assert_eq!(
            requirement_section("  just the requirement  "),
            "just the requirement"
        );
        assert_eq!(
            requirement_section("## Requirement\nlast section"),
            "last section"
        );
        assert_eq!(
            requirement_section("## Requirement\n\n## Inputs\nx"),
            "## Requirement\n\n## Inputs\nx"
        );
    }

    #[test]
    fn slugs_and_entities_come_from_the_requirement() {
        let cases = [
            (
                "Build a URL shortener with expiry",
                "url-shortener",
                "url",
                "URL shortener",
            ),
            (
                "A todo app for teams, with reminders",
                "todo-app",
                "todo",
                "todo app",
            ),
            (
                "Create a REST API that manages books",
                "rest-api",
                "item",
                "REST API",
            ),
            (
                "We need an inventory tracker.",
                "inventory-tracker",
                "inventory",
                "inventory tracker",
            ),
            (
                "Recipes sharing platform",
                "recipes-sharing-platform",
                "recipe",
                "Recipes sharing platform",
            ),
            ("", "project", "item", "the product"),
            (
                "Build a 3D printer queue",
                "app-3d-printer-queue",
                "printer",
                "3D printer queue",
            ),
            ("Café bookings", "caf-bookings", "booking", "Café bookings"),
            (
                "Build a zebra registry",
                "zebra-registry",
                "zebra",
                "zebra registry",
            ),
            (
                "An order management system",
                "order-management-system",
                "order",
                "order management system",
            ),
            (
                "Build a multi tenant invoice reconciliation platform",
                "multi-tenant-invoice-reconciliation",
                "reconciliation",
                "multi tenant invoice reconciliation",
            ),
            (
                "Build a reconciliationrecords registry",
                "reconciliationrecords-registry",
                "registry",
                "reconciliationrecords registry",
            ),
        ];
        for (requirement, slug, entity, display) in cases {
            let name = ProductName::of(requirement);
            assert_eq!(
                (
                    name.slug.as_str(),
                    name.entity.as_str(),
                    name.display.as_str()
                ),
                (slug, entity, display),
                "{requirement}"
            );
            assert_eq!(project_slug(requirement), slug);
        }
        assert_eq!(
            project_slug("#block Build a URL shortener #slow=10"),
            "url-shortener"
        );
    }

    #[test]
    fn features_are_the_capabilities_named_besides_the_product() {
        let features_of = |text: &str| features(text, &ProductName::of(text));
        assert_eq!(features_of("Build a URL shortener with expiry"), ["expiry"]);
        assert_eq!(
            features_of(
                "Build a URL shortener with expiry and click statistics. It supports custom aliases."
            ),
            ["expiry", "click statistics", "custom aliases"]
        );
        assert!(features_of("A todo app").is_empty());
        assert_eq!(plural("category"), "categories");
        assert_eq!(plural("key"), "keys");
        assert_eq!(plural("box"), "boxes");
        assert_eq!(plural("url"), "urls");
    }

    #[test]
    fn fill_replaces_known_keys_once_and_leaves_the_rest() {
        let project = Project::new(
            "qa-engineering",
            "## Requirement\nBuild a queue of {{slug}}\n## Inputs\n",
        );
        assert_eq!(
            project.fill("{{{Entity}}} {{unknown}} {{.Config.Image}}"),
            "{Queue} {{unknown}} {{.Config.Image}}"
        );
        assert!(
            project.fill("{{requirement_line}}").contains("{{slug}}"),
            "requirement text is not substituted again"
        );
    }

    #[test]
    fn a_truncated_answer_is_refused_as_cut_off() {
        let json = serde_json::to_string_pretty(&TaskResult {
            status: TaskStatus::Complete,
            reasoning: "é".repeat(33),
            blockers: vec![],
            assumptions_made: vec![],
            verified_facts: vec![],
            clarification_needed: None,
            artifacts: vec![],
        })
        .unwrap();
        let error = parse_task_result(&cut_off(&json)).unwrap_err();
        assert!(error.to_string().contains("cut off"), "{error}");
    }

    #[test]
    fn a_json_values_text_is_counted_as_to_string_would_write_it() {
        let value = serde_json::json!({"path": "src/é.rs", "content": "naïve \"quoted\"\n 日本", "n": [1, 2.5, null, true]});
        let text = value.to_string();
        assert_eq!(super::json_text_len(&value), super::TextLen { bytes: text.len(), chars: text.chars().count() });
    }

}
