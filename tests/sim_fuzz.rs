//! Malformed scenario files never panic (issue: "fuzzed with proptest from valid ones"): every
//! mutation of a library scenario either loads and runs to a verdict, or is refused with a
//! message; through the CLI a refused file exits 2 naming the file.

use std::path::PathBuf;
use std::process::Command;

use proptest::prelude::*;
use wasm_ecds::sim::{parse_scenario, run_scenario};

fn library() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("scenarios dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                let text = std::fs::read_to_string(&p).expect("readable");
                files.push((p, text));
            }
        }
    }
    files.sort();
    files
}

/// One way of breaking a file.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the byte at this position (modulo the length) with this one.
    Byte(usize, u8),
    /// Drop this line.
    DropLine(usize),
    /// Duplicate this line.
    DupLine(usize),
    /// Cut the file at this position.
    Truncate(usize),
    /// Swap two lines.
    Swap(usize, usize),
    /// Replace a scalar after a colon on this line with a hostile value.
    Value(usize, &'static str),
}

const HOSTILE: &[&str] = &[
    "-1",
    "1e400",
    "99999999999999999999h",
    "[]",
    "{}",
    "null",
    "''",
    "\"\\u0000\"",
    "~",
    "!!binary AAAA",
    "*anchor",
    "&a [*a]",
    "0x7fffffffffffffff",
    "5000000Gi",
    "oci://",
    "http://",
    "${digest:oci://x/y:z}",
    "${sha256:nope}",
    "{status: 99999}",
    "{status: -3}",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Byte(i, b)),
        any::<usize>().prop_map(Mutation::DropLine),
        any::<usize>().prop_map(Mutation::DupLine),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (any::<usize>(), prop::sample::select(HOSTILE)).prop_map(|(i, v)| Mutation::Value(i, v)),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let n = lines.len().max(1);
    match *m {
        Mutation::Byte(i, b) => {
            let mut bytes = text.as_bytes().to_vec();
            if !bytes.is_empty() {
                let i = i % bytes.len();
                bytes[i] = b;
            }
            return String::from_utf8_lossy(&bytes).into_owned();
        }
        Mutation::DropLine(i) if !lines.is_empty() => {
            lines.remove(i % n);
        }
        Mutation::DupLine(i) if !lines.is_empty() => {
            let l = lines[i % n].clone();
            lines.insert(i % n, l);
        }
        Mutation::Truncate(i) => {
            let cut = text
                .char_indices()
                .nth(i % text.len().max(1))
                .map_or(0, |x| x.0);
            return text[..cut].to_string();
        }
        Mutation::Swap(a, b) if !lines.is_empty() => lines.swap(a % n, b % n),
        Mutation::Value(i, v) if !lines.is_empty() => {
            let l = &mut lines[i % n];
            if let Some(pos) = l.find(": ") {
                l.truncate(pos + 2);
                l.push_str(v);
            }
        }
        _ => {}
    }
    lines.join("\n")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_scenarios_never_panic(file in any::<prop::sample::Index>(), muts in prop::collection::vec(mutation(), 1..4)) {
        let lib = library();
        let (path, text) = &lib[file.index(lib.len())];
        let mut broken = text.clone();
        for m in &muts {
            broken = apply(&broken, m);
        }
        match parse_scenario(&broken) {
            Ok(s) => {
                // Loads: it must run to a verdict (pass or fail), never panic.
                let _ = run_scenario(&s);
            }
            Err(e) => prop_assert!(!e.to_string().trim().is_empty(), "{}: empty error", path.display()),
        }
    }
}

#[test]
fn malformed_files_exit_2_naming_the_file_and_step() {
    let dir = tempfile::tempdir().unwrap();
    let bad_yaml = dir.path().join("bad-yaml.yaml");
    std::fs::write(&bad_yaml, "name: x\nmodules: {v1: {}\nsteps: [").unwrap();
    let bad_step = dir.path().join("bad-step.yaml");
    std::fs::write(
        &bad_step,
        "name: x\nmodules: {v1: {}}\nsteps:\n  - advance: 1s\n  - advance: soon\n",
    )
    .unwrap();
    let unknown_key = dir.path().join("unknown-key.yaml");
    std::fs::write(&unknown_key, "name: x\nmodules: {}\nsteps: []\nextra: 1\n").unwrap();
    for (file, want) in [
        (&bad_yaml, "bad-yaml.yaml"),
        (&bad_step, "step 2"),
        (&unknown_key, "extra"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wasm-ecds"))
            .arg("sim")
            .arg(file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", file.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{}: {stderr}", file.display());
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
