//! wasm-ecds: delivers proxy-wasm modules to Envoy over ECDS with Istio `WasmPlugin` pull-policy
//! semantics, and a deterministic simulator of the same code.
//!
//! # Layout
//! Dependencies point one way (style guide §1):
//! - [`plugin`]: parse and validate `WasmPlugin` / pull-secret manifests;
//! - [`policy`]: the effective pull policy, pure;
//! - [`fetch`]: HTTP(S), OCI and file fetchers over a [`fetch::Transport`];
//! - [`store`] and [`cache`]: module files and the cache index (expiry, resolutions, the start-up
//!   verification of the cached files on threads of their own);
//! - [`engine`]: processes plugin versions into outcomes, retries rejected plugins, purges;
//! - [`dispatch`]: runs the engine's processings as concurrent jobs, one download per module;
//! - [`convert`]: serving state → the ECDS resource Envoy receives;
//! - [`bootstrap`]: the Envoy filters (or whole bootstrap) that subscribe a workload to its plugins;
//! - [`driver`]: the one loop around them — admission, engine, dispatcher, published resources —
//!   shared by [`serve`], [`sim`] and the tests;
//! - [`k8s`]: the Kubernetes source (watches, status conditions, Lease election), used by
//!   [`serve`] only;
//! - [`metrics`]: Istio-compatible Prometheus series;
//! - [`log_gate`]: one log line per key and interval for what can repeat without end;
//! - [`sim`] (in `sim/`): the simulated world and scenario runner.
//!
//! Comments citing `behavior.md §N` or `scenarios.md` refer to the user documentation in `docs/`.
//!
//! Only [`clock::SystemClock`] reads the OS clock and only [`fetch::hyper_transport`] touches the
//! network, so `sim` drives everything else unchanged.

pub mod auth;
pub mod backoff;
pub mod bootstrap;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod convert;
pub mod dispatch;
pub mod driver;
pub mod engine;
pub mod extension;
pub mod fetch;
pub mod k8s;
pub mod log_gate;
pub mod metrics;
pub mod net;
pub mod outcome;
pub mod plugin;
pub mod policy;
pub mod proxy;
pub mod serve;
pub mod source;
pub mod store;
pub mod url;
pub mod xds;

#[path = "../sim/mod.rs"]
pub mod sim;
