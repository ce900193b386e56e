//! Prometheus text exposition: a small registry of counters, gauges and
//! histograms, and a writer for values computed at scrape time.
//!
//! Hand-written because the format is small and stable, and the process needs
//! a handful of series, not a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

/// Bucket bounds in seconds for step and job durations: deploy steps take
/// from milliseconds (no-op) to hours (critical soaks).
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
];

type Labels = Vec<(String, String)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug)]
struct Family {
    help: String,
    kind: Kind,
    values: BTreeMap<Labels, f64>,
    histograms: BTreeMap<Labels, Histogram>,
}

/// A set of metric families.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<BTreeMap<String, Family>>,
}

fn labels(l: &[(&str, &str)]) -> Labels {
    l.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

impl Registry {
    fn with_family(&self, name: &str, help: &str, kind: Kind, f: impl FnOnce(&mut Family)) {
        let mut families = self.families.lock().expect("metrics lock");
        let family = families.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            kind,
            values: BTreeMap::new(),
            histograms: BTreeMap::new(),
        });
        f(family);
    }

    /// Adds `by` to a counter.
    pub fn inc(&self, name: &str, help: &str, l: &[(&str, &str)], by: f64) {
        self.with_family(name, help, Kind::Counter, |f| {
            *f.values.entry(labels(l)).or_default() += by
        });
    }

    /// Sets a gauge.
    pub fn set(&self, name: &str, help: &str, l: &[(&str, &str)], value: f64) {
        self.with_family(name, help, Kind::Gauge, |f| {
            f.values.insert(labels(l), value);
        });
    }

    /// Adds `by` (may be negative) to a gauge.
    pub fn add(&self, name: &str, help: &str, l: &[(&str, &str)], by: f64) {
        self.with_family(name, help, Kind::Gauge, |f| {
            *f.values.entry(labels(l)).or_default() += by
        });
    }

    /// Records one observation in a duration histogram (seconds).
    pub fn observe(&self, name: &str, help: &str, l: &[(&str, &str)], seconds: f64) {
        self.with_family(name, help, Kind::Histogram, |f| {
            let h = f.histograms.entry(labels(l)).or_insert_with(|| Histogram {
                counts: vec![0; DURATION_BUCKETS.len()],
                ..Default::default()
            });
            for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                if seconds <= *bound {
                    h.counts[i] += 1;
                }
            }
            h.sum += seconds;
            h.count += 1;
        });
    }

    /// The exposition text of every family.
    pub fn render(&self) -> String {
        let families = self.families.lock().expect("metrics lock");
        let mut out = Text::default();
        for (name, f) in families.iter() {
            match f.kind {
                Kind::Counter | Kind::Gauge => {
                    out.header(name, &f.help, if f.kind == Kind::Counter { "counter" } else { "gauge" });
                    for (l, v) in &f.values {
                        out.sample(name, l, *v);
                    }
                }
                Kind::Histogram => {
                    out.header(name, &f.help, "histogram");
                    for (l, h) in &f.histograms {
                        out.histogram(name, l, h.counts.iter().copied(), h.sum, h.count);
                    }
                }
            }
        }
        out.finish()
    }
}

/// The process-wide registry.
pub fn global() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes exposition text, for values computed at scrape time.
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    pub fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, l: &[(String, String)], value: f64) {
        self.0.push_str(name);
        self.labels(l, None);
        let _ = writeln!(self.0, " {value}");
    }

    fn labels(&mut self, l: &[(String, String)], le: Option<&str>) {
        if l.is_empty() && le.is_none() {
            return;
        }
        self.0.push('{');
        let mut first = true;
        for (k, v) in l
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(le.map(|le| ("le", le)))
        {
            if !first {
                self.0.push(',');
            }
            first = false;
            let _ = write!(self.0, "{k}=\"{}\"", escape(v));
        }
        self.0.push('}');
    }

    /// A histogram from cumulative bucket counts over [`DURATION_BUCKETS`].
    pub fn histogram(
        &mut self,
        name: &str,
        l: &[(String, String)],
        cumulative: impl Iterator<Item = u64>,
        sum: f64,
        count: u64,
    ) {
        for (bound, c) in DURATION_BUCKETS.iter().zip(cumulative) {
            self.0.push_str(&format!("{name}_bucket"));
            self.labels(l, Some(&bound.to_string()));
            let _ = writeln!(self.0, " {c}");
        }
        self.0.push_str(&format!("{name}_bucket"));
        self.labels(l, Some("+Inf"));
        let _ = writeln!(self.0, " {count}");
        self.0.push_str(&format!("{name}_sum"));
        self.labels(l, None);
        let _ = writeln!(self.0, " {sum}");
        self.0.push_str(&format!("{name}_count"));
        self.labels(l, None);
        let _ = writeln!(self.0, " {count}");
    }

    /// Appends another block of exposition text.
    pub fn extend(&mut self, other: &str) {
        self.0.push_str(other);
    }

    pub fn finish(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::default();
        r.inc(
            "baton_jobs_total",
            "jobs",
            &[("outcome", "succeeded"), ("role", "cdn")],
            1.0,
        );
        r.inc(
            "baton_jobs_total",
            "jobs",
            &[("outcome", "succeeded"), ("role", "cdn")],
            2.0,
        );
        r.observe("baton_job_duration_seconds", "durations", &[("role", "cdn")], 0.3);
        r.set("baton_in_flight", "running", &[], 2.0);
        let text = r.render();
        assert!(text.contains("# TYPE baton_jobs_total counter"), "{text}");
        assert!(
            text.contains("baton_jobs_total{outcome=\"succeeded\",role=\"cdn\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("baton_job_duration_seconds_bucket{role=\"cdn\",le=\"0.25\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("baton_job_duration_seconds_bucket{role=\"cdn\",le=\"0.5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("baton_job_duration_seconds_count{role=\"cdn\"} 1"),
            "{text}"
        );
        assert!(text.contains("baton_in_flight 2"), "{text}");
    }
}
