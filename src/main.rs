//! `wasm-ecds`: parses the command line and hands over to the library.

use std::io::IsTerminal;

use wasm_ecds::cli::{bootstrap, inspect, Cli, Command};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    wasm_ecds::serve::configure_allocator();
    let cli = Cli::parse_args();
    // `serve` logs at info by default; the offline commands report through their own output and
    // stay quiet unless RUST_LOG asks for logs. The Kubernetes client logs every failed attempt of
    // a watch at error level; the source logs each distinct watch error once itself.
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Proxy(_)) {
        "info,kube_client=off,kube_runtime=warn"
    } else {
        "off"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        // No colour escapes in files, pipes and CI logs.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let code = match cli.command {
        Command::Check { json, paths } => inspect::run_check(&paths, json),
        Command::Explain { json, paths } => inspect::run_explain(&paths, json),
        Command::Bootstrap(args) => bootstrap::run(&args),
        Command::Events(args) => wasm_ecds::cli::admin::run_events(&args),
        Command::Wait(args) => wasm_ecds::cli::admin::run_wait(&args),
        Command::Sim {
            trace,
            json,
            junit,
            paths,
        } => wasm_ecds::sim::run_paths(&paths, wasm_ecds::sim::RunOptions { trace, json, junit }),
        Command::Serve(mut args) => match args.resolve() {
            Ok(config) => {
                for warning in args.warnings() {
                    eprintln!("warning: {warning}");
                }
                wasm_ecds::serve::run_blocking(*args, config, None)
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
        Command::Proxy(mut args) => match args
            .check()
            .and_then(|()| args.serve.resolve().map_err(|e| e.to_string()))
        {
            Ok(config) => {
                let upstream = args.upstream_options();
                wasm_ecds::serve::run_blocking(args.serve, config, Some(upstream))
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
    };
    std::process::exit(code);
}
