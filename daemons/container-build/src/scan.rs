//! The security scan's verdict, from a Trivy JSON report (the contract:
//! `Results[].Vulnerabilities[]`, `Results[].Secrets[]` and
//! `Results[].Misconfigurations[]`, each with a `Severity`).

use baton_shared::facts::ScanSummary;
use chrono::NaiveDate;
use serde::Deserialize;

use crate::config::Allowance;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Report {
    #[serde(default)]
    schema_version: Option<u64>,
    #[serde(default)]
    results: Option<Vec<Target>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Target {
    #[serde(default)]
    target: String,
    #[serde(default)]
    vulnerabilities: Option<Vec<Vulnerability>>,
    #[serde(default)]
    secrets: Option<Vec<Secret>>,
    #[serde(default)]
    misconfigurations: Option<Vec<Misconfiguration>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Vulnerability {
    #[serde(rename = "VulnerabilityID")]
    id: String,
    #[serde(default)]
    pkg_name: String,
    #[serde(default)]
    installed_version: String,
    #[serde(default)]
    fixed_version: String,
    severity: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Secret {
    #[serde(rename = "RuleID")]
    rule_id: String,
    #[serde(default)]
    title: String,
    severity: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Misconfiguration {
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    title: String,
    severity: String,
}

/// One finding, as reported to operators.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    pub id: String,
    pub severity: String,
    /// What and where: `musl 1.1.20-r4 (fixed in 1.1.20-r5) in <target>`.
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.id, self.detail)
    }
}

/// A report's findings by verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub summary: ScanSummary,
    /// Blocking findings no allow-list entry lets through.
    pub blocking: Vec<Finding>,
    /// Blocking findings let through, with the entry's reason and expiry.
    pub allowed: Vec<String>,
    /// Entries that would have let a finding through but have expired.
    pub expired: Vec<String>,
}

/// Every finding of a Trivy JSON report.
pub fn findings(report: &[u8]) -> Result<Vec<Finding>, String> {
    let report: Report =
        serde_json::from_slice(report).map_err(|e| format!("the scanner's output is not a Trivy JSON report: {e}"))?;
    if report.schema_version != Some(2) {
        return Err(format!(
            "the scanner's report has SchemaVersion {:?}; Baton reads Trivy's version 2",
            report.schema_version
        ));
    }
    let mut out = Vec::new();
    for t in report.results.unwrap_or_default() {
        for v in t.vulnerabilities.unwrap_or_default() {
            let fixed = if v.fixed_version.is_empty() {
                "no fix yet".to_owned()
            } else {
                format!("fixed in {}", v.fixed_version)
            };
            out.push(Finding {
                id: v.id,
                severity: v.severity.to_ascii_uppercase(),
                detail: format!("{} {} ({fixed}) in {}", v.pkg_name, v.installed_version, t.target),
            });
        }
        for s in t.secrets.unwrap_or_default() {
            out.push(Finding {
                id: s.rule_id,
                severity: s.severity.to_ascii_uppercase(),
                detail: format!("secret: {} in {}", s.title, t.target),
            });
        }
        for m in t.misconfigurations.unwrap_or_default() {
            out.push(Finding {
                id: m.id,
                severity: m.severity.to_ascii_uppercase(),
                detail: format!("{} in {}", m.title, t.target),
            });
        }
    }
    Ok(out)
}

/// Counts findings and decides which block, given the allow-list and today's date.
pub fn judge(findings: &[Finding], blocking: &[String], allow: &[Allowance], today: NaiveDate) -> Verdict {
    let mut v = Verdict::default();
    for f in findings {
        match f.severity.as_str() {
            "CRITICAL" => v.summary.critical += 1,
            "HIGH" => v.summary.high += 1,
            "MEDIUM" => v.summary.medium += 1,
            "LOW" => v.summary.low += 1,
            _ => {}
        }
        if !blocking.iter().any(|b| b == &f.severity) {
            continue;
        }
        let entries: Vec<&Allowance> = allow.iter().filter(|a| a.id == f.id).collect();
        match entries.iter().find(|a| today < a.expires) {
            Some(a) => {
                v.summary.allowed.push(f.id.clone());
                v.allowed.push(format!("{f} allowed until {}: {}", a.expires, a.reason));
            }
            None => {
                for a in entries {
                    v.expired.push(format!(
                        "allow-list entry {} expired on {} ({})",
                        a.id, a.expires, a.reason
                    ));
                }
                v.blocking.push(f.clone());
            }
        }
    }
    v.summary.allowed.sort();
    v.summary.allowed.dedup();
    v.expired.sort();
    v.expired.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/trivy/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn a_recorded_report_with_criticals_blocks() {
        let f = findings(&recorded("alpine-39-high-critical.json")).unwrap();
        assert_eq!(f.len(), 2);
        let v = judge(&f, &["CRITICAL".into(), "HIGH".into()], &[], day("2026-12-06"));
        assert_eq!(v.summary.critical, 2);
        assert_eq!(v.blocking.len(), 2);
        assert!(
            v.blocking[0].to_string().contains("CVE-2019-14697"),
            "{}",
            v.blocking[0]
        );
        assert!(v.blocking[0].detail.contains("musl 1.1.20-r4 (fixed in 1.1.20-r5)"));
    }

    #[test]
    fn the_allow_list_lets_through_until_it_expires() {
        let f = findings(&recorded("alpine-39-high-critical.json")).unwrap();
        let allow = vec![Allowance {
            id: "CVE-2019-14697".into(),
            reason: "i386 only".into(),
            expires: day("2027-01-01"),
        }];
        let v = judge(&f, &["CRITICAL".into()], &allow, day("2026-12-31"));
        assert!(v.blocking.is_empty());
        assert_eq!(v.summary.allowed, ["CVE-2019-14697"]);
        assert!(v.allowed[0].contains("until 2027-01-01: i386 only"), "{}", v.allowed[0]);

        let v = judge(&f, &["CRITICAL".into()], &allow, day("2027-01-01"));
        assert_eq!(v.blocking.len(), 2);
        assert!(v.expired[0].contains("expired on 2027-01-01"), "{:?}", v.expired);
    }

    #[test]
    fn other_outputs_are_refused_by_name() {
        assert!(findings(b"not json").unwrap_err().contains("not a Trivy JSON report"));
        assert!(
            findings(br#"{"SchemaVersion": 1}"#)
                .unwrap_err()
                .contains("SchemaVersion")
        );
        assert!(findings(br#"{"SchemaVersion": 2}"#).unwrap().is_empty());
    }
}
