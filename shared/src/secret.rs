//! Secrets that never print: `Debug`, `Display` and `Serialize` all redact.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value that must not reach logs, spans, messages or printed config.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The wrapped value; call sites that need it are easy to grep for.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// A secret in configuration is given by value or, better, by reference:
/// `file:/run/secrets/amqp-url` reads (and trims) a file, `env:NAME` reads an
/// environment variable, so the value itself never sits in a config file.
impl<'de> Deserialize<'de> for Secret<String> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        resolve(&raw).map(Secret).map_err(serde::de::Error::custom)
    }
}

fn resolve(raw: &str) -> Result<String, String> {
    if let Some(path) = raw.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| format!("cannot read secret file {path}: {e}"))
    } else if let Some(name) = raw.strip_prefix("env:") {
        std::env::var(name).map_err(|_| format!("secret environment variable {name} is not set"))
    } else {
        Ok(raw.to_owned())
    }
}

/// Renders an AMQP or PostgreSQL URL with its password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "[redacted]".to_owned();
    };
    // The authority ends at the first '/', '?' or '#'; its userinfo at the
    // authority's last '@' (a password may hold an unescaped '@').
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{user}:***@{host}")
        }
        None => authority.to_owned(),
    };
    // libpq also takes the password as a query parameter.
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword") => {
                        format!("{k}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[redacted]\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn secrets_are_read_by_reference() {
        let path = std::env::temp_dir().join(format!("baton-secret-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let from_file: Secret<String> =
            serde_json::from_value(serde_json::json!(format!("file:{}", path.display()))).unwrap();
        assert_eq!(from_file.expose(), "s3cret");
        std::fs::remove_file(&path).unwrap();
        let missing = serde_json::from_value::<Secret<String>>(serde_json::json!("file:/nonexistent/x")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/x"), "{missing}");
        let unset =
            serde_json::from_value::<Secret<String>>(serde_json::json!("env:BATON_TEST_UNSET_VAR")).unwrap_err();
        assert!(unset.to_string().contains("BATON_TEST_UNSET_VAR"));
        let plain: Secret<String> = serde_json::from_value(serde_json::json!("plain")).unwrap();
        assert_eq!(plain.expose(), "plain");
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("amqp://baton:pw@mq:5672/%2f"),
            "amqp://baton:***@mq:5672/%2f"
        );
        assert_eq!(redact_url("postgres://db/baton"), "postgres://db/baton");
        // An unescaped '@' in the password: the userinfo ends at the last '@'.
        assert_eq!(
            redact_url("amqp://baton:p@ss@mq:5672/%2f"),
            "amqp://baton:***@mq:5672/%2f"
        );
        // An '@' after the authority is not userinfo.
        assert_eq!(
            redact_url("https://git.example/shop/api@v2.git"),
            "https://git.example/shop/api@v2.git"
        );
        assert_eq!(
            redact_url("postgres://db/baton?sslmode=require&password=hunter2"),
            "postgres://db/baton?sslmode=require&password=***"
        );
    }
}
