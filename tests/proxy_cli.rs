//! `wasm-ecds proxy` as users run it (docs/cli.md "proxy"): what it refuses at start-up (exit 2,
//! one line naming the flag) and a clean start and SIGTERM exit with an upstream that is not there.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

fn proxy(args: &[&str], cache: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasm-ecds"));
    cmd.arg("proxy")
        .args([
            "--xds-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
        ])
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .env_remove("WASM_ECDS_PLUGINS")
        .env_remove("WASM_ECDS_UPSTREAM")
        .env("RUST_LOG", "off");
    cmd
}

fn run(args: &[&str]) -> Output {
    let cache = tempfile::tempdir().unwrap();
    proxy(args, cache.path()).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn refused_options_are_startup_errors_naming_the_flag() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--upstream", "127.0.0.1:1", "--plugins", "."],
            "--plugins: proxy takes its resources from --upstream",
        ),
        (
            &["--upstream", "127.0.0.1:1", "--source", "kubernetes"],
            "--source kubernetes: proxy takes",
        ),
        (
            &["--upstream", "127.0.0.1:1", "--upstream-ca", "ca.pem"],
            "--upstream-ca needs an https:// URL",
        ),
        (
            &[
                "--upstream",
                "https://h:1",
                "--upstream-ca",
                "/nonexistent/ca.pem",
            ],
            "--upstream-ca /nonexistent/ca.pem:",
        ),
        (
            &["--upstream", "https://h:1", "--upstream-cert", "c.pem"],
            "--upstream-key",
        ),
    ];
    for (args, want) in cases {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--upstream"), "{}", stderr(&out));
}

#[test]
fn starts_without_its_upstream_and_exits_0_on_sigterm() {
    let cache = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens, so every upstream stream fails and is retried.
    let mut child = proxy(&["--upstream", "127.0.0.1:1"], cache.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("wasm-ecds: xds on 127.0.0.1:"), "{line}");
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
            panic!("proxy did not exit within 10 s of SIGTERM")
        });
    assert_eq!(status.code(), Some(0));
}
