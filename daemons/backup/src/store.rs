//! Backups on disk: layout, manifests, atomic publication, the cross-zone copy,
//! integrity checks, quarantine and deletion.
//!
//! ```text
//! <location>/<zone>/<backup_id>/manifest.json      plaintext: ids, times, sizes, SHA-256s (no data)
//!                              /backup.dump.age    age-encrypted `pg_dump -Fc`
//!                              /tables.json.age    age-encrypted per-table row counts and checksums
//!                              /volume-<claim>.tar.age  age-encrypted tar of a persistent volume
//!                              /verified.json      written after the restore spot check passed
//! <location>/<zone>/.rejected/<backup_id>.<time>   backups that failed their own spot check
//! <location>/.incoming/                            staging; a backup appears by one rename
//! ```
//!
//! A backup directory is built under `.incoming/` and renamed into place, so a
//! directory with a manifest is always complete; two daemons racing on the
//! same backup id cannot both publish (the second rename fails).
//!
//! Everything here is blocking file I/O; callers run it on the blocking pool.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::crypto::{self, Digest256};
use crate::error::{Error, Site};
use crate::volume::{self, VolumeEntry};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const DUMP_FILE: &str = "backup.dump.age";
pub const TABLES_FILE: &str = "tables.json.age";
pub const VERIFIED_FILE: &str = "verified.json";
pub const INCOMING_DIR: &str = ".incoming";
pub const REJECTED_DIR: &str = ".rejected";

/// How the time a backup was set aside is written at the end of its name in `.rejected/`.
const REJECTED_TIME: &str = "%Y%m%dT%H%M%S%.fZ";

/// When the entry `name` of `.rejected/` was set aside, from its name.
pub fn rejected_at(name: &str) -> Option<DateTime<Utc>> {
    let mut parts = name.rsplitn(3, '.');
    let (frac, secs) = (parts.next()?, parts.next()?);
    parts.next()?;
    chrono::NaiveDateTime::parse_from_str(&format!("{secs}.{frac}"), REJECTED_TIME)
        .ok()
        .map(|t| t.and_utc())
}

/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// Why a backup was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupKind {
    PreDeploy,
    PostDeploy,
    /// The zone's daily backup, taken on the daemon's own schedule.
    Daily,
}

impl BackupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreDeploy => "pre-deploy",
            Self::PostDeploy => "post-deploy",
            Self::Daily => "daily",
        }
    }
}

/// SHA-256 and size of one file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

impl From<Digest256> for FileEntry {
    fn from(d: Digest256) -> Self {
        Self {
            sha256: d.sha256,
            bytes: d.bytes,
        }
    }
}

/// What a backup is, in plaintext: enough to find, check and prune it without
/// the key, and nothing of the data (table names and counts are encrypted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub backup_id: String,
    pub zone: String,
    pub service: String,
    pub run_id: Uuid,
    pub step_id: String,
    pub kind: BackupKind,
    /// When the snapshot was taken (the daemon's clock); retention uses it.
    pub created_at: DateTime<Utc>,
    /// Name of the database backed up (not its URL).
    pub database: String,
    pub pg_dump_version: String,
    /// age recipients the files are encrypted to.
    pub recipients: Vec<String>,
    /// Number of tables in `tables.json.age`.
    pub tables: usize,
    /// Every file of the backup except the manifest and the verified marker.
    pub files: BTreeMap<String, FileEntry>,
    /// The service's persistent volumes, each an archive among `files`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeEntry>,
}

impl Manifest {
    pub fn dump(&self) -> &FileEntry {
        self.files
            .get(DUMP_FILE)
            .expect("manifests are checked to list the dump")
    }
}

/// The verified marker: the spot check passed for these bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verified {
    pub verified_at: DateTime<Utc>,
    pub sha256: String,
    pub tables: usize,
}

/// One of the two configured locations.
#[derive(Debug, Clone)]
pub struct Location {
    pub site: Site,
    pub root: PathBuf,
    pub region: String,
}

impl Location {
    pub fn zone_dir(&self, zone: &str) -> PathBuf {
        self.root.join(zone)
    }

    pub fn backup_dir(&self, zone: &str, backup_id: &str) -> PathBuf {
        self.zone_dir(zone).join(backup_id)
    }

    fn incoming(&self) -> PathBuf {
        self.root.join(INCOMING_DIR)
    }

    /// A fresh private staging directory for `backup_id`.
    pub fn stage(&self, backup_id: &str) -> Result<PathBuf, Error> {
        let dir = self.incoming().join(format!("{backup_id}.{}", Uuid::new_v4().simple()));
        create_private_dir_all(&dir)?;
        Ok(dir)
    }

    /// Reads the manifest of `backup_id`; `None` if there is no such backup here.
    pub fn manifest(&self, zone: &str, backup_id: &str) -> Result<Option<Manifest>, Error> {
        read_manifest(&self.backup_dir(zone, backup_id), backup_id)
    }

    /// Moves a complete staged directory into place. `false` if the backup was
    /// already there (another attempt published first); the staged copy is removed.
    pub fn publish(&self, staged: &Path, zone: &str, backup_id: &str) -> Result<bool, Error> {
        let zone_dir = self.zone_dir(zone);
        create_private_dir_all(&zone_dir)?;
        let target = zone_dir.join(backup_id);
        match fs::rename(staged, &target) {
            Ok(()) => {
                sync_dir(&zone_dir)?;
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::AlreadyExists
                ) =>
            {
                let _ = fs::remove_dir_all(staged);
                Ok(false)
            }
            Err(e) => Err(Error::io(format!("publishing {}", target.display()))(e)),
        }
    }

    /// Every readable backup of `zone` here, with its directory. Directories
    /// without a readable manifest are not ours to judge and are skipped.
    pub fn list(&self, zone: &str) -> Result<Vec<Manifest>, Error> {
        let dir = self.zone_dir(zone);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()))(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Error::io(format!("listing {}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            match read_manifest(&entry.path(), &name) {
                Ok(Some(m)) if m.backup_id == name => out.push(m),
                Ok(Some(_)) => {
                    tracing::warn!(dir = %entry.path().display(), "manifest names another backup; skipped")
                }
                Ok(None) => tracing::warn!(dir = %entry.path().display(), "directory without manifest; skipped"),
                Err(e) => tracing::warn!(dir = %entry.path().display(), error = %e, "unreadable manifest; skipped"),
            }
        }
        out.sort_by(|a, b| a.backup_id.cmp(&b.backup_id));
        Ok(out)
    }

    /// Checks that every file the manifest lists is present with its recorded hash.
    pub fn check_files(&self, zone: &str, manifest: &Manifest) -> Result<(), Error> {
        let dir = self.backup_dir(zone, &manifest.backup_id);
        for (file, entry) in &manifest.files {
            let path = dir.join(file);
            let actual = match crypto::sha256_file(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(Error::FileMissing {
                        backup_id: manifest.backup_id.clone(),
                        site: self.site,
                        dir,
                        file: file.clone(),
                    });
                }
                Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
            };
            if actual.sha256 != entry.sha256 || actual.bytes != entry.bytes {
                return Err(Error::Corrupted {
                    backup_id: manifest.backup_id.clone(),
                    site: self.site,
                    dir,
                    file: file.clone(),
                    expected: entry.sha256.clone(),
                    actual: actual.sha256,
                });
            }
        }
        Ok(())
    }

    /// Writes (or replaces) the verified marker of a published backup.
    pub fn mark_verified(&self, zone: &str, backup_id: &str, verified: &Verified) -> Result<(), Error> {
        let dir = self.backup_dir(zone, backup_id);
        write_json_atomic(&dir, VERIFIED_FILE, verified)
    }

    /// The verified marker, if the spot check has passed for this backup.
    pub fn verified(&self, zone: &str, backup_id: &str) -> Result<Option<Verified>, Error> {
        let path = self.backup_dir(zone, backup_id).join(VERIFIED_FILE);
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()))(e)),
        }
    }

    /// Moves a backup that failed its spot check out of the way, for inspection.
    pub fn quarantine(&self, zone: &str, backup_id: &str) -> Result<Option<PathBuf>, Error> {
        let dir = self.backup_dir(zone, backup_id);
        if !dir.exists() {
            return Ok(None);
        }
        let rejected = self.zone_dir(zone).join(REJECTED_DIR);
        create_private_dir_all(&rejected)?;
        let target = rejected.join(format!("{backup_id}.{}", Utc::now().format(REJECTED_TIME)));
        fs::rename(&dir, &target).map_err(Error::io(format!("quarantining {}", dir.display())))?;
        Ok(Some(target))
    }

    /// Deletes a backup: first renamed out of the zone directory (so no half-deleted
    /// backup is ever listed), then removed.
    pub fn delete(&self, zone: &str, backup_id: &str) -> Result<bool, Error> {
        let dir = self.backup_dir(zone, backup_id);
        if !dir.exists() {
            return Ok(false);
        }
        let trash = self
            .incoming()
            .join(format!("deleted.{backup_id}.{}", Uuid::new_v4().simple()));
        create_private_dir_all(&self.incoming())?;
        fs::rename(&dir, &trash).map_err(Error::io(format!("deleting {}", dir.display())))?;
        fs::remove_dir_all(&trash).map_err(Error::io(format!("deleting {}", trash.display())))?;
        Ok(true)
    }

    /// Removes staging entries last modified more than `older_than` ago: what an
    /// attempt that died (or was cancelled) mid-dump left behind. Returns how many.
    pub fn clean_incoming(&self, older_than: std::time::Duration) -> Result<usize, Error> {
        remove_entries(&self.incoming(), "stale staging entry", |entry| {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > older_than)
        })
    }

    /// Removes backups set aside in `zone`'s `.rejected/` more than `older_than`
    /// before `now` (by the time in their name, not their files' age: a backup found
    /// rotten today is kept for inspection however old it is). Entries whose
    /// name carries no such time are not ours and stay. Returns how many went.
    pub fn clean_rejected(&self, zone: &str, older_than: chrono::Duration, now: DateTime<Utc>) -> Result<usize, Error> {
        remove_entries(&self.zone_dir(zone).join(REJECTED_DIR), "rejected backup", |entry| {
            rejected_at(&entry.file_name().to_string_lossy()).is_some_and(|at| now - at > older_than)
        })
    }

    /// Copies a published backup from `source` into this location, atomically.
    /// `false` if it was already here.
    pub fn copy_from(&self, source: &Location, zone: &str, manifest: &Manifest) -> Result<bool, Error> {
        let id = &manifest.backup_id;
        let from = source.backup_dir(zone, id);
        let staged = self.stage(id)?;
        let result = (|| {
            for file in manifest.files.keys().map(String::as_str).chain([MANIFEST_FILE]) {
                copy_file(&from.join(file), &staged.join(file))?;
            }
            sync_dir(&staged)?;
            self.publish(&staged, zone, id)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staged);
        }
        result
    }
}

/// Reads and checks a manifest; `None` if the directory has none.
fn read_manifest(dir: &Path, backup_id: &str) -> Result<Option<Manifest>, Error> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
    };
    let bad = |problem: String| Error::Manifest {
        backup_id: backup_id.to_owned(),
        dir: dir.to_owned(),
        problem,
    };
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if m.format != MANIFEST_FORMAT {
        return Err(bad(format!(
            "format {} is not the format {MANIFEST_FORMAT} this build reads",
            m.format
        )));
    }
    if !m.files.contains_key(DUMP_FILE) || !m.files.contains_key(TABLES_FILE) {
        return Err(bad(format!("it must list {DUMP_FILE} and {TABLES_FILE}")));
    }
    for v in &m.volumes {
        if !volume::valid_claim(&v.claim)
            || v.file != volume::archive_file_name(&v.claim)
            || !m.files.contains_key(&v.file)
        {
            return Err(bad(format!("volume {:?} is not listed as its archive file", v.claim)));
        }
    }
    if m.files.keys().any(|f| !is_plain_file_name(f)) {
        return Err(bad("it lists a file outside the backup directory".to_owned()));
    }
    Ok(Some(m))
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/') && name != MANIFEST_FILE
}

/// Removes the entries of `dir` that `select` picks (a missing `dir` has
/// none); one that cannot be removed is logged as `what` and left. Returns
/// how many went.
fn remove_entries(dir: &Path, what: &str, select: impl Fn(&fs::DirEntry) -> bool) -> Result<usize, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()))(e)),
    };
    let mut removed = 0;
    for entry in entries.flatten().filter(|e| select(e)) {
        let path = entry.path();
        let res = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match res {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "{what} not removed"),
        }
    }
    Ok(removed)
}

/// Writes `value` as JSON to `dir/name` via a temporary file and a rename.
pub fn write_json_atomic<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), Error> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.{}", Uuid::new_v4().simple()));
    let target = dir.join(name);
    let mut f = crypto::create_private(&tmp)?;
    let bytes = serde_json::to_vec_pretty(value).expect("backup metadata serialises");
    f.write_all(&bytes)
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(Error::io(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, &target).map_err(Error::io(format!("writing {}", target.display())))?;
    sync_dir(dir)
}

fn copy_file(from: &Path, to: &Path) -> Result<(), Error> {
    let mut src = fs::File::open(from).map_err(Error::io(format!("reading {}", from.display())))?;
    let mut dst = crypto::create_private(to)?;
    io::copy(&mut src, &mut dst)
        .and_then(|_| dst.sync_all())
        .map_err(Error::io(format!("copying {} to {}", from.display(), to.display())))?;
    Ok(())
}

/// Creates `dir` and its parents, readable by the owner only.
pub fn create_private_dir_all(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!("creating {}", dir.display())))
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(format!("syncing {}", dir.display())))
}

/// The id of the backup a step of a run takes of a service: the same (run,
/// step, service) always names the same backup, which makes the step idempotent.
pub fn backup_id(service: &str, step_id: &str, run_id: Uuid) -> Result<String, String> {
    baton_shared::protocol::check_name("backup", "service", service).map_err(|e| e.to_string())?;
    check_component("step id", step_id)?;
    Ok(format!("{service}.{step_id}.{run_id}"))
}

/// Checks that a backup id (from a job's params) is a single safe path component.
pub fn check_backup_id(id: &str) -> Result<(), String> {
    check_component("backup id", id)
}

fn check_component(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} is not usable in a backup id (1-200 characters of a-z, 0-9, '-', '_', '.', not starting with '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejected_entry_s_time_is_read_from_its_name() {
        let at = Utc::now();
        let name = format!(
            "shop-api.backup.pre.{}.{}",
            Uuid::from_u128(7),
            at.format(REJECTED_TIME)
        );
        assert_eq!(rejected_at(&name), Some(at));
        for junk in ["notes", "shop-api.x.y", "a.20261127T195600", "a.20261127T195600.5"] {
            assert_eq!(rejected_at(junk), None, "{junk}");
        }
    }

    #[test]
    fn backup_ids_are_deterministic_and_path_safe() {
        let run = Uuid::from_u128(7);
        let a = backup_id("shop-api", "backup.pre", run).unwrap();
        assert_eq!(a, backup_id("shop-api", "backup.pre", run).unwrap());
        assert_ne!(a, backup_id("shop-api", "backup.post", run).unwrap());
        assert!(backup_id("shop-api", "../etc", run).is_err());
        assert!(backup_id("Shop", "backup.pre", run).is_err());
        assert!(check_backup_id("..").is_err());
        assert!(check_backup_id("a/b").is_err());
        check_backup_id(&a).unwrap();
    }
}
