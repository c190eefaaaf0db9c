//! End-to-end tests of the simulator: scenarios run against the real engine, reports, exit codes.

use std::path::{Path, PathBuf};

use super::report::{collect, junit_xml, run_paths_to, RunOptions};
use super::runner::run_scenario;
use super::scenario::parse_scenario;

const PLUGIN: &str = r#"
- apply:
    apiVersion: extensions.istio.io/v1alpha1
    kind: WasmPlugin
    metadata: {name: auth}
    spec: {url: "oci://reg.example/filters/auth:v1"}
"#;

fn scenario(name: &str, steps: &str) -> String {
    format!("name: {name}\nmodules: {{v1: {{}}, v2: {{}}}}\nsteps:\n- publish: {{ref: oci://reg.example/filters/auth:v1, module: v1}}\n{PLUGIN}{steps}")
}

fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

fn run(paths: &[PathBuf], opts: &RunOptions) -> (i32, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_paths_to(paths, opts, &mut out, &mut err);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn an_oci_pull_then_a_cache_hit() {
    let s = parse_scenario(&scenario(
        "pull",
        r#"
- expect:
    plugins: {default/auth: {outcome: pulled, serves: v1}}
    cache: [v1]
    requests: {reg.example: {manifest: 1, blob: 1}}
    metrics: {'istio_agent_wasm_remote_fetch_count{result="success"}': 1}
- edit: {plugin: default/auth, patch: {metadata: {labels: {team: a}}}}
- expect:
    plugins: {default/auth: {outcome: cached, serves: v1}}
    requests: {reg.example: 2}
"#,
    ))
    .unwrap();
    let run = run_scenario(&s);
    assert!(run.passed(), "{:#?}\n{}", run.failures, run.trace.joined());
}

#[test]
fn a_failing_check_names_step_check_expected_and_actual() {
    let s = parse_scenario(&scenario(
        "wrong",
        "- expect: {plugins: {auth: {outcome: cached, serves: v2}}, requests: {reg.example: {blob: 7}}}\n- advance: 1h\n",
    ))
    .unwrap();
    let run = run_scenario(&s);
    assert!(!run.passed());
    let checks: Vec<(usize, &str, &str, &str)> = run
        .failures
        .iter()
        .map(|f| {
            (
                f.step,
                f.check.as_str(),
                f.expected.as_str(),
                f.actual.as_str(),
            )
        })
        .collect();
    assert_eq!(
        checks,
        vec![
            (3, "plugins.default/auth.outcome", "cached", "pulled"),
            (3, "plugins.default/auth.serves", "v2", "v1"),
            (3, "requests.reg.example.blob", "7", "1"),
        ]
    );
    // It stopped there: the advance never ran.
    assert!(
        !run.trace.lines().any(|l| l.contains("advance")),
        "{}",
        run.trace.joined()
    );
}

#[test]
fn runtime_errors_fail_the_step() {
    let s = parse_scenario(&scenario(
        "edit unknown",
        "- edit: {plugin: default/nope, patch: {metadata: {labels: {a: b}}}}\n",
    ))
    .unwrap();
    let run = run_scenario(&s);
    assert_eq!(run.failures.len(), 1);
    assert_eq!(
        (run.failures[0].step, run.failures[0].check.as_str()),
        (3, "error")
    );
    assert!(run.failures[0].actual.contains("default/nope"));
    let s = parse_scenario(&scenario(
        "unpublished digest",
        "- expect: {plugins: {auth: {outcome: \"${digest:oci://reg.example/filters/auth:v9}\"}}}\n",
    ));
    // The placeholder digest is not an outcome word: refused at load time.
    assert_eq!(s.unwrap_err().step, Some(3));
    let s = parse_scenario(&scenario(
        "unpublished digest",
        "- apply: {apiVersion: extensions.istio.io/v1alpha1, kind: WasmPlugin, metadata: {name: p}, spec: {url: \"oci://reg.example/x@sha256:${digest:oci://reg.example/filters/auth:v9}\"}}\n",
    ))
    .unwrap();
    let run = run_scenario(&s);
    assert_eq!(run.failures[0].step, 3);
    assert!(
        run.failures[0].actual.contains("nothing is published"),
        "{:?}",
        run.failures
    );
}

#[test]
fn traces_are_identical_across_runs() {
    let text = scenario(
        "trace",
        r#"
- fail: {host: reg.example, kind: blob, error: {status: 503}, times: 2}
- edit: {plugin: default/auth, patch: {spec: {url: "oci://reg.example/filters/auth:v2"}}}
- publish: {ref: oci://reg.example/filters/auth:v2, module: v2, format: docker}
- advance: 30h
- restart: {keepCache: false}
- advance: 2s
"#,
    );
    let a = run_scenario(&parse_scenario(&text).unwrap());
    let b = run_scenario(&parse_scenario(&text).unwrap());
    assert!(a.trace.len() > 10, "{}", a.trace.joined());
    assert_eq!(a.trace, b.trace);
    assert!(
        a.trace
            .lines()
            .all(|l| l.starts_with('[') && l.contains("s] ")),
        "{}",
        a.trace.joined()
    );
    assert!(a
        .trace
        .lines()
        .any(|l| l.contains("request reg.example manifest /v2/filters/auth/manifests/v1 -> 200")));
    assert!(
        a.trace.lines().any(|l| l.contains("expired")),
        "{}",
        a.trace.joined()
    );
}

#[test]
fn text_report_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "b/pass.yaml",
        &scenario("passes", "- expect: {plugins: {auth: {outcome: pulled}}}\n"),
    );
    write(
        dir.path(),
        "a/fail.yml",
        &scenario("fails", "- expect: {plugins: {auth: {outcome: cached}}}\n"),
    );
    write(dir.path(), "notes.txt", "not a scenario");
    let (code, out, err) = run(&[dir.path().to_path_buf()], &RunOptions::default());
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let a = dir.path().join("a/fail.yml").display().to_string();
    let b = dir.path().join("b/pass.yaml").display().to_string();
    assert_eq!(lines[0], format!("FAIL {a}: fails"));
    assert_eq!(
        lines[1],
        "    step 3: plugins.default/auth.outcome: expected cached, got pulled"
    );
    assert_eq!(lines[2], format!("PASS {b}: passes"));
    assert_eq!(*lines.last().unwrap(), "1 passed, 1 failed");
    assert!(err.is_empty(), "{err}");

    let (code, out, _) = run(&[dir.path().join("b/pass.yaml")], &RunOptions::default());
    assert_eq!((code, out.lines().last()), (0, Some("1 passed, 0 failed")));
}

#[test]
fn invalid_files_exit_2_naming_file_and_step_and_others_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.yaml",
        &scenario(
            "bad",
            "- advance: 1s\n- publish: {ref: oci://r/a:v1, module: v1, colour: red}\n",
        ),
    );
    let good = write(
        dir.path(),
        "good.yaml",
        &scenario("good", "- expect: {plugins: {auth: {outcome: pulled}}}\n"),
    );
    let missing = dir.path().join("missing.yaml");
    let (code, out, err) = run(
        &[bad.clone(), good, missing.clone()],
        &RunOptions::default(),
    );
    assert_eq!(code, 2);
    let err_lines: Vec<&str> = err.lines().collect();
    assert_eq!(err_lines.len(), 2, "{err}");
    assert!(
        err_lines[0].starts_with(&format!("error: {}: step 4: publish", bad.display())),
        "{err}"
    );
    assert!(err_lines[0].contains("colour"), "{err}");
    assert!(
        err_lines[1].starts_with(&format!("error: {}: cannot read", missing.display())),
        "{err}"
    );
    assert!(
        out.contains("PASS") && out.ends_with("1 passed, 0 failed\n"),
        "{out}"
    );
    // Malformed YAML never panics.
    for text in [
        "name: [",
        "- just\n- a list\n",
        "name: x\nmodules: 3\nsteps: {}\n",
        "\u{0}\u{1}",
    ] {
        let p = write(dir.path(), "weird.yaml", text);
        assert_eq!(run(&[p], &RunOptions::default()).0, 2, "{text:?}");
    }
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        run(&[empty.path().to_path_buf()], &RunOptions::default()).0,
        2
    );
}

#[test]
fn json_and_junit_reports() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "1.yaml",
        &scenario("ok <&>", "- expect: {plugins: {auth: {outcome: pulled}}}\n"),
    );
    write(
        dir.path(),
        "2.yaml",
        &scenario("nope", "- expect: {cache: []}\n"),
    );
    write(dir.path(), "3.yaml", "name: broken\n");
    let junit = dir.path().join("junit.xml");
    let opts = RunOptions {
        trace: true,
        json: true,
        junit: Some(junit.clone()),
    };
    let (code, out, _) = run(&[dir.path().to_path_buf()], &opts);
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["passed"], 1);
    assert_eq!(v["failed"], 1);
    assert_eq!(v["scenarios"][0]["passed"], true);
    assert!(v["scenarios"][0]["failure"].is_null());
    assert!(v["scenarios"][0]["trace"].as_array().unwrap().len() > 3);
    let f = &v["scenarios"][1]["failure"];
    assert_eq!(
        (
            f["step"].as_u64(),
            f["check"].as_str(),
            f["expected"].as_str(),
            f["actual"].as_str()
        ),
        (Some(3), Some("cache"), Some("[]"), Some("[v1]"))
    );
    assert!(v["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("modules"));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("<testsuite name=\"wasm-ecds sim\" tests=\"3\" failures=\"1\" errors=\"1\""),
        "{xml}"
    );
    assert!(xml.contains("name=\"ok &lt;&amp;&gt;\""), "{xml}");
    assert!(
        xml.contains("<failure message=\"step 3: cache: expected [], got [v1]\""),
        "{xml}"
    );
    assert!(xml.contains("<error message="), "{xml}");
    // Without --trace, JSON has no traces and the text report no trace lines.
    let report = collect(&[dir.path().join("1.yaml")], false);
    assert!(report.scenarios[0].trace.is_none());
    assert!(junit_xml(&report).contains("/>"));
}

#[test]
fn trace_text_output_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "t.yaml",
        &scenario(
            "t",
            "- advance: 2h\n- expect: {plugins: {auth: {outcome: pulled}}}\n- expect: {plugins: {auth: {outcome: none}}}\n",
        ),
    );
    let opts = RunOptions {
        trace: true,
        ..Default::default()
    };
    let (c1, o1, _) = run(std::slice::from_ref(&p), &opts);
    let (c2, o2, _) = run(&[p], &opts);
    assert_eq!((c1, c2), (0, 0));
    assert_eq!(o1, o2);
    assert!(
        o1.contains(
            "[   0.000s] step 1: publish v1 at oci://reg.example/filters/auth:v1 (oci-artifact)"
        ),
        "{o1}"
    );
}

#[test]
fn runs_from_inside_a_tokio_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "t.yaml",
        &scenario("t", "- expect: {plugins: {auth: {outcome: pulled}}}\n"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let code = rt.block_on(async { run(&[p], &RunOptions::default()).0 });
    assert_eq!(code, 0);
}

/// The scenarios shipped with the simulator (scenarios/basics) all pass.
#[test]
fn basics_scenarios_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/basics");
    let report = collect(&[dir], false);
    assert!(report.errors.is_empty(), "{:#?}", report.errors);
    let failed: Vec<String> = report
        .scenarios
        .iter()
        .filter(|s| !s.passed)
        .map(|s| {
            format!(
                "{}: {}",
                s.file,
                s.failures
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(report.passed >= 6);
}

#[test]
fn bearer_token_registries_with_pull_secrets() {
    let text = r#"
name: bearer
modules: {v1: {}}
steps:
  - publish: {ref: oci://private.example/filters/auth:v1, module: v1, format: docker}
  - require_auth: {host: private.example, username: robot, password: s3cret, scheme: bearer}
  - apply:
      apiVersion: extensions.istio.io/v1alpha1
      kind: WasmPlugin
      metadata: {name: anon}
      spec: {url: oci://private.example/filters/auth:v1}
  - expect:
      plugins: {default/anon: {outcome: rejected, reason: unauthorized, serves: deny-all}}
      requests: {private.example: {manifest: 1, blob: 0}}
  - apply:
      apiVersion: v1
      kind: Secret
      metadata: {name: creds}
      type: kubernetes.io/dockerconfigjson
      stringData:
        .dockerconfigjson: '{"auths":{"private.example":{"auth":"cm9ib3Q6czNjcmV0"}}}'
  - apply:
      apiVersion: extensions.istio.io/v1alpha1
      kind: WasmPlugin
      metadata: {name: auth}
      spec: {url: oci://private.example/filters/auth:v1, imagePullSecret: creds}
  - expect:
      plugins: {default/auth: {outcome: pulled, serves: v1}}
      requests: {private.example: {manifest: 2, blob: 1}}
  - delete: {secret: default/creds}
  - expect:
      plugins: {default/auth: {outcome: rejected, reason: missing_secret, serves: v1}}
      requests: {private.example: {manifest: 2, blob: 1}}
"#;
    let run = run_scenario(&parse_scenario(text).unwrap());
    assert!(run.passed(), "{:#?}\n{}", run.failures, run.trace.joined());
}

#[test]
fn a_trace_line_pads_the_time_to_nine_columns_as_the_time_prints() {
    use super::runner::trace_line;
    use crate::clock::Timestamp;
    use std::time::Duration;
    for (secs, nanos) in [
        (0, 0),
        (1, 500_000_000),
        (90, 5_000_000),
        (9_999, 999_999_999),
        (10_000, 1_000_000),
        (123_456_789, 42_000_000),
    ] {
        let at = Timestamp(Duration::new(secs, nanos));
        assert_eq!(
            trace_line(at, "text"),
            format!("[{:>9}] text", at.to_string()),
            "{at}"
        );
    }
}
