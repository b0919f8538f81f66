//! The `factory` binary as a user runs it, against real PostgreSQL and NATS: exit codes,
//! messages, and what ends up in the event store.

use factory_commands::relay::{Relay, RelayOptions};
use factory_nats::EventEnvelope;
use factory_testkit::TestStack;
use std::process::Output;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

struct Cli {
    home: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Cli {
    fn for_stack(stack: &TestStack) -> Self {
        let home = tempfile::tempdir().unwrap();
        let env = vec![
            ("FACTORY_DATABASE_URL".into(), stack.app_url()),
            ("FACTORY_NATS_URL".into(), stack.nats_url()),
            ("FACTORY_NATS_NAMESPACE".into(), stack.namespace.clone()),
        ];
        Self { home, env }
    }

    /// No URLs: the verbs look for an embedded stack in an empty data dir.
    fn without_stack() -> Self {
        Self { home: tempfile::tempdir().unwrap(), env: vec![] }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_factory"));
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("FACTORY_")) {
            command.env_remove(name);
        }
        command
            .args(args)
            .env("FACTORY_HOME", self.home.path())
            // Scratch inside the test's home, removed with it (the default is in memory,
            // outside it).
            .env("FACTORY_WORK_DIR", self.home.path().join("work"))
            .env("FACTORY_LOG", "warn")
            .envs(self.env.iter().cloned())
            .kill_on_drop(true);
        command
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().await.unwrap()
    }

    async fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self
            .command(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).await.unwrap();
        drop(input);
        child.wait_with_output().await.unwrap()
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn assert_exit(o: &Output, code: i32, stderr_has: &str) {
    assert_eq!(o.status.code(), Some(code), "stdout: {}\nstderr: {}", stdout(o), stderr(o));
    assert!(
        stderr(o).to_lowercase().contains(&stderr_has.to_lowercase()),
        "stderr should mention `{stderr_has}`: {}",
        stderr(o)
    );
}

async fn event_count(stack: &TestStack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&stack.pool).await.unwrap()
}

async fn submit(cli: &Cli, requirement: &str) -> String {
    let out = cli.run(&["run", "submit", requirement]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    uuid::Uuid::parse_str(&id).unwrap_or_else(|_| panic!("a run id, got `{id}`"));
    id
}

#[tokio::test]
async fn submit_prints_a_run_id_and_stores_the_event() {
    let stack = TestStack::new().await;
    let cli = Cli::for_stack(&stack);
    let id = submit(&cli, "Build a URL shortener").await;
    let (event_type, run_id): (String, Option<uuid::Uuid>) =
        sqlx::query_as("SELECT event_type, run_id FROM events").fetch_one(&stack.pool).await.unwrap();
    assert_eq!(event_type, "RequirementSubmitted");
    assert_eq!(run_id.map(|r| r.to_string()), Some(id));
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let stack = TestStack::new().await;
    let cli = Cli::for_stack(&stack);
    assert_exit(&cli.run(&["run", "submit", ""]).await, 1, "requirement is empty");
    assert_exit(&cli.run(&["run", "submit", "  \n "]).await, 1, "requirement is empty");
    let megabyte = vec![b'x'; 1 << 20];
    assert_exit(&cli.run_with_stdin(&["run", "submit", "-"], &megabyte).await, 1, "at most 65536");
    assert_exit(&cli.run(&["run", "submit", "x", "--pipeline", "nope"]).await, 1, "no built-in pipeline is named `nope`");
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_exit(&cli.run(&["replay", "timeline", &unknown]).await, 1, "no run");
    assert_exit(&cli.run(&["replay", "timeline", "not-a-uuid"]).await, 2, "invalid");
    assert_exit(&cli.run(&["events", "tail", "--from", "abc"]).await, 2, "--from");
    assert_exit(&cli.run(&["events", "tail", "--from", "0"]).await, 2, "--from");
    assert_exit(&cli.run(&["run", "submit"]).await, 2, "requirement");
    assert_eq!(event_count(&stack).await, 0);
}

#[tokio::test]
async fn configuration_errors_name_the_key() {
    let cli = Cli { home: tempfile::tempdir().unwrap(), env: vec![("FACTORY_BOGUS".into(), "1".into())] };
    assert_exit(&cli.run(&["schema", "events"]).await, 2, "bogus");
    let cli = Cli { home: tempfile::tempdir().unwrap(), env: vec![("FACTORY_EMBEDDED_PG_PORT".into(), "x".into())] };
    assert_exit(&cli.run(&["schema", "events"]).await, 2, "embedded_pg_port");
}

#[tokio::test]
async fn without_a_running_stack_the_verbs_say_how_to_start_one() {
    let cli = Cli::without_stack();
    assert_exit(&cli.run(&["run", "submit", "Build it"]).await, 1, "./factory up");
    assert_exit(&cli.run(&["audit", "verify"]).await, 1, "./factory up");
}

#[tokio::test]
async fn timeline_and_audit_verify_read_the_store() {
    let stack = TestStack::new().await;
    let cli = Cli::for_stack(&stack);
    let id = submit(&cli, "Build a URL shortener").await;
    let out = cli.run(&["replay", "timeline", &id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("RequirementSubmitted") && stdout(&out).contains("Build a URL shortener"));
    let out = cli.run(&["replay", "timeline", &id, "--json"]).await;
    let events: Vec<EventEnvelope> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].payload["requirement"], "Build a URL shortener");

    let out = cli.run(&["audit", "verify"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("intact"));

    let mut tx = stack.admin.begin().await.unwrap();
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_append_only").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE events SET payload = '{\"RequirementSubmitted\": {\"requirement\": \"forged\"}}'")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE events ENABLE TRIGGER events_append_only").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    assert_exit(&cli.run(&["audit", "verify"]).await, 1, &format!("run/{id} sequence 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tail_prints_a_runs_events_from_jetstream() {
    let stack = TestStack::new().await;
    let relay = Relay::new(
        stack.pool.clone(),
        stack.js.clone(),
        stack.topology.clone(),
        RelayOptions { poll_interval: Duration::from_millis(50), ..RelayOptions::default() },
    );
    let relay = tokio::spawn(relay.run());
    let cli = Cli::for_stack(&stack);
    let _other = submit(&cli, "Another run").await;
    let id = submit(&cli, "Build a URL shortener").await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        cli.run(&["events", "tail", "--run", &id, "--count", "1", "--json"]),
    )
    .await
    .expect("tail returns after one event");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let envelope: EventEnvelope = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(envelope.run_id.map(|r| r.to_string()), Some(id.clone()));
    assert_eq!(envelope.event_type, "RequirementSubmitted");

    // From a position: the first event whose position is at least that.
    let out = cli.run(&["events", "tail", "--from", &envelope.position.to_string(), "--count", "1", "--json"]).await;
    let from: EventEnvelope = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(from.position, envelope.position);
    relay.abort();
}

#[tokio::test]
async fn schema_events_describes_every_event_type() {
    let cli = Cli::without_stack();
    let out = cli.run(&["schema", "events"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let events = doc["events"].as_array().unwrap();
    // 19 event types at their current versions, and RequirementSubmitted's v1 as well.
    assert_eq!(events.len(), 20);
    let submitted = |version: &str| {
        events.iter().find(|e| e["event_type"] == "RequirementSubmitted" && e["event_version"] == version).unwrap()
    };
    assert_eq!(submitted("2")["ce_type"], "factory.run.RequirementSubmitted.v2");
    assert_eq!(submitted("2")["subject"], "factory.events.<run_id>.run.RequirementSubmitted");
    assert!(submitted("2")["schema"]["properties"]["submitted_by"].is_object());
    assert_eq!(submitted("1")["ce_type"], "factory.run.RequirementSubmitted.v1");
    assert!(submitted("1")["schema"]["properties"]["requirement"].is_object());
    assert!(submitted("1")["schema"]["properties"].get("submitted_by").is_none());
}

/// The stack's moving parts in-process, on the test's database and streams.
fn start_factory(stack: &TestStack, work_dir: &std::path::Path) -> Vec<tokio::task::JoinHandle<()>> {
    use factory_teams::model::ModelProvider;
    let store = std::sync::Arc::new(factory_commands::Store::new(
        stack.pool.clone(),
        std::sync::Arc::new(factory_domain::SystemServices),
    ));
    let relay = Relay::new(
        stack.pool.clone(),
        stack.js.clone(),
        stack.topology.clone(),
        RelayOptions { poll_interval: Duration::from_millis(50), ..RelayOptions::default() },
    );
    let orchestrator = factory_teams::orchestrator::Orchestrator::new(store.clone(), stack.js.clone(), stack.topology.clone());
    // As `up` does: the router in demo mode, in front of the script.
    let routing = factory_models::RoutingConfig { demo: Some(true), ..Default::default() };
    let provider: std::sync::Arc<dyn ModelProvider> = std::sync::Arc::new(
        factory_models::Router::new(
            routing,
            factory_models::ProviderSettings::default(),
            std::sync::Arc::new(factory_teams::scripted::ScriptedProvider::new()),
        )
        .unwrap(),
    );
    let worker = factory_teams::worker::Worker::new(
        store,
        stack.js.clone(),
        stack.topology.clone(),
        provider,
        factory_teams::worker::WorkerOptions::new(
            factory_teams::TEAM_IDS.iter().map(|t| t.to_string()).collect(),
            work_dir.to_path_buf(),
        ),
    );
    vec![tokio::spawn(relay.run()), tokio::spawn(orchestrator.run()), tokio::spawn(worker.run())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_demo_run_from_the_command_line_to_exported_artifacts() {
    let stack = TestStack::new().await;
    let work = tempfile::tempdir().unwrap();
    let tasks = start_factory(&stack, work.path());
    let cli = Cli::for_stack(&stack);

    let out = cli.run(&["run", "submit", "Build a URL shortener with expiry", "--auto-approve", "--wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    for stage in ["business-analysis", "solution-architecture", "backend-engineering", "qa-engineering", "documentation"] {
        assert!(stderr(&out).contains(stage), "--wait shows {stage}: {}", stderr(&out));
    }
    assert!(stderr(&out).contains("COMPLETED"));
    assert!(stderr(&out).contains("model scripted:architect"), "{}", stderr(&out));

    let out = cli.run(&["run", "show", &id, "--json"]).await;
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["status"], "COMPLETED");
    let stages = shown["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 5);
    assert!(stages.iter().all(|s| s["status"] == "COMPLETED" && s["iterations"] == 1 && s["model_calls"].as_u64() >= Some(1)));
    // Priced by the router's table, shown per stage and in the --wait lines.
    assert!(stages.iter().all(|s| s["cost_usd"].as_f64() > Some(0.0)), "{shown}");

    let export = tempfile::tempdir().unwrap();
    let out = cli.run(&["run", "artifacts", &id, "--out", export.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for file in ["docs/requirements.md", "docs/architecture.md", "README.md", "docs/test-plan.md"] {
        let text = std::fs::read_to_string(export.path().join(file)).unwrap_or_else(|_| panic!("{file} exported"));
        assert!(!text.trim().is_empty());
    }
    let repo = tempfile::tempdir().unwrap();
    let out = cli.run(&["run", "artifacts", &id, "--git", "--out", repo.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let log = std::process::Command::new("git")
        .args(["-C", repo.path().to_str().unwrap(), "log", "--reverse", "--format=%an"])
        .output()
        .unwrap();
    let authors: Vec<String> = String::from_utf8_lossy(&log.stdout).lines().map(str::to_string).collect();
    assert_eq!(authors, ["business-analysis", "solution-architecture", "backend-engineering", "qa-engineering", "documentation"]);
    assert_exit(
        &cli.run(&["run", "artifacts", &id, "--git", "--out", repo.path().to_str().unwrap()]).await,
        1,
        "not empty",
    );

    // Re-run from the record: identical, no model called; a fork from the end completes.
    let out = cli.run(&["replay", "rerun", &id]).await;
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("identical"), "{}", stdout(&out));
    assert!(stdout(&out).contains("no model called"), "{}", stdout(&out));
    let out = cli.run(&["replay", "rerun", &id, "--json"]).await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["objectives"], 5);
    assert_eq!(report["divergences"], serde_json::json!([]));
    let out = cli.run(&["run", "fork", &id, "--at", "999999999", "--wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("starts with business-analysis"), "{}", stderr(&out));
    let forked = stdout(&out).trim().to_string();
    assert_ne!(forked, id);
    assert_exit(&cli.run(&["run", "fork", &uuid::Uuid::now_v7().to_string(), "--at", "1"]).await, 1, "has no events");
    assert_exit(&cli.run(&["replay", "rerun", &uuid::Uuid::now_v7().to_string()]).await, 1, "has no events");

    let listed = cli.run(&["run", "list", "--json"]).await;
    let runs: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(runs[0]["id"], forked.as_str(), "the newest run first");
    assert_eq!(runs[1]["id"], id.as_str());
    assert_eq!(runs[0]["status"], "COMPLETED");

    // The review gate from the command line, and a blocked run's exit code.
    let out = cli.run(&["run", "submit", "Build a todo app", "--wait"]).await;
    assert_exit(&out, 1, "AWAITING_REVIEW");
    let waiting = stdout(&out).trim().to_string();
    assert_exit(&cli.run(&["run", "review", &waiting, "--revise", ""]).await, 1, "feedback is empty");
    let out = cli.run(&["run", "review", &waiting, "--approve"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_exit(&cli.run(&["run", "cancel", &waiting]).await, 1, "COMPLETED");
    assert_exit(&cli.run(&["run", "submit", "Build a todo app #block", "--wait"]).await, 1, "BLOCKED");
    assert_exit(&cli.run(&["run", "show", &uuid::Uuid::now_v7().to_string()]).await, 1, "no run");
    tasks.iter().for_each(|t| t.abort());
}

#[tokio::test]
async fn models_show_set_and_reset_the_routing_without_printing_keys() {
    let stack = TestStack::new().await;
    let mut cli = Cli::for_stack(&stack);
    cli.env.push(("OPENAI_API_KEY".into(), "sk-very-secret-key".into()));
    // A key is set: not demo mode; openai targets are available, anthropic ones are not.
    let shown = cli.run(&["models", "show", "--json"]).await;
    assert_exit(&shown, 0, "");
    let text = stdout(&shown);
    assert!(!text.contains("sk-very-secret-key"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["demo"], false);
    assert_eq!(json["providers"], serde_json::json!(["openai"]));
    let coder = json["aliases"].as_array().unwrap().iter().find(|a| a["alias"] == "factory/coder").unwrap();
    let available: Vec<&str> = coder["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["available"] == true)
        .map(|t| t["target"].as_str().unwrap())
        .collect();
    assert_eq!(available, vec!["openai:gpt-4.1"]);

    assert_exit(&cli.run(&["models", "set", "factory/coder", "ollama:qwen2.5-coder", "openai:gpt-4.1-mini"]).await, 0, "");
    let shown = stdout(&cli.run(&["models", "show"]).await);
    let line = shown.lines().find(|l| l.starts_with("factory/coder")).unwrap();
    assert!(line.contains("(ollama:qwen2.5-coder: not configured) -> openai:gpt-4.1-mini") && line.contains("[set at run time]"), "{line}");
    let changes: i64 = sqlx::query_scalar("SELECT count(*) FROM model_routing_changes WHERE alias = 'factory/coder'")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(changes, 1);

    assert_exit(&cli.run(&["models", "set", "factory/nope", "openai:x"]).await, 1, "unknown alias `factory/nope`");
    assert_exit(&cli.run(&["models", "set", "factory/coder", "gpt-4"]).await, 1, "`gpt-4` is not a target");
    assert_exit(&cli.run(&["models", "reset", "factory/coder"]).await, 0, "");
    let shown = stdout(&cli.run(&["models", "show"]).await);
    assert!(!shown.contains("[set at run time]"), "{shown}");
}

#[tokio::test]
async fn a_bad_models_table_names_the_key() {
    let cli = Cli::without_stack();
    std::fs::write(cli.home.path().join("factory.toml"), "[models.retry]\ntimeout = 5\n").unwrap();
    assert_exit(&cli.run(&["schema", "events"]).await, 2, "models.retry.timeout");
    std::fs::write(cli.home.path().join("factory.toml"), "[models.aliases]\n\"factory/coder\" = [\"nowhere:x\"]\n").unwrap();
    assert_exit(&cli.run(&["schema", "events"]).await, 2, "`nowhere:x` is not a target");
}

/// A `factory up` against the test's stack, its banner discarded, its log to `stderr`;
/// killed when dropped.
fn start_up(cli: &Cli, stack: &TestStack, stderr: std::process::Stdio) -> tokio::process::Child {
    cli.command(&["up"])
        .env("FACTORY_HTTP_ADDR", "127.0.0.1:0")
        // Migrations run as an owner of the schema (all applied already: a no-op).
        .env("FACTORY_DATABASE_ADMIN_URL", stack.superuser_url())
        .env("FACTORY_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_factory_killed_with_work_handed_over_in_memory_has_it_taken_over_by_the_next_one() {
    use factory_testkit::wait_for;
    let stack = TestStack::new().await;
    let cli = Cli::for_stack(&stack);
    let mut first = start_up(&cli, &stack, std::process::Stdio::null());
    // Claims hold once its presence is in the bucket (renewed right after the put).
    let presence = stack.js.get_key_value(&stack.topology.workers_bucket).await.unwrap();
    wait_for("the first factory's worker to announce itself", Duration::from_secs(60), || async {
        let mut keys = presence.keys().await.ok()?;
        futures::StreamExt::next(&mut keys).await.and_then(Result::ok).map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id = submit(&cli, "Build a todo app #slow=1000").await;
    let run = uuid::Uuid::parse_str(&id).unwrap();
    // Its first objective is claimed by the first factory and worked there, in memory; no
    // work message exists for it. Killed mid-call (SIGKILL: nothing is taken back).
    let claimant: String = wait_for("the first objective to be claimed", Duration::from_secs(60), || async {
        sqlx::query_scalar(
            "SELECT payload->'ObjectiveAssigned'->>'claimed_by' FROM events WHERE run_id = $1 AND event_type = 'ObjectiveAssigned'",
        )
        .bind(run)
        .fetch_optional(&stack.pool)
        .await
        .unwrap()
        .flatten()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let mut work = stack.js.get_stream(&stack.topology.work_stream).await.unwrap();
    assert_eq!(work.info().await.unwrap().state.last_sequence, 0, "nothing was queued for the claimed objective");

    // The next factory finds the first one gone (its presence expired, its row stale), queues
    // the claimed work, and the run goes on to the end; every objective done once.
    let log = cli.home.path().join("second-up.log");
    let mut second = start_up(&cli, &stack, std::fs::File::create(&log).unwrap().into());
    wait_for("the run to reach its review", Duration::from_secs(150), || async {
        let out = cli.run(&["run", "show", &id, "--json"]).await;
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (shown["status"] == "AWAITING_REVIEW").then_some(())
    })
    .await;
    let count = |event_type: &'static str| {
        let pool = stack.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE run_id = $1 AND event_type = $2")
                .bind(run)
                .bind(event_type)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("TaskResultRecorded").await, 5);
    assert_eq!(count("ObjectiveCompleted").await, 5);
    let first_key: String = sqlx::query_scalar(
        "SELECT payload->'TaskResultRecorded'->>'idempotency_key' FROM events
          WHERE run_id = $1 AND event_type = 'TaskResultRecorded' ORDER BY position LIMIT 1",
    )
    .bind(run)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert!(first_key.starts_with("work:"), "the first objective was worked from a message: {first_key}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("a worker process has gone; its open claims are queued"), "the sweep queued it: {log}");
    assert!(log.contains(&claimant), "naming the dead factory's worker: {log}");
    // Its row is kept for a grace (a statement it sent may commit late), swept past its claim.
    let (since, claimed_at): (i64, i64) = sqlx::query_as(
        "SELECT since_position, (SELECT min(position) FROM events WHERE run_id = $2 AND event_type = 'ObjectiveAssigned')
           FROM worker_instances WHERE instance = $1",
    )
    .bind(&claimant)
    .bind(run)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert!(since >= claimed_at, "the dead factory's row is swept past its claim: {since} < {claimed_at}");
    second.start_kill().unwrap();
    second.wait().await.unwrap();
}
