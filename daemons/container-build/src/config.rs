//! The daemon's configuration: the common daemon settings plus a `[build]` section.
//!
//! ```toml
//! [daemon]
//! zone = "ci"
//!
//! [build]
//! repos_dir = "/var/cache/baton/repos"
//! work_dir = "/var/lib/baton/build"
//! image_prefix = "registry.example.org/shop"
//! max_image_bytes = 524288000
//!
//! [build.buildah]
//! storage_root = "/var/lib/baton/build/storage"
//!
//! [build.containerd]
//! address = "/run/k3s/containerd/containerd.sock"
//!
//! [build.scan]
//! command = ["trivy", "image", "--input", "{layout}", "--format", "json", "--scanners", "vuln", "--quiet"]
//!
//! [[build.scan.allow]]
//! id = "CVE-2019-14697"
//! reason = "musl's i386 code path; the image is amd64 only"
//! expires = "2027-03-01"
//! ```

use std::path::PathBuf;

use baton_shared::config::ConfigError;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// `[build]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildConfig {
    /// Where bare clones of built repositories are cached.
    pub repos_dir: PathBuf,
    /// The daemon's own directory: each job's source and image archive (removed
    /// when the job ends) and the SBOMs it keeps (`sbom/<service>/<commit>.cdx.json`).
    pub work_dir: PathBuf,
    /// Images are named `<image_prefix>/<service>:<commit SHA>`.
    pub image_prefix: String,
    /// Size limit of an image (layers, config and manifest as shipped) when the
    /// step does not set `max_image_bytes`.
    pub max_image_bytes: u64,
    /// Paths in the final image (globs, no leading `/`; `*` stays within a
    /// segment, `**` crosses them) that are build tools, package managers or
    /// caches, which the seed keeps out of runtime images.
    pub forbidden_paths: Vec<String>,
    pub buildah: BuildahConfig,
    pub containerd: ContainerdConfig,
    pub scan: ScanConfig,
}

/// `[build.buildah]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildahConfig {
    /// The `buildah` binary.
    pub path: PathBuf,
    /// buildah's storage (`--root`): the layer cache lives here, owned by the daemon.
    pub storage_root: PathBuf,
    /// buildah's run state (`--runroot`).
    pub run_root: PathBuf,
    /// `vfs` works everywhere; `overlay` is faster where the kernel allows it.
    pub storage_driver: String,
    /// `never` (no registry: every base image must already be in the storage) or
    /// `missing` (pull a base image the storage lacks).
    pub pull: String,
}

/// `[build.containerd]`: where images are imported, as k3s does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerdConfig {
    /// The `ctr` binary.
    pub ctr: PathBuf,
    /// containerd's socket.
    pub address: PathBuf,
    /// The namespace the kubelet reads (`k8s.io`).
    pub namespace: String,
}

/// `[build.scan]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScanConfig {
    /// The vulnerability scanner: argv whose stdout is a Trivy JSON report
    /// (`Results[].Vulnerabilities[].Severity`). `{layout}` is the image as an
    /// OCI layout directory, `{archive}` the same as an `oci-archive` file.
    pub command: Vec<String>,
    /// Makes the SBOM kept with the build (stdout), or empty for none.
    pub sbom_command: Vec<String>,
    /// Checks the Dockerfile (stdout a Trivy JSON report; `{dockerfile}` is its
    /// path); its findings are reported as warnings, or empty for none.
    pub config_command: Vec<String>,
    /// Severities that fail the build.
    pub blocking: Vec<String>,
    /// Findings let through, each with a reason and an expiry date.
    pub allow: Vec<Allowance>,
}

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allowance {
    /// The finding's id (`CVE-…`, `GHSA-…`, a secret rule id).
    pub id: String,
    /// Why it may ship; reported with every build it lets through.
    pub reason: String,
    /// From this day on (UTC) the entry no longer applies.
    pub expires: NaiveDate,
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

impl Default for BuildConfig {
    fn default() -> Self {
        let work = PathBuf::from("/var/lib/baton/build");
        Self {
            repos_dir: PathBuf::from("/var/cache/baton/repos"),
            image_prefix: "localhost".to_owned(),
            max_image_bytes: 500 * 1024 * 1024,
            forbidden_paths: [
                // compilers and build systems
                "usr/bin/gcc*",
                "usr/bin/g++*",
                "usr/bin/cc",
                "usr/bin/c++",
                "usr/bin/clang*",
                "usr/bin/ld",
                "usr/bin/make",
                "usr/bin/cmake",
                "usr/bin/rustc",
                "usr/bin/cargo",
                "usr/local/cargo/bin/**",
                "usr/bin/go",
                "usr/local/go/bin/**",
                "usr/bin/javac",
                // package managers
                "usr/bin/apt",
                "usr/bin/apt-get",
                "usr/bin/dpkg",
                "sbin/apk",
                "usr/bin/yum",
                "usr/bin/dnf",
                "usr/bin/pip*",
                "usr/local/bin/pip*",
                "usr/bin/npm",
                "usr/local/bin/npm",
                // caches
                "var/cache/apt/archives/*.deb",
                "var/cache/apk/**",
                "root/.cache/**",
                "root/.npm/**",
                "root/.cargo/registry/**",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
            buildah: BuildahConfig {
                path: PathBuf::from("buildah"),
                storage_root: work.join("storage"),
                run_root: work.join("run"),
                storage_driver: "vfs".to_owned(),
                pull: "never".to_owned(),
            },
            containerd: ContainerdConfig::default(),
            scan: ScanConfig::default(),
            work_dir: work,
        }
    }
}

impl Default for BuildahConfig {
    fn default() -> Self {
        BuildConfig::default().buildah
    }
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        Self {
            ctr: PathBuf::from("ctr"),
            address: PathBuf::from("/run/k3s/containerd/containerd.sock"),
            namespace: "k8s.io".to_owned(),
        }
    }
}

impl Default for ScanConfig {
    fn default() -> Self {
        Self {
            command: argv(&[
                "trivy",
                "image",
                "--input",
                "{layout}",
                "--format",
                "json",
                "--scanners",
                "vuln,secret",
                "--quiet",
            ]),
            sbom_command: argv(&[
                "trivy",
                "image",
                "--input",
                "{layout}",
                "--format",
                "cyclonedx",
                "--quiet",
            ]),
            config_command: argv(&[
                "trivy",
                "config",
                "--format",
                "json",
                "--quiet",
                "--skip-check-update",
                "{dockerfile}",
            ]),
            blocking: argv(&["CRITICAL", "HIGH"]),
            allow: Vec::new(),
        }
    }
}

/// Trivy's severities.
pub const SEVERITIES: &[&str] = &["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"];

fn command(key: &'static str, argv: &[String], allowed: &[&str], required: bool) -> Result<(), ConfigError> {
    if argv.is_empty() {
        return if required {
            Err(ConfigError::invalid(key, "must name a program"))
        } else {
            Ok(())
        };
    }
    if argv[0].trim().is_empty() {
        return Err(ConfigError::invalid(key, "the program (first word) is empty"));
    }
    for word in argv {
        let mut rest = word.as_str();
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else { break };
            let name = &rest[open + 1..open + close];
            if !allowed.contains(&name) {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{word:?} names {{{name}}}; the placeholders here are {}",
                        allowed
                            .iter()
                            .map(|a| format!("{{{a}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            rest = &rest[open + close + 1..];
        }
    }
    Ok(())
}

impl BuildConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::check_absolute("build.repos_dir", &self.repos_dir)?;
        ConfigError::check_absolute("build.work_dir", &self.work_dir)?;
        ConfigError::check_absolute("build.buildah.storage_root", &self.buildah.storage_root)?;
        ConfigError::check_absolute("build.buildah.run_root", &self.buildah.run_root)?;
        ConfigError::check_absolute("build.containerd.address", &self.containerd.address)?;
        crate::image::check_prefix(&self.image_prefix).map_err(|e| ConfigError::invalid("build.image_prefix", e))?;
        if self.max_image_bytes == 0 {
            return Err(ConfigError::invalid("build.max_image_bytes", "must be at least 1"));
        }
        crate::image::forbidden_set(&self.forbidden_paths)
            .map_err(|e| ConfigError::invalid("build.forbidden_paths", e))?;
        if !matches!(self.buildah.storage_driver.as_str(), "vfs" | "overlay") {
            return Err(ConfigError::invalid(
                "build.buildah.storage_driver",
                format!("is {:?}; expected \"vfs\" or \"overlay\"", self.buildah.storage_driver),
            ));
        }
        if !matches!(self.buildah.pull.as_str(), "never" | "missing") {
            return Err(ConfigError::invalid(
                "build.buildah.pull",
                format!("is {:?}; expected \"never\" or \"missing\"", self.buildah.pull),
            ));
        }
        if self.containerd.namespace.trim().is_empty() {
            return Err(ConfigError::invalid("build.containerd.namespace", "must not be empty"));
        }
        command("build.scan.command", &self.scan.command, &["layout", "archive"], true)?;
        command(
            "build.scan.sbom_command",
            &self.scan.sbom_command,
            &["layout", "archive"],
            false,
        )?;
        command(
            "build.scan.config_command",
            &self.scan.config_command,
            &["dockerfile"],
            false,
        )?;
        for s in &self.scan.blocking {
            if !SEVERITIES.contains(&s.as_str()) {
                return Err(ConfigError::invalid(
                    "build.scan.blocking",
                    format!("{s:?} is not a severity; expected some of {}", SEVERITIES.join(", ")),
                ));
            }
        }
        for (i, a) in self.scan.allow.iter().enumerate() {
            if a.id.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "build.scan.allow",
                    format!("entry {} has an empty id", i + 1),
                ));
            }
            if a.reason.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "build.scan.allow",
                    format!("entry {} ({}) has no reason: say why it may ship", i + 1, a.id),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        BuildConfig::default().validate().unwrap();
    }

    type Change = Box<dyn Fn(&mut BuildConfig)>;

    #[test]
    fn bad_values_name_their_key() {
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|c| c.work_dir = "build".into()), "build.work_dir"),
            (
                Box::new(|c| c.image_prefix = "Registry/Shop".into()),
                "build.image_prefix",
            ),
            (Box::new(|c| c.max_image_bytes = 0), "build.max_image_bytes"),
            (
                Box::new(|c| c.forbidden_paths = vec!["usr/bin/[".into()]),
                "build.forbidden_paths",
            ),
            (
                Box::new(|c| c.buildah.storage_driver = "btrfs".into()),
                "build.buildah.storage_driver",
            ),
            (Box::new(|c| c.buildah.pull = "always".into()), "build.buildah.pull"),
            (Box::new(|c| c.scan.command = Vec::new()), "build.scan.command"),
            (
                Box::new(|c| c.scan.command = argv(&["trivy", "{image}"])),
                "build.scan.command",
            ),
            (Box::new(|c| c.scan.blocking = argv(&["SEVERE"])), "build.scan.blocking"),
            (
                Box::new(|c| {
                    c.scan.allow = vec![Allowance {
                        id: "CVE-1".into(),
                        reason: " ".into(),
                        expires: NaiveDate::from_ymd_opt(2030, 1, 1).unwrap(),
                    }]
                }),
                "build.scan.allow",
            ),
        ];
        for (change, key) in cases {
            let mut c = BuildConfig::default();
            change(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}
