//! Child processes: who they run as, when they die, their logs, and leftovers of a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::{EmbeddedError, Result, poll};

/// The system user PostgreSQL runs as when we are root.
pub(crate) const PG_USER: &str = "factory-pg";

/// Who a child process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunAs {
    /// Whoever we are.
    Us,
    /// A system user we switch to before exec, because we are root.
    User { uid: u32, gid: u32 },
}

impl RunAs {
    /// `factory-pg` (created if needed) when we are root, else ourselves.
    pub(crate) fn postgres() -> Result<Self> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(RunAs::Us);
        }
        if let Some(run_as) = lookup_user(PG_USER)? {
            return Ok(run_as);
        }
        let output = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_USER,
            ])
            .output()
            .map_err(|e| EmbeddedError::ServiceUser {
                user: PG_USER,
                detail: format!("running useradd: {e}"),
            })?;
        // Another test binary may have created it at the same moment; look again either way.
        match lookup_user(PG_USER)? {
            Some(run_as) => {
                tracing::info!(
                    user = PG_USER,
                    "created the system user that runs PostgreSQL"
                );
                Ok(run_as)
            }
            None => Err(EmbeddedError::ServiceUser {
                user: PG_USER,
                detail: format!(
                    "useradd failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            }),
        }
    }

    /// Gives `path` to this user (recursively, only when its top is not theirs already).
    pub(crate) fn take_ownership(self, path: &Path) -> Result<()> {
        let RunAs::User { uid, gid } = self else {
            return Ok(());
        };
        let meta = fs::symlink_metadata(path).map_err(EmbeddedError::io(format!(
            "read the metadata of {}",
            path.display()
        )))?;
        if meta.uid() == uid && meta.gid() == gid {
            return Ok(());
        }
        chown_recursive(path, uid, gid)
    }

    /// Makes the directory `dir` and every directory above it traversable by others (adds
    /// o+x where missing, changes nothing else), so that the service user can reach what is
    /// inside. Nothing to do when we run as ourselves.
    pub(crate) fn make_reachable(self, dir: &Path) -> Result<()> {
        if self == RunAs::Us {
            return Ok(());
        }
        for dir in dir.ancestors().filter(|dir| dir.is_dir()) {
            let meta = fs::metadata(dir).map_err(EmbeddedError::io(format!(
                "read the metadata of {}",
                dir.display()
            )))?;
            let mode = meta.permissions().mode();
            if mode & 0o001 == 0 {
                tracing::info!(dir = %dir.display(), "adding o+x so that {PG_USER} can traverse it");
                fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o001)).map_err(
                    EmbeddedError::io(format!("add o+x to {} for {PG_USER}", dir.display())),
                )?;
            }
        }
        Ok(())
    }

    /// Makes `cmd` run as this user and receive `death_signal` when the thread that spawns
    /// it exits (so it dies with us even on SIGKILL).
    pub(crate) fn configure(self, cmd: &mut Command, death_signal: libc::c_int) {
        let parent = std::process::id() as libc::pid_t;
        // The service user may not be able to enter our working directory.
        cmd.current_dir("/");
        let drop_to = match self {
            RunAs::Us => None,
            RunAs::User { uid, gid } => Some((uid as libc::uid_t, gid as libc::gid_t)),
        };
        // SAFETY: runs in the forked child before exec; it only makes async-signal-safe
        // system calls and builds errors from raw OS codes, without allocating.
        unsafe {
            cmd.pre_exec(move || {
                if let Some((uid, gid)) = drop_to
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                // After setuid: changing credentials clears the parent-death signal.
                if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl; then nobody would stop us.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
}

/// Parses `getent passwd NAME`; `None` when the user does not exist.
fn lookup_user(name: &str) -> Result<Option<RunAs>> {
    let output = Command::new("getent")
        .args(["passwd", name])
        .output()
        .map_err(|e| EmbeddedError::ServiceUser {
            user: PG_USER,
            detail: format!("running getent: {e}"),
        })?;
    if !output.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<&str> = line.trim().split(':').collect();
    match (
        fields.get(2).and_then(|f| f.parse().ok()),
        fields.get(3).and_then(|f| f.parse().ok()),
    ) {
        (Some(uid), Some(gid)) => Ok(Some(RunAs::User { uid, gid })),
        _ => Err(EmbeddedError::ServiceUser {
            user: PG_USER,
            detail: format!("cannot parse `getent passwd {name}`: {}", line.trim()),
        }),
    }
}

fn chown_recursive(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(EmbeddedError::io(format!(
        "give {} to {PG_USER}",
        path.display()
    )))?;
    let meta = fs::symlink_metadata(path).map_err(EmbeddedError::io(format!(
        "read the metadata of {}",
        path.display()
    )))?;
    if meta.is_dir() {
        let entries =
            fs::read_dir(path).map_err(EmbeddedError::io(format!("list {}", path.display())))?;
        for entry in entries {
            let entry = entry.map_err(EmbeddedError::io(format!("list {}", path.display())))?;
            chown_recursive(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub(crate) fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    let _ = unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Whether `pid` runs (a zombie does not: it has exited and only waits to be reaped).
pub(crate) fn is_running(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain any byte.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// The arguments `pid` was started with, if it runs.
pub(crate) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    )
}

/// The working directory of `pid`, if we may see it.
pub(crate) fn cwd(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// The pid written on the first line of a pid file, if any.
pub(crate) fn read_pid_file(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
        .filter(|pid| *pid > 0)
}

/// Ends a process that is not our child: `first` signal, up to `grace`, then SIGKILL.
pub(crate) fn terminate(pid: u32, first: libc::c_int, grace: Duration) {
    signal(pid, first);
    if poll(grace, || Ok((!is_running(pid)).then_some(())))
        .ok()
        .flatten()
        .is_none()
    {
        tracing::warn!(pid, ?grace, "process did not stop in time; killing it");
        signal(pid, libc::SIGKILL);
        let _ = poll(Duration::from_secs(5), || {
            Ok((!is_running(pid)).then_some(()))
        });
    }
}

/// Ends our child: `first` signal, up to `grace`, then SIGKILL; reaps it.
pub(crate) fn stop_child(
    child: &mut Child,
    first: libc::c_int,
    grace: Duration,
) -> Result<ExitStatus> {
    let pid = child.id();
    if let Some(status) = child
        .try_wait()
        .map_err(EmbeddedError::io(format!("wait for process {pid}")))?
    {
        return Ok(status);
    }
    signal(pid, first);
    let exited = poll(grace, || {
        child
            .try_wait()
            .map_err(EmbeddedError::io(format!("wait for process {pid}")))
    })?;
    match exited {
        Some(status) => Ok(status),
        None => {
            tracing::warn!(pid, ?grace, "server did not stop in time; killing it");
            // Already gone between the last look and now is fine: wait() reaps it either way.
            let _ = child.kill();
            child
                .wait()
                .map_err(EmbeddedError::io(format!("wait for process {pid}")))
        }
    }
}

/// A server's log file. Children write to it directly (we open it, so the service user
/// needs no rights on it); errors quote the lines written since we opened it.
#[derive(Debug, Clone)]
pub(crate) struct Log {
    path: PathBuf,
    start: u64,
}

impl Log {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(EmbeddedError::io(format!(
                "create the log directory {}",
                parent.display()
            )))?;
        }
        let file = append(path)?;
        let start = file
            .metadata()
            .map_err(EmbeddedError::io(format!(
                "read the metadata of {}",
                path.display()
            )))?
            .len();
        Ok(Log {
            path: path.to_owned(),
            start,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Standard output and error for a child, both appended to the log.
    pub(crate) fn stdio(&self) -> Result<(Stdio, Stdio)> {
        let out = append(&self.path)?;
        let err = out
            .try_clone()
            .map_err(EmbeddedError::io(format!("open {}", self.path.display())))?;
        Ok((Stdio::from(out), Stdio::from(err)))
    }

    /// The last `n` lines written since this log was opened (at most the last 64 KiB).
    pub(crate) fn tail(&self, n: usize) -> String {
        const MAX: u64 = 64 * 1024;
        let read = || -> std::io::Result<String> {
            let mut file = File::open(&self.path)?;
            let len = file.metadata()?.len();
            let from = self.start.max(len.saturating_sub(MAX)).min(len);
            file.seek(SeekFrom::Start(from))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        match read() {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(n)..].join("\n");
                if tail.trim().is_empty() {
                    "(the log is empty)".to_owned()
                } else {
                    tail
                }
            }
            Err(e) => format!("(could not read the log: {e})"),
        }
    }
}

fn append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(EmbeddedError::io(format!(
            "open the log file {}",
            path.display()
        )))
}

/// `dir` made absolute and free of symlinks, created first if missing, so that the paths we
/// pass to a server match what a later start finds in /proc for the same directory.
pub(crate) fn canonical_dir(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(EmbeddedError::io(format!("create {}", dir.display())))?;
    fs::canonicalize(dir).map_err(EmbeddedError::io(format!("resolve {}", dir.display())))
}
