//! Configuration as an operator writes it: a TOML file loaded through figment,
//! validated, and the `baton-backup` binary's exit codes and printed config.

use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;
use baton_backup::{BackupRole, Daemon};
use baton_shared::kit;

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("baton-backup-cfg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A complete configuration file; `copy_region` varies per test.
fn write_config(dir: &Path, copy_region: &str) -> PathBuf {
    let id = age::x25519::Identity::generate();
    let identity_file = dir.join("identity.txt");
    std::fs::write(&identity_file, format!("{}\n", id.to_string().expose_secret())).unwrap();
    let key = baton_shared::signing::Keypair::generate();
    let key_file = dir.join("signing.key");
    std::fs::write(&key_file, key.secret_file_contents()).unwrap();
    let text = format!(
        r#"
[signing]
key_file = "{key_file}"
trusted = ["{trusted}"]

[daemon]
zone = "production"
concurrency = 2

[backup]
admin_url = "postgres://postgres:admin-secret@127.0.0.1:5432/postgres"
recipients = ["{recipient}"]
identity_file = "{identity}"

[backup.primary]
path = "{dir}/primary"
region = "nl-ams1"

[backup.copy]
path = "{dir}/copy"
region = "{copy_region}"

[backup.databases]
shop-api = "postgres://backup:db-secret@127.0.0.1:5432/shop"
"#,
        recipient = id.to_public(),
        key_file = key_file.display(),
        trusted = key.public(),
        identity = identity_file.display(),
        dir = dir.display(),
    );
    let path = dir.join("baton.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_toml_file_loads_into_the_shared_and_backup_sections() {
    let dir = Dir::new();
    let path = write_config(&dir.0, "de-fra1");
    let cfg = kit::load::<Daemon>(Some(&path)).unwrap();
    assert_eq!(cfg.common.daemon.zone, "production");
    assert_eq!(cfg.common.daemon.concurrency, 2);
    assert_eq!(cfg.settings.copy.region, "de-fra1");
    assert_eq!(
        cfg.settings.databases["shop-api"].expose(),
        "postgres://backup:db-secret@127.0.0.1:5432/shop"
    );
    cfg.settings.validate().unwrap();
    BackupRole::from_settings(&cfg.settings).expect("role builds and reads the identity");
}

#[test]
fn non_eu_location_is_refused_by_config_validation() {
    let dir = Dir::new();
    let path = write_config(&dir.0, "us-east-1");
    let cfg = kit::load::<Daemon>(Some(&path)).unwrap();
    let err = cfg.settings.validate().unwrap_err().to_string();
    assert!(
        err.contains("`backup.copy.region`") && err.contains("us-east-1"),
        "{err}"
    );
    let err = BackupRole::from_settings(&cfg.settings).err().unwrap().to_string();
    assert!(err.contains("backup.copy.region"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-backup"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("backup.copy.region") && stderr.contains("us-east-1"),
        "{stderr}"
    );
}

#[test]
fn print_config_redacts_every_database_url() {
    let dir = Dir::new();
    let path = write_config(&dir.0, "de-fra1");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-backup"))
        .arg("--config")
        .arg(&path)
        .arg("--print-config")
        .env("BATON_DAEMON__CONCURRENCY", "5")
        .env("BATON_BACKUP__COPY__REGION", "de-ber1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[backup.primary]") && text.contains("nl-ams1"), "{text}");
    // Environment variables override the file, through the flattened shared sections too.
    assert!(
        text.contains("concurrency = 5") && text.contains("\"de-ber1\""),
        "{text}"
    );
    assert!(!text.contains("db-secret") && !text.contains("admin-secret"), "{text}");
    assert!(!text.contains("AGE-SECRET-KEY"), "{text}");
}

#[test]
fn a_missing_config_file_exits_2() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-backup"))
        .args(["--config", "/nonexistent/baton-backup.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/baton-backup.toml"));
}
