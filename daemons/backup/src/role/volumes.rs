//! The role's side of persistent volumes (`crate::volume` has the files'):
//! each configured volume of a service is archived into its backup beside the
//! dump, held still by the service's quiesce command when it has one; the
//! spot check and the monthly restore test unpack every archive and compare
//! its tree hash; `restore-volumes` puts a backup's volumes back in place.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tokio::process::Command;

use super::{BackupRole, blocking};
use crate::config::VolumeConfig;
use crate::crypto::{self, HashingWriter};
use crate::error::Error;
use crate::store::{self, FileEntry, Location, Manifest};
use crate::volume::{self, Consistency, VolumeEntry};

/// How long a quiesce or resume command may take.
const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// What `restore-volumes` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumesRestored {
    pub backup_id: String,
    pub service: String,
    /// Which location the backup was read from.
    pub source: String,
    pub volumes: Vec<VolumeRestored>,
}

/// One volume put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeRestored {
    pub claim: String,
    pub path: String,
    pub entries: u64,
    pub tree_sha256: String,
    pub consistency: Consistency,
    /// Whether the volume's tree equalled the backup's right after the restore.
    pub matches_backup: bool,
}

impl BackupRole {
    fn volumes_of(&self, service: &str) -> &[VolumeConfig] {
        self.volumes.get(service).map(Vec::as_slice).unwrap_or_default()
    }

    /// Archives every configured volume of `service` into `staged`.
    pub(super) async fn archive_volumes(
        &self,
        staged: &Path,
        service: &str,
    ) -> Result<Vec<(VolumeEntry, FileEntry)>, Error> {
        let mut out = Vec::new();
        for v in self.volumes_of(service) {
            out.push(self.archive_volume(staged, v).await?);
        }
        Ok(out)
    }

    async fn archive_volume(&self, staged: &Path, v: &VolumeConfig) -> Result<(VolumeEntry, FileEntry), Error> {
        let held = Held::hold(v).await?;
        let file = volume::archive_file_name(&v.claim);
        let (src, dst, keys, claim) = (v.path.clone(), staged.join(&file), self.keys.clone(), v.claim.clone());
        let started = std::time::Instant::now();
        let archived = blocking(move || {
            let out = crypto::create_private(&dst)?;
            let w = keys.encryptor(HashingWriter::new(out))?;
            let (archived, w) =
                volume::archive(&src, w).map_err(Error::volume(&claim, format!("archiving {}", src.display())))?;
            let hw = w.finish().map_err(Error::io(format!("writing {}", dst.display())))?;
            Ok((archived, hw.finish_file(&dst)?))
        })
        .await;
        if let Some(held) = held
            && let Err(problem) = held.release().await
        {
            let problem = match &archived {
                Ok(_) => problem,
                Err(e) => format!("{problem} (and the copy failed: {e})"),
            };
            return Err(Error::Resume {
                claim: v.claim.clone(),
                problem,
            });
        }
        let (a, digest) = archived?;
        let consistency = Consistency::of(v);
        if a.changed_count > 0 {
            tracing::warn!(
                claim = %v.claim, changed = a.changed_count, paths = ?a.changed,
                "volume copied live: files changed while they were read"
            );
        }
        if a.skipped_count > 0 {
            tracing::warn!(claim = %v.claim, skipped = a.skipped_count, paths = ?a.skipped, "sockets, FIFOs or devices in the volume were not backed up");
        }
        tracing::info!(
            claim = %v.claim, entries = a.tree.entries, content_bytes = a.tree.content_bytes,
            encrypted_bytes = digest.bytes, consistency = ?consistency,
            elapsed_ms = started.elapsed().as_millis() as u64, "volume archived"
        );
        let entry = VolumeEntry {
            claim: v.claim.clone(),
            file,
            tree_sha256: a.tree.sha256,
            entries: a.tree.entries,
            content_bytes: a.tree.content_bytes,
            consistency,
            changed_while_copied: a.changed_count,
            skipped: a.skipped_count,
            root_mode: a.root_mode,
            root_uid: a.root_uid,
            root_gid: a.root_gid,
        };
        Ok((entry, digest.into()))
    }

    /// Unpacks every volume of `m` from `loc` into a scratch directory of
    /// that location and compares its tree with the recorded hash.
    pub(super) async fn check_volumes(&self, loc: &Location, zone: &str, m: &Manifest) -> Result<(), Error> {
        for v in &m.volumes {
            let scratch = {
                let (loc, id) = (loc.clone(), format!("{}.{}.check", m.backup_id, v.claim));
                blocking(move || loc.stage(&id)).await?
            };
            let archive = loc.backup_dir(zone, &m.backup_id).join(&v.file);
            let (keys, entry, id, dir) = (self.keys.clone(), v.clone(), m.backup_id.clone(), scratch.clone());
            let checked = blocking(move || unpack_and_check(&keys, &archive, &dir, &entry, &id)).await;
            if let Err(e) = std::fs::remove_dir_all(&scratch) {
                tracing::warn!(dir = %scratch.display(), error = %e, "volume check directory not removed");
            }
            checked?;
            tracing::info!(backup_id = %m.backup_id, claim = %v.claim, site = %loc.site, "volume restore check passed");
        }
        Ok(())
    }

    /// Puts the volumes of backup `backup_id` back in place: each is unpacked
    /// beside its live directory and checked, then swapped in (its writes held
    /// by its quiesce command if it has one).
    pub async fn restore_volumes(&self, zone: &str, service: &str, backup_id: &str) -> Result<VolumesRestored, Error> {
        store::check_backup_id(backup_id).map_err(|p| Error::invalid("restore-volumes", p))?;
        let (source, m) = self.restore_source_of(zone, service, backup_id).await?;
        // Every volume of the backup must be configured before any is touched.
        let targets = m
            .volumes
            .iter()
            .map(|entry| {
                self.volumes_of(service)
                    .iter()
                    .find(|c| c.claim == entry.claim)
                    .map(|cfg| (entry, cfg))
                    .ok_or_else(|| Error::NoVolume {
                        backup_id: backup_id.to_owned(),
                        claim: entry.claim.clone(),
                        service: service.to_owned(),
                    })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let mut volumes = Vec::new();
        for (entry, cfg) in targets {
            volumes.push(self.restore_volume(&source, zone, &m, entry, cfg).await?);
        }
        tracing::info!(backup_id, service, volumes = volumes.len(), source = %source.site, "volumes restored");
        Ok(VolumesRestored {
            backup_id: backup_id.to_owned(),
            service: service.to_owned(),
            source: source.site.as_str().to_owned(),
            volumes,
        })
    }

    async fn restore_volume(
        &self,
        source: &Location,
        zone: &str,
        m: &Manifest,
        entry: &VolumeEntry,
        cfg: &VolumeConfig,
    ) -> Result<VolumeRestored, Error> {
        let live = cfg.path.clone();
        let archive = source.backup_dir(zone, &m.backup_id).join(&entry.file);
        // Unpacked and checked beside the live directory before anything changes.
        let staged = {
            let (keys, entry, id, live) = (self.keys.clone(), entry.clone(), m.backup_id.clone(), live.clone());
            blocking(move || {
                if !live.exists() {
                    std::fs::create_dir(&live)
                        .map_err(Error::volume(&entry.claim, format!("creating {}", live.display())))?;
                }
                let dir = volume::sibling_dir(&live, "restore")
                    .map_err(Error::volume(&entry.claim, "staging the restore"))?;
                match unpack_and_check(&keys, &archive, &dir, &entry, &id) {
                    Ok(()) => Ok(dir),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        Err(e)
                    }
                }
            })
            .await?
        };
        let held = match Held::hold(cfg).await {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staged);
                return Err(e);
            }
        };
        tracing::warn!(claim = %entry.claim, path = %live.display(), backup_id = %m.backup_id, "replacing the live volume's files with the backup's");
        let swapped = {
            let (live, staged, claim) = (live.clone(), staged.clone(), entry.claim.clone());
            blocking(move || {
                let aside = volume::sibling_dir(&live, "replaced")
                    .map_err(Error::volume(&claim, "moving the live files aside"))?;
                volume::replace_contents(&live, &staged, &aside).map_err(Error::volume(
                    &claim,
                    format!("replacing the files of {}", live.display()),
                ))?;
                volume::tree(&live).map_err(Error::volume(&claim, "hashing the restored volume"))
            })
            .await
        };
        if let Some(held) = held
            && let Err(problem) = held.release().await
        {
            return Err(Error::Resume {
                claim: cfg.claim.clone(),
                problem,
            });
        }
        let tree = swapped?;
        Ok(VolumeRestored {
            claim: entry.claim.clone(),
            path: live.display().to_string(),
            entries: tree.entries,
            matches_backup: tree.sha256 == entry.tree_sha256,
            tree_sha256: tree.sha256,
            consistency: Consistency::of(cfg),
        })
    }
}

/// A service whose writes are held by its quiesce command, until
/// [`release`](Held::release) runs its resume command. Dropped unreleased (the
/// job cancelled or timed out mid-copy, a panic), it runs the resume command in
/// the background: a service is never left held because a copy was cut short.
struct Held {
    claim: String,
    resume: Option<Vec<String>>,
}

impl Held {
    /// Runs the volume's quiesce command, if it has one. Armed before it
    /// runs, since one that failed or was cut off may have taken effect: after
    /// a failed quiesce the resume command runs too (it must be harmless on a
    /// service that is not held).
    async fn hold(v: &VolumeConfig) -> Result<Option<Self>, Error> {
        if v.quiesce.is_empty() {
            return Ok(None);
        }
        let held = Self {
            claim: v.claim.clone(),
            resume: Some(v.resume.clone()),
        };
        if let Err(problem) = run_hook(&v.quiesce).await {
            let problem = match held.release().await {
                Ok(()) => problem,
                Err(again) => format!("{problem} (and the resume command after it failed: {again})"),
            };
            return Err(Error::Quiesce {
                claim: v.claim.clone(),
                problem,
            });
        }
        Ok(Some(held))
    }

    async fn release(mut self) -> Result<(), String> {
        match self.resume.take() {
            Some(argv) => run_hook(&argv).await,
            None => Ok(()),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(argv) = self.resume.take() else { return };
        let claim = std::mem::take(&mut self.claim);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    match run_hook(&argv).await {
                        Ok(()) => tracing::warn!(claim = %claim, "copy interrupted; the service's writes were let go"),
                        Err(e) => tracing::error!(claim = %claim, error = %e, "copy interrupted and the resume command failed: the service's writes may still be held"),
                    }
                });
            }
            Err(_) => {
                tracing::error!(claim = %claim, "copy interrupted outside a runtime: the resume command did not run")
            }
        }
    }
}

/// Decrypts and unpacks one volume archive into the empty directory `dir`.
fn unpack_volume(
    keys: &crypto::Keys,
    archive: &Path,
    dir: &Path,
    entry: &VolumeEntry,
    backup_id: &str,
) -> Result<(), Error> {
    let file = File::open(archive).map_err(Error::io(format!("reading {}", archive.display())))?;
    let plain = keys.decryptor(BufReader::new(file)).map_err(|e| Error::Decrypt {
        backup_id: backup_id.to_owned(),
        file: entry.file.clone(),
        problem: e.to_string(),
    })?;
    volume::unpack(BufReader::new(plain), dir, entry).map_err(|e| Error::Decrypt {
        backup_id: backup_id.to_owned(),
        file: entry.file.clone(),
        problem: format!("unpacking into {}: {e}", dir.display()),
    })
}

/// Unpacks one volume archive into the empty directory `dir` and compares
/// its tree with the hash the backup recorded.
fn unpack_and_check(
    keys: &crypto::Keys,
    archive: &Path,
    dir: &Path,
    entry: &VolumeEntry,
    backup_id: &str,
) -> Result<(), Error> {
    unpack_volume(keys, archive, dir, entry, backup_id)?;
    let tree = volume::tree(dir).map_err(Error::volume(&entry.claim, "hashing the restored copy"))?;
    if tree.sha256 == entry.tree_sha256 {
        return Ok(());
    }
    Err(Error::RestoreMismatch {
        backup_id: backup_id.to_owned(),
        problem: format!(
            "volume {}: the restored tree hashes to {} ({} entries), the backup recorded {} ({} entries)",
            entry.claim, tree.sha256, tree.entries, entry.tree_sha256, entry.entries
        ),
    })
}

/// Runs a quiesce or resume command; on failure its error output is logged
/// and its last line returned.
async fn run_hook(argv: &[String]) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("no command")?;
    let mut cmd = Command::new(PathBuf::from(program));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(HOOK_TIMEOUT, cmd.output()).await {
        Err(_) => return Err(format!("{program} did not finish within {} s", HOOK_TIMEOUT.as_secs())),
        Ok(Err(e)) => return Err(format!("cannot run {program}: {e}")),
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    tracing::warn!(program = %program, status = %out.status, stderr = %stderr.trim(), "volume hook failed");
    Err(format!("{program} exited with {}: {last}", out.status))
}
