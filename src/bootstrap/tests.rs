use super::*;

const ROOT: &str = DEFAULT_ROOT_NAMESPACE;

fn plugin(ns: &str, name: &str, spec: &str) -> WasmPlugin {
    WasmPlugin::from_yaml(&format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}"
    ))
    .unwrap()
}

fn workload(ns: &str, labels: &[(&str, &str)]) -> Workload {
    let mut w = Workload::new(ns);
    w.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    w
}

/// `ns/name` of the plugins selected for `w`, in filter order.
fn selected(plugins: &[WasmPlugin], w: &Workload) -> Vec<String> {
    select(plugins, w, ROOT)
        .into_iter()
        .map(|p| p.key.to_string())
        .collect()
}

#[test]
fn selector_match_labels_must_all_be_among_the_pod_labels() {
    let plugins = [
        plugin("shop", "no-selector", "{url: r/a}"),
        plugin(
            "shop",
            "app-web",
            "{url: r/a, selector: {matchLabels: {app: web}}}",
        ),
        plugin(
            "shop",
            "web-v2",
            "{url: r/a, selector: {matchLabels: {app: web, version: v2}}}",
        ),
        plugin("shop", "empty-selector", "{url: r/a, selector: {}}"),
        plugin("other", "elsewhere", "{url: r/a}"),
    ];
    let w = workload("shop", &[("app", "web"), ("version", "v1"), ("extra", "x")]);
    assert_eq!(
        selected(&plugins, &w),
        ["shop/app-web", "shop/empty-selector", "shop/no-selector"]
    );
    let w2 = workload("shop", &[("app", "web"), ("version", "v2")]);
    assert_eq!(
        selected(&plugins, &w2),
        [
            "shop/app-web",
            "shop/empty-selector",
            "shop/no-selector",
            "shop/web-v2"
        ]
    );
    assert_eq!(selected(&plugins, &workload("shop", &[])).len(), 2);
    assert_eq!(
        selected(&plugins, &workload("other", &[])),
        ["other/elsewhere"]
    );
    assert!(selected(&plugins, &workload("third", &[("app", "web")])).is_empty());
}

#[test]
fn root_namespace_plugins_apply_to_every_namespace() {
    let plugins = [
        plugin(ROOT, "mesh-wide", "{url: r/a}"),
        plugin(
            ROOT,
            "ingress-only",
            "{url: r/a, selector: {matchLabels: {istio: ingressgateway}}}",
        ),
        plugin("shop", "local", "{url: r/a}"),
    ];
    assert_eq!(
        selected(&plugins, &workload("shop", &[])),
        ["istio-system/mesh-wide", "shop/local"]
    );
    assert_eq!(
        selected(&plugins, &workload("edge", &[("istio", "ingressgateway")])),
        ["istio-system/ingress-only", "istio-system/mesh-wide"]
    );
    assert_eq!(
        selected(&plugins, &workload(ROOT, &[])),
        ["istio-system/mesh-wide"]
    );
    // Another root namespace: istio-system is then an ordinary namespace.
    let w = workload("shop", &[]);
    let names: Vec<String> = select(&plugins, &w, "mesh-root")
        .into_iter()
        .map(|p| p.key.to_string())
        .collect();
    assert_eq!(names, ["shop/local"]);
}

#[test]
fn gateway_target_refs_select_by_the_gateway_name_label_in_the_plugin_namespace() {
    let plugins = [
        plugin(
            "edge",
            "on-public",
            "{url: r/a, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: public}]}",
        ),
        plugin(
            "edge",
            "on-either",
            "{url: r/a, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: internal}, {kind: Gateway, group: gateway.networking.k8s.io, name: public}]}",
        ),
        plugin("edge", "singular", "{url: r/a, targetRef: {kind: Gateway, name: internal}}"),
        plugin(
            "edge",
            "wrong-group",
            "{url: r/a, targetRefs: [{kind: Gateway, group: networking.istio.io, name: public}]}",
        ),
        plugin(
            ROOT,
            "root-gateway-ref",
            "{url: r/a, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: public}]}",
        ),
        plugin(
            ROOT,
            "by-class",
            "{url: r/a, targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio}]}",
        ),
        plugin(
            "edge",
            "class-outside-root",
            "{url: r/a, targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio}]}",
        ),
    ];
    let public = workload("edge", &[(GATEWAY_NAME_LABEL, "public")]);
    assert_eq!(
        selected(&plugins, &public),
        ["edge/on-either", "edge/on-public"]
    );
    let internal = workload("edge", &[(GATEWAY_NAME_LABEL, "internal")]);
    assert_eq!(
        selected(&plugins, &internal),
        ["edge/on-either", "edge/singular"]
    );
    // A sidecar (no gateway label) is not a target; nor is a same-named gateway elsewhere.
    assert!(selected(&plugins, &workload("edge", &[("app", "public")])).is_empty());
    assert!(selected(
        &plugins,
        &workload("shop", &[(GATEWAY_NAME_LABEL, "public")])
    )
    .is_empty());
    // The root namespace's refs name its own gateways; a GatewayClass reaches every namespace.
    let mut classed = public.clone();
    classed.gateway_class = Some("istio".into());
    assert_eq!(
        selected(&plugins, &classed),
        ["istio-system/by-class", "edge/on-either", "edge/on-public"]
    );
    let root_public = workload(ROOT, &[(GATEWAY_NAME_LABEL, "public")]);
    assert_eq!(
        selected(&plugins, &root_public),
        ["istio-system/root-gateway-ref"]
    );
}

#[test]
fn service_target_refs_select_the_named_services_waypoint() {
    let plugins = [
        plugin("shop", "for-cart", "{url: r/a, targetRefs: [{kind: Service, name: cart}]}"),
        plugin(
            "shop",
            "for-external",
            "{url: r/a, targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: payments}]}",
        ),
    ];
    assert!(selected(&plugins, &workload("shop", &[("app", "cart")])).is_empty());
    let mut waypoint = workload("shop", &[]);
    waypoint.services = vec!["cart".into()];
    assert_eq!(selected(&plugins, &waypoint), ["shop/for-cart"]);
    waypoint.services.push("payments".into());
    assert_eq!(
        selected(&plugins, &waypoint),
        ["shop/for-cart", "shop/for-external"]
    );
    waypoint.namespace = "other".into();
    assert!(selected(&plugins, &waypoint).is_empty());
}

#[test]
fn match_is_read_only_with_listener_facts() {
    let plugins = [
        plugin("ns", "any", "{url: r/a}"),
        plugin("ns", "server-8080", "{url: r/a, match: [{mode: SERVER, ports: [{number: 8080}]}]}"),
        plugin("ns", "client", "{url: r/a, match: [{mode: CLIENT}]}"),
        plugin("ns", "port-9090", "{url: r/a, match: [{ports: [{number: 9090}]}, {mode: CLIENT_AND_SERVER, ports: [{number: 9091}]}]}"),
    ];
    let mut w = workload("ns", &[]);
    assert_eq!(
        selected(&plugins, &w).len(),
        4,
        "no facts: match is not looked at"
    );
    w.mode = Some(TrafficMode::Server);
    w.port = Some(8080);
    assert_eq!(selected(&plugins, &w), ["ns/any", "ns/server-8080"]);
    w.port = Some(9091);
    assert_eq!(selected(&plugins, &w), ["ns/any", "ns/port-9090"]);
    w.mode = Some(TrafficMode::Client);
    w.port = None;
    assert_eq!(selected(&plugins, &w), ["ns/any", "ns/client"]);
    w.mode = None;
    w.port = Some(9090);
    assert_eq!(selected(&plugins, &w), ["ns/any", "ns/port-9090"]);
}

#[test]
fn order_is_phase_then_priority_then_root_namespace_then_name() {
    let plugins = [
        plugin("app", "stats-low", "{url: r/a, phase: STATS, priority: -5}"),
        plugin("app", "plain", "{url: r/a}"),
        plugin("app", "stats-default", "{url: r/a, phase: STATS}"),
        plugin("app", "authz", "{url: r/a, phase: AUTHZ, priority: 100}"),
        plugin("app", "authn-b", "{url: r/a, phase: AUTHN, priority: 1}"),
        plugin("app", "authn-a", "{url: r/a, phase: AUTHN, priority: 1}"),
        plugin(
            "app",
            "authn-high",
            "{url: r/a, phase: AUTHN, priority: 10}",
        ),
        plugin(ROOT, "z-authn", "{url: r/a, phase: AUTHN, priority: 1}"),
        plugin("app", "stats-high", "{url: r/a, phase: STATS, priority: 3}"),
        plugin(
            "app",
            "explicit-unspecified",
            "{url: r/a, phase: UNSPECIFIED_PHASE, priority: 1}",
        ),
    ];
    assert_eq!(
        selected(&plugins, &workload("app", &[])),
        [
            "app/authn-high",
            "istio-system/z-authn",
            "app/authn-a",
            "app/authn-b",
            "app/authz",
            "app/stats-high",
            "app/stats-default",
            "app/stats-low",
            "app/explicit-unspecified",
            "app/plain",
        ]
    );
}

#[test]
fn filter_entry_names_the_served_resource_and_falls_back_like_the_server() {
    let p = plugin("shop", "auth", "{url: r/a}");
    let e = filter_entry(&p, &Subscription::default());
    let resource = crate::convert::extension_config(&p, crate::convert::Filter::DenyAll).name;
    assert_eq!(e["name"], resource.as_str());
    assert_eq!(e["name"], "extensions.istio.io/wasmplugin/shop.auth");
    let d = &e["config_discovery"];
    assert_eq!(
        d["type_urls"],
        json!([HTTP_WASM_TYPE_URL, HTTP_RBAC_TYPE_URL])
    );
    assert_eq!(
        d["default_config"],
        json!({"@type": HTTP_RBAC_TYPE_URL, "rules_stat_prefix": "wasm-default-deny", "rules": {}})
    );
    assert_eq!(
        d["config_source"],
        json!({
            "resource_api_version": "V3",
            "initial_fetch_timeout": "10s",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {
                    "cluster_name": "wasm_ecds",
                    "retry_policy": {"retry_back_off": {"base_interval": "0.5s", "max_interval": "5s"}},
                }}],
            },
        })
    );
    assert!(d.get("apply_default_config_without_warming").is_none());

    let open = plugin("shop", "open", "{url: r/a, failStrategy: FAIL_OPEN}");
    assert_eq!(
        filter_entry(&open, &Subscription::default())["config_discovery"]["default_config"],
        json!({"@type": HTTP_RBAC_TYPE_URL, "rules_stat_prefix": "wasm-default-allow"})
    );
    let reload = plugin("shop", "reload", "{url: r/a, failStrategy: FAIL_RELOAD}");
    assert_eq!(
        default_config(&reload)["rules"],
        json!({}),
        "FAIL_RELOAD falls back to deny-all"
    );
}

#[test]
fn network_plugins_get_network_type_urls_and_their_own_list() {
    let plugins = [
        plugin(
            "ns",
            "tcp",
            "{url: r/a, type: NETWORK, failStrategy: FAIL_OPEN}",
        ),
        plugin("ns", "web", "{url: r/a, type: UNSPECIFIED_PLUGIN_TYPE}"),
    ];
    let sel = select(&plugins, &workload("ns", &[]), ROOT);
    let sub = Subscription {
        ads: true,
        initial_fetch_timeout: Duration::from_millis(1500),
        ..Subscription::default()
    };
    let v = Filters::new(&sel, &sub).to_value();
    assert_eq!(
        v["http_filters"][0]["name"],
        "extensions.istio.io/wasmplugin/ns.web"
    );
    let tcp = &v["filters"][0];
    assert_eq!(tcp["name"], "extensions.istio.io/wasmplugin/ns.tcp");
    assert_eq!(
        tcp["config_discovery"]["type_urls"],
        json!([NETWORK_WASM_TYPE_URL, NETWORK_RBAC_TYPE_URL])
    );
    assert_eq!(
        tcp["config_discovery"]["default_config"],
        json!({"@type": NETWORK_RBAC_TYPE_URL, "stat_prefix": "wasm-default-allow"})
    );
    assert_eq!(
        tcp["config_discovery"]["config_source"],
        json!({"resource_api_version": "V3", "initial_fetch_timeout": "1.5s", "ads": {}})
    );
    let http_only = Filters::new(&sel[1..], &sub).to_value();
    assert!(http_only.get("filters").is_none(), "{http_only}");
}

#[test]
fn durations_are_protobuf_json() {
    assert_eq!(envoy_duration(Duration::ZERO), "0s");
    assert_eq!(envoy_duration(Duration::from_secs(90)), "90s");
    assert_eq!(envoy_duration(Duration::from_millis(250)), "0.25s");
    assert_eq!(
        envoy_duration(Duration::from_nanos(1_000_000_001)),
        "1.000000001s"
    );
}
