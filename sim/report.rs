//! `sim PATH...`: finds scenario files, runs them and reports (scenarios.md "Running"): text (one
//! line per scenario and a summary), JSON (`--json`), JUnit XML (`--junit FILE`), traces
//! (`--trace`), and the exit status (0 all passed, 1 a check failed, 2 a file could not be read or is
//! not a valid scenario).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::runner::{run_scenario, CheckFailure, ScenarioRun};
use super::scenario::{parse_scenario, LoadError};

pub const EXIT_PASSED: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;
/// The name of the JUnit test suite.
pub const JUNIT_SUITE: &str = "wasm-ecds sim";
/// Directories are searched this deep at most (a guard against symlink loops).
const MAX_DEPTH: usize = 64;

/// Options of `sim`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Print every event of every scenario with its virtual time.
    pub trace: bool,
    /// Print one JSON document instead of text.
    pub json: bool,
    /// Also write JUnit XML to this file.
    pub junit: Option<PathBuf>,
}

/// The report of one scenario file that ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScenarioReport {
    pub file: String,
    pub name: String,
    pub passed: bool,
    /// The first failing check (`null` when passed).
    pub failure: Option<CheckFailure>,
    /// Every failing check of the failing step.
    pub failures: Vec<CheckFailure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<Vec<String>>,
}

/// A file that could not be read or is not a valid scenario.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileError {
    pub file: String,
    /// 1-based step index when the problem is in a step.
    pub step: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.step {
            Some(n) => write!(f, "{}: step {n}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Everything `sim` found and ran.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub scenarios: Vec<ScenarioReport>,
    pub errors: Vec<FileError>,
    pub passed: usize,
    pub failed: usize,
}

impl Report {
    pub fn exit_code(&self) -> i32 {
        if !self.errors.is_empty() {
            EXIT_INVALID
        } else if self.failed > 0 {
            EXIT_FAILED
        } else {
            EXIT_PASSED
        }
    }
}

/// Runs `sim` over `paths`, printing to stdout (reports) and stderr (errors); returns the exit
/// status.
pub fn run_paths(paths: &[PathBuf], opts: RunOptions) -> i32 {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    run_paths_to(paths, &opts, &mut stdout.lock(), &mut stderr.lock())
}

/// [`run_paths`] with explicit outputs.
pub fn run_paths_to(
    paths: &[PathBuf],
    opts: &RunOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let report = collect(paths, opts.trace);
    let mut code = report.exit_code();
    for e in &report.errors {
        let _ = writeln!(err, "error: {e}");
    }
    let written = if opts.json {
        write_json(&report, out)
    } else {
        write_text(&report, opts.trace, out)
    };
    if let Err(e) = written {
        let _ = writeln!(err, "error: cannot write the report: {e}");
        code = EXIT_INVALID;
    }
    if let Some(path) = &opts.junit {
        if let Err(e) = std::fs::write(path, junit_xml(&report)) {
            let _ = writeln!(
                err,
                "error: {}: cannot write the JUnit report: {e}",
                path.display()
            );
            code = EXIT_INVALID;
        }
    }
    code
}

/// Finds, loads and runs every scenario under `paths`. Runs on its own thread when called from
/// inside a tokio runtime (each scenario starts a runtime of its own).
pub fn collect(paths: &[PathBuf], keep_trace: bool) -> Report {
    if tokio::runtime::Handle::try_current().is_ok() {
        return std::thread::scope(|s| {
            s.spawn(|| collect_here(paths, keep_trace))
                .join()
                .unwrap_or_else(|_| Report {
                    errors: vec![FileError {
                        file: "(sim)".into(),
                        step: None,
                        message: "the simulator panicked".into(),
                    }],
                    ..Report::default()
                })
        });
    }
    collect_here(paths, keep_trace)
}

fn collect_here(paths: &[PathBuf], keep_trace: bool) -> Report {
    let mut report = Report::default();
    if paths.is_empty() {
        report.errors.push(FileError {
            file: "(arguments)".into(),
            step: None,
            message: "no scenario PATH given".into(),
        });
    }
    for path in paths {
        let files = match scenario_files(path) {
            Ok(f) => f,
            Err(message) => {
                report.errors.push(FileError {
                    file: path.display().to_string(),
                    step: None,
                    message,
                });
                continue;
            }
        };
        for file in files {
            let shown = file.display().to_string();
            match load(&file) {
                Err(e) => report.errors.push(FileError {
                    file: shown,
                    step: e.step,
                    message: e.message,
                }),
                Ok(scenario) => {
                    let run = run_guarded(&scenario);
                    let passed = run.passed();
                    if passed {
                        report.passed += 1;
                    } else {
                        report.failed += 1;
                    }
                    report.scenarios.push(ScenarioReport {
                        file: shown,
                        name: scenario.name.clone(),
                        passed,
                        failure: run.failures.first().cloned(),
                        failures: run.failures,
                        trace: keep_trace.then(|| run.trace.to_lines()),
                    });
                }
            }
        }
    }
    report
}

fn load(file: &Path) -> Result<super::scenario::Scenario, LoadError> {
    let text = std::fs::read_to_string(file).map_err(|e| LoadError {
        step: None,
        message: format!("cannot read: {e}"),
    })?;
    // Parsing never panics by design; should it, the file is reported, not the whole run lost.
    std::panic::catch_unwind(|| parse_scenario(&text)).unwrap_or_else(|payload| {
        Err(LoadError {
            step: None,
            message: format!("internal error: {}", panic_message(&*payload)),
        })
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs a scenario; a panic in the code under test fails the scenario instead of ending the run.
fn run_guarded(scenario: &super::scenario::Scenario) -> ScenarioRun {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_scenario(scenario))) {
        Ok(run) => run,
        Err(payload) => {
            let msg = panic_message(&*payload);
            ScenarioRun {
                failures: vec![CheckFailure {
                    step: 0,
                    check: "error".into(),
                    expected: "the scenario to run".into(),
                    actual: format!("panic: {msg}"),
                }],
                trace: Default::default(),
            }
        }
    }
}

/// A file as is; a directory: every `*.yaml`/`*.yml` below it, sorted by path.
pub fn scenario_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    walk(path, 0, &mut out)?;
    out.sort();
    if out.is_empty() {
        return Err("no *.yaml scenario files in this directory".into());
    }
    Ok(out)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{}: directories nested too deep", dir.display()));
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("{}: cannot read: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: cannot read: {e}", dir.display()))?;
        let path = entry.path();
        let meta = std::fs::metadata(&path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        if meta.is_dir() {
            walk(&path, depth + 1, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml")
        {
            out.push(path);
        }
    }
    Ok(())
}

fn write_text(report: &Report, trace: bool, out: &mut dyn Write) -> std::io::Result<()> {
    for s in &report.scenarios {
        if let Some(lines) = s.trace.as_ref().filter(|_| trace) {
            writeln!(out, "=== {}: {}", s.file, s.name)?;
            for l in lines {
                writeln!(out, "{l}")?;
            }
        }
        writeln!(
            out,
            "{} {}: {}",
            if s.passed { "PASS" } else { "FAIL" },
            s.file,
            s.name
        )?;
        for f in &s.failures {
            writeln!(out, "    {f}")?;
        }
    }
    writeln!(out, "{} passed, {} failed", report.passed, report.failed)
}

fn write_json(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, report).map_err(std::io::Error::other)?;
    writeln!(out)
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            // Characters XML 1.0 cannot carry at all.
            c if (c as u32) < 0x20 && c != '\t' && c != '\r' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: one test case per scenario, an `<error>` per invalid file.
pub fn junit_xml(report: &Report) -> String {
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let tests = report.scenarios.len() + report.errors.len();
    x.push_str(&format!(
        "<testsuites tests=\"{tests}\" failures=\"{}\" errors=\"{}\">\n",
        report.failed,
        report.errors.len()
    ));
    x.push_str(&format!(
        "  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{}\" errors=\"{}\" skipped=\"0\" time=\"0\">\n",
        xml_escape(JUNIT_SUITE),
        report.failed,
        report.errors.len()
    ));
    for s in &report.scenarios {
        x.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\" file=\"{}\" time=\"0\"",
            xml_escape(&s.file),
            xml_escape(&s.name),
            xml_escape(&s.file)
        ));
        if s.passed && s.trace.is_none() {
            x.push_str("/>\n");
            continue;
        }
        x.push_str(">\n");
        if let Some(first) = &s.failure {
            let body: Vec<String> = s.failures.iter().map(ToString::to_string).collect();
            x.push_str(&format!(
                "      <failure message=\"{}\" type=\"{}\">{}</failure>\n",
                xml_escape(&first.to_string()),
                xml_escape(&first.check),
                xml_escape(&body.join("\n"))
            ));
        }
        if let Some(trace) = &s.trace {
            x.push_str(&format!(
                "      <system-out>{}</system-out>\n",
                xml_escape(&trace.join("\n"))
            ));
        }
        x.push_str("    </testcase>\n");
    }
    for e in &report.errors {
        x.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\" time=\"0\">\n      <error message=\"{}\" type=\"invalid scenario\"/>\n    </testcase>\n",
            xml_escape(&e.file),
            xml_escape(&e.file),
            xml_escape(&e.to_string())
        ));
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}
