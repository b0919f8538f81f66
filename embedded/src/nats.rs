//! The embedded NATS server with JetStream, as our child process.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{self, Log, RunAs};
use crate::{EmbeddedError, Result, ensure_port_free, existing, poll};

const SERVICE: &str = "NATS server";
const READY_DEADLINE: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 20;

/// Where and how to run the embedded NATS server.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats-server` ([`crate::Venv::nats_server`]).
    pub binary: PathBuf,
    /// JetStream's store (`-sd`); reused across starts.
    pub store_dir: PathBuf,
    /// The client port on 127.0.0.1.
    pub port: u16,
    /// The server writes its pid here; a later start uses it to stop a leftover server.
    pub pid_file: PathBuf,
    /// The server's output is appended here.
    pub log_file: PathBuf,
}

/// A running nats-server with JetStream, our child process. Stopped by [`Self::stop`] or
/// when dropped.
#[derive(Debug)]
pub struct EmbeddedNats {
    child: Option<Child>,
    port: u16,
    log: Log,
}

impl EmbeddedNats {
    /// Starts nats-server with JetStream and waits (up to 30 s) until it greets clients with
    /// JetStream enabled. A server left running on this store dir by an earlier run (named
    /// by the pid file) is stopped first.
    ///
    /// The server gets SIGTERM when the *thread* that called `start` exits (Linux's
    /// parent-death signal follows the thread), which also covers our process dying by
    /// SIGKILL. So call this from a thread that lives as long as the server should.
    pub fn start(options: NatsOptions) -> Result<Self> {
        let binary = existing(options.binary.clone()).and_then(|path| {
            fs::canonicalize(&path).map_err(|_| EmbeddedError::BinaryMissing { path })
        })?;
        let store_dir = process::canonical_dir(&options.store_dir)?;
        let pid_file = absolute_file(&options.pid_file)?;
        let log = Log::open(&options.log_file)?;

        stop_leftover_server(&pid_file, &store_dir);
        ensure_port_free(options.port, SERVICE)?;

        let (stdout, stderr) = log.stdio()?;
        let mut cmd = Command::new(&binary);
        cmd.arg("-js")
            .arg("-sd")
            .arg(&store_dir)
            .args(["-a", "127.0.0.1", "-p", &options.port.to_string()])
            .arg("-P")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        RunAs::Us.configure(&mut cmd, libc::SIGTERM);
        let child = cmd
            .spawn()
            .map_err(EmbeddedError::io(format!("start {}", binary.display())))?;
        tracing::info!(pid = child.id(), port = options.port, store_dir = %store_dir.display(), "started the NATS server");

        // From here on, Drop stops the server if waiting fails.
        let mut server = EmbeddedNats {
            child: Some(child),
            port: options.port,
            log,
        };
        server.wait_until_ready()?;
        Ok(server)
    }

    fn wait_until_ready(&mut self) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let Some(child) = self.child.as_mut() else {
            unreachable!("a server being started has its child")
        };
        let log = &self.log;
        let ready = poll(READY_DEADLINE, || {
            if let Some(status) = child
                .try_wait()
                .map_err(EmbeddedError::io("wait for the NATS server"))?
            {
                return Err(EmbeddedError::ExitedEarly {
                    service: SERVICE,
                    status,
                    log_file: log.path().to_owned(),
                    log_tail: log.tail(LOG_TAIL_LINES),
                });
            }
            Ok(server_info(addr).filter(|info| info.contains(r#""jetstream":true"#)))
        })?;
        match ready {
            Some(_) => Ok(()),
            None => Err(EmbeddedError::NotReady {
                service: SERVICE,
                after: READY_DEADLINE,
                log_file: self.log.path().to_owned(),
                log_tail: self.log.tail(LOG_TAIL_LINES),
            }),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, SIGKILL after 10 s. Does nothing once stopped.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = process::stop_child(&mut child, libc::SIGTERM, STOP_GRACE)?;
        tracing::info!(%status, port = self.port, "stopped the NATS server");
        Ok(())
    }
}

impl Drop for EmbeddedNats {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::warn!(error = %error, "could not stop the NATS server");
        }
    }
}

/// The first line a NATS server sends a new client (`INFO {...}`), if it sends one.
fn server_info(addr: SocketAddr) -> Option<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(250)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    line.starts_with("INFO ").then_some(line)
}

/// Stops a nats-server that an earlier run left running on `store_dir`. A pid file naming
/// anything else is ignored: nats-server overwrites it.
fn stop_leftover_server(pid_file: &Path, store_dir: &Path) {
    let Some(pid) = process::read_pid_file(pid_file) else {
        return;
    };
    if !process::is_running(pid) {
        return;
    }
    let args = process::cmdline(pid).unwrap_or_default();
    let is_nats = args
        .first()
        .and_then(|argv0| Path::new(argv0).file_name())
        .is_some_and(|name| name.to_string_lossy().starts_with("nats-server"));
    let on_this_store = args.iter().any(|arg| Path::new(arg) == store_dir);
    if is_nats && on_this_store {
        tracing::warn!(pid, store_dir = %store_dir.display(), "a NATS server left over from an earlier run still uses this store; stopping it");
        process::terminate(pid, libc::SIGTERM, STOP_GRACE);
    }
}

/// `path` with its directory created and resolved, since the server runs in `/`.
fn absolute_file(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| EmbeddedError::Io {
        what: format!("use {} as a file name", path.display()),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    Ok(process::canonical_dir(dir)?.join(name))
}
