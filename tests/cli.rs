//! The command line as users run it (cli.md): `check` and `explain` on Istio-style manifests,
//! exit statuses, JSON shapes, and startup errors naming the variable.

use std::process::{Command, Output};

use serde_json::Value;

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
fn unreadable_input_is_exit_2() {
    let out = run(&["check", "examples/plugins/does-not-exist.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does-not-exist.yaml"));
}

#[test]
fn bad_configuration_is_a_startup_error_naming_the_variable() {
    for (var, value) in [
        ("WASM_MODULE_EXPIRY", "tomorrow"),
        ("WASM_HTTP_REQUEST_MAX_RETRIES", "many"),
        ("BLOCKED_CIDRS_IN_WASM_FETCH", "10.0.0.0/99"),
        ("WASM_MAX_BINARY_SIZE_BYTES", "big"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
            .args([
                "serve",
                "--xds-address",
                "127.0.0.1:0",
                "--admin-address",
                "127.0.0.1:0",
            ])
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(var), "{var}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

/// cli.md: SIGTERM stops `serve` (stop accepting, close streams) and exits 0 within a few seconds;
/// `/readyz` answers once the (here empty) plugin set is processed.
#[test]
fn serve_exits_0_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let cache = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
        .args([
            "serve",
            "--xds-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ])
        .arg("--plugins")
        .arg(plugins.path())
        .arg("--cache-dir")
        .arg(cache.path())
        .env("RUST_LOG", "off")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // "wasm-ecds: xds on ADDR, admin on ADDR"
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let admin = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(line.contains("xds on 127.0.0.1:"), "{line}");
    let ready = (0..100).any(|_| {
        let ok = std::net::TcpStream::connect(&admin)
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n")?;
                let mut r = String::new();
                s.read_to_string(&mut r)?;
                Ok(r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false);
        if !ok {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        ok
    });
    assert!(ready, "/readyz never answered 200 on {admin}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = (0..100)
        .find_map(|_| {
            let s = child.try_wait().unwrap();
            if s.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            s
        })
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("serve did not exit within 10 s of SIGTERM")
        });
    assert_eq!(status.code(), Some(0));
}
