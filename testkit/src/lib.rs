//! The test harness: real nats-server and PostgreSQL from the checkout's venv, started once
//! per test binary on free ports in a temp dir, and for each test its own database (migrated)
//! and its own stream names.
//!
//! Depends on `factory-embedded` (running the servers) and `factory-commands` (migrations).
//! Start at [`TestStack::new`]. A missing binary fails the test loudly; nothing is skipped.
//! The servers die with the test process (they get a parent-death signal).

use factory_embedded::{EmbeddedNats, EmbeddedPostgres, NatsOptions, PostgresOptions, Venv};
use factory_nats::Topology;
use sqlx::PgPool;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The application role's password inside test clusters.
const APP_PASSWORD: &str = "factory-test";

/// The servers shared by every test of one test binary.
pub struct SharedServers {
    pub pg_port: u16,
    pub superuser_password: String,
    pub nats_url: String,
    pub dir: PathBuf,
}

static SERVERS: OnceLock<Result<SharedServers, String>> = OnceLock::new();
static APP_ROLE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// The application role exists cluster-wide; migrations grant to it. Made once, before the
/// first test database, so that concurrent tests do not race to create it.
async fn ensure_app_role(servers: &SharedServers) {
    APP_ROLE
        .get_or_init(|| async {
            let pool = PgPool::connect(&servers.superuser_url("postgres")).await.expect("superuser connects");
            sqlx::query(&format!(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'factory') THEN \
                 CREATE ROLE factory LOGIN PASSWORD '{APP_PASSWORD}'; END IF; END $$"
            ))
            .execute(&pool)
            .await
            .expect("creating the application role");
            pool.close().await;
        })
        .await;
}

/// The checkout's venv (`FACTORY_VENV` overrides).
pub fn venv() -> Venv {
    let root = std::env::var_os("FACTORY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| package_dir().join("..").join(".factory").join("venv"));
    Venv::new(root)
}

/// The directory of the package under test, as `cargo test` says when it runs the test (a
/// build cached in a shared `CARGO_TARGET_DIR` may have been made in another clone), else
/// this crate's at build time. Every package of the workspace is one level below its root.
pub fn package_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Removes temp dirs left by test processes that no longer run.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("factory-testkit-").and_then(|p| p.parse::<u32>().ok())
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn start_servers() -> Result<SharedServers, String> {
    sweep_stale_dirs();
    let dir = std::env::temp_dir().join(format!("factory-testkit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let venv = venv();
    // The servers get a parent-death signal when the thread that started them ends, so they
    // are started from a thread that lives as long as the test process.
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_dir = dir.clone();
    std::thread::Builder::new()
        .name("testkit-servers".into())
        .spawn(move || {
            let started = (|| -> Result<(EmbeddedPostgres, EmbeddedNats), String> {
                let pg = EmbeddedPostgres::start(PostgresOptions {
                    bin_dir: venv.pg_bin_dir().map_err(|e| e.to_string())?,
                    data_dir: thread_dir.join("pg"),
                    port: factory_embedded::free_port(),
                    superuser_password_file: thread_dir.join("pg-superuser-password"),
                    // Durability is not under test here; speed is welcome.
                    extra_settings: vec![
                        ("fsync".into(), "off".into()),
                        ("synchronous_commit".into(), "off".into()),
                        ("full_page_writes".into(), "off".into()),
                        ("max_connections".into(), "400".into()),
                    ],
                    log_file: thread_dir.join("pg.log"),
                })
                .map_err(|e| e.to_string())?;
                let nats = EmbeddedNats::start(NatsOptions {
                    binary: venv.nats_server().map_err(|e| e.to_string())?,
                    store_dir: thread_dir.join("nats"),
                    port: factory_embedded::free_port(),
                    pid_file: thread_dir.join("nats.pid"),
                    log_file: thread_dir.join("nats.log"),
                })
                .map_err(|e| e.to_string())?;
                Ok((pg, nats))
            })();
            match started {
                Ok((pg, nats)) => {
                    let _ = tx.send(Ok(SharedServers {
                        pg_port: pg.port(),
                        superuser_password: pg.superuser_password(),
                        nats_url: nats.url(),
                        dir: thread_dir,
                    }));
                    // Hold the servers for the life of the process.
                    let _keep = (pg, nats);
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let servers = rx.recv().map_err(|_| "the server thread died".to_string())??;
    Ok(servers)
}

impl SharedServers {
    pub fn superuser_url(&self, database: &str) -> String {
        format!("postgres://postgres:{}@127.0.0.1:{}/{database}", self.superuser_password, self.pg_port)
    }

    pub fn app_url(&self, database: &str) -> String {
        format!("postgres://factory:{APP_PASSWORD}@127.0.0.1:{}/{database}", self.pg_port)
    }
}

/// The shared servers, started on first use. Panics with the reason when they cannot start.
pub fn servers() -> &'static SharedServers {
    match SERVERS.get_or_init(start_servers) {
        Ok(servers) => servers,
        Err(e) => panic!("the test harness could not start PostgreSQL and NATS: {e}"),
    }
}

/// One test's world: its own migrated database and its own streams on the shared servers.
pub struct TestStack {
    pub database: String,
    /// Connected as the application role `factory` (INSERT and SELECT on events only).
    pub pool: PgPool,
    /// Connected as the superuser, for what only an owner or an attacker could do.
    pub admin: PgPool,
    pub nats: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    /// The namespace of `topology` (`FACTORY_NATS_NAMESPACE` for a `factory` process).
    pub namespace: String,
    pub topology: Topology,
}

impl TestStack {
    pub async fn new() -> Self {
        Self::migrated_to(None).await
    }

    /// A stack whose database has the migrations up to `version` only (all with `None`):
    /// for what a store written by an earlier release must still do after an upgrade.
    pub async fn migrated_to(version: Option<i64>) -> Self {
        let servers = servers();
        ensure_app_role(servers).await;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let database = format!("t_{id}");
        let server = PgPool::connect(&servers.superuser_url("postgres")).await.expect("superuser connects");
        sqlx::query(&format!("CREATE DATABASE {database}")).execute(&server).await.expect("create database");
        server.close().await;
        let admin = factory_commands::connect(&servers.superuser_url(&database), 8).await.expect("admin pool");
        let mut migrator = factory_commands::db::migrator();
        if let Some(version) = version {
            migrator.migrations = migrator.migrations.iter().filter(|m| m.version <= version).cloned().collect::<Vec<_>>().into();
        }
        migrator.run(&admin).await.expect("migrations apply");
        let pool = factory_commands::connect(&servers.app_url(&database), 16).await.expect("app pool");
        let nats = async_nats::connect(&servers.nats_url).await.expect("nats connects");
        let js = async_nats::jetstream::new(nats.clone());
        // Short namespaces keep subjects readable; the id's tail is its random part.
        let namespace = format!("t{}", &id[id.len() - 12..]);
        let topology = Topology::namespaced(&namespace);
        topology.ensure_streams(&js).await.expect("streams");
        Self { database, pool, admin, nats, js, namespace, topology }
    }

    pub fn app_url(&self) -> String {
        servers().app_url(&self.database)
    }

    pub fn nats_url(&self) -> String {
        servers().nats_url.clone()
    }

    pub fn superuser_url(&self) -> String {
        servers().superuser_url(&self.database)
    }
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A nats-server of the test's own, for tests that stop and restart the broker.
pub struct PrivateNats {
    server: Option<EmbeddedNats>,
    options: NatsOptions,
}

impl PrivateNats {
    /// Starts on a free port. Must be called from the thread that runs the test.
    pub fn start() -> Self {
        let dir = servers().dir.join(format!("nats-{}", uuid::Uuid::now_v7().simple()));
        let venv = venv();
        let options = NatsOptions {
            binary: venv.nats_server().expect("nats-server in the venv"),
            store_dir: dir.join("store"),
            port: factory_embedded::free_port(),
            pid_file: dir.join("nats.pid"),
            log_file: dir.join("nats.log"),
        };
        let server = EmbeddedNats::start(options.clone()).expect("private nats-server starts");
        Self { server: Some(server), options }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.options.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.stop().expect("nats-server stops");
        }
    }

    /// Starts again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.server = Some(EmbeddedNats::start(self.options.clone()).expect("nats-server restarts"));
    }
}
