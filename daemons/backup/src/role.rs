//! The `backup` role: pre-deploy and post-deploy backups, verification,
//! pruning and restore, on top of the daemon runtime.
//!
//! A backup is taken from an exported snapshot: one REPEATABLE READ transaction
//! exports it, `pg_dump --snapshot` dumps exactly that state while the same
//! transaction records each table's row count and checksum. The dump streams
//! through age into the primary location, is copied to the second location,
//! and is restored into a scratch database whose tables must match the
//! recorded statistics before the step reports `verified: true`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use baton_shared::protocol::{Fields, StepError, StepJob};
use baton_shared::runtime::{BoxFuture, ExecContext, Outcome, Role};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::Connection;
use tokio::process::Command;
use uuid::Uuid;

use crate::config::{BackupSettings, VolumeConfig};
use crate::crypto::{self, CopyError, HashingWriter, Keys};
use crate::error::{Error, Site};
use crate::pg::{self, PgTarget, Running, Scratch, TableStats};
use crate::retention::{self, Policy};
use crate::store::{self, BackupKind, Location, Manifest, Verified};
use baton_shared::facts::{BackupRef, FactSet, VolumeBackup};

mod volumes;
pub use volumes::{VolumeRestored, VolumesRestored};

/// Prefix of every scratch database the spot check creates.
pub const SCRATCH_PREFIX: &str = "baton_verify_";

/// Staging entries older than this are leftovers of interrupted attempts (no
/// step runs this long) and are removed by `prune`.
const STALE_INCOMING: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Backups that failed their own check stay in `.rejected/` this long for
/// inspection; `prune` then removes them.
const REJECTED_KEPT: chrono::Duration = chrono::Duration::days(30);

/// Directory (in a zone of the primary location) where passed restore tests are recorded.
pub const RESTORE_TESTS_DIR: &str = ".restore-tests";

/// Namespace of the run ids daily backups are filed under (UUIDv5 of zone, service and date).
const DAILY_NAMESPACE: Uuid = Uuid::from_u128(0x6d1c_44f2_9b1e_4c55_a0d7_0b2a_7c4e_d417);

/// The run id a daily backup of `service` in `zone` due on `date` is filed under.
pub fn daily_run_id(zone: &str, service: &str, date: NaiveDate) -> Uuid {
    Uuid::new_v5(&DAILY_NAMESPACE, format!("{zone}\0{service}\0{date}").as_bytes())
}

fn restore_test_file(service: &str, month: &str) -> String {
    format!("{service}.{month}.json")
}

/// How long a restore waits for locks on the live database before giving up.
const RESTORE_LOCK_TIMEOUT: &str = "60s";

/// The backup role for one zone's databases.
pub struct BackupRole {
    keys: Arc<Keys>,
    primary: Location,
    copy: Location,
    admin: PgTarget,
    databases: BTreeMap<String, PgTarget>,
    /// Service -> its persistent volumes on this node.
    volumes: BTreeMap<String, Vec<VolumeConfig>>,
    pg_dump: PathBuf,
    pg_restore: PathBuf,
    psql: PathBuf,
    /// `prune` never deletes a backup younger than this.
    keep_recent: chrono::Duration,
}

/// What `prune` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Backup ids deleted from both locations.
    pub deleted: Vec<String>,
    /// Backup ids kept.
    pub kept: Vec<String>,
    /// Of `kept`, those the policy would delete but that are younger than
    /// `keep_recent_hours`.
    pub protected: Vec<String>,
    pub keep_recent_hours: i64,
    pub policy: Policy,
    /// Leftovers of interrupted attempts removed from the staging directories.
    pub stale_removed: usize,
    /// Backups set aside in `.rejected/` more than 30 days ago, removed.
    pub rejected_removed: usize,
    /// Backups never verified (their step was killed during its spot check and
    /// nothing completed them) older than `keep_recent_hours`: set aside in
    /// `.rejected/` like backups that failed their check. Younger ones are kept
    /// for a retry to complete, and count toward no retention slot.
    #[serde(default)]
    pub unverified_set_aside: Vec<String>,
}

/// What a restore test found (written as JSON to `.restore-tests/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreTest {
    pub service: String,
    pub backup_id: String,
    pub backup_created_at: DateTime<Utc>,
    /// The month (`YYYY-MM`) the test counts for.
    pub month: String,
    pub tested_at: DateTime<Utc>,
    /// One entry per location the backup was restored from.
    pub sites: Vec<SiteTest>,
}

/// One location's part of a restore test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteTest {
    pub site: String,
    pub region: String,
    pub tables: usize,
    /// Persistent volumes unpacked and compared by their tree hash.
    #[serde(default)]
    pub volumes: usize,
    /// Restore into the scratch database (and of the volumes into scratch
    /// directories) and comparison, in milliseconds.
    pub elapsed_ms: u64,
}

/// What `restore` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    pub service: String,
    pub database: String,
    pub restored: bool,
    /// Which location the backup was read from (`primary`, or `copy` if the primary was damaged).
    pub source: String,
    pub tables: u64,
    /// Whether the database's tables matched the backup's statistics right after the restore.
    pub matches_backup: bool,
}

impl BackupRole {
    /// Drops the scratch databases daemons killed mid-check left behind.
    pub async fn sweep_scratch(&self) -> Result<Vec<String>, Error> {
        crate::pg::sweep_scratch(&self.admin, SCRATCH_PREFIX).await
    }

    /// Validates the settings and reads the age identity file.
    pub fn from_settings(settings: &BackupSettings) -> Result<Self, Error> {
        settings.validate()?;
        let keys = Keys::load(&settings.recipients, &settings.identity_file)?;
        Self::with_keys(settings, keys)
    }

    /// As [`from_settings`](Self::from_settings), with keys already loaded.
    pub fn with_keys(settings: &BackupSettings, keys: Keys) -> Result<Self, Error> {
        settings.validate()?;
        let parse = |key: String, url: &str| PgTarget::parse(url).map_err(|p| Error::config(key, p));
        let admin = parse("backup.admin_url".into(), settings.admin_url.expose())?;
        let databases = settings
            .databases
            .iter()
            .map(|(svc, url)| Ok((svc.clone(), parse(format!("backup.databases.{svc}"), url.expose())?)))
            .collect::<Result<_, Error>>()?;
        Ok(Self {
            keys: Arc::new(keys),
            primary: Location {
                site: Site::Primary,
                root: settings.primary.path.clone(),
                region: settings.primary.region.clone(),
            },
            copy: Location {
                site: Site::Copy,
                root: settings.copy.path.clone(),
                region: settings.copy.region.clone(),
            },
            admin,
            databases,
            volumes: settings.volumes.clone(),
            pg_dump: settings.tool("pg_dump"),
            pg_restore: settings.tool("pg_restore"),
            psql: settings.tool("psql"),
            keep_recent: chrono::Duration::hours(i64::from(settings.keep_recent_hours)),
        })
    }

    pub fn primary(&self) -> &Location {
        &self.primary
    }

    pub fn copy(&self) -> &Location {
        &self.copy
    }

    fn target(&self, service: &str) -> Result<&PgTarget, Error> {
        self.databases.get(service).ok_or_else(|| Error::NoDatabase {
            service: service.to_owned(),
        })
    }

    /// Takes (or, for a (run, step, service) already backed up, returns) a
    /// verified backup of `service`'s database: dump, encrypt, write, copy, spot check.
    pub async fn take_backup(
        &self,
        zone: &str,
        service: &str,
        run_id: Uuid,
        step_id: &str,
        kind: BackupKind,
    ) -> Result<BackupRef, Error> {
        let target = self.target(service)?;
        let id = store::backup_id(service, step_id, run_id).map_err(|p| Error::invalid(kind.as_str(), p))?;
        // Two rounds at most: if another attempt publishes the same backup while
        // we dump, ours is discarded and theirs is completed instead.
        for _ in 0..2 {
            if let Some(m) = self.manifest(Site::Primary, zone, &id).await? {
                tracing::info!(backup_id = %id, run_id = %run_id, service, "backup of this run and step exists; completing it");
                return self.complete(zone, m).await;
            }
            let primary = self.primary.clone();
            let staged = blocking({
                let id = id.clone();
                move || primary.stage(&id)
            })
            .await?;
            let started = std::time::Instant::now();
            let dumped = self
                .dump_into(&staged, target, zone, service, run_id, step_id, kind, &id)
                .await;
            let manifest = match dumped {
                Ok(m) => m,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staged);
                    return Err(e);
                }
            };
            let primary = self.primary.clone();
            let published = blocking({
                let (zone, id) = (zone.to_owned(), id.clone());
                move || primary.publish(&staged, &zone, &id)
            })
            .await?;
            if published {
                tracing::info!(
                    backup_id = %id, run_id = %run_id, service, kind = kind.as_str(),
                    bytes = manifest.dump().bytes, sha256 = %manifest.dump().sha256, tables = manifest.tables,
                    region = %self.primary.region, elapsed_ms = started.elapsed().as_millis() as u64,
                    "backup written"
                );
                return self.complete(zone, manifest).await;
            }
            tracing::info!(backup_id = %id, "another attempt published this backup first; using it");
        }
        Err(Error::invalid(
            kind.as_str(),
            format!("backup {id} keeps appearing and disappearing in the primary location"),
        ))
    }

    /// Brings a published backup to "verified": intact, copied, spot-checked.
    async fn complete(&self, zone: &str, m: Manifest) -> Result<BackupRef, Error> {
        let result = self.complete_inner(zone, &m).await;
        if let Err(e) = &result
            && e.implicates_backup()
        {
            // The backup itself is bad: move it aside so the next attempt takes a fresh one.
            for loc in [self.primary.clone(), self.copy.clone()] {
                let (zone, id) = (zone.to_owned(), m.backup_id.clone());
                match blocking(move || loc.quarantine(&zone, &id)).await {
                    Ok(Some(dir)) => {
                        tracing::warn!(backup_id = %m.backup_id, moved_to = %dir.display(), error = %e, "backup failed its check; quarantined")
                    }
                    Ok(None) => {}
                    Err(q) => tracing::error!(backup_id = %m.backup_id, error = %q, "cannot quarantine failed backup"),
                }
            }
        }
        result
    }

    async fn complete_inner(&self, zone: &str, m: &Manifest) -> Result<BackupRef, Error> {
        self.check_files(Site::Primary, zone, m).await?;
        self.ensure_copy(zone, m).await?;
        let marker = {
            let (loc, zone, id) = (self.primary.clone(), zone.to_owned(), m.backup_id.clone());
            blocking(move || loc.verified(&zone, &id)).await?
        };
        if marker.is_some_and(|v| v.sha256 == m.dump().sha256) {
            tracing::info!(backup_id = %m.backup_id, "backup already verified; returning it");
            return Ok(self.backup_ref(zone, m));
        }
        self.spot_check(zone, m).await?;
        self.mark_verified(zone, m).await?;
        Ok(self.backup_ref(zone, m))
    }

    /// Makes sure the copy location holds this backup, byte for byte.
    async fn ensure_copy(&self, zone: &str, m: &Manifest) -> Result<(), Error> {
        match self.manifest(Site::Copy, zone, &m.backup_id).await {
            Ok(Some(cm)) if cm == *m => match self.check_files(Site::Copy, zone, m).await {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!(backup_id = %m.backup_id, error = %e, "copy damaged; copying again"),
            },
            Ok(Some(_)) => tracing::warn!(backup_id = %m.backup_id, "copy differs from the primary; copying again"),
            Ok(None) => {}
            Err(e) => tracing::warn!(backup_id = %m.backup_id, error = %e, "copy unreadable; copying again"),
        }
        let (primary, copy, zone_s, m2) = (self.primary.clone(), self.copy.clone(), zone.to_owned(), m.clone());
        blocking(move || {
            copy.delete(&zone_s, &m2.backup_id)?;
            copy.copy_from(&primary, &zone_s, &m2)
        })
        .await?;
        self.check_files(Site::Copy, zone, m).await?;
        tracing::info!(backup_id = %m.backup_id, region = %self.copy.region, "backup copied to the second location");
        Ok(())
    }

    /// Full verification of a backup by id: both locations intact and equal,
    /// restorable, and the restored tables match the recorded statistics.
    pub async fn verify(&self, zone: &str, backup_id: &str) -> Result<BackupRef, Error> {
        store::check_backup_id(backup_id).map_err(|p| Error::invalid("verify", p))?;
        let m = self.require_manifest(Site::Primary, zone, backup_id).await?;
        self.spot_check(zone, &m).await?;
        self.mark_verified(zone, &m).await?;
        tracing::info!(backup_id, "backup verified");
        Ok(self.backup_ref(zone, &m))
    }

    async fn spot_check(&self, zone: &str, m: &Manifest) -> Result<(), Error> {
        self.check_files(Site::Primary, zone, m).await?;
        let cm = self.require_manifest(Site::Copy, zone, &m.backup_id).await?;
        if cm != *m {
            return Err(Error::CopyDiffers {
                backup_id: m.backup_id.clone(),
                dir: self.copy.backup_dir(zone, &m.backup_id),
            });
        }
        self.check_files(Site::Copy, zone, m).await?;
        let (tables, elapsed) = self.restore_into_scratch(&self.primary, zone, m).await?;
        self.check_volumes(&self.primary, zone, m).await?;
        tracing::info!(
            backup_id = %m.backup_id, tables, elapsed_ms = elapsed.as_millis() as u64,
            "restore spot check passed"
        );
        Ok(())
    }

    /// Restores `m` from `loc` into a new scratch database and compares its
    /// tables with the statistics recorded at backup time; the scratch
    /// database is dropped either way. Returns the number of tables and how
    /// long the restore and comparison took.
    async fn restore_into_scratch(
        &self,
        loc: &Location,
        zone: &str,
        m: &Manifest,
    ) -> Result<(usize, std::time::Duration), Error> {
        let expected = self.read_tables(loc, zone, m).await?;
        let started = std::time::Instant::now();
        let name = format!(
            "{}{}",
            scratch_prefix(&m.backup_id),
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let scratch = Scratch::create(&self.admin, name).await?;
        let result = self.restore_and_compare(loc, &scratch, zone, m, &expected).await;
        let scratch_name = scratch.name.clone();
        if let Err(e) = scratch.drop_now().await {
            tracing::warn!(scratch = %scratch_name, error = %e, "scratch database not dropped");
        }
        result?;
        Ok((expected.len(), started.elapsed()))
    }

    async fn restore_and_compare(
        &self,
        loc: &Location,
        scratch: &Scratch,
        zone: &str,
        m: &Manifest,
        expected: &[TableStats],
    ) -> Result<(), Error> {
        let mut cmd = scratch.target.command(&self.pg_restore);
        cmd.args(["--no-owner", "--no-acl", "--exit-on-error"])
            .stdin(Stdio::piped());
        let mut tool = Running::spawn("pg_restore", cmd)?;
        let stdin = into_file(tool.child.stdin.take().expect("stdin is piped"), "pg_restore")?;
        let feeder = self.feed_plaintext(loc, zone, m, stdin);
        let restored = tool.finish().await;
        let fed = join_blocking(feeder).await;
        blame(fed, restored)?;

        let mut conn = scratch.target.connect().await?;
        let found = pg::list_tables(&mut conn).await?;
        let names: Vec<(String, String)> = expected.iter().map(|t| (t.schema.clone(), t.table.clone())).collect();
        let mut problems = table_set_problems(&names, &found);
        if problems.is_empty() {
            let actual = pg::table_stats(&mut conn, &names).await?;
            problems = stats_problems(expected, &actual);
        }
        let _ = conn.close().await;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::RestoreMismatch {
                backup_id: m.backup_id.clone(),
                problem: problems.join("; "),
            })
        }
    }

    /// Restores backup `backup_id` into `service`'s database, replacing its
    /// schemas. Refused unless `confirm` equals the backup id.
    pub async fn restore(
        &self,
        zone: &str,
        service: &str,
        backup_id: &str,
        confirm: Option<&str>,
    ) -> Result<RestoreReport, Error> {
        store::check_backup_id(backup_id).map_err(|p| Error::invalid("restore", p))?;
        if confirm != Some(backup_id) {
            return Err(Error::ConfirmationRequired {
                backup_id: backup_id.to_owned(),
                given: match confirm {
                    Some(c) => format!("given {c:?}"),
                    None => "it is missing".to_owned(),
                },
            });
        }
        let target = self.target(service)?;
        let (source, m) = self.restore_source_of(zone, service, backup_id).await?;
        let expected = self.read_tables(&source, zone, &m).await?;
        tracing::warn!(backup_id, service, database = %target.database(), source = %source.site, "restoring backup over the live database");
        self.restore_live(target, &source, zone, &m).await?;

        let mut conn = target.connect().await?;
        let found = pg::list_tables(&mut conn).await?;
        let names: Vec<(String, String)> = expected.iter().map(|t| (t.schema.clone(), t.table.clone())).collect();
        let mut problems = table_set_problems(&names, &found);
        if problems.is_empty() {
            problems = stats_problems(&expected, &pg::table_stats(&mut conn, &names).await?);
        }
        let _ = conn.close().await;
        if !problems.is_empty() {
            // Committed already; writes since the restore can explain a difference.
            tracing::warn!(backup_id, problems = %problems.join("; "), "restored database differs from the backup's statistics");
        }
        tracing::info!(backup_id, service, "backup restored");
        Ok(RestoreReport {
            backup_id: backup_id.to_owned(),
            service: service.to_owned(),
            database: target.database().to_owned(),
            restored: true,
            source: source.site.as_str().to_owned(),
            tables: expected.len() as u64,
            matches_backup: problems.is_empty(),
        })
    }

    /// As [`restore_source`](Self::restore_source), for a backup that must be `service`'s.
    async fn restore_source_of(
        &self,
        zone: &str,
        service: &str,
        backup_id: &str,
    ) -> Result<(Location, Manifest), Error> {
        let (source, m) = self.restore_source(zone, backup_id).await?;
        if m.service != service {
            return Err(Error::WrongService {
                backup_id: backup_id.to_owned(),
                backup_service: m.service.clone(),
                service: service.to_owned(),
            });
        }
        Ok((source, m))
    }

    /// The location to restore from: the primary if intact, else an intact copy.
    async fn restore_source(&self, zone: &str, backup_id: &str) -> Result<(Location, Manifest), Error> {
        let primary_err = match self.require_manifest(Site::Primary, zone, backup_id).await {
            Ok(m) => match self.check_files(Site::Primary, zone, &m).await {
                Ok(()) => return Ok((self.primary.clone(), m)),
                Err(e) => e,
            },
            Err(e) => e,
        };
        tracing::warn!(backup_id, error = %primary_err, "primary unusable; trying the copy");
        match self.manifest(Site::Copy, zone, backup_id).await {
            Ok(Some(m)) if self.check_files(Site::Copy, zone, &m).await.is_ok() => Ok((self.copy.clone(), m)),
            _ => Err(primary_err),
        }
    }

    /// Decrypt → `pg_restore` to SQL → `psql`, all in one transaction that is
    /// committed only after `pg_restore` has produced the whole script.
    async fn restore_live(&self, target: &PgTarget, source: &Location, zone: &str, m: &Manifest) -> Result<(), Error> {
        let mut script = Command::new(&self.pg_restore);
        script
            .args(["--format=custom", "--file=-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut restore = Running::spawn("pg_restore", script)?;
        let mut psql_cmd = target.command(&self.psql);
        psql_cmd
            .args(["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"])
            .stdin(Stdio::piped());
        let mut psql = Running::spawn("psql", psql_cmd)?;

        let restore_in = into_file(restore.child.stdin.take().expect("stdin is piped"), "pg_restore")?;
        let restore_out = restore.child.stdout.take().expect("stdout is piped");
        let restore_out = File::from(
            restore_out
                .into_owned_fd()
                .map_err(Error::io("taking pg_restore's output"))?,
        );
        let psql_in = into_file(psql.child.stdin.take().expect("stdin is piped"), "psql")?;
        let feeder = self.feed_plaintext(source, zone, m, restore_in);
        let (commit_tx, commit_rx) = std::sync::mpsc::channel::<bool>();
        let pump = tokio::task::spawn_blocking(move || pump_script(restore_out, psql_in, commit_rx));

        let restored = restore.finish().await;
        let _ = commit_tx.send(restored.is_ok());
        let applied = psql.finish().await;
        let fed = join_blocking(feeder).await;
        let pumped = pump.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        blame(fed, restored)?;
        applied?;
        match pumped {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::invalid(
                "restore",
                format!(
                    "backup {}: the restore script did not complete; nothing was committed",
                    m.backup_id
                ),
            )),
            Err(e) => Err(e),
        }
    }

    /// The services whose databases this daemon backs up, in name order.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.databases.keys().map(String::as_str)
    }

    /// The daily backup of `service` due on `date`. Its id is fixed by zone,
    /// service and date, so whichever attempt (or replica) comes first takes
    /// it and the others complete or return that one.
    pub async fn daily_backup(&self, zone: &str, service: &str, date: NaiveDate) -> Result<BackupRef, Error> {
        let run_id = daily_run_id(zone, service, date);
        let step_id = format!("daily-{}", date.format("%Y%m%d"));
        self.take_backup(zone, service, run_id, &step_id, BackupKind::Daily)
            .await
    }

    /// The full restore test (seed step 9, monthly): the newest backup of
    /// `service` is restored from each location in turn into a scratch
    /// database and compared with the statistics recorded when it was taken.
    /// A pass is recorded for `month` (`YYYY-MM`) beside the backups, in
    /// `.restore-tests/` of the zone in the primary location.
    pub async fn restore_test(&self, zone: &str, service: &str, month: &str) -> Result<RestoreTest, Error> {
        self.target(service)?;
        let (loc, z) = (self.primary.clone(), zone.to_owned());
        let all = blocking(move || loc.list(&z)).await?;
        let newest = all
            .into_iter()
            .filter(|m| m.service == service)
            .max_by(|a, b| (a.created_at, &a.backup_id).cmp(&(b.created_at, &b.backup_id)))
            .ok_or_else(|| Error::NothingToTest {
                service: service.to_owned(),
                dir: self.primary.zone_dir(zone),
            })?;
        let mut sites = Vec::new();
        for site in [Site::Primary, Site::Copy] {
            let m = self.require_manifest(site, zone, &newest.backup_id).await?;
            if m != newest {
                return Err(Error::CopyDiffers {
                    backup_id: newest.backup_id.clone(),
                    dir: self.location(site).backup_dir(zone, &newest.backup_id),
                });
            }
            self.check_files(site, zone, &m).await?;
            let started = std::time::Instant::now();
            let (tables, _) = self.restore_into_scratch(self.location(site), zone, &m).await?;
            self.check_volumes(self.location(site), zone, &m).await?;
            sites.push(SiteTest {
                site: site.to_string(),
                region: self.location(site).region.clone(),
                tables,
                volumes: m.volumes.len(),
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
        }
        let report = RestoreTest {
            service: service.to_owned(),
            backup_id: newest.backup_id.clone(),
            backup_created_at: newest.created_at,
            month: month.to_owned(),
            tested_at: Utc::now(),
            sites,
        };
        let dir = self.restore_tests_dir(zone);
        let (name, r) = (restore_test_file(service, month), report.clone());
        blocking(move || {
            store::create_private_dir_all(&dir)?;
            store::write_json_atomic(&dir, &name, &r)
        })
        .await?;
        tracing::info!(service, backup_id = %report.backup_id, month, "restore test passed from both locations");
        Ok(report)
    }

    /// The restore test recorded as passed for `service` in `month`, if any.
    pub async fn restore_test_of(&self, zone: &str, service: &str, month: &str) -> Result<Option<RestoreTest>, Error> {
        let path = self.restore_tests_dir(zone).join(restore_test_file(service, month));
        blocking(move || match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::io(format!("reading {}", path.display()))(std::io::Error::other(e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()))(e)),
        })
        .await
    }

    fn restore_tests_dir(&self, zone: &str) -> PathBuf {
        self.primary.zone_dir(zone).join(RESTORE_TESTS_DIR)
    }

    /// Applies the retention policy to `zone` in both locations.
    pub async fn prune(&self, zone: &str, policy: Policy, now: DateTime<Utc>) -> Result<PruneReport, Error> {
        let (p, c, z) = (self.primary.clone(), self.copy.clone(), zone.to_owned());
        let (primary, copy) = blocking(move || Ok((p.list(&z)?, c.list(&z)?))).await?;
        // One decision for both locations, from the union of what they hold,
        // so they stay alike even if one was missing a backup.
        let mut by_id: BTreeMap<String, (String, DateTime<Utc>)> = BTreeMap::new();
        let mut sha: BTreeMap<String, String> = BTreeMap::new();
        for m in copy.into_iter().chain(primary) {
            by_id.insert(m.backup_id.clone(), (m.service.clone(), m.created_at));
            sha.insert(m.backup_id.clone(), m.dump().sha256.clone());
        }
        // A backup counts only once verified (its record in the primary
        // location names its dump); one never verified is no backup to keep.
        let mut unverified = BTreeSet::new();
        for (id, dump_sha) in &sha {
            let (loc, z, i) = (self.primary.clone(), zone.to_owned(), id.clone());
            let record = blocking(move || loc.verified(&z, &i)).await?;
            if record.is_none_or(|v| v.sha256 != *dump_sha) {
                unverified.insert(id.clone());
            }
        }
        let mut unverified_set_aside = Vec::new();
        for id in &unverified {
            let (_, at) = by_id[id];
            if now - at < self.keep_recent {
                continue;
            }
            for loc in [self.copy.clone(), self.primary.clone()] {
                let (z, i) = (zone.to_owned(), id.clone());
                blocking(move || loc.quarantine(&z, &i)).await?;
            }
            tracing::warn!(backup_id = %id, "backup never verified; set aside in .rejected/");
            unverified_set_aside.push(id.clone());
        }
        let mut by_service: BTreeMap<&str, Vec<(String, DateTime<Utc>)>> = BTreeMap::new();
        for (id, (service, at)) in by_id.iter().filter(|(id, _)| !unverified.contains(*id)) {
            by_service.entry(service).or_default().push((id.clone(), *at));
        }
        let mut kept = BTreeSet::new();
        for backups in by_service.values() {
            kept.extend(retention::keep(backups, now, policy));
        }
        // Younger than `keep_recent`: a run under way may still restore it
        // (its pre-deploy backup is rarely the newest of its day).
        let protected: Vec<String> = by_id
            .iter()
            .filter(|(id, (_, at))| !kept.contains(*id) && now - *at < self.keep_recent)
            .map(|(id, _)| id.clone())
            .collect();
        kept.extend(protected.iter().cloned());
        let deleted: Vec<String> = by_id
            .keys()
            .filter(|id| !kept.contains(*id) && !unverified_set_aside.contains(*id))
            .cloned()
            .collect();
        for id in &deleted {
            for loc in [self.copy.clone(), self.primary.clone()] {
                let (zone, id) = (zone.to_owned(), id.clone());
                blocking(move || loc.delete(&zone, &id)).await?;
            }
            tracing::info!(backup_id = %id, "backup deleted by retention");
        }
        let (mut stale_removed, mut rejected_removed) = (0, 0);
        for loc in [self.copy.clone(), self.primary.clone()] {
            let z = zone.to_owned();
            let (stale, rejected) = blocking(move || {
                Ok((
                    loc.clean_incoming(STALE_INCOMING)?,
                    loc.clean_rejected(&z, REJECTED_KEPT, now)?,
                ))
            })
            .await?;
            stale_removed += stale;
            rejected_removed += rejected;
        }
        tracing::info!(
            deleted = deleted.len(),
            kept = kept.len(),
            protected = protected.len(),
            stale_removed,
            rejected_removed,
            "prune done"
        );
        Ok(PruneReport {
            deleted,
            kept: kept.into_iter().collect(),
            protected,
            keep_recent_hours: self.keep_recent.num_hours(),
            policy,
            stale_removed,
            rejected_removed,
            unverified_set_aside,
        })
    }

    /// The run's verified pre-deploy backup of `service` in the primary location.
    pub async fn pre_deploy_of_run(&self, zone: &str, service: &str, run_id: Uuid) -> Result<BackupRef, Error> {
        let (loc, z) = (self.primary.clone(), zone.to_owned());
        let all = blocking(move || loc.list(&z)).await?;
        let found = all
            .into_iter()
            .find(|m| m.run_id == run_id && m.service == service && m.kind == BackupKind::PreDeploy);
        let missing = || Error::PreDeployMissing {
            run_id,
            service: service.to_owned(),
            dir: self.primary.zone_dir(zone),
        };
        let m = found.ok_or_else(missing)?;
        let marker = {
            let (loc, zone, id) = (self.primary.clone(), zone.to_owned(), m.backup_id.clone());
            blocking(move || loc.verified(&zone, &id)).await?
        };
        if marker.is_none_or(|v| v.sha256 != m.dump().sha256) {
            return Err(missing());
        }
        self.check_files(Site::Primary, zone, &m).await?;
        self.check_files(Site::Copy, zone, &m).await?;
        Ok(self.backup_ref(zone, &m))
    }

    fn backup_ref(&self, zone: &str, m: &Manifest) -> BackupRef {
        BackupRef {
            backup_id: m.backup_id.clone(),
            run_id: m.run_id,
            verified: true,
            sha256: m.dump().sha256.clone(),
            location: self.primary.backup_dir(zone, &m.backup_id).display().to_string(),
            copy_location: self.copy.backup_dir(zone, &m.backup_id).display().to_string(),
            region: self.primary.region.clone(),
            copy_region: self.copy.region.clone(),
            tables: m.tables as u64,
            bytes: m.dump().bytes,
            volumes: m
                .volumes
                .iter()
                .map(|v| VolumeBackup {
                    claim: v.claim.clone(),
                    tree_sha256: v.tree_sha256.clone(),
                    entries: v.entries,
                    content_bytes: v.content_bytes,
                    consistency: v.consistency.as_str().to_owned(),
                    changed_while_copied: v.changed_while_copied,
                    skipped: v.skipped,
                })
                .collect(),
        }
    }

    fn location(&self, site: Site) -> &Location {
        match site {
            Site::Primary => &self.primary,
            Site::Copy => &self.copy,
        }
    }

    async fn manifest(&self, site: Site, zone: &str, id: &str) -> Result<Option<Manifest>, Error> {
        let (loc, zone, id) = (self.location(site).clone(), zone.to_owned(), id.to_owned());
        blocking(move || loc.manifest(&zone, &id)).await
    }

    async fn require_manifest(&self, site: Site, zone: &str, id: &str) -> Result<Manifest, Error> {
        self.manifest(site, zone, id)
            .await?
            .ok_or_else(|| Error::BackupMissing {
                backup_id: id.to_owned(),
                site,
                dir: self.location(site).backup_dir(zone, id),
            })
    }

    async fn check_files(&self, site: Site, zone: &str, m: &Manifest) -> Result<(), Error> {
        let (loc, zone, m) = (self.location(site).clone(), zone.to_owned(), m.clone());
        blocking(move || loc.check_files(&zone, &m)).await
    }

    async fn mark_verified(&self, zone: &str, m: &Manifest) -> Result<(), Error> {
        let marker = Verified {
            verified_at: Utc::now(),
            sha256: m.dump().sha256.clone(),
            tables: m.tables,
        };
        for loc in [self.copy.clone(), self.primary.clone()] {
            let (zone, id, marker) = (zone.to_owned(), m.backup_id.clone(), marker.clone());
            blocking(move || loc.mark_verified(&zone, &id, &marker)).await?;
        }
        Ok(())
    }

    /// Decrypts the backup's table list.
    async fn read_tables(&self, loc: &Location, zone: &str, m: &Manifest) -> Result<Vec<TableStats>, Error> {
        let path = loc.backup_dir(zone, &m.backup_id).join(store::TABLES_FILE);
        let (keys, id, tables) = (self.keys.clone(), m.backup_id.clone(), m.tables);
        blocking(move || {
            let decrypt_err = |problem: String| Error::Decrypt {
                backup_id: id.clone(),
                file: store::TABLES_FILE.to_owned(),
                problem,
            };
            let file = File::open(&path).map_err(Error::io(format!("reading {}", path.display())))?;
            let mut plain = Vec::new();
            keys.decryptor(BufReader::new(file))
                .map_err(|e| decrypt_err(e.to_string()))?
                .read_to_end(&mut plain)
                .map_err(|e| decrypt_err(e.to_string()))?;
            let stats: Vec<TableStats> =
                serde_json::from_slice(&plain).map_err(|e| decrypt_err(format!("not a table list: {e}")))?;
            if stats.len() != tables {
                return Err(decrypt_err(format!(
                    "it lists {} tables, the manifest {tables}",
                    stats.len()
                )));
            }
            Ok(stats)
        })
        .await
    }

    /// Starts decrypting the backup's dump into `out` on the blocking pool.
    fn feed_plaintext(
        &self,
        loc: &Location,
        zone: &str,
        m: &Manifest,
        mut out: File,
    ) -> tokio::task::JoinHandle<Result<u64, Error>> {
        let path = loc.backup_dir(zone, &m.backup_id).join(store::DUMP_FILE);
        let (keys, id) = (self.keys.clone(), m.backup_id.clone());
        tokio::task::spawn_blocking(move || {
            let decrypt_err = |problem: String| Error::Decrypt {
                backup_id: id.clone(),
                file: store::DUMP_FILE.to_owned(),
                problem,
            };
            let file = File::open(&path).map_err(Error::io(format!("reading {}", path.display())))?;
            let mut plain = keys
                .decryptor(BufReader::new(file))
                .map_err(|e| decrypt_err(e.to_string()))?;
            crypto::copy_stream(&mut plain, &mut out).map_err(|e| match e {
                CopyError::Read(e) => decrypt_err(e.to_string()),
                CopyError::Write(e) => Error::io("feeding the decrypted dump to pg_restore")(e),
            })
        })
    }

    /// Dumps `target` from an exported snapshot into `staged`, encrypted, with
    /// the table statistics of the same snapshot; writes the manifest last.
    #[allow(clippy::too_many_arguments)]
    async fn dump_into(
        &self,
        staged: &Path,
        target: &PgTarget,
        zone: &str,
        service: &str,
        run_id: Uuid,
        step_id: &str,
        kind: BackupKind,
        backup_id: &str,
    ) -> Result<Manifest, Error> {
        let pg_dump_version = pg::tool_version(&self.pg_dump).await?;
        let mut conn = target.connect().await?;
        let created_at = Utc::now();
        let mut tx = conn
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(Error::db(format!("database {}: begin snapshot", target.database())))?;
        let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut *tx)
            .await
            .map_err(Error::db(format!("database {}: export snapshot", target.database())))?;

        let mut cmd = target.command(&self.pg_dump);
        cmd.arg("--format=custom")
            .arg(format!("--snapshot={snapshot}"))
            .stdout(Stdio::piped());
        let mut tool = Running::spawn("pg_dump", cmd)?;
        let stdout = tool.child.stdout.take().expect("stdout is piped");
        let input = File::from(stdout.into_owned_fd().map_err(Error::io("taking pg_dump's output"))?);
        let dump_path = staged.join(store::DUMP_FILE);
        let keys = self.keys.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut input = input;
            let file = crypto::create_private(&dump_path)?;
            let mut w = keys.encryptor(HashingWriter::new(file))?;
            crypto::copy_stream(&mut input, &mut w).map_err(|e| match e {
                CopyError::Read(e) => Error::io("reading pg_dump's output")(e),
                CopyError::Write(e) => Error::io(format!("writing {}", dump_path.display()))(e),
            })?;
            let hw = w
                .finish()
                .map_err(Error::io(format!("writing {}", dump_path.display())))?;
            hw.finish_file(&dump_path)
        });
        // Statistics from the same snapshot, while pg_dump reads it.
        let stats = async {
            let tables = pg::list_tables(&mut tx).await?;
            pg::table_stats(&mut tx, &tables).await
        };
        let (stats, dumped) = tokio::join!(stats, tool.finish());
        let written = join_blocking(writer).await;
        dumped?;
        let dump_digest = written?;
        let stats = stats?;
        // Read-only: nothing to commit; ending it releases the snapshot.
        let _ = tx.rollback().await;
        let _ = conn.close().await;

        let tables_json = serde_json::to_vec(&stats).expect("table statistics serialise");
        let tables_path = staged.join(store::TABLES_FILE);
        let keys = self.keys.clone();
        let tables_digest = blocking(move || keys.encrypt_to_file(&tables_json, &tables_path)).await?;
        // The volumes after the database's snapshot: each is its own moment.
        let volumes = self.archive_volumes(staged, service).await?;

        let manifest = Manifest {
            format: store::MANIFEST_FORMAT,
            backup_id: backup_id.to_owned(),
            zone: zone.to_owned(),
            service: service.to_owned(),
            run_id,
            step_id: step_id.to_owned(),
            kind,
            created_at,
            database: target.database().to_owned(),
            pg_dump_version,
            recipients: self.keys.recipient_strings(),
            tables: stats.len(),
            files: [
                (store::DUMP_FILE.to_owned(), dump_digest.into()),
                (store::TABLES_FILE.to_owned(), tables_digest.into()),
            ]
            .into_iter()
            .chain(volumes.iter().map(|(v, f)| (v.file.clone(), f.clone())))
            .collect(),
            volumes: volumes.into_iter().map(|(v, _)| v).collect(),
        };
        let (dir, m) = (staged.to_owned(), manifest.clone());
        blocking(move || store::write_json_atomic(&dir, store::MANIFEST_FILE, &m)).await?;
        Ok(manifest)
    }

    /// `restore-volumes`: the volumes of the backup this step took.
    async fn restore_own_volumes(&self, job: &StepJob) -> Result<Fields, Error> {
        let service = job.deploy.service.as_str();
        let id =
            store::backup_id(service, &job.step_id, job.run_id).map_err(|p| Error::invalid("restore-volumes", p))?;
        let report = self.restore_volumes(&job.zone, service, &id).await?;
        to_fields(&report)
    }

    /// Runs one job; errors become step failures with a code and retryability.
    async fn run(&self, job: &StepJob) -> Result<Fields, Error> {
        let zone = job.zone.as_str();
        let service = job.deploy.service.as_str();
        tracing::info!(run_id = %job.run_id, step_id = %job.step_id, action = %job.action, service, "backup action");
        match job.action.as_str() {
            "pre-deploy" => {
                params::<Retention>(job)?;
                let r = self
                    .take_backup(zone, service, job.run_id, &job.step_id, BackupKind::PreDeploy)
                    .await?;
                Ok(r.to_fields())
            }
            "post-deploy" => {
                let p = params::<PostDeploy>(job)?;
                let r = self
                    .take_backup(zone, service, job.run_id, &job.step_id, BackupKind::PostDeploy)
                    .await?;
                if p.require_pre_deploy {
                    // "Pre-deploy backup exists — taken before step 6" (seed, step 9).
                    let pre = self.pre_deploy_of_run(zone, service, job.run_id).await?;
                    tracing::info!(backup_id = %r.backup_id, pre_deploy_backup_id = %pre.backup_id, "pre-deploy backup of the run confirmed");
                }
                Ok(r.to_fields())
            }
            "verify" => {
                let p = params::<Which>(job)?;
                let id = backup_id_param(job, &p)?;
                Ok(self.verify(zone, &id).await?.to_fields())
            }
            "prune" => {
                let policy = params::<Retention>(job)?.retention.unwrap_or_default();
                let report = self.prune(zone, policy, Utc::now()).await?;
                to_fields(&report)
            }
            "restore" => {
                let p = params::<Restore>(job)?;
                let which = Which {
                    backup_id: p.backup_id,
                    backup_step: p.backup_step,
                };
                let id = backup_id_param(job, &which)?;
                let report = self.restore(zone, service, &id, p.confirm_backup_id.as_deref()).await?;
                to_fields(&report)
            }
            other => Err(Error::invalid(
                other,
                "unknown action; the backup role knows pre-deploy, post-deploy, verify, prune and restore",
            )),
        }
    }
}

impl Role for BackupRole {
    fn name(&self) -> &str {
        baton_shared::roles::BACKUP
    }

    fn execute<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        // Cancellation drops this future: child processes are killed on drop and
        // a scratch database is dropped in the background.
        Box::pin(async move { self.run(job).await.map_err(StepError::from) })
    }

    fn compensate<'a>(&'a self, job: &'a StepJob, _ctx: &'a ExecContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            // The scheduler undoes an irreversible migration by restoring the run's
            // pre-deploy backup: a compensation of the migration step, served here.
            if job.action == "restore" {
                return self.run(job).await.map_err(StepError::from);
            }
            // A backup step's own compensation, when the pipeline asks for it:
            // the service's volumes go back to this step's backup.
            if job.action == "restore-volumes" {
                return self.restore_own_volumes(job).await.map_err(StepError::from);
            }
            Err(StepError::fatal(
                "no_compensation",
                format!(
                    "backup steps have no compensation (seed step 9: a backup verifies, it deploys nothing); asked to compensate {}",
                    job.action
                ),
            ))
        })
    }
}

/// The start of every scratch database name for `backup_id` (a hash keeps it
/// within PostgreSQL's 63-character limit).
pub fn scratch_prefix(backup_id: &str) -> String {
    let h = hex::encode(Sha256::digest(backup_id.as_bytes()));
    format!("{SCRATCH_PREFIX}{}_", &h[..12])
}

/// Runs blocking work (file I/O, hashing) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
    join_blocking(tokio::task::spawn_blocking(f)).await
}

async fn join_blocking<T>(handle: tokio::task::JoinHandle<Result<T, Error>>) -> Result<T, Error> {
    handle
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// A tool's stdin as a blocking file for the feeding thread.
fn into_file(stdin: tokio::process::ChildStdin, tool: &str) -> Result<File, Error> {
    stdin
        .into_owned_fd()
        .map(File::from)
        .map_err(Error::io(format!("taking {tool}'s input")))
}

/// Picks the root cause when decrypting into a tool failed on either side: a
/// bad ciphertext explains the tool's complaint, not the other way round.
fn blame(fed: Result<u64, Error>, tool: Result<(), Error>) -> Result<(), Error> {
    match (fed, tool) {
        (Err(e @ Error::Decrypt { .. }), _) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Ok(_), Ok(())) => Ok(()),
    }
}

/// Streams the SQL script from `pg_restore` into `psql` inside one transaction,
/// and commits only if `pg_restore` reports success. Returns whether it committed.
fn pump_script(mut script: File, mut psql: File, restore_ok: std::sync::mpsc::Receiver<bool>) -> Result<bool, Error> {
    let write_err = |e| Error::io("writing the restore script to psql")(e);
    // Everything the backup does not contain must go too: drop every schema,
    // then recreate `public` as PostgreSQL 15 creates it (the dump does not).
    let prologue = format!(
        "BEGIN;\n\
         SET lock_timeout = '{RESTORE_LOCK_TIMEOUT}';\n\
         DO $baton$ DECLARE s text; BEGIN\n\
           FOR s IN SELECT nspname FROM pg_catalog.pg_namespace\n\
                     WHERE nspname <> 'information_schema' AND nspname NOT LIKE 'pg\\_%' LOOP\n\
             EXECUTE format('DROP SCHEMA %I CASCADE', s);\n\
           END LOOP;\n\
         END $baton$;\n\
         CREATE SCHEMA public AUTHORIZATION pg_database_owner;\n\
         GRANT USAGE ON SCHEMA public TO PUBLIC;\n\
         COMMENT ON SCHEMA public IS 'standard public schema';\n"
    );
    if let Err(e) = psql.write_all(prologue.as_bytes()) {
        return Err(write_err(e));
    }
    match crypto::copy_stream(&mut script, &mut psql) {
        Ok(_) => {}
        Err(CopyError::Read(e)) => return Err(Error::io("reading pg_restore's script")(e)),
        // psql stopped on an error; its exit status and stderr tell why.
        Err(CopyError::Write(_)) => return Ok(false),
    }
    drop(script);
    if restore_ok.recv().unwrap_or(false) {
        psql.write_all(b"\nCOMMIT;\n").map_err(write_err)?;
        Ok(true)
    } else {
        // Closing stdin without COMMIT: psql exits and the server rolls back.
        Ok(false)
    }
}

fn table_set_problems(expected: &[(String, String)], found: &[(String, String)]) -> Vec<String> {
    let e: BTreeSet<_> = expected.iter().collect();
    let f: BTreeSet<_> = found.iter().collect();
    let mut problems: Vec<String> = e
        .difference(&f)
        .map(|(s, t)| format!("table {s}.{t} is missing after the restore"))
        .collect();
    problems.extend(
        f.difference(&e)
            .map(|(s, t)| format!("table {s}.{t} was restored but is not in the backup's table list")),
    );
    problems
}

fn stats_problems(expected: &[TableStats], actual: &[TableStats]) -> Vec<String> {
    expected
        .iter()
        .zip(actual)
        .filter_map(|(e, a)| {
            if e.rows != a.rows {
                Some(format!(
                    "table {}: {} rows restored, the backup recorded {}",
                    e.name(),
                    a.rows,
                    e.rows
                ))
            } else if e.checksum != a.checksum {
                Some(format!(
                    "table {}: checksum {} differs from the recorded {}",
                    e.name(),
                    a.checksum,
                    e.checksum
                ))
            } else {
                None
            }
        })
        .collect()
}

/// The step parameters of each action (`baton_shared::roles`: backup). Each
/// refuses what its action does not take: a misspelt `confirm_backup_id` must
/// fail loudly, not be ignored.
fn params<T: serde::de::DeserializeOwned>(job: &StepJob) -> Result<T, Error> {
    job.params().map_err(|e| Error::invalid(&job.action, e.to_string()))
}

/// `pre-deploy`, `prune`: the retention policy (`{daily, monthly, yearly}` counts).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Retention {
    retention: Option<Policy>,
}

/// `post-deploy`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PostDeploy {
    /// Accepted and checked (the seed gives both backup steps their retention);
    /// the daily prune is what applies a retention policy.
    #[allow(dead_code, reason = "only checked: the prune applies retention")]
    retention: Option<Policy>,
    /// The run must have a pre-deploy backup (default true).
    require_pre_deploy: bool,
}

impl Default for PostDeploy {
    fn default() -> Self {
        Self {
            retention: None,
            require_pre_deploy: true,
        }
    }
}

/// `verify`: which backup (see [`backup_id_param`]).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Which {
    backup_id: Option<String>,
    backup_step: Option<String>,
}

/// `restore`: which backup, and its id again as confirmation.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Restore {
    backup_id: Option<String>,
    backup_step: Option<String>,
    confirm_backup_id: Option<String>,
}

/// The backup an action is about: param `backup_id`, else the `backup_id`
/// output of the input step named by `backup_step`, else of the only input
/// that has one.
fn backup_id_param(job: &StepJob, which: &Which) -> Result<String, Error> {
    let invalid = |p: String| Error::invalid(&job.action, p);
    let from_outputs = |step: &str, out: &Fields| match out.get("backup_id") {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(invalid(format!("input step {step} has no `backup_id` output"))),
    };
    if let Some(id) = &which.backup_id {
        return Ok(id.clone());
    }
    if let Some(step) = &which.backup_step {
        let out = job
            .inputs
            .get(step)
            .ok_or_else(|| invalid(format!("no outputs of step {step} among the inputs")))?;
        return from_outputs(step, out);
    }
    let with_id: Vec<_> = job.inputs.iter().filter(|(_, o)| o.contains_key("backup_id")).collect();
    match with_id.as_slice() {
        [(step, out)] => from_outputs(step, out),
        [] => Err(invalid(
            "name the backup with param `backup_id` (no input step has a `backup_id` output)".to_owned(),
        )),
        _ => Err(invalid(format!(
            "several input steps have a `backup_id` output ({}); choose one with param `backup_step`",
            with_id.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn to_fields<T: Serialize>(value: &T) -> Result<Fields, Error> {
    baton_shared::protocol::to_fields(value).map_err(|e| Error::invalid("report", e.message))
}
