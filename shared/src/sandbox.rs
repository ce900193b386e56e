//! Everything the eight role daemons work on, on one machine, for the seed
//! pipeline's end-to-end test and `baton demo` (features `testing`, `kube`):
//! buildah storage with a base image and a containerd of its own (build),
//! PostgreSQL databases the caller made (migrations, backups, Terraform's
//! state), a Kubernetes control plane with a namespace per zone and a
//! simulated node (staging-verify, production-apply, network), pebble (the
//! certificate), and stand-ins at their network boundaries for what cannot run
//! here: TransIP (its API and authoritative DNS), bunny.net (storage, pull
//! zone, caching edge), the load balancer and the application staging serves.
//! It writes each daemon's configuration, with the waits shortened (a 1 s soak
//! and watch) — [`Sandbox::shortened`] says which — and a shop repository's
//! releases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::Digest;

use crate::fake_bunny::{FakeBunny, ZoneSpec};
use crate::fake_lb::LoadBalancer;
use crate::fake_transip::{Entry, FakeTransip};
use crate::pebble::Pebble;
use crate::test_cluster::TestNamespace;
use crate::testing::{Containerd, TempDir, busybox_base};

/// The service the sandbox deploys.
pub const SERVICE: &str = "shop";
/// Its image's name (`image_prefix` + service).
pub const IMAGE: &str = "registry.test/shop/shop";
/// Its domain at TransIP, and the host its ingress serves.
pub const DOMAIN: &str = "example.test";
pub const HOST: &str = "www.example.test";
/// bunny.net: the pull zone and storage zone of its assets.
pub const PULL_ZONE: u64 = 7;
pub const STORAGE_ZONE: &str = "shop-assets";

/// The databases the daemons use (made by the caller), on `server`
/// (`postgres://user@host:port`).
pub struct Databases {
    pub server: String,
    pub staging: String,
    pub production: String,
    pub terraform: String,
}

impl Databases {
    pub fn url(&self, db: &str) -> String {
        format!("{}/{db}", self.server)
    }
}

/// One daemon process to start: `binary --config config`.
pub struct DaemonSpec {
    pub label: String,
    pub binary: &'static str,
    pub zone: &'static str,
    pub config: PathBuf,
}

/// The running sandbox; everything stops when it is dropped.
pub struct Sandbox {
    pub staging: TestNamespace,
    pub production: TestNamespace,
    pub containerd: Containerd,
    /// The base image, pinned by digest.
    pub base: String,
    pub transip: FakeTransip,
    pub bunny: FakeBunny,
    pub pebble: Pebble,
    pub lb: LoadBalancer,
    pub daemons: Vec<DaemonSpec>,
    _build_work: TempDir,
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn write(dir: &Path, name: &str, text: String) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, text).expect("write a daemon's configuration");
    file
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a folder");
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let e = e.expect("a folder entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("a file type").is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy a file");
        }
    }
}

impl Sandbox {
    /// Starts everything and writes the daemons' configurations into `dir`.
    /// `backup_binary` makes the backups' age key (`--keygen`).
    pub async fn start(dir: &Path, dbs: &Databases, backup_binary: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("create the sandbox's folder");
        let staging = TestNamespace::new("shop-staging").await;
        let production = TestNamespace::new("shop-production").await;
        let admin_url = dbs.url("postgres");
        let mut daemons = Vec::new();
        let mut daemon = |label: &str, binary: &'static str, zone: &'static str, text: String| {
            let config = write(
                dir,
                &format!("{label}.toml"),
                format!("[daemon]\nzone = {zone:?}\n\n{text}"),
            );
            daemons.push(DaemonSpec {
                label: label.to_owned(),
                binary,
                zone,
                config,
            });
        };

        // container-build: buildah storage with the base image, containerd.
        let build_work = TempDir::new("sandbox-build");
        let base = busybox_base(build_work.path());
        let containerd = Containerd::start();
        daemon(
            "container-build",
            "baton-container-build",
            "ci",
            format!(
                "[build]\nrepos_dir = {:?}\nwork_dir = {:?}\nimage_prefix = \"registry.test/shop\"\n\n\
                 [build.buildah]\nstorage_root = {:?}\nrun_root = {:?}\n\n[build.containerd]\naddress = {:?}\n\n\
                 # No vulnerability database can be downloaded here: trivy runs its offline scanners.\n\
                 [build.scan]\ncommand = [\"trivy\", \"image\", \"--input\", \"{{layout}}\", \"--format\", \"json\", \"--scanners\", \"secret\", \"--quiet\"]\n",
                path(&build_work.path().join("repos")),
                path(build_work.path()),
                path(&build_work.path().join("storage")),
                path(&build_work.path().join("run")),
                path(&containerd.socket),
            ),
        );

        // db-migration per zone; backup in production.
        for (zone, db) in [("staging", &dbs.staging), ("production", &dbs.production)] {
            daemon(
                &format!("db-migration-{zone}"),
                "baton-db-migration",
                if zone == "staging" { "staging" } else { "production" },
                format!(
                    "[migration]\nrepos_dir = {:?}\nadmin_url = {admin_url:?}\n\n[migration.databases]\n{SERVICE} = {:?}\n{}",
                    path(&dir.join(format!("migration-repos-{zone}"))),
                    dbs.url(db),
                    if zone == "staging" {
                        // The seed: staging's data is an anonymised snapshot of production's.
                        format!(
                            "\n[[migration.data_checks.{SERVICE}]]\nname = \"no customer e-mail in production's domain\"\n\
                             query = \"select count(*) from customers where email like '%@shop.example'\"\n"
                        )
                    } else {
                        String::new()
                    },
                ),
            );
        }
        let age = std::process::Command::new(backup_binary)
            .arg("--keygen")
            .arg(dir.join("age.txt"))
            .output()
            .unwrap_or_else(|e| panic!("{} --keygen: {e}", backup_binary.display()));
        assert!(age.status.success(), "baton-backup --keygen failed");
        let recipient = String::from_utf8_lossy(&age.stdout).trim().to_owned();
        daemon(
            "backup-production",
            "baton-backup",
            "production",
            format!(
                "[backup]\nadmin_url = {admin_url:?}\nrecipients = [{recipient:?}]\nidentity_file = {:?}\n\n\
                 [backup.primary]\npath = {:?}\nregion = \"nl-ams1\"\n\n[backup.copy]\npath = {:?}\nregion = \"nl-ams2\"\n\n\
                 [backup.databases]\n{SERVICE} = {:?}\n\n[backup.schedule]\nenabled = false\n",
                path(&dir.join("age.txt")),
                path(&dir.join("backups/primary")),
                path(&dir.join("backups/copy")),
                dbs.url(&dbs.production),
            ),
        );

        // infrastructure per zone, state in PostgreSQL (a schema per zone).
        for zone in ["staging", "production"] {
            daemon(
                &format!("infrastructure-{zone}"),
                "baton-infrastructure",
                if zone == "staging" { "staging" } else { "production" },
                format!(
                    "[infrastructure]\nrepos_dir = {:?}\nwork_dir = {:?}\nstate_url = {:?}\n",
                    path(&dir.join(format!("infra-repos-{zone}"))),
                    path(&dir.join(format!("infra-work-{zone}"))),
                    format!("{}?sslmode=disable", dbs.url(&dbs.terraform)),
                ),
            );
        }

        // staging-verify and production-apply; the application staging serves.
        let app = axum::Router::new().fallback(|| async { "ok" });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base_url = format!("http://{}", listener.local_addr().expect("bound"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        daemon(
            "staging-verify",
            "baton-staging-verify",
            "staging",
            format!(
                "[verify]\nkubeconfig = {:?}\nnamespace = {:?}\nbase_url = {base_url:?}\nrepos_dir = {:?}\nwork_dir = {:?}\n\
                 poll_ms = 100\n# Shortened: the seed's soak is 15 minutes.\nsoak_seconds = 1\nnoise_floor_ms = 1000.0\n",
                path(&staging.kubeconfig),
                staging.name,
                path(&dir.join("verify-repos")),
                path(&dir.join("verify-work")),
            ),
        );
        daemon(
            "production-apply",
            "baton-production-apply",
            "production",
            format!(
                "[apply]\nkubeconfig = {:?}\nnamespace = {:?}\nrepos_dir = {:?}\nwork_dir = {:?}\npoll_ms = 100\n\
                 # Shortened: the seed's watch is 15 minutes.\nmonitor_seconds = 1\n",
                path(&production.kubeconfig),
                production.name,
                path(&dir.join("apply-repos")),
                path(&dir.join("apply-work")),
            ),
        );

        // network: TransIP (API and nameservers), pebble, the load balancer.
        let key = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
            .output()
            .expect("openssl makes the TransIP key pair");
        assert!(key.status.success(), "openssl genpkey failed");
        std::fs::write(dir.join("transip.key"), &key.stdout).expect("write the TransIP key");
        let transip = FakeTransip::start("shop-ops", &key.stdout, &[DOMAIN], 2).await;
        // What was there before Baton managed it.
        transip.set_entries(
            DOMAIN,
            vec![Entry {
                name: "www".into(),
                expire: 3600,
                kind: "A".into(),
                content: "192.0.2.100".into(),
            }],
        );
        let pebble = Pebble::start(transip.nameservers[0], None, &[]).await;
        let lb = LoadBalancer::start(production.client.clone(), vec![production.name.clone()], None).await;
        let servers: Vec<String> = transip
            .nameservers
            .iter()
            .map(|a| format!("{:?}", a.to_string()))
            .collect();
        daemon(
            "network-production",
            "baton-network",
            "production",
            format!(
                "[network]\nkubeconfig = {:?}\nnamespaces = [{:?}]\nrecord_namespace = {:?}\nrepos_dir = {:?}\n\
                 work_dir = {:?}\npoll_ms = 100\n\n[network.transip]\napi_url = {:?}\nlogin = \"shop-ops\"\n\
                 private_key = {:?}\n\n[network.dns.nameservers]\n{DOMAIN:?} = [{}]\n\n\
                 [network.acme]\ndirectory_url = {:?}\nroot_ca_file = {:?}\n\n\
                 [network.load_balancer]\nhttp = {:?}\nhttps = {:?}\nca_file = {:?}\n",
                path(&production.kubeconfig),
                production.name,
                production.name,
                path(&dir.join("network-repos")),
                path(&dir.join("network-work")),
                transip.api_url,
                format!("file:{}", path(&dir.join("transip.key"))),
                servers.join(", "),
                pebble.directory_url,
                path(&pebble.listener_ca),
                lb.http.to_string(),
                lb.https.to_string(),
                path(&pebble.issuing_root),
            ),
        );

        // cdn: the storage zone and an EU-only pull zone with an EU shield.
        let bunny = FakeBunny::start(
            "bunny-key",
            vec![ZoneSpec {
                pull_zone_id: PULL_ZONE,
                storage_zone: STORAGE_ZONE.into(),
                storage_password: "zone-password".into(),
            }],
        )
        .await;
        bunny.set_zone(
            PULL_ZONE,
            json!({"EnableGeoZoneUS": false, "EnableGeoZoneASIA": false, "EnableGeoZoneSA": false,
                   "EnableGeoZoneAF": false, "EnableOriginShield": true, "OriginShieldZoneCode": "FR"}),
        );
        daemon(
            "cdn-production",
            "baton-cdn",
            "production",
            format!(
                "[cdn]\napi_url = {:?}\napi_key = \"bunny-key\"\nstorage_url = {:?}\nrepos_dir = {:?}\nwork_dir = {:?}\n\
                 purge_wait_secs = 5\n\n[cdn.services.{SERVICE}]\nstorage_zone = {STORAGE_ZONE:?}\n\
                 storage_password = \"zone-password\"\npull_zone_id = {PULL_ZONE}\nedge_url = {:?}\n",
                bunny.api_url,
                bunny.storage_url,
                path(&dir.join("cdn-repos")),
                path(&dir.join("cdn-work")),
                bunny.edge_url,
            ),
        );

        Self {
            staging,
            production,
            containerd,
            base,
            transip,
            bunny,
            pebble,
            lb,
            daemons,
            _build_work: build_work,
        }
    }

    /// What the sandbox shortens or stands in for, one line each.
    pub fn shortened(&self) -> Vec<String> {
        vec![
            "staging soak 1 s (staging-verify soak_seconds; the seed's 15 min stays in seed.toml)".to_owned(),
            "production watch 1 s (production-apply monitor_seconds; the seed's 15 min)".to_owned(),
            format!(
                "Kubernetes: kube-apiserver and kube-controller-manager on etcd; namespaces {} and {} on a simulated node",
                self.staging.name, self.production.name
            ),
            format!(
                "TransIP stand-in: API {}, nameservers {:?}",
                self.transip.api_url, self.transip.nameservers
            ),
            format!(
                "bunny.net stand-in: API {}, edge {}",
                self.bunny.api_url, self.bunny.edge_url
            ),
            format!("pebble (Let's Encrypt's test CA): {}", self.pebble.directory_url),
            format!("load balancer: https {} http {}", self.lb.https, self.lb.http),
        ]
    }

    /// Writes release `n` of the shop into the git work tree `repo`:
    /// application and Dockerfile, the migrations of `examples/commit-<n>`,
    /// Terraform (one resource), manifests and checks, the network folder and
    /// content-hashed assets with their edge rule.
    pub fn release(&self, repo: &Path, examples: &Path, n: u32) {
        let w = |rel: &str, text: String| {
            let p = repo.join(rel);
            std::fs::create_dir_all(p.parent().expect("a parent")).expect("create a folder");
            std::fs::write(p, text).expect("write a file");
        };
        let base = &self.base;
        w("src/app.txt", format!("shop release {n}\n"));
        w(
            "Dockerfile",
            format!(
                "FROM {base} AS build\nCOPY src /src\nRUN mkdir -p /out && cp /src/app.txt /out/app.txt\n\n\
                 FROM {base}\nCOPY --from=build /out/app.txt /app/app.txt\nCMD [\"/bin/cat\", \"/app/app.txt\"]\n"
            ),
        );
        let _ = std::fs::remove_dir_all(repo.join("drizzle"));
        copy_tree(&examples.join(format!("commit-{n}/drizzle")), &repo.join("drizzle"));
        self.infrastructure(repo, n, 0);
        for zone in ["staging", "production"] {
            w(
                &format!("deploy/{zone}/kustomization.yaml"),
                "resources:\n- deployment.yaml\n".to_owned(),
            );
            w(
                &format!("deploy/{zone}/deployment.yaml"),
                format!(
                    "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    \
                     matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      \
                     containers:\n      - name: app\n        image: {IMAGE}:dev\n"
                ),
            );
        }
        w(
            "deploy/verify.toml",
            "[[smoke]]\npath = \"/healthz\"\nbody_contains = \"ok\"\n\n[performance]\nrequests = 5\n".to_owned(),
        );
        let ns = &self.production.name;
        w(
            "network/site.toml",
            format!(
                "[[record]]\ndomain = \"{DOMAIN}\"\nname = \"www\"\ntype = \"A\"\ncontent = \"192.0.2.{n}\"\nttl = 300\n\n\
                 [[ingress]]\nname = \"web\"\nnamespace = \"{ns}\"\nhosts = [\"{HOST}\"]\nservice = \"web\"\nport = 80\n\
                 certificate = \"web-tls\"\n\n[[pool]]\nname = \"web\"\nnamespace = \"{ns}\"\nselector = {{ app = \"web\" }}\n\
                 port = 80\ntarget_port = 8080\n\n[[policy]]\nname = \"web-in\"\nnamespace = \"{ns}\"\npods = {{ app = \"web\" }}\n\
                 ingress = [{{ from = [{{ pods = {{ app = \"lb\" }} }}], ports = [8080] }}]\n\n[[policy]]\nname = \"lb-out\"\n\
                 namespace = \"{ns}\"\npods = {{ app = \"lb\" }}\negress = [{{ to = [{{ pods = {{ app = \"web\" }} }}], ports = [8080] }}]\n\n\
                 [[flow]]\nfrom = {{ namespace = \"{ns}\", pods = {{ app = \"lb\" }} }}\n\
                 to = {{ namespace = \"{ns}\", pods = {{ app = \"web\" }} }}\nport = 8080\n"
            ),
        );
        w(
            "cdn/edge-rules.toml",
            "[[rule]]\ndescription = \"hashed assets are immutable\"\naction = \"SetResponseHeader\"\n\
             parameters = [\"Cache-Control\", \"public, max-age=31536000, immutable\"]\n\
             triggers = [{ type = \"UrlExtension\", patterns = [\"js\", \"css\"] }]\n"
                .to_owned(),
        );
        let _ = std::fs::remove_dir_all(repo.join("assets"));
        let script = format!("console.log('release {n}');\n");
        let name = format!("app.{}.js", &hex::encode(sha2::Sha256::digest(script.as_bytes()))[..8]);
        w(&format!("assets/js/{name}"), script);
        w("assets/index.html", format!("<script src=\"/js/{name}\"></script>\n"));
    }

    /// Writes the Terraform of release `n` with `extra` more resources.
    pub fn infrastructure(&self, repo: &Path, n: u32, extra: u32) {
        let mut tf = format!(
            "terraform {{\n  backend \"pg\" {{}}\n}}\n\nresource \"terraform_data\" \"web\" {{\n  input = \"release-{n}\"\n}}\n"
        );
        if extra > 0 {
            tf.push_str(&format!(
                "\nresource \"terraform_data\" \"worker\" {{\n  count = {extra}\n  input = \"worker-${{count.index}}\"\n}}\n"
            ));
        }
        std::fs::write(repo.join("main.tf"), tf).expect("write main.tf");
    }

    /// The `input` of `terraform_data.web` in `zone`'s state (schema
    /// `tf_<zone>_shop` of the Terraform database).
    pub fn terraform_input_sql(zone: &str) -> String {
        format!("select data from tf_{zone}_{SERVICE}.states where name = 'default'")
    }

    /// The DNS entries of `www` now.
    pub fn www(&self) -> Vec<Entry> {
        self.transip
            .entries(DOMAIN)
            .into_iter()
            .filter(|e| e.name == "www")
            .collect()
    }

    /// The daemons by label, for looking one up.
    pub fn daemon_configs(&self) -> BTreeMap<&str, &Path> {
        self.daemons
            .iter()
            .map(|d| (d.label.as_str(), d.config.as_path()))
            .collect()
    }
}
