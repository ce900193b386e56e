//! Helpers for the daemons' tests (feature `testing`): temporary directories and
//! real git repositories in them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of its own under the system's temporary directory, removed when
/// the value goes away (also when the test panics).
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `<tmp>/baton-<what>-<random>`.
    pub fn new(what: &str) -> Self {
        let p = std::env::temp_dir().join(format!("baton-{what}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p).expect("create a temporary directory");
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real git repository in a temporary directory.
pub struct GitRepo {
    pub dir: TempDir,
}

impl Default for GitRepo {
    fn default() -> Self {
        Self::new()
    }
}

impl GitRepo {
    pub fn new() -> Self {
        let repo = Self {
            dir: TempDir::new("repo"),
        };
        repo.git(&["init", "--quiet", "--initial-branch=main"]);
        repo.git(&["config", "user.email", "dev@example.org"]);
        repo.git(&["config", "user.name", "Dev"]);
        repo.git(&["config", "commit.gpgsign", "false"]);
        repo
    }

    pub fn path(&self) -> &Path {
        &self.dir.0
    }

    /// What a job's `deploy.repository` names it by.
    pub fn url(&self) -> String {
        self.path().display().to_string()
    }

    /// Runs git in the repository; panics with its stderr if it fails.
    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .current_dir(self.path())
            .args(args)
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("git prints UTF-8")
            .trim()
            .to_owned()
    }

    /// Writes `contents` at `rel`, creating folders.
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("a path in the repository")).expect("create folders");
        std::fs::write(p, contents).expect("write a file");
    }

    /// Removes `rel` from the work tree.
    pub fn remove(&self, rel: &str) {
        let _ = std::fs::remove_file(self.path().join(rel));
    }

    /// Removes the folder `rel` from the work tree.
    pub fn remove_all(&self, rel: &str) {
        let _ = std::fs::remove_dir_all(self.path().join(rel));
    }

    /// Commits everything and returns the commit SHA.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }
}
