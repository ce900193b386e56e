//! The outputs contract of `pre-deploy` / `post-deploy` (and `verify`), and how a
//! later step reads it back.
//!
//! Other daemons (db-migration before a destructive migration, production-apply
//! before it applies) check that the run has a verified backup. They must not
//! import this crate (DESIGN §15), so [`verified_backup_of_run`] is small and
//! meant to be mirrored.

use std::collections::BTreeMap;

use baton_shared::protocol::Fields;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A verified backup, exactly as a backup step reports it in its outputs:
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
}

impl BackupRef {
    /// The step outputs: exactly the ten contract fields.
    pub fn to_fields(&self) -> Fields {
        match serde_json::to_value(self).expect("BackupRef serialises") {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("a struct serialises to an object"),
        }
    }
}

/// Why a step's inputs do not show a verified backup for the run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackupRefError {
    #[error("no outputs of step {step} among the inputs; does this step need it?")]
    StepMissing { step: String },
    #[error("outputs of step {step} are not an object")]
    NotAnObject { step: String },
    #[error("outputs of step {step} are not a backup: {problem}")]
    Malformed { step: String, problem: String },
    #[error("backup {backup_id} from step {step} belongs to run {found}, not to run {expected}")]
    WrongRun {
        step: String,
        backup_id: String,
        expected: Uuid,
        found: Uuid,
    },
    #[error("backup {backup_id} from step {step} is not verified")]
    NotVerified { step: String, backup_id: String },
}

/// The verified backup that step `step` took for run `run_id`, read from a
/// job's inputs.
///
/// `inputs` is the job's `inputs` as one JSON object: step id -> that step's
/// outputs (`serde_json::to_value(&job.inputs)`; see [`inputs_as_fields`]).
/// Succeeds only if the step's outputs carry every contract field with the
/// right type, `run_id` is this run, `verified` is `true`, `sha256` is 64
/// lowercase hex digits and `backup_id` is not empty. Extra fields are ignored.
pub fn verified_backup_of_run(inputs: &Fields, step: &str, run_id: Uuid) -> Result<BackupRef, BackupRefError> {
    let outputs = inputs
        .get(step)
        .ok_or_else(|| BackupRefError::StepMissing { step: step.to_owned() })?;
    if !outputs.is_object() {
        return Err(BackupRefError::NotAnObject { step: step.to_owned() });
    }
    let malformed = |problem: String| BackupRefError::Malformed {
        step: step.to_owned(),
        problem,
    };
    let backup: BackupRef = serde_json::from_value(outputs.clone()).map_err(|e| malformed(e.to_string()))?;
    if backup.backup_id.is_empty() {
        return Err(malformed("`backup_id` is empty".to_owned()));
    }
    if backup.sha256.len() != 64
        || !backup
            .sha256
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err(malformed(format!(
            "`sha256` is {:?}, not 64 lowercase hex digits",
            backup.sha256
        )));
    }
    if backup.run_id != run_id {
        return Err(BackupRefError::WrongRun {
            step: step.to_owned(),
            backup_id: backup.backup_id,
            expected: run_id,
            found: backup.run_id,
        });
    }
    if !backup.verified {
        return Err(BackupRefError::NotVerified {
            step: step.to_owned(),
            backup_id: backup.backup_id,
        });
    }
    Ok(backup)
}

/// A job's `inputs` (step id -> outputs) as the one JSON object
/// [`verified_backup_of_run`] takes.
pub fn inputs_as_fields(inputs: &BTreeMap<String, Fields>) -> Fields {
    inputs
        .iter()
        .map(|(step, out)| (step.clone(), serde_json::Value::Object(out.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(run: Uuid) -> BackupRef {
        BackupRef {
            backup_id: format!("shop-api.backup.pre.{run}"),
            run_id: run,
            verified: true,
            sha256: "ab".repeat(32),
            location: "/srv/a/production/x".into(),
            copy_location: "/srv/b/production/x".into(),
            region: "nl-ams1".into(),
            copy_region: "nl-ams2".into(),
            tables: 3,
            bytes: 1234,
        }
    }

    #[test]
    fn outputs_have_exactly_the_contract_fields() {
        let fields = sample(Uuid::from_u128(1)).to_fields();
        let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        let mut expected = vec![
            "backup_id",
            "run_id",
            "verified",
            "sha256",
            "location",
            "copy_location",
            "region",
            "copy_region",
            "tables",
            "bytes",
        ];
        expected.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, expected);
        assert!(fields["tables"].is_u64() && fields["bytes"].is_u64() && fields["verified"] == json!(true));
    }

    #[test]
    fn the_verified_backup_of_the_run_is_found() {
        let run = Uuid::from_u128(1);
        let mut inputs = BTreeMap::new();
        inputs.insert("backup.pre".to_owned(), sample(run).to_fields());
        let inputs = inputs_as_fields(&inputs);
        assert_eq!(verified_backup_of_run(&inputs, "backup.pre", run).unwrap(), sample(run));
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        let run = Uuid::from_u128(1);
        let with = |f: &dyn Fn(&mut Fields)| {
            let mut out = sample(run).to_fields();
            f(&mut out);
            let mut inputs = Fields::new();
            inputs.insert("backup.pre".into(), serde_json::Value::Object(out));
            verified_backup_of_run(&inputs, "backup.pre", run)
        };
        assert!(matches!(
            verified_backup_of_run(&Fields::new(), "backup.pre", run),
            Err(BackupRefError::StepMissing { .. })
        ));
        assert!(matches!(
            with(&|o| {
                o.insert("run_id".into(), json!(Uuid::from_u128(2)));
            }),
            Err(BackupRefError::WrongRun { .. })
        ));
        assert!(matches!(
            with(&|o| {
                o.insert("verified".into(), json!(false));
            }),
            Err(BackupRefError::NotVerified { .. })
        ));
        let err = with(&|o| {
            o.remove("sha256");
        })
        .unwrap_err();
        assert!(err.to_string().contains("sha256"), "{err}");
        assert!(matches!(
            with(&|o| {
                o.insert("sha256".into(), json!("XYZ"));
            }),
            Err(BackupRefError::Malformed { .. })
        ));
        assert!(
            with(&|o| {
                o.insert("extra".into(), json!(1));
            })
            .is_ok()
        );
    }
}
