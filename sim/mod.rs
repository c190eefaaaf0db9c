//! The simulator (`wasm-ecds sim`, scenarios.md): runs scenario files against the server's real
//! policy, cache, fetch and conversion code, with simulated registries and HTTP servers on a virtual
//! clock, so a scenario runs in milliseconds and gives the same result and trace every time.
//!
//! # Layout
//! - [`scenario`]: the file format — parsing, validation (unknown keys are errors), substitutions;
//! - [`content`]: deterministic module bytes, archives and image manifests;
//! - [`rules`]: failure rules and auth schemes, shared by [`scenario`] (which parses them) and
//!   [`world`] (which applies them);
//! - [`world`]: the simulated hosts behind the fetchers' [`Transport`](crate::fetch::Transport):
//!   registries, HTTP servers, injected failures, auth, request counts;
//! - [`served`]: the sha256 of delivered module files, hashed again only after a change;
//! - [`trace`]: the lines a run records, in one buffer;
//! - [`runner`]: drives the [`Engine`](crate::engine::Engine) step by step through virtual time and
//!   checks expectations;
//! - [`report`]: `sim PATH...` — file discovery, text/JSON/JUnit output, exit status.
//!
//! The simulator never touches the network, the real file system (besides reading scenario files
//! and writing a JUnit report) or the wall clock.

pub mod content;
pub mod report;
pub mod rules;
pub mod runner;
pub mod scenario;
pub mod served;
pub mod trace;
pub mod world;

#[cfg(test)]
mod tests;

pub use report::{run_paths, run_paths_to, RunOptions, EXIT_FAILED, EXIT_INVALID, EXIT_PASSED};
pub use runner::{run_scenario, CheckFailure, ScenarioRun};
pub use scenario::{parse_scenario, LoadError, Scenario};
pub use trace::Trace;
