//! The `serve` and `proxy` processes: a runtime, the listeners bound from the options, the
//! server started, and a graceful stop on SIGTERM or SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use super::{start_with, ServeSetup};
use crate::config::Config;

/// Runs `serve` until SIGTERM/SIGINT. Returns the exit status.
/// With `proxy`, the xDS port proxies to it (`wasm-ecds proxy`).
pub fn run_blocking(
    args: crate::cli::ServeArgs,
    config: Config,
    proxy: Option<crate::proxy::UpstreamOptions>,
) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return 2;
        }
    };
    rt.block_on(async move {
        match run_until_signal(args, config, proxy).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                2
            }
        }
    })
}

async fn run_until_signal(
    args: crate::cli::ServeArgs,
    config: Config,
    proxy: Option<crate::proxy::UpstreamOptions>,
) -> anyhow::Result<()> {
    // Before anything is announced: a SIGTERM right after start-up must not kill the process
    // with the default action.
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    // Thousands of Envoys must not stop at a soft limit of 1024 open files.
    match crate::net::listen::raise_nofile_limit() {
        Some(n) => tracing::debug!(limit = n, "open-files limit"),
        None => tracing::warn!("cannot read the open-files limit"),
    }
    let ports = args.port_options()?;
    let xds_listener = tokio::net::TcpListener::bind(args.xds_address)
        .await
        .with_context(|| format!("--xds-address {}", args.xds_address))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_address)
        .await
        .with_context(|| format!("--admin-address {}", args.admin_address))?;
    let kube = args.kube_options()?;
    let xds_options = crate::xds::ServeOptions {
        limits: args.xds_limits()?,
        ..Default::default()
    };
    let transport = Arc::new(crate::fetch::hyper_transport::HyperTransport::new(
        &config,
        Vec::new(),
    )?);
    let mut handle = start_with(
        ServeSetup {
            config,
            plugin_paths: args.plugins.clone(),
            xds_listener,
            admin_listener,
            transport,
            fetch_config: None,
            kube,
            proxy,
        },
        ports,
        xds_options,
    )
    .await?;
    eprintln!(
        "wasm-ecds: xds on {}, admin on {}",
        handle.xds_address, handle.admin_address
    );
    let failed = tokio::select! {
        _ = int.recv() => None,
        _ = term.recv() => None,
        why = handle.failed() => Some(why),
    };
    tracing::info!("shutting down");
    tokio::time::timeout(Duration::from_secs(5), handle.shutdown())
        .await
        .ok();
    match failed {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}
