//! `wasm-ecds serve`: wires the file source, the engine, the ECDS resource store, the gRPC server
//! and the admin HTTP server together.
//!
//! One controller task owns the [`Driver`] (an actor: no locks held across fetches); it syncs the
//! watched files into it, forwards refresh requests and otherwise lets it run its own deadlines
//! and finished fetches. The driver publishes ECDS resources to its [`ResourceStore`] (which pushes
//! to streams). The admin endpoints read what [`Shared`] holds (readiness, the module index, kept
//! by the controller only when they change) and ask the controller for debug views, which it
//! builds on request, one page at a time (`view.rs`): a change costs no view work.
//! Streams never wait for the controller.
//!
//! The process around them is in `process.rs`; how the controller brings the sources' changes
//! to the driver is in `resync.rs`.

pub mod admin;
pub mod files;
mod offered;
mod ports;
mod process;
pub mod proxied;
mod resync;
pub mod sources;
pub mod view;

pub use process::run_blocking;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::driver::{Driver, DriverParts, ModuleIndex};
use crate::engine::EngineParts;
use crate::fetch::{FetchConfig, Transport};
use crate::k8s::{self, status, KubeOptions, Snapshot};
use crate::metrics::Metrics;
use crate::plugin::ObjectKey;
use crate::store::{DiskStore, OsFiles};
use crate::xds::ResourceStore;

pub use crate::convert::{MODULES_CLUSTER, MODULES_PATH};
/// File changes are applied after this quiet period.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(100);

/// State shared between the controller and the admin server.
#[derive(Debug)]
pub struct Shared {
    /// The initial plugin set has been processed (`/readyz`).
    pub ready: AtomicBool,
    /// The modules of the module endpoint (`None` until the controller runs), replaced only when
    /// the set of modules changed.
    pub modules: RwLock<Option<ModuleIndex>>,
    pub commands: mpsc::Sender<Command>,
    pub resources: ResourceStore,
    /// The engine's series and the resource store's: `/metrics` renders them live.
    pub metrics: Metrics,
    /// The engine's events for `wasm_ecds.v1.Admin/WatchEvents` (xds/admin.rs).
    pub events: crate::xds::admin::EventHub,
}

/// Requests to the controller.
#[derive(Debug)]
pub enum Command {
    /// The plugin files changed: the watcher says which (`files::Watcher::take`).
    Reload,
    /// Force a pull for a plugin; answers whether it exists.
    Refresh(ObjectKey, oneshot::Sender<bool>),
    /// A page of `/debug/plugins`.
    Plugins(view::PluginsQuery, oneshot::Sender<view::PluginsPage>),
    /// A page of `/debug/cache`.
    Cache(view::CacheQuery, oneshot::Sender<view::CachePage>),
}

/// Everything needed to start a server.
pub struct ServeSetup {
    pub config: Config,
    pub plugin_paths: Vec<PathBuf>,
    pub xds_listener: tokio::net::TcpListener,
    pub admin_listener: tokio::net::TcpListener,
    pub transport: Arc<dyn Transport>,
    pub fetch_config: Option<FetchConfig>,
    /// `--source kubernetes`.
    pub kube: Option<KubeOptions>,
    /// `proxy --upstream`: the xDS port proxies to this control plane, converting remote-load
    /// configs (docs/behavior.md §11), instead of serving the plugins' resources.
    pub proxy: Option<crate::proxy::UpstreamOptions>,
}

/// A running server.
pub struct ServerHandle {
    pub xds_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    fatal: mpsc::Receiver<String>,
}

impl ServerHandle {
    /// Completes with the reason when the server cannot go on (a start-up conflict between the
    /// plugin files and Kubernetes); never otherwise.
    pub async fn failed(&mut self) -> String {
        match self.fatal.recv().await {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Stops accepting, closes streams, waits for the tasks.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

/// Starts the server on already-bound listeners, plain and open, with the xDS port's default
/// bounds (tests of other parts).
pub async fn start(setup: ServeSetup) -> anyhow::Result<ServerHandle> {
    start_with(
        setup,
        crate::net::PortOptions::default(),
        crate::xds::ServeOptions::default(),
    )
    .await
}

/// Starts the server on already-bound listeners, exposed as `ports` says (TLS, admin
/// authorization, caps, timeouts, module base URL: docs/security.md), the xDS port bounded as
/// `xds_options` says (the `--xds-*` flags; its `access` is set here from `ports`).
pub async fn start_with(
    setup: ServeSetup,
    ports: crate::net::PortOptions,
    mut xds_options: crate::xds::ServeOptions,
) -> anyhow::Result<ServerHandle> {
    let xds_address = setup.xds_listener.local_addr()?;
    let admin_address = setup.admin_listener.local_addr()?;
    let exposure = ports::Exposure::new(&ports, xds_address, admin_address)?;
    xds_options.access = exposure.xds_access.clone();
    let module_endpoint = exposure.module_endpoint.clone();
    let store = DiskStore::open(&setup.config.cache_dir)
        .with_context(|| format!("cannot open cache dir {}", setup.config.cache_dir.display()))?;
    let store = Arc::new(store.with_verify_threads(setup.config.cache_verify_threads));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let start = clock.now();
    let (driver, report) = Driver::new(DriverParts {
        config: setup.config.clone(),
        engine: EngineParts {
            clock,
            transport: setup.transport.clone(),
            store,
            files: Arc::new(OsFiles),
            jitter_seed: Some(start.as_millis()),
            fetch_config: setup.fetch_config.clone(),
            purge_epoch: start,
        },
        module_endpoint: module_endpoint.clone(),
    })
    .with_context(|| {
        format!(
            "cannot index cache dir {}",
            setup.config.cache_dir.display()
        )
    })?;
    tracing::info!(kept = report.kept, removed = report.removed.len(), verifying = report.verifying, dir = %setup.config.cache_dir.display(), "cache indexed");
    let metrics = driver.engine().metrics().clone();
    let resources = driver.resources().clone();
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let shared = Arc::new(Shared {
        ready: AtomicBool::new(false),
        modules: RwLock::new(None),
        commands: cmd_tx.clone(),
        resources: resources.clone(),
        metrics,
        events: xds_options.events.clone(),
    });
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);

    let mut tasks = Vec::new();
    let kube = match &setup.kube {
        Some(options) => {
            let (link, kube_tasks) =
                start_kube(options, &shared.metrics, shutdown_tx.subscribe()).await?;
            tasks.extend(kube_tasks);
            Some(link)
        }
        None => None,
    };
    let (fatal_tx, fatal) = mpsc::channel(1);
    let (ready_tx, ready_rx) = oneshot::channel();
    let hub = setup.proxy.as_ref().map(|_| crate::proxy::Hub::new());
    let watcher = files::spawn_watcher(&setup.plugin_paths, cmd_tx.clone())?;
    let controller = Controller {
        watcher,
        proxy: hub.clone().map(proxied::ProxyLink::new),
        module_endpoint,
        driver,
        files: files::FileSource::new(setup.plugin_paths.clone()),
        shared: shared.clone(),
        sources: sources::Sources::new(kube.is_none()),
        kube,
        generations: BTreeMap::new(),
        fatal: fatal_tx,
        stale_statuses: resync::StaleStatuses::All,
        report_stale: true,
        offered: offered::Offered::default(),
    };
    tasks.push(tokio::spawn(controller.run(
        cmd_rx,
        shutdown_rx.clone(),
        ready_tx,
    )));
    let rx = shutdown_tx.subscribe();
    let xds_listener = exposure.xds_listener(setup.xds_listener, &shared.metrics);
    match (&setup.proxy, hub) {
        (Some(upstream), Some(hub)) => {
            // A proxy has no plugin set of its own to wait for: streams are forwarded at once.
            let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
            let server = crate::proxy::ProxyServer::new(
                hub,
                shared.metrics.clone(),
                upstream,
                xds_options.limits.clone(),
                closing_rx,
            )?;
            tasks.push(tokio::spawn(crate::proxy::serve(
                xds_listener,
                server,
                closing_tx,
                wait_shutdown(rx),
            )));
        }
        _ => {
            // ECDS is served once the initial plugin set is processed: a delta proxy
            // reconnecting after a restart would otherwise be told its resources were removed.
            // The listener is bound already, so proxies connecting earlier just wait.
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = wait_shutdown(rx.clone()) => {}
                    ready = ready_rx => {
                        if ready.is_ok() {
                            let serving = crate::xds::serve_with_options(
                                xds_listener, resources, xds_options, wait_shutdown(rx),
                            );
                            if let Err(e) = serving.await {
                                tracing::error!(error = %e, "xds server failed");
                            }
                        }
                    }
                }
            }));
        }
    }
    let rx = shutdown_tx.subscribe();
    tasks.push(tokio::spawn(admin::serve(
        exposure
            .admin_listener(setup.admin_listener, &shared.metrics)
            .incoming(),
        shared.clone(),
        exposure.admin,
        wait_shutdown(rx),
    )));
    tracing::info!(%xds_address, %admin_address, "wasm-ecds serving");
    Ok(ServerHandle {
        xds_address,
        admin_address,
        shared,
        shutdown: Some(shutdown_tx),
        tasks,
        fatal,
    })
}

/// The controller's side of the Kubernetes source.
struct KubeLink {
    snapshots: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
    /// Where desired statuses go, when status is written.
    statuses: Option<Arc<status::Board>>,
}

/// Connects to the API server and starts the watches and, with status writes, the Lease election
/// and the status writer.
async fn start_kube(
    options: &KubeOptions,
    metrics: &Metrics,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(KubeLink, Vec<tokio::task::JoinHandle<()>>)> {
    let client = k8s::client(options).await?;
    let series = metrics.kube_series();
    let (snapshots, watch_task) = k8s::watch::spawn(client.clone(), options, series.clone());
    let mut tasks = vec![stop_on_shutdown(watch_task, shutdown.clone())];
    let mut statuses = None;
    if options.write_status {
        let (leading, lease_task) = k8s::leader::spawn(
            client.clone(),
            options.lease.clone(),
            series.clone(),
            wait_shutdown(shutdown.clone()),
        );
        tasks.push(lease_task);
        let board = Arc::new(status::Board::default());
        let guard = k8s::leader::LeaseGuard::new(client.clone(), &options.lease);
        let writer = status::spawn_writer(
            client,
            guard,
            series,
            board.clone(),
            snapshots.clone(),
            leading,
        );
        tasks.push(stop_on_shutdown(writer, shutdown));
        statuses = Some(board);
    }
    Ok((
        KubeLink {
            snapshots,
            statuses,
        },
        tasks,
    ))
}

/// A task that aborts `task` at shutdown.
fn stop_on_shutdown(
    task: tokio::task::JoinHandle<()>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let abort = task.abort_handle();
        tokio::select! {
            _ = wait_shutdown(shutdown) => abort.abort(),
            _ = task => {}
        }
    })
}

/// Completes once the shutdown flag is set (or its sender is gone).
async fn wait_shutdown(mut rx: tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

struct Controller {
    driver: Driver,
    watcher: Option<files::Watcher>,
    files: files::FileSource,
    shared: Arc<Shared>,
    sources: sources::Sources,
    kube: Option<KubeLink>,
    /// Per Kubernetes plugin: the object version in the driver and the `metadata.generation` it
    /// was accepted at.
    generations: BTreeMap<ObjectKey, (u64, Option<i64>)>,
    fatal: mpsc::Sender<String>,
    /// `proxy` mode: the identities proxied streams want, and where their results go.
    proxy: Option<proxied::ProxyLink>,
    /// Where proxies fetch modules with `--delivery http`.
    module_endpoint: String,
    /// The Kubernetes plugins whose statuses' inputs changed since they were published.
    stale_statuses: resync::StaleStatuses,
    /// `proxy` mode: what proxied streams want changed since their results were reported.
    report_stale: bool,
    /// The modules the module endpoint offers.
    offered: offered::Offered,
}

/// The next change of what proxied streams want; never completes outside `proxy` mode.
async fn next_wanted(proxy: &mut Option<proxied::ProxyLink>) {
    if let Some(link) = proxy {
        if link.wanted.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Hands the allocator's free memory back to the system once the initial plugin set is loaded.
/// Loading N plugins frees O(N) small blocks that glibc keeps in per-thread lists and merges only
/// when some later allocation or free asks for it: without this, the first edits after start-up
/// paid for merging all of them (27 and 78 ms of CPU for two edits at 50k plugins, against
/// 1.3 ms for the following ones). Done once, here, it is part of start-up. The binary allocates
/// with mimalloc (src/main.rs), which keeps freed pages for a while before returning them: it is
/// told to collect and return them now; glibc's heap is trimmed too (the tests allocate with it,
/// and C libraries linked in may). (Public for tests/heap_release.rs, which needs a process of
/// its own to look at the allocator.)
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reorganises the allocator's own free lists, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
    // SAFETY: mi_collect only frees and returns mimalloc's own unused memory (a no-op when
    // nothing was allocated with it).
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

/// mimalloc's `purge_delay` option (`mi_option_purge_delay`, not named by its bindings).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long the binary's allocator (mimalloc, src/main.rs) keeps memory freed before it returns
/// it to the system. Its default, a second, made every run of a large scenario fault its memory
/// in again page by page (parsing 100k steps was 1.9x slower than with it kept); freed memory is
/// still returned, 10 s later, and at once at [`release_freed_memory`].
pub const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// Sets the allocator's options ([`ALLOCATOR_PURGE_DELAY_MS`]); called first thing by the binary
/// and the benches.
pub fn configure_allocator() {
    // SAFETY: sets one of mimalloc's own options, read whenever it considers purging.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS);
    }
}

/// Sleeps until `due`, or forever.
async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The next Kubernetes snapshot; never completes without the Kubernetes source (or once it ended).
async fn next_snapshot(kube: &mut Option<KubeLink>) -> Option<Arc<Snapshot>> {
    if let Some(link) = kube {
        if link.snapshots.changed().await.is_ok() {
            return link.snapshots.borrow_and_update().clone();
        }
    }
    std::future::pending().await
}

impl Controller {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        ready: oneshot::Sender<()>,
    ) {
        // Ready once the initial plugin set — the files' and, with Kubernetes, the first complete
        // list — has been loaded and processed.
        let mut ready_tx = Some(ready);
        let mut ready_ticket = None;
        let mut release = false;
        let rescan = files::FileChanges {
            rescan: true,
            ..Default::default()
        };
        self.update_files(&rescan, true);
        if self.kube.is_none() {
            ready_ticket = Some(self.resync());
        }
        loop {
            if ready_ticket
                .as_ref()
                .is_some_and(|t| self.driver.is_done(t))
            {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(());
                    release = true;
                }
            }
            // Events are read by the proxy link, `WatchEvents` and the module index; taking them
            // also keeps them from piling up.
            let events = self.driver.take_events();
            self.shared.events.publish(&events);
            if let Some(index) = self.offered.update(&self.driver, &events) {
                *self.shared.modules.write().expect("module index lock") = Some(index);
            }
            if ready_tx.is_none() {
                self.shared.ready.store(true, Ordering::Release);
            }
            // What derives from the driver's state is worked out again only when it changed: a
            // wake-up for nothing (a deadline with nothing due) costs nothing per plugin.
            if !events.is_empty() {
                self.stale_statuses.mark_events(&events);
                self.report_stale = true;
            }
            self.publish_statuses();
            let sweep = match &self.proxy {
                Some(link) => {
                    if std::mem::take(&mut self.report_stale) {
                        link.report(&self.driver, &events, &self.module_endpoint);
                    }
                    link.hub.sweep()
                }
                None => None,
            };
            // Once the initial set is processed and its events (one or more per plugin) are
            // dropped: what loading freed is merged now, not by the next edit.
            drop(events);
            if std::mem::take(&mut release) {
                release_freed_memory();
            }
            tokio::select! {
                _ = wait_shutdown(shutdown.clone()) => break,
                () = next_wanted(&mut self.proxy) => {
                    self.resync();
                }
                () = sleep_until(sweep) => {}
                snapshot = next_snapshot(&mut self.kube) => {
                    let ticket = if ready_ticket.is_none() {
                        // The first list: every object of both sources, at once.
                        self.sources.kube = snapshot;
                        self.resync()
                    } else {
                        let changed = sources::snapshot_changes(
                            self.sources.kube.as_deref(),
                            snapshot.as_deref(),
                        );
                        // Its metadata (generations) may have changed alone.
                        if let (Some(old), Some(new)) = (&self.sources.kube, &snapshot) {
                            let meta = k8s::snapshot::changed_meta(old, new);
                            self.stale_statuses.mark(meta.into_iter().cloned());
                        }
                        self.sources.kube = snapshot;
                        self.resync_changed(&changed)
                    };
                    if ready_ticket.is_none() {
                        if !self.sources.conflicts.is_empty() {
                            let list: Vec<&str> = self.sources.conflicts.values().map(|c| c.message.as_str()).collect();
                            let _ = self.fatal.try_send(list.join("; "));
                        }
                        ready_ticket = Some(ticket);
                    }
                }
                cmd = commands.recv() => match cmd {
                    None => break,
                    Some(Command::Reload) => {
                        // Debounce: editors write files in several steps.
                        tokio::time::sleep(RELOAD_DEBOUNCE).await;
                        let mut later = Vec::new();
                        while let Ok(cmd) = commands.try_recv() {
                            if !matches!(cmd, Command::Reload) {
                                later.push(cmd);
                            }
                        }
                        let changes = match &self.watcher {
                            Some(w) => w.take(),
                            None => files::FileChanges::default(),
                        };
                        let changed = self.update_files(&changes, false);
                        self.resync_changed(&changed);
                        for cmd in later {
                            self.answer(cmd);
                        }
                    }
                    Some(cmd) => self.answer(cmd),
                },
                _ = self.driver.next() => {}
            }
        }
        self.driver.flush();
    }

    /// Answers a request of the admin server (a reload is not one).
    fn answer(&mut self, cmd: Command) {
        match cmd {
            Command::Reload => {}
            Command::Refresh(key, reply) => {
                let _ = reply.send(self.driver.refresh(&key).is_some());
            }
            Command::Plugins(query, reply) => {
                let _ = reply.send(view::plugins_page(&self.driver, &self.sources, &query));
            }
            Command::Cache(query, reply) => {
                let _ = reply.send(view::cache_page(&self.driver, &query));
            }
        }
    }
}
