//! Unit tests of the store's versioning and registry rules.

use super::*;
use envoy_types::pb::google::protobuf::Any;

/// A resource whose content is `payload`.
pub(crate) fn config(payload: &str) -> TypedExtensionConfig {
    TypedExtensionConfig {
        name: String::new(),
        typed_config: Some(Any {
            type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
            value: payload.as_bytes().to_vec(),
        }),
    }
}

#[test]
fn set_returns_a_new_version_only_when_the_bytes_change() {
    let store = ResourceStore::new();
    let mut rx = store.watch_revision();
    let v1 = store
        .set("a", config("one"))
        .expect("first set is a change");
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    assert_eq!(
        store.set("a", config("one")),
        None,
        "identical bytes are not a change"
    );
    assert!(!rx.has_changed().unwrap(), "no notification for a no-op");
    let v2 = store
        .set("a", config("two"))
        .expect("new bytes are a change");
    assert_ne!(v1, v2);
    assert_eq!(store.version_of("a"), Some(v2));
    assert_eq!(store.revision(), 2);
}

#[test]
fn a_version_as_numbers_reads_and_writes_as_its_text() {
    let store = ResourceStore::new();
    let text = store.set("a", config("one")).unwrap();
    let entry = store.lookup([&"a".to_string()]).remove(0);
    let digest = &hex::encode(Sha256::digest(entry.config()))[..VERSION_DIGEST_HEX];
    assert_eq!(text, format!("1-{digest}"), "the digest's first hex digits");
    assert_eq!(entry.id().to_string(), text);
    assert_eq!(Version::parse(&text), Some(entry.id()));
    let zeros = Version {
        revision: 7,
        digest: 0xab,
    };
    assert_eq!(zeros.to_string(), "7-0000000000ab");
    assert_eq!(Version::parse("7-0000000000ab"), Some(zeros));
    // Only the text this server writes: any other text is no version of ours.
    for other in [
        "",
        "7",
        "7-",
        "-0000000000ab",
        "07-0000000000ab",
        "+7-0000000000ab",
        "7-0000000000AB",
        "7-000000000ab",
        "7-00000000000ab",
        "7-0000000000ax",
        "18446744073709551616-0000000000ab",
        "0-stale",
        "3-abc",
    ] {
        assert_eq!(Version::parse(other), None, "{other:?}");
    }
    assert_eq!(
        Version::parse("0-000000000000")
            .map(|v| v.to_string())
            .as_deref(),
        Some("0-000000000000")
    );
}

#[test]
fn versions_increase_and_are_not_reused_after_removal() {
    let store = ResourceStore::new();
    let v1 = store.set("a", config("one")).unwrap();
    assert!(store.remove("a"));
    assert!(!store.remove("a"));
    let v2 = store.set("a", config("one")).unwrap();
    assert_ne!(v1, v2, "same bytes after removal get a new version");
    let rev = |v: &str| v.split('-').next().unwrap().parse::<u64>().unwrap();
    assert!(rev(&v2) > rev(&v1));
    assert_eq!(
        v1.split('-').nth(1),
        v2.split('-').nth(1),
        "same bytes, same digest"
    );
}

#[test]
fn name_field_is_overwritten_and_get_round_trips() {
    let store = ResourceStore::new();
    let mut c = config("x");
    c.name = "wrong".into();
    store.set("right", c);
    let got = store.get("right").unwrap();
    assert_eq!(got.name, "right");
    assert_eq!(got.typed_config, config("x").typed_config);
    assert_eq!(store.names(), vec!["right".to_string()]);
    assert_eq!(store.get("missing"), None);
}

#[test]
fn a_name_given_as_an_arc_is_held_as_that_arc_and_kept_on_change() {
    let store = ResourceStore::new();
    let first: Arc<str> = "a".into();
    store.set(first.clone(), config("one")).unwrap();
    let held = |store: &ResourceStore| store.lookup([&"a".to_string()])[0].name.clone();
    assert!(Arc::ptr_eq(&held(&store), &first), "no copy of the name");
    // The key and the entry are that one allocation: the caller, the map, the entry.
    assert_eq!(Arc::strong_count(&first), 3);
    let second: Arc<str> = "a".into();
    store.set(second.clone(), config("two")).unwrap();
    assert!(
        Arc::ptr_eq(&held(&store), &first),
        "a changed resource keeps the name it is stored under"
    );
    assert_eq!(Arc::strong_count(&second), 1, "the new copy is dropped");
    assert!(store.remove("a"));
    assert_eq!(Arc::strong_count(&first), 1, "nothing else holds it");
}

#[test]
fn set_many_notifies_once_and_counts_changes() {
    let store = ResourceStore::new();
    store.set("a", config("1"));
    let mut rx = store.watch_revision();
    rx.borrow_and_update();
    let changed = store.set_many([("a", config("1")), ("b", config("2")), ("c", config("3"))]);
    assert_eq!(changed, 2);
    assert_eq!(*rx.borrow_and_update(), 3);
    assert_eq!(store.len(), 3);
}

#[test]
fn set_version_changes_with_the_set() {
    let store = ResourceStore::new();
    store.set("a", config("1"));
    store.set("b", config("2"));
    let a = store.lookup([&"a".to_string()]);
    assert_eq!(set_version(&a), store.version_of("a").unwrap());
    let ab = store.lookup([&"b".to_string(), &"a".to_string(), &"a".to_string()]);
    assert_eq!(ab.len(), 2);
    let v_ab = set_version(&ab);
    assert!(v_ab.starts_with("2-"));
    store.set("b", config("3"));
    let ab2 = store.lookup([&"a".to_string(), &"b".to_string()]);
    assert_ne!(set_version(&ab2), v_ab);
    assert_eq!(set_version(&[]), "");
}

#[test]
fn counters_are_series_of_the_shared_metrics() {
    let metrics = Metrics::new();
    let store = ResourceStore::with_metrics(&metrics);
    store.set("a", config("1"));
    store.set("b", config("2"));
    store.remove("b");
    let id = store.open_stream(Api::Ecds, Protocol::Sotw);
    store.count_push();
    store.count_ack();
    assert_eq!(store.count_nack(), 1);
    store.close_stream(id);
    let s = metrics.samples();
    for (name, want) in [
        (METRIC_CONNECTED_STREAMS, 0.0),
        (METRIC_STREAM_COUNT, 1.0),
        (METRIC_PUSH_COUNT, 1.0),
        (METRIC_ACK_COUNT, 1.0),
        (METRIC_NACK_COUNT, 1.0),
        (METRIC_RESOURCES, 1.0),
    ] {
        assert_eq!(s.get(name), Some(&want), "{name} in {s:?}");
    }
    // A second store on the same metrics shares the series instead of registering again.
    let again = ResourceStore::with_metrics(&metrics.clone());
    again.count_push();
    assert_eq!(store.stats().pushes, 2);
    // A store of its own counts apart.
    let own = ResourceStore::new();
    own.count_push();
    assert_eq!(own.stats().pushes, 1);
    assert_eq!(metrics.samples()[METRIC_PUSH_COUNT], 2.0);
}

/// A real push and ACK over gRPC, then one rendering with the engine's series and the xDS
/// series, each with one HELP and one TYPE line.
#[tokio::test]
async fn a_push_and_its_ack_show_in_the_rendered_metrics() {
    use crate::xds::client::{self, SotwSession};
    let metrics = Metrics::new();
    let store = ResourceStore::with_metrics(&metrics);
    store.set("a", config("1"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::xds::serve(listener, store.clone(), async {
        let _ = stopped.await;
    }));
    let mut events = store.events();
    let names = vec!["a".to_string()];
    let channel = client::connect(addr).await.unwrap();
    let mut session =
        SotwSession::open(channel, Api::Ecds, client::sotw_subscribe("node-1", &names))
            .await
            .unwrap();
    let response = session.recv().await.unwrap().expect("a response");
    session
        .send(client::sotw_ack(&names, &response))
        .await
        .unwrap();
    while !matches!(events.recv().await.unwrap().kind, StreamEventKind::Acked(_)) {}

    let text = metrics.render();
    let s = crate::metrics::parse_samples(&text);
    assert_eq!(s[METRIC_PUSH_COUNT], 1.0, "{text}");
    assert_eq!(s[METRIC_ACK_COUNT], 1.0, "{text}");
    assert_eq!(s[METRIC_NACK_COUNT], 0.0, "{text}");
    assert_eq!(s[METRIC_CONNECTED_STREAMS], 1.0, "{text}");
    assert_eq!(s[METRIC_STREAM_COUNT], 1.0, "{text}");
    assert_eq!(s[METRIC_RESOURCES], 1.0, "{text}");
    assert!(s.contains_key(crate::metrics::CACHE_ENTRIES), "{text}");
    for name in [
        METRIC_CONNECTED_STREAMS,
        METRIC_STREAM_COUNT,
        METRIC_PUSH_COUNT,
        METRIC_ACK_COUNT,
        METRIC_NACK_COUNT,
        METRIC_RESOURCES,
        crate::metrics::CACHE_ENTRIES,
        crate::metrics::CONFIG_CONVERSION_DURATION,
    ] {
        for prefix in ["# HELP", "# TYPE"] {
            let lines = text
                .lines()
                .filter(|l| l.starts_with(&format!("{prefix} {name} ")))
                .count();
            assert_eq!(lines, 1, "{prefix} {name} in {text}");
        }
    }
    assert!(text.contains(&format!("# TYPE {METRIC_PUSH_COUNT} counter\n")));
    assert!(text.contains(&format!("# TYPE {METRIC_CONNECTED_STREAMS} gauge\n")));
    drop(session);
    let _ = stop.send(());
    server.await.unwrap();
}
