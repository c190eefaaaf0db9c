//! Server options (behavior.md §9): defaults as named constants, Go-style durations and
//! Kubernetes-style sizes, and validation with errors that name the variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use rustls::pki_types::CertificateDer;
use thiserror::Error;

/// Unused modules are purged after this long (24 hours).
pub const DEFAULT_MODULE_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);
/// A purge pass runs this often (1 hour).
pub const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(60 * 60);
/// Per-attempt HTTP timeout (15 seconds).
pub const DEFAULT_HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts in total per request.
pub const DEFAULT_HTTP_REQUEST_MAX_RETRIES: u32 = 5;
/// Overall deadline of one pull (30 seconds).
pub const PULL_DEADLINE: Duration = Duration::from_secs(30);
/// 256 MiB.
pub const DEFAULT_MAX_BINARY_SIZE: u64 = 256 * 1024 * 1024;
/// Module pulls running at once, all hosts together (`--max-concurrent-pulls`).
pub const DEFAULT_MAX_CONCURRENT_PULLS: usize = 16;
/// Module pulls running at once against one host or registry (`--max-pulls-per-host`).
pub const DEFAULT_MAX_PULLS_PER_HOST: usize = 8;

/// How the code reaches Envoy (behavior.md §7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    #[default]
    File,
    Inline,
    Http,
    /// Nothing is pulled: the module's own URL goes out with the `ISTIO_META_*` variables, for a
    /// `wasm-ecds proxy` (or Istio's agent) next to Envoy to convert (behavior.md §11).
    Remote,
}

/// Everything the pull/cache core needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub module_expiry: Duration,
    pub purge_interval: Duration,
    pub http_request_timeout: Duration,
    pub http_request_max_retries: u32,
    pub insecure_registries: Vec<String>,
    pub blocked_cidrs: Vec<IpNet>,
    pub max_binary_size: u64,
    pub cache_dir: PathBuf,
    pub delivery: Delivery,
    /// CA certificates trusted for every registry and HTTP host, on top of the built-in roots
    /// (`--ca-file`).
    pub ca_roots: Vec<CertificateDer<'static>>,
    /// Per `host[:port]`: CA certificates trusted for that host only (`--host-ca`).
    pub host_cas: Vec<(String, Vec<CertificateDer<'static>>)>,
    /// Module pulls running at once, all hosts together; more wait their turn (at least 1).
    pub max_concurrent_pulls: usize,
    /// Module pulls running at once against one host (at least 1).
    pub max_pulls_per_host: usize,
    /// Threads verifying the cached files at start (`--cache-verify-threads`): `None` for one per
    /// core; 0 verifies them all before anything is served.
    pub cache_verify_threads: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            module_expiry: DEFAULT_MODULE_EXPIRY,
            purge_interval: DEFAULT_PURGE_INTERVAL,
            http_request_timeout: DEFAULT_HTTP_REQUEST_TIMEOUT,
            http_request_max_retries: DEFAULT_HTTP_REQUEST_MAX_RETRIES,
            insecure_registries: Vec::new(),
            blocked_cidrs: Vec::new(),
            max_binary_size: DEFAULT_MAX_BINARY_SIZE,
            cache_dir: default_cache_dir(),
            delivery: Delivery::File,
            ca_roots: Vec::new(),
            host_cas: Vec::new(),
            max_concurrent_pulls: DEFAULT_MAX_CONCURRENT_PULLS,
            max_pulls_per_host: DEFAULT_MAX_PULLS_PER_HOST,
            cache_verify_threads: None,
        }
    }
}

impl Config {
    /// True when `host` (`host:port`) may be reached over plain HTTP without certificate checks.
    pub fn is_insecure(&self, host: &str) -> bool {
        self.insecure_registries
            .iter()
            .any(|h| h == "*" || h.eq_ignore_ascii_case(host))
    }

    /// True when connecting to `ip` is forbidden (behavior.md §4.2 "Safety").
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        is_always_blocked(ip) || self.blocked_cidrs.iter().any(|n| n.contains(&ip))
    }
}

/// Link-local and known cloud metadata addresses, never connected to.
pub fn is_always_blocked(ip: IpAddr) -> bool {
    const ALWAYS: [&str; 4] = [
        "169.254.0.0/16",
        "fe80::/10",
        "100.100.100.200/32",
        "fd00:ec2::/32",
    ];
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    ALWAYS
        .iter()
        .any(|c| c.parse::<IpNet>().is_ok_and(|n| n.contains(&ip)))
}

/// `~/.cache/wasm-ecds`, or `./.wasm-ecds-cache` when there is no user cache directory.
pub fn default_cache_dir() -> PathBuf {
    dirs::cache_dir()
        .map(|d| d.join("wasm-ecds"))
        .unwrap_or_else(|| PathBuf::from(".wasm-ecds-cache"))
}

/// A bad option value. It names the flag when the value came from the command line
/// (`--module-expiry: invalid duration "1d": ...`), otherwise the environment variable
/// (`WASM_MODULE_EXPIRY=1d: invalid duration: ...`).
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{}", self.render())]
pub struct OptionError {
    /// The environment variable of the option (or, outside `serve`, the field being parsed).
    pub name: String,
    /// The flag (`--module-expiry`) when the value was given as one.
    pub flag: Option<String>,
    /// What the value should be: `duration`, `size`, `count`, `CIDR list`, ...
    pub kind: String,
    pub value: String,
    /// What is wrong, without the value, e.g. `unknown unit "d" (ns, us, µs, ms, s, m, h)`.
    pub why: String,
}

impl OptionError {
    pub fn new(
        name: impl Into<String>,
        kind: impl Into<String>,
        value: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        OptionError {
            name: name.into(),
            flag: None,
            kind: kind.into(),
            value: value.into(),
            why: why.into(),
        }
    }

    /// The same error, naming `flag` instead of the variable.
    pub fn for_flag(mut self, flag: impl Into<String>) -> Self {
        self.flag = Some(flag.into());
        self
    }

    fn render(&self) -> String {
        let (kind, value, why) = (&self.kind, &self.value, &self.why);
        match &self.flag {
            Some(flag) => format!("{flag}: invalid {kind} {value:?}: {why}"),
            None => {
                let plain = !value.is_empty()
                    && !value
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control() || c == '"');
                if plain {
                    format!("{}={value}: invalid {kind}: {why}", self.name)
                } else {
                    format!("{}={value:?}: invalid {kind}: {why}", self.name)
                }
            }
        }
    }
}

/// Why a string is not a Go duration ([`go_duration`]).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("want a Go duration such as 90s, 1h30m or 1.5h")]
    Syntax,
    #[error("missing unit (ns, us, µs, ms, s, m, h)")]
    MissingUnit,
    #[error("unknown unit {0:?} (ns, us, µs, ms, s, m, h)")]
    UnknownUnit(String),
    #[error("too long (at most 2562047h47m16.854775807s)")]
    Overflow,
    #[error("must not be negative")]
    Negative,
}

/// Go's `time.ParseDuration` (which Istio uses for its `WASM_*` variables), without negative
/// values: a sequence of decimal numbers, each with an optional fraction and a unit (`ns`,
/// `us`/`µs`/`μs`, `ms`, `s`, `m`, `h`), e.g. `90s`, `1h30m`, `1.5h`, `.5s`, `300ms`; `0` alone is
/// allowed. No spaces, no other units (`1d`, `5min`, `1w` are errors), no bare numbers but `0`.
/// Computed in integer nanoseconds exactly as Go does, so the limit is Go's (about 292 years).
pub fn go_duration(s: &str) -> Result<Duration, DurationError> {
    const LIMIT: u64 = 1 << 63;
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(DurationError::Syntax);
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let b = rest.as_bytes();
        if !(b[0] == b'.' || b[0].is_ascii_digit()) {
            return Err(DurationError::Syntax);
        }
        // [0-9]*
        let int_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
        let mut v: u64 = 0;
        for &c in &b[..int_len] {
            if v > LIMIT / 10 {
                return Err(DurationError::Overflow);
            }
            v = v * 10 + u64::from(c - b'0');
            if v > LIMIT {
                return Err(DurationError::Overflow);
            }
        }
        rest = &rest[int_len..];
        // (\.[0-9]*)?: digits beyond what fits in 63 bits are ignored, as in Go.
        let (mut f, mut scale, mut frac_len) = (0u64, 1f64, 0usize);
        if let Some(after_dot) = rest.strip_prefix('.') {
            rest = after_dot;
            frac_len = rest.bytes().take_while(|c| c.is_ascii_digit()).count();
            let mut overflow = false;
            for c in rest[..frac_len].bytes() {
                if overflow || f > (LIMIT - 1) / 10 {
                    overflow = true;
                    continue;
                }
                let y = f * 10 + u64::from(c - b'0');
                if y > LIMIT {
                    overflow = true;
                    continue;
                }
                f = y;
                scale *= 10.0;
            }
            rest = &rest[frac_len..];
        }
        if int_len == 0 && frac_len == 0 {
            return Err(DurationError::Syntax);
        }
        // The unit runs up to the next digit or dot.
        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        if unit_len == 0 {
            return Err(DurationError::MissingUnit);
        }
        let unit: u64 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => return Err(DurationError::UnknownUnit(other.to_string())),
        };
        rest = &rest[unit_len..];
        if v > LIMIT / unit {
            return Err(DurationError::Overflow);
        }
        v *= unit;
        if f > 0 {
            // As in Go: a float64 keeps fractions of hours accurate to the nanosecond.
            v += (f as f64 * (unit as f64 / scale)) as u64;
            if v > LIMIT {
                return Err(DurationError::Overflow);
            }
        }
        total += v;
        if total > LIMIT {
            return Err(DurationError::Overflow);
        }
    }
    if neg && total > 0 {
        return Err(DurationError::Negative);
    }
    if total > LIMIT - 1 {
        return Err(DurationError::Overflow);
    }
    Ok(Duration::from_nanos(total))
}

/// [`go_duration`] as an option value named `name` (its environment variable).
pub fn parse_go_duration(name: &str, s: &str) -> Result<Duration, OptionError> {
    go_duration(s).map_err(|e| OptionError::new(name, "duration", s, e.to_string()))
}

/// Parses a size: plain bytes, or a Kubernetes quantity suffix `Ki Mi Gi Ti` / `k M G T`.
pub fn parse_size(name: &str, s: &str) -> Result<u64, OptionError> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| OptionError::new(name, "size", s, "want bytes, such as 268435456 or 256Mi"))?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => {
            return Err(OptionError::new(
                name,
                "size",
                s,
                format!("unknown unit {unit:?} (Ki, Mi, Gi, Ti, k, M, G, T)"),
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| OptionError::new(name, "size", s, "too large"))
}

/// Parses a comma-separated list of CIDRs (a bare address is a /32 or /128).
pub fn parse_cidrs(name: &str, s: &str) -> Result<Vec<IpNet>, OptionError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<IpNet>()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| OptionError::new(name, "CIDR list", s, format!("{p:?} is not a CIDR")))
        })
        .collect()
}

/// Reads a PEM bundle of CA certificates (every `CERTIFICATE` block; other blocks are skipped).
/// A file that cannot be read, is not PEM or holds no certificate is an error naming `name`.
pub fn load_ca_file(name: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, OptionError> {
    use rustls::pki_types::pem::PemObject;
    let err = |why: String| OptionError::new(name, "CA file", path, why);
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE in it".into()));
    }
    // Each must be usable as a root: refused here rather than when the first pull fails.
    let mut store = rustls::RootCertStore::empty();
    for c in &certs {
        store
            .add(c.clone())
            .map_err(|e| err(format!("unusable certificate: {e}")))?;
    }
    Ok(certs)
}

/// Parses `host[:port]=FILE` entries (the CA of one host) and reads their files.
pub fn parse_host_cas(
    name: &str,
    entries: &[String],
) -> Result<Vec<(String, Vec<CertificateDer<'static>>)>, OptionError> {
    entries
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('=') {
            Some((host, file)) if !host.is_empty() && !file.is_empty() && !host.contains('/') => {
                Ok((host.to_ascii_lowercase(), load_ca_file(name, file)?))
            }
            _ => Err(OptionError::new(
                name,
                "host CA",
                e,
                "want host[:port]=FILE",
            )),
        })
        .collect()
}

/// Parses a comma-separated host list.
pub fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Formats a duration as Go's `Duration.String` does (`1h30m0s`, `1.5s`, `300ms`, `2µs`, `0s`):
    /// [`go_duration`] reads every output back to the same value.
    fn format_go_duration(d: Duration) -> String {
        let ns = d.as_nanos();
        if ns == 0 {
            return "0s".into();
        }
        // Below a second: one unit with a fraction.
        if ns < 1_000_000_000 {
            let (unit, per) = match ns {
                n if n < 1_000 => ("ns", 1),
                n if n < 1_000_000 => ("µs", 1_000),
                _ => ("ms", 1_000_000),
            };
            return format!("{}{unit}", fraction(ns, per));
        }
        let (h, rest) = (ns / 3_600_000_000_000, ns % 3_600_000_000_000);
        let (m, rest) = (rest / 60_000_000_000, rest % 60_000_000_000);
        let secs = fraction(rest, 1_000_000_000);
        match (h, m) {
            (0, 0) => format!("{secs}s"),
            (0, m) => format!("{m}m{secs}s"),
            (h, m) => format!("{h}h{m}m{secs}s"),
        }
    }

    /// `n / per` in decimal, without trailing zeros in the fraction.
    fn fraction(n: u128, per: u128) -> String {
        let (whole, frac) = (n / per, n % per);
        if frac == 0 {
            return whole.to_string();
        }
        let width = per.ilog10() as usize;
        let digits = format!("{frac:0width$}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    }

    /// Go's own `time.ParseDuration` test table (time_test.go), plus the forms users try.
    #[test]
    fn go_durations() {
        let ok = |s: &str| go_duration(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        let ns = Duration::from_nanos;
        let secs = Duration::from_secs;
        for (s, want) in [
            ("0", Duration::ZERO),
            ("+0", Duration::ZERO),
            ("-0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("5s", secs(5)),
            ("30s", secs(30)),
            ("1478s", secs(1478)),
            ("+5s", secs(5)),
            ("90s", secs(90)),
            ("5.0s", secs(5)),
            ("5.6s", ns(5_600_000_000)),
            ("5.s", secs(5)),
            (".5s", ns(500_000_000)),
            ("1.004s", ns(1_004_000_000)),
            ("100.00100s", ns(100_001_000_000)),
            ("10ns", ns(10)),
            ("11us", ns(11_000)),
            ("2us", ns(2_000)),
            ("12\u{b5}s", ns(12_000)),
            ("12\u{3bc}s", ns(12_000)),
            ("13ms", ns(13_000_000)),
            ("300ms", ns(300_000_000)),
            ("15m", secs(900)),
            ("16h", secs(16 * 3600)),
            ("25h", secs(25 * 3600)),
            ("1h30m", secs(5400)),
            ("1.5h", secs(5400)),
            ("3h30m", secs(12600)),
            ("10.5s4m", ns(250_500_000_000)),
            ("1h2m3s4ms5us6ns", ns(3_723_004_005_006)),
            ("39h9m14.425s", ns(140_954_425_000_000)),
            ("52763797000ns", ns(52_763_797_000)),
            ("0.3333333333333333333h", secs(20 * 60)),
            ("9007199254740993ns", ns(9_007_199_254_740_993)),
            ("9223372036854775807ns", ns(i64::MAX as u64)),
            ("9223372036854775.807us", ns(i64::MAX as u64)),
            ("9223372036s854ms775us807ns", ns(i64::MAX as u64)),
            ("0.100000000000000000000h", secs(6 * 60)),
            ("0.830103483285477580700h", ns(2_988_372_539_827)),
        ] {
            assert_eq!(ok(s), want, "{s:?}");
        }
        use DurationError::*;
        for (s, want) in [
            ("", Syntax),
            ("-", Syntax),
            ("s", Syntax),
            (".", Syntax),
            ("-.", Syntax),
            (".s", Syntax),
            ("+.s", Syntax),
            ("soon", Syntax),
            (" 1h", Syntax),
            ("3", MissingUnit),
            ("00", MissingUnit),
            ("1.5", MissingUnit),
            ("1h30", MissingUnit),
            ("1d", UnknownUnit("d".into())),
            ("1w", UnknownUnit("w".into())),
            ("5min", UnknownUnit("min".into())),
            ("1 h", UnknownUnit(" h".into())),
            ("1h ", UnknownUnit("h ".into())),
            ("10 parsecs", UnknownUnit(" parsecs".into())),
            ("1e3s", UnknownUnit("e".into())),
            ("1S", UnknownUnit("S".into())),
            ("9223372036854775808ns", Overflow),
            ("9223372036854775.808us", Overflow),
            ("9223372036854ms775us808ns", Overflow),
            ("99999999999999999999h", Overflow),
            ("3000000h", Overflow),
            ("-1s", Negative),
            ("-1.5h", Negative),
        ] {
            assert_eq!(go_duration(s), Err(want), "{s:?}");
        }
    }

    #[test]
    fn option_errors_name_the_variable_or_the_flag() {
        let e = parse_go_duration("WASM_MODULE_EXPIRY", "1d").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"WASM_MODULE_EXPIRY=1d: invalid duration: unknown unit "d" (ns, us, µs, ms, s, m, h)"#
        );
        assert_eq!(
            e.for_flag("--module-expiry").to_string(),
            r#"--module-expiry: invalid duration "1d": unknown unit "d" (ns, us, µs, ms, s, m, h)"#
        );
        let e = parse_go_duration("WASM_PURGE_INTERVAL", "1 h").unwrap_err();
        assert!(
            e.to_string().starts_with(r#"WASM_PURGE_INTERVAL="1 h": "#),
            "{e}"
        );
    }

    proptest::proptest! {
        /// Whatever Go's `Duration.String` prints reads back as the same duration.
        #[test]
        fn go_duration_round_trips(n in 0u64..=i64::MAX as u64) {
            let d = Duration::from_nanos(n);
            let text = format_go_duration(d);
            proptest::prop_assert_eq!(go_duration(&text), Ok(d), "{}", text);
        }
    }

    #[test]
    fn ca_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, format!("# a comment\n{}", ca.cert.pem())).unwrap();
        let pem = pem.to_str().unwrap();
        let certs = load_ca_file("WASM_ECDS_CA_FILE", pem).unwrap();
        assert_eq!(certs, vec![ca.cert.der().clone()]);
        let hosts = parse_host_cas("WASM_ECDS_HOST_CA", &[format!("Reg.Test:5000={pem}")]);
        assert_eq!(hosts.unwrap(), vec![("reg.test:5000".into(), certs)]);

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let e = load_ca_file("WASM_ECDS_CA_FILE", empty.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().ends_with("no CERTIFICATE in it"), "{e}");
        let e = load_ca_file("WASM_ECDS_CA_FILE", "/does/not/exist.pem").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("WASM_ECDS_CA_FILE=/does/not/exist.pem: invalid CA file: "),
            "{e}"
        );
        for bad in ["reg.test", "=x.pem", "reg.test=", "https://reg.test=x.pem"] {
            let e = parse_host_cas("WASM_ECDS_HOST_CA", &[bad.into()]).unwrap_err();
            assert!(
                e.to_string().contains("want host[:port]=FILE"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn sizes_and_cidrs() {
        assert_eq!(parse_size("X", "256Mi").unwrap(), 256 << 20);
        assert_eq!(parse_size("X", "1000").unwrap(), 1000);
        assert!(parse_size("X", "12Qi").is_err());
        let c = parse_cidrs("X", "10.0.0.0/8, 192.168.1.1").unwrap();
        assert_eq!(c.len(), 2);
        let cfg = Config {
            blocked_cidrs: c,
            ..Default::default()
        };
        assert!(cfg.is_blocked("10.1.2.3".parse().unwrap()));
        assert!(cfg.is_blocked("169.254.169.254".parse().unwrap()));
        assert!(cfg.is_blocked("::ffff:169.254.169.254".parse().unwrap()));
        assert!(cfg.is_blocked("100.100.100.200".parse().unwrap()));
        assert!(!cfg.is_blocked("127.0.0.1".parse().unwrap()));
    }
}
