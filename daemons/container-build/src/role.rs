//! The `container-build` role's one action, `build` (see the crate documentation
//! for the order of its checks).
//!
//! Idempotency per (run, step): the build is deterministic for a commit
//! (timestamps zeroed, the layer cache), so a redelivered job rebuilds from the
//! cache to the same digest, and importing an image containerd already holds is a
//! no-op. The job's scratch directory is named after the run and step and is
//! emptied before and removed after each attempt.

use std::path::{Path, PathBuf};

use baton_shared::facts::ImageBuilt;
use baton_shared::git::{self, GitCache};
use baton_shared::kit;
use baton_shared::protocol::{self, Fields, JobKind, StepJob};
use baton_shared::roles;
use baton_shared::runtime::{BoxFuture, ExecContext, Outcome, Role};
use globset::GlobSet;
use serde::{Deserialize, Serialize};

use crate::config::BuildConfig;
use crate::error::Error;
use crate::tools::{self, Buildah, Ctr};
use crate::{dockerfile, image, scan};

/// The step's parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The Dockerfile, relative to the repository root.
    pub dockerfile: String,
    /// The build context, relative to the repository root.
    pub context: String,
    /// Overrides `build.max_image_bytes`.
    pub max_image_bytes: Option<u64>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            dockerfile: "Dockerfile".to_owned(),
            context: ".".to_owned(),
            max_image_bytes: None,
        }
    }
}

/// What `build` reports: the facts contract's [`ImageBuilt`] and the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildOutputs {
    #[serde(flatten)]
    pub facts: ImageBuilt,
    /// `<prefix>/<service>:<commit SHA>`.
    pub tag: String,
    pub layers: usize,
    /// Stages in the Dockerfile.
    pub stages: usize,
    /// Base images, as pinned in the Dockerfile.
    pub base_images: Vec<String>,
    /// Whether every build step came from the layer cache.
    pub cache_hit: bool,
    /// Whether containerd already held this image from an earlier job of the
    /// same commit (nothing was exported or imported again).
    #[serde(default)]
    pub already_imported: bool,
    /// Where the SBOM of this image is kept, if one is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<String>,
    /// Findings let through by the allow-list, Dockerfile findings of the
    /// configuration check: recorded in the run's history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What this daemon shipped for a commit (`work_dir/built/<service>/<commit>.json`):
/// enough to judge the image again without reading it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shipped {
    /// buildah's image id (the config digest): the same for a rebuild from the cache.
    image_id: String,
    /// The manifest digest containerd holds.
    digest: String,
    size_bytes: u64,
    layers: usize,
    files: Vec<String>,
    findings: Vec<scan::Finding>,
    sbom: Option<String>,
}

impl Shipped {
    fn read(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Written whole or not at all (a rename over the old record).
    fn write(&self, path: &Path) -> Result<(), Error> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
        let text = serde_json::to_vec(self).map_err(|e| Error::Io {
            what: "the build record".into(),
            detail: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(io(format!("cannot write {}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(io(format!("cannot write {}", path.display())))
    }

    #[allow(clippy::too_many_arguments)]
    fn outputs(
        self,
        name: String,
        tag: String,
        checked: dockerfile::Checked,
        cache_hit: bool,
        verdict: scan::Verdict,
        warnings: Vec<String>,
        already_imported: bool,
    ) -> BuildOutputs {
        BuildOutputs {
            facts: ImageBuilt {
                image: Some(format!("{name}@{}", self.digest)),
                image_digest: self.digest,
                size_bytes: Some(self.size_bytes),
                scan: Some(verdict.summary),
            },
            tag,
            layers: self.layers,
            stages: checked.stages,
            base_images: checked.images.into_iter().map(|i| i.reference).collect(),
            cache_hit,
            already_imported,
            sbom: self.sbom,
            warnings,
        }
    }
}

/// The container-build role, built from `[build]`.
#[derive(Debug, Clone)]
pub struct ContainerBuild {
    config: BuildConfig,
    git: GitCache,
    forbidden: GlobSet,
    buildah: Buildah,
    ctr: Ctr,
}

/// Removes a directory when dropped (also when the job's future is dropped).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::Io {
        what,
        detail: e.to_string(),
    }
}

impl ContainerBuild {
    /// Fails only if `config` is invalid (it has been validated).
    pub fn new(config: BuildConfig) -> Result<Self, String> {
        let forbidden = image::forbidden_set(&config.forbidden_paths)?;
        Ok(Self {
            git: GitCache::new(config.repos_dir.clone()),
            buildah: Buildah {
                config: config.buildah.clone(),
            },
            ctr: Ctr {
                config: config.containerd.clone(),
            },
            forbidden,
            config,
        })
    }

    /// Runs a job to its outputs; the `Role` methods wrap this.
    pub async fn run(&self, job: &StepJob) -> Result<Fields, Error> {
        match (job.kind, job.action.as_str()) {
            (JobKind::Execute, "build") => {
                let out = self.build(job).await?;
                protocol::to_fields(&out).map_err(|e| Error::Io {
                    what: "outputs".into(),
                    detail: e.message,
                })
            }
            (kind, action) => Err(Error::UnknownAction {
                kind,
                action: action.to_owned(),
            }),
        }
    }

    fn params(job: &StepJob) -> Result<Params, Error> {
        let mut p: Params = job.params().map_err(|e| Error::InvalidParam {
            name: e.key,
            problem: e.problem,
        })?;
        if p.context.trim_end_matches('/') != "." {
            p.context = git::check_folder("context", &p.context)?;
        }
        p.dockerfile = git::check_folder("dockerfile", &p.dockerfile)?;
        if p.max_image_bytes == Some(0) {
            return Err(Error::InvalidParam {
                name: "max_image_bytes".into(),
                problem: "must be at least 1".into(),
            });
        }
        Ok(p)
    }

    /// The image name of `service`: `<prefix>/<service>`.
    pub fn image_name(&self, service: &str) -> Result<String, Error> {
        image::check_component(service).map_err(|problem| Error::InvalidParam {
            name: "deploy.service".into(),
            problem,
        })?;
        Ok(format!("{}/{service}", self.config.image_prefix))
    }

    async fn build(&self, job: &StepJob) -> Result<BuildOutputs, Error> {
        let params = Self::params(job)?;
        let commit = job.deploy.commit_sha.as_str();
        git::check_commit(commit)?;
        let name = self.image_name(&job.deploy.service)?;
        // The seed: tagged with the commit SHA, the full one, never `latest`.
        let tag = format!("{name}:{commit}");
        let limit = params.max_image_bytes.unwrap_or(self.config.max_image_bytes);

        let scratch_dir = self
            .config
            .work_dir
            .join("jobs")
            .join(format!("{}-{}-{}", job.run_id, job.step_id, job.attempt));
        let _ = std::fs::remove_dir_all(&scratch_dir);
        std::fs::create_dir_all(&scratch_dir).map_err(io(format!("cannot create {}", scratch_dir.display())))?;
        let scratch = Scratch(scratch_dir);
        let source = scratch.0.join("source");

        // 1. The source at the commit, and the Dockerfile's rules before building.
        let files = self.git.export(&job.deploy.repository, commit, ".", &source).await?;
        let dockerfile_path = source.join(&params.dockerfile);
        let text = std::fs::read_to_string(&dockerfile_path).map_err(|_| Error::DockerfileMissing {
            dockerfile: params.dockerfile.clone(),
            commit: commit.to_owned(),
        })?;
        let checked = dockerfile::check(&text).map_err(|r| Error::Dockerfile {
            dockerfile: params.dockerfile.clone(),
            line: r.line,
            rule: r.rule,
            problem: r.problem,
        })?;
        let mut warnings = self.check_config(&dockerfile_path, &params.dockerfile).await;
        tracing::info!(
            run_id = %job.run_id,
            step_id = %job.step_id,
            commit,
            files,
            stages = checked.stages,
            "source exported, Dockerfile checked"
        );

        // 2. Build. The same commit builds the same image id from the cache: an
        // image this daemon already shipped (its record, and containerd still
        // holding the tag at that digest) is judged again under today's rules
        // and reported, without exporting and importing it again.
        let context = if params.context == "." {
            source.clone()
        } else {
            source.join(&params.context)
        };
        let built = self
            .buildah
            .build(&context, &dockerfile_path, &tag, &scratch.0.join("iid"))
            .await
            .map_err(|tool| Error::Build { tool })?;
        let record_path = self
            .config
            .work_dir
            .join("built")
            .join(&job.deploy.service)
            .join(format!("{commit}.json"));
        if let Some(record) = Shipped::read(&record_path).filter(|r| r.image_id == built.image_id) {
            let held = self
                .ctr
                .digest_of(&tag)
                .await
                .map_err(|tool| Error::Containerd { tool })?;
            if held.as_deref() == Some(record.digest.as_str()) {
                let verdict = self.judge(&record, limit)?;
                warnings.extend(verdict.allowed.iter().cloned());
                tracing::info!(
                    run_id = %job.run_id,
                    step_id = %job.step_id,
                    image = %tag,
                    digest = %record.digest,
                    "image already built and imported"
                );
                return Ok(record.outputs(name, tag, checked, built.all_cached, verdict, warnings, true));
            }
        }
        let archive = scratch.0.join("image.tar");
        let digest = self
            .buildah
            .export(&built.image_id, &archive, &tag, &scratch.0.join("digest"))
            .await
            .map_err(|tool| Error::Build { tool })?;

        // 3. What ships (the file list and the size) and what the scanner finds.
        let layout = scratch.0.join("layout");
        let contents = {
            let (archive, layout, digest) = (archive.clone(), layout.clone(), digest.clone());
            tokio::task::spawn_blocking(move || {
                image::unpack_archive(&archive, &layout)?;
                image::read_layout(&layout, &digest)
            })
            .await
            .map_err(|e| Error::Io {
                what: "reading the image".into(),
                detail: e.to_string(),
            })?
            .map_err(|detail| Error::Io {
                what: "reading the image".into(),
                detail,
            })?
        };
        let mut record = Shipped {
            image_id: built.image_id.clone(),
            digest: digest.clone(),
            size_bytes: contents.size_bytes,
            layers: contents.layers,
            files: contents.files.into_iter().collect(),
            findings: Vec::new(),
            sbom: None,
        };
        // Build tools and size refuse before the scanner runs.
        self.judge(&record, limit)?;
        record.findings = self.scan(&layout, &archive).await?;
        let verdict = self.judge(&record, limit)?;
        warnings.extend(verdict.allowed.iter().cloned());
        record.sbom = self.sbom(&layout, &archive, &job.deploy.service, commit).await?;

        // 4. Into the cluster's image store, confirmed by reading it back.
        self.ctr
            .import(&archive)
            .await
            .map_err(|tool| Error::Containerd { tool })?;
        let found = self
            .ctr
            .digest_of(&tag)
            .await
            .map_err(|tool| Error::Containerd { tool })?;
        if found.as_deref() != Some(digest.as_str()) {
            return Err(Error::DigestMismatch {
                reference: tag,
                built: digest,
                found: found.unwrap_or_else(|| "nothing".into()),
            });
        }
        record.write(&record_path)?;
        tracing::info!(
            run_id = %job.run_id,
            step_id = %job.step_id,
            image = %tag,
            digest = %digest,
            size_bytes = record.size_bytes,
            cache_hit = built.all_cached,
            "image built, scanned and imported"
        );
        Ok(record.outputs(name, tag, checked, built.all_cached, verdict, warnings, false))
    }

    /// The seed's rules on what ships, under today's configuration: build tools
    /// in the file list, the size limit, and the scanner's findings against the
    /// allow-list as it is today.
    fn judge(&self, shipped: &Shipped, limit: u64) -> Result<scan::Verdict, Error> {
        let tools_found: Vec<String> = shipped
            .files
            .iter()
            .filter(|f| self.forbidden.is_match(f.as_str()))
            .cloned()
            .collect();
        if !tools_found.is_empty() {
            return Err(Error::BuildToolsInImage { files: tools_found });
        }
        if shipped.size_bytes > limit {
            return Err(Error::TooLarge {
                size: shipped.size_bytes,
                limit,
            });
        }
        let today = chrono::Utc::now().date_naive();
        let verdict = scan::judge(
            &shipped.findings,
            &self.config.scan.blocking,
            &self.config.scan.allow,
            today,
        );
        if !verdict.blocking.is_empty() {
            return Err(Error::ScanBlocked {
                findings: verdict.blocking.iter().map(ToString::to_string).collect(),
                expired: verdict.expired,
            });
        }
        Ok(verdict)
    }

    /// The Dockerfile check's findings, as warnings (a check that cannot run is one too).
    async fn check_config(&self, path: &Path, shown: &str) -> Vec<String> {
        if self.config.scan.config_command.is_empty() {
            return Vec::new();
        }
        let (program, args) = tools::fill(&self.config.scan.config_command, &[("dockerfile", path)]);
        let report = match tools::run("Dockerfile check", &program, &args, &self.scanner_env()).await {
            Ok(r) => r,
            Err(e) => return vec![format!("{shown}: {e}")],
        };
        match scan::findings(&report) {
            Ok(f) => f.into_iter().map(|f| format!("{shown}: {f}")).collect(),
            Err(e) => vec![format!("{shown}: the Dockerfile check's report: {e}")],
        }
    }

    fn scanner_env(&self) -> Vec<(&'static str, String)> {
        vec![(
            "TRIVY_CACHE_DIR",
            self.config.work_dir.join("trivy-cache").to_string_lossy().into_owned(),
        )]
    }

    /// The scanner's findings on the image.
    async fn scan(&self, layout: &Path, archive: &Path) -> Result<Vec<scan::Finding>, Error> {
        let (program, args) = tools::fill(&self.config.scan.command, &[("layout", layout), ("archive", archive)]);
        let report = tools::run("the vulnerability scan", &program, &args, &self.scanner_env())
            .await
            .map_err(|e| Error::Scanner { detail: e.to_string() })?;
        scan::findings(&report).map_err(|detail| Error::Scanner { detail })
    }

    async fn sbom(&self, layout: &Path, archive: &Path, service: &str, commit: &str) -> Result<Option<String>, Error> {
        if self.config.scan.sbom_command.is_empty() {
            return Ok(None);
        }
        let (program, args) = tools::fill(
            &self.config.scan.sbom_command,
            &[("layout", layout), ("archive", archive)],
        );
        let sbom = tools::run("the SBOM", &program, &args, &self.scanner_env())
            .await
            .map_err(|e| Error::Scanner { detail: e.to_string() })?;
        let dir = self.config.work_dir.join("sbom").join(service);
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        let path = dir.join(format!("{commit}.cdx.json"));
        std::fs::write(&path, sbom).map_err(io(format!("cannot write {}", path.display())))?;
        Ok(Some(path.to_string_lossy().into_owned()))
    }
}

impl Role for ContainerBuild {
    fn name(&self) -> &str {
        roles::CONTAINER_BUILD
    }

    fn execute<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        // Cancellation drops this future: buildah, ctr and the scanner are killed
        // (kill_on_drop) and the job's scratch directory goes with it.
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }

    fn compensate<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }
}
