//! The shipped seed pipeline (`scheduler/pipelines/seed.toml`) end to end on
//! the eight real role daemons, each its own process in its zone: buildah and
//! a containerd of the test's own (build), PostgreSQL (migrations, backups,
//! Terraform's state), Terraform, a real Kubernetes control plane with a
//! simulated node (staging, production, network objects), pebble issuing the
//! certificate, and the stand-ins for TransIP (its API and authoritative DNS)
//! and bunny.net (storage, pull zone, a caching edge) at their network
//! boundaries. No step's facts are scripted: every gate decides on what a
//! daemon reported from real work. Timings are shortened by the daemons'
//! configuration (a 1 s soak and watch); the pipeline is the shipped one.
//!
//! Two releases: the first goes through all nine steps; the second fails its
//! production rollout (its image crash-loops on production's node), and the
//! run is compensated in reverse order across every role that changed
//! something. The assertions look at the real systems afterwards.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use baton_shared::fake_bunny::{FakeBunny, ZoneSpec};
use baton_shared::fake_lb::LoadBalancer;
use baton_shared::fake_transip::{Entry, FakeTransip};
use baton_shared::pebble::Pebble;
use baton_shared::test_cluster::{Behaviour, TestNamespace};
use baton_shared::testing::{Containerd, GitRepo, TempDir, busybox_base};
use baton_tests::{RealDaemon, TestEnv};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};
use sha2::Digest;

const RUN_TIMEOUT: Duration = Duration::from_secs(600);
const SERVICE: &str = "shop";
const IMAGE: &str = "registry.test/shop/shop";
const DOMAIN: &str = "example.test";
const HOST: &str = "www.example.test";
const PULL_ZONE: u64 = 7;

/// Everything the eight daemons work on, and the daemons.
struct World {
    env: TestEnv,
    staging: TestNamespace,
    production: TestNamespace,
    containerd: Containerd,
    base: String,
    transip: FakeTransip,
    bunny: FakeBunny,
    admin: sqlx::PgPool,
    dbs: BTreeMap<&'static str, String>,
    _pebble: Pebble,
    _lb: LoadBalancer,
    _build_work: TempDir,
    _daemons: Vec<RealDaemon>,
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn write(env: &TestEnv, name: &str, text: String) -> std::path::PathBuf {
    let file = env.dir.join(name);
    std::fs::write(&file, text).unwrap();
    file
}

impl World {
    async fn new() -> Self {
        let env = TestEnv::new("seed-real").await;
        let staging = TestNamespace::new("seed-stg").await;
        let production = TestNamespace::new("seed-prd").await;
        let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
            .await
            .unwrap();
        let mut dbs = BTreeMap::new();
        for (key, suffix) in [("staging", "app_stg"), ("production", "app_prd"), ("tf", "tf")] {
            let name = format!("{}_{suffix}", env.db_name);
            sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
                .execute(&admin)
                .await
                .unwrap();
            dbs.insert(key, name);
        }
        let url = |db: &str| format!("postgres://postgres@127.0.0.1:5432/{db}");
        let admin_url = url("postgres");

        // container-build (zone ci): buildah storage with the busybox base image,
        // and the containerd images are imported into.
        let build_work = TempDir::new("seed-build");
        let base = busybox_base(build_work.path());
        let containerd = Containerd::start();
        let build = write(
            &env,
            "container-build.toml",
            format!(
                "[daemon]\nzone = \"ci\"\n\n[build]\nrepos_dir = {:?}\nwork_dir = {:?}\nimage_prefix = \"registry.test/shop\"\n\n\
                 [build.buildah]\nstorage_root = {:?}\nrun_root = {:?}\n\n[build.containerd]\naddress = {:?}\n\n\
                 [build.scan]\ncommand = [\"trivy\", \"image\", \"--input\", \"{{layout}}\", \"--format\", \"json\", \"--scanners\", \"secret\", \"--quiet\"]\n",
                path(&build_work.path().join("repos")),
                path(build_work.path()),
                path(&build_work.path().join("storage")),
                path(&build_work.path().join("run")),
                path(&containerd.socket),
            ),
        );

        // db-migration per zone, backup in production.
        let migration = |zone: &str| {
            format!(
                "[daemon]\nzone = {zone:?}\n\n[migration]\nrepos_dir = {:?}\nadmin_url = {admin_url:?}\n\n\
                 [migration.databases]\n{SERVICE} = {:?}\n",
                path(&env.dir.join(format!("migration-repos-{zone}"))),
                url(&dbs[zone]),
            )
        };
        let db_staging = write(&env, "db-staging.toml", migration("staging"));
        let db_production = write(&env, "db-production.toml", migration("production"));
        let age = std::process::Command::new(baton_tests::bin("baton-backup"))
            .arg("--keygen")
            .arg(env.dir.join("age.txt"))
            .output()
            .unwrap();
        assert!(age.status.success());
        let recipient = String::from_utf8_lossy(&age.stdout).trim().to_owned();
        let backup = write(
            &env,
            "backup.toml",
            format!(
                "[daemon]\nzone = \"production\"\n\n[backup]\nadmin_url = {admin_url:?}\nrecipients = [{recipient:?}]\n\
                 identity_file = {:?}\n\n[backup.primary]\npath = {:?}\nregion = \"nl-ams1\"\n\n\
                 [backup.copy]\npath = {:?}\nregion = \"nl-ams2\"\n\n[backup.databases]\n{SERVICE} = {:?}\n\n\
                 [backup.schedule]\nenabled = false\n",
                path(&env.dir.join("age.txt")),
                path(&env.dir.join("backups/primary")),
                path(&env.dir.join("backups/copy")),
                url(&dbs["production"]),
            ),
        );

        // infrastructure per zone, state in PostgreSQL (a schema per zone).
        let infra = |zone: &str| {
            format!(
                "[daemon]\nzone = {zone:?}\n\n[infrastructure]\nrepos_dir = {:?}\nwork_dir = {:?}\nstate_url = {:?}\n",
                path(&env.dir.join(format!("infra-repos-{zone}"))),
                path(&env.dir.join(format!("infra-work-{zone}"))),
                format!("{}?sslmode=disable", url(&dbs["tf"])),
            )
        };
        let infra_staging = write(&env, "infra-staging.toml", infra("staging"));
        let infra_production = write(&env, "infra-production.toml", infra("production"));

        // staging-verify and production-apply on the control plane; the
        // application as staging serves it.
        let app = axum::Router::new().fallback(|| async { "ok" });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let verify = write(
            &env,
            "staging-verify.toml",
            format!(
                "[daemon]\nzone = \"staging\"\n\n[verify]\nkubeconfig = {:?}\nnamespace = {:?}\nbase_url = {base_url:?}\n\
                 repos_dir = {:?}\nwork_dir = {:?}\npoll_ms = 100\nsoak_seconds = 1\nnoise_floor_ms = 1000.0\n",
                path(&staging.kubeconfig),
                staging.name,
                path(&env.dir.join("verify-repos")),
                path(&env.dir.join("verify-work")),
            ),
        );
        let apply = write(
            &env,
            "production-apply.toml",
            format!(
                "[daemon]\nzone = \"production\"\n\n[apply]\nkubeconfig = {:?}\nnamespace = {:?}\n\
                 repos_dir = {:?}\nwork_dir = {:?}\npoll_ms = 100\nmonitor_seconds = 1\n",
                path(&production.kubeconfig),
                production.name,
                path(&env.dir.join("apply-repos")),
                path(&env.dir.join("apply-work")),
            ),
        );

        // network: TransIP (API and nameservers), pebble, the load balancer.
        let key = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
            .output()
            .unwrap();
        assert!(key.status.success());
        std::fs::write(env.dir.join("transip.key"), &key.stdout).unwrap();
        let transip = FakeTransip::start("shop-ops", &key.stdout, &[DOMAIN], 2).await;
        transip.set_entries(DOMAIN, vec![entry("www", 3600, "A", "192.0.2.100")]);
        let pebble = Pebble::start(transip.nameservers[0], None, &[]).await;
        let lb = LoadBalancer::start(production.client.clone(), vec![production.name.clone()], None).await;
        let servers: Vec<String> = transip
            .nameservers
            .iter()
            .map(|a| format!("{:?}", a.to_string()))
            .collect();
        let network = write(
            &env,
            "network.toml",
            format!(
                "[daemon]\nzone = \"production\"\n\n[network]\nkubeconfig = {:?}\nnamespaces = [{:?}]\n\
                 record_namespace = {:?}\nrepos_dir = {:?}\nwork_dir = {:?}\npoll_ms = 100\n\n\
                 [network.transip]\napi_url = {:?}\nlogin = \"shop-ops\"\nprivate_key = {:?}\n\n\
                 [network.dns.nameservers]\n{DOMAIN:?} = [{}]\n\n\
                 [network.acme]\ndirectory_url = {:?}\nroot_ca_file = {:?}\n\n\
                 [network.load_balancer]\nhttp = {:?}\nhttps = {:?}\nca_file = {:?}\n",
                path(&production.kubeconfig),
                production.name,
                production.name,
                path(&env.dir.join("network-repos")),
                path(&env.dir.join("network-work")),
                transip.api_url,
                format!("file:{}", path(&env.dir.join("transip.key"))),
                servers.join(", "),
                pebble.directory_url,
                path(&pebble.listener_ca),
                lb.http.to_string(),
                lb.https.to_string(),
                path(&pebble.issuing_root),
            ),
        );

        // cdn: bunny.net's storage zone and an EU-only pull zone.
        let bunny = FakeBunny::start(
            "bunny-key",
            vec![ZoneSpec {
                pull_zone_id: PULL_ZONE,
                storage_zone: "shop-assets".into(),
                storage_password: "zone-password".into(),
            }],
        )
        .await;
        bunny.set_zone(
            PULL_ZONE,
            json!({"EnableGeoZoneUS": false, "EnableGeoZoneASIA": false, "EnableGeoZoneSA": false,
                   "EnableGeoZoneAF": false, "EnableOriginShield": true, "OriginShieldZoneCode": "FR"}),
        );
        let cdn = write(
            &env,
            "cdn.toml",
            format!(
                "[daemon]\nzone = \"production\"\n\n[cdn]\napi_url = {:?}\napi_key = \"bunny-key\"\nstorage_url = {:?}\n\
                 repos_dir = {:?}\nwork_dir = {:?}\npurge_wait_secs = 5\n\n[cdn.services.{SERVICE}]\n\
                 storage_zone = \"shop-assets\"\nstorage_password = \"zone-password\"\npull_zone_id = {PULL_ZONE}\n\
                 edge_url = {:?}\n",
                bunny.api_url,
                bunny.storage_url,
                path(&env.dir.join("cdn-repos")),
                path(&env.dir.join("cdn-work")),
                bunny.edge_url,
            ),
        );

        let daemons = vec![
            RealDaemon::start(&env, "container-build", "baton-container-build", build, &[]),
            RealDaemon::start(&env, "db-staging", "baton-db-migration", db_staging, &[]),
            RealDaemon::start(&env, "db-production", "baton-db-migration", db_production, &[]),
            RealDaemon::start(&env, "backup", "baton-backup", backup, &[]),
            RealDaemon::start(&env, "infra-staging", "baton-infrastructure", infra_staging, &[]),
            RealDaemon::start(&env, "infra-production", "baton-infrastructure", infra_production, &[]),
            RealDaemon::start(&env, "staging-verify", "baton-staging-verify", verify, &[]),
            RealDaemon::start(&env, "production-apply", "baton-production-apply", apply, &[]),
            RealDaemon::start(&env, "network", "baton-network", network, &[]),
            RealDaemon::start(&env, "cdn", "baton-cdn", cdn, &[]),
        ];
        Self {
            env,
            staging,
            production,
            containerd,
            base,
            transip,
            bunny,
            admin,
            dbs,
            _pebble: pebble,
            _lb: lb,
            _build_work: build_work,
            _daemons: daemons,
        }
    }

    /// Release `n` of the shop: application, migrations (the demo's), Terraform,
    /// manifests, checks, network and assets.
    fn release(&self, repo: &GitRepo, n: u32) -> String {
        let base = &self.base;
        repo.write("src/app.txt", format!("shop release {n}\n"));
        repo.write(
            "Dockerfile",
            format!(
                "FROM {base} AS build\nCOPY src /src\nRUN mkdir -p /out && cp /src/app.txt /out/app.txt\n\n\
                 FROM {base}\nCOPY --from=build /out/app.txt /app/app.txt\nCMD [\"/bin/cat\", \"/app/app.txt\"]\n"
            ),
        );
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/demo/commit-{n}/drizzle"));
        repo.remove_all("drizzle");
        copy_tree(&demo, &repo.path().join("drizzle"));
        repo.write(
            "main.tf",
            format!("terraform {{\n  backend \"pg\" {{}}\n}}\n\nresource \"terraform_data\" \"web\" {{\n  input = \"release-{n}\"\n}}\n"),
        );
        for zone in ["staging", "production"] {
            repo.write(
                &format!("deploy/{zone}/kustomization.yaml"),
                "resources:\n- deployment.yaml\n",
            );
            repo.write(
                &format!("deploy/{zone}/deployment.yaml"),
                format!(
                    "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    \
                     matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      \
                     containers:\n      - name: app\n        image: {IMAGE}:dev\n"
                ),
            );
        }
        repo.write(
            "deploy/verify.toml",
            "[[smoke]]\npath = \"/healthz\"\nbody_contains = \"ok\"\n\n[performance]\nrequests = 5\n",
        );
        let ns = &self.production.name;
        repo.write(
            "network/site.toml",
            format!(
                "[[record]]\ndomain = \"{DOMAIN}\"\nname = \"www\"\ntype = \"A\"\ncontent = \"192.0.2.{n}\"\nttl = 300\n\n\
                 [[ingress]]\nname = \"web\"\nnamespace = \"{ns}\"\nhosts = [\"{HOST}\"]\nservice = \"web\"\nport = 80\n\
                 certificate = \"web-tls\"\n\n[[pool]]\nname = \"web\"\nnamespace = \"{ns}\"\nselector = {{ app = \"web\" }}\n\
                 port = 80\ntarget_port = 8080\n\n[[policy]]\nname = \"web-in\"\nnamespace = \"{ns}\"\npods = {{ app = \"web\" }}\n\
                 ingress = [{{ from = [{{ pods = {{ app = \"lb\" }} }}], ports = [8080] }}]\n\n[[policy]]\nname = \"lb-out\"\n\
                 namespace = \"{ns}\"\npods = {{ app = \"lb\" }}\negress = [{{ to = [{{ pods = {{ app = \"web\" }} }}], ports = [8080] }}]\n\n[[flow]]\n\
                 from = {{ namespace = \"{ns}\", pods = {{ app = \"lb\" }} }}\nto = {{ namespace = \"{ns}\", pods = {{ app = \"web\" }} }}\n\
                 port = 8080\n"
            ),
        );
        repo.write(
            "cdn/edge-rules.toml",
            "[[rule]]\ndescription = \"hashed assets are immutable\"\naction = \"SetResponseHeader\"\n\
             parameters = [\"Cache-Control\", \"public, max-age=31536000, immutable\"]\n\
             triggers = [{ type = \"UrlExtension\", patterns = [\"js\", \"css\"] }]\n",
        );
        repo.remove_all("assets");
        let script = format!("console.log('release {n}');\n");
        let name = format!("app.{}.js", &hex::encode(sha2::Sha256::digest(script.as_bytes()))[..8]);
        repo.write(&format!("assets/js/{name}"), &script);
        repo.write("assets/index.html", format!("<script src=\"/js/{name}\"></script>\n"));
        repo.commit(&format!("release {n}"))
    }

    async fn deployed_image(&self, ns: &TestNamespace) -> String {
        let d = kube::Api::<Deployment>::namespaced(ns.client.clone(), &ns.name)
            .get("web")
            .await
            .unwrap();
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    }

    async fn columns(&self, zone: &str) -> Vec<String> {
        let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{}", self.dbs[zone]))
            .await
            .unwrap();
        let cols: Vec<String> = sqlx::query_scalar(
            "select column_name::text from information_schema.columns where table_name = 'customers' order by 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        cols
    }

    /// The `input` of `terraform_data.web` in `zone`'s Terraform state.
    async fn terraform_input(&self, zone: &str) -> String {
        let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{}", self.dbs["tf"]))
            .await
            .unwrap();
        let data: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select data from tf_{zone}_{SERVICE}.states where name = 'default'"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        let state: Value = serde_json::from_str(&data).unwrap();
        state["resources"][0]["instances"][0]["attributes"]["input"]["value"]
            .as_str()
            .or_else(|| state["resources"][0]["instances"][0]["attributes"]["input"].as_str())
            .unwrap_or_default()
            .to_owned()
    }

    fn www(&self) -> Vec<Entry> {
        self.transip
            .entries(DOMAIN)
            .into_iter()
            .filter(|e| e.name == "www")
            .collect()
    }

    fn enqueue(&self, repo: &GitRepo, commit: &str, number: u64, from: Option<&str>) -> uuid::Uuid {
        let changed = match from {
            None => repo.git(&["ls-files"]),
            Some(prev) => repo.git(&["diff", "--name-only", prev, commit]),
        };
        let paths: Vec<&str> = changed.lines().filter(|l| !l.is_empty()).collect();
        let mut ev = baton_tests::event(SERVICE, number as u8, &paths);
        ev["repository"] = json!(repo.url());
        ev["commit_sha"] = json!(commit);
        ev["pull_request"]["number"] = json!(number);
        self.env.enqueue(&ev)
    }
}

fn entry(name: &str, ttl: u32, kind: &str, content: &str) -> Entry {
    Entry {
        name: name.into(),
        expire: ttl,
        kind: kind.into(),
        content: content.into(),
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_pipeline_runs_on_the_eight_real_daemons_and_a_failed_production_rollout_is_compensated_everywhere() {
    let w = World::new().await;
    let _scheduler = w.env.scheduler("scheduler").await;
    let repo = GitRepo::new();

    // Release 1: all nine steps.
    let first = w.release(&repo, 1);
    let run = w.enqueue(&repo, &first, 1, None);
    let v = w.env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "succeeded", "{}", w.env.diagnostics());
    let mut steps: Vec<(&str, &str)> = v
        .steps
        .iter()
        .filter(|s| s.included)
        .map(|s| (s.id.as_str(), s.status.as_str()))
        .collect();
    steps.sort();
    assert_eq!(
        steps,
        [
            ("apply.production", "succeeded"),
            ("backup.post", "succeeded"),
            ("backup.pre", "succeeded"),
            ("build", "succeeded"),
            ("cdn", "succeeded"),
            ("db.production", "succeeded"),
            ("db.staging", "succeeded"),
            ("infra.production", "succeeded"),
            ("infra.production.plan", "succeeded"),
            ("infra.staging", "succeeded"),
            ("infra.staging.plan", "succeeded"),
            ("network", "succeeded"),
            ("verify.staging", "succeeded"),
        ],
        "{}",
        w.env.diagnostics()
    );
    let digest1 = v.step("build").unwrap().outputs["image_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    // The image in containerd, the same one staging verified and production runs.
    assert!(w.containerd.images().contains(&digest1), "{}", w.containerd.images());
    assert_eq!(w.deployed_image(&w.staging).await, format!("{IMAGE}@{digest1}"));
    assert_eq!(w.deployed_image(&w.production).await, format!("{IMAGE}@{digest1}"));
    // Migrations in both databases, Terraform in both states, DNS, the
    // certificate, the assets at the edge, the backups.
    assert_eq!(w.columns("staging").await, ["created_at", "email", "id"]);
    assert_eq!(w.columns("production").await, ["created_at", "email", "id"]);
    assert_eq!(w.terraform_input("staging").await, "release-1");
    assert_eq!(w.terraform_input("production").await, "release-1");
    assert_eq!(w.www(), [entry("www", 300, "A", "192.0.2.1")]);
    let tls = kube::Api::<Secret>::namespaced(w.production.client.clone(), &w.production.name)
        .get("web-tls")
        .await
        .unwrap();
    assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
    let index1 = w.bunny.file("shop-assets", "index.html").expect("index.html uploaded");
    let backups = std::fs::read_dir(w.env.dir.join("backups/primary"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(backups > 0, "no backup in the primary location");
    // The gates decided on real facts.
    let reasons: Vec<String> = v
        .history
        .iter()
        .filter(|h| h.kind == "gates_passed")
        .flat_map(|h| h.detail["gates"].as_array().cloned().unwrap_or_default())
        .map(|g| {
            format!(
                "{}: {}",
                g["gate"].as_str().unwrap_or(""),
                g["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        format!("image-match: production gets {digest1}"),
        "backup-verified: ".to_owned(),
        "rollback-tested: ".to_owned(),
    ] {
        assert!(
            reasons.iter().any(|r| r.starts_with(&want)),
            "{want:?} not in {reasons:#?}"
        );
    }

    // Release 2 crash-loops on production's node: once the build reports its
    // image, production's node is told so (staging's runs it fine).
    let second = w.release(&repo, 2);
    let run = w.enqueue(&repo, &second, 2, Some(&first));
    let v = w.env.wait_step(run, "build", "succeeded", RUN_TIMEOUT).await;
    let digest2 = v.step("build").unwrap().outputs["image_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(digest2, digest1);
    w.production.behave(&format!("{IMAGE}@{digest2}"), Behaviour::CrashLoop);
    let v = w.env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(v.status, "rolled_back", "{}", w.env.diagnostics());
    let apply = v.step("apply.production").unwrap();
    assert_eq!(apply.status, "compensated", "{apply:?}");
    // Undone in reverse order across every role that changed something.
    let order: Vec<String> = v
        .history
        .iter()
        .filter(|h| h.kind == "step_compensated")
        .filter_map(|h| h.step_id.clone())
        .collect();
    let pos = |s: &str| {
        order
            .iter()
            .position(|o| o == s)
            .unwrap_or_else(|| panic!("{s} not compensated: {order:?}"))
    };
    assert!(pos("verify.staging") < pos("infra.production"), "{order:?}");
    assert!(pos("infra.production") < pos("infra.staging"), "{order:?}");
    assert!(pos("infra.staging") < pos("db.production"), "{order:?}");
    assert!(pos("db.production") < pos("db.staging"), "{order:?}");
    for s in ["cdn", "network"] {
        assert!(pos(s) < pos("verify.staging"), "{s} after verify.staging: {order:?}");
    }
    // The real systems are back at release 1.
    assert_eq!(w.deployed_image(&w.production).await, format!("{IMAGE}@{digest1}"));
    assert_eq!(w.deployed_image(&w.staging).await, format!("{IMAGE}@{digest1}"));
    assert_eq!(w.columns("production").await, ["created_at", "email", "id"]);
    assert_eq!(w.columns("staging").await, ["created_at", "email", "id"]);
    assert_eq!(w.terraform_input("production").await, "release-1");
    assert_eq!(w.terraform_input("staging").await, "release-1");
    assert_eq!(w.www(), [entry("www", 300, "A", "192.0.2.1")]);
    assert_eq!(w.bunny.file("shop-assets", "index.html"), Some(index1));
    // The image of release 2 was built and stays (no compensation for a build).
    assert!(w.containerd.images().contains(&digest2));
    let _ = &w.admin;
}
