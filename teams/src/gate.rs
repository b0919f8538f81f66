//! The TaskResult gate: a model's raw answer becomes a [`TaskResult`] only if it is exactly
//! one well-formed TaskResult JSON object.
//!
//! Accepted: the JSON object alone, or inside one fenced block (```` ```json ```` or a bare
//! ```` ``` ````), with whitespace around it. Refused: prose around the object, several
//! blocks, unknown or duplicate fields, a status other than `COMPLETE`,
//! `NEEDS_CLARIFICATION` or `BLOCKED`, an empty `reasoning`, a `NEEDS_CLARIFICATION` without
//! its question, a `BLOCKED` without blockers, an artifact path that is absolute or climbs
//! out with `..`.
//!
//! A refusal's message is written for the model: [`repair_prompt`] quotes it back in the one
//! repair request a worker makes before it records the objective BLOCKED.

use crate::model::REPAIR_MARKER;
use factory_domain::{TaskResult, TaskStatus};

/// Why a raw answer is not a TaskResult. The message says what is wrong and where, in words
/// a model can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error("the answer is empty; it must be one TaskResult JSON object")]
    Empty,
    #[error(
        "the answer must be one TaskResult JSON object and nothing else (a single ```json block is \
         also accepted), but it starts with `{start}`"
    )]
    NotAnObject { start: String },
    #[error("the ```json block is malformed: {problem}")]
    Fence { problem: String },
    /// The JSON does not parse as a TaskResult. `line` and `column` count in the raw answer.
    #[error("invalid TaskResult JSON at line {line}, column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    /// The JSON parses but breaks a rule of the contract.
    #[error("field `{field}`: {problem}")]
    Field { field: String, problem: String },
}

/// Parses a model's raw answer into a [`TaskResult`], strictly.
pub fn parse_task_result(raw: &str) -> Result<TaskResult, GateError> {
    let (json, offset) = extract_json(raw)?;
    let result: TaskResult = serde_json::from_str(json).map_err(|e| json_error(&e, raw, offset))?;
    check_rules(&result)?;
    Ok(result)
}

/// The JSON text inside the answer and its byte offset in `raw`.
fn extract_json(raw: &str) -> Result<(&str, usize), GateError> {
    let text = raw.trim();
    if text.is_empty() {
        return Err(GateError::Empty);
    }
    let start = raw.len() - raw.trim_start().len();
    let fence = |problem: &str| GateError::Fence {
        problem: problem.to_string(),
    };
    let Some(after_open) = text.strip_prefix("```") else {
        if text.starts_with('{') {
            return Ok((text, start));
        }
        let first_line = text.lines().next().unwrap_or_default();
        return Err(GateError::NotAnObject {
            start: snippet(first_line, 40),
        });
    };
    let Some((info, rest)) = after_open.split_once('\n') else {
        return Err(fence(
            "the opening ``` must be followed by a new line, then the JSON object",
        ));
    };
    let info = info.trim();
    if !(info.is_empty() || info.eq_ignore_ascii_case("json")) {
        return Err(GateError::Fence {
            problem: format!(
                "the block is marked `{}`; mark it ```json",
                snippet(info, 20)
            ),
        });
    }
    let Some(body) = rest.trim_end().strip_suffix("```") else {
        return Err(fence(
            "the block is not closed with ```, or text follows the closing ```",
        ));
    };
    if body.contains("```") {
        return Err(fence(
            "the answer has more than one fenced block; give exactly one",
        ));
    }
    let body_start = start + 3 + info_len(after_open) + 1;
    if !body.trim_start().starts_with('{') {
        return Err(fence(
            "the block must contain one JSON object, starting with `{`",
        ));
    }
    Ok((body, body_start))
}

/// Length in bytes of the fence's info string line (before its new line).
fn info_len(after_open: &str) -> usize {
    after_open.find('\n').unwrap_or(after_open.len())
}

/// A serde error, its position moved from the JSON body to the raw answer.
fn json_error(error: &serde_json::Error, raw: &str, offset: usize) -> GateError {
    let (line, column) = (error.line(), error.column());
    let message = error.to_string();
    let message = message
        .strip_suffix(&format!(" at line {line} column {column}"))
        .unwrap_or(&message)
        .to_string();
    let message = match error.classify() {
        serde_json::error::Category::Eof => {
            format!("{message} (the object is cut off; close every string, array and brace)")
        }
        _ if message == "trailing characters" => {
            "text follows the JSON object; answer with the object only".to_string()
        }
        _ => message,
    };
    // Where the body starts in the raw answer: its line, and its column on that line.
    let before = &raw[..offset.min(raw.len())];
    let body_line = before.matches('\n').count() + 1;
    let body_column = before.len() - before.rfind('\n').map_or(0, |i| i + 1);
    let (line, column) = match line {
        0 => (body_line, body_column + 1),
        1 => (body_line, body_column + column),
        n => (body_line + n - 1, column),
    };
    GateError::Json {
        line,
        column,
        message,
    }
}

fn check_rules(result: &TaskResult) -> Result<(), GateError> {
    let field = |field: &str, problem: String| GateError::Field {
        field: field.to_string(),
        problem,
    };
    if result.reasoning.trim().is_empty() {
        return Err(field(
            "reasoning",
            "must not be empty; say why you decided what you did".into(),
        ));
    }
    match result.status {
        TaskStatus::NeedsClarification => match &result.clarification_needed {
            None => {
                return Err(field(
                    "clarification_needed",
                    "is required when status is NEEDS_CLARIFICATION; put the question there".into(),
                ));
            }
            Some(question) if question.trim().is_empty() => {
                return Err(field(
                    "clarification_needed",
                    "must not be empty when status is NEEDS_CLARIFICATION; put the question there"
                        .into(),
                ));
            }
            Some(_) => {}
        },
        TaskStatus::Blocked if result.blockers.is_empty() => {
            return Err(field(
                "blockers",
                "must list at least one blocker when status is BLOCKED".into(),
            ));
        }
        TaskStatus::Blocked | TaskStatus::Complete => {}
    }
    for (name, list) in [
        ("blockers", &result.blockers),
        ("assumptions_made", &result.assumptions_made),
        ("verified_facts", &result.verified_facts),
    ] {
        if let Some(i) = list.iter().position(|item| item.trim().is_empty()) {
            return Err(field(
                &format!("{name}[{i}]"),
                "must not be an empty string".into(),
            ));
        }
    }
    for (i, path) in result.artifacts.iter().enumerate() {
        if let Some(problem) = artifact_path_problem(path) {
            return Err(field(
                &format!("artifacts[{i}]"),
                format!("`{}` {problem}", snippet(path, 80)),
            ));
        }
    }
    Ok(())
}

/// Artifact paths name files in the run's workspace: relative, and never climbing out. Both
/// `/` and `\` count as separators, so a Windows-style path cannot slip a `..` through.
fn artifact_path_problem(path: &str) -> Option<&'static str> {
    if path.trim().is_empty() {
        return Some("is empty; give the file's path relative to the workspace");
    }
    if path.contains('\0') {
        return Some("contains a NUL character");
    }
    let bytes = path.as_bytes();
    let drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    if path.starts_with('/') || path.starts_with('\\') || drive {
        return Some("is absolute; give the path relative to the workspace (e.g. `src/main.rs`)");
    }
    if path.split(['/', '\\']).any(|part| part == "..") {
        return Some("contains `..`; paths must stay inside the workspace");
    }
    None
}

/// At most `max` characters of `text`, marked when cut.
fn snippet(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// How much of a refused answer a repair request quotes: its head and its tail, where a
/// cut-off answer goes wrong.
const QUOTE_HEAD_CHARS: usize = 1500;
const QUOTE_TAIL_CHARS: usize = 500;

/// The one repair request sent after a refused answer: the error, the answer quoted (long
/// answers cut in the middle), and the instruction to send one corrected object only.
pub fn repair_prompt(error: &GateError, raw: &str) -> String {
    let quoted = quote(raw);
    format!(
        "{REPAIR_MARKER} It was refused: {error}.\n\
         \n\
         Your previous answer was:\n\
         <<<\n\
         {quoted}\n\
         >>>\n\
         \n\
         Reply with one corrected TaskResult JSON object only: no text before or after it, at \
         most one ```json block. Fields: status (COMPLETE, NEEDS_CLARIFICATION or BLOCKED), \
         reasoning, blockers, assumptions_made, verified_facts, clarification_needed (the \
         question, when NEEDS_CLARIFICATION), artifacts (workspace-relative paths). No other \
         fields."
    )
}

fn quote(raw: &str) -> String {
    let total = raw.chars().count();
    if total <= QUOTE_HEAD_CHARS + QUOTE_TAIL_CHARS {
        return raw.to_string();
    }
    let head: String = raw.chars().take(QUOTE_HEAD_CHARS).collect();
    let tail: String = raw.chars().skip(total - QUOTE_TAIL_CHARS).collect();
    let omitted = total - QUOTE_HEAD_CHARS - QUOTE_TAIL_CHARS;
    format!("{head}\n[... {omitted} characters omitted ...]\n{tail}")
}

/// The JSON Schema of [`TaskResult`], for providers that take a response format.
///
/// It states the shape (fields, types, the three statuses, no other fields); the rules that
/// span fields (a question when NEEDS_CLARIFICATION, blockers when BLOCKED, safe paths) are
/// the gate's, checked by [`parse_task_result`].
pub fn task_result_schema() -> serde_json::Value {
    // Derived once: every model call carries it.
    static SCHEMA: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| schemars::schema_for!(TaskResult).to_value()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = r#"{
  "status": "COMPLETE",
  "reasoning": "The requirements are clear; I wrote them down.",
  "blockers": [],
  "assumptions_made": ["users sign in with email"],
  "verified_facts": [],
  "artifacts": ["requirements.md", "docs/glossary.md"]
}"#;

    fn good() -> TaskResult {
        TaskResult {
            status: TaskStatus::Complete,
            reasoning: "The requirements are clear; I wrote them down.".into(),
            blockers: vec![],
            assumptions_made: vec!["users sign in with email".into()],
            verified_facts: vec![],
            clarification_needed: None,
            artifacts: vec!["requirements.md".into(), "docs/glossary.md".into()],
        }
    }

    fn field_error(raw: &str) -> (String, String) {
        match parse_task_result(raw) {
            Err(GateError::Field { field, problem }) => (field, problem),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    fn json_refusal(raw: &str) -> (usize, usize, String) {
        match parse_task_result(raw) {
            Err(GateError::Json {
                line,
                column,
                message,
            }) => (line, column, message),
            other => panic!("expected a JSON error, got {other:?}"),
        }
    }

    #[test]
    fn plain_object_is_accepted() {
        assert_eq!(parse_task_result(GOOD).unwrap(), good());
        assert_eq!(
            parse_task_result(&format!("\n\n  {GOOD}  \n")).unwrap(),
            good()
        );
    }

    #[test]
    fn fenced_object_is_accepted() {
        for open in ["```json", "```JSON", "```", "``` json "] {
            let raw = format!("  \n{open}\n{GOOD}\n```\n");
            assert_eq!(parse_task_result(&raw).unwrap(), good(), "{open}");
        }
    }

    #[test]
    fn minimal_answer_takes_defaults() {
        let r = parse_task_result(r#"{"status":"COMPLETE","reasoning":"done"}"#).unwrap();
        assert!(
            r.blockers.is_empty() && r.artifacts.is_empty() && r.clarification_needed.is_none()
        );
    }

    #[test]
    fn clarification_and_blocked_answers_are_accepted() {
        let r = parse_task_result(
            r#"{"status":"NEEDS_CLARIFICATION","reasoning":"ambiguous","clarification_needed":"Which database?"}"#,
        )
        .unwrap();
        assert_eq!(r.clarification_needed.as_deref(), Some("Which database?"));
        let r =
            parse_task_result(r#"{"status":"BLOCKED","reasoning":"no","blockers":["no API key"]}"#)
                .unwrap();
        assert_eq!(r.blockers, ["no API key"]);
    }

    #[test]
    fn empty_answer_is_refused() {
        assert_eq!(parse_task_result(""), Err(GateError::Empty));
        assert_eq!(parse_task_result(" \n\t "), Err(GateError::Empty));
    }

    #[test]
    fn prose_around_the_object_is_refused() {
        let err = parse_task_result(&format!("Here is my answer:\n{GOOD}")).unwrap_err();
        assert_eq!(
            err,
            GateError::NotAnObject {
                start: "Here is my answer:".into()
            }
        );
        assert!(err.to_string().contains("nothing else"), "{err}");

        let (line, column, message) = json_refusal(&format!("{GOOD}\nHope this helps!"));
        assert_eq!((line, column), (9, 1));
        assert_eq!(
            message,
            "text follows the JSON object; answer with the object only"
        );

        let err = parse_task_result(&format!("```json\n{GOOD}\n```\nThat is all.")).unwrap_err();
        assert!(matches!(err, GateError::Fence { .. }), "{err:?}");
    }

    #[test]
    fn malformed_fences_are_refused() {
        for raw in [
            format!("```json\n{GOOD}"),
            format!("```json\n{GOOD}\n```\n```json\n{GOOD}\n```"),
            format!("```yaml\n{GOOD}\n```"),
            format!("```json {GOOD}```"),
            "```json\nnot json\n```".to_string(),
        ] {
            let err = parse_task_result(&raw).unwrap_err();
            assert!(matches!(err, GateError::Fence { .. }), "{raw}: {err:?}");
        }
        let err = parse_task_result(&format!("```yaml\n{GOOD}\n```")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the ```json block is malformed: the block is marked `yaml`; mark it ```json"
        );
    }

    #[test]
    fn unknown_field_is_refused_with_its_position() {
        let raw = GOOD.replace(
            "\"blockers\": [],",
            "\"blockers\": [],\n  \"confidence\": 0.9,",
        );
        let (line, column, message) = json_refusal(&raw);
        assert_eq!(line, 5);
        assert!(column > 1);
        assert!(
            message.starts_with("unknown field `confidence`, expected one of"),
            "{message}"
        );
        // In a fenced answer the position counts the fence's line too.
        let (line, _, _) = json_refusal(&format!("\n```json\n{raw}\n```"));
        assert_eq!(line, 7);
    }

    #[test]
    fn duplicate_field_is_refused() {
        let (_, _, message) =
            json_refusal(r#"{"status":"COMPLETE","reasoning":"a","reasoning":"b"}"#);
        assert_eq!(message, "duplicate field `reasoning`");
    }

    #[test]
    fn unknown_status_is_refused() {
        let (line, column, message) = json_refusal(&GOOD.replace("COMPLETE", "DONE"));
        assert_eq!(line, 2);
        assert!(column > 10);
        assert!(message.contains("unknown variant `DONE`"), "{message}");
        assert!(
            message.contains("`COMPLETE`, `NEEDS_CLARIFICATION`, `BLOCKED`"),
            "{message}"
        );
        let (_, _, message) = json_refusal(&GOOD.replace("COMPLETE", "complete"));
        assert!(message.contains("unknown variant `complete`"), "{message}");
    }

    #[test]
    fn missing_status_or_reasoning_is_refused() {
        let (_, _, message) = json_refusal(r#"{"reasoning":"x"}"#);
        assert_eq!(message, "missing field `status`");
        let (_, _, message) = json_refusal(r#"{"status":"COMPLETE"}"#);
        assert_eq!(message, "missing field `reasoning`");
    }

    #[test]
    fn wrong_types_are_refused() {
        let (_, _, message) =
            json_refusal(r#"{"status":"COMPLETE","reasoning":"x","artifacts":"a.md"}"#);
        assert!(
            message.starts_with("invalid type: string \"a.md\", expected a sequence"),
            "{message}"
        );
        assert!(matches!(
            parse_task_result(r#"["status"]"#),
            Err(GateError::NotAnObject { .. })
        ));
    }

    #[test]
    fn truncated_object_says_it_is_cut_off() {
        let (line, _, message) = json_refusal(&GOOD[..GOOD.len() / 2]);
        assert!(message.contains("EOF while parsing"), "{message}");
        assert!(message.contains("cut off"), "{message}");
        assert!(line >= 3);
    }

    #[test]
    fn empty_reasoning_is_refused() {
        let (field, problem) = field_error(r#"{"status":"COMPLETE","reasoning":"  "}"#);
        assert_eq!(field, "reasoning");
        assert!(problem.contains("must not be empty"));
    }

    #[test]
    fn clarification_needs_its_question() {
        let (field, problem) = field_error(r#"{"status":"NEEDS_CLARIFICATION","reasoning":"x"}"#);
        assert_eq!(field, "clarification_needed");
        assert!(problem.contains("required"));
        let (field, _) = field_error(
            r#"{"status":"NEEDS_CLARIFICATION","reasoning":"x","clarification_needed":""}"#,
        );
        assert_eq!(field, "clarification_needed");
        let (field, _) = field_error(
            r#"{"status":"NEEDS_CLARIFICATION","reasoning":"x","clarification_needed":null}"#,
        );
        assert_eq!(field, "clarification_needed");
    }

    #[test]
    fn blocked_needs_blockers() {
        let (field, problem) = field_error(r#"{"status":"BLOCKED","reasoning":"x","blockers":[]}"#);
        assert_eq!(field, "blockers");
        assert_eq!(
            GateError::Field { field, problem }.to_string(),
            "field `blockers`: must list at least one blocker when status is BLOCKED"
        );
        let (field, _) =
            field_error(r#"{"status":"BLOCKED","reasoning":"x","blockers":["a"," "]}"#);
        assert_eq!(field, "blockers[1]");
    }

    #[test]
    fn unsafe_artifact_paths_are_refused() {
        for (path, word) in [
            ("/etc/passwd", "absolute"),
            ("\\\\server\\share", "absolute"),
            ("C:/x.txt", "absolute"),
            ("../outside.md", "`..`"),
            ("src/../../x", "`..`"),
            ("src\\..\\..\\x", "`..`"),
            ("", "empty"),
        ] {
            let raw = serde_json::json!({"status": "COMPLETE", "reasoning": "x", "artifacts": ["ok.md", path]})
                .to_string();
            let (field, problem) = field_error(&raw);
            assert_eq!(field, "artifacts[1]", "{path}");
            assert!(problem.contains(word), "{path}: {problem}");
        }
        for path in ["a..b/c.md", "./src/main.rs", ".github/workflows/ci.yml"] {
            let raw =
                serde_json::json!({"status": "COMPLETE", "reasoning": "x", "artifacts": [path]})
                    .to_string();
            assert!(parse_task_result(&raw).is_ok(), "{path}");
        }
    }

    #[test]
    fn repair_prompt_quotes_the_error_and_asks_for_one_object() {
        let raw = "Sure! {\"status\": \"DONE\"}";
        let error = parse_task_result(raw).unwrap_err();
        let prompt = repair_prompt(&error, raw);
        assert!(prompt.contains(&error.to_string()));
        assert!(prompt.contains(raw));
        assert!(prompt.contains("one corrected TaskResult JSON object only"));
    }

    #[test]
    fn repair_prompt_cuts_long_answers_in_the_middle() {
        let raw = format!(
            "{{\"reasoning\": \"{}\", \"status\": \"DON",
            "é".repeat(10_000)
        );
        let error = parse_task_result(&raw).unwrap_err();
        let prompt = repair_prompt(&error, &raw);
        assert!(prompt.chars().count() < 3_000, "{}", prompt.chars().count());
        assert!(prompt.contains("characters omitted"));
        assert!(
            prompt.contains("\"status\": \"DON"),
            "the tail, where it went wrong, is kept"
        );
    }

    #[test]
    fn schema_describes_task_result() {
        let schema = task_result_schema();
        assert_eq!(schema["type"], "object");
        assert_eq!(schema["additionalProperties"], false);
        let properties = schema["properties"].as_object().unwrap();
        for name in [
            "status",
            "reasoning",
            "blockers",
            "assumptions_made",
            "verified_facts",
            "clarification_needed",
            "artifacts",
        ] {
            assert!(properties.contains_key(name), "{name}");
        }
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(required, ["status", "reasoning"]);
        let text = schema.to_string();
        for status in ["COMPLETE", "NEEDS_CLARIFICATION", "BLOCKED"] {
            assert!(text.contains(status), "{status}");
        }
    }

    fn item() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9][a-zA-Z0-9 .,:;'\"\\\\/{}éü✓-]{0,30}"
    }

    fn artifact() -> impl Strategy<Value = String> {
        "[a-z0-9_][a-z0-9_.-]{0,8}(/[a-z0-9_][a-z0-9_.-]{0,8}){0,3}"
    }

    fn valid_task_result() -> impl Strategy<Value = TaskResult> {
        (
            prop_oneof![
                Just(TaskStatus::Complete),
                Just(TaskStatus::NeedsClarification),
                Just(TaskStatus::Blocked)
            ],
            item(),
            prop::collection::vec(item(), 0..4),
            prop::collection::vec(item(), 0..4),
            prop::collection::vec(item(), 0..4),
            prop::option::of(item()),
            prop::collection::vec(artifact(), 0..4),
        )
            .prop_map(
                |(
                    status,
                    reasoning,
                    mut blockers,
                    assumptions_made,
                    verified_facts,
                    mut question,
                    artifacts,
                )| {
                    match status {
                        TaskStatus::NeedsClarification if question.is_none() => {
                            question = Some("Which database should we use?".into());
                        }
                        TaskStatus::Blocked if blockers.is_empty() => {
                            blockers.push("no access".into())
                        }
                        _ => {}
                    }
                    TaskResult {
                        status,
                        reasoning,
                        blockers,
                        assumptions_made,
                        verified_facts,
                        clarification_needed: question,
                        artifacts,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(raw in any::<String>()) {
            let _ = parse_task_result(&raw);
        }

        #[test]
        fn arbitrary_json_like_strings_never_panic(raw in "(```json\n)?[{}\\[\\]\":,a-z_ \n0-9\\\\]{0,80}(```)?") {
            if let Err(e) = parse_task_result(&raw) {
                let _ = repair_prompt(&e, &raw);
            }
        }

        #[test]
        fn truncations_of_a_valid_answer_never_panic(
            result in valid_task_result(),
            fenced in any::<bool>(),
            pretty in any::<bool>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let json = if pretty {
                serde_json::to_string_pretty(&result).unwrap()
            } else {
                serde_json::to_string(&result).unwrap()
            };
            let raw = if fenced { format!("```json\n{json}\n```") } else { json };
            let boundaries: Vec<usize> = raw.char_indices().map(|(i, _)| i).collect();
            let end = boundaries[cut.index(boundaries.len())];
            match parse_task_result(&raw[..end]) {
                Ok(parsed) => prop_assert_eq!(parsed, result.clone()),
                Err(e) => prop_assert!(!repair_prompt(&e, &raw[..end]).is_empty()),
            }
        }

        #[test]
        fn valid_results_round_trip(result in valid_task_result(), fenced in any::<bool>()) {
            let json = serde_json::to_string_pretty(&result).unwrap();
            let raw = if fenced { format!("\n```json\n{json}\n```\n") } else { json };
            prop_assert_eq!(parse_task_result(&raw), Ok(result));
        }
    }
}
