//! container-build against the real tools: buildah (chroot isolation, vfs storage
//! of the test's own), a containerd of the test's own started as a plain process,
//! the trivy binary for what works offline, and recorded Trivy reports for what
//! needs a vulnerability database.

use baton_container_build::config::{Allowance, BuildConfig};
use baton_container_build::{BuildOutputs, ContainerBuild, image};
use baton_shared::protocol::StepJob;
use baton_shared::testing::{Containerd, GitRepo, TempDir, busybox_base};

const SERVICE: &str = "shop-api";

/// Everything a build needs: the daemon's directories, containerd, and a base
/// image made from Debian's busybox-static in the daemon's buildah storage.
struct Env {
    work: TempDir,
    containerd: Containerd,
    base: String,
}

impl Env {
    fn new() -> Self {
        let work = TempDir::new("cb-work");
        let base = busybox_base(work.path());
        Self {
            base,
            containerd: Containerd::start(),
            work,
        }
    }

    fn config(&self) -> BuildConfig {
        let w = self.work.path();
        let mut c = BuildConfig {
            repos_dir: w.join("repos"),
            work_dir: w.to_owned(),
            ..BuildConfig::default()
        };
        c.buildah.storage_root = w.join("storage");
        c.buildah.run_root = w.join("run");
        c.containerd.address = self.containerd.socket.clone();
        // No vulnerability database can be downloaded here: the real trivy runs the
        // scanners that work offline, and reports the same JSON format.
        c.scan.command = argv(&[
            "trivy",
            "image",
            "--input",
            "{layout}",
            "--format",
            "json",
            "--scanners",
            "secret",
            "--quiet",
        ]);
        c.validate().unwrap();
        c
    }

    fn role(&self, config: BuildConfig) -> ContainerBuild {
        ContainerBuild::new(config).unwrap()
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

fn job(repo: &GitRepo, commit: &str) -> StepJob {
    let mut job = StepJob::example("ci", "container-build", "build");
    job.deploy.repository = repo.url();
    job.deploy.commit_sha = commit.to_owned();
    job.deploy.service = SERVICE.to_owned();
    job
}

/// An application repository with a two-stage Dockerfile: the build stage
/// leaves its sources and a build cache behind, the runtime stage copies only
/// the result.
fn app_repo(base: &str, runtime_extra: &str) -> GitRepo {
    let repo = GitRepo::new();
    repo.write("src/app.txt", "hello from shop-api\n");
    repo.write("tools/gcc", "#!/bin/sh\necho pretend compiler\n");
    repo.write(
        "Dockerfile",
        format!(
            "FROM {base} AS build\nCOPY src /src\nRUN mkdir -p /out /root/.cache/build && cp /src/app.txt /out/app \
             && echo cached > /root/.cache/build/x\n\nFROM {base}\nCOPY --from=build /out/app /app/app\n{runtime_extra}\
             CMD [\"/bin/cat\", \"/app/app\"]\n"
        ),
    );
    repo
}

async fn build(role: &ContainerBuild, job: &StepJob) -> BuildOutputs {
    let fields = role.run(job).await.unwrap_or_else(|e| panic!("build failed: {e}"));
    serde_json::from_value(serde_json::Value::Object(fields)).unwrap()
}

/// The image containerd holds for `reference`, exported and read back.
fn image_in_containerd(env: &Env, reference: &str, digest: &str) -> image::Contents {
    let dir = TempDir::new("cb-export");
    let archive = dir.path().join("image.tar");
    let out = env
        .containerd
        .ctr(&["images", "export", &archive.display().to_string(), reference]);
    assert!(
        out.status.success(),
        "ctr export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layout = dir.path().join("layout");
    image::unpack_archive(&archive, &layout).unwrap();
    image::read_layout(&layout, digest).unwrap()
}

#[tokio::test]
async fn a_two_stage_image_is_built_scanned_and_imported_by_digest_and_rebuilt_from_cache() {
    let env = Env::new();
    let repo = app_repo(&env.base, "");
    let commit = repo.commit("app");
    let role = env.role(env.config());

    let first = build(&role, &job(&repo, &commit)).await;
    let tag = format!("localhost/{SERVICE}:{commit}");
    assert_eq!(first.tag, tag);
    let digest = first.facts.image_digest.clone();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    assert_eq!(
        first.facts.image.as_deref(),
        Some(format!("localhost/{SERVICE}@{digest}").as_str())
    );
    assert_eq!(first.stages, 2);
    assert_eq!(first.base_images, [env.base.clone(), env.base.clone()]);
    let scan = first.facts.scan.clone().unwrap();
    assert_eq!((scan.critical, scan.high), (0, 0));
    assert!(!first.cache_hit);

    // containerd holds the tag at the built digest, and the image is the runtime
    // stage only: the build stage's sources and cache did not ship.
    assert!(env.containerd.images().contains(&digest), "{}", env.containerd.images());
    let shipped = image_in_containerd(&env, &tag, &digest);
    assert_eq!(first.facts.size_bytes, Some(shipped.size_bytes));
    assert_eq!(first.layers, shipped.layers);
    assert!(shipped.files.contains("app/app") && shipped.files.contains("bin/busybox"));
    assert!(
        !shipped
            .files
            .iter()
            .any(|f| f.starts_with("src") || f.starts_with("root/.cache"))
    );

    // The SBOM the real trivy made is kept with the build.
    let sbom: serde_json::Value =
        serde_json::from_slice(&std::fs::read(first.sbom.as_ref().unwrap()).unwrap()).unwrap();
    assert_eq!(sbom["bomFormat"], "CycloneDX");

    // Another run of the same commit (a redelivery, a redeploy): the cache, the same digest.
    assert!(!first.already_imported);
    let second = build(&role, &job(&repo, &commit)).await;
    assert!(second.cache_hit && second.already_imported);
    assert_eq!(second.facts.image_digest, digest);
    assert_eq!(
        (second.facts.size_bytes, second.layers),
        (first.facts.size_bytes, first.layers)
    );
    // Removed from containerd, it is exported and imported again.
    assert!(env.containerd.ctr(&["images", "rm", &tag]).status.success());
    let third = build(&role, &job(&repo, &commit)).await;
    assert!(third.cache_hit && !third.already_imported);
    assert_eq!(third.facts.image_digest, digest);
    assert!(env.containerd.images().contains(&digest));
    // The job's scratch directories are gone.
    assert_eq!(std::fs::read_dir(env.work.path().join("jobs")).unwrap().count(), 0);
}

#[tokio::test]
async fn the_seed_rules_refuse_with_their_reason_and_nothing_is_imported() {
    let env = Env::new();
    let role = env.role(env.config());

    let refused = |repo: &GitRepo, commit: &str, role: &ContainerBuild| {
        let job = job(repo, commit);
        let role = role.clone();
        async move { role.run(&job).await.expect_err("refused").to_step_error() }
    };

    // Unpinned and `latest` bases are refused before building, naming the line.
    let repo = GitRepo::new();
    repo.write(
        "Dockerfile",
        format!("FROM {}\nRUN true\nFROM busybox:1.36\n", env.base),
    );
    let c = repo.commit("unpinned");
    let e = refused(&repo, &c, &role).await;
    assert_eq!(e.code, "base_not_pinned");
    assert!(
        e.message.contains("Dockerfile line 3") && e.message.contains("busybox:1.36"),
        "{}",
        e.message
    );
    assert!(!e.retryable);

    repo.write(
        "Dockerfile",
        format!(
            "FROM localhost/busybox:latest@{}\n",
            env.base.split('@').nth(1).unwrap()
        ),
    );
    let c = repo.commit("latest");
    let e = refused(&repo, &c, &role).await;
    assert_eq!(e.code, "latest_tag");
    assert!(e.message.contains("line 1"), "{}", e.message);

    // A compiler left in the runtime stage: found in the image's files, not the Dockerfile.
    let repo = app_repo(&env.base, "COPY tools/gcc /usr/bin/gcc\n");
    let c = repo.commit("compiler in the runtime image");
    let e = refused(&repo, &c, &role).await;
    assert_eq!(e.code, "build_tools_in_image");
    assert!(e.message.contains("usr/bin/gcc"), "{}", e.message);

    // Over the step's size limit.
    let repo = app_repo(&env.base, "");
    let c = repo.commit("app");
    let mut job_small = job(&repo, &c).with_param("max_image_bytes", 100_000);
    job_small.step_id = "build.small".into();
    let e = role.run(&job_small).await.unwrap_err().to_step_error();
    assert_eq!(e.code, "image_too_large");
    assert!(e.message.contains("over the limit of 100000 bytes"), "{}", e.message);

    // A critical finding (a recorded real Trivy report): refused, and the allow-list
    // lets it through only with a reason and until its expiry.
    let recorded = format!(
        "{}/tests/fixtures/trivy/alpine-39-high-critical.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut critical = env.config();
    critical.scan.command = argv(&["cat", &recorded]);
    let e = refused(&repo, &c, &env.role(critical.clone())).await;
    assert_eq!(e.code, "scan_blocked");
    assert!(
        e.message.contains("CRITICAL CVE-2019-14697") && e.message.contains("musl"),
        "{}",
        e.message
    );

    critical.scan.allow = vec![Allowance {
        id: "CVE-2019-14697".into(),
        reason: "x87 code path; amd64 only".into(),
        expires: chrono::Utc::now().date_naive() + chrono::Days::new(30),
    }];
    assert!(
        env.containerd.images().lines().count() <= 1,
        "nothing imported yet: {}",
        env.containerd.images()
    );
    let allowed = build(&env.role(critical.clone()), &job(&repo, &c)).await;
    assert_eq!(allowed.facts.scan.as_ref().unwrap().allowed, ["CVE-2019-14697"]);
    assert!(
        allowed
            .warnings
            .iter()
            .any(|w| w.contains("allowed until") && w.contains("amd64 only")),
        "{:?}",
        allowed.warnings
    );
    // Only the allowed build reached containerd.
    let images = env.containerd.images();
    assert_eq!(images.lines().skip(1).count(), 1, "{images}");
    assert!(images.contains(&allowed.facts.image_digest));
    // The same commit again, already in containerd, is judged under today's rules:
    // without the allow-list entry the finding refuses it.
    critical.scan.allow.clear();
    let e = refused(&repo, &c, &env.role(critical)).await;
    assert_eq!(e.code, "scan_blocked", "{}", e.message);
}

#[tokio::test]
async fn a_missing_dockerfile_and_an_unreachable_containerd_are_told_apart() {
    let env = Env::new();
    let repo = GitRepo::new();
    repo.write("README.md", "no Dockerfile here\n");
    let c = repo.commit("docs");
    let role = env.role(env.config());
    let e = role.run(&job(&repo, &c)).await.unwrap_err().to_step_error();
    assert_eq!(e.code, "dockerfile_missing");
    assert!(!e.retryable);

    // A link out of the repository (to the daemon's host) is refused before
    // anything is read through it.
    std::os::unix::fs::symlink("/etc", repo.path().join("ctx")).unwrap();
    repo.write("Dockerfile", format!("FROM {}\nCOPY ctx/hostname /x\n", env.base));
    let c = repo.commit("a link to the host");
    let e = role.run(&job(&repo, &c)).await.unwrap_err().to_step_error();
    assert_eq!(e.code, "invalid_job", "{}", e.message);
    assert!(e.message.contains("ctx -> /etc"), "{}", e.message);

    let repo = app_repo(&env.base, "");
    let c = repo.commit("app");
    let mut config = env.config();
    config.containerd.address = env.work.path().join("no-such.sock");
    let e = env.role(config).run(&job(&repo, &c)).await.unwrap_err().to_step_error();
    assert_eq!(e.code, "containerd_unavailable");
    assert!(e.retryable, "{}", e.message);
}
