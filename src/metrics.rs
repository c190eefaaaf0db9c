//! The process's Prometheus registry and the Istio-compatible series (behavior.md §8) the engine
//! records, rendered as Prometheus text. Each engine owns its own [`Metrics`]: metrics start from
//! zero with every process (and every simulated restart). The xDS series (`wasm_ecds_xds_*`) are
//! defined by the resource store ([`crate::xds::store::XdsSeries`]) and join this registry when a
//! store is made with [`ResourceStore::with_metrics`](crate::xds::ResourceStore::with_metrics), so
//! that one [`Metrics::render`] is the whole `/metrics` page.
//!
//! The `prometheus` crate is used rather than `prometheus-client` because the latter appends
//! `_total` to counter names, and the names here must be exactly Istio's.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::k8s::KubeSeries;
use crate::outcome::{FetchResult, Outcome};
use crate::xds::store::XdsSeries;

pub const CACHE_ENTRIES: &str = "istio_agent_wasm_cache_entries";
pub const CACHE_LOOKUP_COUNT: &str = "istio_agent_wasm_cache_lookup_count";
pub const REMOTE_FETCH_COUNT: &str = "istio_agent_wasm_remote_fetch_count";
pub const CONFIG_CONVERSION_COUNT: &str = "istio_agent_wasm_config_conversion_count";
pub const CONFIG_CONVERSION_DURATION: &str = "istio_agent_wasm_config_conversion_duration";
pub const CACHE_EXPIRED_COUNT: &str = "wasm_ecds_cache_expired_count";
pub const PROCESSING_COUNT: &str = "wasm_ecds_plugin_processing_count";
pub const PULLS_IN_PROGRESS: &str = "wasm_ecds_pulls_in_progress";
pub const PULLS_QUEUED: &str = "wasm_ecds_pulls_queued";

/// `result` values of `istio_agent_wasm_config_conversion_count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConversionResult {
    Success,
    /// The plugin's code is a local file: nothing was fetched.
    NoRemoteLoad,
    /// The module could not be obtained (a missing pull secret included); a fallback is served.
    FetchFailure,
    /// Proxy: remote code without `http_uri`; a fallback is served.
    MissRemoteFetchHint,
    /// Proxy: the converted response cannot be sent; it is NACKed upstream.
    MarshalFailure,
    /// Proxy: a resource cannot be read; the response is NACKed upstream.
    UnmarshalFailure,
}

impl ConversionResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ConversionResult::Success => "success",
            ConversionResult::NoRemoteLoad => "no_remote_load",
            ConversionResult::FetchFailure => "fetch_failure",
            ConversionResult::MissRemoteFetchHint => "miss_remote_fetch_hint",
            ConversionResult::MarshalFailure => "marshal_failure",
            ConversionResult::UnmarshalFailure => "unmarshal_failure",
        }
    }
}

/// A counter with one label whose series are kept once made: recording one is an atomic add, not
/// a hash of the label value and a lookup under the family's lock (the engine records four per
/// processing). A series is still made on first use only, so the page lists exactly the values
/// recorded; `N` is how many values the label has.
#[derive(Clone)]
struct LabeledCounter<const N: usize> {
    family: IntCounterVec,
    series: Arc<[OnceLock<IntCounter>; N]>,
}

impl<const N: usize> LabeledCounter<N> {
    fn new(family: IntCounterVec) -> Self {
        LabeledCounter {
            family,
            series: Arc::new(std::array::from_fn(|_| OnceLock::new())),
        }
    }

    /// Adds one to the series of `value`, the `index`-th of the label's values (another index is
    /// looked up in the family each time).
    fn inc(&self, index: usize, value: &str) {
        match self.series.get(index) {
            Some(s) => s
                .get_or_init(|| self.family.with_label_values(&[value]))
                .inc(),
            None => self.family.with_label_values(&[value]).inc(),
        }
    }
}

/// The series of one process: a cheaply cloneable handle, clones record into and render the same
/// registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    cache_entries: IntGauge,
    /// By `hit`: `false`, `true`.
    lookups: LabeledCounter<2>,
    /// By [`FetchResult`], in declaration order.
    remote_fetches: LabeledCounter<5>,
    /// By [`ConversionResult`], in declaration order.
    conversions: LabeledCounter<6>,
    conversion_duration: Histogram,
    expired: prometheus::IntCounter,
    /// By outcome, at [`Outcome::index`].
    processing: LabeledCounter<{ Outcome::NAMES.len() }>,
    pulls_in_progress: IntGauge,
    pulls_queued: IntGauge,
    /// Registered on first use by a resource store.
    xds: Arc<OnceLock<XdsSeries>>,
    /// Registered on first use by the Kubernetes source.
    kube: Arc<OnceLock<KubeSeries>>,
    /// Registered on first use by `proxy` mode.
    proxy: Arc<OnceLock<crate::proxy::ProxySeries>>,
    /// Registered on first use by a listener.
    net: Arc<OnceLock<crate::net::NetSeries>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let cache_entries =
            IntGauge::new(CACHE_ENTRIES, "number of Wasm remote fetch cache entries")
                .expect("valid metric");
        let lookups = IntCounterVec::new(
            Opts::new(
                CACHE_LOOKUP_COUNT,
                "number of Wasm remote fetch cache lookups",
            ),
            &["hit"],
        )
        .expect("valid metric");
        let remote_fetches = IntCounterVec::new(
            Opts::new(REMOTE_FETCH_COUNT, "number of Wasm remote fetches and results, including success, download failure, and checksum mismatch"),
            &["result"],
        )
        .expect("valid metric");
        let conversions = IntCounterVec::new(
            Opts::new(CONFIG_CONVERSION_COUNT, "number of Wasm config conversion count and results, including success, no remote load, marshal failure, remote fetch failure, and missing remote fetch hint"),
            &["result"],
        )
        .expect("valid metric");
        let buckets = (0..15).map(|i| f64::from(1u32 << i)).collect();
        let conversion_duration = Histogram::with_opts(
            HistogramOpts::new(CONFIG_CONVERSION_DURATION, "Total time in milliseconds istio-agent spends on converting remote load in Wasm config")
                .buckets(buckets),
        )
        .expect("valid metric");
        let expired = prometheus::IntCounter::new(
            CACHE_EXPIRED_COUNT,
            "number of modules purged from the cache",
        )
        .expect("valid metric");
        let processing = IntCounterVec::new(
            Opts::new(PROCESSING_COUNT, "plugin versions processed, by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let pulls_in_progress =
            IntGauge::new(PULLS_IN_PROGRESS, "module pulls running now").expect("valid metric");
        let pulls_queued = IntGauge::new(
            PULLS_QUEUED,
            "module pulls waiting for a slot (--max-concurrent-pulls, --max-pulls-per-host)",
        )
        .expect("valid metric");
        for c in [
            Box::new(cache_entries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(lookups.clone()),
            Box::new(remote_fetches.clone()),
            Box::new(conversions.clone()),
            Box::new(conversion_duration.clone()),
            Box::new(expired.clone()),
            Box::new(processing.clone()),
            Box::new(pulls_in_progress.clone()),
            Box::new(pulls_queued.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            cache_entries,
            lookups: LabeledCounter::new(lookups),
            remote_fetches: LabeledCounter::new(remote_fetches),
            conversions: LabeledCounter::new(conversions),
            conversion_duration,
            expired,
            processing: LabeledCounter::new(processing),
            pulls_in_progress,
            pulls_queued,
            xds: Arc::new(OnceLock::new()),
            kube: Arc::new(OnceLock::new()),
            proxy: Arc::new(OnceLock::new()),
            net: Arc::new(OnceLock::new()),
        }
    }

    /// The xDS series in this registry, registered by the first call.
    pub(crate) fn xds_series(&self) -> XdsSeries {
        self.xds
            .get_or_init(|| XdsSeries::register(&self.registry))
            .clone()
    }

    /// The Kubernetes source's series in this registry, registered by the first call.
    pub fn proxy_series(&self) -> crate::proxy::ProxySeries {
        self.proxy
            .get_or_init(|| crate::proxy::ProxySeries::register(&self.registry))
            .clone()
    }

    /// The listeners' series in this registry, registered by the first call.
    pub fn net_series(&self) -> crate::net::NetSeries {
        self.net
            .get_or_init(|| crate::net::NetSeries::register(&self.registry))
            .clone()
    }

    /// The Kubernetes source's series in this registry, registered by the first call.
    pub fn kube_series(&self) -> KubeSeries {
        self.kube
            .get_or_init(|| KubeSeries::register(&self.registry))
            .clone()
    }

    /// Module pulls running and waiting for a slot (the dispatcher's bounds).
    pub fn set_pulls(&self, running: usize, queued: usize) {
        self.pulls_in_progress
            .set(i64::try_from(running).unwrap_or(i64::MAX));
        self.pulls_queued
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
    }

    pub fn set_cache_entries(&self, n: usize) {
        self.cache_entries.set(n as i64);
    }

    pub fn record_lookup(&self, hit: bool) {
        self.lookups
            .inc(usize::from(hit), if hit { "true" } else { "false" });
    }

    pub fn record_remote_fetch(&self, result: FetchResult) {
        self.remote_fetches.inc(result as usize, result.as_str());
    }

    pub fn record_conversion(&self, result: ConversionResult, duration_ms: f64) {
        self.conversions.inc(result as usize, result.as_str());
        self.conversion_duration.observe(duration_ms);
    }

    pub fn record_expired(&self, n: usize) {
        self.expired.inc_by(n as u64);
    }

    pub fn record_processing(&self, outcome: &Outcome) {
        self.processing.inc(outcome.index(), outcome.name());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }

    /// Every exported sample as `name{labels} -> value`, labels in the order rendered (sorted by
    /// name), e.g. `istio_agent_wasm_remote_fetch_count{result="success"}`.
    pub fn samples(&self) -> BTreeMap<String, f64> {
        parse_samples(&self.render())
    }
}

/// Parses Prometheus text into `series -> value`.
pub fn parse_samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((normalize_series(series), value.parse().ok()?))
        })
        .collect()
}

/// Normalises a series name for comparison: labels sorted by name, no spaces.
pub fn normalize_series(series: &str) -> String {
    let series = series.trim();
    let Some((name, rest)) = series.split_once('{') else {
        return series.to_string();
    };
    let body = rest.trim_end().trim_end_matches('}');
    let mut labels: Vec<String> = split_labels(body)
        .into_iter()
        .map(|l| l.trim().to_string())
        .collect();
    labels.retain(|l| !l.is_empty());
    labels.sort();
    if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{}}}", labels.join(","))
    }
}

/// Splits `a="x",b="y,z"` on commas outside quotes.
fn split_labels(body: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&body[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_istio_names_without_suffixes() {
        let m = Metrics::new();
        m.record_remote_fetch(FetchResult::Success);
        m.record_lookup(false);
        m.record_conversion(ConversionResult::Success, 3.0);
        m.set_cache_entries(2);
        let s = m.samples();
        assert_eq!(
            s[r#"istio_agent_wasm_remote_fetch_count{result="success"}"#],
            1.0
        );
        assert_eq!(
            s[r#"istio_agent_wasm_cache_lookup_count{hit="false"}"#],
            1.0
        );
        assert_eq!(s["istio_agent_wasm_cache_entries"], 2.0);
        assert_eq!(
            s[r#"istio_agent_wasm_config_conversion_duration_bucket{le="4"}"#],
            1.0
        );
        assert_eq!(
            s[r#"istio_agent_wasm_config_conversion_duration_bucket{le="2"}"#],
            0.0
        );
        assert!(s.contains_key(r#"istio_agent_wasm_config_conversion_duration_bucket{le="16384"}"#));
        assert_eq!(
            normalize_series(r#"x{ b="1", a="2" }"#),
            r#"x{a="2",b="1"}"#
        );
    }

    #[test]
    fn kept_series_count_every_record_and_only_recorded_values_appear() {
        let m = Metrics::new();
        let clone = m.clone();
        for _ in 0..3 {
            m.record_lookup(true);
            clone.record_processing(&Outcome::Revalidated);
        }
        clone.record_lookup(true);
        m.record_conversion(ConversionResult::NoRemoteLoad, 1.0);
        m.record_remote_fetch(FetchResult::ChecksumMismatched);
        m.record_processing(&Outcome::Invalid("spec.url".into()));
        m.record_processing(&Outcome::Invalid("spec.sha256".into()));
        let s = m.samples();
        assert_eq!(s[r#"istio_agent_wasm_cache_lookup_count{hit="true"}"#], 4.0);
        assert!(!s.contains_key(r#"istio_agent_wasm_cache_lookup_count{hit="false"}"#));
        assert_eq!(
            s[r#"wasm_ecds_plugin_processing_count{outcome="revalidated"}"#],
            3.0
        );
        assert_eq!(
            s[r#"wasm_ecds_plugin_processing_count{outcome="invalid"}"#],
            2.0
        );
        assert!(!s.contains_key(r#"wasm_ecds_plugin_processing_count{outcome="pulled"}"#));
        assert_eq!(
            s[r#"istio_agent_wasm_config_conversion_count{result="no_remote_load"}"#],
            1.0
        );
        assert!(!s.contains_key(r#"istio_agent_wasm_config_conversion_count{result="success"}"#));
        assert_eq!(
            s[r#"istio_agent_wasm_remote_fetch_count{result="checksum_mismatched"}"#],
            1.0
        );
    }
}
