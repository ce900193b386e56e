//! Edge rules as the repository declares them (`cdn/edge-rules.toml`), by
//! name, checked before anything is sent, and turned into bunny.net's rule
//! model (integers on the wire).
//!
//! ```toml
//! [[rule]]
//! description = "hashed assets are immutable"     # the rule's identity
//! action = "SetResponseHeader"
//! parameters = ["Cache-Control", "public, max-age=31536000, immutable"]
//! triggers = [{ type = "UrlExtension", patterns = ["js", "css"] }]
//! ```

use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::Error;

/// bunny.net's `EdgeRuleActionType`, by value.
pub const ACTIONS: &[&str] = &[
    "ForceSSL",
    "Redirect",
    "OriginUrl",
    "OverrideCacheTime",
    "BlockRequest",
    "SetResponseHeader",
    "SetRequestHeader",
    "ForceDownload",
    "DisableTokenAuthentication",
    "EnableTokenAuthentication",
    "OverrideCacheTimePublic",
    "IgnoreQueryString",
    "DisableOptimizer",
    "ForceCompression",
    "SetStatusCode",
    "BypassPermaCache",
    "OverrideBrowserCacheTime",
    "OriginStorage",
    "SetNetworkRateLimit",
    "SetConnectionLimit",
    "SetRequestsPerSecondLimit",
    "RunEdgeScript",
    "OriginMagicContainers",
    "DisableWAF",
    "RetryOrigin",
    "OverrideBrowserCacheResponseHeader",
    "RemoveBrowserCacheResponseHeader",
    "DisableShieldChallenge",
    "DisableShield",
    "DisableShieldBotDetection",
];

/// bunny.net's trigger `Type`, by value.
pub const TRIGGERS: &[&str] = &[
    "Url",
    "RequestHeader",
    "ResponseHeader",
    "UrlExtension",
    "CountryCode",
    "RemoteIP",
    "UrlQueryString",
    "RandomChance",
    "StatusCode",
    "RequestMethod",
    "CookieValue",
    "CountryStateCode",
    "OriginRetryAttemptCount",
    "OriginConnectionError",
];

const MATCHING: &[&str] = &["any", "all", "none"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    description: String,
    action: String,
    #[serde(default)]
    parameters: Vec<String>,
    triggers: Vec<TriggerSpec>,
    #[serde(default = "any")]
    trigger_matching: String,
    #[serde(default = "yes")]
    enabled: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerSpec {
    #[serde(rename = "type")]
    kind: String,
    patterns: Vec<String>,
    #[serde(default = "any", rename = "match")]
    matching: String,
    parameter: Option<String>,
}

fn any() -> String {
    "any".to_owned()
}

fn yes() -> bool {
    true
}

/// A checked rule: its description (identity) and bunny.net's body without `Guid`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub description: String,
    pub body: Value,
}

fn index(list: &[&str], name: &str) -> Option<usize> {
    list.iter().position(|n| *n == name)
}

/// Reads `text` (the file `file`); every problem is named with its rule.
pub fn parse(file: &str, text: &str) -> Result<Vec<Rule>, Error> {
    let spec: File = toml::from_str(text).map_err(|e| Error::EdgeRules(vec![format!("{file}: {e}")]))?;
    let mut problems = Vec::new();
    let mut out: Vec<Rule> = Vec::new();
    for (i, r) in spec.rule.iter().enumerate() {
        let at = format!("{file}: rule {} ({:?})", i + 1, r.description);
        let mut bad = |p: String| problems.push(format!("{at}: {p}"));
        if r.description.trim().is_empty() {
            bad("has no description (it is the rule's identity)".into());
        }
        if out.iter().any(|o| o.description == r.description) {
            bad("has the description of an earlier rule".into());
        }
        let action = index(ACTIONS, &r.action);
        if action.is_none() {
            bad(format!("unknown action {:?}", r.action));
        }
        if r.parameters.len() > 3 {
            bad(format!("{} parameters; a rule has at most 3", r.parameters.len()));
        }
        match r.action.as_str() {
            "SetResponseHeader" | "SetRequestHeader" if r.parameters.len() != 2 => {
                bad(format!("{} takes a header name and a value", r.action));
            }
            "Redirect"
                if !matches!(
                    r.parameters.get(1).map(String::as_str),
                    Some("301" | "302" | "307" | "308")
                ) =>
            {
                bad("Redirect takes a URL and a status 301, 302, 307 or 308".into());
            }
            "OverrideCacheTime" | "OverrideBrowserCacheTime" | "OverrideCacheTimePublic"
                if r.parameters.first().is_none_or(|p| p.parse::<u64>().is_err()) =>
            {
                bad(format!("{} takes a number of seconds", r.action));
            }
            _ => {}
        }
        if index(MATCHING, &r.trigger_matching).is_none() {
            bad(format!(
                "trigger_matching {:?} is not any, all or none",
                r.trigger_matching
            ));
        }
        if r.triggers.is_empty() {
            bad("has no triggers".into());
        }
        let mut triggers = Vec::new();
        for (j, t) in r.triggers.iter().enumerate() {
            let kind = index(TRIGGERS, &t.kind);
            if kind.is_none() {
                bad(format!("trigger {}: unknown type {:?}", j + 1, t.kind));
            }
            if t.patterns.is_empty() || t.patterns.iter().any(|p| p.is_empty()) {
                bad(format!("trigger {}: needs at least one non-empty pattern", j + 1));
            }
            let matching = index(MATCHING, &t.matching);
            if matching.is_none() {
                bad(format!(
                    "trigger {}: match {:?} is not any, all or none",
                    j + 1,
                    t.matching
                ));
            }
            triggers.push(json!({
                "Type": kind.unwrap_or(0), "PatternMatches": t.patterns,
                "PatternMatchingType": matching.unwrap_or(0), "Parameter1": t.parameter,
            }));
        }
        let p = |n: usize| r.parameters.get(n).cloned();
        out.push(Rule {
            description: r.description.clone(),
            body: json!({
                "ActionType": action.unwrap_or(0), "ActionParameter1": p(0), "ActionParameter2": p(1),
                "ActionParameter3": p(2), "Triggers": triggers,
                "TriggerMatchingType": index(MATCHING, &r.trigger_matching).unwrap_or(0),
                "Description": r.description, "Enabled": r.enabled,
            }),
        });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(Error::EdgeRules(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_become_bunny_bodies_and_mistakes_are_named() {
        let r = parse(
            "cdn/edge-rules.toml",
            "[[rule]]\ndescription = \"immutable\"\naction = \"SetResponseHeader\"\nparameters = [\"Cache-Control\", \"immutable\"]\ntriggers = [{ type = \"UrlExtension\", patterns = [\"js\"] }]\n",
        )
        .unwrap();
        assert_eq!(r[0].body["ActionType"], 5);
        assert_eq!(r[0].body["Triggers"][0]["Type"], 3);
        let e = parse(
            "cdn/edge-rules.toml",
            "[[rule]]\ndescription = \"x\"\naction = \"SetResponseHeadr\"\ntriggers = [{ type = \"Path\", patterns = [\"/a\"] }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rule 1 (\"x\"): unknown action \"SetResponseHeadr\""), "{e}");
        assert!(e.contains("trigger 1: unknown type \"Path\""), "{e}");
    }
}
