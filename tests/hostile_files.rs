//! `serve --plugins` with a plugins directory holding everything a hostile or careless user can put
//! there, next to good plugins (docs/cli.md "What the plugins directory may hold"): symbolic link
//! loops, a FIFO and a link to `/dev/zero` named like manifests, a directory that cannot be read,
//! a YAML alias bomb and a duplicate definition. The real binary must become ready, serve the good
//! plugins, report each bad path in `/debug/plugins` `fileErrors`, answer `/healthz` and stop on
//! SIGTERM.
//!
//! Unreadable directories need a user that permissions apply to: as root (CI), `serve` runs as
//! nobody (65534) through `setpriv`.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::serve::{Process, ServeCommand};

/// A minimal valid Wasm module.
const MODULE: &[u8] = b"\0asm\x01\0\0\0";

fn plugin(name: &str, url: &str) -> String {
    format!("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}}}\nspec: {{url: '{url}'}}\n")
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The `serve` process, as an unprivileged user when the tests run as root.
fn start(plugins: &Path, cache: &Path) -> Process {
    ServeCommand::unprivileged()
        .cache_dir(cache)
        .plugins(plugins)
        .log("warn")
        .start()
}

fn file_error<'a>(plugins: &'a Value, path: &Path) -> Option<&'a str> {
    let path = path.display().to_string();
    plugins["fileErrors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["file"] == path)
        .map(|e| e["message"].as_str().unwrap())
}

fn served_url(plugins: &Value, key: &str) -> Option<String> {
    let p = plugins["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["plugin"] == key)?;
    (p["serves"]["kind"] == "module").then(|| p["url"].as_str().unwrap().to_string())
}

#[test]
fn serve_survives_a_hostile_plugins_directory() {
    let work = tempfile::tempdir().unwrap();
    chmod(work.path(), 0o755);
    let cache = work.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    chmod(&cache, 0o777);
    let module = work.path().join("good.wasm");
    std::fs::write(&module, MODULE).unwrap();
    let url = format!("file://{}", module.display());

    let dir = work.path().join("plugins");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("a.yaml"), plugin("a", &url)).unwrap();
    std::fs::write(dir.join("sub/b.yaml"), plugin("b", &url)).unwrap();
    // Read at start-up, then made unreadable: it keeps being served.
    std::fs::create_dir(dir.join("later")).unwrap();
    std::fs::write(dir.join("later/c.yaml"), plugin("c", &url)).unwrap();
    // Symbolic link loops.
    std::os::unix::fs::symlink(&dir, dir.join("l1")).unwrap();
    std::os::unix::fs::symlink(&dir, dir.join("sub/l2")).unwrap();
    // A FIFO and an endless device named like manifests.
    let fifo = dir.join("x.yaml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    std::os::unix::fs::symlink("/dev/zero", dir.join("z.yaml")).unwrap();
    // A directory that cannot be read (as lost+found at a volume root).
    let locked = dir.join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::write(locked.join("hidden.yaml"), plugin("hidden", &url)).unwrap();
    chmod(&locked, 0o000);
    // 200 KB that expands to five million values.
    let list = vec!["1"; 100_000].join(",");
    let bomb = format!("a: &a [{list}]\nb: [{}]\n", vec!["*a"; 50].join(","));
    std::fs::write(dir.join("bomb.yaml"), bomb).unwrap();
    // A second definition of `a`, sorting after the first.
    let dup = dir.join("dup.yaml");
    std::fs::write(&dup, plugin("a", "file:///nowhere/else.wasm")).unwrap();

    let serve = start(&dir, &cache);
    serve.wait_until("readiness", |s| {
        s.try_get("/readyz").is_ok_and(|(status, _)| status == 200)
    });
    let (status, _) = serve.try_get("/healthz").unwrap();
    assert_eq!(status, 200);
    let plugins = serve.plugins();
    for key in ["default/a", "default/b", "default/c"] {
        assert_eq!(
            served_url(&plugins, key).as_deref(),
            Some(url.as_str()),
            "{key}: {plugins}"
        );
    }
    let error = |path: &Path| {
        file_error(&plugins, path)
            .unwrap_or_else(|| panic!("no file error for {}: {plugins}", path.display()))
            .to_string()
    };
    for link in [dir.join("l1"), dir.join("sub/l2")] {
        assert!(
            error(&link).starts_with("symbolic link loop"),
            "{}",
            error(&link)
        );
    }
    assert_eq!(
        error(&fifo),
        "not a regular file (a FIFO): only regular files are read"
    );
    assert!(error(&dir.join("z.yaml")).starts_with("not a regular file (a character device)"));
    assert!(
        error(&locked).starts_with("cannot read directory: Permission denied"),
        "the server must really have been refused: {}",
        error(&locked)
    );
    assert!(
        error(&dir.join("bomb.yaml"))
            .starts_with("document 1: too large once YAML aliases are expanded"),
        "{}",
        error(&dir.join("bomb.yaml"))
    );
    assert!(
        error(&dup).contains("WasmPlugin default/a is already defined by"),
        "{}",
        error(&dup)
    );
    assert_eq!(
        plugins["fileErrors"].as_array().unwrap().len(),
        7,
        "{plugins}"
    );

    // A directory read before and unreadable now keeps its plugins; the change is seen.
    chmod(&dir.join("later"), 0o000);
    serve.wait_until("the error of later/", |s| {
        file_error(&s.plugins(), &dir.join("later")).is_some()
    });
    let plugins = serve.plugins();
    assert_eq!(
        served_url(&plugins, "default/c").as_deref(),
        Some(url.as_str())
    );
    assert_eq!(serve.try_get("/healthz").unwrap().0, 200);

    // Directories are watched one by one: one created now is read, and so are later changes in it.
    std::fs::create_dir(dir.join("new")).unwrap();
    std::fs::write(dir.join("new/d.yaml"), plugin("d", &url)).unwrap();
    serve.wait_until("default/d served", |s| {
        served_url(&s.plugins(), "default/d").is_some()
    });
    std::fs::write(dir.join("new/e.yaml"), plugin("e", &url)).unwrap();
    serve.wait_until("default/e served", |s| {
        served_url(&s.plugins(), "default/e").is_some()
    });

    assert_eq!(serve.terminate().0, Some(0));
    chmod(&locked, 0o755);
    chmod(&dir.join("later"), 0o755);
}

/// Runs `wasm-ecds check DIR`; a bounded wait, since reading a FIFO could block forever.
fn check(dir: &Path) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
        .arg("check")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!(
        "check did not finish within 30 s: {:?}",
        child.wait_with_output()
    );
}

/// `check` reads the same way: it reports a second definition and ends, whatever the directory
/// holds.
#[test]
fn check_reports_duplicates_and_hostile_entries() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("1.yaml"), plugin("a", "oci://r/a:v1")).unwrap();
    std::fs::write(root.join("2.yaml"), plugin("a", "oci://r/a:v2")).unwrap();
    let out = check(root);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].contains("2.yaml")
            && lines[0].contains("WasmPlugin default/a is already defined by"),
        "{stdout}"
    );

    std::os::unix::fs::symlink(root, root.join("loop")).unwrap();
    let fifo = root.join("x.yaml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let out = check(root);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let loop_line = format!("error: {}: symbolic link loop", root.join("loop").display());
    let fifo_line = format!("error: {}: not a regular file (a FIFO)", fifo.display());
    assert!(
        stderr.lines().any(|l| l.starts_with(&loop_line)),
        "{stderr}"
    );
    assert!(
        stderr.lines().any(|l| l.starts_with(&fifo_line)),
        "{stderr}"
    );
}
