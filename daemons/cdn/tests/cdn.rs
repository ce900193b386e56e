//! The cdn role against the bunny.net stand-in (`baton_shared::fake_bunny`),
//! which speaks bunny.net's Edge Storage and core APIs and serves an edge with
//! a cache: uploads, purges and verification are real HTTP.

use baton_cdn::{Cdn, CdnConfig, DeployOutputs, RestoreOutputs, ServiceZone};
use baton_shared::fake_bunny::{FakeBunny, ZoneSpec};
use baton_shared::protocol::{Fields, JobKind, StepJob};
use baton_shared::secret::Secret;
use baton_shared::testing::{GitRepo, TempDir};
use serde_json::{Value, json};
use sha2::Digest;
use uuid::Uuid;

const ZONE: u64 = 4242;

const RULES: &str = r#"
[[rule]]
description = "hashed assets are immutable"
action = "SetResponseHeader"
parameters = ["Cache-Control", "public, max-age=31536000, immutable"]
triggers = [{ type = "UrlExtension", patterns = ["js", "css"] }]
"#;

struct Fixture {
    bunny: FakeBunny,
    repo: GitRepo,
    _dirs: TempDir,
    cdn: Cdn,
}

/// `name.<first 8 hex of its SHA-256>.ext`.
fn hashed(stem: &str, ext: &str, content: &str) -> String {
    let sha = hex::encode(sha2::Sha256::digest(content.as_bytes()));
    format!("{stem}.{}.{ext}", &sha[..8])
}

fn parse<T: serde::de::DeserializeOwned>(fields: Fields) -> T {
    serde_json::from_value(Value::Object(fields)).unwrap()
}

impl Fixture {
    async fn new() -> Self {
        let bunny = FakeBunny::start(
            "account-key",
            vec![ZoneSpec {
                pull_zone_id: ZONE,
                storage_zone: "shop-assets".into(),
                storage_password: "zone-password".into(),
            }],
        )
        .await;
        let dirs = TempDir::new("cdn");
        let mut config = CdnConfig {
            api_url: bunny.api_url.clone(),
            api_key: Secret::new("account-key".into()),
            storage_url: bunny.storage_url.clone(),
            repos_dir: dirs.path().join("repos"),
            work_dir: dirs.path().join("work"),
            purge_wait_secs: 1,
            ..CdnConfig::default()
        };
        config.services.insert(
            "shop-api".into(),
            ServiceZone {
                storage_zone: "shop-assets".into(),
                storage_password: Secret::new("zone-password".into()),
                pull_zone_id: ZONE,
                edge_url: bunny.edge_url.clone(),
            },
        );
        config.validate().unwrap();
        Self {
            cdn: Cdn::new(config).unwrap(),
            bunny,
            repo: GitRepo::new(),
            _dirs: dirs,
        }
    }

    /// The pull zone as the seed wants it (someone set it up right).
    fn eu_only(&self) {
        self.bunny.set_zone(
            ZONE,
            json!({"EnableGeoZoneUS": false, "EnableGeoZoneASIA": false, "EnableGeoZoneSA": false,
                   "EnableGeoZoneAF": false, "EnableOriginShield": true, "OriginShieldZoneCode": "FR"}),
        );
    }

    /// A version of the site: one script and an index pointing at it.
    fn site(&self, script: &str) -> String {
        let name = hashed("app", "js", script);
        self.repo.remove_all("assets");
        self.repo.write(&format!("assets/js/{name}"), script);
        self.repo
            .write("assets/index.html", format!("<script src=\"/js/{name}\"></script>\n"));
        name
    }

    fn job(&self, commit: &str, run: Uuid) -> StepJob {
        let mut job = StepJob::example("production", "cdn", "deploy");
        job.run_id = run;
        job.step_id = "cdn".to_owned();
        job.deploy.service = "shop-api".to_owned();
        job.deploy.repository = self.repo.url();
        job.deploy.commit_sha = commit.to_owned();
        job
    }

    async fn deploy(&self, job: &StepJob) -> Result<DeployOutputs, String> {
        self.cdn
            .run(job)
            .await
            .map(parse)
            .map_err(|e| format!("{}: {e}", e.code()))
    }

    async fn edge(&self, path: &str) -> String {
        reqwest::get(format!("{}/{path}", self.bunny.edge_url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn assets_go_up_once_are_verified_at_the_edge_and_the_previous_version_comes_back() {
    let fx = Fixture::new().await;
    fx.repo.write("cdn/edge-rules.toml", RULES);
    let first = fx.site("console.log(1)\n");
    let c1 = fx.repo.commit("first");
    // The zone routes everywhere without a shield: the step may correct it.
    let job = fx.job(&c1, Uuid::new_v4()).with_param("fix_zone_settings", true);
    let out = fx.deploy(&job).await.unwrap();
    assert_eq!(out.uploaded.len(), 2, "{out:?}");
    assert_eq!(out.zone.previous.as_ref().unwrap()["EnableGeoZoneUS"], true);
    assert!(
        out.zone.fixed.contains(&"EnableOriginShield".to_owned()),
        "{:?}",
        out.zone
    );
    let zone = fx.bunny.pull_zone(ZONE);
    assert_eq!(
        (zone["EnableGeoZoneUS"].clone(), zone["OriginShieldZoneCode"].clone()),
        (json!(false), json!("FR"))
    );
    assert_eq!(out.rules.len(), 1);
    assert!(out.rules[0].previous.is_none());
    let script = out.verified.iter().find(|v| v.url.ends_with(&first)).unwrap();
    assert_eq!(script.cache_control, "public, max-age=31536000, immutable");
    assert!(script.content_type.starts_with("text/javascript"));

    // The same commit again: nothing to upload.
    let again = fx.deploy(&fx.job(&c1, Uuid::new_v4())).await.unwrap();
    assert!(again.uploaded.is_empty() && again.skipped.len() == 2, "{again:?}");

    let second = fx.site("console.log(2)\n");
    let c2 = fx.repo.commit("second");
    let run = Uuid::new_v4();
    let out = fx.deploy(&fx.job(&c2, run)).await.unwrap();
    assert_eq!(
        out.uploaded.iter().map(|a| a.path.as_str()).collect::<Vec<_>>(),
        [format!("js/{second}").as_str(), "index.html"]
    );
    assert!(out.entries[0].previous_sha256.is_some());
    assert!(fx.bunny.purged().iter().any(|u| u.ends_with("/index.html")));
    assert!(fx.edge("index.html").await.contains(&second));

    // A later step fails: the previous version is served again.
    let mut undo = fx.job(&c2, run);
    undo.kind = JobKind::Compensate;
    undo.action = "restore-previous".to_owned();
    let back: RestoreOutputs = parse(fx.cdn.run(&undo).await.unwrap());
    assert_eq!(back.entries_restored, ["index.html"]);
    assert!(fx.edge("index.html").await.contains(&first));
    // Immutable: both scripts stay on the origin.
    assert!(fx.bunny.file("shop-assets", &format!("js/{first}")).is_some());
    assert!(fx.bunny.file("shop-assets", &format!("js/{second}")).is_some());
}

#[tokio::test]
async fn a_name_whose_hash_is_not_its_content_is_refused_before_anything_is_uploaded() {
    let fx = Fixture::new().await;
    fx.eu_only();
    fx.repo.write("assets/app.0123abcd.js", "console.log('tampered')\n");
    fx.repo.write("assets/logo.svg", "<svg/>\n");
    let c = fx.repo.commit("bad names");
    let e = fx.deploy(&fx.job(&c, Uuid::new_v4())).await.unwrap_err();
    assert!(
        e.starts_with("asset_verification_failed: asset verification failed before upload:"),
        "{e}"
    );
    assert!(
        e.contains("assets/app.0123abcd.js: its name says content hash 0123abcd"),
        "{e}"
    );
    assert!(e.contains("assets/logo.svg: neither content-hashed"), "{e}");
    assert!(fx.bunny.file("shop-assets", "app.0123abcd.js").is_none());
}

#[tokio::test]
async fn routing_outside_the_eu_is_refused_unless_the_step_may_fix_it() {
    let fx = Fixture::new().await;
    fx.site("x\n");
    let c = fx.repo.commit("site");
    let e = fx.deploy(&fx.job(&c, Uuid::new_v4())).await.unwrap_err();
    assert!(
        e.starts_with("zone_settings: pull zone 4242: routing includes North America (EnableGeoZoneUS)"),
        "{e}"
    );
    assert!(
        e.contains("origin shield is off") && e.contains("set the step's fix_zone_settings"),
        "{e}"
    );
    assert_eq!(fx.bunny.pull_zone(ZONE)["EnableGeoZoneUS"], true, "nothing changed");
}

#[tokio::test]
async fn an_immutable_path_with_other_content_is_never_overwritten() {
    let fx = Fixture::new().await;
    fx.eu_only();
    fx.repo.write("cdn/edge-rules.toml", RULES);
    let name = fx.site("console.log(3)\n");
    let c = fx.repo.commit("site");
    fx.bunny.put_file(
        "shop-assets",
        &format!("js/{name}"),
        b"something else",
        "text/javascript",
    );
    let e = fx.deploy(&fx.job(&c, Uuid::new_v4())).await.unwrap_err();
    assert_eq!(
        e,
        format!(
            "immutable_overwrite: immutable assets would be overwritten with other content: shop-assets/js/{name}; nothing was uploaded"
        )
    );
    assert_eq!(
        fx.bunny.file("shop-assets", &format!("js/{name}")).unwrap(),
        b"something else"
    );
}

#[tokio::test]
async fn an_edge_rule_with_an_unknown_action_is_a_syntax_error_naming_it() {
    let fx = Fixture::new().await;
    fx.eu_only();
    fx.site("y\n");
    fx.repo.write(
        "cdn/edge-rules.toml",
        "[[rule]]\ndescription = \"cache\"\naction = \"OverrideCache\"\ntriggers = [{ type = \"Url\", patterns = [\"*\"] }]\n",
    );
    let c = fx.repo.commit("bad rule");
    let e = fx.deploy(&fx.job(&c, Uuid::new_v4())).await.unwrap_err();
    assert_eq!(
        e,
        "edge_rules_invalid: edge rules syntax error: cdn/edge-rules.toml: rule 1 (\"cache\"): unknown action \"OverrideCache\"; nothing was changed"
    );
}

#[tokio::test]
async fn a_purge_that_leaves_the_old_entry_document_at_the_edge_blocks_the_step() {
    let fx = Fixture::new().await;
    fx.eu_only();
    fx.repo.write("cdn/edge-rules.toml", RULES);
    fx.site("console.log(4)\n");
    let c1 = fx.repo.commit("first");
    fx.deploy(&fx.job(&c1, Uuid::new_v4())).await.unwrap();
    // The edge now caches index.html; purges stop taking effect.
    fx.bunny.ignore_purges(true);
    fx.site("console.log(5)\n");
    let c2 = fx.repo.commit("second");
    let e = fx.deploy(&fx.job(&c2, Uuid::new_v4())).await.unwrap_err();
    assert!(
        e.starts_with("cache_invalidation_incomplete: cache invalidation incomplete: http://"),
        "{e}"
    );
    assert!(
        e.contains("/index.html still serves SHA-256") && e.contains("CDN-Cache HIT"),
        "{e}"
    );
}

#[tokio::test]
async fn hashed_assets_served_without_an_immutable_cache_control_fail_verification() {
    let fx = Fixture::new().await;
    fx.eu_only();
    let name = fx.site("console.log(6)\n");
    let c = fx.repo.commit("no rules");
    let e = fx.deploy(&fx.job(&c, Uuid::new_v4())).await.unwrap_err();
    assert!(
        e.starts_with("asset_verification_failed: asset verification failed: http://"),
        "{e}"
    );
    assert!(
        e.contains(&format!("/js/{name}: Cache-Control \"public, max-age=180\"")),
        "{e}"
    );
}
