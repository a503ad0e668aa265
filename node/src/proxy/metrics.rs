//! Prometheus metrics of the proxy: request counts by status class, access decisions and a
//! latency histogram. Plain atomics with fixed label sets, so the request path never takes
//! a lock or allocates to count (a labelled-family library would hash labels per request).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The proxy's counters.
#[derive(Default)]
pub struct Metrics {
    /// By status class: 1xx..5xx.
    status: [AtomicU64; 5],
    /// allow, deny, other (pages of the proxy itself).
    decisions: [AtomicU64; 3],
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
    /// Sign-ins by result, in the order of [`SIGN_IN_RESULTS`].
    sign_ins: [AtomicU64; SIGN_IN_RESULTS.len()],
}

/// The results a sign-in is counted under: `success`; `refused` (the account may not sign
/// in: disabled, e-mail linked to another user, no e-mail, not allowed to be created);
/// `invalid` (a callback that is not ours: state mismatch, expired, no code);
/// `provider_error` (the provider said no or could not be reached or verified); `unavailable`
/// (the cluster could not record it).
pub const SIGN_IN_RESULTS: [&str; 5] = [
    "success",
    "refused",
    "invalid",
    "provider_error",
    "unavailable",
];

impl Metrics {
    /// Records one request.
    pub fn record(&self, status: u16, decision: &str, took: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.status[class].fetch_add(1, Ordering::Relaxed);
        let d = match decision {
            "allow" => 0,
            "deny" => 1,
            _ => 2,
        };
        self.decisions[d].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Records one sign-in (browser or client) by the status it was answered with: a
    /// redirect or 200 is a success, 400 an invalid callback, 401/403 a refusal, 502/504 the
    /// provider, other 5xx the cluster.
    pub fn record_sign_in(&self, status: u16) {
        let i = match status {
            200..=399 => 0,
            401 | 403 => 1,
            400..=499 => 2,
            502 | 504 => 3,
            _ => 4,
        };
        self.sign_ins[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP warren_sign_ins_total Sign-ins through this node (browser and warren client), by result.\n");
        out.push_str("# TYPE warren_sign_ins_total counter\n");
        for (name, c) in SIGN_IN_RESULTS.iter().zip(&self.sign_ins) {
            let _ = writeln!(
                out,
                "warren_sign_ins_total{{result=\"{name}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP warren_proxy_requests_total Requests answered by the proxy, by status class.\n",
        );
        out.push_str("# TYPE warren_proxy_requests_total counter\n");
        for (i, c) in self.status.iter().enumerate() {
            let _ = writeln!(
                out,
                "warren_proxy_requests_total{{code=\"{}xx\"}} {}",
                i + 1,
                c.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP warren_proxy_decisions_total Access decisions (other: the proxy's own pages).\n");
        out.push_str("# TYPE warren_proxy_decisions_total counter\n");
        for (name, c) in ["allow", "deny", "other"].iter().zip(&self.decisions) {
            let _ = writeln!(
                out,
                "warren_proxy_decisions_total{{decision=\"{name}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP warren_proxy_request_duration_seconds Time to answer a request (until response headers).\n");
        out.push_str("# TYPE warren_proxy_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (b, c) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "warren_proxy_request_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "warren_proxy_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "warren_proxy_request_duration_seconds_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "warren_proxy_request_duration_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_up_in_the_exposition() {
        let m = Metrics::default();
        m.record(200, "allow", Duration::from_micros(700));
        m.record(403, "deny", Duration::from_millis(20));
        m.record(404, "-", Duration::from_secs(9));
        let text = m.render();
        assert!(text.contains("warren_proxy_requests_total{code=\"2xx\"} 1"));
        assert!(text.contains("warren_proxy_requests_total{code=\"4xx\"} 2"));
        assert!(text.contains("warren_proxy_decisions_total{decision=\"deny\"} 1"));
        assert!(text.contains("warren_proxy_request_duration_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("warren_proxy_request_duration_seconds_bucket{le=\"0.025\"} 2"));
        assert!(text.contains("warren_proxy_request_duration_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("warren_proxy_request_duration_seconds_count 3"));
        for status in [303, 403, 400, 502, 503, 401] {
            m.record_sign_in(status);
        }
        let text = m.render();
        for (result, n) in [
            ("success", 1),
            ("refused", 2),
            ("invalid", 1),
            ("provider_error", 1),
            ("unavailable", 1),
        ] {
            assert!(
                text.contains(&format!(
                    "warren_sign_ins_total{{result=\"{result}\"}} {n}\n"
                )),
                "{result}: {text}"
            );
        }
    }
}
