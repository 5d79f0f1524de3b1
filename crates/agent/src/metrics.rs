//! The agent's Prometheus metrics, served at `/metrics` on the API socket.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// Every metric the agent counts.
pub struct Metrics {
    registry: Registry,
    /// Instances by health (starting, healthy, unhealthy), set at each scrape.
    pub instances: Family<StateLabel, Gauge>,
    /// Instances that ended on their own (killed, crashed) and were replaced.
    pub restarts: Counter,
    /// From asking the runtime for an instance to init reporting the appliance started.
    pub start_seconds: Histogram,
    /// Health probe durations.
    pub probe_seconds: Histogram,
    /// Rollouts by outcome: complete, rolled_back, paused.
    pub rollouts: Family<OutcomeLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("juice");
        let instances = Family::<StateLabel, Gauge>::default();
        let restarts = Counter::default();
        let start_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let probe_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let rollouts = Family::<OutcomeLabel, Counter>::default();
        registry.register("instances", "Instances by health", instances.clone());
        registry.register(
            "instance_restarts",
            "Instances that ended on their own and were replaced",
            restarts.clone(),
        );
        registry.register(
            "instance_start_seconds",
            "Time to start an instance",
            start_seconds.clone(),
        );
        registry.register(
            "health_probe_seconds",
            "Health probe durations",
            probe_seconds.clone(),
        );
        registry.register("rollouts", "Rollouts by outcome", rollouts.clone());
        Metrics {
            registry,
            instances,
            restarts,
            start_seconds,
            probe_seconds,
            rollouts,
        }
    }

    pub fn rollout(&self, outcome: &str) {
        self.rollouts
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_text() {
        let m = Metrics::new();
        m.restarts.inc();
        m.rollout("rolled_back");
        m.start_seconds.observe(0.005);
        let text = m.encode();
        assert!(text.contains("juice_instance_restarts_total 1"), "{text}");
        assert!(
            text.contains("juice_rollouts_total{outcome=\"rolled_back\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("juice_instance_start_seconds_count 1"),
            "{text}"
        );
    }
}
