//! The `baton-db-migration` binary's configuration handling.

mod common;

use std::process::Command;

use common::TempDir;

/// A config file with a valid `[signing]` section plus `extra`.
fn config_file(dir: &TempDir, extra: &str) -> std::path::PathBuf {
    let key = baton_shared::signing::Keypair::generate();
    let key_file = dir.0.join("key");
    std::fs::write(&key_file, key.secret_file_contents()).unwrap();
    let path = dir.0.join("baton.toml");
    std::fs::write(
        &path,
        format!(
            "[signing]\nkey_file = {:?}\ntrusted = [{:?}]\n{extra}",
            key_file.display().to_string(),
            key.public()
        ),
    )
    .unwrap();
    path
}

fn daemon() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton-db-migration"));
    for (k, _) in std::env::vars() {
        if k.starts_with("BATON_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn print_config_takes_databases_from_the_environment_and_redacts_them() {
    let dir = TempDir::new("cli");
    let path = config_file(
        &dir,
        "[migration.databases]\nbilling = \"postgres://m:filepw@db/billing\"\n",
    );
    let out = daemon()
        .arg("--config")
        .arg(&path)
        .arg("--print-config")
        .env("BATON_DAEMON__ZONE", "production")
        .env("BATON_MIGRATION__DATABASES__SHOP_API", "postgres://m:envpw@db/shop")
        .env("BATON_MIGRATION__LOCK_TIMEOUT_SECS", "42")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[migration.databases]"), "{stdout}");
    assert!(stdout.contains("shop_api = \"[redacted]\""), "{stdout}");
    assert!(stdout.contains("billing = \"[redacted]\""), "{stdout}");
    assert!(stdout.contains("lock_timeout_secs = 42"), "{stdout}");
    assert!(stdout.contains("zone = \"production\""), "{stdout}");
    assert!(!stdout.contains("envpw") && !stdout.contains("filepw"), "{stdout}");
}

#[test]
fn invalid_configuration_exits_2_naming_the_key() {
    let dir = TempDir::new("cli");
    let path = config_file(
        &dir,
        "[daemon]\nzone = \"staging\"\n[migration.databases]\nshop-api = \"mysql://u:pw@db/shop\"\n",
    );
    let out = daemon().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("migration.databases") && stderr.contains("shop-api"),
        "{stderr}"
    );
    assert!(!stderr.contains("pw@"), "{stderr}");

    let path = config_file(
        &dir,
        "[daemon]\nzone = \"staging\"\n[migration]\nlock_timeout_secs = 0\n",
    );
    let out = daemon().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("migration.lock_timeout_secs"));

    let out = daemon()
        .arg("--config")
        .arg(dir.0.join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn a_relative_repos_dir_is_refused_naming_the_key() {
    let dir = TempDir::new("cli");
    let path = config_file(
        &dir,
        "[daemon]\nzone = \"staging\"\n[migration]\nrepos_dir = \"cache/repos\"\n",
    );
    let out = daemon().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("migration.repos_dir") && stderr.contains("cache/repos is a relative path"),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_apply_and_verify_run_once_without_a_broker_as_a_job_would() {
    let db = common::TestDb::create().await;
    let cache = TempDir::new("cache");
    let repo = common::GitRepo::new();
    common::write_fixture(&repo, 2);
    let sha = repo.commit("two migrations");
    let dir = TempDir::new("cli");
    // No broker and no signing key: a one-shot mode needs neither.
    let cfg = common::config(&db, &cache);
    let path = dir.0.join("baton.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\nzone = \"staging\"\n[migration]\nrepos_dir = {:?}\nadmin_url = {:?}\n[migration.databases]\n{} = {:?}\n",
            cfg.repos_dir.display().to_string(),
            cfg.admin_url.expose(),
            common::SERVICE,
            db.url()
        ),
    )
    .unwrap();
    let once = |mode: &str| {
        let out = daemon()
            .args(["--config", path.to_str().unwrap(), mode, "--service", common::SERVICE])
            .args(["--repository", repo.path().to_str().unwrap(), "--commit", &sha])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "{mode}: not JSON ({e}): {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), json)
    };

    let (code, report) = once("check");
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["would"], "apply", "{report}");
    let states: Vec<&str> = report["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "pending"]);
    assert!(db.tables().await.is_empty(), "check changes nothing");

    let (code, out) = once("apply");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(common::strings(&out["applied"]).len(), 2);
    assert!(!db.tables().await.is_empty());

    let (code, report) = once("check");
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["would"], "nothing", "{report}");
    let (code, out) = once("verify");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out["schema_matches"], true, "{out}");
}
