//! The tools an operative may call while it works an objective, and the workspace they act in.
//!
//! Every objective runs in a [`Workspace`]: its own files, kept in the process's memory
//! ([`Workspace::in_memory`], the default) or in one directory on disk, plus the earlier
//! stages' artifacts served from memory as if they were its files ([`Workspace::with_inputs`];
//! a file written at an input's path shadows it). The model names files by
//! paths relative to it, and nothing a model writes can reach outside it: absolute paths,
//! `..`, Windows prefixes, NUL bytes and symbolic links are refused before the file system is
//! touched (see [`Workspace::resolve`]). Sizes are bounded ([`MAX_FILE_BYTES`],
//! [`MAX_LISTED_FILES`]) so one call cannot fill a disk or a context window.
//!
//! Tools are found by name in a [`ToolRegistry`]; a team may call the ones its `TOOLS.md`
//! grants ([`granted_tools`]). [`ToolRegistry::call`] never fails and never panics: every
//! refusal becomes a [`ToolOutcome`] whose text starts with `error: ` and tells the model
//! what to do instead, since that text goes straight back to it.
//!
//! To add a tool: implement [`Tool`], [`ToolRegistry::register`] it, and name it in the
//! `tools:` line of the teams that may use it.

use crate::model::{ToolCall, ToolSpec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// The largest file `write_file` writes and `read_file` reads, in bytes (1 MiB).
pub const MAX_FILE_BYTES: usize = 1024 * 1024;
/// The most files one `list_files` call returns.
pub const MAX_LISTED_FILES: usize = 1000;
/// The longest path a model may give, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// The longest file or directory name in a path, in bytes (as file systems allow).
pub const MAX_NAME_BYTES: usize = 255;
/// Where `record_decision` appends, relative to the workspace root.
pub const DECISIONS_PATH: &str = "docs/decisions.md";
/// The longest decision title, in characters (it becomes a markdown heading).
pub const MAX_TITLE_CHARS: usize = 200;

// ---------------------------------------------------------------------------------------------
// The workspace and its confinement
// ---------------------------------------------------------------------------------------------

/// The working directory of one objective. All paths given to it are relative to its root.
///
/// Its own files are kept in a directory on disk ([`Workspace::new`]) or in the process's
/// memory ([`Workspace::in_memory`]); the tools answer the same either way.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
    /// In memory: the files written, by normalised relative path (`None`: on disk, under
    /// `root`).
    own: Option<std::sync::Arc<std::sync::Mutex<BTreeMap<String, String>>>>,
    /// Read-only files by normalised relative path (the earlier stages' artifacts), read and
    /// listed like the directory's own until a file is written at the same path. Kept in
    /// memory: writing every earlier artifact into every attempt's directory, and deleting
    /// it after, was a quarter of a worker's CPU under load.
    inputs: std::sync::Arc<BTreeMap<String, String>>,
}

/// Where the workspaces of attempts keep their own files: in the process's memory (the
/// default), or in a folder each under a directory. A workspace lives for one attempt, and
/// what a team produced is kept as artifacts in PostgreSQL either way; in memory, no file is
/// created, checked, read back or removed (on a disk, that churn was a fifth of a worker's
/// CPU under load; on tmpfs, still about a tenth).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scratch {
    #[default]
    Memory,
    Dir(PathBuf),
}

impl From<PathBuf> for Scratch {
    fn from(dir: PathBuf) -> Scratch {
        Scratch::Dir(dir)
    }
}

impl Scratch {
    /// A fresh workspace named `name` (its folder's name, under a directory) with `inputs`
    /// (see [`Workspace::with_inputs`]).
    pub fn workspace(&self, name: &str, inputs: BTreeMap<String, String>) -> io::Result<Workspace> {
        match self {
            Scratch::Memory => Ok(Workspace::in_memory(inputs)),
            Scratch::Dir(dir) => Workspace::with_inputs(dir.join(name), inputs),
        }
    }
}

/// Why a path given by a model is refused. Each message says what to give instead.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error(
        "the path is empty; give a path relative to the workspace root, such as `docs/notes.md`"
    )]
    Empty,
    #[error("the path {0:?} is longer than {MAX_PATH_BYTES} bytes; use a shorter path")]
    TooLong(String),
    #[error(
        "the path has a file or directory name longer than {MAX_NAME_BYTES} bytes ({0:?}); use a shorter name"
    )]
    NameTooLong(String),
    #[error(
        "the path {0:?} contains a NUL byte; give a plain relative path, such as `docs/notes.md`"
    )]
    Nul(String),
    #[error(
        "the path {0:?} has a Windows drive, UNC prefix or backslash; use forward slashes and a \
         path relative to the workspace root, such as `src/main.rs`"
    )]
    Windows(String),
    #[error(
        "the path {0:?} is absolute; give a path relative to the workspace root, such as \
         `src/main.rs` rather than `/src/main.rs`"
    )]
    Absolute(String),
    #[error(
        "the path {0:?} contains `..`, which could leave the workspace; give the path relative to \
         the workspace root without `..`, such as `docs/api.md`"
    )]
    Parent(String),
    #[error(
        "the path {path:?} goes through `{link}`, a symbolic link; links are not followed, so \
         use a path to a real file or directory of the workspace"
    )]
    Symlink { path: String, link: String },
    #[error(
        "the path {path:?} goes through `{file}`, which is a file, not a directory; choose another path"
    )]
    NotADirectory { path: String, file: String },
    #[error("the path {path:?} could not be checked")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A path that passed confinement: where it is on disk, and its normalised relative form.
struct Confined {
    abs: PathBuf,
    /// `a/b/c`, without `.` or empty components; empty for the root itself.
    rel: String,
    parts: Vec<String>,
}

impl Confined {
    fn shown(&self) -> String {
        if self.rel.is_empty() {
            ".".to_string()
        } else {
            self.rel.clone()
        }
    }
}

impl Workspace {
    /// Opens the workspace at `root`, creating the directory if needed. The root is made
    /// absolute and canonical once here, so that every resolved path starts with it.
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Workspace> {
        Self::with_inputs(root, BTreeMap::new())
    }

    /// Like [`Workspace::new`], with `inputs` (path -> text) readable and listed as files of
    /// the workspace until written over. Paths that a model could not give (absolute, `..`,
    /// ...) are dropped, as are inputs above [`MAX_FILE_BYTES`] or with a NUL byte; `./a//b`
    /// is kept as `a/b`.
    pub fn with_inputs(root: impl Into<PathBuf>, inputs: BTreeMap<String, String>) -> io::Result<Workspace> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        Ok(Workspace {
            root: fs::canonicalize(&root)?,
            own: None,
            inputs: std::sync::Arc::new(checked_inputs(inputs)),
        })
    }

    /// A workspace whose own files live in this process's memory, with `inputs` as for
    /// [`Workspace::with_inputs`]. Nothing touches the file system: there are no links to
    /// follow, and confinement is the path check alone. Dropping it (every clone) removes it.
    pub fn in_memory(inputs: BTreeMap<String, String>) -> Workspace {
        Workspace {
            root: PathBuf::new(),
            own: Some(std::sync::Arc::default()),
            inputs: std::sync::Arc::new(checked_inputs(inputs)),
        }
    }

    /// The files written, when in memory (locked).
    fn own(&self) -> Option<std::sync::MutexGuard<'_, BTreeMap<String, String>>> {
        // A panic under the lock (caught by the registry) leaves whole strings behind.
        self.own.as_ref().map(|own| own.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The input at a normalised path, if there is one.
    fn input(&self, rel: &str) -> Option<&String> {
        self.inputs.get(rel)
    }

    /// The inputs below a normalised directory path (all of them for the root).
    fn inputs_under<'a>(&'a self, rel: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        let prefix = if rel.is_empty() { String::new() } else { format!("{rel}/") };
        self.inputs.range(prefix.clone()..).map(|(path, _)| path).take_while(move |path| path.starts_with(&prefix))
    }

    /// Refuses a path that the inputs make impossible: one below an input file (a file is
    /// not a directory), or one that is a directory of inputs.
    fn check_against_inputs(&self, target: &Confined) -> Result<(), ToolError> {
        for i in 1..target.parts.len() {
            let above = target.parts[..i].join("/");
            if self.inputs.contains_key(&above) {
                return Err(PathError::NotADirectory { path: target.rel.clone(), file: above }.into());
            }
        }
        if self.inputs_under(&target.rel).next().is_some() {
            return Err(ToolError::IsDirectory { path: target.rel.clone() });
        }
        Ok(())
    }

    /// The bytes of the file at `path`: the directory's own, else an input's. `None` when
    /// neither exists or the path is refused.
    pub fn content(&self, path: &str) -> Option<Vec<u8>> {
        let target = self.confine(path).ok()?;
        if let Some(own) = self.own() {
            return own.get(&target.rel).or_else(|| self.input(&target.rel)).map(|text| text.clone().into_bytes());
        }
        match fs::symlink_metadata(&target.abs) {
            Ok(meta) if meta.is_file() => fs::read(&target.abs).ok(),
            Ok(_) => None,
            Err(_) => self.input(&target.rel).map(|text| text.clone().into_bytes()),
        }
    }

    /// The directory on disk; empty for a workspace in memory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether its own files are kept in memory ([`Workspace::in_memory`]).
    pub fn is_in_memory(&self) -> bool {
        self.own.is_some()
    }

    /// The absolute path of `path`, a path relative to the root, if it stays inside the root
    /// (for a workspace in memory, which has no root on disk: the normalised relative path).
    ///
    /// Refused: an empty path, a NUL byte, a backslash or a drive prefix (`C:`), an absolute
    /// path, any `..` component, and any existing component that is a symbolic link (even one
    /// pointing inside: links are never followed, so what is checked is what is opened).
    /// `.` and empty components are dropped, so `./a//b` is `a/b`; `.` alone is the root.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, PathError> {
        self.confine(path).map(|c| c.abs)
    }

    fn confine(&self, path: &str) -> Result<Confined, PathError> {
        let parts = normalise(path)?;
        if let Some(own) = self.own() {
            // Nothing below a file written: as on disk, where a file is not a directory.
            // (Inputs are not files there: writes check them, reads find nothing below.)
            file_above(&own, &parts, path)?;
            let rel = parts.join("/");
            return Ok(Confined { abs: PathBuf::from(&rel), rel, parts });
        }
        let mut abs = self.root.clone();
        for (i, part) in parts.iter().enumerate() {

            abs.push(part);
            match fs::symlink_metadata(&abs) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(PathError::Symlink {
                        path: path.to_string(),
                        link: parts[..=i].join("/"),
                    });
                }
                Ok(meta) if i + 1 < parts.len() && !meta.is_dir() => {
                    return Err(PathError::NotADirectory {
                        path: path.to_string(),
                        file: parts[..=i].join("/"),
                    });
                }
                Ok(_) => {}
                // Nothing below a missing component exists, so nothing below can be a link.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    for rest in &parts[i + 1..] {
                        abs.push(rest);
                    }
                    break;
                }
                Err(source) => {
                    return Err(PathError::Io {
                        path: path.to_string(),
                        source,
                    });
                }
            }
        }
        Ok(Confined {
            abs,
            rel: parts.join("/"),
            parts,
        })
    }

    /// Creates the parent directories of `target` one by one, inside the root, refusing any
    /// that turned into a link or a file since [`Workspace::confine`] looked.
    fn create_parents(&self, target: &Confined) -> Result<(), ToolError> {
        let mut dir = self.root.clone();
        let parents = target.parts.len().saturating_sub(1);
        for (i, part) in target.parts[..parents].iter().enumerate() {
            dir.push(part);
            let shown = target.parts[..=i].join("/");
            match fs::symlink_metadata(&dir) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(PathError::Symlink {
                        path: target.rel.clone(),
                        link: shown,
                    }
                    .into());
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(PathError::NotADirectory {
                        path: target.rel.clone(),
                        file: shown,
                    }
                    .into());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // `create_dir`, not `create_dir_all`: one level at a time, each checked.
                    match fs::create_dir(&dir) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(source) => {
                            return Err(ToolError::io("create the directory", shown, source));
                        }
                    }
                }
                Err(source) => return Err(ToolError::io("check the directory", shown, source)),
            }
        }
        Ok(())
    }

    /// A confined path that must name a file, not the root.
    fn confine_file(&self, path: &str) -> Result<Confined, ToolError> {
        let target = self.confine(path)?;
        if target.parts.is_empty() {
            return Err(ToolError::IsDirectory {
                path: ".".to_string(),
            });
        }
        Ok(target)
    }

    /// Creates or overwrites the text file at `path`; returns its normalised relative path.
    pub fn write_file(&self, path: &str, content: &str) -> Result<String, ToolError> {
        let target = self.confine_file(path)?;
        self.check_against_inputs(&target)?;
        if content.len() > MAX_FILE_BYTES {
            return Err(ToolError::ContentTooLarge {
                path: target.rel,
                bytes: content.len(),
            });
        }
        if let Some(mut own) = self.own() {
            // Checked again under the lock that the insert holds: a clone may have written.
            file_above(&own, &target.parts, path)?;
            if is_dir_in(&own, &self.inputs, &target.rel) {
                return Err(ToolError::IsDirectory { path: target.rel });
            }
            own.insert(target.rel.clone(), content.to_string());
            return Ok(target.rel);
        }
        self.create_parents(&target)?;
        match fs::symlink_metadata(&target.abs) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(PathError::Symlink {
                    link: target.rel.clone(),
                    path: target.rel,
                }
                .into());
            }
            Ok(meta) if meta.is_dir() => return Err(ToolError::IsDirectory { path: target.rel }),
            Ok(meta) if !meta.is_file() => return Err(ToolError::NotAFile { path: target.rel }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(ToolError::io("check", target.rel, source)),
        }
        fs::write(&target.abs, content)
            .map_err(|source| ToolError::io("write", target.rel.clone(), source))?;
        Ok(target.rel)
    }

    /// The content of the UTF-8 text file at `path`.
    pub fn read_file(&self, path: &str) -> Result<String, ToolError> {
        let target = self.confine_file(path)?;
        if let Some(own) = self.own() {
            return match own.get(&target.rel).or_else(|| self.input(&target.rel)) {
                // Written within the limit (inputs were checked when the workspace was made).
                Some(text) if text.contains('\0') => Err(ToolError::NotText { path: target.rel }),
                Some(text) => Ok(text.clone()),
                None if is_dir_in(&own, &self.inputs, &target.rel) => Err(ToolError::IsDirectory { path: target.rel }),
                None => Err(ToolError::NotFound { path: target.rel }),
            };
        }
        let meta = match fs::symlink_metadata(&target.abs) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(text) = self.input(&target.rel) {
                    // Inputs were checked for size and text when the workspace was made.
                    return Ok(text.clone());
                }
                if self.inputs_under(&target.rel).next().is_some() {
                    return Err(ToolError::IsDirectory { path: target.rel });
                }
                return Err(ToolError::NotFound { path: target.rel });
            }
            Err(source) => return Err(ToolError::io("check", target.rel, source)),
        };
        if meta.is_dir() {
            return Err(ToolError::IsDirectory { path: target.rel });
        }
        if !meta.is_file() {
            return Err(ToolError::NotAFile { path: target.rel });
        }
        if meta.len() > MAX_FILE_BYTES as u64 {
            return Err(ToolError::FileTooLarge {
                path: target.rel,
                bytes: meta.len(),
            });
        }
        let file = fs::File::open(&target.abs)
            .map_err(|source| ToolError::io("open", target.rel.clone(), source))?;
        // Read one byte past the limit, in case the file grew since it was measured.
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_FILE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| ToolError::io("read", target.rel.clone(), source))?;
        if bytes.len() > MAX_FILE_BYTES {
            return Err(ToolError::FileTooLarge {
                path: target.rel,
                bytes: bytes.len() as u64,
            });
        }
        match String::from_utf8(bytes) {
            // NUL is valid UTF-8 but never appears in text a model should be handed.
            Ok(text) if !text.contains('\0') => Ok(text),
            _ => Err(ToolError::NotText { path: target.rel }),
        }
    }

    /// The files under `dir` (the root when `None`, `""` or `"."`), recursively, as paths
    /// relative to the workspace root, sorted. Symbolic links are neither listed nor followed.
    pub fn list_files(&self, dir: Option<&str>) -> Result<Vec<String>, ToolError> {
        let target = match dir {
            None | Some("") => self.confine(".")?,
            Some(dir) => self.confine(dir)?,
        };
        // The inputs below it, then the directory's own files (a file written at an input's
        // path is the same file, listed once).
        let mut files: std::collections::BTreeSet<String> = self.inputs_under(&target.rel).cloned().collect();
        if let Some(own) = self.own() {
            if !target.rel.is_empty() && (own.contains_key(&target.rel) || self.input(&target.rel).is_some()) {
                return Err(ToolError::NotADirectory { path: target.shown() });
            }
            let prefix = if target.rel.is_empty() { String::new() } else { format!("{}/", target.rel) };
            files.extend(own.range(prefix.clone()..).map(|(path, _)| path).take_while(|path| path.starts_with(&prefix)).cloned());
            if files.is_empty() && !target.rel.is_empty() {
                return Err(ToolError::NoDirectory { path: target.shown() });
            }
            if files.len() > MAX_LISTED_FILES {
                return Err(ToolError::TooManyFiles { path: target.shown() });
            }
            return Ok(files.into_iter().collect());
        }
        let on_disk = match fs::symlink_metadata(&target.abs) {
            Ok(meta) if meta.is_dir() => true,
            Ok(_) => {
                return Err(ToolError::NotADirectory {
                    path: target.shown(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !target.rel.is_empty() && self.input(&target.rel).is_some() {
                    return Err(ToolError::NotADirectory { path: target.shown() });
                }
                if files.is_empty() {
                    return Err(ToolError::NoDirectory {
                        path: target.shown(),
                    });
                }
                false
            }
            Err(source) => return Err(ToolError::io("check", target.shown(), source)),
        };
        if files.len() > MAX_LISTED_FILES {
            return Err(ToolError::TooManyFiles { path: target.shown() });
        }
        let mut pending = if on_disk { vec![(target.abs.clone(), target.rel.clone())] } else { vec![] };
        while let Some((abs, rel)) = pending.pop() {
            let shown = if rel.is_empty() {
                ".".to_string()
            } else {
                rel.clone()
            };
            let entries = fs::read_dir(&abs)
                .map_err(|source| ToolError::io("list", shown.clone(), source))?;
            for entry in entries {
                let entry = entry.map_err(|source| ToolError::io("list", shown.clone(), source))?;
                // `DirEntry::file_type` does not follow links.
                let kind = entry
                    .file_type()
                    .map_err(|source| ToolError::io("list", shown.clone(), source))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let child = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                if kind.is_dir() {
                    pending.push((entry.path(), child));
                } else if kind.is_file() {
                    files.insert(child);
                    if files.len() > MAX_LISTED_FILES {
                        return Err(ToolError::TooManyFiles {
                            path: target.shown(),
                        });
                    }
                }
            }
        }
        Ok(files.into_iter().collect())
    }

    /// Appends `decision` as a markdown section to [`DECISIONS_PATH`], creating it with a
    /// heading the first time.
    pub fn record_decision(&self, decision: &Decision) -> Result<(), ToolError> {
        let target = self.confine_file(DECISIONS_PATH)?;
        self.check_against_inputs(&target)?;
        if let Some(mut own) = self.own() {
            file_above(&own, &target.parts, DECISIONS_PATH)?;
            if is_dir_in(&own, &self.inputs, &target.rel) {
                return Err(ToolError::NotAFile { path: target.rel });
            }
            let existing = own.get(&target.rel).map_or(0, String::len) as u64;
            // As on disk: an earlier stage's decisions are carried only into a new file.
            let carried = if own.contains_key(&target.rel) { "" } else { self.input(&target.rel).map_or("", String::as_str) };
            let section = decision_section(decision, carried, existing);
            if existing + section.len() as u64 > MAX_FILE_BYTES as u64 {
                return Err(ToolError::DecisionsFull { path: target.rel });
            }
            own.entry(target.rel).or_default().push_str(&section);
            return Ok(());
        }
        // An earlier stage's decisions (an input) are carried on: copied, then appended to.
        let mut carried = "";
        let existing = match fs::symlink_metadata(&target.abs) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(PathError::Symlink {
                    link: target.rel.clone(),
                    path: target.rel,
                }
                .into());
            }
            Ok(meta) if meta.is_file() => meta.len(),
            Ok(_) => return Err(ToolError::NotAFile { path: target.rel }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                carried = self.input(&target.rel).map_or("", String::as_str);
                0
            }
            Err(source) => return Err(ToolError::io("check", target.rel, source)),
        };
        let section = decision_section(decision, carried, existing);
        if existing + section.len() as u64 > MAX_FILE_BYTES as u64 {
            return Err(ToolError::DecisionsFull { path: target.rel });
        }
        // Only once it is sure to be written: a refused decision leaves no folder behind.
        self.create_parents(&target)?;
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&target.abs)
            .map_err(|source| ToolError::io("open", target.rel.clone(), source))?;
        file.write_all(section.as_bytes())
            .map_err(|source| ToolError::io("append to", target.rel.clone(), source))?;
        Ok(())
    }
}

/// The components of a path a model gave, checked without the file system: refused when
/// empty, too long, with a NUL byte, a backslash or a drive prefix, absolute, or with `..`;
/// `.` and empty components dropped (none left: the root).
fn normalise(path: &str) -> Result<Vec<String>, PathError> {
    if path.is_empty() {
            return Err(PathError::Empty);
        }
        if path.len() > MAX_PATH_BYTES {
            let shown: String = path.chars().take(40).collect();
            return Err(PathError::TooLong(format!("{shown}...")));
        }
        if path.contains('\0') {
            return Err(PathError::Nul(path.to_string()));
        }
        // On Unix a backslash is an ordinary character, but a model writing one means a
        // Windows path (`src\main.rs`, `\\server\share`), which would land somewhere it did
        // not mean; refuse it rather than guess.
        if path.contains('\\') || has_drive_prefix(path) {
            return Err(PathError::Windows(path.to_string()));
        }
        let mut parts = Vec::new();
        for component in Path::new(path).components() {
            match component {
                Component::Normal(name) => match name.to_str() {
                    // Longer names cannot be files on disk, nor exported with `run artifacts`.
                    Some(name) if name.len() > MAX_NAME_BYTES => {
                        let shown: String = name.chars().take(40).collect();
                        return Err(PathError::NameTooLong(format!("{shown}...")));
                    }
                    Some(name) => parts.push(name.to_string()),
                    // Unreachable: `path` is a `&str`, so its components are UTF-8.
                    None => return Err(PathError::Nul(path.to_string())),
                },
                Component::CurDir => {}
                Component::ParentDir => return Err(PathError::Parent(path.to_string())),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(PathError::Absolute(path.to_string()));
                }
            }
        }
    Ok(parts)
}

/// `C:`, `c:foo`: a Windows drive, which on Unix would silently become a directory named `C:`.
fn has_drive_prefix(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':'
}

// ---------------------------------------------------------------------------------------------
// Outcomes and errors
// ---------------------------------------------------------------------------------------------

/// An architecture or product decision an operative recorded with `record_decision`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub title: String,
    pub decision: String,
    pub rationale: String,
}

/// What a tool call produced: the text for the model, and what the caller should record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolOutcome {
    /// Goes back to the model as the tool's result. Starts with `error: ` on a refusal.
    pub output: String,
    /// The workspace-relative path the call wrote, if it wrote one.
    pub written: Option<String>,
    /// The decision recorded, so the caller can emit it as an event.
    pub decision: Option<Decision>,
}

impl ToolOutcome {
    /// A successful call that only answers with text.
    pub fn text(output: impl Into<String>) -> ToolOutcome {
        ToolOutcome {
            output: output.into(),
            written: None,
            decision: None,
        }
    }

    /// A refusal: `error: ` then the error and its sources, joined by `: `.
    pub fn error(error: &(dyn std::error::Error + 'static)) -> ToolOutcome {
        let mut output = format!("error: {error}");
        let mut source = error.source();
        while let Some(cause) = source {
            output.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        ToolOutcome::text(output)
    }

    /// Whether the call was refused. Read from the output's `error: ` prefix, so a
    /// `read_file` of a file whose text starts with `error: ` also reads as one; the model
    /// sees the same text either way.
    pub fn is_error(&self) -> bool {
        self.output.starts_with("error: ")
    }
}

/// Why a tool call was refused. Each message says what the model should do instead.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("the tool `{tool}` is not granted to this team; use one of: {granted}")]
    NotGranted { tool: String, granted: String },
    #[error("there is no tool named `{tool}`; use one of: {granted}")]
    Unknown { tool: String, granted: String },
    #[error("bad arguments for `{tool}`: {problem}; call it with {usage}")]
    BadArguments {
        tool: String,
        problem: String,
        usage: &'static str,
    },
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(
        "the content for `{path}` is {bytes} bytes, over the limit of {MAX_FILE_BYTES} bytes per \
         file; split it into several smaller files"
    )]
    ContentTooLarge { path: String, bytes: usize },
    #[error(
        "`{path}` is {bytes} bytes, over the limit of {MAX_FILE_BYTES} bytes that read_file reads; it cannot be read whole"
    )]
    FileTooLarge { path: String, bytes: u64 },
    #[error("there is no file at `{path}`; call list_files to see what the workspace holds")]
    NotFound { path: String },
    #[error(
        "there is no directory at `{path}`; call list_files without a path to see what the workspace holds"
    )]
    NoDirectory { path: String },
    #[error(
        "`{path}` is a directory, not a file; call list_files with it to see its files, or give a file path"
    )]
    IsDirectory { path: String },
    #[error(
        "`{path}` is a file, not a directory; call read_file to read it, or list its directory"
    )]
    NotADirectory { path: String },
    #[error("`{path}` is not a regular file; choose another path")]
    NotAFile { path: String },
    #[error("`{path}` is binary, not UTF-8 text; read_file reads text files only")]
    NotText { path: String },
    #[error(
        "there are more than {MAX_LISTED_FILES} files under `{path}`; call list_files with a subdirectory"
    )]
    TooManyFiles { path: String },
    #[error(
        "`{path}` would grow past {MAX_FILE_BYTES} bytes; record only the decisions that matter, \
         or write longer ones to their own file with write_file"
    )]
    DecisionsFull { path: String },
    #[error("could not {action} `{path}`")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the tool `{tool}` failed unexpectedly; continue without it or try again once")]
    Panicked { tool: String },
}

impl ToolError {
    fn io(action: &'static str, path: String, source: io::Error) -> ToolError {
        ToolError::Io {
            action,
            path,
            source,
        }
    }
}

/// What goes to the end of the decisions file (`existing` bytes long): the decisions carried
/// from an earlier stage first, if any, else a heading for a new file; then the section.
fn decision_section(decision: &Decision, carried: &str, existing: u64) -> String {
    let mut section = carried.to_string();
    if existing == 0 && carried.is_empty() {
        section.push_str("# Decisions\n\n");
    }
    section.push_str(&format!(
        "## {}\n\n**Decision:** {}\n\n**Rationale:** {}\n\n",
        decision.title, decision.decision, decision.rationale
    ));
    section
}

/// Inputs a model could name and `read_file` could read: others (too large, not text, a
/// path refused) are dropped; `./a//b` is kept as `a/b`.
fn checked_inputs(inputs: BTreeMap<String, String>) -> BTreeMap<String, String> {
    inputs
        .into_iter()
        .filter(|(_, text)| text.len() <= MAX_FILE_BYTES && !text.contains('\0'))
        .filter_map(|(path, text)| match normalise(&path) {
            Ok(parts) if !parts.is_empty() => Some((parts.join("/"), text)),
            _ => None,
        })
        .collect()
}

/// In memory: refused when a file written is at a directory of `parts` (`path` as given).
fn file_above(own: &BTreeMap<String, String>, parts: &[String], path: &str) -> Result<(), PathError> {
    for i in 1..parts.len() {
        let above = parts[..i].join("/");
        if own.contains_key(&above) {
            return Err(PathError::NotADirectory { path: path.to_string(), file: above });
        }
    }
    Ok(())
}

/// In memory: whether `rel` is a directory (the root, or above a file written or given).
fn is_dir_in(own: &BTreeMap<String, String>, inputs: &BTreeMap<String, String>, rel: &str) -> bool {
    if rel.is_empty() {
        return true;
    }
    let prefix = format!("{rel}/");
    let under = |files: &BTreeMap<String, String>| files.range(prefix.clone()..).next().is_some_and(|(path, _)| path.starts_with(&prefix));
    under(own) || under(inputs)
}

// ---------------------------------------------------------------------------------------------
// Tools and the registry
// ---------------------------------------------------------------------------------------------

/// A tool an operative may call, found by its name.
pub trait Tool: Send + Sync {
    /// The name the model calls and `TOOLS.md` grants, such as `read_file`.
    fn name(&self) -> &str;
    /// The name, a description for the model, and the JSON Schema of the arguments.
    fn spec(&self) -> ToolSpec;
    /// Runs the call in `workspace`. A refusal is an `Err`; the registry turns it into text.
    fn call(&self, workspace: &Workspace, arguments: &Value) -> Result<ToolOutcome, ToolError>;
}

/// The tools the Factory knows, by name.
#[derive(Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Box<dyn Tool>>,
}

impl fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolRegistry")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ToolRegistry {
    /// A registry with no tools.
    pub fn new() -> ToolRegistry {
        ToolRegistry::default()
    }

    /// `write_file`, `read_file`, `list_files` and `record_decision`.
    pub fn standard() -> ToolRegistry {
        let mut registry = ToolRegistry::new();
        registry.register(WriteFile);
        registry.register(ReadFile);
        registry.register(ListFiles);
        registry.register(RecordDecision);
        registry
    }

    /// Adds `tool` under its name, replacing any tool of the same name.
    pub fn register(&mut self, tool: impl Tool + 'static) {
        self.tools.insert(tool.name().to_string(), Box::new(tool));
    }

    /// The names of the tools, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    /// The specs of the `granted` tools this registry has, in the order granted, each once.
    pub fn specs_for(&self, granted: &[String]) -> Vec<ToolSpec> {
        let mut specs: Vec<ToolSpec> = Vec::new();
        for name in granted {
            if let Some(tool) = self.tools.get(name)
                && !specs.iter().any(|s| &s.name == name)
            {
                specs.push(tool.spec());
            }
        }
        specs
    }

    /// Runs `call` in `workspace` if the team was granted its tool. Never panics: a refusal,
    /// or a tool that panics, comes back as an outcome whose output starts with `error: `.
    pub fn call(&self, workspace: &Workspace, granted: &[String], call: &ToolCall) -> ToolOutcome {
        match self.try_call(workspace, granted, call) {
            Ok(outcome) => outcome,
            Err(error) => ToolOutcome::error(&error),
        }
    }

    fn try_call(
        &self,
        workspace: &Workspace,
        granted: &[String],
        call: &ToolCall,
    ) -> Result<ToolOutcome, ToolError> {
        let usable: Vec<&str> = granted
            .iter()
            .map(String::as_str)
            .filter(|name| self.contains(name))
            .collect();
        let usable = if usable.is_empty() {
            "(none)".to_string()
        } else {
            usable.join(", ")
        };
        let tool = match self.tools.get(&call.name) {
            Some(tool) if granted.contains(&call.name) => tool,
            Some(_) => {
                return Err(ToolError::NotGranted {
                    tool: call.name.clone(),
                    granted: usable,
                });
            }
            None => {
                return Err(ToolError::Unknown {
                    tool: call.name.clone(),
                    granted: usable,
                });
            }
        };
        // A tool added later might panic; the operative loop must still get an answer.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tool.call(workspace, &call.arguments)
        }))
        .unwrap_or_else(|_| {
            Err(ToolError::Panicked {
                tool: call.name.clone(),
            })
        })
    }
}

/// Reads a tool's arguments. Some providers send them as a JSON string, and some send
/// nothing for a tool without required arguments; both are accepted.
fn arguments<T: DeserializeOwned>(
    tool: &str,
    usage: &'static str,
    arguments: &Value,
) -> Result<T, ToolError> {
    let bad = |problem: String| ToolError::BadArguments {
        tool: tool.to_string(),
        problem,
        usage,
    };
    let parsed;
    let value = match arguments {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| bad(format!("the arguments are a string that is not JSON ({e})")))?;
            &parsed
        }
        Value::Null => {
            parsed = json!({});
            &parsed
        }
        other => other,
    };
    if !value.is_object() {
        return Err(bad("the arguments must be a JSON object".to_string()));
    }
    T::deserialize(value).map_err(|e| bad(e.to_string()))
}

fn spec(name: &str, description: &str, properties: Value, required: &[&str]) -> ToolSpec {
    ToolSpec {
        name: name.to_string(),
        description: description.to_string(),
        parameters: json!({
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": false,
        }),
    }
}

const PATH_RULE: &str =
    "relative to the workspace root, with forward slashes; no `..`, no absolute path";

/// `write_file {path, content}`: creates or overwrites a text file.
#[derive(Debug, Clone, Copy)]
pub struct WriteFile;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteFileArgs {
    path: String,
    content: String,
}

impl Tool for WriteFile {
    fn name(&self) -> &str {
        "write_file"
    }

    fn spec(&self) -> ToolSpec {
        spec(
            self.name(),
            "Create or overwrite a UTF-8 text file in the workspace, creating its parent directories. \
             At most 1 MiB per file.",
            json!({
                "path": { "type": "string", "description": format!("The file to write, {PATH_RULE}.") },
                "content": { "type": "string", "description": "The whole new content of the file." },
            }),
            &["path", "content"],
        )
    }

    fn call(&self, workspace: &Workspace, args: &Value) -> Result<ToolOutcome, ToolError> {
        let args: WriteFileArgs =
            arguments(self.name(), r#"{"path": string, "content": string}"#, args)?;
        let path = workspace.write_file(&args.path, &args.content)?;
        Ok(ToolOutcome {
            output: format!("wrote {} bytes to {path}", args.content.len()),
            written: Some(path),
            decision: None,
        })
    }
}

/// `read_file {path}`: the content of a text file.
#[derive(Debug, Clone, Copy)]
pub struct ReadFile;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadFileArgs {
    path: String,
}

impl Tool for ReadFile {
    fn name(&self) -> &str {
        "read_file"
    }

    fn spec(&self) -> ToolSpec {
        spec(
            self.name(),
            "Read a UTF-8 text file of the workspace (at most 1 MiB). Binary files are refused.",
            json!({
                "path": { "type": "string", "description": format!("The file to read, {PATH_RULE}.") },
            }),
            &["path"],
        )
    }

    fn call(&self, workspace: &Workspace, args: &Value) -> Result<ToolOutcome, ToolError> {
        let args: ReadFileArgs = arguments(self.name(), r#"{"path": string}"#, args)?;
        Ok(ToolOutcome::text(workspace.read_file(&args.path)?))
    }
}

/// `list_files {path?}`: the files under a directory, recursively.
#[derive(Debug, Clone, Copy)]
pub struct ListFiles;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListFilesArgs {
    #[serde(default)]
    path: Option<String>,
}

impl Tool for ListFiles {
    fn name(&self) -> &str {
        "list_files"
    }

    fn spec(&self) -> ToolSpec {
        spec(
            self.name(),
            "List the files of the workspace, or of one of its directories, recursively: one path \
             per line, relative to the workspace root, sorted. At most 1000 files.",
            json!({
                "path": {
                    "type": "string",
                    "description": format!("The directory to list, {PATH_RULE}. Omit it for the whole workspace."),
                },
            }),
            &[],
        )
    }

    fn call(&self, workspace: &Workspace, args: &Value) -> Result<ToolOutcome, ToolError> {
        let args: ListFilesArgs = arguments(self.name(), r#"{"path"?: string}"#, args)?;
        let files = workspace.list_files(args.path.as_deref())?;
        if files.is_empty() {
            let place = match args.path.as_deref() {
                None | Some("") | Some(".") => "the workspace".to_string(),
                Some(dir) => format!("`{dir}`"),
            };
            return Ok(ToolOutcome::text(format!("(no files in {place})")));
        }
        Ok(ToolOutcome::text(files.join("\n")))
    }
}

/// `record_decision {title, decision, rationale}`: appends to `docs/decisions.md`.
#[derive(Debug, Clone, Copy)]
pub struct RecordDecision;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordDecisionArgs {
    title: String,
    decision: String,
    rationale: String,
}

impl Tool for RecordDecision {
    fn name(&self) -> &str {
        "record_decision"
    }

    fn spec(&self) -> ToolSpec {
        spec(
            self.name(),
            "Record a decision and why it was taken: appended as a section to docs/decisions.md \
             in the workspace, and kept in the run's history.",
            json!({
                "title": { "type": "string", "description": "A short title, one line, such as `Use PostgreSQL`." },
                "decision": { "type": "string", "description": "What was decided." },
                "rationale": { "type": "string", "description": "Why: the forces, the alternatives and why they lost." },
            }),
            &["title", "decision", "rationale"],
        )
    }

    fn call(&self, workspace: &Workspace, args: &Value) -> Result<ToolOutcome, ToolError> {
        const USAGE: &str = r#"{"title": string, "decision": string, "rationale": string}"#;
        let args: RecordDecisionArgs = arguments(self.name(), USAGE, args)?;
        let bad = |problem: &str| ToolError::BadArguments {
            tool: self.name().to_string(),
            problem: problem.to_string(),
            usage: USAGE,
        };
        // The title becomes a markdown heading, so it is kept to one line.
        let title = args.title.split_whitespace().collect::<Vec<_>>().join(" ");
        if title.is_empty() {
            return Err(bad("`title` is empty"));
        }
        if title.chars().count() > MAX_TITLE_CHARS {
            return Err(bad(&format!(
                "`title` is longer than {MAX_TITLE_CHARS} characters; shorten it"
            )));
        }
        if args.decision.trim().is_empty() {
            return Err(bad("`decision` is empty"));
        }
        if args.rationale.trim().is_empty() {
            return Err(bad("`rationale` is empty"));
        }
        let decision = Decision {
            title,
            decision: args.decision.trim().to_string(),
            rationale: args.rationale.trim().to_string(),
        };
        workspace.record_decision(&decision)?;
        Ok(ToolOutcome {
            output: format!("recorded decision: {}", decision.title),
            written: Some(DECISIONS_PATH.to_string()),
            decision: Some(decision),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// TOOLS.md
// ---------------------------------------------------------------------------------------------

/// Why the `tools:` line of a team's `TOOLS.md` cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolsMdError {
    #[error(
        "TOOLS.md has no `tools:` line; add one, such as `tools: read_file, list_files, write_file`"
    )]
    MissingLine,
    #[error(
        "the `tools:` line of TOOLS.md names no tool; list at least one, such as `tools: read_file`"
    )]
    Empty,
    #[error(
        "the `tools:` line of TOOLS.md names {0:?}, which is not a tool name (letters, digits, `_` and `-`)"
    )]
    InvalidName(String),
}

/// The tools a team may use: the comma-separated names of the first line of its `TOOLS.md`
/// that starts with `tools:`, trimmed, in order, each once.
pub fn granted_tools(tools_md: &str) -> Result<Vec<String>, ToolsMdError> {
    let line = tools_md
        .lines()
        .find_map(|line| line.trim_start().strip_prefix("tools:"))
        .ok_or(ToolsMdError::MissingLine)?;
    let mut names: Vec<String> = Vec::new();
    for name in line
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ToolsMdError::InvalidName(name.to_string()));
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    if names.is_empty() {
        return Err(ToolsMdError::Empty);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    /// A workspace at `<tmp>/ws`, and `<tmp>/outside` for links to point at.
    fn setup() -> (TempDir, Workspace, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::new(tmp.path().join("ws")).unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret.txt"), "top secret").unwrap();
        (tmp, ws, outside)
    }

    /// A workspace whose earlier stages left `docs/requirements.md`, `src/lib.rs` and
    /// decisions; and two inputs no model could name, which are dropped.
    fn with_inputs() -> (TempDir, Workspace) {
        let tmp = tempfile::tempdir().unwrap();
        let inputs = BTreeMap::from([
            ("docs/requirements.md".to_string(), "# Requirements".to_string()),
            ("./src//lib.rs".to_string(), "pub fn f() {}".to_string()),
            (DECISIONS_PATH.to_string(), "# Decisions\n\n## Earlier\n\n".to_string()),
            ("../escape.md".to_string(), "no".to_string()),
            ("/etc/passwd".to_string(), "no".to_string()),
        ]);
        let ws = Workspace::with_inputs(tmp.path().join("ws"), inputs).unwrap();
        (tmp, ws)
    }

    #[test]
    fn inputs_read_and_list_as_files_without_being_written_to_disk() {
        let (_tmp, ws) = with_inputs();
        assert_eq!(ws.read_file("docs/requirements.md").unwrap(), "# Requirements");
        assert_eq!(ws.read_file("src/lib.rs").unwrap(), "pub fn f() {}");
        assert_eq!(ws.list_files(None).unwrap(), vec![DECISIONS_PATH, "docs/requirements.md", "src/lib.rs"]);
        assert_eq!(ws.list_files(Some("src")).unwrap(), vec!["src/lib.rs"]);
        assert!(matches!(ws.read_file("../escape.md"), Err(ToolError::Path(PathError::Parent(_)))));
        assert!(matches!(ws.read_file("escape.md"), Err(ToolError::NotFound { .. })));
        assert!(matches!(ws.read_file("docs"), Err(ToolError::IsDirectory { .. })));
        assert!(matches!(ws.list_files(Some("src/lib.rs")), Err(ToolError::NotADirectory { .. })));
        assert!(matches!(ws.list_files(Some("nowhere")), Err(ToolError::NoDirectory { .. })));
        // Nothing was written: the directory is empty.
        assert_eq!(fs::read_dir(ws.root()).unwrap().count(), 0);
    }

    #[test]
    fn a_written_file_shadows_its_input_and_is_listed_once() {
        let (_tmp, ws) = with_inputs();
        ws.write_file("src/lib.rs", "pub fn g() {}").unwrap();
        ws.write_file("src/main.rs", "fn main() {}").unwrap();
        assert_eq!(ws.read_file("src/lib.rs").unwrap(), "pub fn g() {}");
        assert_eq!(ws.content("src/lib.rs").unwrap(), b"pub fn g() {}");
        assert_eq!(ws.content("docs/requirements.md").unwrap(), b"# Requirements");
        assert_eq!(ws.content("docs/none.md"), None);
        assert_eq!(ws.list_files(Some("src")).unwrap(), vec!["src/lib.rs", "src/main.rs"]);
        // A file cannot be a directory, nor a directory a file, inputs or not.
        assert!(matches!(ws.write_file("src/lib.rs/x", "x"), Err(ToolError::Path(PathError::NotADirectory { .. }))));
        assert!(matches!(ws.write_file("docs", "x"), Err(ToolError::IsDirectory { .. })));
    }

    #[test]
    fn a_decision_carries_on_the_earlier_stages_decisions() {
        let (_tmp, ws) = with_inputs();
        ws.record_decision(&Decision { title: "Later".into(), decision: "Use SQLite".into(), rationale: "Small".into() })
            .unwrap();
        let text = ws.read_file(DECISIONS_PATH).unwrap();
        assert!(text.starts_with("# Decisions\n\n## Earlier\n\n## Later\n\n**Decision:** Use SQLite"), "{text}");
        assert_eq!(text.matches("# Decisions").count(), 1);
    }

    fn all_tools() -> Vec<String> {
        ["write_file", "read_file", "list_files", "record_decision"]
            .map(String::from)
            .to_vec()
    }

    fn call(ws: &Workspace, name: &str, arguments: Value) -> ToolOutcome {
        call_granted(ws, &all_tools(), name, arguments)
    }

    fn call_granted(
        ws: &Workspace,
        granted: &[String],
        name: &str,
        arguments: Value,
    ) -> ToolOutcome {
        let call = ToolCall {
            id: "call-1".into(),
            name: name.into(),
            arguments,
        };
        ToolRegistry::standard().call(ws, granted, &call)
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn traversal_and_foreign_paths_are_refused() {
        let (_tmp, ws, _) = setup();
        type Expected = fn(&PathError) -> bool;
        let cases: [(&str, Expected); 11] = [
            ("../x", |e| matches!(e, PathError::Parent(_))),
            ("a/../../x", |e| matches!(e, PathError::Parent(_))),
            ("a/..", |e| matches!(e, PathError::Parent(_))),
            ("..", |e| matches!(e, PathError::Parent(_))),
            ("/etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            ("//etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            ("C:\\x", |e| matches!(e, PathError::Windows(_))),
            ("c:/x", |e| matches!(e, PathError::Windows(_))),
            ("\\\\server\\x", |e| matches!(e, PathError::Windows(_))),
            ("", |e| matches!(e, PathError::Empty)),
            ("a\0b", |e| matches!(e, PathError::Nul(_))),
        ];
        for (path, expected) in cases {
            let error = ws.resolve(path).expect_err(path);
            assert!(expected(&error), "{path:?} gave {error:?}");
        }
        let long = "a/".repeat(MAX_PATH_BYTES);
        assert!(matches!(ws.resolve(&long), Err(PathError::TooLong(_))));
    }

    #[test]
    fn refused_paths_reach_the_model_as_errors_saying_what_to_do() {
        let (tmp, ws, _) = setup();
        for path in ["../x", "/etc/passwd", "C:\\x", "", "a\0b"] {
            let out = call(&ws, "write_file", json!({"path": path, "content": "x"}));
            assert!(out.is_error(), "{path:?}: {}", out.output);
            assert!(out.output.contains("relative"), "{path:?}: {}", out.output);
            assert_eq!(out.written, None);
            let out = call(&ws, "read_file", json!({"path": path}));
            assert!(out.is_error(), "{path:?}: {}", out.output);
        }
        assert!(entries(ws.root()).is_empty());
        assert_eq!(entries(tmp.path()), ["outside", "ws"]);
    }

    #[test]
    fn relative_paths_are_normalised_inside_the_root() {
        let (_tmp, ws, _) = setup();
        assert_eq!(
            ws.resolve("./a//b/./c.txt").unwrap(),
            ws.root().join("a/b/c.txt")
        );
        assert_eq!(ws.resolve(".").unwrap(), ws.root());
        assert_eq!(
            ws.resolve("notes:v2.md").unwrap(),
            ws.root().join("notes:v2.md")
        );
        let out = call(
            &ws,
            "write_file",
            json!({"path": "./src//lib.rs", "content": "x"}),
        );
        assert_eq!(out.output, "wrote 1 bytes to src/lib.rs");
        assert_eq!(out.written.as_deref(), Some("src/lib.rs"));
        assert!(call(&ws, "write_file", json!({"path": ".", "content": "x"})).is_error());
    }

    #[test]
    fn a_symlink_to_a_file_outside_is_refused_for_read_and_write() {
        let (_tmp, ws, outside) = setup();
        symlink(outside.join("secret.txt"), ws.root().join("link.txt")).unwrap();

        let read = call(&ws, "read_file", json!({"path": "link.txt"}));
        assert!(read.is_error(), "{}", read.output);
        assert!(read.output.contains("symbolic link"), "{}", read.output);
        assert!(!read.output.contains("top secret"));

        let write = call(
            &ws,
            "write_file",
            json!({"path": "link.txt", "content": "pwned"}),
        );
        assert!(write.is_error(), "{}", write.output);
        assert_eq!(
            fs::read_to_string(outside.join("secret.txt")).unwrap(),
            "top secret"
        );
        assert!(matches!(
            ws.resolve("link.txt"),
            Err(PathError::Symlink { .. })
        ));
    }

    #[test]
    fn a_symlinked_parent_directory_is_refused() {
        let (_tmp, ws, outside) = setup();
        fs::create_dir(ws.root().join("docs")).unwrap();
        symlink(&outside, ws.root().join("docs/out")).unwrap();

        let write = call(
            &ws,
            "write_file",
            json!({"path": "docs/out/new/file.txt", "content": "x"}),
        );
        assert!(write.is_error(), "{}", write.output);
        assert!(write.output.contains("`docs/out`"), "{}", write.output);
        let read = call(&ws, "read_file", json!({"path": "docs/out/secret.txt"}));
        assert!(read.is_error(), "{}", read.output);
        let list = call(&ws, "list_files", json!({"path": "docs/out"}));
        assert!(list.is_error(), "{}", list.output);
        assert_eq!(entries(&outside), ["secret.txt"]);
    }

    #[test]
    fn a_symlink_to_inside_the_workspace_is_refused_too() {
        // Links are never followed, so what is checked is always what is opened.
        let (_tmp, ws, _) = setup();
        fs::create_dir(ws.root().join("real")).unwrap();
        symlink(ws.root().join("real"), ws.root().join("alias")).unwrap();
        assert!(
            call(
                &ws,
                "write_file",
                json!({"path": "alias/a.txt", "content": "x"})
            )
            .is_error()
        );
        assert!(entries(&ws.root().join("real")).is_empty());
    }

    #[test]
    fn a_symlinked_decisions_file_or_directory_is_refused() {
        let (_tmp, ws, outside) = setup();
        symlink(&outside, ws.root().join("docs")).unwrap();
        let args = json!({"title": "t", "decision": "d", "rationale": "r"});
        let out = call(&ws, "record_decision", args);
        assert!(out.is_error(), "{}", out.output);
        assert_eq!(out.decision, None);
        assert_eq!(entries(&outside), ["secret.txt"]);
    }

    #[test]
    fn a_root_reached_through_a_symlink_is_made_canonical() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("real")).unwrap();
        symlink(tmp.path().join("real"), tmp.path().join("via")).unwrap();
        let ws = Workspace::new(tmp.path().join("via")).unwrap();
        assert_eq!(
            ws.root(),
            fs::canonicalize(tmp.path().join("real")).unwrap()
        );
        assert!(!call(&ws, "write_file", json!({"path": "a.txt", "content": "x"})).is_error());
        assert!(tmp.path().join("real/a.txt").is_file());
    }

    #[test]
    fn nested_writes_create_directories_inside_the_root() {
        let (tmp, ws, _) = setup();
        let out = call(
            &ws,
            "write_file",
            json!({"path": "src/api/v1/handlers.rs", "content": "fn main() {}\n"}),
        );
        assert_eq!(out.output, "wrote 13 bytes to src/api/v1/handlers.rs");
        assert!(!out.is_error());
        let file = ws.root().join("src/api/v1/handlers.rs");
        assert!(fs::canonicalize(&file).unwrap().starts_with(ws.root()));
        assert_eq!(fs::read_to_string(file).unwrap(), "fn main() {}\n");
        assert_eq!(entries(tmp.path()), ["outside", "ws"]);

        // Overwrite replaces the content.
        call(
            &ws,
            "write_file",
            json!({"path": "src/api/v1/handlers.rs", "content": "x"}),
        );
        assert_eq!(
            call(&ws, "read_file", json!({"path": "src/api/v1/handlers.rs"})).output,
            "x"
        );
    }

    #[test]
    fn writing_through_a_file_or_onto_a_directory_is_refused() {
        let (_tmp, ws, _) = setup();
        call(&ws, "write_file", json!({"path": "a.txt", "content": "x"}));
        let out = call(
            &ws,
            "write_file",
            json!({"path": "a.txt/b.txt", "content": "x"}),
        );
        assert!(
            out.output.starts_with("error: ") && out.output.contains("not a directory"),
            "{}",
            out.output
        );
        call(
            &ws,
            "write_file",
            json!({"path": "dir/f.txt", "content": "x"}),
        );
        let out = call(&ws, "write_file", json!({"path": "dir", "content": "x"}));
        assert!(
            out.is_error() && out.output.contains("is a directory"),
            "{}",
            out.output
        );
    }

    /// Two workspaces with the same `inputs`: one at `<tmp>/ws` on disk, one in memory.
    fn on_disk_and_in_memory(inputs: BTreeMap<String, String>) -> (TempDir, Workspace, Workspace) {
        let tmp = tempfile::tempdir().unwrap();
        let on_disk = Workspace::with_inputs(tmp.path().join("ws"), inputs.clone()).unwrap();
        (tmp, on_disk, Workspace::in_memory(inputs))
    }

    /// The tools answer the same whether a workspace keeps its files on disk or in memory:
    /// one script of calls (writes, reads, listings, decisions, and every refusal that does
    /// not need a link on disk) on both, with the same inputs, compared call by call, and the
    /// files they end with compared too.
    #[test]
    fn a_workspace_in_memory_answers_every_call_as_one_on_disk() {
        let inputs = {
            BTreeMap::from([
                ("docs/requirements.md".to_string(), "# Requirements".to_string()),
                ("./src//lib.rs".to_string(), "pub fn f() {}".to_string()),
                (DECISIONS_PATH.to_string(), "# Decisions\n\n## Earlier\n\n".to_string()),
                ("../escape.md".to_string(), "no".to_string()),
                ("big.txt".to_string(), "x".repeat(MAX_FILE_BYTES + 1)),
            ])
        };
        let (_tmp, on_disk, in_memory) = on_disk_and_in_memory(inputs);
        assert!(in_memory.is_in_memory() && !on_disk.is_in_memory());
        let decision = |title: &str| json!({"title": title, "decision": "Do it.", "rationale": "Because."});
        let script: Vec<(&str, Value)> = vec![
            ("list_files", json!({})),
            ("read_file", json!({"path": "docs/requirements.md"})),
            ("read_file", json!({"path": "src/lib.rs"})),
            ("read_file", json!({"path": "big.txt"})),
            ("read_file", json!({"path": "missing.md"})),
            ("read_file", json!({"path": "docs"})),
            ("read_file", json!({"path": "."})),
            ("list_files", json!({"path": "docs"})),
            ("list_files", json!({"path": "nowhere"})),
            ("list_files", json!({"path": "src/lib.rs"})),
            // Below an input file: nothing there to read or list; no writing through it.
            ("read_file", json!({"path": "docs/requirements.md/x"})),
            ("list_files", json!({"path": "docs/requirements.md/x"})),
            ("write_file", json!({"path": "./docs//requirements.md/x", "content": "through an input"})),
            ("write_file", json!({"path": format!("{}/x.md", "n".repeat(MAX_NAME_BYTES + 1)), "content": "a name too long"})),
            ("write_file", json!({"path": "README.md", "content": "# Shortener\n"})),
            ("write_file", json!({"path": "./src//main.rs", "content": "fn main() {}\n"})),
            ("write_file", json!({"path": "src/lib.rs", "content": "pub fn g() {}"})),
            ("read_file", json!({"path": "src/lib.rs"})),
            ("write_file", json!({"path": "docs/é.md", "content": "ünïcode"})),
            ("write_file", json!({"path": "a/b/c/d.txt", "content": "deep"})),
            ("write_file", json!({"path": "a/b", "content": "onto a directory"})),
            ("write_file", json!({"path": "README.md/inside.md", "content": "through a file"})),
            ("write_file", json!({"path": "src/lib.rs/x", "content": "through an input"})),
            ("write_file", json!({"path": "docs", "content": "onto a directory of inputs"})),
            ("write_file", json!({"path": "../out.md", "content": "no"})),
            ("write_file", json!({"path": "/etc/passwd", "content": "no"})),
            ("write_file", json!({"path": "C:\\x", "content": "no"})),
            ("write_file", json!({"path": "", "content": "no"})),
            ("write_file", json!({"path": "huge.txt", "content": "x".repeat(MAX_FILE_BYTES + 1)})),
            ("write_file", json!({"path": "nul.txt", "content": "a\u{0}b"})),
            ("read_file", json!({"path": "nul.txt"})),
            ("read_file", json!({"path": "a/b"})),
            ("read_file", json!({"path": "README.md/inside.md"})),
            ("list_files", json!({"path": "a"})),
            ("list_files", json!({"path": "a/b/c/d.txt"})),
            ("list_files", json!({"path": "."})),
            ("write_file", json!({"path": "./README.md//inside.md", "content": "through a file, as given"})),
            ("list_files", json!({"path": "README.md/inside"})),
            ("read_file", json!({"path": "./README.md//inside"})),
            // A refused first decision makes nothing: no `docs` folder of its own.
            ("record_decision", json!({"title": "Huge", "decision": "x".repeat(MAX_FILE_BYTES), "rationale": "r"})),
            ("record_decision", decision("First here")),
            ("record_decision", decision("Second here")),
            ("read_file", json!({"path": DECISIONS_PATH})),
            ("write_file", json!({"path": "docs/decisions.md/x", "content": "no"})),
            ("list_files", json!({})),
        ];
        for (name, arguments) in &script {
            let disk = call(&on_disk, name, arguments.clone());
            let memory = call(&in_memory, name, arguments.clone());
            assert_eq!(memory, disk, "{name} {arguments}");
        }
        for path in call(&on_disk, "list_files", json!({})).output.lines() {
            assert_eq!(in_memory.content(path), on_disk.content(path), "{path}");
        }
        assert_eq!(in_memory.content("missing.md"), None);
        assert_eq!(in_memory.content("../escape.md"), None);
    }

    /// Emptied by a write, the decisions file stays the team's own: the earlier stages'
    /// decisions are carried only into a new file, on disk and in memory alike; and a huge
    /// first decision, refused, leaves no folder behind on disk.
    #[test]
    fn decisions_are_carried_only_into_a_new_file_on_disk_and_in_memory() {
        let inputs = BTreeMap::from([(DECISIONS_PATH.to_string(), "# Decisions\n\n## Earlier\n\n".to_string())]);
        let (tmp, on_disk, in_memory) = on_disk_and_in_memory(inputs);
        let empty = Workspace::with_inputs(tmp.path().join("empty"), BTreeMap::new()).unwrap();
        let huge = json!({"title": "Huge", "decision": "x".repeat(MAX_FILE_BYTES), "rationale": "r"});
        assert!(call(&empty, "record_decision", huge).is_error());
        assert!(!tmp.path().join("empty/docs").exists(), "a refused decision made a folder");
        for ws in [&on_disk, &in_memory] {
            assert!(!call(ws, "write_file", json!({"path": DECISIONS_PATH, "content": ""})).is_error());
            assert!(!call(ws, "record_decision", json!({"title": "Mine", "decision": "d", "rationale": "r"})).is_error());
        }
        let text = String::from_utf8(on_disk.content(DECISIONS_PATH).unwrap()).unwrap();
        assert!(!text.contains("Earlier") && text.contains("## Mine"), "{text}");
        assert_eq!(in_memory.content(DECISIONS_PATH), on_disk.content(DECISIONS_PATH));
    }

    #[test]
    fn a_decisions_file_in_memory_is_bounded_like_one_on_disk() {
        let ws = Workspace::in_memory(BTreeMap::new());
        let long = "x".repeat(MAX_FILE_BYTES / 3);
        let arguments = json!({"title": "Long", "decision": long, "rationale": "r"});
        let mut outcomes = Vec::new();
        for _ in 0..4 {
            outcomes.push(call(&ws, "record_decision", arguments.clone()));
        }
        assert!(outcomes[..2].iter().all(|o| !o.is_error()), "{outcomes:?}");
        assert!(outcomes[3].is_error() && outcomes[3].output.contains("would grow past"), "{:?}", outcomes[3]);
        assert!(ws.content(DECISIONS_PATH).unwrap().len() <= MAX_FILE_BYTES);
    }

    #[test]
    fn read_and_list_round_trip() {
        let (_tmp, ws, _) = setup();
        let files = [
            ("README.md", "# Shortener\n"),
            ("src/main.rs", "fn main() {}\n"),
            ("docs/é.md", "ünïcode"),
        ];
        for (path, content) in files {
            assert!(!call(&ws, "write_file", json!({"path": path, "content": content})).is_error());
        }
        for (path, content) in files {
            assert_eq!(
                call(&ws, "read_file", json!({"path": path})).output,
                content
            );
        }
        let listed = call(&ws, "list_files", json!({})).output;
        assert_eq!(listed, "README.md\ndocs/é.md\nsrc/main.rs");
    }

    #[test]
    fn list_is_sorted_relative_to_the_root_and_skips_links() {
        let (_tmp, ws, outside) = setup();
        for path in ["b/z.txt", "b/a.txt", "a.txt", "c/d/e.txt", "B.txt"] {
            ws.write_file(path, "x").unwrap();
        }
        symlink(&outside, ws.root().join("c/out")).unwrap();
        assert_eq!(
            ws.list_files(None).unwrap(),
            ["B.txt", "a.txt", "b/a.txt", "b/z.txt", "c/d/e.txt"]
        );
        assert_eq!(
            call(&ws, "list_files", json!({"path": "c"})).output,
            "c/d/e.txt"
        );
        assert_eq!(
            call(&ws, "list_files", json!({"path": "./b/"})).output,
            "b/a.txt\nb/z.txt"
        );
        assert_eq!(
            call(&ws, "list_files", json!({"path": ""})).output,
            call(&ws, "list_files", Value::Null).output
        );
        let out = call(&ws, "list_files", json!({"path": "nope"}));
        assert!(
            out.is_error() && out.output.contains("no directory"),
            "{}",
            out.output
        );
        let out = call(&ws, "list_files", json!({"path": "a.txt"}));
        assert!(
            out.is_error() && out.output.contains("not a directory"),
            "{}",
            out.output
        );
    }

    #[test]
    fn an_empty_workspace_lists_no_files() {
        let (_tmp, ws, _) = setup();
        let out = call(&ws, "list_files", json!({}));
        assert_eq!(out.output, "(no files in the workspace)");
        assert!(!out.is_error());
    }

    #[test]
    fn listing_too_many_files_is_refused_with_advice() {
        let (_tmp, ws, _) = setup();
        for i in 0..=MAX_LISTED_FILES {
            fs::create_dir_all(ws.root().join(format!("d{}", i % 3))).unwrap();
            fs::write(ws.root().join(format!("d{}/f{i}", i % 3)), "").unwrap();
        }
        let out = call(&ws, "list_files", json!({}));
        assert!(out.is_error(), "{}", &out.output[..100]);
        assert!(out.output.contains("subdirectory"), "{}", out.output);
        assert!(!call(&ws, "list_files", json!({"path": "d0"})).is_error());
    }

    #[test]
    fn sizes_are_bounded_both_ways() {
        let (_tmp, ws, _) = setup();
        let big = "x".repeat(MAX_FILE_BYTES + 1);
        let out = call(
            &ws,
            "write_file",
            json!({"path": "big.txt", "content": big}),
        );
        assert!(
            out.is_error() && out.output.contains("split it"),
            "{}",
            out.output
        );
        assert!(!ws.root().join("big.txt").exists());

        let exact = "x".repeat(MAX_FILE_BYTES);
        assert!(
            !call(
                &ws,
                "write_file",
                json!({"path": "max.txt", "content": exact})
            )
            .is_error()
        );
        assert_eq!(
            call(&ws, "read_file", json!({"path": "max.txt"}))
                .output
                .len(),
            MAX_FILE_BYTES
        );

        fs::write(ws.root().join("huge.txt"), &big).unwrap();
        let out = call(&ws, "read_file", json!({"path": "huge.txt"}));
        assert!(
            out.is_error() && out.output.contains("cannot be read whole"),
            "{}",
            out.output
        );
    }

    #[test]
    fn binary_files_are_refused_and_missing_files_point_to_list_files() {
        let (_tmp, ws, _) = setup();
        fs::write(
            ws.root().join("logo.png"),
            [0x89, b'P', b'N', b'G', 0xff, 0xfe],
        )
        .unwrap();
        fs::write(ws.root().join("nul.bin"), b"abc\0def").unwrap();
        for path in ["logo.png", "nul.bin"] {
            let out = call(&ws, "read_file", json!({"path": path}));
            assert!(
                out.is_error() && out.output.contains("not UTF-8 text"),
                "{}",
                out.output
            );
        }
        let out = call(&ws, "read_file", json!({"path": "missing.md"}));
        assert_eq!(
            out.output,
            "error: there is no file at `missing.md`; call list_files to see what the workspace holds"
        );
        let out = call(&ws, "read_file", json!({"path": "."}));
        assert!(
            out.is_error() && out.output.contains("is a directory"),
            "{}",
            out.output
        );
    }

    #[test]
    fn record_decision_appends_sections_and_returns_the_decision() {
        let (_tmp, ws, _) = setup();
        let first = call(
            &ws,
            "record_decision",
            json!({"title": "Use PostgreSQL", "decision": "One database.", "rationale": "Transactions."}),
        );
        assert_eq!(first.output, "recorded decision: Use PostgreSQL");
        assert_eq!(first.written.as_deref(), Some(DECISIONS_PATH));
        assert_eq!(
            first.decision,
            Some(Decision {
                title: "Use PostgreSQL".into(),
                decision: "One database.".into(),
                rationale: "Transactions.".into(),
            })
        );
        let second = call(
            &ws,
            "record_decision",
            json!({"title": "  Expiry\nin hours ", "decision": "TTL in hours.", "rationale": "Simple."}),
        );
        assert_eq!(second.output, "recorded decision: Expiry in hours");

        let text = fs::read_to_string(ws.root().join(DECISIONS_PATH)).unwrap();
        assert_eq!(
            text,
            "# Decisions\n\n\
             ## Use PostgreSQL\n\n**Decision:** One database.\n\n**Rationale:** Transactions.\n\n\
             ## Expiry in hours\n\n**Decision:** TTL in hours.\n\n**Rationale:** Simple.\n\n"
        );
        assert_eq!(call(&ws, "list_files", json!({})).output, DECISIONS_PATH);
    }

    #[test]
    fn record_decision_refuses_empty_fields() {
        let (_tmp, ws, _) = setup();
        for (title, decision, rationale) in [(" ", "d", "r"), ("t", "", "r"), ("t", "d", "\n")] {
            let out = call(
                &ws,
                "record_decision",
                json!({"title": title, "decision": decision, "rationale": rationale}),
            );
            assert!(
                out.is_error() && out.output.contains("is empty"),
                "{}",
                out.output
            );
            assert_eq!(out.decision, None);
        }
        let long = "t".repeat(MAX_TITLE_CHARS + 1);
        assert!(
            call(
                &ws,
                "record_decision",
                json!({"title": long, "decision": "d", "rationale": "r"})
            )
            .is_error()
        );
        assert!(!ws.root().join(DECISIONS_PATH).exists());
    }

    #[test]
    fn tools_not_granted_or_unknown_are_refused() {
        let (_tmp, ws, _) = setup();
        let granted = ["read_file", "list_files"].map(String::from).to_vec();
        let out = call_granted(
            &ws,
            &granted,
            "write_file",
            json!({"path": "a.txt", "content": "x"}),
        );
        assert_eq!(
            out.output,
            "error: the tool `write_file` is not granted to this team; use one of: read_file, list_files"
        );
        assert!(!ws.root().join("a.txt").exists());
        let out = call_granted(&ws, &granted, "delete_file", json!({"path": "a.txt"}));
        assert_eq!(
            out.output,
            "error: there is no tool named `delete_file`; use one of: read_file, list_files"
        );
        let out = call_granted(&ws, &[], "read_file", json!({"path": "a.txt"}));
        assert!(out.output.ends_with("use one of: (none)"), "{}", out.output);
        // Granted in TOOLS.md but not in the registry: still unknown, never a panic.
        let granted = ["shell".to_string()];
        assert!(
            call_granted(&ws, &granted, "shell", json!({}))
                .output
                .contains("no tool named `shell`")
        );
    }

    #[test]
    fn bad_arguments_say_what_is_wrong_and_how_to_call() {
        let (_tmp, ws, _) = setup();
        let cases = [
            (
                "write_file",
                json!({"path": "a.txt"}),
                "missing field `content`",
            ),
            (
                "write_file",
                json!({"path": 3, "content": "x"}),
                "invalid type",
            ),
            ("write_file", json!(["a.txt", "x"]), "must be a JSON object"),
            ("write_file", json!("{not json"), "not JSON"),
            ("read_file", json!({}), "missing field `path`"),
            (
                "read_file",
                json!({"file": "a.txt"}),
                "unknown field `file`",
            ),
            ("list_files", json!({"path": true}), "invalid type"),
            (
                "record_decision",
                json!({"title": "t", "decision": "d"}),
                "missing field `rationale`",
            ),
        ];
        for (tool, args, problem) in cases {
            let out = call(&ws, tool, args.clone());
            assert!(
                out.output
                    .starts_with(&format!("error: bad arguments for `{tool}`: ")),
                "{}",
                out.output
            );
            assert!(
                out.output.contains(problem),
                "{tool} {args}: {}",
                out.output
            );
            assert!(out.output.contains("call it with {"), "{}", out.output);
        }
    }

    #[test]
    fn arguments_sent_as_a_json_string_are_accepted() {
        let (_tmp, ws, _) = setup();
        let out = call(
            &ws,
            "write_file",
            json!(r#"{"path": "a.txt", "content": "hi"}"#),
        );
        assert_eq!(out.output, "wrote 2 bytes to a.txt");
    }

    #[test]
    fn errors_never_show_the_absolute_root() {
        let (_tmp, ws, outside) = setup();
        symlink(&outside, ws.root().join("out")).unwrap();
        let root = ws.root().to_string_lossy().into_owned();
        for (tool, args) in [
            ("read_file", json!({"path": "missing"})),
            ("read_file", json!({"path": "out/secret.txt"})),
            ("write_file", json!({"path": "out/x", "content": ""})),
            ("list_files", json!({"path": "nope"})),
        ] {
            let out = call(&ws, tool, args);
            assert!(out.is_error());
            assert!(!out.output.contains(&root), "{}", out.output);
        }
    }

    #[test]
    fn a_tool_that_panics_becomes_an_error_outcome() {
        struct Broken;
        impl Tool for Broken {
            fn name(&self) -> &str {
                "broken"
            }
            fn spec(&self) -> ToolSpec {
                spec("broken", "always panics", json!({}), &[])
            }
            fn call(&self, _: &Workspace, _: &Value) -> Result<ToolOutcome, ToolError> {
                panic!("boom")
            }
        }
        let (_tmp, ws, _) = setup();
        let mut registry = ToolRegistry::standard();
        registry.register(Broken);
        let call = ToolCall {
            id: "1".into(),
            name: "broken".into(),
            arguments: json!({}),
        };
        let out = registry.call(&ws, &["broken".to_string()], &call);
        assert_eq!(
            out.output,
            "error: the tool `broken` failed unexpectedly; continue without it or try again once"
        );
    }

    #[test]
    fn specs_follow_the_grant_and_describe_their_arguments() {
        let registry = ToolRegistry::standard();
        assert_eq!(
            registry.names().collect::<Vec<_>>(),
            ["list_files", "read_file", "record_decision", "write_file"]
        );
        let granted = ["read_file", "shell", "write_file", "read_file"].map(String::from);
        let specs = registry.specs_for(&granted);
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["read_file", "write_file"]);
        assert_eq!(specs[1].parameters["required"], json!(["path", "content"]));
        for spec in registry.specs_for(&all_tools()) {
            assert_eq!(spec.parameters["type"], "object", "{}", spec.name);
            assert_eq!(
                spec.parameters["additionalProperties"], false,
                "{}",
                spec.name
            );
            assert!(!spec.description.is_empty());
            for required in spec.parameters["required"].as_array().unwrap() {
                let required = required.as_str().unwrap();
                assert!(
                    spec.parameters["properties"].get(required).is_some(),
                    "{}.{required}",
                    spec.name
                );
            }
        }
        assert!(registry.specs_for(&[]).is_empty());
    }

    #[test]
    fn granted_tools_reads_the_tools_line() {
        let md = "# Tools of X\ntools:  read_file ,list_files,, write_file \n\n- `read_file`: tools: not this\n";
        assert_eq!(
            granted_tools(md).unwrap(),
            ["read_file", "list_files", "write_file"]
        );
        assert_eq!(granted_tools("tools: a, a, b").unwrap(), ["a", "b"]);
        assert_eq!(
            granted_tools("# T\nno line here\n"),
            Err(ToolsMdError::MissingLine)
        );
        assert_eq!(granted_tools(""), Err(ToolsMdError::MissingLine));
        assert_eq!(granted_tools("tools:\n"), Err(ToolsMdError::Empty));
        assert_eq!(granted_tools("tools: , ,"), Err(ToolsMdError::Empty));
        assert_eq!(
            granted_tools("tools: read file"),
            Err(ToolsMdError::InvalidName("read file".into()))
        );
    }

    const TEAMS: [&str; 17] = [
        "api-design",
        "backend-engineering",
        "business-analysis",
        "compliance-legal",
        "data-engineering",
        "database-engineering",
        "devops",
        "documentation",
        "feature-engineering",
        "frontend-engineering",
        "ml-engineering",
        "product-management",
        "qa-engineering",
        "security-engineering",
        "solution-architecture",
        "sre-operations",
        "ux-ui-design",
    ];

    #[test]
    fn every_team_grants_only_tools_the_registry_has() {
        let mut contract: Vec<&str> = crate::pipeline::TEAM_IDS.to_vec();
        contract.sort();
        assert_eq!(
            TEAMS.to_vec(),
            contract,
            "the test's team list is the contract's"
        );
        let registry = ToolRegistry::standard();
        for team in TEAMS {
            let path = format!(
                "{}{team}/TOOLS.md",
                concat!(env!("CARGO_MANIFEST_DIR"), "/")
            );
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let granted = granted_tools(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(
                text.lines().nth(1).map(|l| l.starts_with("tools:")),
                Some(true),
                "{path}"
            );
            for name in &granted {
                assert!(
                    registry.contains(name),
                    "{team} grants `{name}`, which the registry lacks"
                );
            }
            assert_eq!(registry.specs_for(&granted).len(), granted.len(), "{team}");
        }
    }

    use proptest::prelude::*;

    /// Paths built from the pieces that matter: `..`, `.`, separators, prefixes, a link.
    fn tricky_path() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("..".to_string()),
            Just(".".to_string()),
            Just("".to_string()),
            Just("link".to_string()),
            Just("dir".to_string()),
            Just("C:".to_string()),
            Just("\\".to_string()),
            Just("~".to_string()),
            "[a-z]{1,3}",
            any::<String>(),
        ];
        (any::<bool>(), prop::collection::vec(piece, 0..6)).prop_map(|(absolute, pieces)| {
            format!("{}{}", if absolute { "/" } else { "" }, pieces.join("/"))
        })
    }

    proptest! {
        #[test]
        fn arbitrary_paths_never_escape_the_root(path in prop_oneof![any::<String>(), tricky_path()]) {
            let (_tmp, ws, outside) = setup();
            fs::create_dir(ws.root().join("dir")).unwrap();
            symlink(&outside, ws.root().join("link")).unwrap();
            if let Ok(resolved) = ws.resolve(&path) {
                prop_assert!(resolved.starts_with(ws.root()), "{path:?} -> {resolved:?}");
                prop_assert!(!resolved.components().any(|c| c == Component::ParentDir));
                // No existing component below the root is a link.
                let below = resolved.strip_prefix(ws.root()).unwrap();
                let mut at = ws.root().to_path_buf();
                for part in below.components() {
                    at.push(part);
                    if let Ok(meta) = fs::symlink_metadata(&at) {
                        prop_assert!(!meta.file_type().is_symlink(), "{path:?} goes through {at:?}");
                    }
                }
            }
            let out = call(&ws, "write_file", json!({"path": path, "content": "x"}));
            let _ = call(&ws, "read_file", json!({"path": path}));
            let _ = call(&ws, "list_files", json!({"path": path}));
            prop_assert_eq!(entries(&outside), ["secret.txt"]);
            prop_assert_eq!(fs::read_to_string(outside.join("secret.txt")).unwrap(), "top secret");
            if let Some(written) = out.written {
                let file = fs::canonicalize(ws.root().join(&written)).unwrap();
                prop_assert!(file.starts_with(ws.root()), "{path:?} wrote {file:?}");
            }
        }
    }
}
