//! Simulator throughput:
//!
//! - `sim/parse_100k_steps` and `sim/run_100k_steps`: a generated scenario of 100,000 steps over 50
//!   OCI plugins (`publish`, `apply`, `edit`, `advance` and `expect` steps; every expectation holds,
//!   so the whole scenario runs), loaded with [`parse_scenario`] and run with [`run_scenario`];
//!   reported in steps per second;
//! - `sim/scenarios_dir`: every file of `scenarios/`, found, loaded and run in-process with the
//!   report discarded ([`collect`]), once per iteration;
//! - then a summary, measured in the same run (thread CPU time, median of 5 alternated rounds):
//!   steps per second of the run, of parsing alone, and of a floor scenario of as many
//!   `advance: 1s` steps (the runner's own cost per step, no processing), with the run's ratio to
//!   each and to the 1M steps/s target. The README's performance row for the simulator is copied
//!   from this summary.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use wasm_ecds::sim::report::collect;
use wasm_ecds::sim::{parse_scenario, run_scenario};

// The binary's allocator (src/main.rs), so that the figures are those of `wasm-ecds sim`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const STEPS: usize = 100_000;
const PLUGINS: usize = 50;

/// A scenario of exactly `steps` steps over `plugins` plugins, every expectation true.
///
/// Setup: each plugin `p<i>` (`imagePullPolicy: Always`) is pulled from
/// `oci://reg.example/bench/p<i>:v1` where module `a<i>` is published; one `expect` checks them all.
/// Then blocks of six steps, plugin by plugin, round `r` after round: the tag moves (to `b<i>` in
/// even rounds, back to `a<i>` in odd ones), the plugin is re-applied with a new label (pulled in
/// round 0, revalidated from then on: both modules are cached), `expect`, a metadata `edit`
/// (revalidated), `expect`, `advance: 1s`. The run lasts under 5 virtual hours, far from the 24 h
/// module expiry, so nothing is purged.
fn scenario_yaml(steps: usize, plugins: usize) -> String {
    let mut y = String::new();
    y.push_str("name: generated throughput scenario\nseed: 1\nmodules:\n");
    for i in 0..plugins {
        let _ = writeln!(y, "  a{i}: {{}}\n  b{i}: {{}}");
    }
    y.push_str("steps:\n");
    let mut n = 0;
    let mut push = |y: &mut String, line: String| -> bool {
        if n == steps {
            return false;
        }
        y.push_str("  - ");
        y.push_str(&line);
        y.push('\n');
        n += 1;
        true
    };
    let reference = |i: usize| format!("\"oci://reg.example/bench/p{i}:v1\"");
    let apply = |i: usize, rev: usize| {
        format!(
            "apply: {{apiVersion: extensions.istio.io/v1alpha1, kind: WasmPlugin, \
             metadata: {{name: p{i}, namespace: default, labels: {{rev: \"{rev}\"}}}}, \
             spec: {{url: {}, imagePullPolicy: Always}}}}",
            reference(i)
        )
    };
    let expect = |i: usize, outcome: &str, module: &str| {
        format!("expect: {{plugins: {{default/p{i}: {{outcome: {outcome}, serves: {module}}}}}}}")
    };
    for i in 0..plugins {
        push(
            &mut y,
            format!("publish: {{ref: {}, module: a{i}}}", reference(i)),
        );
        push(&mut y, apply(i, 0));
    }
    let all: Vec<String> = (0..plugins)
        .map(|i| format!("default/p{i}: {{outcome: pulled, serves: a{i}}}"))
        .collect();
    push(
        &mut y,
        format!("expect: {{plugins: {{{}}}}}", all.join(", ")),
    );
    let mut block = 0usize;
    loop {
        let (round, i) = (block / plugins, block % plugins);
        let module = if round % 2 == 0 {
            format!("b{i}")
        } else {
            format!("a{i}")
        };
        let first = if round == 0 { "pulled" } else { "revalidated" };
        let more = push(&mut y, format!("publish: {{ref: {}, module: {module}}}", reference(i)))
            && push(&mut y, apply(i, round + 1))
            && push(&mut y, expect(i, first, &module))
            && push(
                &mut y,
                format!("edit: {{plugin: default/p{i}, patch: {{metadata: {{annotations: {{note: \"e{round}\"}}}}}}}}"),
            )
            && push(&mut y, expect(i, "revalidated", &module))
            && push(&mut y, "advance: 1s".to_string());
        if !more {
            return y;
        }
        block += 1;
    }
}

fn bench_generated(c: &mut Criterion) {
    // The binary's allocator options too (the first bench to run sets them).
    wasm_ecds::serve::configure_allocator();
    let yaml = scenario_yaml(STEPS, PLUGINS);
    let scenario = match parse_scenario(&yaml) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "\n*** SKIP: sim/*_100k_steps: the generated scenario does not load: {e} ***\n"
            );
            return;
        }
    };
    assert_eq!(scenario.steps.len(), STEPS);
    // Only a scenario that runs to its end measures every step.
    let run = run_scenario(&scenario);
    if !run.passed() {
        eprintln!(
            "\n*** SKIP: sim/run_100k_steps: the generated scenario stops early: {} ***\n",
            run.failures[0]
        );
        return;
    }

    let mut g = c.benchmark_group("sim");
    g.throughput(Throughput::Elements(STEPS as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    g.bench_function("parse_100k_steps", |b| {
        b.iter(|| parse_scenario(black_box(&yaml)).expect("loads").steps.len())
    });
    g.bench_function("run_100k_steps", |b| {
        b.iter(|| black_box(run_scenario(black_box(&scenario))).trace.len())
    });
    g.finish();
}

/// `steps` steps of `advance: 1s`: what the runner costs per step when no step processes anything.
fn floor_yaml(steps: usize) -> String {
    let mut y = String::from("name: runner floor\nmodules: {}\nsteps:\n");
    for _ in 0..steps {
        y.push_str("  - advance: 1s\n");
    }
    y
}

/// The CPU time this thread spent in `f` (the simulator runs on a current-thread runtime, so all
/// of its work is on this thread): on a machine shared with other builds, wall time mostly
/// measures the neighbours.
fn cpu_time(f: impl FnOnce()) -> Duration {
    let now = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let start = now();
    f();
    now().saturating_sub(start)
}

/// Steps per second, ratios against the parse and the floor measured in the same run.
fn summary(_: &mut Criterion) {
    let yaml = scenario_yaml(STEPS, PLUGINS);
    let floor = floor_yaml(STEPS);
    let (Ok(scenario), Ok(floor_scenario)) = (parse_scenario(&yaml), parse_scenario(&floor)) else {
        return;
    };
    let rate = |d: Duration| STEPS as f64 / d.as_secs_f64();
    let (mut run, mut parse, mut base) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        run.push(cpu_time(|| {
            black_box(run_scenario(black_box(&scenario)).trace.len());
        }));
        parse.push(cpu_time(|| {
            black_box(parse_scenario(black_box(&yaml)).map(|s| s.steps.len()).ok());
        }));
        base.push(cpu_time(|| {
            black_box(run_scenario(black_box(&floor_scenario)).trace.len());
        }));
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (run, parse, base) = (rate(median(run)), rate(median(parse)), rate(median(base)));
    println!(
        "\nsim summary ({STEPS} steps, thread CPU time, median of 5 alternated rounds): run {run:.0} steps/s; \
         parse alone {parse:.0} steps/s (run = {:.2}x parse); runner floor ({STEPS} x advance: 1s) \
         {base:.0} steps/s (run = {:.2}x floor); target 1,000,000 steps/s (run = {:.3}x target)\n",
        run / parse,
        run / base,
        run / 1e6,
    );
}

fn bench_library(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let report = collect(std::slice::from_ref(&dir), false);
    let files = report.scenarios.len() + report.errors.len();
    if report.exit_code() != 0 {
        eprintln!(
            "\n*** note: scenarios/ does not pass right now ({} passed, {} failed, {} invalid); \
             timing it anyway ***\n",
            report.passed,
            report.failed,
            report.errors.len()
        );
    }
    let mut g = c.benchmark_group("sim");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.bench_function(format!("scenarios_dir_{files}_files"), |b| {
        b.iter(|| black_box(collect(std::slice::from_ref(&dir), false)).passed)
    });
    g.finish();
}

criterion_group!(benches, bench_generated, bench_library, summary);
criterion_main!(benches);
