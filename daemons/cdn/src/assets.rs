//! The static assets of a commit: content-hashed names checked against their
//! content, entry documents (the few mutable names that point at hashed ones),
//! content types.

use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::error::Error;

/// One file to deploy.
#[derive(Debug, Clone)]
pub struct Asset {
    /// Path under the assets folder, `/`-separated (`js/app.3f2a9c1b.js`).
    pub path: String,
    pub bytes: Vec<u8>,
    pub sha256: String,
    /// Immutable (content-hashed) or an entry document.
    pub hashed: bool,
}

/// A deployed or skipped file, as the outputs name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssetRef {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

impl Asset {
    pub fn reference(&self) -> AssetRef {
        AssetRef {
            path: self.path.clone(),
            sha256: self.sha256.clone(),
            bytes: self.bytes.len() as u64,
        }
    }
}

/// The hash part of a content-hashed name: a dot-separated segment of 8 to 64
/// lowercase hex digits before the extension (`app.3f2a9c1b.js`).
pub fn name_hash(file_name: &str) -> Option<&str> {
    let parts: Vec<&str> = file_name.split('.').collect();
    if parts.len() < 3 {
        return None;
    }
    parts[1..parts.len() - 1]
        .iter()
        .rev()
        .copied()
        .find(|p| (8..=64).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

pub fn entry_set(globs: &[String]) -> Result<GlobSet, Error> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(Glob::new(g).map_err(|e| Error::InvalidParam {
            name: "entry_documents".into(),
            problem: format!("{g:?}: {e}"),
        })?);
    }
    b.build().map_err(|e| Error::InvalidParam {
        name: "entry_documents".into(),
        problem: e.to_string(),
    })
}

/// Every file under `dir`, checked: a hashed name must match its content, and
/// a name without a hash must be an entry document.
pub fn scan(dir: &Path, shown: &str, entries: &GlobSet) -> Result<Vec<Asset>, Error> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    walk(dir, dir, &mut |rel, bytes| {
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        // Names go into storage and edge URLs as they are: characters that
        // would need encoding (or change a URL's meaning) are refused.
        if let Some(bad) = rel
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "-._~/@+".contains(*c)))
        {
            problems.push(format!(
                "{shown}/{rel}: {bad:?} in its name; asset names use letters, digits and - . _ ~ @ +"
            ));
        }
        let name = rel.rsplit('/').next().unwrap_or(&rel);
        let hashed = match name_hash(name) {
            Some(h) if sha256.starts_with(h) => true,
            Some(h) => {
                problems.push(format!(
                    "{shown}/{rel}: its name says content hash {h}, its content hashes to {}",
                    &sha256[..h.len()]
                ));
                true
            }
            None if entries.is_match(&rel) => false,
            None => {
                problems.push(format!(
                    "{shown}/{rel}: neither content-hashed (name.<8+ hex digits of its SHA-256>.ext) nor an entry document"
                ));
                false
            }
        };
        out.push(Asset {
            path: rel,
            bytes,
            sha256,
            hashed,
        });
    })
    .map_err(|e| Error::Io {
        what: format!("cannot read {shown}"),
        detail: e.to_string(),
    })?;
    if !problems.is_empty() {
        return Err(Error::AssetNames(problems));
    }
    if out.is_empty() {
        return Err(Error::AssetNames(vec![format!("{shown} holds no files")]));
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(root: &Path, dir: &Path, f: &mut dyn FnMut(String, Vec<u8>)) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let kind = e.file_type()?;
        if kind.is_dir() {
            walk(root, &path, f)?;
        } else if kind.is_file() {
            let rel = path
                .strip_prefix(root)
                .expect("under the root")
                .to_string_lossy()
                .replace('\\', "/");
            f(rel, std::fs::read(&path)?);
        }
    }
    Ok(())
}

/// The content type of a file, by extension.
pub fn content_type(path: &str) -> &'static str {
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_found_in_names() {
        assert_eq!(name_hash("app.3f2a9c1b.js"), Some("3f2a9c1b"));
        assert_eq!(name_hash("app.min.3f2a9c1b.js"), Some("3f2a9c1b"));
        assert_eq!(name_hash("app.js"), None);
        assert_eq!(name_hash("app.3F2A9C1B.js"), None);
        assert_eq!(name_hash("app.abc.js"), None);
        assert_eq!(content_type("a/b.WOFF2"), "font/woff2");
    }
}
