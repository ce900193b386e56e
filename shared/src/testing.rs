//! Helpers for the daemons' tests (feature `testing`): temporary directories and
//! real git repositories in them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

/// A containerd of the test's own, killed and removed when dropped.
pub struct Containerd {
    child: Child,
    pub socket: PathBuf,
    _dir: TempDir,
}

impl Containerd {
    pub fn start() -> Self {
        let dir = TempDir::new("containerd");
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = {:?}\n[ttrpc]\n  address = {:?}\n",
            d.join("root").display().to_string(),
            d.join("state").display().to_string(),
            socket.display().to_string(),
            d.join("containerd.sock.ttrpc").display().to_string(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        // Ready when it says so, after its servers are up.
        let child = start_logged(
            Command::new("containerd").arg("--config").arg(d.join("config.toml")),
            &d.join("containerd.log"),
            "containerd successfully booted",
        );
        let c = Self {
            child,
            socket,
            _dir: dir,
        };
        let version = c.ctr(&["version"]);
        assert!(
            version.status.success(),
            "containerd booted but does not answer: {}",
            String::from_utf8_lossy(&version.stderr)
        );
        c
    }

    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("run ctr")
    }

    pub fn images(&self) -> String {
        String::from_utf8_lossy(&self.ctr(&["images", "ls"]).stdout).into_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` with its output (stdout and stderr) appended to `log`, and
/// returns once a line of it contains `ready`: the process says when it is
/// ready instead of being polled. Panics with the log when the process exits
/// first, or says nothing ready within five minutes (a hung start).
pub fn start_logged(cmd: &mut Command, log: &Path, ready: &str) -> Child {
    use std::io::{BufRead, Write};
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let file = std::sync::Arc::new(std::sync::Mutex::new(
        std::fs::File::create(log).expect("create the process's log"),
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    let streams: [Box<dyn std::io::Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("piped stdout")),
        Box::new(child.stderr.take().expect("piped stderr")),
    ];
    for stream in streams {
        let (file, tx, ready) = (file.clone(), tx.clone(), ready.to_owned());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = writeln!(file.lock().expect("the log"), "{line}");
                if line.contains(&ready) {
                    let _ = tx.send(());
                }
            }
        });
    }
    // The readers end with the process: then the channel closes.
    drop(tx);
    if rx.recv_timeout(Duration::from_secs(300)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{cmd:?} exited or hung before saying {ready:?}; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    child
}

/// `buildah` with vfs storage under `work` (`storage`, `run`).
pub fn buildah(work: &Path, args: &[&str]) -> String {
    let out = Command::new("buildah")
        .arg("--root")
        .arg(work.join("storage"))
        .arg("--runroot")
        .arg(work.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args)
        .output()
        .expect("run buildah");
    assert!(
        out.status.success(),
        "buildah {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A base image made from Debian's busybox-static (`FROM scratch`) in the
/// buildah storage under `work`: `localhost/busybox@sha256:…`, for builds that
/// may not pull (no registry is reachable here).
pub fn busybox_base(work: &Path) -> String {
    let base_dir = work.join("base");
    std::fs::create_dir_all(&base_dir).expect("create the base image's folder");
    std::fs::copy("/bin/busybox", base_dir.join("busybox")).expect("Debian's busybox-static at /bin/busybox");
    std::fs::write(
        base_dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .expect("write the base Dockerfile");
    let base_path = base_dir.display().to_string();
    buildah(
        work,
        &[
            "bud",
            "--isolation",
            "chroot",
            "--timestamp",
            "0",
            "-t",
            "localhost/busybox:base",
            &base_path,
        ],
    );
    let digest = buildah(work, &["images", "--format", "{{.Digest}}", "localhost/busybox:base"]);
    assert!(digest.starts_with("sha256:"), "{digest}");
    format!("localhost/busybox@{digest}")
}
