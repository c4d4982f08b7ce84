//! The gateway's one Prometheus registry, and what every part of the gateway uses to fill it.
//!
//! At start-up each part (the cluster service, the backend, the Kubernetes controller, the usage
//! counters) registers its metric families once in a [`Registry`] made by [`registry`]: events
//! as [`Counter`]s it keeps and increments, and values read at scrape time (workers by state,
//! clusters by status, ...) through a [`Collector`] made by [`collector`]. `/metrics` encodes
//! the registry with [`render`] in the OpenMetrics text format ([`CONTENT_TYPE`]).
//!
//! Names are given without the `dask_gateway_` prefix, which the registry adds, and counters'
//! without `_total`, which their samples get. Help texts are given without their final full
//! stop, which is added (as [`Registry::register`] does).

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::fmt;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::registry::Registry;

/// What every metric name starts with (then `_`).
pub const PREFIX: &str = "dask_gateway";

/// The content type of what [`render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An empty registry whose metric names start with `dask_gateway_`.
pub fn registry() -> Registry {
    Registry::with_prefix(PREFIX)
}

/// Every family of `registry` in the OpenMetrics text format, ending with `# EOF`.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// A collector that calls `scrape` on every scrape to write its families (`name` tells it apart
/// in debug output).
pub fn collector<F>(name: &'static str, scrape: F) -> Box<dyn Collector>
where
    F: Fn(&mut Scrape<'_>) -> fmt::Result + Send + Sync + 'static,
{
    Box::new(FnCollector { name, scrape })
}

struct FnCollector<F> {
    name: &'static str,
    scrape: F,
}

impl<F> fmt::Debug for FnCollector<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnCollector")
            .field("name", &self.name)
            .finish()
    }
}

impl<F> Collector for FnCollector<F>
where
    F: Fn(&mut Scrape<'_>) -> fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        (self.scrape)(&mut Scrape { encoder })
    }
}

/// Where a [`collector`] writes the families it computed for one scrape.
pub struct Scrape<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl Scrape<'_> {
    /// A gauge family with one sample without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl EncodeGaugeValue) -> fmt::Result {
        self.single(name, help, MetricType::Gauge, |e| {
            ConstGauge::new(value).encode(e)
        })
    }

    /// A gauge family with one sample per `(labels, value)`, labels as `[("state", "running")]`;
    /// nothing when there are no samples.
    pub fn gauges<L, V>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> fmt::Result
    where
        L: EncodeLabelSet,
        V: EncodeGaugeValue,
    {
        self.family(name, help, MetricType::Gauge, samples, |v, e| {
            ConstGauge::new(v).encode(e)
        })
    }

    /// A counter family with one sample without labels (`<name>_total`).
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        value: impl EncodeCounterValue,
    ) -> fmt::Result {
        self.single(name, help, MetricType::Counter, |e| {
            ConstCounter::new(value).encode(e)
        })
    }

    /// A family of `kind` whose one sample, without labels, `encode` writes.
    fn single(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        encode: impl FnOnce(prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result,
    ) -> fmt::Result {
        let help = format!("{help}.");
        encode(self.encoder.encode_descriptor(name, &help, None, kind)?)
    }

    /// A counter family with one sample per `(labels, value)` (`<name>_total{...}`); nothing
    /// when there are no samples.
    pub fn counters<L, V>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> fmt::Result
    where
        L: EncodeLabelSet,
        V: EncodeCounterValue,
    {
        self.family(name, help, MetricType::Counter, samples, |v, e| {
            ConstCounter::new(v).encode(e)
        })
    }

    fn family<L: EncodeLabelSet, V>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: impl IntoIterator<Item = (L, V)>,
        encode: impl Fn(V, prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result,
    ) -> fmt::Result {
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return Ok(());
        }
        let help = format!("{help}.");
        let mut encoder = self.encoder.encode_descriptor(name, &help, None, kind)?;
        for (labels, value) in samples {
            encode(value, encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_renders_counters_and_scraped_families() {
        let mut registry = registry();
        let things: Counter = Counter::default();
        registry.register("things", "Things done", things.clone());
        things.inc();
        things.inc();
        registry.register_collector(collector("test", |s| {
            s.gauge("up", "Whether it is up", 1)?;
            s.gauges(
                "state",
                "States",
                [([("s", "a\"\n")], 1u64), ([("s", "b")], 0)],
            )?;
            s.gauges(
                "none",
                "No samples: no family",
                Vec::<([(&str, &str); 1], u64)>::new(),
            )?;
            s.counter("seconds", "Seconds used", 2.5)?;
            s.counters("per_user", "Per user", [([("user", "ann")], 3u64)])
        }));
        assert_eq!(
            render(&registry).unwrap(),
            "# HELP dask_gateway_things Things done.\n\
             # TYPE dask_gateway_things counter\n\
             dask_gateway_things_total 2\n\
             # HELP dask_gateway_up Whether it is up.\n\
             # TYPE dask_gateway_up gauge\n\
             dask_gateway_up 1\n\
             # HELP dask_gateway_state States.\n\
             # TYPE dask_gateway_state gauge\n\
             dask_gateway_state{s=\"a\\\"\\n\"} 1\n\
             dask_gateway_state{s=\"b\"} 0\n\
             # HELP dask_gateway_seconds Seconds used.\n\
             # TYPE dask_gateway_seconds counter\n\
             dask_gateway_seconds_total 2.5\n\
             # HELP dask_gateway_per_user Per user.\n\
             # TYPE dask_gateway_per_user counter\n\
             dask_gateway_per_user_total{user=\"ann\"} 3\n\
             # EOF\n"
        );
    }
}
