//! Starts the real embedded servers from the checkout's venv: first start, reuse of the
//! data, recovery after a crash, and the errors a user sees.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use factory_embedded::{
    EmbeddedError, EmbeddedNats, EmbeddedPostgres, NatsOptions, PostgresOptions, Venv, free_port,
    wait_for,
};

fn venv() -> Venv {
    // As `cargo test` says when it runs this (a build cached in a shared target dir may
    // come from another clone), else as it was built.
    let package = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let root = package.join("../.factory/venv");
    assert!(
        root.join("bin").is_dir(),
        "the venv {} is missing: run `./factory up` first, which installs it",
        root.display()
    );
    Venv::new(root)
}

/// Under /tmp so that the `factory-pg` user can be given the data dir inside it.
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("factory-embedded-")
        .tempdir_in("/tmp")
        .unwrap()
}

fn pg_options(dir: &Path, port: u16) -> PostgresOptions {
    PostgresOptions {
        bin_dir: venv().pg_bin_dir().unwrap(),
        data_dir: dir.join("pg"),
        port,
        superuser_password_file: dir.join("pg-superuser-password"),
        extra_settings: vec![("shared_buffers".into(), "16MB".into())],
        log_file: dir.join("logs/pg.log"),
    }
}

fn nats_options(dir: &Path, port: u16) -> NatsOptions {
    NatsOptions {
        binary: venv().nats_server().unwrap(),
        store_dir: dir.join("nats"),
        port,
        pid_file: dir.join("nats.pid"),
        log_file: dir.join("logs/nats.log"),
    }
}

/// Runs `sql` with psql as the superuser; returns its unaligned output.
fn psql(pg: &EmbeddedPostgres, sql: &str) -> String {
    let psql = venv().pg_bin_dir().unwrap().join("psql");
    let output = Command::new(psql)
        .args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-p", &pg.port().to_string(), "-c", sql])
        .env("PGPASSWORD", pg.superuser_password())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "psql `{sql}` failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn is_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` runs; a zombie (a dead child not yet reaped) does not.
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .unwrap()
            .1
            .trim_start()
            .starts_with('Z')
    })
}

fn kill_hard(pid: u32) {
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -KILL {pid} failed");
}

#[test]
fn postgres_keeps_its_data_across_stops_and_crashes() {
    let dir = temp_dir();
    let port = free_port();

    let mut pg = EmbeddedPostgres::start(pg_options(dir.path(), port)).unwrap();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.superuser_password().len(), 32);
    let password_file = dir.path().join("pg-superuser-password");
    let password = std::fs::read_to_string(&password_file).unwrap();
    assert_eq!(password, pg.superuser_password());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&password_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(psql(&pg, "SELECT 1"), "1");
    psql(&pg, "CREATE EXTENSION vector");
    psql(
        &pg,
        "CREATE TABLE kept (v vector(3)); INSERT INTO kept VALUES ('[1,2,3]')",
    );
    assert_eq!(
        psql(&pg, "SHOW shared_buffers"),
        "16MB",
        "extra settings are applied"
    );

    // A clean stop and a second start reuse the cluster and its password.
    let pid = pg.pid().unwrap();
    pg.stop().unwrap();
    assert!(is_gone(pid), "the postmaster {pid} still runs after stop()");
    let pg = EmbeddedPostgres::start(pg_options(dir.path(), port)).unwrap();
    assert_eq!(pg.superuser_password(), password);
    assert_eq!(psql(&pg, "SELECT v::text FROM kept"), "[1,2,3]");

    // A crash: the postmaster dies at once and leaves postmaster.pid behind.
    kill_hard(pg.pid().unwrap());
    drop(pg);
    assert!(dir.path().join("pg/postmaster.pid").exists());
    let pg = EmbeddedPostgres::start(pg_options(dir.path(), port)).unwrap();
    assert_eq!(psql(&pg, "SELECT count(*) FROM kept"), "1");

    // A postmaster still running on the data dir (as after a crash of whoever started it)
    // is shut down and replaced. Its handle is kept only to reap it afterwards.
    let old = pg;
    let leftover = old.pid().unwrap();
    let pg = EmbeddedPostgres::start(pg_options(dir.path(), port)).unwrap();
    assert_ne!(pg.pid().unwrap(), leftover);
    assert!(
        !runs(leftover),
        "the leftover postmaster {leftover} still runs"
    );
    drop(old);
    assert_eq!(psql(&pg, "SELECT count(*) FROM kept"), "1");
    let pid = pg.pid().unwrap();
    drop(pg);
    assert!(is_gone(pid), "the postmaster {pid} still runs after drop");
}

/// The INFO line a NATS server greets a client with.
fn nats_info(port: u16) -> String {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

#[test]
fn nats_runs_with_jetstream_and_stops() {
    let dir = temp_dir();
    let port = free_port();

    let nats = EmbeddedNats::start(nats_options(dir.path(), port)).unwrap();
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    let info = nats_info(port);
    assert!(info.starts_with("INFO "), "unexpected greeting: {info}");
    assert!(
        info.contains(r#""jetstream":true"#),
        "JetStream is off: {info}"
    );

    // A server still running on the store (as after a crash of whoever started it) is
    // stopped and replaced. Its handle is kept only to reap it afterwards.
    let old = nats;
    let leftover = old.pid().unwrap();
    let mut nats = EmbeddedNats::start(nats_options(dir.path(), port)).unwrap();
    assert_ne!(nats.pid().unwrap(), leftover);
    assert!(
        !runs(leftover),
        "the leftover nats-server {leftover} still runs"
    );
    drop(old);
    assert!(nats_info(port).contains(r#""jetstream":true"#));

    let pid = nats.pid().unwrap();
    nats.stop().unwrap();
    assert!(is_gone(pid), "nats-server {pid} still runs after stop()");
    let closed = wait_for("the NATS port to close", Duration::from_secs(5), || {
        TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .is_err()
            .then_some(())
    });
    assert!(closed.is_ok(), "{closed:?}");
}

#[test]
fn a_busy_port_or_a_missing_binary_is_reported_clearly() {
    let dir = temp_dir();
    let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = squatter.local_addr().unwrap().port();

    let error = EmbeddedNats::start(nats_options(dir.path(), port)).unwrap_err();
    assert!(
        matches!(error, EmbeddedError::PortInUse { port: p, .. } if p == port),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(&format!("port {port}")),
        "{error}"
    );

    let error = EmbeddedPostgres::start(pg_options(dir.path(), port)).unwrap_err();
    assert!(
        matches!(error, EmbeddedError::PortInUse { port: p, .. } if p == port),
        "{error:?}"
    );
    assert!(
        !dir.path().join("pg/PG_VERSION").exists(),
        "no cluster is made for a server that cannot start"
    );

    let missing = PathBuf::from("/nonexistent/venv/bin/nats-server");
    let mut options = nats_options(dir.path(), free_port());
    options.binary = missing.clone();
    let error = EmbeddedNats::start(options).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
    assert!(message.contains("./factory up"), "{message}");

    let error = Venv::new("/nonexistent/venv").pg_bin_dir().unwrap_err();
    assert!(error.to_string().contains("./factory up"), "{error}");
}
