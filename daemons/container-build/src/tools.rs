//! The real tools: buildah builds and exports, `ctr` imports into containerd,
//! and the configured scanner commands. Each runs as a child process that is
//! killed if the job is cancelled (its future dropped).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::config::{BuildahConfig, ContainerdConfig};

/// A tool that could not run or failed.
#[derive(Debug, Clone)]
pub struct ToolFailure {
    /// What was being done: `buildah bud`, `ctr images import`, …
    pub operation: String,
    /// The last lines of its stderr (or stdout), or why it could not start.
    pub detail: String,
    /// Whether it never started (not installed, bad path) rather than failed.
    pub not_started: bool,
}

impl std::fmt::Display for ToolFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.operation, self.detail)
    }
}

/// The last `n` non-empty lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `program args` and returns its stdout.
pub async fn run(
    operation: &str,
    program: &Path,
    args: &[String],
    env: &[(&str, String)],
) -> Result<Vec<u8>, ToolFailure> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.map_err(|e| ToolFailure {
        operation: operation.to_owned(),
        detail: if e.kind() == std::io::ErrorKind::NotFound {
            format!("{} is not installed (not found on PATH)", program.display())
        } else {
            format!("cannot run {}: {e}", program.display())
        },
        not_started: true,
    })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = if stderr.trim().is_empty() {
        tail(&String::from_utf8_lossy(&out.stdout), 20)
    } else {
        tail(&stderr, 20)
    };
    Err(ToolFailure {
        operation: operation.to_owned(),
        detail: format!("{said} ({})", out.status),
        not_started: false,
    })
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// buildah with the daemon's storage.
#[derive(Debug, Clone)]
pub struct Buildah {
    pub config: BuildahConfig,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct Built {
    /// The image id (its config digest) in buildah's storage.
    pub image_id: String,
    /// Whether every step came from the layer cache.
    pub all_cached: bool,
}

impl Buildah {
    fn global(&self) -> Vec<String> {
        vec![
            "--root".into(),
            s(&self.config.storage_root),
            "--runroot".into(),
            s(&self.config.run_root),
            "--storage-driver".into(),
            self.config.storage_driver.clone(),
        ]
    }

    /// `buildah bud`: chroot isolation (OCI isolation needs cgroups a daemon in a
    /// container rarely has), the layer cache, timestamps zeroed so the same
    /// commit builds the same image, pulls as configured.
    pub async fn build(
        &self,
        context: &Path,
        dockerfile: &Path,
        tag: &str,
        iid_file: &Path,
    ) -> Result<Built, ToolFailure> {
        let mut args = self.global();
        args.extend(
            [
                "bud",
                "--isolation",
                "chroot",
                "--layers",
                "--timestamp",
                "0",
                "--format",
                "oci",
            ]
            .map(str::to_owned),
        );
        args.push(format!("--pull={}", self.config.pull));
        args.extend([
            "-f".into(),
            s(dockerfile),
            "--iidfile".into(),
            s(iid_file),
            "-t".into(),
            tag.to_owned(),
        ]);
        args.push(s(context));
        let out = run("buildah bud", &self.config.path, &args, &[]).await?;
        let log = String::from_utf8_lossy(&out);
        let steps = log
            .lines()
            .filter(|l| l.contains("STEP ") && !l.contains("FROM "))
            .count();
        let cached = log.lines().filter(|l| l.starts_with("--> Using cache")).count();
        let image_id = std::fs::read_to_string(iid_file).map_err(|e| ToolFailure {
            operation: "buildah bud".into(),
            detail: format!("wrote no image id to {}: {e}", iid_file.display()),
            not_started: false,
        })?;
        Ok(Built {
            image_id: image_id.trim().to_owned(),
            all_cached: steps > 0 && cached >= steps,
        })
    }

    /// Exports the image as an `oci-archive` named `reference`; returns the
    /// manifest digest, the one registries and containerd will know it by.
    pub async fn export(
        &self,
        image_id: &str,
        archive: &Path,
        reference: &str,
        digest_file: &Path,
    ) -> Result<String, ToolFailure> {
        let mut args = self.global();
        args.extend(["push".into(), "--quiet".into(), "--digestfile".into(), s(digest_file)]);
        args.push(image_id.to_owned());
        args.push(format!("oci-archive:{}:{reference}", archive.display()));
        run("buildah push", &self.config.path, &args, &[]).await?;
        let digest = std::fs::read_to_string(digest_file).map_err(|e| ToolFailure {
            operation: "buildah push".into(),
            detail: format!("wrote no digest to {}: {e}", digest_file.display()),
            not_started: false,
        })?;
        Ok(digest.trim().to_owned())
    }
}

/// containerd through `ctr`.
#[derive(Debug, Clone)]
pub struct Ctr {
    pub config: ContainerdConfig,
}

impl Ctr {
    fn global(&self) -> Vec<String> {
        vec![
            "--address".into(),
            s(&self.config.address),
            "--namespace".into(),
            self.config.namespace.clone(),
        ]
    }

    /// Imports an `oci-archive` as k3s's airgap import does.
    pub async fn import(&self, archive: &Path) -> Result<(), ToolFailure> {
        let mut args = self.global();
        args.extend(["images".into(), "import".into(), s(archive)]);
        run("ctr images import", &self.config.ctr, &args, &[]).await.map(|_| ())
    }

    /// The digest containerd holds for `reference`, if it has it.
    pub async fn digest_of(&self, reference: &str) -> Result<Option<String>, ToolFailure> {
        let mut args = self.global();
        args.extend(["images".into(), "ls".into()]);
        let out = run("ctr images ls", &self.config.ctr, &args, &[]).await?;
        Ok(parse_listing(&String::from_utf8_lossy(&out), reference))
    }
}

/// Finds `reference`'s digest in `ctr images ls` output
/// (`REF TYPE DIGEST SIZE PLATFORMS LABELS`).
pub fn parse_listing(listing: &str, reference: &str) -> Option<String> {
    listing.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace();
        let name = cols.next()?;
        let _type = cols.next()?;
        let digest = cols.next()?;
        (name == reference).then(|| digest.to_owned())
    })
}

/// A configured command with its placeholders filled.
pub fn fill(argv: &[String], values: &[(&str, &Path)]) -> (PathBuf, Vec<String>) {
    let filled: Vec<String> = argv
        .iter()
        .map(|w| {
            values.iter().fold(w.clone(), |w, (k, v)| {
                w.replace(&format!("{{{k}}}"), &v.to_string_lossy())
            })
        })
        .collect();
    (PathBuf::from(&filled[0]), filled[1..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_is_read_by_reference() {
        let listing = "REF               TYPE                                       DIGEST                                                                  SIZE    PLATFORMS   LABELS \n\
                       localhost/app:abc application/vnd.oci.image.manifest.v1+json sha256:8dbab12d04fef71d61a5ad2e9099854b86ecf87e01f793ec21f0866a4766c9bc 1.0 MiB linux/amd64 -\n";
        assert_eq!(
            parse_listing(listing, "localhost/app:abc").as_deref(),
            Some("sha256:8dbab12d04fef71d61a5ad2e9099854b86ecf87e01f793ec21f0866a4766c9bc")
        );
        assert_eq!(parse_listing(listing, "localhost/app:ab"), None);
    }

    #[test]
    fn placeholders_are_filled() {
        let argv = vec!["trivy".to_owned(), "--input".to_owned(), "{layout}".to_owned()];
        let (program, args) = fill(&argv, &[("layout", Path::new("/w/l"))]);
        assert_eq!(program, PathBuf::from("trivy"));
        assert_eq!(args, ["--input", "/w/l"]);
    }
}
