//! The Prometheus query API (`GET /api/v1/query`), for the monitoring period.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Response {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

/// The query's one number; `None` when it has no data yet (no samples in the
/// window), an error when Prometheus cannot be asked or refuses the query.
pub async fn query(http: &reqwest::Client, base: &str, promql: &str) -> Result<Option<f64>, String> {
    let url = format!("{}/api/v1/query", base.trim_end_matches('/'));
    let response = http
        .get(&url)
        .query(&[("query", promql)])
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body: Response = response
        .json()
        .await
        .map_err(|e| format!("{url}: status {status}, not a query response: {e}"))?;
    if body.status != "success" {
        return Err(format!(
            "{url}: {}",
            body.error.unwrap_or_else(|| format!("status {}", body.status))
        ));
    }
    let Some(data) = body.data else {
        return Ok(None);
    };
    let sample = match data.result_type.as_str() {
        "scalar" => Some(data.result.clone()),
        "vector" => data
            .result
            .as_array()
            .and_then(|v| v.first())
            .and_then(|s| s.get("value"))
            .cloned(),
        other => return Err(format!("{url}: the query answers a {other}, not one number")),
    };
    let Some(value) = sample.as_ref().and_then(|s| s.get(1)).and_then(|v| v.as_str()) else {
        return Ok(None);
    };
    let n: f64 = value.parse().map_err(|_| format!("{url}: {value:?} is not a number"))?;
    // 0/0 (no requests in the window) is no data, not a breach.
    Ok(n.is_finite().then_some(n))
}
