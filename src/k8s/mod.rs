//! The Kubernetes source of `serve --source kubernetes` (docs/kubernetes.md): `WasmPlugin` and
//! `EnvoyFilter` custom resources and their pull Secrets read from the API server, and conditions
//! written back to each WasmPlugin's status by the one replica that holds a
//! `coordination.k8s.io/v1` Lease (EnvoyFilters get no status, as with Istio).
//!
//! - [`watch`] lists and watches the objects and publishes [`Snapshot`]s: whole, consistent sets
//!   of objects that `serve`'s controller hands to the driver like a rescan of plugin files;
//! - [`status`] derives each plugin's conditions from the driver's state (pure) and writes the
//!   ones that changed, rate-limited, only while this replica leads;
//! - [`leader`] runs the Lease election.
//!
//! Only this module talks to the API server; the engine and driver know nothing about it.

pub mod leader;
pub mod snapshot;
pub mod status;
pub mod watch;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use kube::api::{ApiResource, GroupVersionKind};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

pub use snapshot::{ObjectMeta, Snapshot};

/// The API group, version and kind of Istio's `WasmPlugin`.
pub const WASMPLUGIN_GROUP: &str = "extensions.istio.io";
pub const WASMPLUGIN_VERSION: &str = "v1alpha1";
pub const WASMPLUGIN_KIND: &str = "WasmPlugin";
pub const WASMPLUGIN_PLURAL: &str = "wasmplugins";
/// Istio's `EnvoyFilter` (behavior.md §10).
pub const ENVOYFILTER_GROUP: &str = "networking.istio.io";
pub const ENVOYFILTER_VERSION: &str = "v1alpha3";
pub const ENVOYFILTER_KIND: &str = "EnvoyFilter";
pub const ENVOYFILTER_PLURAL: &str = "envoyfilters";

/// How `serve` reaches and uses the API server.
#[derive(Clone, Debug, PartialEq)]
pub struct KubeOptions {
    /// A kubeconfig file; `None` infers the configuration (`KUBECONFIG`, `~/.kube/config`, then
    /// the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces whose plugins are read; empty for all.
    pub namespaces: Vec<String>,
    /// A label selector plugins must match (`istio.io/rev=canary`).
    pub selector: Option<String>,
    /// Whether conditions are written to plugin status (by the Lease holder only).
    pub write_status: bool,
    pub lease: LeaseOptions,
}

/// The Lease that elects the status writer.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseOptions {
    pub name: String,
    /// `None`: the client's default namespace (the pod's own in a cluster).
    pub namespace: Option<String>,
    /// How long a holder keeps the Lease without renewing it (whole seconds, at least 2).
    pub duration: Duration,
    /// This replica's identity in the Lease (`holderIdentity`).
    pub identity: String,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            name: "wasm-ecds".into(),
            namespace: None,
            duration: Duration::from_secs(15),
            identity: default_identity(),
        }
    }
}

/// `POD_NAME` when set (the Downward API in deploy/), else `<hostname>-<pid>`.
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME") {
        if !pod.is_empty() {
            return pod;
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "wasm-ecds".into());
    format!("{host}-{}", std::process::id())
}

/// The `WasmPlugin` resource for dynamic API calls (no generated types: objects are read as JSON
/// and admitted by the same code as files).
pub fn wasmplugin_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(WASMPLUGIN_GROUP, WASMPLUGIN_VERSION, WASMPLUGIN_KIND);
    ApiResource::from_gvk_with_plural(&gvk, WASMPLUGIN_PLURAL)
}

/// The `EnvoyFilter` resource for dynamic API calls.
pub fn envoyfilter_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(ENVOYFILTER_GROUP, ENVOYFILTER_VERSION, ENVOYFILTER_KIND);
    ApiResource::from_gvk_with_plural(&gvk, ENVOYFILTER_PLURAL)
}

/// A client for the configured cluster.
pub async fn client(options: &KubeOptions) -> anyhow::Result<kube::Client> {
    // kube's rustls client needs a process-wide crypto provider; ours is ring. Installing fails
    // harmlessly when one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")?,
    };
    kube::Client::try_from(config).context("cannot build the Kubernetes client")
}

/// The source's Prometheus series, in the process registry.
#[derive(Clone, Debug)]
pub struct KubeSeries {
    /// `wasm_ecds_kube_status_writes{result="ok|conflict|error"}`.
    pub status_writes: IntCounterVec,
    /// `wasm_ecds_kube_relists`: completed initial lists and relists of the plugin watch.
    pub relists: prometheus::IntCounter,
    /// `wasm_ecds_kube_watch_errors`.
    pub watch_errors: prometheus::IntCounter,
    /// `wasm_ecds_kube_leader`: 1 while this replica holds the Lease.
    pub leader: IntGauge,
}

impl KubeSeries {
    pub fn register(registry: &Registry) -> KubeSeries {
        let status_writes = IntCounterVec::new(
            Opts::new(
                "wasm_ecds_kube_status_writes",
                "WasmPlugin status writes to the API server, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let relists = prometheus::IntCounter::new(
            "wasm_ecds_kube_relists",
            "Completed lists of WasmPlugins (the initial one and every relist)",
        )
        .expect("valid metric");
        let watch_errors = prometheus::IntCounter::new(
            "wasm_ecds_kube_watch_errors",
            "Errors of the WasmPlugin, EnvoyFilter and Secret watches (each retried with backoff)",
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "wasm_ecds_kube_leader",
            "1 while this replica holds the status Lease",
        )
        .expect("valid metric");
        for c in [
            Box::new(status_writes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(relists.clone()),
            Box::new(watch_errors.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        for r in ["ok", "conflict", "error"] {
            status_writes.with_label_values(&[r]);
        }
        KubeSeries {
            status_writes,
            relists,
            watch_errors,
            leader,
        }
    }
}
