//! The Terraform CLI, run as a child process in a job's checkout with the
//! daemon's own CLI configuration and the `pg` backend's connection in its
//! environment. A cancelled job kills it (its connection closes, PostgreSQL
//! releases the state lock).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use baton_shared::facts::{ResourceChange, TerraformPlanned};
use serde::Deserialize;
use tokio::process::Command;

use crate::config::InfraConfig;

/// How a Terraform command failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The binary could not be started.
    NotStarted(String),
    /// The state lock was held past the lock timeout.
    Locked(String),
    /// `apply` of a saved plan whose state has changed since.
    Stale(String),
    /// The working directory must be (re)initialised first.
    NeedsInit(String),
    /// Anything else: the configuration, a provider, the backend.
    Failed { command: String, detail: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotStarted(d) | Self::Locked(d) | Self::Stale(d) | Self::NeedsInit(d) => f.write_str(d),
            Self::Failed { command, detail } => write!(f, "terraform {command} failed: {detail}"),
        }
    }
}

/// Terraform for one state schema.
#[derive(Debug, Clone)]
pub struct Terraform {
    bin: PathBuf,
    env: Vec<(String, String)>,
    /// `TF_DATA_DIR`: kept per state schema between jobs, so an unchanged
    /// configuration needs no `init` (see [`Terraform::backend`]).
    data_dir: PathBuf,
}

/// The last `n` non-empty lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" ")
}

impl Terraform {
    /// Terraform with `schema` as the state of the `pg` backend. Writes the
    /// daemon's CLI configuration (plugin cache, provider mirror) once.
    pub fn new(config: &InfraConfig, schema: &str) -> std::io::Result<Self> {
        let rc = config.work_dir.join("terraformrc");
        let data_dir = Self::data_dir_of(config, schema);
        let cache = config.work_dir.join("plugin-cache");
        std::fs::create_dir_all(&cache)?;
        let mut text = format!("plugin_cache_dir = {:?}\n", cache.display().to_string());
        if let Some(mirror) = &config.provider_mirror {
            text.push_str(&format!(
                "provider_installation {{\n  filesystem_mirror {{\n    path = {:?}\n  }}\n}}\n",
                mirror.display().to_string()
            ));
        }
        // Jobs of other schemas may be reading it: replaced whole, never half
        // written, and only when it changed.
        if std::fs::read_to_string(&rc).ok().as_deref() != Some(text.as_str()) {
            let tmp = rc.with_extension(format!("tmp.{}", uuid::Uuid::new_v4().simple()));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &rc)?;
        }
        let env = [
            ("CHECKPOINT_DISABLE", "1".to_owned()),
            ("TF_IN_AUTOMATION", "1".to_owned()),
            ("TF_INPUT", "0".to_owned()),
            ("TF_CLI_CONFIG_FILE", rc.display().to_string()),
            // The backend reads its connection from here: never on a command
            // line (visible to every process) or in `.terraform/` (on disk).
            ("PG_CONN_STR", config.state_url.expose().clone()),
            ("PG_SCHEMA_NAME", schema.to_owned()),
            ("TF_DATA_DIR", data_dir.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Ok(Self {
            bin: config.terraform.clone(),
            env,
            data_dir,
        })
    }

    /// Where `schema`'s working data lives; one job at a time uses it (the
    /// caller holds `<data dir>.lock`).
    pub fn data_dir_of(config: &InfraConfig, schema: &str) -> PathBuf {
        config.work_dir.join("data").join(schema)
    }

    /// The backend the data directory was initialised with, if it was.
    pub fn backend(&self) -> Option<String> {
        #[derive(Deserialize)]
        struct Local {
            backend: Option<Backend>,
        }
        #[derive(Deserialize)]
        struct Backend {
            #[serde(rename = "type")]
            kind: String,
        }
        std::fs::read(self.data_dir.join("terraform.tfstate"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Local>(&b).ok())
            .and_then(|l| l.backend)
            .map(|b| b.kind)
    }

    /// Module key (`db`, `db.inner`; `""` the root) -> its directory relative
    /// to the root module, as the last `init` recorded them.
    pub fn modules(&self) -> std::collections::BTreeMap<String, String> {
        #[derive(Deserialize)]
        struct Manifest {
            #[serde(rename = "Modules", default)]
            modules: Vec<Module>,
        }
        #[derive(Deserialize)]
        struct Module {
            #[serde(rename = "Key")]
            key: String,
            #[serde(rename = "Dir")]
            dir: String,
        }
        std::fs::read(self.data_dir.join("modules/modules.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
            .map(|m| m.modules.into_iter().map(|m| (m.key, m.dir)).collect())
            .unwrap_or_default()
    }

    /// Runs `terraform args` in `dir`: exit code and output.
    async fn run(&self, dir: &Path, args: &[String]) -> Result<(i32, Vec<u8>, String), Failure> {
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(dir)
            .args(args)
            .env_remove("TF_WORKSPACE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = cmd.output().await.map_err(|e| {
            Failure::NotStarted(if e.kind() == std::io::ErrorKind::NotFound {
                format!("{} is not installed (not found on PATH)", self.bin.display())
            } else {
                format!("cannot run {}: {e}", self.bin.display())
            })
        })?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        Ok((out.status.code().unwrap_or(-1), out.stdout, stderr))
    }

    fn failed(command: &str, stderr: &str, stdout: &[u8]) -> Failure {
        // With -json the diagnostics are JSON lines on stdout: their summaries
        // and details are the message.
        let stdout = String::from_utf8_lossy(stdout);
        let mut said = String::new();
        for line in stdout.lines() {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) if v["type"] == "diagnostic" && v["diagnostic"]["severity"] == "error" => {
                    said.push_str(v["diagnostic"]["summary"].as_str().unwrap_or_default());
                    said.push_str(": ");
                    said.push_str(v["diagnostic"]["detail"].as_str().unwrap_or_default());
                    said.push('\n');
                }
                Ok(_) => {}
                Err(_) => {
                    said.push_str(line);
                    said.push('\n');
                }
            }
        }
        said.push_str(stderr);
        if said.contains("Error acquiring the state lock") {
            return Failure::Locked(tail(&said, 3));
        }
        if said.contains("Saved plan is stale") {
            return Failure::Stale(tail(&said, 3));
        }
        if said.contains("terraform init") {
            return Failure::NeedsInit(tail(&said, 6));
        }
        Failure::Failed {
            command: command.to_owned(),
            detail: tail(&said, 12),
        }
    }

    /// `terraform init`, then the backend it configured (`None`: local state).
    pub async fn init(&self, dir: &Path) -> Result<Option<String>, Failure> {
        // The plugin cache is shared by every schema and is not safe for
        // concurrent inits.
        static INIT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = INIT.lock().await;
        // A backend recorded by an earlier init would survive `-reconfigure` when
        // the configuration no longer declares one; what init records is read after.
        let _ = std::fs::remove_file(self.data_dir.join("terraform.tfstate"));
        let args = ["init", "-input=false", "-no-color", "-reconfigure"].map(str::to_owned);
        let (code, stdout, stderr) = self.run(dir, &args).await?;
        if code != 0 {
            return Err(Self::failed("init", &stderr, &stdout));
        }
        Ok(self.backend())
    }

    /// `terraform plan -out=plan` (or `-destroy`): the changes, from its
    /// machine-readable output (one process, no `show`).
    pub async fn plan(
        &self,
        dir: &Path,
        out: &Path,
        lock_timeout: Duration,
        destroy: bool,
    ) -> Result<TerraformPlanned, Failure> {
        let mut args: Vec<String> = ["plan", "-input=false", "-json", "-detailed-exitcode"]
            .map(str::to_owned)
            .to_vec();
        args.push(format!("-lock-timeout={}s", lock_timeout.as_secs()));
        args.push(format!("-out={}", out.display()));
        if destroy {
            args.push("-destroy".to_owned());
        }
        match self.run(dir, &args).await? {
            (0 | 2, stdout, _) => summarize(&stdout).map_err(|detail| Failure::Failed {
                command: "plan".into(),
                detail,
            }),
            (_, stdout, stderr) => Err(Self::failed("plan", &stderr, &stdout)),
        }
    }

    /// `terraform apply` of exactly the saved plan.
    pub async fn apply(&self, dir: &Path, plan: &Path, lock_timeout: Duration) -> Result<(), Failure> {
        let args = vec![
            "apply".to_owned(),
            "-input=false".to_owned(),
            "-no-color".to_owned(),
            format!("-lock-timeout={}s", lock_timeout.as_secs()),
            plan.display().to_string(),
        ];
        match self.run(dir, &args).await? {
            (0, ..) => Ok(()),
            (_, stdout, stderr) => Err(Self::failed("apply", &stderr, &stdout)),
        }
    }
}

/// Reads `terraform plan -json` (Terraform's machine-readable UI, one JSON
/// object per line): every `planned_change` that changes something, sorted by
/// address (Terraform prints them as they are decided, in no fixed order).
pub fn summarize(lines: &[u8]) -> Result<TerraformPlanned, String> {
    #[derive(Deserialize)]
    struct Line {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        change: Option<Change>,
    }
    #[derive(Deserialize)]
    struct Change {
        resource: Resource,
        action: String,
    }
    #[derive(Deserialize)]
    struct Resource {
        addr: String,
    }
    let mut s = TerraformPlanned::default();
    let mut summary_seen = false;
    for line in String::from_utf8_lossy(lines).lines().filter(|l| l.starts_with('{')) {
        let line: Line = serde_json::from_str(line).map_err(|e| format!("terraform plan -json: {e}: {line}"))?;
        match (line.kind.as_str(), line.change) {
            ("planned_change", Some(c)) => {
                match c.action.as_str() {
                    "create" => s.add += 1,
                    "update" => s.change += 1,
                    "delete" => s.destroy += 1,
                    "replace" => {
                        s.add += 1;
                        s.destroy += 1;
                    }
                    // noop, read, move, remove (forget): nothing in the infrastructure changes.
                    _ => continue,
                }
                s.changes.push(ResourceChange {
                    address: c.resource.addr,
                    action: c.action,
                });
            }
            ("change_summary", _) => summary_seen = true,
            _ => {}
        }
    }
    if !summary_seen {
        return Err("terraform plan -json printed no change summary".to_owned());
    }
    s.changes.sort_by(|a, b| a.address.cmp(&b.address));
    s.resources_changed = s.changes.len() as u64;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_summarized_by_action_in_address_order() {
        let line = |addr: &str, action: &str| {
            format!(
                "{{\"type\":\"planned_change\",\"change\":{{\"resource\":{{\"addr\":\"{addr}\"}},\"action\":\"{action}\"}}}}\n"
            )
        };
        let mut out = String::from("{\"type\":\"version\",\"terraform\":\"1.11.4\"}\n");
        for (a, act) in [
            ("terraform_data.e", "delete"),
            ("terraform_data.a", "create"),
            ("terraform_data.b", "noop"),
            ("terraform_data.c", "replace"),
            ("module.m.terraform_data.d[0]", "update"),
            ("data.x.y", "read"),
        ] {
            out.push_str(&line(a, act));
        }
        assert!(summarize(out.as_bytes()).unwrap_err().contains("no change summary"));
        out.push_str("{\"type\":\"change_summary\",\"changes\":{\"add\":2}}\n");
        let s = summarize(out.as_bytes()).unwrap();
        assert_eq!((s.resources_changed, s.add, s.change, s.destroy), (4, 2, 1, 2));
        let actions: Vec<_> = s
            .changes
            .iter()
            .map(|c| (c.address.as_str(), c.action.as_str()))
            .collect();
        assert_eq!(
            actions,
            [
                ("module.m.terraform_data.d[0]", "update"),
                ("terraform_data.a", "create"),
                ("terraform_data.c", "replace"),
                ("terraform_data.e", "delete")
            ]
        );
    }
}
