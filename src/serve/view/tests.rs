//! Unit tests of the views' queries, paging and bodies.
use super::*;

#[test]
fn queries_parse_and_bad_ones_name_the_culprit() {
    let q = PluginsQuery::parse("limit=2&after=ns%2Fa").unwrap();
    assert_eq!(q.after, Some(ObjectKey::new("ns", "a")));
    assert_eq!(q.limit, 2);
    let q = PluginsQuery::parse("plugin=ns/e/r").unwrap();
    assert_eq!(q.plugin, Some(ObjectKey::new("ns", "e/r")));
    assert_eq!(q.limit, DEFAULT_LIMIT);
    for (bad, culprit) in [
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("limit=10001", "limit"),
        ("after=", "after"),
        ("plugin=ns/", "plugin"),
        ("plugin=a&after=b", "plugin"),
        ("limit=1&limit=2", "limit"),
        ("page=2", "page"),
        ("module=ABCD", "module"),
        ("module=abc&plugin=ns/a", "module"),
        ("fileErrors=-1", "fileErrors"),
        ("fileErrors=3&plugin=ns/a", "fileErrors"),
        ("fileErrors=3&after=ns/a", "fileErrors"),
        ("conflicts=x", "conflicts"),
        ("conflicts=0&plugin=ns/a", "conflicts"),
        ("conflicts=0&fileErrors=0", "fileErrors"),
    ] {
        let e = PluginsQuery::parse(bad).unwrap_err();
        assert!(e.contains(culprit) && !e.contains('\n'), "{bad}: {e}");
    }
    let sha = "ab".repeat(32);
    let q = PluginsQuery::parse(&format!("module={sha}&after=ns/a&limit=7")).unwrap();
    assert_eq!(q.module.as_deref(), Some(sha.as_str()));
    assert_eq!((q.after, q.limit), (Some(ObjectKey::new("ns", "a")), 7));
    assert!(PluginsQuery::parse(&format!("module={sha}&plugin=ns/a")).is_err());
    let q = PluginsQuery::parse("fileErrors=1000&limit=10").unwrap();
    assert_eq!((q.file_errors, q.limit), (Some(1000), 10));
    let q = PluginsQuery::parse("conflicts=4&limit=2").unwrap();
    assert_eq!((q.conflicts, q.file_errors, q.limit), (Some(4), None, 2));
    let q = CacheQuery::parse("after=oci%3A%2F%2Fr%2Fm%40sha256%3Aab&limit=5").unwrap();
    assert_eq!(q.after, Some(ModuleKey::new("oci://r/m", "sha256:ab")));
    assert!(CacheQuery::parse("after=nochecksum").is_err());
    assert!(CacheQuery::parse("plugin=a").is_err());
}

#[test]
fn conflicts_are_paged_by_position() {
    let mut sources = Sources::default();
    for i in 0..5 {
        let key = ObjectKey::new("ns", format!("p{i}"));
        let conflict = Conflict {
            object: key.to_string(),
            kind: "WasmPlugin",
            message: format!("m{i}"),
        };
        sources.conflicts.insert(("WasmPlugin", key), conflict);
    }
    let mut walked = Vec::new();
    let mut from = Some(0);
    while let Some(f) = from {
        let mut page = PluginsPage::default();
        page.add_conflicts(&sources, f, 2);
        walked.extend(page.conflicts.iter().map(|c| c.message.clone()));
        from = page.conflicts_next;
    }
    assert_eq!(walked, ["m0", "m1", "m2", "m3", "m4"]);
    let mut past = PluginsPage::default();
    past.add_conflicts(&sources, 9, 2);
    assert!(past.conflicts.is_empty() && past.conflicts_next.is_none());
}

#[tokio::test]
async fn the_body_is_one_json_object_whatever_the_chunking() {
    use tokio_stream::StreamExt as _;
    let rows: Vec<RefusedRow> = (0..3000)
        .map(|i| RefusedRow {
            plugin: format!("ns/p{i}"),
            field: "spec.url".into(),
            error: "x".repeat(i % 7),
        })
        .collect();
    let body = json_body(vec![
        array("refused", rows),
        array::<FileError>("fileErrors", Vec::new()),
        scalar("next", &Some("ns/p2999")),
    ]);
    let chunks: Vec<Bytes> = body
        .map(|f| f.unwrap().into_data().unwrap())
        .collect()
        .await;
    assert!(chunks.len() > 1, "written in pieces");
    let all: Vec<u8> = chunks.concat();
    let v: serde_json::Value = serde_json::from_slice(&all).unwrap();
    assert_eq!(v["refused"].as_array().unwrap().len(), 3000);
    assert_eq!(v["refused"][2999]["plugin"], "ns/p2999");
    assert_eq!(v["fileErrors"], serde_json::json!([]));
    assert_eq!(v["next"], "ns/p2999");
}
