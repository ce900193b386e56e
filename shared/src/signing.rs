//! Ed25519 signatures on jobs, cancels and results.
//!
//! A message is signed over its canonical bytes: its JSON serialisation with
//! the `signature` field absent. The types serialise deterministically (fixed
//! field order, sorted maps, exact floats), so the receiver re-serialises what
//! it parsed and checks the signature over the same bytes. The signature names
//! its key (`ed25519:<key id>:<hex>`), so several keys can be trusted at once
//! while keys rotate.
//!
//! Key files hold one line, `baton-ed25519-secret:<64 hex chars of seed>`; the
//! public key is shared as `<key id>:<64 hex chars>`. `baton keygen` makes both.
//!
//! A trusted key may carry a scope, `<key id>:<hex>@<zone>[/<role>][,…]`: what
//! it signs is believed only for those zones (and roles). The scheduler gives
//! each zone's daemons a key of their own with the zone as its scope, so a
//! compromised staging host cannot sign a result or refusal for production
//! (docs/decisions.md, "Daemon keys are scoped to their zone"). A key without
//! a scope signs for every zone.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::protocol::{CancelJob, Refusal, StepJob, StepResult};
use crate::secret::Secret;

const SECRET_PREFIX: &str = "baton-ed25519-secret:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("unsigned: the message carries no signature")]
    Unsigned,
    #[error("signature is malformed: {0}")]
    Malformed(String),
    #[error("signed with unknown key id {0:?}")]
    UnknownKey(String),
    #[error("signature does not match the message (tampered or wrong key)")]
    Mismatch,
    #[error("key {key} may not sign for {zone}.{role}")]
    OutOfScope { key: String, zone: String, role: String },
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} is not a baton ed25519 secret key (expected `{SECRET_PREFIX}<64 hex>`)")]
    BadSecret { path: String },
    #[error(
        "public key {0:?} is not `<key id>:<64 hex chars>[@<zone>[/<role>],…]`, or its key id does not match the key"
    )]
    BadPublic(String),
}

/// The id of a public key: the first 16 hex characters of its SHA-256.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))[..16].to_owned()
}

/// A private signing key with its id; never printed.
#[derive(Clone)]
pub struct Keypair {
    id: String,
    key: Secret<SigningKey>,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({}, [redacted])", self.id)
    }
}

impl Keypair {
    /// A new random key.
    pub fn generate() -> Self {
        let seed: [u8; 32] = rand::random();
        Self::from_seed(seed)
    }

    fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        Self {
            id: key_id(&key.verifying_key()),
            key: Secret::new(key),
        }
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let bad = || KeyError::BadSecret {
            path: path.display().to_string(),
        };
        let hex_seed = text.trim().strip_prefix(SECRET_PREFIX).ok_or_else(bad)?;
        let seed: [u8; 32] = hex::decode(hex_seed)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        Ok(Self::from_seed(seed))
    }

    /// The secret key file's contents.
    pub fn secret_file_contents(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", hex::encode(self.key.expose().to_bytes()))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public half as `<key id>:<hex>`, for the other side's trusted keys.
    pub fn public(&self) -> String {
        format!(
            "{}:{}",
            self.id,
            hex::encode(self.key.expose().verifying_key().as_bytes())
        )
    }

    fn sign_bytes(&self, bytes: &[u8]) -> String {
        let sig = self.key.expose().sign(bytes);
        format!("ed25519:{}:{}", self.id, hex::encode(sig.to_bytes()))
    }

    /// Signs a message in place.
    pub fn sign<M: Signed>(&self, msg: &mut M) {
        msg.set_signature(None);
        let sig = self.sign_bytes(&canonical(msg));
        msg.set_signature(Some(sig));
    }
}

/// Public keys trusted to sign one kind of message, each with the zones and
/// roles it may sign for (none listed: all).
#[derive(Debug, Clone, Default)]
pub struct Trusted {
    keys: HashMap<String, (VerifyingKey, Vec<Scope>)>,
}

/// A zone, and optionally one role in it, that a key may sign for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scope {
    zone: String,
    role: Option<String>,
}

impl Scope {
    fn parse(s: &str) -> Option<Self> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        };
        let (zone, role) = match s.split_once('/') {
            Some((z, r)) => (z, Some(r)),
            None => (s, None),
        };
        (name_ok(zone) && role.is_none_or(name_ok)).then(|| Self {
            zone: zone.to_owned(),
            role: role.map(str::to_owned),
        })
    }

    fn allows(&self, zone: &str, role: &str) -> bool {
        self.zone == zone && self.role.as_deref().is_none_or(|r| r == role)
    }
}

impl Trusted {
    /// Parses `<key id>:<hex>[@<zone>[/<role>],…]` entries.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, KeyError> {
        let mut keys = HashMap::new();
        for e in entries {
            let e = e.as_ref().trim();
            let bad = || KeyError::BadPublic(e.to_owned());
            let (key_part, scopes) = match e.split_once('@') {
                Some((k, s)) => (
                    k,
                    s.split(',')
                        .map(|one| Scope::parse(one.trim()).ok_or_else(bad))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                None => (e, Vec::new()),
            };
            let (id, hex_key) = key_part.split_once(':').ok_or_else(bad)?;
            let bytes: [u8; 32] = hex::decode(hex_key)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(bad)?;
            let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
            if key_id(&key) != id {
                return Err(bad());
            }
            keys.insert(id.to_owned(), (key, scopes));
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks a message's signature and that its key may sign for `zone` and `role`.
    pub fn verify_for<M: Signed>(&self, msg: &M, zone: &str, role: &str) -> Result<(), SignatureError> {
        let id = self.check(msg)?;
        let scopes = &self.keys[id.as_str()].1;
        if scopes.is_empty() || scopes.iter().any(|s| s.allows(zone, role)) {
            Ok(())
        } else {
            Err(SignatureError::OutOfScope {
                key: id,
                zone: zone.to_owned(),
                role: role.to_owned(),
            })
        }
    }

    /// Checks a message's signature (whatever the key's scope).
    pub fn verify<M: Signed>(&self, msg: &M) -> Result<(), SignatureError> {
        self.check(msg).map(drop)
    }

    /// Checks the signature; returns the id of the key that made it.
    fn check<M: Signed>(&self, msg: &M) -> Result<String, SignatureError> {
        let sig = msg.signature().ok_or(SignatureError::Unsigned)?;
        let mut parts = sig.splitn(3, ':');
        let (Some("ed25519"), Some(id), Some(hex_sig)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SignatureError::Malformed("expected ed25519:<key id>:<hex>".to_owned()));
        };
        let (key, _) = self
            .keys
            .get(id)
            .ok_or_else(|| SignatureError::UnknownKey(id.to_owned()))?;
        let bytes: [u8; 64] = hex::decode(hex_sig)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| SignatureError::Malformed("signature is not 64 bytes of hex".to_owned()))?;
        let mut unsigned = msg.clone();
        unsigned.set_signature(None);
        key.verify(&canonical(&unsigned), &Signature::from_bytes(&bytes))
            .map_err(|_| SignatureError::Mismatch)?;
        Ok(id.to_owned())
    }
}

/// A message that carries its own signature.
pub trait Signed: Serialize + Clone {
    fn signature(&self) -> Option<&str>;
    fn set_signature(&mut self, sig: Option<String>);
}

fn canonical<M: Serialize>(msg: &M) -> Vec<u8> {
    serde_json::to_vec(msg).expect("protocol messages always serialise")
}

macro_rules! signed {
    ($($t:ty),+) => {$(
        impl Signed for $t {
            fn signature(&self) -> Option<&str> {
                self.signature.as_deref()
            }
            fn set_signature(&mut self, sig: Option<String>) {
                self.signature = sig;
            }
        }
    )+};
}

signed!(StepJob, StepResult, CancelJob, Refusal);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Deploy, JobKind, PROTOCOL_VERSION, Risk};
    use chrono::Utc;
    use uuid::Uuid;

    fn job() -> StepJob {
        let now = Utc::now();
        let mut params = crate::protocol::Fields::new();
        params.insert("ratio".into(), serde_json::json!(0.1 + 0.2));
        StepJob {
            v: PROTOCOL_VERSION,
            message_id: Uuid::new_v4(),
            run_id: Uuid::new_v4(),
            step_id: "db.production".into(),
            attempt: 1,
            kind: JobKind::Execute,
            zone: "production".into(),
            role: "db-migration".into(),
            action: "migrate".into(),
            params,
            inputs: Default::default(),
            own_outputs: Default::default(),
            deploy: Deploy {
                service: "shop".into(),
                environment: "production".into(),
                repository: "r".into(),
                commit_sha: "a".repeat(40),
                risk: Risk::Standard,
                exceptions: Vec::new(),
            },
            issued_at: now,
            not_after: now,
            deadline: now,
            heartbeat_ms: 1000,
            lease_ms: 0,
            traceparent: None,
            signature: None,
        }
    }

    #[test]
    fn signed_job_survives_the_wire_and_tampering_is_caught() {
        use crate::protocol::Message;
        let key = Keypair::generate();
        let trusted = Trusted::parse(&[key.public()]).unwrap();
        let mut j = job();
        key.sign(&mut j);
        let received = StepJob::parse(&j.to_bytes()).unwrap();
        assert_eq!(trusted.verify(&received), Ok(()));

        let mut tampered = received.clone();
        tampered.zone = "staging".into();
        assert_eq!(trusted.verify(&tampered), Err(SignatureError::Mismatch));
        let mut unsigned = received.clone();
        unsigned.signature = None;
        assert_eq!(trusted.verify(&unsigned), Err(SignatureError::Unsigned));
        let other = Keypair::generate();
        let mut foreign = job();
        other.sign(&mut foreign);
        assert_eq!(
            trusted.verify(&foreign),
            Err(SignatureError::UnknownKey(other.id().to_owned()))
        );
    }

    #[test]
    fn several_keys_are_trusted_during_rotation() {
        let (old, new) = (Keypair::generate(), Keypair::generate());
        let trusted = Trusted::parse(&[old.public(), new.public()]).unwrap();
        for k in [&old, &new] {
            let mut j = job();
            k.sign(&mut j);
            assert_eq!(trusted.verify(&j), Ok(()));
        }
    }

    #[test]
    fn a_scoped_key_signs_only_for_its_zones_and_roles() {
        let (staging, anywhere) = (Keypair::generate(), Keypair::generate());
        let trusted = Trusted::parse(&[
            format!("{}@staging,ci/container-build", staging.public()),
            anywhere.public(),
        ])
        .unwrap();
        let mut j = job();
        staging.sign(&mut j);
        assert_eq!(trusted.verify_for(&j, "staging", "db-migration"), Ok(()));
        assert_eq!(trusted.verify_for(&j, "ci", "container-build"), Ok(()));
        assert_eq!(
            trusted.verify_for(&j, "production", "db-migration"),
            Err(SignatureError::OutOfScope {
                key: staging.id().to_owned(),
                zone: "production".into(),
                role: "db-migration".into()
            })
        );
        assert!(trusted.verify_for(&j, "ci", "backup").is_err());
        anywhere.sign(&mut j);
        assert_eq!(trusted.verify_for(&j, "production", "backup"), Ok(()));
        for bad in ["@", "@Staging", "@staging/", "@staging,,ci"] {
            assert!(
                Trusted::parse(&[format!("{}{bad}", staging.public())]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn key_files_round_trip_and_bad_public_keys_are_refused() {
        let k = Keypair::generate();
        let dir = std::env::temp_dir().join(format!("baton-key-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, k.secret_file_contents()).unwrap();
        assert_eq!(Keypair::load(&path).unwrap().public(), k.public());
        assert!(!format!("{k:?}").contains(&k.secret_file_contents()[21..40]));
        std::fs::write(&path, "nonsense").unwrap();
        assert!(
            Keypair::load(&path)
                .unwrap_err()
                .to_string()
                .contains("not a baton ed25519")
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let mut wrong_id = k.public();
        wrong_id.replace_range(0..1, if wrong_id.starts_with('0') { "1" } else { "0" });
        assert!(Trusted::parse(&[wrong_id]).is_err());
    }
}
