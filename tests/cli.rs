//! The command line as users run it (docs/cli.md): `check` and `explain` on Istio-style manifests,
//! exit statuses, JSON shapes, help texts, startup errors naming the flag or the variable, startup
//! warnings, and no colour escapes when the output is not a terminal.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::serve::ServeCommand;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run wasm-ecds")
}

#[test]
fn explain_json_names_policy_rule_module_checksum_and_resource() {
    let out = run(&["explain", "--json", "examples/plugins/istio-docs.yaml"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: Vec<(String, String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
            (s("plugin"), s("policy"), s("rule"))
        })
        .collect();
    let want = [
        ("istio-ingress/openid-connect", "IfNotPresent", "explicit"),
        ("istio-system/basic-auth", "IfNotPresent", "default"),
        ("default/latest-stats", "Always", "latest-tag"),
        ("default/pinned-header", "IfNotPresent", "digest"),
        ("default/http-checksummed", "IfNotPresent", "sha256"),
        ("default/tcp-metadata", "None", "file"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(rows, want);
    let first = &v[0];
    assert_eq!(
        first["module"],
        "oci://private-registry:5000/openid-connect/openid"
    );
    assert_eq!(
        first["resource"],
        "extensions.istio.io/wasmplugin/istio-ingress.openid-connect"
    );
    assert_eq!(v[3]["checksum"].as_str().unwrap().len(), 64);
    // The pull secret in the file is never echoed.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("not-a-real-password"));
}

#[test]
fn check_passes_valid_manifests_and_reports_every_problem_of_broken_ones() {
    let ok = run(&["check", "examples/plugins/istio-docs.yaml"]);
    assert_eq!(ok.status.code(), Some(0));
    assert!(ok.stdout.is_empty());

    let bad = run(&["check", "--json", "examples/plugins/broken.yaml"]);
    assert_eq!(bad.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&bad.stdout).unwrap();
    let fields: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["plugin"].as_str().unwrap().into(),
                p["field"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want = [
        ("default/bad-checksum", "spec.sha256"),
        ("default/bad-scheme", "spec.url"),
        ("default/two-selectors", "spec.selector"),
        ("default/two-selectors", "spec.vmConfig.env"),
        ("default/typo", "spec.imagePullPolicy"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(fields, want);
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["file"] == "examples/plugins/broken.yaml"));

    let text = run(&["check", "examples/plugins/broken.yaml"]);
    let first = String::from_utf8_lossy(&text.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(
        first.starts_with("examples/plugins/broken.yaml: default/bad-checksum: spec.sha256: "),
        "{first}"
    );
}

#[test]
fn check_and_explain_read_envoy_filters_patch_by_patch() {
    let example = "examples/envoyfilter/basic-auth.yaml";
    let ok = run(&["check", example]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout),
        format!("{example}: istio-system/basic-auth: configPatches[0] (HTTP_FILTER): ignored, only EXTENSION_CONFIG ADD patches are served\n")
    );
    let v: Value = serde_json::from_slice(&run(&["check", "--json", example]).stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["note"], true);
    let out = run(&["explain", "--json", example]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    let e = &v[0];
    assert_eq!(
        e["plugin"],
        "istio-system/basic-auth-config/istio.basic_auth"
    );
    assert_eq!(
        (e["policy"].as_str(), e["rule"].as_str()),
        (Some("IfNotPresent"), Some("sha256"))
    );
    assert_eq!(e["resource"], "istio.basic_auth");
    assert_eq!(e["module"], "http://127.0.0.1:18080/module.wasm");

    // A bad patch is a problem on its own path; a resource name taken twice is one too.
    let dir = tempfile::tempdir().unwrap();
    let patch = |name: &str, uri: &str| {
        format!(
            "- applyTo: EXTENSION_CONFIG\n  patch:\n    operation: ADD\n    value:\n      name: {name}\n      typed_config:\n        '@type': type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm\n        config: {{vm_config: {{code: {{remote: {{http_uri: {{uri: '{uri}'}}}}}}}}}}\n"
        )
    };
    let filter = |name: &str, patches: &str| {
        format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {{name: {name}, namespace: apps}}\nspec:\n  configPatches:\n{}",
            patches.lines().map(|l| format!("  {l}\n")).collect::<String>()
        )
    };
    let a = filter(
        "a",
        &(patch("shared", "https://h/a.wasm") + &patch("bad", "ftp://h/b.wasm")),
    );
    std::fs::write(dir.path().join("a.yaml"), a).unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        filter("b", &patch("shared", "oci://r/b:v1")),
    )
    .unwrap();
    let out = run(&["check", "--json", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let fields: Vec<(&str, &str)> = (v.as_array().unwrap().iter())
        .map(|p| (p["plugin"].as_str().unwrap(), p["field"].as_str().unwrap()))
        .collect();
    let uri =
        "spec.configPatches[1].patch.value.typed_config.config.vm_config.code.remote.http_uri.uri";
    assert_eq!(
        fields,
        [
            ("apps/a", uri),
            ("apps/b", "spec.configPatches[0].patch.value.name")
        ],
        "{v}"
    );
    assert!(
        v[1]["message"].as_str().unwrap().contains("apps/a/shared"),
        "{v}"
    );

    // bootstrap selects WasmPlugins only: the EnvoyFilter file neither adds a filter nor fails it.
    let out = run(&[
        "bootstrap",
        "--plugins",
        "examples/envoy/plugins",
        "--plugins",
        example,
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("# wasm-ecds bootstrap for namespace default: default/hello\n"));
    assert!(!text.contains("istio.basic_auth"), "{text}");
}

#[test]
fn unreadable_input_is_exit_2() {
    let out = run(&["check", "examples/plugins/does-not-exist.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does-not-exist.yaml"));
}

#[test]
fn bad_configuration_is_a_startup_error_naming_the_variable() {
    for (var, value) in [
        ("WASM_MODULE_EXPIRY", "tomorrow"),
        ("WASM_MODULE_EXPIRY", "1d"),
        ("WASM_PURGE_INTERVAL", "5min"),
        ("WASM_HTTP_REQUEST_TIMEOUT", "1 h"),
        ("WASM_HTTP_REQUEST_MAX_RETRIES", "many"),
        ("BLOCKED_CIDRS_IN_WASM_FETCH", "10.0.0.0/99"),
        ("WASM_MAX_BINARY_SIZE_BYTES", "big"),
        ("WASM_ECDS_DELIVERY", "carrier-pigeon"),
        ("WASM_ECDS_PLUGINS", "/does/not/exist/plugins.yaml"),
    ] {
        let out = ServeCommand::new().env(var, value).output();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(var), "{var}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn a_bad_flag_is_a_startup_error_naming_the_flag_even_with_the_variable_set() {
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
        .args(["serve", "--module-expiry", "1d"])
        .env("WASM_MODULE_EXPIRY", "2h")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        r#"error: --module-expiry: invalid duration "1d": unknown unit "d" (ns, us, µs, ms, s, m, h)"#
    );
    // The variables are bad too, but the flags win; addresses are checked first.
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
        .args([
            "serve",
            "--xds-address",
            "127.0.0.1:0",
            "--module-expiry",
            "2h",
        ])
        .args(["--purge-interval", "0"])
        .env("WASM_ECDS_XDS_ADDRESS", "nope")
        .env("WASM_MODULE_EXPIRY", "1d")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        r#"error: --purge-interval: invalid duration "0": must be more than 0"#
    );
}

#[test]
fn explain_says_which_plugins_are_invalid_and_exits_1() {
    let out = run(&["explain", "--json", "examples/plugins/broken.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{v:#}");
    for r in rows {
        assert!(
            r.get("policy").is_none(),
            "an invalid plugin has no policy: {r}"
        );
        assert_eq!(r["file"], "examples/plugins/broken.yaml");
    }
    assert_eq!(rows[0]["plugin"], "default/bad-checksum");
    assert_eq!(rows[0]["invalid"][0]["field"], "spec.sha256");
    assert!(rows[0]["invalid"][0]["message"]
        .as_str()
        .unwrap()
        .contains("64 lowercase hex"));
    let fields: Vec<&str> = rows[2]["invalid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["spec.selector", "spec.vmConfig.env"]);

    let text = run(&["explain", "examples/plugins/broken.yaml"]);
    assert_eq!(text.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&text.stdout);
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some("default/bad-checksum (examples/plugins/broken.yaml): invalid, not served")
    );
    assert!(
        lines.next().unwrap().starts_with("  spec.sha256: "),
        "{stdout}"
    );
    assert!(!stdout.contains("rule:"), "{stdout}");
}

#[test]
fn help_texts_document_the_arguments_and_point_inside_the_repository() {
    let help = |args: &[&str]| {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let check = help(&["check", "--help"]);
    assert!(check.contains("docs/behavior.md §1"), "{check}");
    assert!(check.contains("EnvoyFilter"), "{check}");
    let explain = help(&["explain", "--help"]);
    for text in [&check, &explain] {
        assert!(text.contains("--json") && text.contains("Print"), "{text}");
        assert!(text.contains("Manifest files or directories"), "{text}");
    }
    let serve = help(&["serve", "--help"]);
    assert!(serve.contains("Repeat the flag"), "{serve}");
    assert!(serve.contains("[env: WASM_ECDS_PLUGINS=]"), "{serve}");
    assert!(
        serve.contains("wasm-ecds]"),
        "resolved cache dir default: {serve}"
    );
    for text in [
        help(&["--help"]),
        check,
        explain,
        serve,
        help(&["sim", "--help"]),
    ] {
        assert!(!text.contains("../") && !text.contains("shared/"), "{text}");
    }
}

/// Starts `serve` with its cache in a temporary directory, reads its stderr until it says where
/// it listens, kills it; returns what it read.
fn serve_startup(args: &[&str]) -> String {
    let cache = tempfile::tempdir().unwrap();
    let serve = ServeCommand::new()
        .cache_dir(cache.path())
        .args(args)
        .start();
    let mut seen = serve.startup.join("\n");
    seen.push('\n');
    seen
}

#[test]
fn serve_warns_when_it_has_nothing_or_a_missing_path_to_serve() {
    let stderr = serve_startup(&[]);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(
        warnings,
        ["warning: no --plugins (or WASM_ECDS_PLUGINS) given: no plugin will be served"]
    );

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let stderr = serve_startup(&["--plugins", missing.to_str().unwrap()]);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].starts_with("warning: --plugins ") && warnings[0].contains("missing.yaml"),
        "{stderr}"
    );

    let plugins = tempfile::tempdir().unwrap();
    let stderr = serve_startup(&["--plugins", plugins.path().to_str().unwrap()]);
    assert!(!stderr.contains("warning: "), "{stderr}");

    // A path whose directory does not exist cannot be watched: an error, naming the flag.
    let out = run(&["serve", "--plugins", "/does/not/exist/plugins.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: --plugins: "), "{stderr}");
}

#[test]
fn no_colour_escapes_when_output_is_not_a_terminal() {
    let mut outputs = vec![serve_startup(&[]).into_bytes()];
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["serve", "--no-such-flag"],
        &["check", "examples/plugins/broken.yaml"],
        &["explain", "examples/plugins/istio-docs.yaml"],
        &["sim", "--trace", "scenarios/basics"],
    ] {
        let out = run(args);
        outputs.push(out.stdout);
        outputs.push(out.stderr);
    }
    for o in outputs {
        assert!(
            !o.windows(2).any(|w| w == b"\x1b["),
            "{}",
            String::from_utf8_lossy(&o)
        );
    }
}

/// cli.md: SIGTERM stops `serve` (stop accepting, close streams) and exits 0 within a few seconds;
/// `/readyz` answers once the (here empty) plugin set is processed.
#[test]
fn serve_exits_0_on_sigterm() {
    let cache = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let serve = ServeCommand::new()
        .cache_dir(cache.path())
        .plugins(plugins.path())
        .log("off")
        .start();
    assert!(
        serve.startup.last().unwrap().contains("xds on 127.0.0.1:"),
        "{:?}",
        serve.startup
    );
    assert!(
        serve.wait_ready(),
        "/readyz never answered 200 on {}",
        serve.admin
    );
    assert_eq!(serve.terminate().0, Some(0));
}
