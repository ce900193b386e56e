//! container-build's errors: each a step error code, retryable only for
//! transient causes (git or containerd unreachable).

use baton_shared::git::GitError;
use baton_shared::protocol::{JobKind, StepError};

use crate::tools::ToolFailure;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown {kind} action {action:?}: the container-build role executes `build` and has no compensation")]
    UnknownAction { kind: JobKind, action: String },

    #[error("invalid parameter `{name}`: {problem}")]
    InvalidParam { name: String, problem: String },

    #[error(transparent)]
    Source(#[from] GitError),

    #[error("{dockerfile} does not exist at commit {commit}")]
    DockerfileMissing { dockerfile: String, commit: String },

    #[error("{dockerfile} line {line}: {problem}; nothing was built")]
    Dockerfile {
        dockerfile: String,
        line: usize,
        rule: &'static str,
        problem: String,
    },

    #[error("{tool}")]
    Build { tool: ToolFailure },

    #[error(
        "the runtime image holds build tools, package managers or caches ({}): build them in an earlier stage and copy only what runs; the image was not imported",
        files.join(", ")
    )]
    BuildToolsInImage { files: Vec<String> },

    #[error("the image is {size} bytes, over the limit of {limit} bytes (max_image_bytes); the image was not imported")]
    TooLarge { size: u64, limit: u64 },

    #[error(
        "the security scan found {} blocking finding(s): {}{}; the image was not imported",
        findings.len(),
        findings.join("; "),
        if expired.is_empty() { String::new() } else { format!(" ({})", expired.join("; ")) }
    )]
    ScanBlocked {
        findings: Vec<String>,
        expired: Vec<String>,
    },

    #[error("the scanner failed: {detail}; an image that was not scanned is not imported")]
    Scanner { detail: String },

    #[error("{tool}")]
    Containerd { tool: ToolFailure },

    #[error("containerd holds {reference} as {found}, not the built {built}")]
    DigestMismatch {
        reference: String,
        built: String,
        found: String,
    },

    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
}

impl Error {
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownAction { .. } => "unknown_action",
            Self::InvalidParam { .. } => "invalid_params",
            Self::Source(e) => e.code(),
            Self::DockerfileMissing { .. } => "dockerfile_missing",
            Self::Dockerfile { rule, .. } => rule,
            Self::Build { .. } => "build_failed",
            Self::BuildToolsInImage { .. } => "build_tools_in_image",
            Self::TooLarge { .. } => "image_too_large",
            Self::ScanBlocked { .. } => "scan_blocked",
            Self::Scanner { .. } => "scanner_failed",
            Self::Containerd { .. } => "containerd_unavailable",
            Self::DigestMismatch { .. } => "import_mismatch",
            Self::Io { .. } => "io_error",
        }
    }

    /// Verdicts (the Dockerfile, the image, the scan) are final; git and
    /// containerd being unreachable may pass.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Source(e) => e.retryable(),
            Self::Containerd { tool } => !tool.not_started,
            _ => false,
        }
    }

    pub fn to_step_error(&self) -> StepError {
        StepError::new(self.code(), self.to_string(), self.retryable())
    }
}

impl baton_shared::kit::JobError for Error {
    fn step_error(&self) -> StepError {
        self.to_step_error()
    }
}
