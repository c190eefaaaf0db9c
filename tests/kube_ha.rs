//! The Kubernetes source through outages and with several replicas, against real kube-apiservers
//! (tests/support/kube.rs): an API server restart forces a relist that changes nothing (no pull,
//! no push) except removing what was deleted meanwhile, ECDS keeps serving during the outage, and
//! of two replicas both serve while exactly one writes status, the other taking over when the
//! leader is killed; a cluster without the EnvoyFilter kind still serves its WasmPlugins and picks
//! EnvoyFilters up once the kind exists.

mod support;

use std::time::Duration;

use support::envoy::wait_for;
use support::faults::{ModuleServer, Route};
use support::kube::{condition, resource, unique, wasm_plugin, Cluster, Serve, CONVERGE};
use support::proxy_wasm_test_module_tagged;
use wasm_ecds::xds::client::{self, DeltaSession, SotwSession};
use wasm_ecds::xds::Api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiserver_restart_relists_without_flapping() {
    let Some(cluster) = Cluster::private() else {
        return;
    };
    let ns = unique("outage");
    cluster.kubectl(&["create", "namespace", &ns]);
    let modules = ModuleServer::start(vec![
        ("/a.wasm", Route::Body(proxy_wasm_test_module_tagged("a"))),
        ("/b.wasm", Route::Body(proxy_wasm_test_module_tagged("b"))),
    ])
    .await;
    for name in ["a", "b"] {
        let spec = format!(
            "url: {}\nimagePullPolicy: Always\n",
            modules.url(&format!("/{name}.wasm"))
        );
        cluster.apply(&wasm_plugin(&ns, name, &spec));
    }
    let s = Serve::start(&cluster, &["--namespaces", &ns, "--lease-duration", "3s"]);
    s.wait_ready().await;
    s.wait_outcome(&format!("{ns}/a"), "pulled").await;
    s.wait_outcome(&format!("{ns}/b"), "pulled").await;
    let names = vec![resource(&ns, "a"), resource(&ns, "b")];
    let channel = client::connect(s.xds).await.unwrap();
    let mut delta = DeltaSession::open(
        channel,
        Api::Ecds,
        client::delta_subscribe("t", &names, Default::default()),
    )
    .await
    .unwrap();
    let first = delta.recv().await.unwrap().unwrap();
    assert_eq!(first.resources.len(), 2);
    delta.send(client::delta_ack(&first)).await.unwrap();
    let relists = s.metric("wasm_ecds_kube_relists").await;
    let hits = (modules.hits("/a.wasm"), modules.hits("/b.wasm"));

    // Outage: the API server stops; meanwhile "b" is deleted behind its back (in etcd).
    cluster.stop_apiserver();
    cluster.etcdctl(&[
        "del",
        &format!("/registry/extensions.istio.io/wasmplugins/{ns}/b"),
    ]);
    // ECDS keeps serving the last known state to proxies, new ones included.
    let channel = client::connect(s.xds).await.unwrap();
    let mut sotw = SotwSession::open(
        channel,
        Api::Ecds,
        client::sotw_subscribe("late", &names[..1]),
    )
    .await
    .unwrap();
    let r = tokio::time::timeout(CONVERGE, sotw.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.resources.len(), 1, "served during the outage");
    assert!(s.ready().await, "still ready during the outage");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_apiserver();

    // The watch relists: "b" is removed once the list completes; "a" is neither pulled nor pushed.
    wait_for("relist", CONVERGE, || async {
        let n = s.metric("wasm_ecds_kube_relists").await;
        (n > relists).then_some(()).ok_or(format!("{n}"))
    })
    .await;
    let removed = tokio::time::timeout(CONVERGE, delta.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(removed.removed_resources, [resource(&ns, "b")]);
    assert!(
        removed.resources.is_empty(),
        "a is not pushed again: {removed:?}"
    );
    delta.send(client::delta_ack(&removed)).await.unwrap();
    assert!(s.plugin(&format!("{ns}/b")).await.is_none());
    // A second relist, forced by another restart, returns the same objects: nothing at all.
    let relists = s.metric("wasm_ecds_kube_relists").await;
    cluster.stop_apiserver();
    // Any write in the cluster meanwhile makes the watch's resourceVersion too old for the new
    // API server's watch cache: 410 Gone, so a full relist.
    cluster.etcdctl(&["put", "/registry/wasm-ecds-test/unrelated", "x"]);
    cluster.start_apiserver();
    wait_for("second relist", CONVERGE, || async {
        let n = s.metric("wasm_ecds_kube_relists").await;
        (n > relists).then_some(()).ok_or(format!("{n}"))
    })
    .await;
    let quiet = tokio::time::timeout(Duration::from_secs(2), delta.recv()).await;
    assert!(
        quiet.is_err(),
        "no push after an identical relist: {quiet:?}"
    );
    assert_eq!(
        modules.hits("/a.wasm"),
        hits.0,
        "no pull of the Always plugin"
    );
    assert_eq!(modules.hits("/b.wasm"), hits.1);
    eprintln!(
        "relists {} watch errors {}",
        s.metric("wasm_ecds_kube_relists").await,
        s.metric("wasm_ecds_kube_watch_errors").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_serve_and_one_writes_status() {
    let Some(cluster) = Cluster::private() else {
        return;
    };
    let ns = unique("replicas");
    cluster.kubectl(&["create", "namespace", &ns]);
    let modules = ModuleServer::start(vec![(
        "/m.wasm",
        Route::Body(proxy_wasm_test_module_tagged("m")),
    )])
    .await;
    cluster.apply(&wasm_plugin(
        &ns,
        "p",
        &format!("url: {}\n", modules.url("/m.wasm")),
    ));
    let args = |id: &'static str| {
        [
            "--namespaces",
            ns.as_str(),
            "--lease-duration",
            "3s",
            "--identity",
            id,
        ]
    };
    let mut replicas = vec![
        Serve::start(&cluster, &args("one")),
        Serve::start(&cluster, &args("two")),
    ];
    let key = format!("{ns}/p");
    for r in &replicas {
        r.wait_ready().await;
        r.wait_outcome(&key, "pulled").await;
        // Each serves ECDS on its own.
        let channel = client::connect(r.xds).await.unwrap();
        let mut s = SotwSession::open(
            channel,
            Api::Ecds,
            client::sotw_subscribe("n", &[resource(&ns, "p")]),
        )
        .await
        .unwrap();
        let resp = tokio::time::timeout(CONVERGE, s.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(resp.resources.len(), 1);
    }
    let leader = wait_for("one leader", CONVERGE, || async {
        let mut leading = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            if r.metric("wasm_ecds_kube_leader").await == 1.0 {
                leading.push(i);
            }
        }
        (leading.len() == 1)
            .then(|| leading[0])
            .ok_or(format!("{leading:?}"))
    })
    .await;
    let follower = 1 - leader;
    wait_for("Ready written", CONVERGE, || async {
        let o = cluster.get(&ns, "wasmplugin", "p");
        condition(&o, "Ready")
            .filter(|c| c["status"] == "True")
            .map(|_| ())
            .ok_or(format!("{}", o["status"]))
    })
    .await;
    let ok = "wasm_ecds_kube_status_writes{result=\"ok\"}";
    assert!(replicas[leader].metric(ok).await >= 1.0);
    assert_eq!(
        replicas[follower].metric(ok).await,
        0.0,
        "only the leader writes"
    );
    let lease = cluster.get("wasm-ecds", "lease", "wasm-ecds");
    assert_eq!(lease["spec"]["holderIdentity"], ["one", "two"][leader]);

    // The leader dies without releasing the Lease: the other takes over once it expires, and
    // writes the status of the next change.
    replicas[leader].kill();
    wait_for("follower leads", CONVERGE, || async {
        let l = replicas[follower].metric("wasm_ecds_kube_leader").await;
        (l == 1.0).then_some(()).ok_or(format!("{l}"))
    })
    .await;
    cluster.merge_patch(&ns, "p", r#"{"spec":{"pluginConfig":{"v":2}}}"#);
    wait_for("generation 2 observed", CONVERGE, || async {
        let o = cluster.get(&ns, "wasmplugin", "p");
        let c = condition(&o, "Ready").ok_or("no Ready")?;
        (c["observedGeneration"] == 2)
            .then_some(())
            .ok_or(format!("{c}"))
    })
    .await;
    assert!(
        replicas[follower].metric(ok).await >= 1.0,
        "the new leader wrote it"
    );

    // Someone else takes the Lease and holds it — renewing it, as a live holder does: status
    // writes stop, though the plugin changes. (The renewal matters: the election's own renewal,
    // racing with the takeover, may rewrite the Lease's duration to ours, and a holder that never
    // renewed would then expire and be taken over again.)
    let steal = || {
        #[allow(clippy::disallowed_methods)] // a timestamp for the API server, not for logic
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let patch = format!(
            r#"{{"spec":{{"holderIdentity":"intruder","renewTime":"{now}","leaseDurationSeconds":3600}}}}"#
        );
        cluster.kubectl(&[
            "-n",
            "wasm-ecds",
            "patch",
            "lease",
            "wasm-ecds",
            "--type",
            "merge",
            "-p",
            &patch,
        ]);
    };
    steal();
    wait_for("leadership lost", CONVERGE, || async {
        steal();
        let l = replicas[follower].metric("wasm_ecds_kube_leader").await;
        (l == 0.0).then_some(()).ok_or(format!("{l}"))
    })
    .await;
    let writes = replicas[follower].metric(ok).await;
    cluster.merge_patch(&ns, "p", r#"{"spec":{"pluginConfig":{"v":3}}}"#);
    for _ in 0..10 {
        steal();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let o = cluster.get(&ns, "wasmplugin", "p");
    assert_eq!(
        condition(&o, "Ready").unwrap()["observedGeneration"],
        2,
        "not written"
    );
    assert_eq!(replicas[follower].metric(ok).await, writes);
    replicas.clear();
}

/// Without the EnvoyFilter CRD the first list of EnvoyFilters is refused (404): serve is ready
/// with its WasmPlugins all the same, and takes EnvoyFilters once the CRD is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_envoy_filter_kind_serves_wasm_plugins_and_picks_filters_up_later() {
    let Some(cluster) = Cluster::private() else {
        return;
    };
    cluster.kubectl(&["delete", "crd", "envoyfilters.networking.istio.io"]);
    let ns = unique("nokind");
    cluster.kubectl(&["create", "namespace", &ns]);
    let modules = ModuleServer::start(vec![(
        "/m.wasm",
        Route::Body(proxy_wasm_test_module_tagged("m")),
    )])
    .await;
    cluster.apply(&wasm_plugin(
        &ns,
        "p",
        &format!("url: {}\n", modules.url("/m.wasm")),
    ));
    let s = Serve::start(&cluster, &["--namespaces", &ns, "--lease-duration", "3s"]);
    s.wait_ready().await;
    s.wait_outcome(&format!("{ns}/p"), "pulled").await;
    assert!(
        s.log().contains("EnvoyFilters cannot be listed"),
        "{}",
        s.log()
    );

    let crd = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crd-envoyfilter.yaml");
    cluster.kubectl(&["apply", "-f", crd]);
    cluster.kubectl(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/envoyfilters.networking.istio.io",
    ]);
    cluster.apply(&format!(
        r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{name: later, namespace: {ns}}}
spec:
  configPatches:
  - applyTo: EXTENSION_CONFIG
    patch:
      operation: ADD
      value:
        name: later
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
          config: {{vm_config: {{code: {{remote: {{http_uri: {{uri: "{}"}}}}}}}}}}
"#,
        modules.url("/m.wasm")
    ));
    // Cached: the same module as the WasmPlugin's.
    s.wait_outcome(&format!("{ns}/later/later"), "cached").await;
}
