//! `roster events --metrics-listen ADDR`: a follower's own Prometheus metrics, so a webhook
//! that stopped taking events, or a follower cut off from the server, pages someone instead
//! of falling silently behind (the chart's alerts use them).
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The follower's counters and gauges; clones share them.
#[derive(Clone)]
pub struct FollowMetrics {
    registry: Arc<Registry>,
    /// The position of the last event written or delivered (or of a later checkpoint).
    pub position: Gauge,
    /// Events written to standard output or taken by the webhook.
    pub delivered: Counter,
    /// Webhook tries that failed and were made again (connection, timeout, 408, 429, 5xx).
    pub retries: Counter,
    /// 1 while the event stream is open, 0 while the follower reconnects.
    pub connected: Gauge,
    /// Times the stream was lost (or could not be opened) and tried again.
    pub reconnects: Counter,
    /// When the oldest event taken and not yet delivered happened (Unix seconds; 0: none).
    oldest: Gauge<f64, AtomicU64>,
    /// `oldest`'s age, worked out at each scrape.
    age: Gauge<f64, AtomicU64>,
}

impl Default for FollowMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("roster_events");
        let m = FollowMetrics {
            registry: Arc::default(),
            position: Gauge::default(),
            delivered: Counter::default(),
            retries: Counter::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            oldest: Gauge::default(),
            age: Gauge::default(),
        };
        registry.register(
            "position",
            "Position of the last event written or delivered",
            m.position.clone(),
        );
        registry.register(
            "delivered",
            "Events written to standard output or taken by the webhook",
            m.delivered.clone(),
        );
        registry.register(
            "webhook_retries",
            "Webhook tries that failed and were made again",
            m.retries.clone(),
        );
        registry.register(
            "connected",
            "1 while the event stream is open, 0 while reconnecting",
            m.connected.clone(),
        );
        registry.register(
            "reconnects",
            "Times the event stream was lost (or could not be opened) and tried again",
            m.reconnects.clone(),
        );
        registry.register(
            "undelivered_age_seconds",
            "Age of the oldest event taken and not yet delivered (0: none waits)",
            m.age.clone(),
        );
        FollowMetrics {
            registry: Arc::new(registry),
            ..m
        }
    }
}

impl FollowMetrics {
    /// An event that happened at `at` (Unix seconds) now waits for delivery, the first to.
    pub fn waiting_since(&self, at: Option<f64>) {
        self.oldest.set(at.unwrap_or_else(now));
    }

    /// Nothing waits for delivery any more.
    pub fn none_waiting(&self) {
        self.oldest.set(0.0);
    }

    /// The OpenMetrics text of a scrape.
    pub fn render(&self) -> String {
        let oldest = self.oldest.get();
        self.age.set(if oldest > 0.0 {
            (now() - oldest).max(0.0)
        } else {
            0.0
        });
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waiting_events_age_is_read_at_the_scrape() {
        let m = FollowMetrics::default();
        m.delivered.inc_by(3);
        m.position.set(42);
        let text = m.render();
        for line in [
            "roster_events_delivered_total 3",
            "roster_events_position 42",
            "roster_events_undelivered_age_seconds 0.0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        m.waiting_since(Some(now() - 90.0));
        let text = m.render();
        let age: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("roster_events_undelivered_age_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((90.0..100.0).contains(&age), "{age}");
        m.none_waiting();
        assert!(
            m.render()
                .contains("roster_events_undelivered_age_seconds 0.0")
        );
    }
}
