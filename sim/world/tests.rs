//! Unit tests of the simulated world: serving, counting, failure rules, auth.

use std::sync::Arc;
use std::time::Duration;

use super::answer::split_request_url;
use super::*;
use crate::clock::ManualClock;
use crate::plugin::Credentials;
use crate::sim::rules::FailMode;

fn world() -> (Arc<ManualClock>, SimWorld) {
    let clock = Arc::new(ManualClock::new(Timestamp::ZERO));
    (clock.clone(), SimWorld::new(clock))
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

async fn body(resp: HttpResponse) -> Result<Vec<u8>, TransportError> {
    let mut b = resp.body;
    let mut out = Vec::new();
    while let Some(c) = b.next_chunk().await? {
        out.extend_from_slice(&c);
    }
    Ok(out)
}

fn oci(s: &str) -> OciRef {
    OciRef::parse(s).unwrap()
}

const T: Duration = Duration::from_secs(15);

#[test]
fn urls_split_into_authority_and_path() {
    assert_eq!(
        split_request_url("https://Files.Example:8443/a/b.wasm?x=1#f"),
        Some(("files.example:8443".into(), "/a/b.wasm?x=1".into(), None))
    );
    assert_eq!(
        split_request_url("http://u:p@h"),
        Some(("h".into(), "/".into(), None))
    );
    assert_eq!(split_request_url("ftp://h/x"), None);
    assert_eq!(
        split_request_url("http://169.254.169.254:80/x").and_then(|x| x.2),
        Some("169.254.169.254".parse().unwrap())
    );
    assert_eq!(
        split_request_url("http://[fe80::1]:5000/").map(|x| (x.0, x.2)),
        Some(("[fe80::1]:5000".into(), Some("fe80::1".parse().unwrap())))
    );
}

#[test]
fn registry_serves_manifests_and_blobs_and_counts_them() {
    let (_, w) = world();
    let digest = w.publish_oci(
        &oci("reg.example/ns/repo:v1"),
        "v1",
        b"\0asm\x01\0\0\0",
        ImageFormat::OciArtifact,
    );
    run(async {
        let ping = w
            .get(&HttpRequest::get("https://reg.example/v2/"), T)
            .await
            .unwrap();
        assert_eq!(ping.status, 200);
        let r = w
            .get(
                &HttpRequest::get("https://reg.example/v2/ns/repo/manifests/v1"),
                T,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("docker-content-digest"),
            Some(format!("sha256:{digest}").as_str())
        );
        let manifest: serde_json::Value = serde_json::from_slice(&body(r).await.unwrap()).unwrap();
        let layer = manifest["layers"][1]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let b = w
            .get(
                &HttpRequest::get(format!("https://reg.example/v2/ns/repo/blobs/{layer}")),
                T,
            )
            .await
            .unwrap();
        assert_eq!(body(b).await.unwrap(), b"\0asm\x01\0\0\0");
        let missing = w
            .get(
                &HttpRequest::get("https://reg.example/v2/ns/repo/manifests/v2"),
                T,
            )
            .await
            .unwrap();
        assert_eq!(missing.status, 404);
        let by_digest = w
            .get(
                &HttpRequest::get(format!(
                    "http://reg.example/v2/ns/repo/manifests/sha256:{digest}"
                )),
                T,
            )
            .await
            .unwrap();
        assert_eq!(by_digest.status, 200);
        let refused = w
            .get(
                &HttpRequest::get("https://reg.example/v2/ns/repo/manifests/v1")
                    .header("Accept", crate::fetch::oci::DOCKER_MANIFEST),
                T,
            )
            .await
            .unwrap();
        assert_eq!(refused.status, 404, "not acceptable");
    });
    assert_eq!(
        w.counts()["reg.example"],
        RequestCounts {
            manifest: 4,
            blob: 1,
            get: 0
        }
    );
    assert!(w.unpublish_oci(&oci("reg.example/ns/repo:v1")));
    assert_eq!(w.digest(&oci("reg.example/ns/repo:v1")), None);
    assert_eq!(
        w.digest(&oci(&format!("reg.example/ns/repo@sha256:{digest}"))),
        Some(digest)
    );
}

#[test]
fn failure_rules_consume_times_and_recover() {
    let (clock, w) = world();
    w.publish_http(
        "files.example",
        "/m.wasm",
        b"\0asm\x01\0\0\0abcdefgh".to_vec(),
    );
    let get = || HttpRequest::get("https://files.example/m.wasm");
    w.add_rule(FailRule {
        host: "files.example".into(),
        kind: KindFilter::Get,
        mode: FailMode::Status(503),
        times: Some(1),
    });
    w.add_rule(FailRule {
        host: "files.example".into(),
        kind: KindFilter::Any,
        mode: FailMode::Timeout,
        times: Some(1),
    });
    w.add_rule(FailRule {
        host: "files.example".into(),
        kind: KindFilter::Manifest,
        mode: FailMode::Unavailable,
        times: None,
    });
    run(async {
        assert_eq!(w.get(&get(), T).await.unwrap().status, 503);
        assert_eq!(
            w.get(&get(), Duration::from_secs(5)).await.unwrap_err(),
            TransportError::Timeout
        );
        assert_eq!(clock.now(), Timestamp(Duration::from_secs(5)));
        assert_eq!(
            body(w.get(&get(), T).await.unwrap()).await.unwrap(),
            b"\0asm\x01\0\0\0abcdefgh"
        );
        w.add_rule(FailRule {
            host: "files.example".into(),
            kind: KindFilter::Get,
            mode: FailMode::Reset,
            times: Some(1),
        });
        let r = w.get(&get(), T).await.unwrap();
        assert!(matches!(body(r).await, Err(TransportError::Reset(_))));
        w.add_rule(FailRule {
            host: "files.example".into(),
            kind: KindFilter::Get,
            mode: FailMode::Corrupt,
            times: None,
        });
        let b = body(w.get(&get(), T).await.unwrap()).await.unwrap();
        assert_eq!(&b[..8], b"\0asm\x01\0\0\0");
        assert_eq!(b[8], b'a' ^ 0xff);
        assert_eq!(w.recover("files.example"), 2);
        assert_eq!(
            body(w.get(&get(), T).await.unwrap()).await.unwrap().len(),
            16
        );
        // The ping never fails.
        assert_eq!(
            w.get(&HttpRequest::get("https://files.example/v2/"), T)
                .await
                .unwrap()
                .status,
            200
        );
    });
    assert_eq!(w.counts()["files.example"].get, 6);
    let mut events = WorldEvents::default();
    w.take_events_into(&mut events);
    assert_eq!(events.len(), 6, "{events:?}");
    assert!(events.get(0).1.contains("503"));
    // Each event is its own text out of the shared buffer: one request each, none run together.
    for (_, text) in events.iter() {
        assert!(text.starts_with("request files.example "), "{text:?}");
        assert_eq!(text.matches("request ").count(), 1, "{text:?}");
    }
    assert!(events.get(5).1.ends_with("-> 200"), "{events:?}");
    // Taken events are gone from the world; the next take starts empty.
    w.take_events_into(&mut events);
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn auth_challenges_count_once_per_attempt() {
    let (clock, w) = world();
    w.publish_oci(
        &oci("reg.example/r:v1"),
        "v1",
        b"\0asm\x01\0\0\0",
        ImageFormat::OciArtifactSingle,
    );
    w.require_auth("reg.example", "u", "p", AuthScheme::Basic);
    let good = Credentials {
        username: "u".into(),
        password: "p".into(),
    }
    .basic_header();
    let bad = Credentials {
        username: "u".into(),
        password: "x".into(),
    }
    .basic_header();
    let m = "https://reg.example/v2/r/manifests/v1";
    run(async {
        let ping = w
            .get(&HttpRequest::get("https://reg.example/v2/"), T)
            .await
            .unwrap();
        assert_eq!(ping.status, 401);
        assert_eq!(ping.header("www-authenticate"), Some("Basic realm=\"sim\""));
        assert_eq!(
            w.get(
                &HttpRequest::get("https://reg.example/v2/").header("authorization", good.clone()),
                T
            )
            .await
            .unwrap()
            .status,
            200
        );
        // Anonymous, then the same request with credentials at once: one request.
        assert_eq!(w.get(&HttpRequest::get(m), T).await.unwrap().status, 401);
        assert_eq!(
            w.get(
                &HttpRequest::get(m).header("authorization", good.clone()),
                T
            )
            .await
            .unwrap()
            .status,
            200
        );
        assert_eq!(w.counts()["reg.example"].manifest, 1);
        // Wrong credentials are a counted 401.
        assert_eq!(
            w.get(&HttpRequest::get(m).header("authorization", bad), T)
                .await
                .unwrap()
                .status,
            401
        );
        assert_eq!(w.counts()["reg.example"].manifest, 2);
        // A later attempt is a new request.
        assert_eq!(w.get(&HttpRequest::get(m), T).await.unwrap().status, 401);
        clock.advance(Duration::from_millis(500));
        assert_eq!(
            w.get(&HttpRequest::get(m).header("authorization", good), T)
                .await
                .unwrap()
                .status,
            200
        );
        assert_eq!(w.counts()["reg.example"].manifest, 4);
    });
}

#[test]
fn bearer_hosts_hand_out_tokens_without_counting_them() {
    let (_, w) = world();
    w.publish_oci(
        &oci("reg.example/r:v1"),
        "v1",
        b"\0asm\x01\0\0\0",
        ImageFormat::OciArtifactSingle,
    );
    w.require_auth("reg.example", "u", "p", AuthScheme::Bearer);
    let good = Credentials {
        username: "u".into(),
        password: "p".into(),
    }
    .basic_header();
    let m = "https://reg.example/v2/r/manifests/v1";
    run(async {
        let ping = w
            .get(&HttpRequest::get("https://reg.example/v2/"), T)
            .await
            .unwrap();
        assert_eq!(ping.status, 401);
        assert_eq!(
            ping.header("www-authenticate"),
            Some("Bearer realm=\"https://reg.example/sim/token\",service=\"reg.example\"")
        );
        let token_url = "https://reg.example/sim/token?service=reg.example&scope=repository:r:pull";
        let t = w
            .get(
                &HttpRequest::get(token_url).header("authorization", good),
                T,
            )
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body(t).await.unwrap()).unwrap();
        let token = v["token"].as_str().unwrap().to_string();
        let anon = w.get(&HttpRequest::get(token_url), T).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body(anon).await.unwrap()).unwrap();
        let anon_token = v["token"].as_str().unwrap().to_string();
        let bad = Credentials {
            username: "u".into(),
            password: "x".into(),
        }
        .basic_header();
        assert_eq!(
            w.get(&HttpRequest::get(token_url).header("authorization", bad), T)
                .await
                .unwrap()
                .status,
            401
        );
        let r = w
            .get(
                &HttpRequest::get(m).header("authorization", format!("Bearer {anon_token}")),
                T,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401);
        assert!(r
            .header("www-authenticate")
            .unwrap()
            .contains("scope=\"repository:r:pull\""));
        let r = w
            .get(
                &HttpRequest::get(m).header("authorization", format!("Bearer {token}")),
                T,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    });
    assert_eq!(
        w.counts()["reg.example"],
        RequestCounts {
            manifest: 2,
            blob: 0,
            get: 0
        }
    );
}

#[test]
fn blocked_addresses_are_refused_without_counting() {
    let (_, w) = world();
    run(async {
        let e = w
            .get(
                &HttpRequest::get("http://169.254.169.254/latest/meta-data"),
                T,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Blocked(_)));
    });
    assert!(w.counts().is_empty());
}

#[test]
fn a_republished_module_reuses_its_image_and_new_bytes_get_a_new_one() {
    let (_, w) = world();
    let (a, b) = (oci("reg.example/ns/a:v1"), oci("reg.example/ns/b:v1"));
    let first = w.publish_oci(&a, "m", b"\0asm\x01\0\0\0one", ImageFormat::OciArtifact);
    // The same module elsewhere: the same image, hence the same manifest digest.
    assert_eq!(
        w.publish_oci(&b, "m", b"\0asm\x01\0\0\0one", ImageFormat::OciArtifact),
        first
    );
    assert_eq!(w.digest(&b).as_deref(), Some(first.as_str()));
    // Other bytes under the same module name, or another format: another image.
    let other = w.publish_oci(&a, "m", b"\0asm\x01\0\0\0two", ImageFormat::OciArtifact);
    assert_ne!(other, first);
    assert_eq!(w.digest(&a).as_deref(), Some(other.as_str()));
    let docker = w.publish_oci(&a, "m", b"\0asm\x01\0\0\0two", ImageFormat::Docker);
    assert_ne!(docker, other);
}
