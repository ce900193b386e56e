//! The `cdn` role: `deploy` and the `restore-previous` compensation (see the
//! crate documentation).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use baton_shared::git::{self, GitCache};
use baton_shared::kit;
use baton_shared::protocol::{self, Fields, JobKind, StepJob};
use baton_shared::roles;
use baton_shared::runtime::{BoxFuture, ExecContext, Outcome, Role};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;

use crate::assets::{self, Asset, AssetRef};
use crate::bunny::Bunny;
use crate::config::{CdnConfig, ServiceZone};
use crate::error::Error;
use crate::rules::{self, Rule};

/// Where the daemon keeps its own files on a storage zone: copies of entry
/// documents by content, and each step's record.
const OWN: &str = ".baton";

/// The step's parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The static assets, relative to the repository root.
    pub assets_dir: String,
    /// Files that are not content-hashed and may change (globs under the
    /// assets folder): the documents that point at hashed assets.
    pub entry_documents: Vec<String>,
    /// The edge rules file, relative to the repository root (none: rules are
    /// not managed by this step).
    pub edge_rules_file: String,
    /// Correct the pull zone's routing and shield instead of refusing.
    pub fix_zone_settings: bool,
    /// The origin shield location (bunny.net's code; `FR` is in the EU).
    pub shield_zone: String,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            assets_dir: "assets".to_owned(),
            entry_documents: vec![
                "index.html".to_owned(),
                "**/index.html".to_owned(),
                "asset-manifest.json".to_owned(),
                "manifest.json".to_owned(),
            ],
            edge_rules_file: "cdn/edge-rules.toml".to_owned(),
            fix_zone_settings: false,
            shield_zone: "FR".to_owned(),
        }
    }
}

/// An entry document this step changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryChange {
    pub path: String,
    /// None: the step created it.
    pub previous_sha256: Option<String>,
    pub sha256: String,
}

/// An edge rule this step added or changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleChange {
    pub description: String,
    pub guid: String,
    /// The rule before (bunny.net's model); none: the step added it.
    pub previous: Option<Value>,
}

/// What the step found on the pull zone and what it changed there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ZoneCheck {
    pub eu_only: bool,
    pub origin_shield: Option<String>,
    /// Settings corrected (with `fix_zone_settings`).
    pub fixed: Vec<String>,
    /// Their values before.
    pub previous: Option<Value>,
}

/// One URL fetched through the edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verified {
    pub url: String,
    pub cache: String,
    pub cache_control: String,
    pub content_type: String,
}

/// What the step recorded on the storage zone before changing anything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Record {
    commit: String,
    entries: Vec<EntryChange>,
    rules: Vec<RuleChange>,
    zone: ZoneCheck,
}

/// What `deploy` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployOutputs {
    pub storage_zone: String,
    pub pull_zone_id: u64,
    pub commit: String,
    pub uploaded: Vec<AssetRef>,
    pub skipped: Vec<AssetRef>,
    pub entries: Vec<EntryChange>,
    pub rules: Vec<RuleChange>,
    pub zone: ZoneCheck,
    pub purged: Vec<String>,
    pub verified: Vec<Verified>,
}

/// What `restore-previous` reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreOutputs {
    pub restored: bool,
    pub entries_restored: Vec<String>,
    pub entries_deleted: Vec<String>,
    pub rules_restored: Vec<String>,
    pub rules_deleted: Vec<String>,
    pub zone_restored: Vec<String>,
    pub purged: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The cdn role, built from `[cdn]`.
pub struct Cdn {
    config: CdnConfig,
    git: GitCache,
    bunny: Bunny,
}

fn outputs<T: Serialize>(value: &T) -> Result<Fields, Error> {
    protocol::to_fields(value).map_err(|e| Error::Io {
        what: "outputs".into(),
        detail: e.message,
    })
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn record_path(job: &StepJob) -> String {
    format!("{OWN}/runs/{}.json", job.key())
}

fn copy_path(sha: &str) -> String {
    format!("{OWN}/entries/{sha}")
}

/// What a rule is, without what bunny.net adds or this daemon does not manage.
fn rule_identity(rule: &Value) -> Value {
    let mut r = rule.clone();
    if let Some(m) = r.as_object_mut() {
        for k in ["Guid", "OrderIndex", "ReadOnly", "ExtraActions"] {
            m.remove(k);
        }
        for (k, v) in m.iter_mut() {
            if k.starts_with("ActionParameter") && v.as_str() == Some("") {
                *v = Value::Null;
            }
        }
    }
    r
}

/// The pull zone's routing and shield against the seed's rules: problems, and
/// the settings that correct them.
fn zone_problems(zone: &Value, shield: &str) -> (Vec<String>, serde_json::Map<String, Value>) {
    let mut problems = Vec::new();
    let mut fix = serde_json::Map::new();
    for (key, region, want) in [
        ("EnableGeoZoneEU", "Europe", true),
        ("EnableGeoZoneUS", "North America", false),
        ("EnableGeoZoneASIA", "Asia and Oceania", false),
        ("EnableGeoZoneSA", "South America", false),
        ("EnableGeoZoneAF", "Africa", false),
    ] {
        if zone.get(key).and_then(Value::as_bool) != Some(want) {
            problems.push(format!(
                "routing {} {region} ({key}); EU-only routing wants it {}",
                if want { "excludes" } else { "includes" },
                if want { "on" } else { "off" }
            ));
            fix.insert(key.to_owned(), json!(want));
        }
    }
    if zone.get("EnableOriginShield").and_then(Value::as_bool) != Some(true) {
        problems.push("origin shield is off (EnableOriginShield)".to_owned());
        fix.insert("EnableOriginShield".into(), json!(true));
    }
    let code = zone.get("OriginShieldZoneCode").and_then(Value::as_str).unwrap_or("");
    if code != shield {
        problems.push(format!(
            "the origin shield is at {code:?}, not at {shield:?} (OriginShieldZoneCode)"
        ));
        fix.insert("OriginShieldZoneCode".into(), json!(shield));
    }
    (problems, fix)
}

impl Cdn {
    pub fn new(config: CdnConfig) -> Result<Self, Error> {
        let bunny = Bunny::new(
            &config.api_url,
            config.api_key.expose(),
            &config.storage_url,
            Duration::from_secs(config.request_timeout_secs),
        )?;
        Ok(Self {
            git: GitCache::new(config.repos_dir.clone()),
            bunny,
            config,
        })
    }

    /// Runs a job to its outputs; the `Role` methods wrap this.
    pub async fn run(&self, job: &StepJob) -> Result<Fields, Error> {
        match (job.kind, job.action.as_str()) {
            (JobKind::Execute, "deploy") => outputs(&self.deploy(job).await?),
            (JobKind::Compensate, "restore-previous") => outputs(&self.restore_previous(job).await?),
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
        p.assets_dir = git::check_folder("assets_dir", &p.assets_dir)?;
        p.edge_rules_file = git::check_folder("edge_rules_file", &p.edge_rules_file)?;
        if !matches!(p.shield_zone.as_str(), "FR") {
            return Err(Error::InvalidParam {
                name: "shield_zone".into(),
                problem: format!(
                    "{:?} is not an EU origin shield location (bunny.net's is FR)",
                    p.shield_zone
                ),
            });
        }
        Ok(p)
    }

    fn zone(&self, job: &StepJob) -> Result<&ServiceZone, Error> {
        self.config
            .services
            .get(&job.deploy.service)
            .ok_or_else(|| Error::NoZone(job.deploy.service.clone()))
    }

    fn edge(z: &ServiceZone, path: &str) -> String {
        format!("{}/{path}", z.edge_url.trim_end_matches('/'))
    }

    async fn record(&self, z: &ServiceZone, job: &StepJob) -> Result<Option<Record>, Error> {
        let pw = z.storage_password.expose();
        match self.bunny.get(&z.storage_zone, pw, &record_path(job)).await? {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::Io {
                what: format!("the record {}", record_path(job)),
                detail: e.to_string(),
            }),
            None => Ok(None),
        }
    }

    async fn save_record(&self, z: &ServiceZone, job: &StepJob, record: &Record) -> Result<(), Error> {
        let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
        self.bunny
            .put(
                &z.storage_zone,
                z.storage_password.expose(),
                &record_path(job),
                &bytes,
                "application/json",
            )
            .await?;
        Ok(())
    }

    async fn deploy(&self, job: &StepJob) -> Result<DeployOutputs, Error> {
        let p = Self::params(job)?;
        let z = self.zone(job)?;
        let pw = z.storage_password.expose();
        let commit = job.deploy.commit_sha.clone();
        git::check_commit(&commit)?;

        let scratch = git::JobDir::new(&self.config.work_dir, job).map_err(|e| Error::Io {
            what: "cannot create the job's directory".into(),
            detail: e.to_string(),
        })?;
        let source = scratch.path().join("source");
        self.git.export(&job.deploy.repository, &commit, ".", &source).await?;
        let dir = source.join(&p.assets_dir);
        if !dir.is_dir() {
            return Err(Error::Source(git::GitError::FolderNotFound {
                dir: p.assets_dir.clone(),
                commit: commit.clone(),
            }));
        }
        let entries = assets::entry_set(&p.entry_documents)?;
        let files = assets::scan(&dir, &p.assets_dir, &entries)?;
        let rules_path = source.join(&p.edge_rules_file);
        let wanted_rules: Vec<Rule> = if rules_path.is_file() {
            let text = std::fs::read_to_string(&rules_path).map_err(|e| Error::Io {
                what: format!("cannot read {}", p.edge_rules_file),
                detail: e.to_string(),
            })?;
            rules::parse(&p.edge_rules_file, &text)?
        } else {
            Vec::new()
        };

        // Everything is checked before anything changes.
        let zone = self.bunny.pull_zone(z.pull_zone_id).await?;
        let (problems, fix) = zone_problems(&zone, &p.shield_zone);
        if !problems.is_empty() && !p.fix_zone_settings {
            return Err(Error::ZoneSettings {
                pull_zone: z.pull_zone_id,
                problems,
            });
        }
        let mut listings: BTreeMap<String, BTreeMap<String, Option<String>>> = BTreeMap::new();
        for f in &files {
            let d = f.path.rsplit_once('/').map(|(d, _)| d.to_owned()).unwrap_or_default();
            if !listings.contains_key(&d) {
                let listed = self.bunny.list(&z.storage_zone, pw, &d).await?;
                listings.insert(
                    d.clone(),
                    listed
                        .into_iter()
                        .filter(|l| !l.is_directory)
                        .map(|l| (l.object_name, l.checksum.map(|c| c.to_lowercase())))
                        .collect(),
                );
            }
        }
        let stored = |f: &Asset| -> Option<Option<String>> {
            let (d, name) = f.path.rsplit_once('/').unwrap_or(("", &f.path));
            listings.get(d).and_then(|l| l.get(name)).cloned()
        };
        let overwrites: Vec<String> = files
            .iter()
            .filter(|f| f.hashed)
            .filter(|f| matches!(stored(f), Some(sum) if sum.as_deref() != Some(f.sha256.as_str())))
            .map(|f| format!("{}/{}", z.storage_zone, f.path))
            .collect();
        if !overwrites.is_empty() {
            return Err(Error::Overwrite(overwrites));
        }

        // The record first: a redelivered job keeps the first one.
        let mut record = match self.record(z, job).await? {
            Some(r) => r,
            None => {
                let mut r = Record {
                    commit: commit.clone(),
                    ..Record::default()
                };
                r.zone = ZoneCheck {
                    eu_only: problems.iter().all(|p| !p.starts_with("routing")),
                    origin_shield: zone
                        .get("OriginShieldZoneCode")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    fixed: fix.keys().cloned().collect(),
                    previous: (!fix.is_empty()).then(|| {
                        Value::Object(
                            fix.keys()
                                .map(|k| (k.clone(), zone.get(k).cloned().unwrap_or(Value::Null)))
                                .collect(),
                        )
                    }),
                };
                for f in files.iter().filter(|f| !f.hashed) {
                    let previous = self.bunny.get(&z.storage_zone, pw, &f.path).await?;
                    if let Some(bytes) = &previous {
                        let sha = sha256(bytes);
                        if stored_copy(self, z, &sha).await?.is_none() {
                            self.bunny
                                .put(
                                    &z.storage_zone,
                                    pw,
                                    &copy_path(&sha),
                                    bytes,
                                    assets::content_type(&f.path),
                                )
                                .await?;
                        }
                    }
                    r.entries.push(EntryChange {
                        path: f.path.clone(),
                        previous_sha256: previous.as_deref().map(sha256),
                        sha256: f.sha256.clone(),
                    });
                }
                let live: BTreeMap<String, Value> = zone["EdgeRules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| Some((r.get("Description")?.as_str()?.to_owned(), r.clone())))
                    .collect();
                for rule in &wanted_rules {
                    r.rules.push(RuleChange {
                        description: rule.description.clone(),
                        guid: live
                            .get(&rule.description)
                            .and_then(|l| l["Guid"].as_str())
                            .unwrap_or("")
                            .to_owned(),
                        previous: live.get(&rule.description).cloned(),
                    });
                }
                self.save_record(z, job, &r).await?;
                r
            }
        };

        if !fix.is_empty() {
            self.bunny
                .update_pull_zone(z.pull_zone_id, &Value::Object(fix.clone()))
                .await?;
            tracing::info!(run_id = %job.run_id, pull_zone = z.pull_zone_id, fixed = ?fix.keys().collect::<Vec<_>>(), "pull zone settings corrected");
        }

        let (mut uploaded, mut skipped) = (Vec::new(), Vec::new());
        for f in files.iter().filter(|f| f.hashed) {
            if stored(f).is_some() {
                skipped.push(f.reference());
                continue;
            }
            self.bunny
                .put(&z.storage_zone, pw, &f.path, &f.bytes, assets::content_type(&f.path))
                .await?;
            uploaded.push(f.reference());
        }
        let mut purge: BTreeSet<String> = BTreeSet::new();
        for f in files.iter().filter(|f| !f.hashed) {
            if stored_copy(self, z, &f.sha256).await?.is_none() {
                self.bunny
                    .put(
                        &z.storage_zone,
                        pw,
                        &copy_path(&f.sha256),
                        &f.bytes,
                        assets::content_type(&f.path),
                    )
                    .await?;
            }
            let live = self.bunny.get(&z.storage_zone, pw, &f.path).await?;
            if live.as_deref().map(sha256).as_deref() == Some(f.sha256.as_str()) {
                skipped.push(f.reference());
            } else {
                self.bunny
                    .put(&z.storage_zone, pw, &f.path, &f.bytes, assets::content_type(&f.path))
                    .await?;
                uploaded.push(f.reference());
            }
            purge.insert(Self::edge(z, &f.path));
        }

        let live_zone = self.bunny.pull_zone(z.pull_zone_id).await?;
        // Whether this step changes rules is the record's to say (the rules
        // before it), not the live zone's: a redelivery after the rules were
        // saved must still purge what was cached under the old ones.
        let rules_changed = wanted_rules
            .iter()
            .zip(&record.rules)
            .any(|(rule, change)| change.previous.as_ref().map(rule_identity) != Some(rule_identity(&rule.body)));
        for (rule, change) in wanted_rules.iter().zip(record.rules.iter_mut()) {
            let live = live_zone["EdgeRules"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["Description"] == json!(rule.description))
                .cloned();
            if live.as_ref().map(rule_identity) == Some(rule_identity(&rule.body)) {
                change.guid = live
                    .and_then(|l| l["Guid"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                continue;
            }
            let mut body = rule.body.clone();
            if let Some(guid) = live.as_ref().and_then(|l| l["Guid"].as_str()) {
                body["Guid"] = json!(guid);
            }
            let saved = self.bunny.put_edge_rule(z.pull_zone_id, &body).await?;
            change.guid = saved["Guid"].as_str().unwrap_or_default().to_owned();
        }
        if rules_changed {
            // Cached objects keep the headers of the rules they were served with.
            for f in &files {
                purge.insert(Self::edge(z, &f.path));
            }
        }
        for url in &purge {
            self.bunny.purge(url).await?;
        }

        let verified = self.verify(z, &files).await?;
        Ok(DeployOutputs {
            storage_zone: z.storage_zone.clone(),
            pull_zone_id: z.pull_zone_id,
            commit,
            uploaded,
            skipped,
            entries: record.entries,
            rules: record.rules,
            zone: record.zone,
            purged: purge.into_iter().collect(),
            verified,
        })
    }

    /// Every asset through the edge: the content deployed, the headers the
    /// seed asks for; an entry document still serving an older version after
    /// `purge_wait_secs` is an incomplete invalidation.
    async fn verify(&self, z: &ServiceZone, files: &[Asset]) -> Result<Vec<Verified>, Error> {
        let mut out = Vec::new();
        for f in files {
            let url = Self::edge(z, &f.path);
            let started = Instant::now();
            loop {
                let r = self
                    .bunny
                    .http()
                    .send("GET", &url, &[], Vec::new())
                    .await
                    .map_err(|e| Error::Verification(format!("{url}: no answer from the edge: {e}")))?;
                let status = r.status;
                let (cache, cache_control, content_type) = (
                    r.header("cdn-cache"),
                    r.header("cache-control"),
                    r.header("content-type"),
                );
                if status == 404 {
                    return Err(Error::Verification(format!("{url}: missing on the edge (404)")));
                }
                if status != 200 {
                    return Err(Error::Verification(format!("{url}: status {status} from the edge")));
                }
                let body = r.body;
                let served = sha256(&body);
                if served != f.sha256 {
                    if f.hashed {
                        return Err(Error::Verification(format!(
                            "{url}: wrong content (SHA-256 {served}, deployed {})",
                            f.sha256
                        )));
                    }
                    if started.elapsed() < Duration::from_secs(self.config.purge_wait_secs) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    return Err(Error::Invalidation(format!(
                        "{url} still serves SHA-256 {served} ({} {cache}) {} s after the purge, not the deployed {}",
                        if cache.is_empty() { "cache status" } else { "CDN-Cache" },
                        self.config.purge_wait_secs,
                        f.sha256
                    )));
                }
                let wanted = assets::content_type(&f.path);
                let main = |t: &str| t.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                if main(&content_type) != main(wanted) {
                    return Err(Error::Verification(format!(
                        "{url}: Content-Type {content_type:?}, expected {wanted}"
                    )));
                }
                if f.hashed {
                    let max_age = cache_control
                        .split(',')
                        .filter_map(|d| d.trim().strip_prefix("max-age="))
                        .find_map(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                    if !cache_control.contains("immutable") || max_age < 31_536_000 {
                        return Err(Error::Verification(format!(
                            "{url}: Cache-Control {cache_control:?}; a content-hashed asset is served `immutable` with max-age of a year or more (an edge rule sets it)"
                        )));
                    }
                }
                out.push(Verified {
                    url,
                    cache,
                    cache_control,
                    content_type,
                });
                break;
            }
        }
        Ok(out)
    }

    async fn restore_previous(&self, job: &StepJob) -> Result<RestoreOutputs, Error> {
        let z = self.zone(job)?;
        let pw = z.storage_password.expose();
        let Some(record) = self.record(z, job).await? else {
            return Ok(RestoreOutputs {
                note: "the step recorded nothing, so it changed nothing".to_owned(),
                ..RestoreOutputs::default()
            });
        };
        let mut out = RestoreOutputs {
            restored: true,
            ..RestoreOutputs::default()
        };
        // Refuse before changing anything when an entry document moved on.
        let mut live_entries = Vec::new();
        for e in &record.entries {
            let live = self
                .bunny
                .get(&z.storage_zone, pw, &e.path)
                .await?
                .as_deref()
                .map(sha256);
            let ours = live.as_deref() == Some(e.sha256.as_str());
            let untouched = live == e.previous_sha256;
            if !ours && !untouched {
                return Err(Error::Moved(format!("{}/{}", z.storage_zone, e.path)));
            }
            live_entries.push((e, ours));
        }
        for (e, ours) in live_entries {
            if !ours {
                continue;
            }
            match &e.previous_sha256 {
                Some(sha) => {
                    let bytes = self
                        .bunny
                        .get(&z.storage_zone, pw, &copy_path(sha))
                        .await?
                        .ok_or_else(|| Error::Io {
                            what: format!("the copy of the previous {}", e.path),
                            detail: format!("{} is missing from {}", copy_path(sha), z.storage_zone),
                        })?;
                    self.bunny
                        .put(&z.storage_zone, pw, &e.path, &bytes, assets::content_type(&e.path))
                        .await?;
                    out.entries_restored.push(e.path.clone());
                }
                None => {
                    self.bunny.delete(&z.storage_zone, pw, &e.path).await?;
                    out.entries_deleted.push(e.path.clone());
                }
            }
            let url = Self::edge(z, &e.path);
            self.bunny.purge(&url).await?;
            out.purged.push(url);
        }
        let live_zone = self.bunny.pull_zone(z.pull_zone_id).await?;
        for change in &record.rules {
            let live = live_zone["EdgeRules"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["Description"] == json!(change.description))
                .cloned();
            match (&change.previous, live) {
                (Some(previous), live) => {
                    if live.as_ref().map(rule_identity) != Some(rule_identity(previous)) {
                        self.bunny.put_edge_rule(z.pull_zone_id, previous).await?;
                        out.rules_restored.push(change.description.clone());
                    }
                }
                (None, Some(live)) => {
                    if let Some(guid) = live["Guid"].as_str() {
                        self.bunny.delete_edge_rule(z.pull_zone_id, guid).await?;
                        out.rules_deleted.push(change.description.clone());
                    }
                }
                (None, None) => {}
            }
        }
        if let Some(previous) = &record.zone.previous {
            self.bunny.update_pull_zone(z.pull_zone_id, previous).await?;
            out.zone_restored = record.zone.fixed.clone();
        }
        // The edge serves the previous entry documents again.
        for e in record.entries.iter().filter(|e| out.entries_restored.contains(&e.path)) {
            let url = Self::edge(z, &e.path);
            let want = e.previous_sha256.clone().unwrap_or_default();
            let started = Instant::now();
            loop {
                let served = match self.bunny.http().send("GET", &url, &[], Vec::new()).await {
                    Ok(r) if r.status == 200 => Some(sha256(&r.body)),
                    _ => None,
                };
                if served.as_deref() == Some(want.as_str()) {
                    break;
                }
                if started.elapsed() >= Duration::from_secs(self.config.purge_wait_secs) {
                    return Err(Error::Invalidation(format!(
                        "{url} does not serve the restored version {want} {} s after the purge",
                        self.config.purge_wait_secs
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(out)
    }
}

/// Whether the content-addressed copy of an entry document exists.
async fn stored_copy(cdn: &Cdn, z: &ServiceZone, sha: &str) -> Result<Option<()>, Error> {
    let listed = cdn
        .bunny
        .list(&z.storage_zone, z.storage_password.expose(), &format!("{OWN}/entries"))
        .await?;
    Ok(listed.iter().any(|l| l.object_name == sha).then_some(()))
}

impl Role for Cdn {
    fn name(&self) -> &str {
        roles::CDN
    }

    fn execute<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        // A cancelled attempt's partial work is undone by `restore-previous`
        // from the record written before anything changed.
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }

    fn compensate<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { kit::outcome(job, self.run(job).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eu_only_routing_and_an_eu_shield_are_checked() {
        let zone = json!({"EnableGeoZoneEU": true, "EnableGeoZoneUS": true, "EnableGeoZoneASIA": false,
                          "EnableGeoZoneSA": false, "EnableGeoZoneAF": false,
                          "EnableOriginShield": true, "OriginShieldZoneCode": "IL"});
        let (problems, fix) = zone_problems(&zone, "FR");
        assert_eq!(
            problems,
            [
                "routing includes North America (EnableGeoZoneUS); EU-only routing wants it off",
                "the origin shield is at \"IL\", not at \"FR\" (OriginShieldZoneCode)"
            ]
        );
        assert_eq!(
            Value::Object(fix),
            json!({"EnableGeoZoneUS": false, "OriginShieldZoneCode": "FR"})
        );
    }
}
