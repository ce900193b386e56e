//! The service's checks, from a file in its repository (`deploy/verify.toml`
//! unless the step says otherwise):
//!
//! ```toml
//! [[smoke]]                      # at least one
//! path = "/healthz"
//! method = "GET"                 # default GET
//! status = 200                   # default 200
//! body_contains = "ok"           # optional
//!
//! [integration]                  # optional: the test suite, run as a Job
//! command = ["npm", "run", "test:staging"]
//! image = "…"                    # default: the image being verified
//! timeout_secs = 600
//! env = { BASE_URL = "{base_url}" }
//!
//! [performance]                  # default: 50 requests to each GET smoke path
//! requests = 50
//! endpoints = ["/", "/api/items"]
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::Error;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    #[serde(default)]
    pub smoke: Vec<Smoke>,
    pub integration: Option<Integration>,
    #[serde(default)]
    pub performance: Performance,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Smoke {
    pub path: String,
    #[serde(default = "get")]
    pub method: String,
    #[serde(default = "ok")]
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
}

fn get() -> String {
    "GET".to_owned()
}

fn ok() -> u16 {
    200
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Integration {
    pub command: Vec<String>,
    pub image: Option<String>,
    #[serde(default = "integration_timeout")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn integration_timeout() -> u64 {
    600
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Performance {
    pub requests: Option<u32>,
    #[serde(default)]
    pub endpoints: Vec<String>,
}

impl Checks {
    /// Reads and checks `text`, the file `file`; errors name the file and what is wrong.
    pub fn parse(file: &str, text: &str) -> Result<Self, Error> {
        let bad = |problem: String| Error::Checks {
            file: file.to_owned(),
            problem,
        };
        let checks: Checks = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if checks.smoke.is_empty() {
            return Err(bad(
                "declares no [[smoke]] check; staging verification needs at least one".to_owned(),
            ));
        }
        for (i, s) in checks.smoke.iter().enumerate() {
            if !s.path.starts_with('/') {
                return Err(bad(format!("smoke[{i}].path {:?} must start with /", s.path)));
            }
            if !matches!(
                s.method.as_str(),
                "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS"
            ) {
                return Err(bad(format!("smoke[{i}].method {:?} is not an HTTP method", s.method)));
            }
        }
        if let Some(it) = &checks.integration {
            if it.command.is_empty() {
                return Err(bad("integration.command is empty".to_owned()));
            }
            if it.timeout_secs == 0 {
                return Err(bad("integration.timeout_secs must be at least 1".to_owned()));
            }
        }
        if checks.performance.requests == Some(0) {
            return Err(bad("performance.requests must be at least 1".to_owned()));
        }
        for e in &checks.performance.endpoints {
            if !e.starts_with('/') {
                return Err(bad(format!("performance endpoint {e:?} must start with /")));
            }
        }
        Ok(checks)
    }

    /// The endpoints measured: the declared ones, else the GET smoke paths.
    pub fn endpoints(&self) -> Vec<String> {
        if !self.performance.endpoints.is_empty() {
            return self.performance.endpoints.clone();
        }
        let mut paths: Vec<String> = self
            .smoke
            .iter()
            .filter(|s| s.method == "GET")
            .map(|s| s.path.clone())
            .collect();
        paths.dedup();
        paths
    }
}

/// What one smoke check saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmokeResult {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub ms: f64,
}

/// Sends one request; the status, body and time, or why it got no answer.
pub async fn request(http: &reqwest::Client, method: &str, url: &str) -> Result<(u16, String, Duration), String> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let response = http.request(method, url).send().await.map_err(|e| describe(&e))?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| describe(&e))?;
    Ok((status, body, started.elapsed()))
}

fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// Runs every smoke check against `base`; the first failure names the check.
pub async fn smoke(http: &reqwest::Client, base: &str, checks: &[Smoke]) -> Result<Vec<SmokeResult>, Error> {
    let mut results = Vec::new();
    for c in checks {
        let url = format!("{base}{}", c.path);
        let (status, body, took) = request(http, &c.method, &url)
            .await
            .map_err(|e| Error::Smoke(format!("{} {url}: no answer: {e}", c.method)))?;
        if status != c.status {
            return Err(Error::Smoke(format!(
                "{} {url}: status {status}, expected {}: {}",
                c.method,
                c.status,
                excerpt(&body)
            )));
        }
        if let Some(fragment) = &c.body_contains
            && !body.contains(fragment.as_str())
        {
            return Err(Error::Smoke(format!(
                "{} {url}: the body does not contain {fragment:?}: {}",
                c.method,
                excerpt(&body)
            )));
        }
        results.push(SmokeResult {
            method: c.method.clone(),
            path: c.path.clone(),
            status,
            ms: took.as_secs_f64() * 1000.0,
        });
    }
    Ok(results)
}

/// The first 200 characters of a body, for messages.
pub fn excerpt(body: &str) -> String {
    let t = body.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None if t.is_empty() => "(empty body)".to_owned(),
        None => t.to_owned(),
    }
}

/// Latency of one endpoint over a fixed number of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub requests: u32,
    pub p50_ms: f64,
    pub p95_ms: f64,
}

/// The `q`-th percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `requests` sequential GETs per endpoint; any failed request fails.
pub async fn measure(
    http: &reqwest::Client,
    base: &str,
    endpoints: &[String],
    requests: u32,
) -> Result<BTreeMap<String, Latency>, Error> {
    let mut out = BTreeMap::new();
    for path in endpoints {
        let url = format!("{base}{path}");
        let mut times = Vec::with_capacity(requests as usize);
        for _ in 0..requests {
            let (status, body, took) = request(http, "GET", &url)
                .await
                .map_err(|e| Error::Performance(format!("GET {url}: no answer: {e}")))?;
            if !(200..400).contains(&status) {
                return Err(Error::Performance(format!(
                    "GET {url}: status {status} while measuring: {}",
                    excerpt(&body)
                )));
            }
            times.push(took.as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        out.insert(
            path.clone(),
            Latency {
                requests,
                p50_ms: percentile(&times, 50.0),
                p95_ms: percentile(&times, 95.0),
            },
        );
    }
    Ok(out)
}

/// How much slower `now` is than `baseline`, in percent of the baseline's p95
/// (at least the noise floor), worst endpoint first; endpoints new since the
/// baseline are not compared.
pub fn regression(
    now: &BTreeMap<String, Latency>,
    baseline: &BTreeMap<String, Latency>,
    floor_ms: f64,
) -> Option<(String, f64)> {
    now.iter()
        .filter_map(|(path, l)| {
            let base = baseline.get(path)?;
            let reference = base.p95_ms.max(floor_ms).max(f64::MIN_POSITIVE);
            let slower = (l.p95_ms.max(floor_ms) - base.p95_ms.max(floor_ms)) / reference * 100.0;
            Some((path.clone(), (slower * 10.0).round() / 10.0))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_their_problem_and_file() {
        let c = Checks::parse(
            "deploy/verify.toml",
            "[[smoke]]\npath = \"/healthz\"\nbody_contains = \"ok\"\n",
        )
        .unwrap();
        assert_eq!(c.smoke[0].method, "GET");
        assert_eq!(c.endpoints(), ["/healthz"]);
        let e = Checks::parse("deploy/verify.toml", "[integration]\ncommand = [\"x\"]\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "deploy/verify.toml: declares no [[smoke]] check; staging verification needs at least one"
        );
        let e = Checks::parse("deploy/verify.toml", "[[smoke]]\npath = \"healthz\"\n").unwrap_err();
        assert!(
            e.to_string().contains("smoke[0].path \"healthz\" must start with /"),
            "{e}"
        );
        let e = Checks::parse("deploy/verify.toml", "[[smoke]]\npath = \"/\"\nstatuss = 1\n").unwrap_err();
        assert!(e.to_string().contains("statuss"), "{e}");
    }

    #[test]
    fn regressions_are_measured_on_p95_above_the_noise_floor() {
        let l = |p95: f64| Latency {
            requests: 10,
            p50_ms: p95 / 2.0,
            p95_ms: p95,
        };
        let base = BTreeMap::from([("/a".to_owned(), l(40.0)), ("/b".to_owned(), l(1.0))]);
        let now = BTreeMap::from([
            ("/a".to_owned(), l(50.0)),
            ("/b".to_owned(), l(1.4)),
            ("/new".to_owned(), l(500.0)),
        ]);
        assert_eq!(regression(&now, &base, 10.0), Some(("/a".to_owned(), 25.0)));
        let faster = BTreeMap::from([("/a".to_owned(), l(20.0))]);
        assert_eq!(regression(&faster, &base, 10.0), Some(("/a".to_owned(), -50.0)));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 95.0), 4.0);
    }
}
