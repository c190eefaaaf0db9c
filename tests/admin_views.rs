//! `/debug/plugins` and `/debug/cache` of a real `wasm-ecds serve` process, built on request
//! (docs/cli.md "Admin endpoints"): a cursor walks every plugin (processed or refused) exactly once,
//! `?plugin=` picks one, a bad query is a one-line 400; an edit shows its new resource version;
//! `/modules/<sha256>.wasm` follows the modules plugins serve; `/debug/cache` pages the same way.
//! Everything is real: the process, its admin port, the file system, an HTTP module server.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use support::faults::{ModuleServer, Route};
use support::serve::{write_plugin, write_url_plugin, Process};
use support::wasm_module;

/// A WasmPlugin refused by validation (a pull policy that does not exist).
fn write_refused(plugins: &Path, name: &str) {
    let text = format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec: {{url: 'file:///nowhere.wasm', imagePullPolicy: Sometimes}}\n"
    );
    std::fs::write(plugins.join(format!("{name}.yaml")), text).unwrap();
}

fn names(v: &Value, list: &str) -> Vec<String> {
    (v[list].as_array().unwrap().iter())
        .map(|p| p["plugin"].as_str().unwrap().to_string())
        .collect()
}

/// Polls (bounded) until `?plugin=default/<name>` shows an outcome for a resource version other
/// than `not`; returns its entry.
fn wait_processed(serve: &Process, name: &str, not: &str) -> Value {
    let path = format!("/debug/plugins?plugin=default/{name}");
    let done = |v: &Value| {
        let p = &v["plugins"][0];
        // The outcome shown is the current version's once it was processed.
        p.is_object()
            && p["resourceVersion"] != not
            && p["processedResourceVersion"] == p["resourceVersion"]
    };
    serve.wait_until(&format!("{name} processed"), |s| done(&s.json(&path)));
    serve.json(&path)["plugins"][0].clone()
}

#[test]
fn a_cursor_walks_every_plugin_once_and_a_bad_query_is_a_one_line_400() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let module = dir.path().join("m.wasm");
    std::fs::write(&module, wasm_module("m")).unwrap();
    let mut want = Vec::new();
    for i in 0..23 {
        let name = format!("p{i:02}");
        write_plugin(&plugins, &name, &module);
        want.push(format!("default/{name}"));
    }
    for name in ["p05x", "zz-refused"] {
        write_refused(&plugins, name);
        want.push(format!("default/{name}"));
    }
    want.sort();
    let serve = Process::start(dir.path(), &[]);
    assert!(serve.wait_ready());
    serve.wait_until("every plugin processed", |s| {
        let v = s.plugins();
        names(&v, "plugins").len() == 23
            && (v["plugins"].as_array().unwrap().iter()).all(|p| !p["outcome"].is_null())
    });

    // Small: one page, today's shape, nothing after it.
    let all = serve.plugins();
    assert_eq!(names(&all, "plugins").len(), 23);
    assert_eq!(
        names(&all, "refused"),
        ["default/p05x", "default/zz-refused"]
    );
    assert!(all["fileErrors"].as_array().unwrap().is_empty());
    assert!(all["next"].is_null(), "{all}");

    // Pages of 4: each plugin exactly once, in order, refused ones included.
    let mut seen = Vec::new();
    let mut path = "/debug/plugins?limit=4".to_string();
    let mut pages = 0;
    loop {
        let page = serve.json(&path);
        pages += 1;
        let mut here: Vec<String> = names(&page, "plugins");
        here.extend(names(&page, "refused"));
        assert!(!here.is_empty() && here.len() <= 4, "{page}");
        seen.extend(here);
        match page["next"].as_str() {
            Some(next) => path = format!("/debug/plugins?limit=4&after={next}"),
            None => break,
        }
        assert!(pages < 20, "the cursor never ends");
    }
    assert_eq!(pages, 25usize.div_ceil(4));
    seen.sort();
    assert_eq!(seen, want);

    // One plugin, processed or refused; an unknown one is an empty answer.
    let one = serve.json("/debug/plugins?plugin=default%2Fp07");
    assert_eq!(names(&one, "plugins"), ["default/p07"]);
    assert!(one["refused"].as_array().unwrap().is_empty() && one["next"].is_null());
    let refused = serve.json("/debug/plugins?plugin=default/zz-refused");
    assert!(names(&refused, "plugins").is_empty());
    assert_eq!(refused["refused"][0]["field"], "spec.imagePullPolicy");
    let none = serve.json("/debug/plugins?plugin=default/absent");
    assert!(names(&none, "plugins").is_empty() && names(&none, "refused").is_empty());

    for (query, culprit) in [
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("after=", "after"),
        ("plugin=default/p01&limit=3", "plugin"),
        ("page=2", "page"),
    ] {
        let (status, body) = serve.get(&format!("/debug/plugins?{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body.contains(culprit) && body.trim_end().lines().count() == 1,
            "{query}: {body}"
        );
    }
    let (status, body) = serve.get("/debug/cache?after=no-checksum");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("after"), "{body}");
    // The server goes on serving after bad queries.
    assert_eq!(names(&serve.plugins(), "plugins").len(), 23);
}

#[test]
fn an_edit_shows_its_new_resource_version_and_the_modules_endpoint_follows() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let (a, b) = (dir.path().join("a.wasm"), dir.path().join("b.wasm"));
    std::fs::write(&a, wasm_module("a")).unwrap();
    std::fs::write(&b, wasm_module("b")).unwrap();
    write_plugin(&plugins, "edited", &a);
    write_plugin(&plugins, "other", &b);
    let serve = Process::start(dir.path(), &[]);
    assert!(serve.wait_ready());
    let before = wait_processed(&serve, "edited", "");
    let sha_a = before["serves"]["sha256"].as_str().unwrap().to_string();
    let sha_b = wait_processed(&serve, "other", "")["serves"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let module = |sha: &str| serve.get(&format!("/modules/{sha}.wasm")).0;
    assert_eq!(module(&sha_a), 200);
    assert_eq!(module(&sha_b), 200);

    // `edited` moves to module b: a new resource version, and module a is no longer offered.
    write_plugin(&plugins, "edited", &b);
    let after = wait_processed(
        &serve,
        "edited",
        before["resourceVersion"].as_str().unwrap(),
    );
    assert_ne!(after["resourceVersion"], before["resourceVersion"]);
    assert_eq!(after["serves"]["sha256"], sha_b.as_str());
    serve.wait_until("module a no longer offered", |_| module(&sha_a) == 404);
    assert_eq!(module(&sha_b), 200);

    // A new module served by a new plugin is offered.
    let c = dir.path().join("c.wasm");
    std::fs::write(&c, wasm_module("c")).unwrap();
    write_plugin(&plugins, "third", &c);
    let third = wait_processed(&serve, "third", "");
    let sha_c = third["serves"]["sha256"].as_str().unwrap().to_string();
    assert_eq!(module(&sha_c), 200);
    // Gone with its only plugin.
    std::fs::remove_file(plugins.join("third.yaml")).unwrap();
    serve.wait_until("module c no longer offered", |_| module(&sha_c) == 404);
    assert_eq!(module(&sha_b), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_view_pages_and_filters_by_module() {
    let routes: Vec<(String, Route)> = (0..5)
        .map(|i| {
            (
                format!("/m/{i}.wasm"),
                Route::Body(wasm_module(&format!("m{i}"))),
            )
        })
        .collect();
    let host = ModuleServer::start(
        routes
            .iter()
            .map(|(p, r)| (p.as_str(), r.clone()))
            .collect(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    for i in 0..5 {
        write_url_plugin(
            &plugins,
            &format!("h{i}"),
            &host.url(&format!("/m/{i}.wasm")),
        );
    }
    let urls: Vec<String> = (0..5).map(|i| host.url(&format!("/m/{i}.wasm"))).collect();
    // The admin client blocks: off the runtime that runs the module server.
    let dir_path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || cache_pages(&dir_path, &urls))
        .await
        .unwrap();
}

fn cache_pages(dir: &Path, urls: &[String]) {
    let serve = Process::start(dir, &[]);
    assert!(serve.wait_ready());
    serve.wait_until("five modules cached", |s| {
        s.json("/debug/cache")["modules"].as_array().unwrap().len() == 5
    });
    let all = serve.json("/debug/cache");
    assert!(all["next"].is_null(), "{all}");
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut path = "/debug/cache?limit=2".to_string();
    for _ in 0..10 {
        let page = serve.json(&path);
        let modules = page["modules"].as_array().unwrap();
        assert!(!modules.is_empty() && modules.len() <= 2, "{page}");
        for m in modules {
            let plugins = (m["plugins"].as_array().unwrap().iter())
                .map(|p| p.as_str().unwrap().to_string())
                .collect();
            assert!(seen
                .insert(m["module"].as_str().unwrap().into(), plugins)
                .is_none());
        }
        match page["next"].as_str() {
            Some(next) => {
                let next: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
                path = format!("/debug/cache?limit=2&after={next}");
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    for (i, url) in urls.iter().enumerate() {
        assert_eq!(seen[url], [format!("default/h{i}")]);
    }
    let encoded: String = url::form_urlencoded::byte_serialize(urls[3].as_bytes()).collect();
    let one = serve.json(&format!("/debug/cache?module={encoded}"));
    assert_eq!(one["modules"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["modules"][0]["module"], urls[3].as_str());
}

/// `/readyz` stays `503` while the initial plugin's pull is held by its module server, the debug
/// view answers meanwhile (the plugin without an outcome), and both turn once the pull completes.
#[test]
fn readiness_waits_for_the_initial_pull_and_the_view_answers_meanwhile() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (asked_tx, asked) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let body = wasm_module("held");
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                line.clear();
            }
            let _ = asked_tx.send(());
            // Held until the test lets it go (or gives up).
            let _ = released.recv_timeout(std::time::Duration::from_secs(60));
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&body);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/held.wasm");
    write_url_plugin(&dir.path().join("plugins"), "held", &url);
    let serve = Process::start(dir.path(), &[]);
    asked
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the pull reached the module server");
    assert_eq!(serve.get("/readyz").0, 503);
    let view = serve.json("/debug/plugins?plugin=default/held");
    assert_eq!(names(&view, "plugins"), ["default/held"]);
    assert!(view["plugins"][0]["outcome"].is_null(), "{view}");
    assert_eq!(serve.get("/readyz").0, 503, "still held");
    release.send(()).unwrap();
    assert!(serve.wait_ready());
    let done = wait_processed(&serve, "held", "");
    assert_eq!(done["outcome"], "pulled", "{done}");
}

/// A module shared by 230 plugins: its `/debug/cache` entry lists the first 100 with their count,
/// and `/debug/plugins?module=<sha256>` pages through every user from the entry's `pluginsNext`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_module_entry_lists_100_users_and_the_others_are_paged() {
    let host =
        ModuleServer::start(vec![("/shared.wasm", Route::Body(wasm_module("shared")))]).await;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let url = host.url("/shared.wasm");
    for i in 0..230 {
        write_url_plugin(&plugins, &format!("u{i:03}"), &url);
    }
    let dir_path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || shared_module_users(&dir_path))
        .await
        .unwrap();
}

fn shared_module_users(dir: &Path) {
    let serve = Process::start(dir, &[]);
    assert!(serve.wait_ready());
    serve.wait_until("every plugin references the module", |s| {
        s.json("/debug/cache")["modules"][0]["pluginCount"] == 230
    });
    let entry = serve.json("/debug/cache")["modules"][0].clone();
    let listed: Vec<String> = (entry["plugins"].as_array().unwrap().iter())
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..230).map(|i| format!("default/u{i:03}")).collect();
    assert_eq!(listed, want[..100], "the first 100 in name order");
    assert_eq!(entry["pluginsNext"], "default/u099");
    let sha = entry["sha256"].as_str().unwrap();

    // The rest, from the entry's cursor, in pages of 60: whole plugin entries, each once.
    let mut seen = listed;
    let mut after = entry["pluginsNext"].as_str().unwrap().to_string();
    let mut pages = 0;
    loop {
        let page = serve.json(&format!(
            "/debug/plugins?module={sha}&after={after}&limit=60"
        ));
        pages += 1;
        let here = names(&page, "plugins");
        assert!(!here.is_empty() && here.len() <= 60, "{page}");
        assert!((page["plugins"].as_array().unwrap().iter()).all(|p| p["serves"]["sha256"] == sha));
        assert!(page["refused"].as_array().unwrap().is_empty());
        seen.extend(here);
        match page["next"].as_str() {
            Some(next) => after = next.to_string(),
            None => break,
        }
        assert!(pages < 10, "the cursor never ends");
    }
    assert_eq!(pages, 3, "130 users in pages of 60");
    assert_eq!(seen, want);
    // From the start, and for bytes no cached module has.
    let first = serve.json(&format!("/debug/plugins?module={sha}&limit=2"));
    assert_eq!(names(&first, "plugins"), want[..2]);
    assert_eq!(first["next"], "default/u001");
    let other = "0".repeat(64);
    let none = serve.json(&format!("/debug/plugins?module={other}"));
    assert!(
        names(&none, "plugins").is_empty() && none["next"].is_null(),
        "{none}"
    );
    for (query, culprit) in [
        ("module=ABC", "module"),
        ("module=&limit=2", "module"),
        (&*format!("module={sha}&plugin=default/u001"), "plugin"),
    ] {
        let (status, body) = serve.get(&format!("/debug/plugins?{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body.contains(culprit) && body.trim_end().lines().count() == 1,
            "{query}: {body}"
        );
    }
}

/// Seven bad plugin files: a page lists at most `limit` of them with their count, and
/// `?fileErrors=<fileErrorsNext>` pages through the others, each once.
#[test]
fn file_errors_are_paged() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let module = dir.path().join("m.wasm");
    std::fs::write(&module, wasm_module("m")).unwrap();
    write_plugin(&plugins, "good", &module);
    for i in 0..7 {
        std::fs::write(plugins.join(format!("bad{i}.yaml")), "kind: [unclosed\n").unwrap();
    }
    let serve = Process::start(dir.path(), &[]);
    assert!(serve.wait_ready());
    let first = serve.json("/debug/plugins?limit=3");
    assert_eq!(first["fileErrorCount"], 7, "{first}");
    assert_eq!(first["fileErrors"].as_array().unwrap().len(), 3);
    assert_eq!(first["fileErrorsNext"], 3);
    let file = |e: &Value| e["file"].as_str().unwrap().to_string();
    let mut seen: Vec<String> = first["fileErrors"]
        .as_array()
        .unwrap()
        .iter()
        .map(file)
        .collect();
    let mut from = first["fileErrorsNext"].as_u64();
    while let Some(f) = from {
        let page = serve.json(&format!("/debug/plugins?fileErrors={f}&limit=3"));
        assert!(
            names(&page, "plugins").is_empty() && page["next"].is_null(),
            "{page}"
        );
        assert_eq!(page["fileErrorCount"], 7);
        let errors = page["fileErrors"].as_array().unwrap();
        assert!(!errors.is_empty() && errors.len() <= 3, "{page}");
        seen.extend(errors.iter().map(file));
        from = page["fileErrorsNext"].as_u64();
        assert!(seen.len() <= 7, "the cursor never ends");
    }
    let mut want: Vec<String> = (0..7).map(|i| format!("bad{i}.yaml")).collect();
    let mut short: Vec<String> = (seen.iter())
        .map(|f| {
            Path::new(f)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    short.sort();
    want.sort();
    assert_eq!(short, want);
    // The default page has room for all of them; a later plugin page has none.
    let all = serve.plugins();
    assert_eq!(all["fileErrors"].as_array().unwrap().len(), 7);
    assert!(all["fileErrorsNext"].is_null());
    for (query, culprit) in [
        ("fileErrors=x", "fileErrors"),
        ("fileErrors=2&after=default/good", "fileErrors"),
    ] {
        let (status, body) = serve.get(&format!("/debug/plugins?{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body.contains(culprit) && body.trim_end().lines().count() == 1,
            "{query}: {body}"
        );
    }
}
