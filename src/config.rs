//! Server options (behavior.md §9): defaults as named constants, Go-style durations and
//! Kubernetes-style sizes, and validation with errors that name the variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
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

/// How the code reaches Envoy (behavior.md §7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    #[default]
    File,
    Inline,
    Http,
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

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {name}={value:?}: {why}")]
pub struct OptionError {
    pub name: String,
    pub value: String,
    pub why: String,
}

fn option_error(name: &str, value: &str, why: impl Into<String>) -> OptionError {
    OptionError {
        name: name.into(),
        value: value.into(),
        why: why.into(),
    }
}

/// Parses a Go-style duration: a sequence of decimal numbers with units `ns`, `us`/`µs`, `ms`, `s`,
/// `m`, `h`, e.g. `90s`, `1h30m`, `1.5h`. `0` alone is allowed.
pub fn parse_go_duration(name: &str, s: &str) -> Result<Duration, OptionError> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() || t.starts_with('-') {
        return Err(option_error(
            name,
            s,
            "want a positive Go duration such as 90s or 1h30m",
        ));
    }
    // humantime accepts the Go forms with integer values; Go also allows fractions ("1.5h").
    if let Ok(d) = humantime::parse_duration(t) {
        if t.chars().all(|c| c.is_ascii_alphanumeric() || c == 'µ')
            && d.as_secs_f64() <= MAX_DURATION_SECS
        {
            return Ok(d);
        }
    }
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let value: f64 = num
            .parse()
            .map_err(|_| option_error(name, s, "want a Go duration such as 90s or 1h30m"))?;
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(option_error(
                    name,
                    s,
                    format!("unknown unit {unit:?} (ns, us, ms, s, m, h)"),
                ))
            }
        };
        total += value * scale;
        rest = tail;
    }
    // Go's limit is about 290 years; anything near it is a typo here.
    if !total.is_finite() || total > MAX_DURATION_SECS {
        return Err(option_error(name, s, "too long (at most 100 years)"));
    }
    Ok(Duration::from_secs_f64(total))
}

const MAX_DURATION_SECS: f64 = 100.0 * 365.0 * 24.0 * 3600.0;

/// Parses a size: plain bytes, or a Kubernetes quantity suffix `Ki Mi Gi Ti` / `k M G T`.
pub fn parse_size(name: &str, s: &str) -> Result<u64, OptionError> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| option_error(name, s, "want a size such as 268435456 or 256Mi"))?;
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
            return Err(option_error(
                name,
                s,
                format!("unknown size unit {unit:?} (Ki, Mi, Gi, k, M, G)"),
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| option_error(name, s, "too large"))
}

/// Parses a comma-separated list of CIDRs (a bare address is a /32 or /128).
pub fn parse_cidrs(name: &str, s: &str) -> Result<Vec<IpNet>, OptionError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<IpNet>()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| option_error(name, s, format!("{p:?} is not a CIDR")))
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

    #[test]
    fn go_durations() {
        let d = |s| parse_go_duration("X", s).unwrap();
        assert_eq!(d("90s"), Duration::from_secs(90));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(d("25h"), Duration::from_secs(25 * 3600));
        assert_eq!(d("1.5h"), Duration::from_secs(5400));
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("0"), Duration::ZERO);
        let e = parse_go_duration("WASM_MODULE_EXPIRY", "soon").unwrap_err();
        assert!(e.to_string().contains("WASM_MODULE_EXPIRY"), "{e}");
        assert!(parse_go_duration("X", "10 parsecs").is_err());
        assert!(parse_go_duration("X", "-1s").is_err());
        assert!(parse_go_duration("X", "99999999999999999999h").is_err());
        assert!(parse_go_duration("X", "1e400s").is_err());
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
