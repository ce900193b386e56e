//! Why a configuration was refused. Every module that validates a section of
//! the configuration (`config`, `telemetry`, the daemons' own sections) names
//! the bad key with it; `config` re-exports it.

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist")]
    MissingFile { path: String },
    #[error("invalid configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid {
        key: std::borrow::Cow<'static, str>,
        problem: String,
    },
}

impl ConfigError {
    /// `path` must be absolute (a relative one would depend on the process's
    /// working directory).
    pub fn check_absolute(key: &'static str, path: &std::path::Path) -> Result<(), Self> {
        if path.as_os_str().is_empty() || path.is_relative() {
            return Err(Self::invalid(
                key,
                format!(
                    "{:?} is not an absolute path (a relative one would depend on the working directory)",
                    path.display().to_string()
                ),
            ));
        }
        Ok(())
    }

    pub fn invalid(key: impl Into<std::borrow::Cow<'static, str>>, problem: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}
