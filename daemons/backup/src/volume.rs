//! Persistent volumes: a directory on the node per volume (what k3s's default
//! local-path provisioner makes of a claim), archived as tar, encrypted with
//! age beside the database dump, and checked by a content hash of its tree.
//!
//! The tree hash covers, for the volume's root and every entry below it in
//! byte order of the names: the relative path, the kind (directory, file,
//! symbolic link), the permission bits (with setuid, setgid and sticky), the
//! numeric owner and group, the size, and the SHA-256 of a file's content or
//! a link's target. Modification times and hard links are not part of it (tar
//! keeps the times; hard-linked paths come back as separate files). Sockets,
//! FIFOs and device nodes are not archived; they are counted and named.
//!
//! Everything here is blocking file I/O; callers run it on the blocking pool.

use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How many changed or skipped paths a report names (the rest are counted).
pub const NAMED: usize = 10;

/// The name of a volume's archive in a backup directory.
pub fn archive_file_name(claim: &str) -> String {
    format!("volume-{claim}.tar.age")
}

/// Whether `claim` can be a PersistentVolumeClaim's name (an RFC 1123
/// subdomain), which also keeps it a plain file name.
pub fn valid_claim(claim: &str) -> bool {
    !claim.is_empty()
        && claim.len() <= 253
        && claim
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && claim.split('.').all(|part| {
            !part.is_empty()
                && part.as_bytes()[0].is_ascii_alphanumeric()
                && part.as_bytes()[part.len() - 1].is_ascii_alphanumeric()
        })
}

/// How the copy was made consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// The configured quiesce command held the service's writes during the copy.
    Quiesced,
    /// Nothing held the service's writes: files were read while it may have
    /// written; those seen changing are counted in `changed_while_copied`.
    Live,
}

impl Consistency {
    /// How a volume with this configuration is copied.
    pub fn of(v: &crate::config::VolumeConfig) -> Self {
        if v.quiesce.is_empty() {
            Self::Live
        } else {
            Self::Quiesced
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quiesced => "quiesced",
            Self::Live => "live",
        }
    }
}

/// A volume as its backup's manifest records it (no file names, no data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeEntry {
    /// The PersistentVolumeClaim's name.
    pub claim: String,
    /// The archive's file in the backup directory.
    pub file: String,
    /// SHA-256 of the tree (see the module's documentation).
    pub tree_sha256: String,
    /// Entries below the root.
    pub entries: u64,
    /// Bytes of file content.
    pub content_bytes: u64,
    pub consistency: Consistency,
    /// Files whose size or times changed while they were read.
    pub changed_while_copied: u64,
    /// Sockets, FIFOs and device nodes, not archived.
    pub skipped: u64,
    /// The root directory's permission bits, owner and group.
    pub root_mode: u32,
    pub root_uid: u32,
    pub root_gid: u32,
}

/// What a tree hashes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    pub sha256: String,
    pub entries: u64,
    pub content_bytes: u64,
}

/// What archiving a volume saw.
#[derive(Debug, Clone)]
pub struct Archived {
    pub tree: Tree,
    pub root_mode: u32,
    pub root_uid: u32,
    pub root_gid: u32,
    /// Up to [`NAMED`] paths, and the counts.
    pub changed: Vec<String>,
    pub changed_count: u64,
    pub skipped: Vec<String>,
    pub skipped_count: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Link,
    Other,
}

fn kind(meta: &Metadata) -> Kind {
    let t = meta.file_type();
    if t.is_dir() {
        Kind::Dir
    } else if t.is_file() {
        Kind::File
    } else if t.is_symlink() {
        Kind::Link
    } else {
        Kind::Other
    }
}

/// The tree hash, fed one entry at a time in walk order.
struct TreeHasher {
    hash: Sha256,
    entries: u64,
    content_bytes: u64,
}

impl TreeHasher {
    fn new() -> Self {
        Self {
            hash: Sha256::new(),
            entries: 0,
            content_bytes: 0,
        }
    }

    /// One entry: NUL-separated fields, so no field can run into the next
    /// (paths and link targets cannot hold NUL).
    fn entry(&mut self, rel: &Path, kind: Kind, meta: &Metadata, size: u64, content: &[u8]) {
        let tag: &[u8] = match kind {
            Kind::Dir => b"d",
            Kind::File => b"f",
            Kind::Link => b"l",
            Kind::Other => return,
        };
        let fields = format!("{:o}\0{}\0{}\0{size}\0", meta.mode() & 0o7777, meta.uid(), meta.gid());
        let path = rel.as_os_str().as_bytes();
        for part in [tag, b"\0", path, b"\0", fields.as_bytes(), content, b"\n"] {
            self.hash.update(part);
        }
        if !rel.as_os_str().is_empty() {
            self.entries += 1;
        }
        if kind == Kind::File {
            self.content_bytes += size;
        }
    }

    fn finish(self) -> Tree {
        Tree {
            sha256: hex::encode(self.hash.finalize()),
            entries: self.entries,
            content_bytes: self.content_bytes,
        }
    }
}

/// An entry as the walk found it, opened where it has contents.
enum Node {
    Dir,
    File(File),
    Link(PathBuf),
    Other,
}

/// `path`, opened without following a symbolic link in its last component
/// (a directory if `dir`).
fn open_nofollow(path: &Path, dir: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = libc::O_NOFOLLOW | libc::O_CLOEXEC | if dir { libc::O_DIRECTORY } else { 0 };
    File::options().read(true).custom_flags(flags).open(path)
}

/// Whether an open failed because the entry is no longer what was listed
/// (gone, or replaced by a symbolic link or another kind).
fn replaced(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))
}

fn same_inode(a: &Metadata, b: &Metadata) -> bool {
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

/// Calls `visit(relative path, metadata, node)` for every entry below the
/// directory `root`, each directory's entries in byte order of their names, a
/// directory before what it holds, and `gone(relative path)` for an entry that
/// disappeared or changed kind while the walk went by.
///
/// Every lookup is anchored on the descriptor of the directory already opened
/// (through `/proc/self/fd/<fd>/<name>`, with `O_NOFOLLOW`) and an opened
/// entry must be the inode that was listed, so a writer swapping a directory
/// or file for a symbolic link cannot lead the walk outside the volume.
fn walk(
    root: &File,
    visit: &mut dyn FnMut(&Path, &Metadata, Node) -> io::Result<()>,
    gone: &mut dyn FnMut(&Path),
) -> io::Result<()> {
    fn inner(
        dir: &File,
        rel: &Path,
        visit: &mut dyn FnMut(&Path, &Metadata, Node) -> io::Result<()>,
        gone: &mut dyn FnMut(&Path),
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let base = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let context =
            |what: &str, rel: &Path, e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", rel.display()));
        let mut names: Vec<_> = fs::read_dir(&base)
            .map_err(|e| context("listing", rel, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(|e| context("listing", rel, e))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let rel = rel.join(&name);
            let at = base.join(&name);
            let listed = match fs::symlink_metadata(&at) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    gone(&rel);
                    continue;
                }
                Err(e) => return Err(context("reading", &rel, e)),
            };
            match kind(&listed) {
                k @ (Kind::Dir | Kind::File) => {
                    let f = match open_nofollow(&at, k == Kind::Dir) {
                        Ok(f) => f,
                        Err(e) if replaced(&e) => {
                            gone(&rel);
                            continue;
                        }
                        Err(e) => return Err(context("opening", &rel, e)),
                    };
                    let meta = f.metadata()?;
                    if !same_inode(&listed, &meta) {
                        gone(&rel);
                        continue;
                    }
                    if k == Kind::Dir {
                        visit(&rel, &meta, Node::Dir)?;
                        inner(&f, &rel, visit, gone)?;
                    } else {
                        visit(&rel, &meta, Node::File(f))?;
                    }
                }
                Kind::Link => match fs::read_link(&at) {
                    Ok(target) => visit(&rel, &listed, Node::Link(target))?,
                    Err(e) if replaced(&e) || e.kind() == io::ErrorKind::InvalidInput => gone(&rel),
                    Err(e) => return Err(context("reading the link", &rel, e)),
                },
                Kind::Other => visit(&rel, &listed, Node::Other)?,
            }
        }
        Ok(())
    }
    inner(root, Path::new(""), visit, gone)
}

/// The directory `root`, opened (not through a symbolic link), and its metadata.
fn open_root(root: &Path) -> io::Result<(File, Metadata)> {
    let f = open_nofollow(root, true).map_err(|e| {
        let why = if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) {
            "is not a directory (a symbolic link is not followed)".to_owned()
        } else {
            e.to_string()
        };
        io::Error::new(e.kind(), format!("{} {why}", root.display()))
    })?;
    let meta = f.metadata()?;
    Ok((f, meta))
}

/// The tree hash of the directory `root` as it is now.
pub fn tree(root: &Path) -> io::Result<Tree> {
    let mut hasher = TreeHasher::new();
    let (dir, meta) = open_root(root)?;
    hasher.entry(Path::new(""), Kind::Dir, &meta, 0, b"");
    walk(
        &dir,
        &mut |rel, meta, node| {
            match node {
                Node::File(mut f) => {
                    let mut h = Sha256::new();
                    let n = io::copy(&mut f, &mut h)?;
                    hasher.entry(rel, Kind::File, meta, n, hex::encode(h.finalize()).as_bytes());
                }
                Node::Link(target) => hasher.entry(rel, Kind::Link, meta, 0, target.as_os_str().as_bytes()),
                Node::Dir => hasher.entry(rel, Kind::Dir, meta, 0, b""),
                Node::Other => {}
            }
            Ok(())
        },
        &mut |_| {},
    )?;
    Ok(hasher.finish())
}

/// Reads exactly `left` bytes (zeros after an early end: the file shrank
/// while read) and hashes what it gives, which is what the archive holds.
struct Exactly<R> {
    inner: R,
    left: u64,
    hash: Sha256,
    short: bool,
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let mut n = if self.short {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        if n == 0 {
            self.short = true;
            buf[..want].fill(0);
            n = want;
        }
        self.hash.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

fn changed(before: &Metadata, after: &Metadata) -> bool {
    (
        before.len(),
        before.mtime(),
        before.mtime_nsec(),
        before.ctime(),
        before.ctime_nsec(),
    ) != (
        after.len(),
        after.mtime(),
        after.mtime_nsec(),
        after.ctime(),
        after.ctime_nsec(),
    )
}

/// Appends a symbolic link at `rel` pointing to `target`, byte for byte (the
/// tar crate's own `append_link` tidies targets such as `a//b` or `x/.`,
/// which would then not be the link that was read).
fn append_symlink<W: Write>(
    builder: &mut tar::Builder<W>,
    header: &mut tar::Header,
    rel: &Path,
    target: &[u8],
) -> io::Result<()> {
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    if target.len() >= 100 {
        // GNU's long link name: a `K` entry holding the target, then the link.
        let mut long = tar::Header::new_gnu();
        long.set_entry_type(tar::EntryType::GNULongLink);
        long.as_gnu_mut().expect("a GNU header").name[..13].copy_from_slice(b"././@LongLink");
        long.set_mode(0o644);
        long.set_size(target.len() as u64 + 1);
        long.set_cksum();
        builder.append(&long, target.chain(&[0u8][..]))?;
        header.set_link_name_literal(&target[..99])?;
    } else {
        header.set_link_name_literal(target)?;
    }
    builder.append_data(header, rel, io::empty())
}

/// Writes `root` as a tar stream to `out`, hashing the tree as archived.
pub fn archive<W: Write>(root: &Path, out: W) -> io::Result<(Archived, W)> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let (dir, meta) = open_root(root)?;
    let mut hasher = TreeHasher::new();
    hasher.entry(Path::new(""), Kind::Dir, &meta, 0, b"");
    let (mut changed_paths, mut skipped_paths) = (Vec::new(), Vec::new());
    let (mut changed_count, mut skipped_count) = (0u64, 0u64);
    let note = |paths: &mut Vec<String>, count: &mut u64, rel: &Path| {
        *count += 1;
        if paths.len() < NAMED {
            paths.push(rel.display().to_string());
        }
    };
    let mut gone = Vec::new();
    walk(
        &dir,
        &mut |rel, meta, node| {
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
            match node {
                Node::Dir => {
                    header.set_size(0);
                    builder.append_data(&mut header, rel, io::empty())?;
                    hasher.entry(rel, Kind::Dir, meta, 0, b"");
                }
                Node::Link(target) => {
                    let bytes = target.as_os_str().as_bytes();
                    append_symlink(&mut builder, &mut header, rel, bytes)?;
                    hasher.entry(rel, Kind::Link, meta, 0, bytes);
                }
                Node::File(file) => {
                    let size = meta.len();
                    header.set_size(size);
                    let mut reader = Exactly {
                        inner: &file,
                        left: size,
                        hash: Sha256::new(),
                        short: false,
                    };
                    builder.append_data(&mut header, rel, &mut reader)?;
                    let after = file.metadata()?;
                    if reader.short || changed(meta, &after) {
                        note(&mut changed_paths, &mut changed_count, rel);
                    }
                    let sha = hex::encode(std::mem::take(&mut reader.hash).finalize());
                    hasher.entry(rel, Kind::File, meta, size, sha.as_bytes());
                }
                Node::Other => note(&mut skipped_paths, &mut skipped_count, rel),
            }
            Ok(())
        },
        &mut |rel| gone.push(rel.to_owned()),
    )?;
    // What went while the walk went by was changed while copied, too.
    for rel in &gone {
        note(&mut changed_paths, &mut changed_count, rel);
    }
    let out = builder.into_inner()?;
    Ok((
        Archived {
            tree: hasher.finish(),
            root_mode: meta.mode() & 0o7777,
            root_uid: meta.uid(),
            root_gid: meta.gid(),
            changed: changed_paths,
            changed_count,
            skipped: skipped_paths,
            skipped_count,
        },
        out,
    ))
}

/// Unpacks a tar stream made by [`archive`] into the empty directory `dst`,
/// with permissions and owners, then gives `dst` the recorded root's.
/// Entries that would land outside `dst` are refused by the tar reader.
pub fn unpack(input: impl Read, dst: &Path, entry: &VolumeEntry) -> io::Result<()> {
    let mut ar = tar::Archive::new(input);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(false);
    ar.unpack(dst)?;
    std::os::unix::fs::chown(dst, Some(entry.root_uid), Some(entry.root_gid))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(entry.root_mode))?;
    Ok(())
}

/// A new directory beside `live` (same file system, so renames between them
/// are atomic), named for what it holds; only the owner can enter it.
pub fn sibling_dir(live: &Path, what: &str) -> io::Result<PathBuf> {
    let parent = live.parent().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent directory", live.display()),
        )
    })?;
    let name = live
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = parent.join(format!(
        ".baton-{what}.{name}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    fs::create_dir(&dir).map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// Replaces what `live` holds with what `restored` holds: the live entries
/// are moved into `aside`, the restored ones into `live` (renames on one file
/// system), and `live` gets `restored`'s permissions and owner. The mount
/// point itself stays, so a pod that mounts it sees the restored files.
/// `aside` and `restored` are removed when all went well; on an error they
/// are left for an operator, and the error names them.
pub fn replace_contents(live: &Path, restored: &Path, aside: &Path) -> io::Result<()> {
    let step = |what: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!(
                "{what}: {e} (the volume's previous files are in {}, the restored ones in {})",
                aside.display(),
                restored.display()
            ),
        )
    };
    let names = |dir: &Path| -> io::Result<Vec<std::ffi::OsString>> {
        fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect()
    };
    // Listed first, then moved: never renamed while a listing is under way.
    for name in names(live).map_err(|e| step("listing the live volume", e))? {
        fs::rename(live.join(&name), aside.join(&name)).map_err(|e| step("moving a live entry aside", e))?;
    }
    for name in names(restored)? {
        fs::rename(restored.join(&name), live.join(&name))
            .map_err(|e| step("moving a restored entry into place", e))?;
    }
    let meta = fs::symlink_metadata(restored)?;
    std::os::unix::fs::chown(live, Some(meta.uid()), Some(meta.gid())).map_err(|e| step("setting the owner", e))?;
    fs::set_permissions(live, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| step("setting the permissions", e))?;
    // The restore is done; what is left is tidying up, which only warns.
    for (dir, what) in [(restored, "restore staging"), (aside, "replaced files")] {
        if let Err(e) = fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "{what} directory not removed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree_fixture(root: &Path) {
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(
            root.join("a/b/data.bin"),
            (0..=255u8).cycle().take(70_000).collect::<Vec<_>>(),
        )
        .unwrap();
        fs::write(root.join("secret"), b"only the owner").unwrap();
        fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        symlink("a/b/data.bin", root.join("link")).unwrap();
        symlink("/nowhere/at/all", root.join("dangling")).unwrap();
        fs::set_permissions(root.join("a"), fs::Permissions::from_mode(0o750)).unwrap();
    }

    #[test]
    fn claims_follow_kubernetes_names() {
        for ok in ["uploads", "data-0", "a.b-c", "x"] {
            assert!(valid_claim(ok), "{ok}");
        }
        for bad in ["", "Uploads", "-a", "a-", "a..b", "a/b", "../x", ".x"] {
            assert!(!valid_claim(bad), "{bad}");
        }
    }

    #[test]
    fn archive_and_unpack_round_trip_with_the_same_tree_hash() {
        let dir = tempdir();
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        fs::create_dir(&src).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o751)).unwrap();
        fs::create_dir(&dst).unwrap();
        tree_fixture(&src);
        let (archived, bytes) = archive(&src, Vec::new()).unwrap();
        assert_eq!(archived.tree, tree(&src).unwrap());
        assert_eq!(archived.tree.entries, 7);
        assert_eq!(archived.changed_count, 0);
        unpack(&bytes[..], &dst, &entry_for(&archived)).unwrap();
        assert_eq!(tree(&dst).unwrap(), archived.tree);
        assert_eq!(
            fs::read_link(dst.join("dangling")).unwrap(),
            Path::new("/nowhere/at/all")
        );

        // Any change of content, mode or link target changes the hash.
        fs::set_permissions(dst.join("secret"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_ne!(tree(&dst).unwrap(), archived.tree);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn entry_for(a: &Archived) -> VolumeEntry {
        VolumeEntry {
            claim: "c".into(),
            file: archive_file_name("c"),
            tree_sha256: a.tree.sha256.clone(),
            entries: a.tree.entries,
            content_bytes: a.tree.content_bytes,
            consistency: Consistency::Live,
            changed_while_copied: a.changed_count,
            skipped: a.skipped_count,
            root_mode: a.root_mode,
            root_uid: a.root_uid,
            root_gid: a.root_gid,
        }
    }

    #[test]
    fn link_targets_come_back_byte_for_byte() {
        let dir = tempdir();
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        fs::create_dir(&src).unwrap();
        fs::create_dir(&dst).unwrap();
        let long = format!("{}/end", "segment".repeat(20));
        let targets = ["a//b", "x/.", "//abs/./path", "./rel", "trailing/", long.as_str()];
        for (i, t) in targets.iter().enumerate() {
            symlink(t, src.join(format!("l{i}"))).unwrap();
        }
        let (archived, bytes) = archive(&src, Vec::new()).unwrap();
        assert_eq!(archived.tree, tree(&src).unwrap());
        unpack(&bytes[..], &dst, &entry_for(&archived)).unwrap();
        for (i, t) in targets.iter().enumerate() {
            assert_eq!(fs::read_link(dst.join(format!("l{i}"))).unwrap(), Path::new(t));
        }
        assert_eq!(tree(&dst).unwrap(), archived.tree);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_volume_that_is_a_symbolic_link_is_not_followed() {
        let dir = tempdir();
        fs::create_dir(dir.join("real")).unwrap();
        symlink(dir.join("real"), dir.join("link")).unwrap();
        let e = archive(&dir.join("link"), Vec::new()).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_shrinks_while_read_is_padded_and_counted() {
        let mut r = Exactly {
            inner: &b"abc"[..],
            left: 5,
            hash: Sha256::new(),
            short: false,
        };
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc\0\0");
        assert!(r.short);
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("baton-volume-unit-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&d).unwrap();
        d
    }
}
