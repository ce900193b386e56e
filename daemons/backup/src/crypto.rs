//! Encryption at rest with age (X25519), hashing, and streaming copies.
//!
//! Backups are encrypted to the configured recipients as they stream out of
//! `pg_dump`, so no plaintext dump ever touches the disk; the files are plain
//! age v1 files that `age -d -i key.txt` decrypts. The daemon holds the identity
//! only to verify and restore.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use age::x25519;
use baton_shared::secret::Secret;
use sha2::{Digest, Sha256};

use crate::error::Error;

/// The first bytes of every age v1 file.
pub const AGE_HEADER: &[u8] = b"age-encryption.org/v1\n";

/// The public keys backups are encrypted to, and the identity that opens them.
pub struct Keys {
    recipients: Vec<x25519::Recipient>,
    identities: Secret<Vec<x25519::Identity>>,
}

impl Keys {
    /// Keys from parsed values; at least one identity must open what the recipients encrypt.
    pub fn new(recipients: Vec<x25519::Recipient>, identities: Vec<x25519::Identity>) -> Result<Self, Error> {
        if recipients.is_empty() {
            return Err(Error::config("backup.recipients", "must not be empty"));
        }
        let publics: Vec<String> = recipients.iter().map(|r| r.to_string()).collect();
        if !identities.iter().any(|i| publics.contains(&i.to_public().to_string())) {
            return Err(Error::config(
                "backup.identity_file",
                "holds no identity matching any of backup.recipients; verify could not decrypt the backups",
            ));
        }
        Ok(Self {
            recipients,
            identities: Secret::new(identities),
        })
    }

    /// Parses the recipients and reads the identity file (`age-keygen` format:
    /// one `AGE-SECRET-KEY-1...` per line, `#` comments).
    pub fn load(recipients: &[String], identity_file: &Path) -> Result<Self, Error> {
        let recipients = recipients
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.parse::<x25519::Recipient>()
                    .map_err(|e| Error::config(format!("backup.recipients[{i}]"), format!("is {r:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let text = Secret::new(std::fs::read_to_string(identity_file).map_err(|e| {
            Error::config(
                "backup.identity_file",
                format!("cannot be read ({}): {e}", identity_file.display()),
            )
        })?);
        let mut identities = Vec::new();
        for (n, line) in text.expose().lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The line itself is secret: report only its number.
            let id = line.parse::<x25519::Identity>().map_err(|_| {
                Error::config(
                    "backup.identity_file",
                    format!(
                        "line {} of {} is not an age X25519 identity",
                        n + 1,
                        identity_file.display()
                    ),
                )
            })?;
            identities.push(id);
        }
        Self::new(recipients, identities)
    }

    /// The recipients as `age1...` strings, recorded in manifests.
    pub fn recipient_strings(&self) -> Vec<String> {
        self.recipients.iter().map(|r| r.to_string()).collect()
    }

    /// Wraps `out` so that what is written to it is encrypted to every recipient.
    pub fn encryptor<W: Write>(&self, out: W) -> Result<age::stream::StreamWriter<W>, Error> {
        let enc = age::Encryptor::with_recipients(self.recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| Error::Encrypt(e.to_string()))?;
        enc.wrap_output(out).map_err(|e| Error::Encrypt(e.to_string()))
    }

    /// A reader yielding the plaintext of the age file `input`.
    pub fn decryptor<R: Read>(&self, input: R) -> Result<age::stream::StreamReader<R>, age::DecryptError> {
        let dec = age::Decryptor::new(input)?;
        dec.decrypt(self.identities.expose().iter().map(|i| i as &dyn age::Identity))
    }

    /// Encrypts `plaintext` into a new file at `path`; returns its digest.
    pub fn encrypt_to_file(&self, plaintext: &[u8], path: &Path) -> Result<Digest256, Error> {
        let file = create_private(path)?;
        let mut w = self.encryptor(HashingWriter::new(file))?;
        w.write_all(plaintext)
            .map_err(Error::io(format!("writing {}", path.display())))?;
        let hw = w.finish().map_err(Error::io(format!("writing {}", path.display())))?;
        hw.finish_file(path)
    }
}

/// SHA-256 and length of a file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest256 {
    pub sha256: String,
    pub bytes: u64,
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }
}

impl HashingWriter<File> {
    /// Flushes and syncs the file, returning the digest of everything written.
    pub fn finish_file(mut self, path: &Path) -> Result<Digest256, Error> {
        self.inner
            .flush()
            .and_then(|_| self.inner.sync_all())
            .map_err(Error::io(format!("syncing {}", path.display())))?;
        Ok(Digest256 {
            sha256: hex::encode(self.hasher.finalize()),
            bytes: self.bytes,
        })
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Creates a file only its owner can read (backups are encrypted, but need not be readable by all).
pub fn create_private(path: &Path) -> Result<File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(format!("creating {}", path.display())))
}

/// SHA-256 and length of the file at `path`.
pub fn sha256_file(path: &Path) -> io::Result<Digest256> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(Digest256 {
        sha256: hex::encode(hasher.finalize()),
        bytes,
    })
}

/// Why a streaming copy stopped: the distinction decides whom to blame.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source failed (for a decryptor: the ciphertext is bad).
    Read(io::Error),
    /// Writing the destination failed (for a pipe: the tool on the other end quit).
    Write(io::Error),
}

/// Copies `from` into `to` until end of input.
pub fn copy_stream(from: &mut impl Read, to: &mut impl Write) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
    to.flush().map_err(CopyError::Write)?;
    Ok(total)
}

/// A fresh age identity written to `path` (mode 0600, which must not exist) in
/// the format `age-keygen` writes; returns its recipient.
pub fn keygen(path: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    use age::secrecy::ExposeSecret;
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    writeln!(f, "# public key: {recipient}")?;
    writeln!(f, "{}", identity.to_string().expose_secret())?;
    Ok(recipient)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        let id = x25519::Identity::generate();
        Keys::new(vec![id.to_public()], vec![id]).unwrap()
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let k = keys();
        let mut out = Vec::new();
        let mut w = k.encryptor(&mut out).unwrap();
        w.write_all(b"hello tables").unwrap();
        w.finish().unwrap();
        assert!(out.starts_with(AGE_HEADER));
        let mut plain = Vec::new();
        k.decryptor(&out[..]).unwrap().read_to_end(&mut plain).unwrap();
        assert_eq!(plain, b"hello tables");
        let last = out.len() - 1;
        out[last] ^= 1;
        let mut plain = Vec::new();
        let res = k
            .decryptor(&out[..])
            .and_then(|mut r| r.read_to_end(&mut plain).map_err(Into::into));
        assert!(res.is_err(), "a flipped byte must not decrypt");
    }

    #[test]
    fn identity_must_match_a_recipient() {
        let a = x25519::Identity::generate();
        let b = x25519::Identity::generate();
        let err = Keys::new(vec![a.to_public()], vec![b]).err().unwrap();
        assert!(err.to_string().contains("backup.identity_file"), "{err}");
    }
}
