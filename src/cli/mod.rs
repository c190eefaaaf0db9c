//! The command line (docs/cli.md): `serve`, `sim`, `check`, `explain`, `bootstrap`, and the
//! admin API clients `events` and `wait`. Parsing with
//! clap; each command returns its exit status (0 success, 1 the thing checked is wrong, 2 bad usage
//! or input).

pub mod admin;
pub mod bootstrap;
pub mod inspect;
pub mod options;

use std::path::PathBuf;

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
/// `*.json` below them, sorted.
pub fn expand_paths(paths: &[PathBuf], exts: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, exts, &mut found)?;
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &std::path::Path, exts: &[&str], out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, exts, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| exts.contains(&e))
        {
            out.push(path);
        }
    }
    Ok(())
}
