//! The built image as shipped: an OCI layout read from buildah's `oci-archive`,
//! its manifest checked against the digest, its layers applied in order
//! (whiteouts included) to know the final file list, and its size.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What the image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// `sha256:<hex>` of the manifest.
    pub digest: String,
    /// Number of layers.
    pub layers: usize,
    /// Manifest, config and layers as stored (compressed), in bytes.
    pub size_bytes: u64,
    /// Every path in the final file system, without a leading `/`.
    pub files: BTreeSet<String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// An image name prefix: lowercase registry host (with an optional port) and
/// path components, as the OCI distribution spec allows them.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let mut parts = prefix.split('/');
    let host = parts.next().unwrap_or_default();
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | ':'));
    if !host_ok {
        return Err(format!(
            "{prefix:?}: expected a lowercase registry host (e.g. localhost, registry.example.org:5000) and path"
        ));
    }
    for part in parts {
        check_component(part).map_err(|e| format!("{prefix:?}: {e}"))?;
    }
    Ok(())
}

/// One path component of an image name.
pub fn check_component(part: &str) -> Result<(), String> {
    let ok = !part.is_empty()
        && part
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        && part.starts_with(|c: char| c.is_ascii_alphanumeric())
        && part.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{part:?} is not an image name component (a-z, 0-9, '.', '_', '-', starting and ending with a letter or digit)"
        ))
    }
}

/// The forbidden-path globs, compiled.
pub fn forbidden_set(patterns: &[String]) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        let glob = GlobBuilder::new(p.trim_start_matches('/'))
            .literal_separator(true)
            .build()
            .map_err(|e| format!("{p:?}: {e}"))?;
        set.add(glob);
    }
    set.build().map_err(|e| e.to_string())
}

/// Unpacks an `oci-archive` into `layout` (an OCI image layout directory).
pub fn unpack_archive(archive: &Path, layout: &Path) -> Result<(), String> {
    let file = std::fs::File::open(archive).map_err(|e| format!("cannot open {}: {e}", archive.display()))?;
    std::fs::create_dir_all(layout).map_err(|e| format!("cannot create {}: {e}", layout.display()))?;
    tar::Archive::new(file)
        .unpack(layout)
        .map_err(|e| format!("cannot unpack {}: {e}", archive.display()))
}

fn blob_path(layout: &Path, digest: &str) -> Result<std::path::PathBuf, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("unsupported digest {digest:?}"))?;
    Ok(layout.join("blobs").join("sha256").join(hex))
}

fn read_blob(layout: &Path, digest: &str) -> Result<Vec<u8>, String> {
    let path = blob_path(layout, digest)?;
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read blob {digest}: {e}"))?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    if actual != digest {
        return Err(format!("blob {digest} has content {actual}: the archive is corrupt"));
    }
    Ok(bytes)
}

/// Reads the image `digest` from an OCI layout directory.
pub fn read_layout(layout: &Path, digest: &str) -> Result<Contents, String> {
    let index: Index = serde_json::from_slice(
        &std::fs::read(layout.join("index.json")).map_err(|e| format!("cannot read index.json: {e}"))?,
    )
    .map_err(|e| format!("index.json: {e}"))?;
    let entry = index
        .manifests
        .iter()
        .find(|m| m.digest == digest)
        .ok_or_else(|| format!("the archive's index does not list manifest {digest}"))?;
    let manifest_bytes = read_blob(layout, digest)?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(|e| format!("manifest {digest}: {e}"))?;
    let mut files = BTreeSet::new();
    for layer in &manifest.layers {
        let path = blob_path(layout, &layer.digest)?;
        let file = std::fs::File::open(&path).map_err(|e| format!("cannot read layer {}: {e}", layer.digest))?;
        // OCI's `…tar+gzip` and Docker's `…tar.gzip`; anything else but zstd is a plain tar.
        let reader: Box<dyn Read> = if layer.media_type.ends_with("gzip") {
            Box::new(flate2::read::GzDecoder::new(file))
        } else if layer.media_type.ends_with("zstd") {
            return Err(format!(
                "layer {} is zstd-compressed, which Baton does not read",
                layer.digest
            ));
        } else {
            Box::new(file)
        };
        apply_layer(&mut files, reader).map_err(|e| format!("layer {}: {e}", layer.digest))?;
    }
    let size_bytes = entry.size + manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>();
    Ok(Contents {
        digest: digest.to_owned(),
        layers: manifest.layers.len(),
        size_bytes,
        files,
    })
}

fn normalize(path: &str) -> String {
    path.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_owned()
}

/// Applies one layer's changes: additions, `.wh.<name>` deletions and
/// `.wh..wh..opq` opaque directories (the OCI image spec's whiteouts).
fn apply_layer(files: &mut BTreeSet<String>, reader: impl Read) -> Result<(), String> {
    let mut archive = tar::Archive::new(reader);
    let mut added = Vec::new();
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let raw = entry.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
        let path = normalize(&raw);
        if path.is_empty() {
            continue;
        }
        let (dir, base) = match path.rsplit_once('/') {
            Some((d, b)) => (d.to_owned(), b.to_owned()),
            None => (String::new(), path.clone()),
        };
        let under = |d: &str| if d.is_empty() { String::new() } else { format!("{d}/") };
        if base == ".wh..wh..opq" {
            let prefix = under(&dir);
            files.retain(|f| !prefix.is_empty() && !f.starts_with(&prefix));
        } else if let Some(gone) = base.strip_prefix(".wh.") {
            let target = format!("{}{gone}", under(&dir));
            let prefix = format!("{target}/");
            files.retain(|f| f != &target && !f.starts_with(&prefix));
        } else {
            added.push(path);
        }
    }
    files.extend(added);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[&str]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for path in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(0);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, std::io::empty()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_remove_files_and_opaque_directories() {
        let mut files = BTreeSet::new();
        apply_layer(
            &mut files,
            layer(&["./usr/bin/gcc", "usr/lib/a", "usr/lib/b", "etc/x", "keep/y"]).as_slice(),
        )
        .unwrap();
        apply_layer(
            &mut files,
            layer(&["usr/bin/.wh.gcc", "usr/lib/.wh..wh..opq", "usr/lib/c"]).as_slice(),
        )
        .unwrap();
        apply_layer(&mut files, layer(&[".wh.etc"]).as_slice()).unwrap();
        assert_eq!(files.into_iter().collect::<Vec<_>>(), ["keep/y", "usr/lib/c"]);
    }

    #[test]
    fn forbidden_globs_stay_within_segments() {
        let set = forbidden_set(&["usr/bin/gcc*".into(), "root/.cache/**".into()]).unwrap();
        let files = ["usr/bin/gcc-12", "usr/bin/gcc/x", "root/.cache/pip/a/b", "usr/bin/sh"];
        let hits: Vec<&str> = files.into_iter().filter(|f| set.is_match(f)).collect();
        assert_eq!(hits, ["usr/bin/gcc-12", "root/.cache/pip/a/b"]);
    }

    #[test]
    fn prefixes_follow_the_reference_grammar() {
        for ok in ["localhost", "registry.example.org:5000/shop", "ghcr.io/acme/team-a"] {
            check_prefix(ok).unwrap();
        }
        for bad in ["", "Registry", "ghcr.io/Acme", "ghcr.io//x", "ghcr.io/x-"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }
}
