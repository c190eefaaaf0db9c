//! The command line (cli.md): `serve`, `sim`, `check`, `explain`. Parsing with clap; each command
//! returns its exit status (0 success, 1 the thing checked is wrong, 2 bad usage or input).

pub mod inspect;
pub mod options;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the ECDS server.
    Serve(Box<ServeArgs>),
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
    /// Validate WasmPlugin manifests (behavior.md §1).
    Check {
        #[arg(long)]
        json: bool,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Show each plugin's effective pull policy and the rule that decided it.
    Explain {
        #[arg(long)]
        json: bool,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
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
