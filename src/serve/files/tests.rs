//! The file source: what a full read of the files makes of them, and the same kept up to date
//! file by file.

use std::collections::BTreeSet;

use super::*;

const PLUGIN: &str = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a}\nspec: {url: 'r/a:v1'}\n";

#[test]
fn a_list_document_is_read_as_its_items() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("list.yaml");
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}\n",
        "{apiVersion: extensions.istio.io/v1alpha1, kind: WasmPlugin, metadata: {name: a}, spec: {url: 'r/a:v1'}}",
        "{apiVersion: extensions.istio.io/v1alpha1, kind: WasmPlugin, metadata: {name: b}, spec: {url: 'r/b:v1'}}",
    );
    std::fs::write(&f, list).unwrap();
    let d = FileSource::new(vec![dir.path().to_path_buf()]).scan();
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let names: Vec<String> = d.plugins.keys().map(|k| k.to_string()).collect();
    assert_eq!(names, ["default/a", "default/b"]);
}

#[test]
fn envoy_filters_are_a_kind_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let ef = "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: a}\nspec: {configPatches: []}\n";
    // The same name as the WasmPlugin; and one refused at admission, still read.
    let bad = "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: b}\nspec: {configPatches: 1}\n";
    std::fs::write(
        dir.path().join("a.yaml"),
        format!("{PLUGIN}---\n{ef}---\n{bad}"),
    )
    .unwrap();
    let d = FileSource::new(vec![dir.path().to_path_buf()]).scan();
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.plugins.len(), 1);
    let names: Vec<String> = d.envoy_filters.keys().map(|k| k.to_string()).collect();
    assert_eq!(names, ["default/a", "default/b"]);
}

#[test]
fn a_plugin_is_kept_normalised_and_shared_with_the_store() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), PLUGIN).unwrap();
    let mut files = FileSource::new(vec![dir.path().to_path_buf()]);
    let d = files.scan();
    let key = ObjectKey::new("default", "a");
    let read = d.plugins[&key].clone();
    assert_eq!(
        read.value()["metadata"]["namespace"],
        "default",
        "normalised as admission does"
    );
    // Admission keeps the file source's object: one copy of the plugin's JSON.
    let mut store = crate::source::ObjectStore::new();
    store.apply_shared(&read);
    let stored = &store.plugin(&key).unwrap().plugin.object;
    assert!(stored.ptr_eq(&read), "the store shares the object");
    // A rescan that finds the file unchanged keeps that object.
    let again = files.scan();
    assert!(again.plugins[&key].ptr_eq(&read));
}

fn plugin(name: &str, url: &str) -> String {
    format!("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}}}\nspec: {{url: '{url}'}}\n")
}

fn error_of<'a>(d: &'a Desired, file: &Path) -> &'a str {
    let f = file.display().to_string();
    match d.errors.iter().find(|e| e.file == f) {
        Some(e) => &e.message,
        None => panic!("no error for {f}: {:?}", d.errors),
    }
}

fn names(d: &Desired) -> Vec<String> {
    d.plugins.keys().map(|k| k.to_string()).collect()
}

#[test]
fn symbolic_link_loops_are_errors_and_the_rest_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("a.yaml"), plugin("a", "r/a:v1")).unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/b.yaml"), plugin("b", "r/b:v1")).unwrap();
    std::os::unix::fs::symlink(root, root.join("l1")).unwrap();
    std::os::unix::fs::symlink(root, root.join("sub/l2")).unwrap();
    // Not a loop: a second way to a directory already read adds nothing.
    std::os::unix::fs::symlink(root.join("sub"), root.join("again")).unwrap();
    let d = FileSource::new(vec![root.to_path_buf()]).scan();
    assert_eq!(names(&d), ["default/a", "default/b"]);
    assert_eq!(d.errors.len(), 2, "{:?}", d.errors);
    for link in [root.join("l1"), root.join("sub/l2")] {
        assert!(
            error_of(&d, &link).starts_with("symbolic link loop"),
            "{:?}",
            d.errors
        );
    }
    assert_eq!(d.dirs, [root.to_path_buf(), root.join("sub")]);
}

#[test]
fn a_kubernetes_volume_is_read_once_under_the_names_it_shows() {
    // A ConfigMap volume: files are links through `..data` to a timestamped directory.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..2025_01_01_00_00_00.1")).unwrap();
    std::fs::write(root.join("..2025_01_01_00_00_00.1/a.yaml"), PLUGIN).unwrap();
    std::os::unix::fs::symlink("..2025_01_01_00_00_00.1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/a.yaml", root.join("a.yaml")).unwrap();
    let mut src = FileSource::new(vec![root.to_path_buf()]);
    let d = src.scan();
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(names(&d), ["default/a"]);
    // A bad update keeps the content under the stable name.
    std::fs::write(root.join("..2025_01_01_00_00_00.1/a.yaml"), "kind: [").unwrap();
    let d = src.scan();
    assert_eq!(names(&d), ["default/a"]);
    assert!(error_of(&d, &root.join("a.yaml")).starts_with("document 1: malformed yaml"));
}

#[test]
fn only_regular_files_within_the_size_limit_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("a.yaml"), PLUGIN).unwrap();
    let fifo = root.join("x.yaml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    std::os::unix::fs::symlink("/dev/zero", root.join("z.yaml")).unwrap();
    let big = root.join("big.yaml");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(crate::cli::MAX_MANIFEST_BYTES + 1).unwrap();
    let d = FileSource::new(vec![root.to_path_buf()]).scan();
    assert_eq!(names(&d), ["default/a"]);
    assert_eq!(
        error_of(&d, &fifo),
        "not a regular file (a FIFO): only regular files are read"
    );
    assert!(
        error_of(&d, &root.join("z.yaml")).starts_with("not a regular file (a character device)")
    );
    assert_eq!(
        error_of(&d, &big),
        "4194305 bytes, more than the 4194304-byte limit of a manifest file"
    );
    assert_eq!(d.errors.len(), 3, "{:?}", d.errors);
}

#[test]
fn a_directory_that_cannot_be_read_keeps_what_was_read_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("a.yaml"), plugin("a", "r/a:v1")).unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/b.yaml"), plugin("b", "r/b:v1")).unwrap();
    let mut src = FileSource::new(vec![root.to_path_buf()]);
    assert_eq!(names(&src.scan()), ["default/a", "default/b"]);
    // Make `sub` impossible to look into, even for root: a link to itself (ELOOP). The
    // EACCES case runs as an unprivileged user in tests/hostile_files.rs.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::rename(root.join("sub"), elsewhere.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("sub", root.join("sub")).unwrap();
    std::fs::write(root.join("c.yaml"), plugin("c", "r/c:v1")).unwrap();
    let d = src.scan();
    assert!(
        error_of(&d, &root.join("sub")).starts_with("cannot read: "),
        "{:?}",
        d.errors
    );
    assert_eq!(d.errors.len(), 1, "{:?}", d.errors);
    // b is kept from before (it may still be there), c is new.
    assert_eq!(names(&d), ["default/a", "default/b", "default/c"]);
    assert_eq!(
        d.plugins[&ObjectKey::new("default", "b")].value()["spec"]["url"],
        "r/b:v1"
    );
}

#[test]
fn an_alias_bomb_is_an_error_of_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("a.yaml"), PLUGIN).unwrap();
    let list = vec!["1"; 100_000].join(",");
    let bomb = format!(
        "{PLUGIN}---\na: &a [{list}]\nb: [{}]\n",
        vec!["*a"; 50].join(",")
    );
    std::fs::write(root.join("bomb.yaml"), bomb).unwrap();
    let d = FileSource::new(vec![root.to_path_buf()]).scan();
    assert_eq!(names(&d), ["default/a"]);
    assert_eq!(
        error_of(&d, &root.join("bomb.yaml")),
        format!("document 2: {}", plugin::decode::Budget::message())
    );
}

#[test]
fn a_second_definition_is_an_error_and_the_first_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ef = "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: a}\nspec: {configPatches: []}\n";
    let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: kubernetes.io/dockerconfigjson\ndata: {.dockerconfigjson: e30=}\n";
    std::fs::write(
        root.join("1.yaml"),
        format!("{}---\n{ef}---\n{secret}", plugin("a", "r/a:v1")),
    )
    .unwrap();
    std::fs::write(
        root.join("2.yaml"),
        format!(
            "{}---\n{}---\n{ef}---\n{secret}",
            plugin("b", "r/b:v1"),
            plugin("a", "r/a:v2")
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("3.yaml"),
        format!("{}---\n{}", plugin("c", "r/c:v1"), plugin("c", "r/c:v2")),
    )
    .unwrap();
    let d = FileSource::new(vec![root.to_path_buf()]).scan();
    assert_eq!(names(&d), ["default/a", "default/b", "default/c"]);
    assert_eq!(
        d.plugins[&ObjectKey::new("default", "a")].value()["spec"]["url"],
        "r/a:v1"
    );
    assert_eq!(
        d.plugins[&ObjectKey::new("default", "c")].value()["spec"]["url"],
        "r/c:v1"
    );
    assert_eq!(d.envoy_filters.len(), 1);
    assert_eq!(d.secrets.len(), 1);
    let first = root.join("1.yaml").display().to_string();
    let messages: Vec<(String, String)> = (d.errors.iter())
        .map(|e| (e.file.clone(), e.message.clone()))
        .collect();
    let two = root.join("2.yaml").display().to_string();
    let three = root.join("3.yaml").display().to_string();
    assert_eq!(
        messages,
        [
            (two.clone(), format!("document 2: WasmPlugin default/a is already defined by {first} (document 1), which is used; this definition is ignored")),
            (two.clone(), format!("document 3: EnvoyFilter default/a is already defined by {first} (document 2), which is used; this definition is ignored")),
            (two, format!("document 4: Secret default/s is already defined by {first} (document 3), which is used; this definition is ignored")),
            (three.clone(), format!("document 2: WasmPlugin default/c is already defined by {three} (document 1), which is used; this definition is ignored")),
        ]
    );
}

#[test]
fn bad_file_keeps_last_good_content() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.yaml");
    std::fs::write(&f, PLUGIN).unwrap();
    let mut src = FileSource::new(vec![dir.path().to_path_buf()]);
    let d = src.scan();
    assert_eq!(d.plugins.len(), 1);
    assert!(d.errors.is_empty());
    std::fs::write(&f, "kind: [").unwrap();
    let d = src.scan();
    assert_eq!(d.plugins.len(), 1, "last good content kept");
    assert_eq!(d.errors.len(), 1);
    std::fs::remove_file(&f).unwrap();
    assert!(src.scan().plugins.is_empty());
}

// The file source kept up to date file by file (`FileSource::update`): the same result as a full
// read, with work for the files that changed only.

fn changes(paths: &[PathBuf]) -> FileChanges {
    FileChanges {
        paths: paths.iter().cloned().collect(),
        rescan: false,
    }
}

/// `desired` is what one full read of the same files makes of them.
fn assert_as_a_full_read(src: &FileSource, desired: &Desired) {
    let full = FileSource::new(src.roots().to_vec()).scan();
    assert_eq!(desired.plugins, full.plugins);
    assert_eq!(desired.envoy_filters, full.envoy_filters);
    assert_eq!(desired.secrets, full.secrets);
    assert_eq!(desired.errors, full.errors);
    assert_eq!(desired.dirs, full.dirs);
}

fn keys(changed: &ChangedKeys) -> Vec<String> {
    changed
        .iter()
        .map(|(k, key)| format!("{k} {key}"))
        .collect()
}

#[test]
fn an_edit_reads_only_the_edited_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..50 {
        std::fs::write(
            root.join(format!("p{i:02}.yaml")),
            plugin(&format!("p{i:02}"), "r/a:v1"),
        )
        .unwrap();
    }
    let mut src = FileSource::new(vec![root.to_path_buf()]);
    let mut d = Desired::default();
    assert_eq!(src.rescan(&mut d).len(), 50);
    assert_eq!(src.files_read(), 50);
    let f = root.join("p07.yaml");
    std::fs::write(&f, plugin("p07", "r/a:v2")).unwrap();
    let changed = src.update(&mut d, &changes(std::slice::from_ref(&f)), &[]);
    assert_eq!(keys(&changed), ["WasmPlugin default/p07"]);
    assert_eq!(src.files_read(), 51, "only the edited file is read");
    assert_eq!(
        d.plugins[&ObjectKey::new("default", "p07")].value()["spec"]["url"],
        "r/a:v2"
    );
    assert_as_a_full_read(&src, &d);
    // Written again the same: read, nothing changed.
    let changed = src.update(&mut d, &changes(std::slice::from_ref(&f)), &[]);
    assert!(changed.is_empty());
    assert_eq!(src.files_read(), 52);
    // A path that is no manifest (an editor's temporary file) is not read.
    std::fs::write(root.join("p07.yaml.swp"), "x").unwrap();
    src.update(&mut d, &changes(&[root.join("p07.yaml.swp")]), &[]);
    assert_eq!(src.files_read(), 52);
}

#[test]
fn a_bad_edit_keeps_the_last_good_content_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let f = root.join("a.yaml");
    std::fs::write(&f, plugin("a", "r/a:v1")).unwrap();
    let mut src = FileSource::new(vec![root.to_path_buf()]);
    let mut d = Desired::default();
    src.rescan(&mut d);
    std::fs::write(&f, "kind: [").unwrap();
    assert!(src
        .update(&mut d, &changes(std::slice::from_ref(&f)), &[])
        .is_empty());
    assert_eq!(names(&d), ["default/a"]);
    assert!(error_of(&d, &f).starts_with("document 1: malformed yaml"));
    std::fs::write(&f, plugin("a", "r/a:v2")).unwrap();
    src.update(&mut d, &changes(std::slice::from_ref(&f)), &[]);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(
        d.plugins[&ObjectKey::new("default", "a")].value()["spec"]["url"],
        "r/a:v2"
    );
}

#[test]
fn an_edit_of_the_first_definition_hands_the_object_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (one, two) = (root.join("1.yaml"), root.join("2.yaml"));
    std::fs::write(&one, plugin("a", "r/a:v1")).unwrap();
    std::fs::write(&two, plugin("a", "r/a:v2")).unwrap();
    let mut src = FileSource::new(vec![root.to_path_buf()]);
    let mut d = Desired::default();
    src.rescan(&mut d);
    let a = ObjectKey::new("default", "a");
    assert_eq!(d.plugins[&a].value()["spec"]["url"], "r/a:v1");
    assert!(error_of(&d, &two).contains("already defined by"));
    // 1.yaml defines b instead: 2.yaml's a is used now, and is no error any more.
    std::fs::write(&one, plugin("b", "r/b:v1")).unwrap();
    let changed = src.update(&mut d, &changes(std::slice::from_ref(&one)), &[]);
    assert_eq!(
        keys(&changed),
        ["WasmPlugin default/a", "WasmPlugin default/b"]
    );
    assert_eq!(d.plugins[&a].value()["spec"]["url"], "r/a:v2");
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_as_a_full_read(&src, &d);
    // And back: 1.yaml's a wins again, 2.yaml's is ignored again.
    std::fs::write(&one, plugin("a", "r/a:v3")).unwrap();
    src.update(&mut d, &changes(std::slice::from_ref(&one)), &[]);
    assert_eq!(d.plugins[&a].value()["spec"]["url"], "r/a:v3");
    assert_eq!(names(&d), ["default/a"]);
    assert!(error_of(&d, &two).contains("already defined by"));
    assert_as_a_full_read(&src, &d);
    assert_eq!(src.files_read(), 4);
}

#[test]
fn files_created_and_removed_read_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for n in ["a", "b", "c"] {
        std::fs::write(root.join(format!("{n}.yaml")), plugin(n, "r/x:v1")).unwrap();
    }
    let mut src = FileSource::new(vec![root.to_path_buf()]);
    let mut d = Desired::default();
    src.rescan(&mut d);
    std::fs::remove_file(root.join("b.yaml")).unwrap();
    let changed = src.update(&mut d, &changes(&[root.join("b.yaml")]), &[]);
    assert_eq!(keys(&changed), ["WasmPlugin default/b"]);
    assert_eq!(names(&d), ["default/a", "default/c"]);
    assert_eq!(src.files_read(), 3, "a removal reads nothing");
    std::fs::write(root.join("d.yaml"), plugin("d", "r/x:v1")).unwrap();
    let changed = src.update(&mut d, &changes(&[root.join("d.yaml")]), &[]);
    assert_eq!(keys(&changed), ["WasmPlugin default/d"]);
    assert_eq!(src.files_read(), 4);
    // A new directory: walked, its file read (and, new to the watcher, read once more).
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/e.yaml"), plugin("e", "r/x:v1")).unwrap();
    src.update(&mut d, &changes(&[root.join("sub")]), &[]);
    assert_eq!(src.files_read(), 5);
    src.update(&mut d, &FileChanges::default(), &[root.join("sub")]);
    assert_eq!(src.files_read(), 6);
    assert_eq!(d.dirs, [root.to_path_buf(), root.join("sub")]);
    assert_as_a_full_read(&src, &d);
    // The directory goes: its plugin with it.
    std::fs::remove_dir_all(root.join("sub")).unwrap();
    src.update(&mut d, &changes(&[root.join("sub")]), &[]);
    assert_eq!(names(&d), ["default/a", "default/c", "default/d"]);
    assert_eq!(src.files_read(), 6);
    assert_as_a_full_read(&src, &d);
}

#[test]
fn a_kubernetes_volume_swap_reads_the_files_it_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let version = |ts: &str, a: &str| {
        let d = root.join(ts);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("a.yaml"), plugin("a", a)).unwrap();
        std::fs::write(d.join("b.yaml"), plugin("b", "r/b:v1")).unwrap();
    };
    version("..2025_01_01_00_00_00.1", "r/a:v1");
    std::os::unix::fs::symlink("..2025_01_01_00_00_00.1", root.join("..data")).unwrap();
    for f in ["a.yaml", "b.yaml"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), root.join(f)).unwrap();
    }
    std::fs::write(root.join("c.yaml"), plugin("c", "r/c:v1")).unwrap();
    let mut src = FileSource::new(vec![root.to_path_buf()]);
    let mut d = Desired::default();
    src.rescan(&mut d);
    assert_eq!(names(&d), ["default/a", "default/b", "default/c"]);
    // The kubelet's update: a new directory, `..data` swapped to it by rename, the old one gone.
    version("..2025_01_01_00_00_01.2", "r/a:v2");
    std::os::unix::fs::symlink("..2025_01_01_00_00_01.2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2025_01_01_00_00_00.1")).unwrap();
    let reported = [
        root.join("..2025_01_01_00_00_01.2"),
        root.join("..data_tmp"),
        root.join("..data"),
        root.join("..2025_01_01_00_00_00.1"),
    ];
    let before = src.files_read();
    let changed = src.update(&mut d, &changes(&reported), &[]);
    assert_eq!(keys(&changed), ["WasmPlugin default/a"]);
    assert_eq!(
        d.plugins[&ObjectKey::new("default", "a")].value()["spec"]["url"],
        "r/a:v2"
    );
    assert_eq!(
        src.files_read() - before,
        2,
        "the two files behind ..data, not c.yaml"
    );
    assert_as_a_full_read(&src, &d);
}

#[test]
fn a_rescan_reads_everything() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("a.yaml"), plugin("a", "r/a:v1")).unwrap();
    std::fs::write(root.join("b.yaml"), plugin("b", "r/b:v1")).unwrap();
    let mut src = FileSource::new(vec![root.to_path_buf()]);
    let mut d = Desired::default();
    src.rescan(&mut d);
    // Changed behind the watcher's back (its queue overflowed): found by the rescan.
    std::fs::write(root.join("b.yaml"), plugin("b", "r/b:v2")).unwrap();
    let overflow = FileChanges {
        paths: BTreeSet::new(),
        rescan: true,
    };
    let changed = src.update(&mut d, &overflow, &[]);
    assert_eq!(keys(&changed), ["WasmPlugin default/b"]);
    assert_eq!(src.files_read(), 4);
    assert_as_a_full_read(&src, &d);
}

#[test]
fn paths_beside_a_file_given_by_name_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let a = root.join("a.yaml");
    std::fs::write(&a, plugin("a", "r/a:v1")).unwrap();
    let mut src = FileSource::new(vec![a.clone()]);
    let mut d = Desired::default();
    src.rescan(&mut d);
    std::fs::write(root.join("b.yaml"), plugin("b", "r/b:v1")).unwrap();
    assert!(src
        .update(&mut d, &changes(&[root.join("b.yaml")]), &[])
        .is_empty());
    assert_eq!(src.files_read(), 1);
    // Replaced by rename (a new file under the same name): read.
    std::fs::write(root.join("tmp"), plugin("a", "r/a:v2")).unwrap();
    std::fs::rename(root.join("tmp"), &a).unwrap();
    let changed = src.update(&mut d, &changes(&[root.join("tmp"), a.clone()]), &[]);
    assert_eq!(keys(&changed), ["WasmPlugin default/a"]);
    assert_eq!(src.files_read(), 2);
    // Removed: its last good content stays (a file given by name is always read), with an error.
    std::fs::remove_file(&a).unwrap();
    assert!(src
        .update(&mut d, &changes(std::slice::from_ref(&a)), &[])
        .is_empty());
    assert_eq!(names(&d), ["default/a"]);
    assert!(error_of(&d, &a).contains("No such file"), "{:?}", d.errors);
}

/// Every map of the file source holds a file's name as the one `Arc` `found` holds.
fn assert_names_shared(src: &FileSource) {
    for name in src.found.keys() {
        let held: Vec<&FileName> = (src.names.iter().filter(|(_, n)| *n == name))
            .flat_map(|(abs, n)| [abs, n])
            .filter(|n| **n == *name)
            .chain(src.by_id.values().filter(|n| *n == name))
            .chain(src.last_good.keys().filter(|n| *n == name))
            .chain(
                src.definers
                    .values()
                    .flatten()
                    .map(|d| &d.0)
                    .filter(|n| *n == name),
            )
            .collect();
        // `names` (its absolute form is itself), `by_id`, `last_good`, `definers`.
        assert_eq!(held.len(), 5, "{}: {held:?}", name.display());
        for n in held {
            assert!(Arc::ptr_eq(n, name), "{} held twice", name.display());
        }
        assert_eq!(Arc::strong_count(name), 6, "{}", name.display());
    }
}

#[test]
fn a_file_name_is_held_once_by_all_the_maps_across_edits_and_walks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..3 {
        let text = plugin(&format!("p{i}"), "r/a:v1");
        std::fs::write(root.join(format!("p{i}.yaml")), text).unwrap();
    }
    let mut src = FileSource::new(vec![root.to_path_buf()]);
    let mut d = Desired::default();
    src.rescan(&mut d);
    assert_eq!(src.found.len(), 3);
    assert_names_shared(&src);
    // An edit, a new file and a full rescan keep one name per file.
    let f = root.join("p1.yaml");
    std::fs::write(&f, plugin("p1", "r/a:v2")).unwrap();
    src.update(&mut d, &changes(std::slice::from_ref(&f)), &[]);
    assert_names_shared(&src);
    let new = root.join("p3.yaml");
    std::fs::write(&new, plugin("p3", "r/a:v1")).unwrap();
    src.update(&mut d, &changes(&[new]), &[]);
    assert_eq!(src.found.len(), 4);
    assert_eq!(
        src.files_read(),
        5,
        "the new file alone is read, without a walk"
    );
    assert_names_shared(&src);
    src.rescan(&mut d);
    assert_names_shared(&src);
    assert_as_a_full_read(&src, &d);
}

#[test]
fn an_edit_that_changes_no_error_leaves_the_error_list_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..20 {
        std::fs::write(root.join(format!("bad{i:02}.yaml")), "a: [").unwrap();
    }
    let good = root.join("good.yaml");
    std::fs::write(&good, plugin("good", "r/a:v1")).unwrap();
    let mut src = FileSource::new(vec![root.to_path_buf()]);
    let mut d = Desired::default();
    src.rescan(&mut d);
    assert_eq!(d.errors.len(), 20);
    let (errors, dirs) = (d.errors.as_ptr(), d.dirs.as_ptr());
    // The good file edited: its object changes, the lists are not written again.
    std::fs::write(&good, plugin("good", "r/a:v2")).unwrap();
    let changed = src.update(&mut d, &changes(std::slice::from_ref(&good)), &[]);
    assert_eq!(keys(&changed), ["WasmPlugin default/good"]);
    assert_eq!((d.errors.as_ptr(), d.dirs.as_ptr()), (errors, dirs));
    assert_as_a_full_read(&src, &d);
    // A bad file fixed, and the good one broken: both show.
    std::fs::write(root.join("bad03.yaml"), plugin("fixed", "r/a:v1")).unwrap();
    std::fs::write(&good, "a: [").unwrap();
    let paths = [root.join("bad03.yaml"), good.clone()];
    src.update(&mut d, &changes(&paths), &[]);
    assert_eq!(d.errors.len(), 20);
    assert!(d.errors.iter().any(|e| e.file.ends_with("good.yaml")));
    assert!(!d.errors.iter().any(|e| e.file.ends_with("bad03.yaml")));
    // The broken file's last good content stays served.
    let good = &d.plugins[&ObjectKey::new("default", "good")];
    assert_eq!(good.value()["spec"]["url"], "r/a:v2");
}
