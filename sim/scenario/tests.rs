//! Unit tests of the scenario format: whole files, options, unknown keys, bad values.

use std::time::Duration;

use super::*;
use crate::config::Delivery;
use crate::plugin::ObjectKey;

const HEAD: &str = "name: t\nmodules: {v1: {}, v2: {size: 2Ki}, junk: {invalid: true}}\n";

fn load(steps: &str) -> Result<Scenario, LoadError> {
    parse_scenario(&format!("{HEAD}steps:\n{steps}"))
}

fn step_err(steps: &str) -> (Option<usize>, String) {
    let e = load(steps).expect_err("should be refused");
    (e.step, e.message)
}

#[test]
fn a_full_scenario_loads() {
    let s = load(
            r#"
- publish: {ref: oci://reg.example/ns/repo:v1, module: v1, format: docker}
- publish: {ref: "https://files.example/m.wasm?x=1", module: v2, encoding: tar.gz}
- publish: {ref: "file:///opt/m.wasm", module: v1}
- apply:
    apiVersion: extensions.istio.io/v1alpha1
    kind: WasmPlugin
    metadata: {name: p}
    spec: {url: "oci://reg.example/ns/repo@sha256:${digest:oci://reg.example/ns/repo:v1}", sha256: "${sha256:v1}"}
- edit: {plugin: default/p, patch: {metadata: {labels: {a: b}}}}
- fail: {host: Reg.Example, kind: blob, error: {status: 503}, times: 2}
- fail: {host: reg.example, error: timeout}
- recover: {host: reg.example}
- require_auth: {host: reg.example, username: u, password: p, scheme: bearer}
- advance: 1h30m
- restart:
- restart: {keepCache: false}
- expect:
    plugins:
      default/p: {outcome: rejected, reason: checksum_mismatch, serves: deny-all}
      q: {outcome: invalid, reason: spec.sha256}
    cache: [v1]
    expired: []
    requests: {reg.example: {manifest: 2}, files.example: 1}
    metrics: {'istio_agent_wasm_remote_fetch_count{result="success"}': 2}
- delete: {plugin: p}
- unpublish: {ref: oci://reg.example/ns/repo:v1}
"#,
        )
        .unwrap();
    assert_eq!(s.steps.len(), 15);
    assert_eq!(
        s.config.purge_interval,
        crate::config::DEFAULT_PURGE_INTERVAL
    );
    let no_digest = |_: &OciRef| Err("unused".to_string());
    match s.step(5, &no_digest).unwrap().into_owned() {
        Step::Fail(r) => assert_eq!(
            r,
            FailRule {
                host: "reg.example".into(),
                kind: KindFilter::Blob,
                mode: FailMode::Status(503),
                times: Some(2)
            }
        ),
        other => panic!("{other:?}"),
    }
    match s.step(10, &no_digest).unwrap().into_owned() {
        Step::Restart { keep_cache } => assert!(keep_cache),
        other => panic!("{other:?}"),
    }
    // The digest is evaluated when the step runs.
    let e = s.step(3, &no_digest).unwrap_err();
    assert_eq!(e, "unused");
    let d = "ab".repeat(32);
    match s.step(3, &|_| Ok(d.clone())).unwrap().into_owned() {
        Step::Apply(v) => {
            assert_eq!(
                v["spec"]["url"],
                format!("oci://reg.example/ns/repo@sha256:{d}")
            );
            assert_eq!(v["spec"]["sha256"], s.modules["v1"].sha256);
        }
        other => panic!("{other:?}"),
    }
    match s.step(12, &no_digest).unwrap().into_owned() {
        Step::Expect(e) => {
            assert_eq!(e.requests["files.example"], RequestExpect::Total(1));
            assert!(e.plugins.contains_key(&ObjectKey::new("default", "q")));
            assert!(e
                .metrics
                .contains_key(r#"istio_agent_wasm_remote_fetch_count{result="success"}"#));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn options_are_parsed_and_validated() {
    let s = parse_scenario(
            "name: t\noptions: {moduleExpiry: 2h, purgeInterval: 10m, httpRequestTimeout: 5s, httpRequestMaxRetries: 2, insecureRegistries: ['*'], maxBinarySize: 1Mi, delivery: inline}\nmodules: {}\nsteps: []\n",
        )
        .unwrap();
    assert_eq!(s.config.module_expiry, Duration::from_secs(7200));
    assert_eq!(s.config.purge_interval, Duration::from_secs(600));
    assert_eq!(s.config.http_request_timeout, Duration::from_secs(5));
    assert_eq!(s.config.http_request_max_retries, 2);
    assert_eq!(s.config.max_binary_size, 1 << 20);
    assert_eq!(s.config.delivery, Delivery::Inline);
    let bad = parse_scenario("name: t\noptions: {moduleExpiry: soon}\nmodules: {}\nsteps: []\n")
        .unwrap_err();
    assert_eq!(bad.step, None);
    assert!(bad.message.contains("options.moduleExpiry"), "{bad}");
    let unknown = parse_scenario("name: t\noptions: {moduleExpiri: 1h}\nmodules: {}\nsteps: []\n")
        .unwrap_err();
    assert!(unknown.message.contains("moduleExpiri"), "{unknown}");
    let zero =
        parse_scenario("name: t\noptions: {httpRequestMaxRetries: 0}\nmodules: {}\nsteps: []\n")
            .unwrap_err();
    assert!(
        zero.message
            .contains("options.httpRequestMaxRetries: must be at least 1"),
        "{zero}"
    );
}

#[test]
fn unknown_keys_are_errors_everywhere() {
    assert!(
        parse_scenario("name: t\nmodules: {}\nsteps: []\nextra: 1\n")
            .unwrap_err()
            .message
            .contains("extra")
    );
    assert!(
        parse_scenario("name: t\nmodules: {v1: {colour: red}}\nsteps: []\n")
            .unwrap_err()
            .message
            .contains("colour")
    );
    let (step, msg) =
        step_err("- advance: 1s\n- publish: {ref: oci://r/a:v1, module: v1, tag: x}\n");
    assert_eq!(step, Some(2));
    assert!(msg.contains("tag"), "{msg}");
    let (step, msg) = step_err("- expect: {plugins: {p: {outcome: pulled, serve: v1}}}\n");
    assert_eq!(step, Some(1));
    assert!(msg.contains("serve"), "{msg}");
    let (_, msg) = step_err("- expect: {requests: {r: {manifests: 1}}}\n");
    assert!(msg.contains("manifests"), "{msg}");
    let (_, msg) = step_err("- expect: {cache: [v1], caches: []}\n");
    assert!(msg.contains("caches"), "{msg}");
}

#[test]
fn bad_values_name_the_step_and_the_problem() {
    let cases: &[(&str, &str)] = &[
        (
            "- publish: {ref: oci://r/a:v1, module: v9}\n",
            "unknown module",
        ),
        (
            "- publish: {ref: oci://r/a:v1, module: v1, format: zip}\n",
            "format",
        ),
        (
            "- publish: {ref: http://h/a, module: v1, format: docker}\n",
            "format",
        ),
        (
            "- publish: {ref: oci://r/a:v1, module: v1, encoding: gzip}\n",
            "encoding",
        ),
        ("- publish: {ref: ftp://h/a, module: v1}\n", "scheme"),
        ("- advance: soon\n", "advance"),
        ("- advance: 90\n", "advance"),
        ("- advance: 99999999999999999999999h\n", "advance"),
        ("- advance: 1000000h\n", "100 years"),
        ("- fail: {host: r, error: explode}\n", "explode"),
        ("- fail: {host: r, error: {status: 5000}}\n", "status"),
        ("- fail: {host: r, error: reset, times: 0}\n", "times"),
        ("- fail: {host: r, kind: head, error: reset}\n", "kind"),
        ("- expect: {plugins: {p: {outcome: fetched}}}\n", "fetched"),
        (
            "- expect: {plugins: {p: {outcome: rejected, reason: bad_luck}}}\n",
            "bad_luck",
        ),
        (
            "- expect: {plugins: {p: {outcome: pulled, reason: too_large}}}\n",
            "only with",
        ),
        ("- expect: {plugins: {p: {serves: v7}}}\n", "v7"),
        ("- expect: {cache: [v1, v1]}\n", "twice"),
        ("- expect: {expired: [nope]}\n", "nope"),
        (
            "- apply: {kind: ConfigMap, metadata: {name: x}}\n",
            "ConfigMap",
        ),
        ("- edit: {plugin: p, patch: [1]}\n", "patch"),
        (
            "- edit: {plugin: p, envoyFilter: f, patch: {}}\n",
            "exactly one of plugin or envoyFilter",
        ),
        ("- edit: {envoyFilter: ns/f/x, patch: {}}\n", "envoyFilter"),
        ("- delete: {}\n", "delete"),
        ("- delete: {plugin: p, envoyFilter: f}\n", "exactly one"),
        ("- bogus: {}\n", "unknown step"),
        ("- {advance: 1s, restart: {}}\n", "exactly one key"),
        ("- just a string\n", "mapping"),
        (
            "- publish: {ref: \"oci://r/a:${sha256:zz}\", module: v1}\n",
            "zz",
        ),
        (
            "- apply: {kind: WasmPlugin, spec: {url: \"${digest:not a ref}\"}}\n",
            "digest",
        ),
        (
            "- apply: {kind: WasmPlugin, spec: {url: \"${sha256:v1\"}}\n",
            "unterminated",
        ),
        ("- restart: {keepCache: maybe}\n", "keepCache"),
        (
            "- require_auth: {host: r, username: u, password: p, scheme: digest}\n",
            "scheme",
        ),
    ];
    for (steps, needle) in cases {
        let (step, msg) = step_err(&format!("- advance: 1s\n{steps}"));
        assert_eq!(step, Some(2), "{steps}: {msg}");
        assert!(msg.contains(needle), "{steps}: {msg:?} lacks {needle:?}");
    }
}

#[test]
fn envoy_filters_are_applied_edited_deleted_and_their_patches_expected() {
    let s = load(
        r#"
- apply:
    apiVersion: networking.istio.io/v1alpha3
    kind: EnvoyFilter
    metadata: {name: f, namespace: istio-system}
    spec: {configPatches: []}
- edit: {envoyFilter: istio-system/f, patch: {metadata: {labels: {a: b}}}}
- expect:
    plugins:
      istio-system/f/istio.basic_auth: {outcome: pulled, serves: v1}
- delete: {envoyFilter: istio-system/f}
"#,
    )
    .unwrap();
    let none = |_: &OciRef| Err("unused".to_string());
    let f = ObjectKey::new("istio-system", "f");
    assert!(matches!(s.step(1, &none).unwrap().into_owned(),
        Step::Edit { target: EditTarget::EnvoyFilter(k), .. } if k == f));
    let Step::Expect(e) = s.step(2, &none).unwrap().into_owned() else {
        panic!()
    };
    let patch = ObjectKey::new("istio-system", "f/istio.basic_auth");
    assert_eq!(e.plugins[&patch].serves.as_deref(), Some("v1"));
    assert_eq!(
        s.step(3, &none).unwrap().into_owned(),
        Step::Delete(DeleteTarget::EnvoyFilter(f))
    );
}

#[test]
fn top_level_problems() {
    assert!(parse_scenario("").is_err());
    assert!(parse_scenario("modules: {}\nsteps: []\n")
        .unwrap_err()
        .message
        .contains("name"));
    assert!(parse_scenario("name: t\nsteps: []\n")
        .unwrap_err()
        .message
        .contains("modules"));
    assert!(parse_scenario("name: t\nmodules: {}\n")
        .unwrap_err()
        .message
        .contains("steps"));
    assert!(
        parse_scenario("name: t\nmodules: {deny-all: {}}\nsteps: []\n")
            .unwrap_err()
            .message
            .contains("reserved")
    );
    assert!(
        parse_scenario("name: t\nmodules: {a: {size: lots}}\nsteps: []\n")
            .unwrap_err()
            .message
            .contains("modules.a.size")
    );
    assert!(parse_scenario("name: [\n").is_err());
    let huge = parse_scenario("name: t\nmodules: {a: {size: 100Gi}}\nsteps: []\n");
    assert!(huge.unwrap_err().message.contains("512Mi"));
    let long = parse_scenario(
        "name: t\noptions: {httpRequestTimeout: 999999999999999999999s}\nmodules: {}\nsteps: []\n",
    );
    assert!(long.unwrap_err().message.contains("httpRequestTimeout"));
    assert!(parse_scenario("name: t\nmodules: {}\nsteps: []\n---\nname: u\n").is_err());
    assert!(
        parse_scenario("name: t\noptions: {purgeInterval: '0'}\nmodules: {}\nsteps: []\n").is_err()
    );
}

#[test]
fn other_dollar_braces_are_left_alone() {
    let v = serde_json::json!({"a": "${HOME} and ${sha256:v1}"});
    let out = substitute(&v, &mut |_| Ok("X".into())).unwrap();
    assert_eq!(out["a"], "${HOME} and X");
}

#[test]
fn values_without_substitutions_are_not_copied() {
    let v = serde_json::json!({"a": ["${HOME}", {"b": 1}], "${sha256": "x"});
    let out = substitute(&v, &mut |_| panic!("nothing to evaluate")).unwrap();
    assert!(matches!(out, std::borrow::Cow::Borrowed(_)));
    let w = serde_json::json!({"a": [{"${digest:oci://r.example/x:v1}": 1}]});
    let out = substitute(&w, &mut |_| Ok("D".into())).unwrap();
    assert_eq!(out.into_owned(), serde_json::json!({"a": [{"D": 1}]}));
}
