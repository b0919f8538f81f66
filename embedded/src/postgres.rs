//! The embedded PostgreSQL: initdb on first start, then one postmaster as our child.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng;

use crate::process::{self, Log, RunAs};
use crate::{EmbeddedError, Result, ensure_port_free, existing, poll};

const SERVICE: &str = "PostgreSQL";
const READY_DEADLINE: Duration = Duration::from_secs(60);
const STALE_GRACE: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(15);
const LOG_TAIL_LINES: usize = 20;

/// Where and how to run the embedded PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The directory with `initdb`, `postgres` and `pg_isready` ([`crate::Venv::pg_bin_dir`]).
    pub bin_dir: PathBuf,
    /// PGDATA. Made with initdb when it holds no cluster yet, reused otherwise.
    pub data_dir: PathBuf,
    /// The TCP port on 127.0.0.1 (the server listens on nothing else, no Unix socket).
    pub port: u16,
    /// Holds the `postgres` superuser's password (mode 600). Written when the cluster is
    /// made, unless it already exists, in which case its password is used.
    pub superuser_password_file: PathBuf,
    /// More `-c name=value` settings, after ours (so they win).
    pub extra_settings: Vec<(String, String)>,
    /// initdb's and the server's output are appended here.
    pub log_file: PathBuf,
}

/// A running PostgreSQL, our child process. Stopped (fast shutdown) by [`Self::stop`] or
/// when dropped.
pub struct EmbeddedPostgres {
    child: Option<Child>,
    port: u16,
    password: String,
    data_dir: PathBuf,
    log: Log,
}

impl std::fmt::Debug for EmbeddedPostgres {
    // By hand, so the superuser password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedPostgres")
            .field("pid", &self.pid())
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("log_file", &self.log.path())
            .finish_non_exhaustive()
    }
}

impl EmbeddedPostgres {
    /// Makes the cluster if `data_dir` has none, starts the server and waits (up to 60 s)
    /// until it accepts connections.
    ///
    /// As root, initdb and the server run as the system user `factory-pg` (made if missing):
    /// the data dir is given to it, and the directories above the data dir and the binaries
    /// get o+x where they lack it.
    ///
    /// A postmaster left running on this data dir (a crash of whoever started it) is shut
    /// down first; a stale `postmaster.pid` of a dead one is left to PostgreSQL to clear.
    ///
    /// The server gets SIGINT (fast shutdown) when the *thread* that called `start` exits
    /// (Linux's parent-death signal follows the thread), which also covers our process
    /// dying by SIGKILL. So call this from a thread that lives as long as the server should,
    /// such as `main` or a thread made for it, not from a short-lived worker thread.
    pub fn start(options: PostgresOptions) -> Result<Self> {
        let bin_dir =
            fs::canonicalize(&options.bin_dir).map_err(|_| EmbeddedError::BinaryMissing {
                path: options.bin_dir.join("postgres"),
            })?;
        let initdb = existing(bin_dir.join("initdb"))?;
        let postgres = existing(bin_dir.join("postgres"))?;
        let pg_isready = existing(bin_dir.join("pg_isready"))?;

        let run_as = RunAs::postgres()?;
        let data_dir = process::canonical_dir(&options.data_dir)?;
        let parent = data_dir
            .parent()
            .ok_or_else(|| EmbeddedError::NotACluster {
                path: data_dir.clone(),
            })?;
        run_as.make_reachable(parent)?;
        run_as.make_reachable(&bin_dir)?;
        let log = Log::open(&options.log_file)?;

        stop_leftover_postmaster(&data_dir);
        ensure_port_free(options.port, SERVICE)?;

        let password = if data_dir.join("PG_VERSION").is_file() {
            run_as.take_ownership(&data_dir)?;
            read_password(&options.superuser_password_file, "is missing")?
        } else {
            let password = superuser_password(&options.superuser_password_file)?;
            initialize(&initdb, &data_dir, &password, run_as, &log)?;
            password
        };

        let mut cmd = Command::new(&postgres);
        cmd.arg("-D").arg(&data_dir);
        let settings = [
            ("listen_addresses", "127.0.0.1".to_owned()),
            ("port", options.port.to_string()),
            ("unix_socket_directories", String::new()),
            ("max_connections", "200".to_owned()),
        ];
        let extra = options
            .extra_settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()));
        for (name, value) in settings.into_iter().chain(extra) {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        let (stdout, stderr) = log.stdio()?;
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        run_as.configure(&mut cmd, libc::SIGINT);
        let child = cmd
            .spawn()
            .map_err(EmbeddedError::io(format!("start {}", postgres.display())))?;
        tracing::info!(pid = child.id(), port = options.port, data_dir = %data_dir.display(), "started PostgreSQL");

        // From here on, Drop stops the server if waiting fails.
        let mut server = EmbeddedPostgres {
            child: Some(child),
            port: options.port,
            password,
            data_dir,
            log,
        };
        server.wait_until_ready(&pg_isready)?;
        Ok(server)
    }

    fn wait_until_ready(&mut self, pg_isready: &Path) -> Result<()> {
        let port = self.port;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let Some(child) = self.child.as_mut() else {
            unreachable!("a server being started has its child")
        };
        let log = &self.log;
        let ready = poll(READY_DEADLINE, || {
            if let Some(status) = child
                .try_wait()
                .map_err(EmbeddedError::io("wait for PostgreSQL"))?
            {
                return Err(EmbeddedError::ExitedEarly {
                    service: SERVICE,
                    status,
                    log_file: log.path().to_owned(),
                    log_tail: log.tail(LOG_TAIL_LINES),
                });
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_err() {
                return Ok(None);
            }
            let accepting = Command::new(pg_isready)
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-t",
                    "2",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(EmbeddedError::io(format!("run {}", pg_isready.display())))?
                .success();
            Ok(accepting.then_some(()))
        })?;
        match ready {
            Some(()) => Ok(()),
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

    /// The password of the superuser `postgres`.
    pub fn superuser_password(&self) -> String {
        self.password.clone()
    }

    /// `postgres://postgres:<password>@127.0.0.1:<port>/<database>` (the password is
    /// alphanumeric, so it needs no escaping).
    pub fn superuser_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Fast shutdown (SIGINT), SIGKILL after 15 s. Does nothing once stopped.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = process::stop_child(&mut child, libc::SIGINT, STOP_GRACE)?;
        tracing::info!(%status, port = self.port, "stopped PostgreSQL");
        Ok(())
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::warn!(error = %error, "could not stop PostgreSQL");
        }
    }
}

/// Shuts down a postmaster that still runs on `data_dir` although whoever started it is
/// gone. A `postmaster.pid` naming a dead process is left to PostgreSQL, which clears it;
/// one naming a live process that is no postmaster of ours (its pid was reused) is removed,
/// since PostgreSQL could take that process for a rival postmaster.
fn stop_leftover_postmaster(data_dir: &Path) {
    let pid_file = data_dir.join("postmaster.pid");
    let Some(pid) = process::read_pid_file(&pid_file) else {
        return;
    };
    if !process::is_running(pid) {
        return;
    }
    let args = process::cmdline(pid).unwrap_or_default();
    let is_postgres = args
        .first()
        .and_then(|argv0| Path::new(argv0).file_name())
        .is_some_and(|name| name == "postgres");
    let on_this_dir = process::cwd(pid).is_some_and(|cwd| cwd == data_dir)
        || args
            .windows(2)
            .any(|w| w[0] == "-D" && Path::new(&w[1]) == data_dir);
    if is_postgres && on_this_dir {
        tracing::warn!(pid, data_dir = %data_dir.display(), "a PostgreSQL left over from an earlier run still uses this data dir; shutting it down");
        process::terminate(pid, libc::SIGINT, STALE_GRACE);
    } else {
        tracing::warn!(pid, pid_file = %pid_file.display(), "postmaster.pid names a process that is not PostgreSQL on this data dir; removing the stale file");
        let _ = fs::remove_file(&pid_file);
    }
}

/// The superuser password for a new cluster: the one in `path`, or a new one written there.
fn superuser_password(path: &Path) -> Result<String> {
    if path.exists() {
        return read_password(path, "is empty");
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(EmbeddedError::io(format!("create {}", dir.display())))?;
    }
    let password: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    write_secret(path, &password)?;
    Ok(password)
}

fn read_password(path: &Path, problem: &'static str) -> Result<String> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EmbeddedError::PasswordFile {
                path: path.to_owned(),
                problem,
            });
        }
        Err(source) => {
            return Err(EmbeddedError::Io {
                what: format!("read the superuser password file {}", path.display()),
                source,
            });
        }
    };
    let password = text.trim().to_owned();
    if password.is_empty() {
        return Err(EmbeddedError::PasswordFile {
            path: path.to_owned(),
            problem: "is empty",
        });
    }
    Ok(password)
}

/// Writes `secret` to a new file `path` that only its owner (us) may read.
fn write_secret(path: &Path, secret: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(EmbeddedError::io(format!("create {}", path.display())))?;
    file.write_all(secret.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(EmbeddedError::io(format!("write {}", path.display())))
}

/// Runs initdb in a sibling directory and renames it to `data_dir` once complete, so that an
/// interrupted initdb never leaves a half-made cluster where a later start would take it
/// for a real one.
fn initialize(
    initdb: &Path,
    data_dir: &Path,
    password: &str,
    run_as: RunAs,
    log: &Log,
) -> Result<()> {
    let not_empty = fs::read_dir(data_dir)
        .map_err(EmbeddedError::io(format!("list {}", data_dir.display())))?
        .next()
        .is_some();
    if not_empty {
        return Err(EmbeddedError::NotACluster {
            path: data_dir.to_owned(),
        });
    }
    let (Some(parent), Some(name)) = (data_dir.parent(), data_dir.file_name()) else {
        return Err(EmbeddedError::NotACluster {
            path: data_dir.to_owned(),
        });
    };
    let name = name.to_string_lossy();
    let staging = parent.join(format!(".{name}.initdb"));
    let pwfile = parent.join(format!(".{name}.pwfile"));

    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(EmbeddedError::io(format!(
            "remove the unfinished {}",
            staging.display()
        )))?;
    }
    let _ = fs::remove_file(&pwfile);
    fs::create_dir(&staging).map_err(EmbeddedError::io(format!("create {}", staging.display())))?;
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o700))
        .map_err(EmbeddedError::io(format!("restrict {}", staging.display())))?;
    run_as.take_ownership(&staging)?;
    write_secret(&pwfile, password)?;
    run_as.take_ownership(&pwfile)?;

    tracing::info!(data_dir = %data_dir.display(), "making a new PostgreSQL cluster");
    let (stdout, stderr) = log.stdio()?;
    let mut cmd = Command::new(initdb);
    cmd.arg("-D")
        .arg(&staging)
        .args(["-U", "postgres", "-E", "UTF8", "--locale=C"])
        .args(["--auth-host=scram-sha-256", "--auth-local=scram-sha-256"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .arg("--no-instructions")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    run_as.configure(&mut cmd, libc::SIGTERM);
    let status = cmd.status();
    let _ = fs::remove_file(&pwfile);
    let status = status.map_err(EmbeddedError::io(format!("run {}", initdb.display())))?;
    if !status.success() {
        let _ = fs::remove_dir_all(&staging);
        return Err(EmbeddedError::CommandFailed {
            what: format!("initdb of {}", data_dir.display()),
            status,
            log_file: log.path().to_owned(),
            log_tail: log.tail(LOG_TAIL_LINES),
        });
    }
    // rename(2) may replace an empty directory, which `data_dir` is.
    fs::rename(&staging, data_dir).map_err(EmbeddedError::io(format!(
        "move the new cluster from {} to {}",
        staging.display(),
        data_dir.display()
    )))
}
