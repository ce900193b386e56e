//! The facts contract: what a role reports in its step outputs that a gate or a
//! later step reads. One typed struct per fact set, used by the daemon that
//! writes it and by every reader (the scheduler's gates and engine, other
//! daemons); the field names below are the wire format.
//!
//! | role (action) | struct | read by |
//! |---|---|---|
//! | container-build (`build`) | [`ImageBuilt`] | image-match gate |
//! | staging-verify (`verify`) | [`StagingVerified`] | image-match, performance-regression gates |
//! | infrastructure (`plan`, `apply`) | [`TerraformPlanned`] | blast-radius gate |
//! | db-migration (`migrate`) | [`MigrationsApplied`] | backup-verified, maintenance-window, additive-first gates |
//! | backup (`pre-deploy`, `post-deploy`, `verify`) | [`BackupRef`] | backup-verified gate, db-migration, restore |
//!
//! Extra output fields are allowed and ignored by readers.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::protocol::Fields;

/// Why a step's outputs do not carry the facts a reader needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FactsError {
    #[error("no outputs of step {step} among the inputs; does this step need it?")]
    StepMissing { step: String },
    #[error("{step} reported no {field}")]
    Missing { step: String, field: String },
    #[error("outputs of step {step} are not {what}: {problem}")]
    Malformed {
        step: String,
        what: &'static str,
        problem: String,
    },
    #[error("backup {backup_id} from {step} is not of this run (it belongs to run {found})")]
    WrongRun {
        step: String,
        backup_id: String,
        found: Uuid,
    },
    #[error("backup {backup_id} from {step} is not verified")]
    NotVerified { step: String, backup_id: String },
}

/// A fact set: its name in messages, and its checks beyond types.
pub trait FactSet: Serialize + DeserializeOwned {
    /// What it is, for messages ("an image build report").
    const WHAT: &'static str;

    /// Checks beyond the field types; the default accepts.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    /// Reads the facts from the outputs of step `step`.
    fn read(step: &str, outputs: &Fields) -> Result<Self, FactsError> {
        let facts: Self = serde_json::from_value(Value::Object(outputs.clone())).map_err(|e| {
            let text = e.to_string();
            match text.strip_prefix("missing field `").and_then(|t| t.split_once('`')) {
                Some((field, _)) => FactsError::Missing {
                    step: step.to_owned(),
                    field: field.to_owned(),
                },
                None => FactsError::Malformed {
                    step: step.to_owned(),
                    what: Self::WHAT,
                    problem: text,
                },
            }
        })?;
        facts.check().map_err(|problem| FactsError::Malformed {
            step: step.to_owned(),
            what: Self::WHAT,
            problem,
        })?;
        Ok(facts)
    }

    /// The step outputs for these facts.
    fn to_fields(&self) -> Fields {
        crate::protocol::to_fields(self).expect("fact sets are structs")
    }
}

fn check_digest(field: &str, digest: &str) -> Result<(), String> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => Ok(()),
        _ => Err(format!("`{field}` is {digest:?}, not sha256:<64 lowercase hex digits>")),
    }
}

/// What a security scan of an image found, by severity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanSummary {
    pub critical: u64,
    pub high: u64,
    #[serde(default)]
    pub medium: u64,
    #[serde(default)]
    pub low: u64,
    /// Findings let through by the allow-list (vulnerability ids).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<String>,
}

/// container-build `build`: the image, by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageBuilt {
    /// `sha256:<hex>` of the image manifest.
    pub image_digest: String,
    /// The image reference, tagged with the full commit SHA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan: Option<ScanSummary>,
}

impl FactSet for ImageBuilt {
    const WHAT: &'static str = "an image build report";

    fn check(&self) -> Result<(), String> {
        check_digest("image_digest", &self.image_digest)
    }
}

/// staging-verify `verify`: which image staging verified, and how fast it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagingVerified {
    /// The digest of the image staging ran.
    pub image_digest: String,
    /// p95 latency against the previous verification's baseline, in percent
    /// slower (negative: faster).
    pub regression_percent: f64,
    /// The image reference production deploys (`<name>@sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How long staging was watched after the checks without degrading (the
    /// staging-soak gate wants at least its minimum).
    #[serde(default)]
    pub soak_seconds: u64,
    /// Whether staging was rolled back to the previous revision and forward
    /// again (the rollback-tested gate).
    #[serde(default)]
    pub rollback_tested: bool,
    /// How long that rollback took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_seconds: Option<f64>,
    /// The service's first deployment to staging: there is no earlier
    /// revision to roll back to.
    #[serde(default)]
    pub first_deployment: bool,
}

impl FactSet for StagingVerified {
    const WHAT: &'static str = "a staging verification report";

    fn check(&self) -> Result<(), String> {
        check_digest("image_digest", &self.image_digest)?;
        if !self.regression_percent.is_finite() {
            return Err("`regression_percent` is not a finite number".to_owned());
        }
        Ok(())
    }
}

/// infrastructure `plan` / `apply`: the size of the Terraform change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerraformPlanned {
    /// Resources the plan creates, updates, replaces or destroys.
    pub resources_changed: u64,
    #[serde(default)]
    pub add: u64,
    #[serde(default)]
    pub change: u64,
    #[serde(default)]
    pub destroy: u64,
    /// Each resource that changes and how, in the plan's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<ResourceChange>,
    /// SHA-256 (hex) of the saved plan file: what an approval approves and
    /// the apply applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_sha256: Option<String>,
    /// Changes in modules the merge did not touch (neither the module's files
    /// nor a module that calls it changed since the last apply): drift or a
    /// side effect nobody asked for. The blast-radius gate wants an approval
    /// for them whatever their number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unintended: Vec<ResourceChange>,
}

/// One resource a Terraform plan changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceChange {
    /// `module.db.terraform_data.schema[0]`.
    pub address: String,
    /// `create`, `update`, `replace` or `delete`.
    pub action: String,
}

impl FactSet for TerraformPlanned {
    const WHAT: &'static str = "a Terraform plan summary";
}

/// Something a migration renames or removes (the additive-first rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    /// The migration's tag.
    pub tag: String,
    /// What the statement does, e.g. `drops column`.
    pub change: String,
    /// The identifier that goes away (column, table, view, type or schema name).
    pub name: String,
    /// Files of the deployed commit's application code that still name it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
}

/// db-migration `migrate`: what the applied migrations do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationsApplied {
    /// Whether a migration of this deploy has a destructive statement.
    #[serde(default)]
    pub destructive: bool,
    /// Renames and removals, each with the code that still uses it.
    #[serde(default)]
    pub removals: Vec<Removal>,
}

impl FactSet for MigrationsApplied {
    const WHAT: &'static str = "a migration report";
}

impl MigrationsApplied {
    /// Renames and removals that application code of the same commit still uses.
    pub fn in_use(&self) -> impl Iterator<Item = &Removal> {
        self.removals.iter().filter(|r| !r.used_by.is_empty())
    }
}

/// A backup, exactly as a backup step reports it in its outputs:
///
/// ```json
/// {"backup_id": "shop-api.backup.pre.<run>", "run_id": "<run>", "verified": true,
///  "sha256": "<hex of the encrypted dump>", "location": "/srv/a/production/<id>",
///  "copy_location": "/srv/b/production/<id>", "region": "nl-ams1", "copy_region": "nl-ams2",
///  "tables": 3, "bytes": 12345}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRef {
    pub backup_id: String,
    pub run_id: Uuid,
    pub verified: bool,
    /// SHA-256 (hex) of the encrypted dump file.
    pub sha256: String,
    /// Directory of the backup in the primary location.
    pub location: String,
    /// Directory of the backup in the copy location.
    pub copy_location: String,
    pub region: String,
    pub copy_region: String,
    /// Number of tables the backup holds.
    pub tables: u64,
    /// Size in bytes of the encrypted dump file.
    pub bytes: u64,
    /// The service's persistent volumes, backed up with its database.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeBackup>,
}

/// One persistent volume of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeBackup {
    /// The PersistentVolumeClaim's name.
    pub claim: String,
    /// SHA-256 of the volume's tree (paths, kinds, permissions, owners, contents).
    pub tree_sha256: String,
    pub entries: u64,
    pub content_bytes: u64,
    /// `quiesced` (the service's writes were held) or `live` (read while it may write).
    pub consistency: String,
    /// Files seen changing while they were read (a live copy only).
    pub changed_while_copied: u64,
    /// Sockets, FIFOs and device nodes, which are not backed up.
    pub skipped: u64,
}

impl FactSet for BackupRef {
    const WHAT: &'static str = "a backup";

    fn check(&self) -> Result<(), String> {
        if self.backup_id.trim().is_empty() {
            return Err("`backup_id` is empty".to_owned());
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("`sha256` is {:?}, not 64 lowercase hex digits", self.sha256));
        }
        Ok(())
    }
}

impl BackupRef {
    /// A well-formed verified backup report for tests and examples; no such
    /// backup exists anywhere.
    pub fn example(backup_id: &str, run_id: Uuid) -> Self {
        Self {
            backup_id: backup_id.to_owned(),
            run_id,
            verified: true,
            sha256: "0".repeat(64),
            location: format!("/example/primary/{backup_id}"),
            copy_location: format!("/example/copy/{backup_id}"),
            region: "nl-ams1".to_owned(),
            copy_region: "nl-ams2".to_owned(),
            tables: 0,
            bytes: 0,
            volumes: Vec::new(),
        }
    }

    /// These facts as the verified backup of run `run_id`, or why they are not.
    pub fn verified_of_run(self, step: &str, run_id: Uuid) -> Result<Self, FactsError> {
        if self.run_id != run_id {
            return Err(FactsError::WrongRun {
                step: step.to_owned(),
                backup_id: self.backup_id,
                found: self.run_id,
            });
        }
        if !self.verified {
            return Err(FactsError::NotVerified {
                step: step.to_owned(),
                backup_id: self.backup_id,
            });
        }
        Ok(self)
    }
}

/// "This run has a verified backup": the backup that step `step` reported
/// (its outputs, from a job's inputs or the run's state) is complete, of run
/// `run_id`, and verified. The one rule for every reader.
pub fn verified_backup_of_run(step: &str, outputs: &Fields, run_id: Uuid) -> Result<BackupRef, FactsError> {
    BackupRef::read(step, outputs)?.verified_of_run(step, run_id)
}

/// The outputs of input step `step` in a job's inputs.
pub fn input<'a>(inputs: &'a BTreeMap<String, Fields>, step: &str) -> Result<&'a Fields, FactsError> {
    inputs
        .get(step)
        .ok_or_else(|| FactsError::StepMissing { step: step.to_owned() })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn backup(run: Uuid) -> BackupRef {
        BackupRef {
            backup_id: format!("shop-api.backup.pre.{run}"),
            run_id: run,
            verified: true,
            sha256: "a".repeat(64),
            location: "/srv/a".into(),
            copy_location: "/srv/b".into(),
            region: "nl-ams1".into(),
            copy_region: "nl-ams2".into(),
            tables: 3,
            bytes: 10,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn a_verified_backup_of_the_run_passes_and_round_trips() {
        let run = Uuid::from_u128(7);
        let b = backup(run);
        assert_eq!(verified_backup_of_run("backup.pre", &b.to_fields(), run).unwrap(), b);
        assert_eq!(b.to_fields().len(), 10);
    }

    #[test]
    fn every_way_a_backup_falls_short_is_named() {
        let run = Uuid::from_u128(7);
        let other = Uuid::from_u128(8);
        let e = verified_backup_of_run("backup.pre", &backup(other).to_fields(), run).unwrap_err();
        assert!(matches!(e, FactsError::WrongRun { found, .. } if found == other), "{e}");
        let mut b = backup(run);
        b.verified = false;
        let e = verified_backup_of_run("backup.pre", &b.to_fields(), run).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("backup {} from backup.pre is not verified", b.backup_id)
        );
        let mut f = backup(run).to_fields();
        f.remove("sha256");
        let e = verified_backup_of_run("backup.pre", &f, run).unwrap_err();
        assert_eq!(e.to_string(), "backup.pre reported no sha256");
        f.insert("sha256".into(), json!("ABC"));
        let e = verified_backup_of_run("backup.pre", &f, run).unwrap_err();
        assert!(e.to_string().contains("not 64 lowercase hex digits"), "{e}");
        f.insert("sha256".into(), json!("a".repeat(64)));
        f.insert("tables".into(), json!("three"));
        let e = verified_backup_of_run("backup.pre", &f, run).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("outputs of step backup.pre are not a backup: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn image_digests_must_be_sha256() {
        let f = json!({"image_digest": "latest"}).as_object().cloned().unwrap();
        let e = ImageBuilt::read("build", &f).unwrap_err();
        assert!(e.to_string().contains("not sha256:<64 lowercase hex digits>"), "{e}");
        let e = StagingVerified::read("verify.staging", &Fields::new()).unwrap_err();
        assert_eq!(e.to_string(), "verify.staging reported no image_digest");
    }
}
