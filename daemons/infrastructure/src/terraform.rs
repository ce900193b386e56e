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
    /// Anything else: the configuration, a provider, the backend.
    Failed { command: String, detail: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotStarted(d) | Self::Locked(d) | Self::Stale(d) => f.write_str(d),
            Self::Failed { command, detail } => write!(f, "terraform {command} failed: {detail}"),
        }
    }
}

/// Terraform for one state schema.
#[derive(Debug, Clone)]
pub struct Terraform {
    bin: PathBuf,
    env: Vec<(String, String)>,
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
        let cache = config.work_dir.join("plugin-cache");
        std::fs::create_dir_all(&cache)?;
        let mut text = format!("plugin_cache_dir = {:?}\n", cache.display().to_string());
        if let Some(mirror) = &config.provider_mirror {
            text.push_str(&format!(
                "provider_installation {{\n  filesystem_mirror {{\n    path = {:?}\n  }}\n}}\n",
                mirror.display().to_string()
            ));
        }
        std::fs::write(&rc, text)?;
        let env = [
            ("CHECKPOINT_DISABLE", "1".to_owned()),
            ("TF_IN_AUTOMATION", "1".to_owned()),
            ("TF_INPUT", "0".to_owned()),
            ("TF_CLI_CONFIG_FILE", rc.display().to_string()),
            // The backend reads its connection from here: never on a command
            // line (visible to every process) or in `.terraform/` (on disk).
            ("PG_CONN_STR", config.state_url.expose().clone()),
            ("PG_SCHEMA_NAME", schema.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Ok(Self {
            bin: config.terraform.clone(),
            env,
        })
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
        let said = if stderr.trim().is_empty() {
            String::from_utf8_lossy(stdout).into_owned()
        } else {
            stderr.to_owned()
        };
        if said.contains("Error acquiring the state lock") {
            return Failure::Locked(tail(&said, 3));
        }
        if said.contains("Saved plan is stale") {
            return Failure::Stale(tail(&said, 3));
        }
        Failure::Failed {
            command: command.to_owned(),
            detail: tail(&said, 12),
        }
    }

    /// `terraform init`, then the backend it configured (`None`: local state).
    pub async fn init(&self, dir: &Path) -> Result<Option<String>, Failure> {
        let args = ["init", "-input=false", "-no-color", "-reconfigure"].map(str::to_owned);
        let (code, stdout, stderr) = self.run(dir, &args).await?;
        if code != 0 {
            return Err(Self::failed("init", &stderr, &stdout));
        }
        #[derive(Deserialize)]
        struct Local {
            backend: Option<Backend>,
        }
        #[derive(Deserialize)]
        struct Backend {
            #[serde(rename = "type")]
            kind: String,
        }
        let backend = std::fs::read(dir.join(".terraform/terraform.tfstate"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Local>(&b).ok())
            .and_then(|l| l.backend)
            .map(|b| b.kind);
        Ok(backend)
    }

    /// `terraform plan -out=plan` (or `-destroy`); whether anything changes.
    pub async fn plan(&self, dir: &Path, out: &Path, lock_timeout: Duration, destroy: bool) -> Result<bool, Failure> {
        let mut args: Vec<String> = ["plan", "-input=false", "-no-color", "-detailed-exitcode"]
            .map(str::to_owned)
            .to_vec();
        args.push(format!("-lock-timeout={}s", lock_timeout.as_secs()));
        args.push(format!("-out={}", out.display()));
        if destroy {
            args.push("-destroy".to_owned());
        }
        match self.run(dir, &args).await? {
            (0, ..) => Ok(false),
            (2, ..) => Ok(true),
            (_, stdout, stderr) => Err(Self::failed("plan", &stderr, &stdout)),
        }
    }

    /// The saved plan's changes (`terraform show -json`).
    pub async fn show(&self, dir: &Path, plan: &Path) -> Result<TerraformPlanned, Failure> {
        let args = vec![
            "show".to_owned(),
            "-json".to_owned(),
            "-no-color".to_owned(),
            plan.display().to_string(),
        ];
        let (code, stdout, stderr) = self.run(dir, &args).await?;
        if code != 0 {
            return Err(Self::failed("show", &stderr, &stdout));
        }
        summarize(&stdout).map_err(|detail| Failure::Failed {
            command: "show".into(),
            detail,
        })
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

/// Reads `terraform show -json` of a plan: every resource that changes.
pub fn summarize(json: &[u8]) -> Result<TerraformPlanned, String> {
    #[derive(Deserialize)]
    struct Plan {
        #[serde(default)]
        resource_changes: Vec<Change>,
    }
    #[derive(Deserialize)]
    struct Change {
        address: String,
        change: Actions,
    }
    #[derive(Deserialize)]
    struct Actions {
        actions: Vec<String>,
    }
    let plan: Plan = serde_json::from_slice(json).map_err(|e| format!("terraform show -json: {e}"))?;
    let mut s = TerraformPlanned::default();
    for c in plan.resource_changes {
        let a: Vec<&str> = c.change.actions.iter().map(String::as_str).collect();
        let action = match a.as_slice() {
            ["create"] => {
                s.add += 1;
                "create"
            }
            ["update"] => {
                s.change += 1;
                "update"
            }
            ["delete"] => {
                s.destroy += 1;
                "delete"
            }
            ["delete", "create"] | ["create", "delete"] => {
                s.add += 1;
                s.destroy += 1;
                "replace"
            }
            // no-op, read, forget: nothing in the infrastructure changes.
            _ => continue,
        };
        s.changes.push(ResourceChange {
            address: c.address,
            action: action.to_owned(),
        });
    }
    s.resources_changed = s.changes.len() as u64;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_summarized_by_action() {
        let json = br#"{"resource_changes": [
            {"address": "terraform_data.a", "change": {"actions": ["create"]}},
            {"address": "terraform_data.b", "change": {"actions": ["no-op"]}},
            {"address": "terraform_data.c", "change": {"actions": ["delete", "create"]}},
            {"address": "module.m.terraform_data.d[0]", "change": {"actions": ["update"]}},
            {"address": "terraform_data.e", "change": {"actions": ["delete"]}},
            {"address": "data.x.y", "change": {"actions": ["read"]}}
        ]}"#;
        let s = summarize(json).unwrap();
        assert_eq!((s.resources_changed, s.add, s.change, s.destroy), (4, 2, 1, 2));
        let actions: Vec<_> = s
            .changes
            .iter()
            .map(|c| (c.address.as_str(), c.action.as_str()))
            .collect();
        assert_eq!(
            actions,
            [
                ("terraform_data.a", "create"),
                ("terraform_data.c", "replace"),
                ("module.m.terraform_data.d[0]", "update"),
                ("terraform_data.e", "delete")
            ]
        );
    }
}
