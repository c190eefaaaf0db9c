//! The command line (docs/cli.md): `serve`, `sim`, `check`, `explain`, `bootstrap`, and the
//! admin API clients `events` and `wait`. Parsing with
//! clap; each command returns its exit status (0 success, 1 the thing checked is wrong, 2 bad usage
//! or input).

pub mod admin;
pub mod bootstrap;
pub mod inspect;
pub mod options;
pub mod ports;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

pub use bootstrap::BootstrapArgs;
pub use options::ServeArgs;

#[derive(Debug, Parser)]
#[command(
    name = "wasm-ecds",
    version,
    about = "Deliver proxy-wasm modules to Envoy over ECDS, with Istio WasmPlugin pull policy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process arguments and environment; on bad usage prints clap's message and exits
    /// (status 2; 0 for `--help` and `--version`).
    pub fn parse_args() -> Cli {
        Self::from_matches(&Cli::command().get_matches()).unwrap_or_else(|e| e.exit())
    }

    /// [`parse_args`](Self::parse_args) on given arguments (the first is the program name).
    pub fn try_parse_args_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::from_matches(&Cli::command().try_get_matches_from(args)?)
    }

    /// Unlike `Cli::parse`, remembers which `serve` options were flags: their errors name the flag,
    /// the others' the environment variable.
    fn from_matches(matches: &ArgMatches) -> Result<Cli, clap::Error> {
        let mut cli = Cli::from_arg_matches(matches)?;
        match (&mut cli.command, matches.subcommand()) {
            (Command::Serve(args), Some(("serve", sub))) => args.note_flags(sub),
            (Command::Proxy(args), Some(("proxy", sub))) => args.serve.note_flags(sub),
            _ => {}
        }
        Ok(cli)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the ECDS server.
    Serve(Box<ServeArgs>),
    /// Run an xDS proxy in front of Envoy that converts remote-load Wasm configs from an upstream
    /// control plane (as Istio's agent does; docs/behavior.md §11).
    Proxy(Box<ProxyArgs>),
    /// Run scenario files against the real policy and cache code on a virtual clock.
    Sim {
        /// Print every event with its virtual time.
        #[arg(long)]
        trace: bool,
        /// Print the report as one JSON document.
        #[arg(long)]
        json: bool,
        /// Also write JUnit XML to this file.
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// Scenario files or directories (every *.yaml below them, in name order).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Validate WasmPlugin and EnvoyFilter manifests as `serve` would (docs/behavior.md §1,
    /// §10): one line per problem, exit status 1 when there is one. EnvoyFilter patches that are
    /// not served get a note line, which is not a problem.
    Check {
        /// Print the problems as one JSON array of {file, plugin, field, message} (notes add
        /// "note": true).
        #[arg(long)]
        json: bool,
        /// Manifest files or directories (every *.yaml, *.yml and *.json below them).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Show each plugin's effective pull policy and the rule that decided it (docs/behavior.md
    /// §2), served EnvoyFilter patches included (§10); an invalid plugin is shown as invalid, with
    /// its problems, and makes the exit status 1.
    Explain {
        /// Print one JSON array: per plugin {plugin, policy, rule, explanation, module, checksum,
        /// resource}, or {plugin, file, invalid: [{field, message}]} when it is invalid.
        #[arg(long)]
        json: bool,
        /// Manifest files or directories (every *.yaml, *.yml and *.json below them).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Print the Envoy filters that subscribe one workload to the plugins that apply to it, in
    /// Istio's order, or with --full a whole Envoy bootstrap.
    Bootstrap(Box<BootstrapArgs>),
    /// Print what a running server does, one line per event in the `sim --trace` format (or JSON
    /// with --json): processings, pushes, ACKs and NACKs by proxies, expiries. Needs the server's
    /// admin token when it has one.
    Events(Box<admin::EventsArgs>),
    /// Wait until a plugin's current version is ACKed by N proxies (exit 0), or give up after
    /// --timeout with a one-line reason (exit 1): for CI pipelines after `kubectl apply`.
    Wait(Box<admin::WaitArgs>),
}

/// `proxy`: the upstream, and `serve`'s options for the cache, fetching and delivery.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// The upstream xDS server: `host:port` or `http://host:port`, `https://host:port` for TLS
    /// (checked against the web PKI roots).
    #[arg(long, value_name = "ADDR", env = "WASM_ECDS_UPSTREAM")]
    pub upstream: String,
    /// PEM certificates trusted for an https:// upstream instead of the web PKI roots.
    #[arg(long, value_name = "FILE", env = "WASM_ECDS_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// PEM certificate chain presented to an https:// upstream that asks for one (mTLS); needs
    /// --upstream-key.
    #[arg(
        long,
        value_name = "FILE",
        env = "WASM_ECDS_UPSTREAM_CERT",
        requires = "upstream_key"
    )]
    pub upstream_cert: Option<PathBuf>,
    /// The PEM private key of --upstream-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "WASM_ECDS_UPSTREAM_KEY",
        requires = "upstream_cert"
    )]
    pub upstream_key: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl ProxyArgs {
    /// The upstream and how to trust it.
    pub fn upstream_options(&self) -> crate::proxy::UpstreamOptions {
        crate::proxy::UpstreamOptions {
            address: self.upstream.clone(),
            ca: self.upstream_ca.clone(),
            identity: self.upstream_cert.clone().zip(self.upstream_key.clone()),
        }
    }

    /// Checks the options `proxy` takes no part of: its resources come from the upstream.
    pub fn check(&self) -> Result<(), String> {
        if !self.serve.plugins.is_empty() {
            return Err(
                "--plugins: proxy takes its resources from --upstream, not from files".into(),
            );
        }
        if self.serve.source != "files" {
            return Err(format!(
                "--source {}: proxy takes its resources from --upstream",
                self.serve.source
            ));
        }
        Ok(())
    }
}

/// Files named by the user: files as given, directories expanded to every `*.yaml`, `*.yml` and
/// `*.json` below them (each root's files sorted), and the problems met on the way. Symbolic links
/// are followed (Kubernetes volume mounts are made of them), but each directory is read once: a
/// link back to a directory being read is a loop, reported and not followed; a second way to a
/// directory or file already found adds nothing. A file reached by several paths is named by the
/// shortest (then the first in order), as `a.yaml` rather than `..data/a.yaml` in a ConfigMap
/// volume. A directory that cannot be read is a problem of its own; everything else is still read.
pub fn expand_paths(paths: &[PathBuf], exts: &[&str]) -> Expanded {
    let mut walk = Walk {
        exts,
        visited: HashSet::new(),
        ancestors: Vec::new(),
        found: Vec::new(),
        out: Expanded::default(),
    };
    let mut files_seen = HashSet::new();
    for p in paths {
        match std::fs::metadata(p) {
            Ok(md) if md.is_dir() => {
                walk.visited.insert(FileId::of(&md));
                walk.dir(p, FileId::of(&md));
                let mut found = std::mem::take(&mut walk.found);
                // Shortest path first, so that it is the one kept for each file.
                found.sort_by(|a, b| {
                    (a.0.components().count(), &a.0).cmp(&(b.0.components().count(), &b.0))
                });
                let mut kept: Vec<PathBuf> = Vec::new();
                for (path, id) in found {
                    if id.is_none_or(|id| files_seen.insert(id)) {
                        if let Some(id) = id {
                            walk.out.ids.insert(path.clone(), id);
                        }
                        kept.push(path);
                    }
                }
                kept.sort();
                walk.out.files.extend(kept);
            }
            Ok(md) if !files_seen.insert(FileId::of(&md)) => {}
            Ok(md) => {
                walk.out.ids.insert(p.clone(), FileId::of(&md));
                walk.out.files.push(p.clone());
            }
            // Missing or not a directory: reading it says what is wrong.
            _ => walk.out.files.push(p.clone()),
        }
    }
    walk.out
}

/// What [`expand_paths`] found.
#[derive(Debug, Default)]
pub struct Expanded {
    pub files: Vec<PathBuf>,
    /// A path and what is wrong with it: a directory that cannot be read, a symbolic link loop.
    pub errors: Vec<(PathBuf, String)>,
    /// Directories whose entries could not be read (all or some): what was found under them
    /// before is not known to be gone.
    pub unreadable: Vec<PathBuf>,
    /// Every directory read, roots included.
    pub dirs: Vec<PathBuf>,
    /// The identity of each file of `files` that could be looked at (not a dangling link or a
    /// missing file): `serve` tells a file replaced by another from one edited in place.
    pub ids: HashMap<PathBuf, FileId>,
}

/// A file's identity: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId(u64, u64);

impl FileId {
    pub fn of(md: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileId(md.dev(), md.ino())
    }
}

struct Walk<'a> {
    exts: &'a [&'a str],
    /// Every directory read so far (a directory is read once, however many links lead to it).
    visited: HashSet<FileId>,
    /// The directories being read, outermost first: a link to one of them is a loop.
    ancestors: Vec<FileId>,
    /// Files and their identity (none for a dangling link: reading it says what is wrong).
    found: Vec<(PathBuf, Option<FileId>)>,
    out: Expanded,
}

impl Walk<'_> {
    fn dir(&mut self, dir: &Path, id: FileId) {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                self.unreadable(dir, format!("cannot read directory: {e}"));
                return;
            }
        };
        self.out.dirs.push(dir.to_path_buf());
        // Entries that are not links first (a directory is named by where it is rather than by
        // a link to it), each group in name order: the same tree is always read the same way.
        let mut paths = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => {
                    let link = entry.file_type().is_ok_and(|t| t.is_symlink());
                    paths.push((link, entry.path()));
                }
                Err(e) => {
                    // A directory that fails mid-listing may fail again at every step.
                    self.unreadable(dir, format!("cannot read directory entries: {e}"));
                    break;
                }
            }
        }
        paths.sort();
        self.ancestors.push(id);
        for (_, path) in paths {
            let wanted = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| self.exts.contains(&e));
            match std::fs::metadata(&path) {
                Ok(md) if md.is_dir() => {
                    let sub = FileId::of(&md);
                    if self.ancestors.contains(&sub) {
                        self.out.errors.push((
                            path,
                            "symbolic link loop: leads back to a directory that contains it; not followed".into(),
                        ));
                    } else if self.visited.insert(sub) {
                        self.dir(&path, sub);
                    }
                }
                Ok(md) if wanted => self.found.push((path, Some(FileId::of(&md)))),
                Ok(_) => {}
                Err(_) if wanted => self.found.push((path, None)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => self.unreadable(&path, format!("cannot read: {e}")),
            }
        }
        self.ancestors.pop();
    }

    fn unreadable(&mut self, path: &Path, message: String) {
        self.out.errors.push((path.to_path_buf(), message));
        self.out.unreadable.push(path.to_path_buf());
    }
}

/// The most a manifest file may hold (4 MiB, well above the 1.5 MiB of a Kubernetes object).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Reads a manifest file, which must be a regular file (not a FIFO, device or socket: those could
/// block or never end) of at most `limit` bytes of UTF-8. The error is one line, without the path.
pub fn read_manifest(path: &Path, limit: u64) -> Result<String, String> {
    use std::io::Read as _;
    let too_large =
        |len: u64| format!("{len} bytes, more than the {limit}-byte limit of a manifest file");
    if let Ok(md) = std::fs::metadata(path) {
        if md.is_file() && md.len() > limit {
            return Err(too_large(md.len()));
        }
    }
    // Never opened unless it is a regular file: the one check of file:// modules too.
    let file = crate::store::open_regular(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => format!("{e}: only regular files are read"),
        _ => e.to_string(),
    })?;
    let mut bytes = Vec::new();
    (&file)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "grew past the {limit}-byte limit of a manifest file while read"
        ));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))
}
