//! `wasm-ecds bootstrap` as users run it (docs/cli.md): which plugins a workload gets and in which
//! order, exit statuses and one-line errors; then with a real Envoy: every `--full` variant passes
//! `envoy --mode validate`, an Envoy started with the printed bootstrap receives the plugin from a
//! running `wasm-ecds serve` (its `/config_dump` shows the ECDS filter config and the module answers
//! through the listener), and without wasm-ecds the default configuration applies after
//! `--initial-fetch-timeout`: deny-all (403) for a FAIL_CLOSE plugin, allow-all for FAIL_OPEN.
//!
//! Envoy is found as described in `tests/support/mod.rs`; locally the Envoy tests skip with a loud
//! message when it is missing, under `CI=true` they fail instead. Every wait is bounded.

#![allow(clippy::disallowed_methods)] // bounded waits use wall time

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use support::envoy::{wait_for, Envoy, EnvoyConfig, XdsTransport};
use support::wasm::{CONFIG_HEADER, MODULE_HEADER};

const RESOURCE_PREFIX: &str = "extensions.istio.io/wasmplugin/";
const CONVERGE: Duration = Duration::from_secs(30);

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run wasm-ecds")
}

/// `bootstrap --json ARGS`, which must succeed; its output.
fn bootstrap_json(args: &[&str]) -> Value {
    let mut all = vec!["bootstrap", "--json"];
    all.extend_from_slice(args);
    let out = run(&all);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bootstrap --json prints JSON")
}

/// The plugin keys (`ns.name`) of the filters in `list`, in order.
fn plugin_names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("a filter list")
        .iter()
        .map(|f| {
            let name = f["name"].as_str().expect("filter name");
            name.strip_prefix(RESOURCE_PREFIX)
                .unwrap_or(name)
                .to_string()
        })
        .collect()
}

const DOCS: &str = "examples/plugins/istio-docs.yaml";

#[test]
fn workloads_get_the_plugins_istio_would_give_them_in_istio_order() {
    // The ingress gateway: its own namespace's plugin and the root namespace's, both AUTHN with
    // no priority: the root namespace's first.
    let v = bootstrap_json(&[
        "--plugins",
        DOCS,
        "--namespace",
        "istio-ingress",
        "--labels",
        "istio=ingressgateway,app=gw",
    ]);
    assert_eq!(
        plugin_names(&v["http_filters"]),
        ["istio-system.basic-auth", "istio-ingress.openid-connect"]
    );
    assert!(v.get("filters").is_none(), "{v:#}");

    // A Gateway API gateway of `default`: the targetRefs plugin joins the selector-less ones;
    // STATS before unspecified; the network plugin in its own list.
    let v = bootstrap_json(&["--plugins", DOCS, "--gateway-name", "bookinfo-gateway"]);
    assert_eq!(
        plugin_names(&v["http_filters"]),
        [
            "default.latest-stats",
            "default.http-checksummed",
            "default.pinned-header"
        ]
    );
    assert_eq!(plugin_names(&v["filters"]), ["default.tcp-metadata"]);
    let tcp = &v["filters"][0]["config_discovery"];
    assert_eq!(
        tcp["type_urls"],
        json!([
            "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
            "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
        ])
    );

    // spec.match: http-checksummed is for SERVER traffic on 8080 only.
    let v = bootstrap_json(&["--plugins", DOCS, "--match-mode", "client"]);
    assert_eq!(plugin_names(&v["http_filters"]), ["default.latest-stats"]);
    let v = bootstrap_json(&[
        "--plugins",
        DOCS,
        "--match-mode",
        "server",
        "--match-port",
        "8080",
    ]);
    assert_eq!(
        plugin_names(&v["http_filters"]),
        ["default.latest-stats", "default.http-checksummed"]
    );

    // Default configs follow the fail strategy: latest-stats is FAIL_OPEN, the others FAIL_CLOSE.
    let v = bootstrap_json(&["--plugins", DOCS, "--initial-fetch-timeout", "2.5s"]);
    let d = |i: usize| v["http_filters"][i]["config_discovery"].clone();
    assert!(d(0)["default_config"].get("rules").is_none());
    assert_eq!(d(1)["default_config"]["rules"], json!({}));
    assert_eq!(d(1)["config_source"]["initial_fetch_timeout"], "2.5s");
}

#[test]
fn yaml_output_names_the_workload_and_the_plugins_in_a_comment() {
    let out = run(&["bootstrap", "--plugins", DOCS, "--service", "reviews"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let first = text.lines().next().unwrap();
    assert_eq!(
        first,
        "# wasm-ecds bootstrap for namespace default, services reviews: default/latest-stats, \
         default/http-checksummed, default/tcp-metadata"
    );
    let v: Value = serde_yaml_ng::from_str(&text).expect("YAML");
    assert_eq!(
        v["http_filters"][0]["config_discovery"]["default_config"]["@type"],
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
    );
}

#[test]
fn no_plugin_is_a_warning_and_an_empty_list() {
    let out = run(&[
        "bootstrap",
        "--json",
        "--plugins",
        DOCS,
        "--namespace",
        "empty",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, json!({"http_filters": []}));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "warning: no plugin applies to the workload (namespace empty)"
    );
}

#[test]
fn invalid_manifests_are_exit_1_bad_flags_and_unreadable_files_exit_2() {
    let out = run(&["bootstrap", "--plugins", "examples/plugins/broken.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("examples/plugins/broken.yaml: default/bad-checksum: spec.sha256: "),
        "{stderr}"
    );

    for (flag, value, message) in [
        (
            "--labels",
            "app",
            r#"error: --labels: invalid label "app": want key=value"#,
        ),
        (
            "--labels",
            "=x",
            r#"error: --labels: invalid label "=x": want key=value"#,
        ),
        (
            "--match-mode",
            "both",
            r#"error: --match-mode: invalid mode "both": want client or server"#,
        ),
        (
            "--match-port",
            "0",
            r#"error: --match-port: invalid port "0": want a number from 1 to 65535"#,
        ),
        (
            "--initial-fetch-timeout",
            "10",
            r#"error: --initial-fetch-timeout: invalid duration "10": missing unit (ns, us, µs, ms, s, m, h)"#,
        ),
    ] {
        let out = run(&["bootstrap", "--plugins", DOCS, flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), message);
        assert!(out.stdout.is_empty());
    }
    for (flag, value) in [
        ("--upstream", "backend"),
        ("--listen-address", "localhost:80"),
        ("--xds-address", "a b:1"),
        ("--delivery", "pigeon"),
    ] {
        let out = run(&["bootstrap", "--full", "--plugins", DOCS, flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with(&format!("error: {flag}: ")), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    // Flags of the whole bootstrap need --full.
    let out = run(&["bootstrap", "--plugins", DOCS, "--upstream", "10.0.0.1:80"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--full"));
    let out = run(&["bootstrap", "--plugins", "examples/plugins/nope.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.yaml"));
}

#[test]
fn help_documents_the_flags_without_pointing_outside_the_repository() {
    let out = run(&["bootstrap", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--plugins",
        "--namespace",
        "--labels",
        "--gateway-name",
        "--service",
        "--root-namespace",
        "--xds-cluster",
        "--ads",
        "--initial-fetch-timeout",
        "--full",
        "--xds-address",
        "--delivery",
        "--upstream",
    ] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
    assert!(help.contains("docs/cli.md"), "{help}");
    assert!(!help.contains("../") && !help.contains("://"), "{help}");
}

// -------------------------------------------------------------------------------------------------
// With a real Envoy.

/// `envoy --mode validate -c FILE` on each `--full` variant.
#[test]
fn every_full_bootstrap_passes_envoy_validation() {
    let Some(envoy) = support::require_envoy() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let variants: [&[&str]; 5] = [
        &[],
        &["--ads"],
        &[
            "--ads",
            "--delta",
            "--delivery",
            "http",
            "--admin-address",
            "wasm-ecds.mesh.svc:15020",
        ],
        &[
            "--delta",
            "--upstream",
            "backend.shop.svc:8080",
            "--xds-address",
            "[::1]:18000",
        ],
        &[
            "--gateway-name",
            "bookinfo-gateway",
            "--initial-fetch-timeout",
            "0",
            "--xds-cluster",
            "x",
        ],
    ];
    for (i, extra) in variants.iter().enumerate() {
        for json in [false, true] {
            let mut args = vec!["bootstrap", "--full", "--plugins", DOCS];
            args.extend_from_slice(extra);
            if json {
                args.push("--json");
            }
            let out = run(&args);
            assert_eq!(out.status.code(), Some(0), "{args:?}");
            let file = dir
                .path()
                .join(format!("b{i}.{}", if json { "json" } else { "yaml" }));
            std::fs::write(&file, &out.stdout).unwrap();
            let check = Command::new(&envoy)
                .args(["--mode", "validate", "-c"])
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "{args:?} is not a valid Envoy bootstrap:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
}

/// A running `wasm-ecds serve`, killed on drop.
struct Serve {
    child: Child,
    xds: String,
    admin: String,
    _cache: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Starts `serve --plugins DIR --delivery MODE` on free loopback ports and waits for `/readyz`.
    fn start(plugins: &Path, delivery: &str) -> Serve {
        let cache = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
            .args([
                "serve",
                "--xds-address",
                "127.0.0.1:0",
                "--admin-address",
                "127.0.0.1:0",
            ])
            .arg("--plugins")
            .arg(plugins)
            .arg("--cache-dir")
            .arg(cache.path())
            .args(["--delivery", delivery])
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        // Keep draining, so the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        // "wasm-ecds: xds on ADDR, admin on ADDR"
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(line.starts_with("wasm-ecds: xds on"), "{line}");
        let serve = Serve {
            child,
            xds: words[3].trim_end_matches(',').to_string(),
            admin: words[6].to_string(),
            _cache: cache,
        };
        let ready = (0..300).any(|_| {
            let ok = http_get_blocking(&serve.admin, "/readyz")
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"));
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        });
        assert!(ready, "serve never became ready on {}", serve.admin);
        serve
    }
}

/// A plain `GET` over HTTP/1.1 with `Connection: close`; the whole response.
fn http_get_blocking(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    Ok(r)
}

/// An upstream answering every request with `200 upstream` (a thread per connection).
fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                loop {
                    let mut head = String::new();
                    while reader.read_line(&mut head).is_ok_and(|n| n > 2) {}
                    if head.is_empty() {
                        return;
                    }
                    let reply = "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nupstream\n";
                    if (&stream).write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn write_plugin(dir: &Path, name: &str, spec: Value) {
    let plugin = json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    });
    std::fs::write(dir.join(format!("{name}.json")), plugin.to_string()).unwrap();
}

/// `bootstrap --full --json` for namespace `shop` with an Envoy on free ports.
fn full_bootstrap(plugins: &Path, xds: &str, upstream: SocketAddr, extra: &[&str]) -> String {
    let upstream = upstream.to_string();
    let mut args = vec![
        "bootstrap",
        "--full",
        "--json",
        "--namespace",
        "shop",
        "--labels",
        "app=cart",
        "--plugins",
        plugins.to_str().unwrap(),
        "--xds-address",
        xds,
        "--upstream",
        &upstream,
        "--listen-address",
        "127.0.0.1:0",
        "--envoy-admin-address",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What a `GET /` through the bootstrap's listener answers: status and the module's two headers.
async fn probe(envoy: &Envoy) -> Result<(u16, Option<String>, Option<String>), String> {
    let r = envoy.get("ingress_http", "/").await?;
    Ok((
        r.status,
        r.header(CONFIG_HEADER).map(str::to_string),
        r.header(MODULE_HEADER).map(str::to_string),
    ))
}

/// For file delivery over per-filter streams, delta ADS, and http delivery (Envoy downloads the
/// module from the server's admin address through the cluster `--full` adds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_started_with_the_full_bootstrap_receives_the_plugin_from_serve() {
    let Some(bin) = support::require_envoy() else {
        return;
    };
    let modules = tempfile::tempdir().unwrap();
    let module = modules.path().join("cart.wasm");
    std::fs::write(&module, support::proxy_wasm_test_module_tagged("bootstrap")).unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let url = format!("file://{}", module.display());
    write_plugin(
        plugins.path(),
        "cart-headers",
        json!({"url": url, "selector": {"matchLabels": {"app": "cart"}}, "pluginConfig": {"who": "cart"}}),
    );
    // Not for this workload: the listener must not name it.
    write_plugin(
        plugins.path(),
        "other",
        json!({"url": url, "selector": {"matchLabels": {"app": "other"}}}),
    );
    let upstream = start_upstream();
    let resource = format!("{RESOURCE_PREFIX}shop.cart-headers");
    for (delivery, flags) in [
        ("file", &[][..]),
        ("file", &["--ads", "--delta"][..]),
        ("http", &["--delivery", "http"][..]),
    ] {
        let serve = Serve::start(plugins.path(), delivery);
        let mut extra = flags.to_vec();
        if delivery == "http" {
            extra.extend(["--admin-address", serve.admin.as_str()]);
        }
        let bootstrap = full_bootstrap(plugins.path(), &serve.xds, upstream, &extra);
        let envoy =
            Envoy::start_with(&bin, EnvoyConfig::given(XdsTransport::Sotw, bootstrap)).await;
        envoy.wait_ready().await;

        let dump = wait_for("the ECDS filter in /config_dump", CONVERGE, || async {
            let r = envoy.admin("/config_dump?resource=ecds_filters").await?;
            let v: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
            let filters: Vec<Value> = v["configs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c.get("ecds_filter").is_some())
                .cloned()
                .collect();
            (!filters.is_empty()).then_some(filters).ok_or(r.text())
        })
        .await;
        assert_eq!(dump.len(), 1, "{flags:?}: {dump:#?}");
        let filter = &dump[0]["ecds_filter"];
        assert_eq!(filter["name"], resource.as_str());
        let typed = &filter["typed_config"];
        assert_eq!(
            typed["@type"],
            "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
        );
        assert_eq!(typed["config"]["name"], "shop.cart-headers");
        let code = &typed["config"]["vm_config"]["code"];
        if delivery == "http" {
            assert_eq!(
                code["remote"]["http_uri"]["cluster"], "wasm_ecds_modules",
                "{code:#}"
            );
        } else {
            assert!(code["local"]["filename"].is_string(), "{code:#}");
        }
        assert!(!dump[0]["version_info"].as_str().unwrap_or("").is_empty());

        let want = (
            200,
            Some(r#"{"who":"cart"}"#.to_string()),
            Some("bootstrap".to_string()),
        );
        wait_for(
            "the module answering through the listener",
            CONVERGE,
            || async {
                let got = probe(&envoy).await?;
                (got == want).then_some(()).ok_or(format!("{got:?}"))
            },
        )
        .await;
        assert_eq!(
            envoy.ecds_counter(&resource, "update_success").await,
            1,
            "{flags:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wasm_ecds_the_default_config_follows_the_fail_strategy() {
    let Some(bin) = support::require_envoy() else {
        return;
    };
    let upstream = start_upstream();
    let xds = closed_port().to_string();
    for (strategy, status) in [("FAIL_CLOSE", 403), ("FAIL_OPEN", 200)] {
        let plugins = tempfile::tempdir().unwrap();
        write_plugin(
            plugins.path(),
            "guard",
            json!({"url": "oci://registry.example/guard:v1", "failStrategy": strategy}),
        );
        let bootstrap = full_bootstrap(
            plugins.path(),
            &xds,
            upstream,
            &["--initial-fetch-timeout", "500ms"],
        );
        let envoy =
            Envoy::start_with(&bin, EnvoyConfig::given(XdsTransport::Sotw, bootstrap)).await;
        // The listener warms until the initial fetch times out, then runs the default config.
        envoy.wait_ready().await;
        let got = probe(&envoy).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, (status, None, None), "{strategy}");
        let r = envoy.get("ingress_http", "/").await.unwrap();
        if status == 200 {
            assert_eq!(r.text(), "upstream\n");
        }
        let resource = format!("{RESOURCE_PREFIX}shop.guard");
        assert_eq!(envoy.ecds_counter(&resource, "update_success").await, 0);
    }
}
