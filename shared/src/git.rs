//! Reads a repository at exactly one commit, with the real `git` CLI: a folder's
//! files into memory ([`GitCache::read_folder`]) or onto disk ([`GitCache::export`]).
//!
//! Each repository gets a bare cache repository under `repos_dir`, named after a hash
//! of its URL or path. A commit that is already there is never fetched again (commits
//! are immutable); otherwise the commit is fetched by its SHA, and if the server does
//! not allow that, all branches and tags are fetched. Fetched commits are kept under
//! `refs/baton/commits/<sha>` so `git gc` does not prune them. Files are read from the
//! commit's tree (`git ls-tree` + `git cat-file --batch`), never from a work tree, so
//! a later commit can never leak into an earlier one's read.
//!
//! Git runs with `GIT_ALLOW_PROTOCOL=file:git:http:https:ssh` (no `ext::` command
//! transports from a job) and `GIT_TERMINAL_PROMPT=0` (no hanging on a password
//! prompt); repository strings are passed after `--end-of-options`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::secret::redact_url;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Why a repository could not be read at a commit.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("invalid job: {problem}")]
    InvalidJob { problem: String },

    #[error("invalid parameter `{name}`: {problem}")]
    InvalidParam { name: String, problem: String },

    #[error("git {operation} of {repository} failed: {detail}")]
    Git {
        operation: &'static str,
        repository: String,
        detail: String,
    },

    #[error("commit {commit} does not exist in {repository}")]
    UnknownCommit { commit: String, repository: String },

    #[error("folder {dir} does not exist at commit {commit}")]
    FolderNotFound { dir: String, commit: String },
}

impl GitError {
    /// The step error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJob { .. } => "invalid_job",
            Self::InvalidParam { .. } => "invalid_params",
            Self::Git { .. } => "source_unavailable",
            Self::UnknownCommit { .. } => "unknown_commit",
            Self::FolderNotFound { .. } => "source_not_found",
        }
    }

    /// Only git itself failing (network, a busy server) may pass on a retry.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Git { .. })
    }
}

/// A cache of bare clones.
#[derive(Debug, Clone)]
pub struct GitCache {
    dir: PathBuf,
}

/// A repository for messages: URLs lose their password, paths and scp-style
/// `user@host:path` addresses (which carry none) stay readable.
pub fn display_repository(repository: &str) -> String {
    if repository.contains("://") {
        redact_url(repository)
    } else {
        repository.to_owned()
    }
}

/// A commit SHA as git writes it: 40 lowercase hex digits.
pub fn check_commit(sha: &str) -> Result<(), GitError> {
    if sha.len() == 40 && sha.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
        Ok(())
    } else {
        Err(GitError::InvalidJob {
            problem: format!("deploy.commit_sha is {sha:?}; expected 40 lowercase hexadecimal characters"),
        })
    }
}

/// A folder path inside the repository: relative, no `..`, no empty segments.
pub fn check_folder(param: &str, dir: &str) -> Result<String, GitError> {
    let trimmed = dir.trim_end_matches('/');
    let ok = !trimmed.is_empty()
        && !trimmed.starts_with('/')
        && !trimmed.starts_with('-')
        && trimmed.split('/').all(|s| !s.is_empty() && s != ".." && s != ".");
    if ok {
        Ok(trimmed.to_owned())
    } else {
        Err(GitError::InvalidParam {
            name: param.to_owned(),
            problem: format!("is {dir:?}; expected a relative path inside the repository without '..'"),
        })
    }
}

impl GitCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Every file under `folder` at `commit`, keyed by path relative to `folder`.
    pub async fn read_folder(
        &self,
        repository: &str,
        commit: &str,
        folder: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>, GitError> {
        check_commit(commit)?;
        let folder = check_folder("folder", folder)?;
        let repo = self.ensure_commit(repository, commit).await?;
        let shown = display_repository(repository);

        let listing = git(
            &repo,
            &[
                "ls-tree",
                "-r",
                "-z",
                "--full-tree",
                commit,
                "--",
                &format!("{folder}/"),
            ],
        )
        .await
        .map_err(|detail| GitError::Git {
            operation: "ls-tree",
            repository: shown.clone(),
            detail,
        })?;
        let mut entries = Vec::new();
        for record in listing.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let record = String::from_utf8_lossy(record);
            // "<mode> SP <type> SP <oid> TAB <path>"
            let Some((meta, path)) = record.split_once('\t') else {
                continue;
            };
            let mut parts = meta.split(' ');
            let (Some(_mode), Some(kind), Some(oid)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if kind != "blob" {
                continue;
            }
            if let Some(rel) = path.strip_prefix(&format!("{folder}/")) {
                entries.push((rel.to_owned(), oid.to_owned()));
            }
        }
        if entries.is_empty() {
            return Err(GitError::FolderNotFound {
                dir: folder,
                commit: commit.to_owned(),
            });
        }
        let blobs = cat_blobs(&repo, entries.iter().map(|(_, oid)| oid.as_str()))
            .await
            .map_err(|detail| GitError::Git {
                operation: "cat-file",
                repository: shown.clone(),
                detail,
            })?;
        Ok(entries.into_iter().map(|(p, _)| p).zip(blobs).collect())
    }

    /// Writes the files under `folder` (`.` for the whole tree) at `commit` into
    /// `dest`, which must be empty or absent, byte for byte as the commit holds
    /// them (no `.gitattributes` export rules or filters apply): executable bits
    /// kept, symbolic links made as links — refused if absolute or leaving the
    /// exported tree —, submodules left out. Returns how many files it wrote.
    pub async fn export(&self, repository: &str, commit: &str, folder: &str, dest: &Path) -> Result<usize, GitError> {
        check_commit(commit)?;
        let folder = if folder.trim_end_matches('/') == "." {
            String::new()
        } else {
            check_folder("folder", folder)?
        };
        let shown = display_repository(repository);
        let fail = |operation: &'static str| {
            let shown = shown.clone();
            move |detail: String| GitError::Git {
                operation,
                repository: shown,
                detail,
            }
        };
        let mut args = vec!["ls-tree", "-r", "-z", "--full-tree", commit];
        let prefix = format!("{folder}/");
        if !folder.is_empty() {
            args.extend(["--", prefix.as_str()]);
        }
        // A commit already in the cache is read at once; otherwise fetched first.
        let found = match self.cached(repository) {
            Some(repo) => git(&repo, &args).await.ok().map(|listing| (repo, listing)),
            None => None,
        };
        let (repo, listing) = match found {
            Some(found) => found,
            None => {
                let repo = self.ensure_commit(repository, commit).await?;
                let listing = git(&repo, &args).await.map_err(fail("ls-tree"))?;
                (repo, listing)
            }
        };
        // (path relative to the folder, mode, object id)
        let mut entries: Vec<(String, String, String)> = Vec::new();
        for record in listing.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let record = String::from_utf8_lossy(record);
            let Some((meta, path)) = record.split_once('\t') else {
                continue;
            };
            let mut parts = meta.split(' ');
            let (Some(mode), Some(kind), Some(oid)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if kind != "blob" {
                continue; // a submodule's commit
            }
            let rel = if folder.is_empty() {
                path.to_owned()
            } else {
                match path.strip_prefix(&prefix) {
                    Some(r) => r.to_owned(),
                    None => continue,
                }
            };
            entries.push((rel, mode.to_owned(), oid.to_owned()));
        }
        if entries.is_empty() && !folder.is_empty() {
            return Err(GitError::FolderNotFound {
                dir: folder,
                commit: commit.to_owned(),
            });
        }
        let blobs = cat_blobs(&repo, entries.iter().map(|(_, _, oid)| oid.as_str()))
            .await
            .map_err(fail("cat-file"))?;
        let dest = dest.to_owned();
        tokio::task::spawn_blocking(move || write_tree(&dest, entries, blobs))
            .await
            .map_err(|e| fail("export")(e.to_string()))?
    }

    /// Paths under `folder` (`.` for all) that differ between commits `from`
    /// and `to`, relative to `folder`.
    pub async fn changed_paths(
        &self,
        repository: &str,
        from: &str,
        to: &str,
        folder: &str,
    ) -> Result<Vec<String>, GitError> {
        check_commit(from)?;
        check_commit(to)?;
        let folder = if folder.trim_end_matches('/') == "." {
            String::new()
        } else {
            format!("{}/", check_folder("folder", folder)?)
        };
        let mut args = vec!["diff", "--name-only", "-z", "--no-renames", from, to];
        if !folder.is_empty() {
            args.extend(["--", folder.as_str()]);
        }
        // Both commits already in the cache: one git process; otherwise fetched first.
        let found = match self.cached(repository) {
            Some(repo) => git(&repo, &args).await.ok(),
            None => None,
        };
        let out = match found {
            Some(out) => out,
            None => {
                self.ensure_commit(repository, from).await?;
                let repo = self.ensure_commit(repository, to).await?;
                git(&repo, &args).await.map_err(|detail| GitError::Git {
                    operation: "diff",
                    repository: display_repository(repository),
                    detail,
                })?
            }
        };
        Ok(out
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let p = String::from_utf8_lossy(p);
                p.strip_prefix(&folder).unwrap_or(&p).to_owned()
            })
            .collect())
    }

    /// The cache repository of `repository`, holding `commit`.
    /// The cache repository of `repository` if it is there (holding the
    /// commits or not): reads try it first and fetch only when they fail.
    fn cached(&self, repository: &str) -> Option<PathBuf> {
        if is_relative_path(repository) {
            return None;
        }
        let name = hex::encode(&Sha256::digest(repository.as_bytes())[..12]);
        let repo = self.dir.join(format!("{name}.git"));
        repo.join("HEAD").exists().then_some(repo)
    }

    async fn ensure_commit(&self, repository: &str, commit: &str) -> Result<PathBuf, GitError> {
        if is_relative_path(repository) {
            return Err(GitError::InvalidJob {
                problem: format!(
                    "repository {repository:?} is a relative path: give an absolute path or a URL \
                     (git would look for it in the daemon's cache directory)"
                ),
            });
        }
        let shown = display_repository(repository);
        let git_err = |operation: &'static str| {
            let shown = shown.clone();
            move |detail: String| GitError::Git {
                operation,
                repository: shown,
                detail,
            }
        };
        let name = hex::encode(&Sha256::digest(repository.as_bytes())[..12]);
        let repo = self.dir.join(format!("{name}.git"));
        // One fetch per cache repository at a time, across jobs and daemon processes:
        // git's own ref locks make a concurrent fetch fail instead of wait.
        let lock_path = self.dir.join(format!("{name}.lock"));
        let _guard = lock_file(lock_path).await.map_err(git_err("lock"))?;

        if !repo.join("HEAD").exists() {
            git(&self.dir, &["init", "--quiet", "--bare", &repo.to_string_lossy()])
                .await
                .map_err(git_err("init"))?;
        }
        if has_commit(&repo, commit).await {
            return Ok(repo);
        }
        let by_sha = format!("+{commit}:refs/baton/commits/{commit}");
        // Credentials in the URL go to git through its environment, never its
        // command line, which every user of the machine can read.
        let (remote, env) = remote_and_credentials(repository);
        let fetched_by_sha = git_env(
            &repo,
            &["fetch", "--quiet", "--no-tags", "--end-of-options", &remote, &by_sha],
            &env,
        )
        .await
        .is_ok();
        if !fetched_by_sha {
            // Servers that refuse unadvertised SHAs still serve their branches and tags;
            // a failure here is the repository being unreachable, not the commit unknown.
            git_env(
                &repo,
                &[
                    "fetch",
                    "--quiet",
                    "--force",
                    "--end-of-options",
                    &remote,
                    "+refs/heads/*:refs/baton/heads/*",
                    "+refs/tags/*:refs/baton/tags/*",
                ],
                &env,
            )
            .await
            .map_err(git_err("fetch"))?;
            if has_commit(&repo, commit).await {
                git(&repo, &["update-ref", &format!("refs/baton/commits/{commit}"), commit])
                    .await
                    .map_err(git_err("update-ref"))?;
            }
        }
        if !has_commit(&repo, commit).await {
            return Err(GitError::UnknownCommit {
                commit: commit.to_owned(),
                repository: shown,
            });
        }
        Ok(repo)
    }
}

/// Holds an exclusive `flock` on a file until dropped.
pub struct FileLock(#[allow(dead_code)] std::fs::File);

/// Waits for an exclusive lock on `path` (created if missing), across threads
/// and processes; the error says why it could not be taken.
pub async fn lock_file(path: PathBuf) -> Result<FileLock, String> {
    tokio::task::spawn_blocking(move || {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        file.lock()
            .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
        Ok(FileLock(file))
    })
    .await
    .map_err(|e| format!("lock task failed: {e}"))?
}

impl GitCache {
    /// Files of the commit outside `excluded` folders (and documentation) whose
    /// text holds `name` as a quoted identifier (`"name"`, `'name'` or
    /// `` `name` ``), the way Drizzle schemas and SQL in code name columns and
    /// tables. The commit must already be fetched ([`Self::read_folder`] does).
    pub async fn files_naming(
        &self,
        repository: &str,
        commit: &str,
        name: &str,
        excluded: &[&str],
    ) -> Result<Vec<String>, GitError> {
        check_commit(commit)?;
        let repo = self.ensure_commit(repository, commit).await?;
        let escaped: String = name
            .chars()
            .flat_map(|c| {
                let special = !(c.is_ascii_alphanumeric() || c == '_');
                special.then_some('\\').into_iter().chain(std::iter::once(c))
            })
            .collect();
        let pattern = format!("[\"'`]{escaped}[\"'`]");
        let mut args: Vec<String> = ["grep", "-l", "-I", "-E", "-e", &pattern, commit, "--", "."]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        for dir in excluded.iter().chain(&["docs", "*.md"]) {
            args.push(format!(":(exclude){dir}"));
        }
        let out = command(&repo).args(&args).output().await.map_err(|e| GitError::Git {
            operation: "grep",
            repository: display_repository(repository),
            detail: spawn_error(&repo, &e),
        })?;
        // git grep exits 1 when nothing matches.
        if !out.status.success() && out.status.code() != Some(1) {
            return Err(GitError::Git {
                operation: "grep",
                repository: display_repository(repository),
                detail: redact_stderr(String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        let prefix = format!("{commit}:");
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.strip_prefix(&prefix).unwrap_or(l).to_owned())
            .collect())
    }
}

/// Writes exported entries under `dest`.
fn write_tree(dest: &Path, entries: Vec<(String, String, String)>, blobs: Vec<Vec<u8>>) -> Result<usize, GitError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: String| {
        move |e: std::io::Error| GitError::Git {
            operation: "export",
            repository: String::new(),
            detail: format!("{what}: {e}"),
        }
    };
    std::fs::create_dir_all(dest).map_err(io(format!("cannot create {}", dest.display())))?;
    let mut files = 0;
    for ((rel, mode, _), contents) in entries.into_iter().zip(blobs) {
        if rel.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(GitError::InvalidJob {
                problem: format!("the repository holds a path Baton does not write: {rel:?}"),
            });
        }
        let path = dest.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("cannot create {}", parent.display())))?;
        }
        if mode == "120000" {
            let target = String::from_utf8_lossy(&contents).into_owned();
            if !link_stays_inside(&rel, &target) {
                return Err(GitError::InvalidJob {
                    problem: format!(
                        "the repository has a symbolic link {rel} -> {target} that leads outside it; Baton refuses such links"
                    ),
                });
            }
            std::os::unix::fs::symlink(&target, &path).map_err(io(format!("cannot link {}", path.display())))?;
            continue;
        }
        std::fs::write(&path, &contents).map_err(io(format!("cannot write {}", path.display())))?;
        let bits = if mode == "100755" { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bits))
            .map_err(io(format!("cannot set the mode of {}", path.display())))?;
        files += 1;
    }
    Ok(files)
}

/// Whether a link at `rel` (relative to the exported root) pointing to
/// `target` stays inside the root.
fn link_stays_inside(rel: &str, target: &str) -> bool {
    if target.starts_with('/') {
        return false;
    }
    let mut depth: i64 = rel.split('/').count() as i64 - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

async fn has_commit(repo: &Path, commit: &str) -> bool {
    git(repo, &["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .await
        .is_ok()
}

fn command(cwd: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(cwd)
        .env("GIT_ALLOW_PROTOCOL", "file:git:http:https:ssh")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A cancelled job must not leave a fetch running.
        .kill_on_drop(true);
    cmd
}

/// A repository string that is neither a URL, nor scp-like (`host:path`), nor
/// an absolute path.
fn is_relative_path(repository: &str) -> bool {
    let scp_like = repository
        .split_once(':')
        .is_some_and(|(host, _)| !host.is_empty() && !host.contains('/'));
    !repository.contains("://") && !repository.starts_with('/') && !scp_like
}

/// Why git could not be started in `cwd`: the directory is missing, or git is.
fn spawn_error(cwd: &Path, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound && !cwd.is_dir() {
        format!("cannot run git in {}: the directory does not exist", cwd.display())
    } else if e.kind() == std::io::ErrorKind::NotFound {
        "cannot run git: it is not installed (not on PATH)".to_owned()
    } else {
        format!("cannot run git in {}: {e}", cwd.display())
    }
}

/// Runs git and returns its stdout, or its stderr (trimmed) as the error.
async fn git(cwd: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    git_env(cwd, args, &[]).await
}

/// An http(s) repository URL without its userinfo, and the environment that
/// gives git its credentials as an `Authorization: Basic` header (git's
/// `GIT_CONFIG_COUNT` configuration, readable only by this user, unlike the
/// command line). Any other repository is returned as it is.
fn remote_and_credentials(repository: &str) -> (String, Vec<(String, String)>) {
    use base64::Engine;
    let Some((scheme, rest)) = repository.split_once("://") else {
        return (repository.to_owned(), Vec::new());
    };
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        return (repository.to_owned(), Vec::new());
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (repository.to_owned(), Vec::new());
    };
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        percent_decode(user),
        percent_decode(password)
    ));
    (
        format!("{scheme}://{host}{tail}"),
        vec![
            ("GIT_CONFIG_COUNT".to_owned(), "1".to_owned()),
            ("GIT_CONFIG_KEY_0".to_owned(), "http.extraHeader".to_owned()),
            ("GIT_CONFIG_VALUE_0".to_owned(), format!("Authorization: Basic {basic}")),
        ],
    )
}

/// `%XX` escapes decoded (as in a URL's userinfo); anything else kept.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn git_env(cwd: &Path, args: &[&str], env: &[(String, String)]) -> Result<Vec<u8>, String> {
    let out = command(cwd)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .await
        .map_err(|e| spawn_error(cwd, &e))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!("{} ({})", redact_stderr(stderr.trim()), out.status))
    }
}

/// Git echoes remote URLs in its messages; keep credentials out of errors and logs.
fn redact_stderr(stderr: &str) -> String {
    stderr
        .split_whitespace()
        .map(|w| if w.contains("://") { redact_url(w) } else { w.to_owned() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Contents of blobs, in the order asked, through one `git cat-file --batch`.
async fn cat_blobs<'a>(repo: &Path, oids: impl Iterator<Item = &'a str>) -> Result<Vec<Vec<u8>>, String> {
    let mut child = command(repo)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(repo, &e))?;
    let mut input = String::new();
    for oid in oids {
        input.push_str(oid);
        input.push('\n');
    }
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // Written from a task so a large answer cannot deadlock against the request.
    let writer = tokio::spawn(async move {
        let res = stdin.write_all(input.as_bytes()).await;
        drop(stdin);
        res
    });
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("git cat-file: {e}"))?;
    writer
        .await
        .map_err(|e| format!("git cat-file: {e}"))?
        .map_err(|e| format!("git cat-file: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git cat-file: {} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ));
    }
    parse_batch(&out.stdout)
}

/// Parses `<oid> SP <type> SP <size> LF <contents> LF` records.
fn parse_batch(mut data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut blobs = Vec::new();
    while !data.is_empty() {
        let nl = data
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("git cat-file: truncated header")?;
        let header = String::from_utf8_lossy(&data[..nl]).into_owned();
        let mut parts = header.split(' ');
        let (Some(oid), Some(kind), Some(size)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("git cat-file: unexpected answer {header:?}"));
        };
        if kind != "blob" {
            return Err(format!("git cat-file: {oid} is a {kind}, not a blob"));
        }
        let size: usize = size
            .parse()
            .map_err(|_| format!("git cat-file: bad size in {header:?}"))?;
        let body = data
            .get(nl + 1..nl + 1 + size)
            .ok_or("git cat-file: truncated contents")?;
        blobs.push(body.to_vec());
        data = data.get(nl + 2 + size..).unwrap_or_default();
    }
    Ok(blobs)
}

/// A job attempt's own directory (`<work_dir>/jobs/<run>.<step>-<attempt>`),
/// emptied when made and removed when dropped (also when the job is
/// cancelled).
pub struct JobDir(PathBuf);

impl JobDir {
    pub fn new(work_dir: &Path, job: &crate::protocol::StepJob) -> std::io::Result<Self> {
        let dir = work_dir.join("jobs").join(format!("{}-{}", job.key(), job.attempt));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_leave_the_url_for_a_header() {
        let (remote, env) = super::remote_and_credentials("https://ci%2Bbot:p%40ss:w@git.example/shop/api.git");
        assert_eq!(remote, "https://git.example/shop/api.git");
        let header = &env.iter().find(|(k, _)| k == "GIT_CONFIG_VALUE_0").unwrap().1;
        // base64("ci+bot:p@ss:w")
        assert_eq!(header, "Authorization: Basic Y2krYm90OnBAc3M6dw==");
        for plain in [
            "https://git.example/shop/api.git",
            "ssh://git@git.example/shop/api.git",
            "git@git.example:shop/api.git",
            "/srv/git/shop",
        ] {
            assert_eq!(super::remote_and_credentials(plain), (plain.to_owned(), Vec::new()));
        }
    }

    /// A real git fetch against a listener that records what it is sent: the
    /// credentials arrive as a header, and the URL git asks for has none.
    #[tokio::test]
    async fn git_sends_url_credentials_as_a_header() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).await.unwrap();
            let _ = s
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let dir = std::env::temp_dir().join(format!("baton-git-cred-{}", std::process::id()));
        let cache = super::GitCache::new(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let err = cache
            .read_folder(
                &format!("http://ci:s3cret@127.0.0.1:{port}/shop.git"),
                &"a".repeat(40),
                "drizzle",
            )
            .await
            .unwrap_err();
        let request = server.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(request.starts_with("GET /shop.git/info/refs"), "{request}");
        assert!(request.contains("Authorization: Basic Y2k6czNjcmV0"), "{request}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn relative_repository_paths_are_told_from_urls_scp_and_absolute_paths() {
        for r in ["shop-api", "./shop-api", "../repos/shop", "repos/shop.git"] {
            assert!(super::is_relative_path(r), "{r}");
        }
        for r in [
            "/srv/git/shop",
            "file:///srv/git/shop",
            "https://git.example.org/shop.git",
            "git@git.example.org:shop/api.git",
            "ssh://git@host/x",
        ] {
            assert!(!super::is_relative_path(r), "{r}");
        }
    }

    use super::*;

    #[test]
    fn commits_and_folders_are_checked() {
        assert!(check_commit("0123456789abcdef0123456789abcdef01234567").is_ok());
        assert!(check_commit("--upload-pack=evil").is_err());
        assert!(check_commit("0123456789ABCDEF0123456789abcdef01234567").is_err());
        assert_eq!(
            check_folder("dir", "drizzle/migrations/").unwrap(),
            "drizzle/migrations"
        );
        for bad in ["", "/etc", "../x", "a/../b", "-x", "a//b"] {
            assert!(check_folder("dir", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn links_must_stay_inside_the_export() {
        assert!(link_stays_inside("a/b", "c"));
        assert!(link_stays_inside("a/b", "../c"));
        assert!(!link_stays_inside("a/b", "../../c"));
        assert!(!link_stays_inside("a", "/etc/passwd"));
        assert!(!link_stays_inside("ctx", ".."));
        assert!(link_stays_inside("x/y/z", "../../w/./v"));
    }

    #[test]
    fn batch_output_is_parsed() {
        let data = b"aaa blob 3\nabc\nbbb blob 0\n\n";
        assert_eq!(parse_batch(data).unwrap(), vec![b"abc".to_vec(), Vec::new()]);
        assert!(parse_batch(b"aaa missing\n").is_err());
    }

    #[test]
    fn credentials_in_git_messages_are_redacted() {
        assert_eq!(
            redact_stderr("fatal: unable to access 'https://user:tok@host/r.git/': 403"),
            "fatal: unable to access 'https://user:***@host/r.git/': 403"
        );
    }
}
