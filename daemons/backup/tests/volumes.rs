//! Persistent volumes: a service's volume directory is archived into its
//! backup, encrypted, copied, checked by its tree hash, restored byte for
//! byte by a compensation, and tested monthly; tampering is refused.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use baton_backup::VolumeConfig;
use baton_backup::store::{self, Manifest};
use common::{Env, backup_id_of, flip_byte, job, seed_params};
use serde_json::json;
use uuid::Uuid;

const CLAIM: &str = "uploads";

/// Every entry below `root` (and `root` itself as ""): kind, permission
/// bits, owner, group, and content or link target. Read independently of the
/// daemon's tree hash.
fn listing(root: &Path) -> BTreeMap<PathBuf, (char, u32, u32, u32, Vec<u8>)> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, (char, u32, u32, u32, Vec<u8>)>) {
        let abs = root.join(rel);
        let meta = fs::symlink_metadata(&abs).unwrap();
        let (kind, content) = if meta.file_type().is_symlink() {
            ('l', fs::read_link(&abs).unwrap().into_os_string().into_encoded_bytes())
        } else if meta.is_dir() {
            ('d', Vec::new())
        } else {
            ('f', fs::read(&abs).unwrap())
        };
        out.insert(
            rel.to_owned(),
            (kind, meta.mode() & 0o7777, meta.uid(), meta.gid(), content),
        );
        if kind == 'd' {
            for e in fs::read_dir(&abs).unwrap() {
                walk(root, &rel.join(e.unwrap().file_name()), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

/// A volume with nested directories, files of several sizes and modes, an
/// empty file, an executable, a file of another owner, relative, absolute
/// and dangling symbolic links, and a name with a space.
fn fill(dir: &Path) {
    fs::create_dir_all(dir.join("images/2026/12")).unwrap();
    fs::write(
        dir.join("images/2026/12/cat.png"),
        (0..=255u8).cycle().take(300_000).collect::<Vec<_>>(),
    )
    .unwrap();
    fs::write(dir.join("images/index.json"), br#"{"count": 1}"#).unwrap();
    fs::write(dir.join("private.key"), b"not for others").unwrap();
    fs::set_permissions(dir.join("private.key"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(dir.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(dir.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join("empty"), b"").unwrap();
    fs::write(dir.join("with space.txt"), b"spaces").unwrap();
    std::os::unix::fs::chown(dir.join("with space.txt"), Some(1000), Some(1001)).unwrap();
    symlink("images/2026/12/cat.png", dir.join("latest.png")).unwrap();
    symlink("/etc/hostname", dir.join("absolute")).unwrap();
    symlink("gone/away", dir.join("dangling")).unwrap();
    fs::set_permissions(dir.join("images/2026"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o770)).unwrap();
}

/// An environment whose service has one volume at `<root>/node/…_uploads`.
async fn env_with_volume(quiesce: Vec<String>, resume: Vec<String>) -> (Env, PathBuf) {
    let mut env = Env::new().await;
    let dir = env.root.join("node/storage/pvc-1234_shop_uploads");
    fs::create_dir_all(&dir).unwrap();
    fill(&dir);
    env.settings.volumes = BTreeMap::from([(
        common::SERVICE.to_owned(),
        vec![VolumeConfig {
            claim: CLAIM.into(),
            path: dir.clone(),
            quiesce,
            resume,
        }],
    )]);
    env.reconfigure();
    (env, dir)
}

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&fs::read(dir.join(store::MANIFEST_FILE)).unwrap()).unwrap()
}

fn shell(script: String) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script]
}

#[tokio::test]
async fn a_volume_round_trips_through_backup_and_restore_byte_for_byte() {
    let (env, dir) = env_with_volume(Vec::new(), Vec::new()).await;
    let before = listing(&dir);
    let run = Uuid::new_v4();
    let out = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .expect("pre-deploy succeeds");
    let id = backup_id_of(&out);

    // The outputs name the volume, how it was copied, and its tree hash.
    let v = &out["volumes"][0];
    assert_eq!(v["claim"], json!(CLAIM));
    assert_eq!(
        v["consistency"],
        json!("live"),
        "no quiesce command: the copy says it is live"
    );
    assert_eq!(v["entries"], json!(before.len() - 1));
    assert_eq!(v["changed_while_copied"], json!(0));
    assert_eq!(v["tree_sha256"].as_str().unwrap().len(), 64);

    // Both locations hold the encrypted archive; nothing of it is readable.
    let archive = format!("volume-{CLAIM}.tar.age");
    for d in [env.primary_dir(&id), env.copy_dir(&id)] {
        let m = manifest(&d);
        assert_eq!(m.volumes.len(), 1);
        assert!(m.files.contains_key(&archive));
        let bytes = fs::read(d.join(&archive)).unwrap();
        assert!(bytes.starts_with(b"age-encryption.org/v1"));
        assert!(!bytes.windows(14).any(|w| w == b"not for others"));
    }

    // The service writes after the backup; the run is compensated.
    fs::remove_file(dir.join("private.key")).unwrap();
    fs::write(dir.join("images/index.json"), br#"{"count": 2}"#).unwrap();
    fs::write(dir.join("new-upload.bin"), b"written after the backup").unwrap();
    fs::set_permissions(dir.join("run.sh"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::remove_file(dir.join("latest.png")).unwrap();
    symlink("elsewhere", dir.join("latest.png")).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    assert_ne!(listing(&dir), before);

    let report = env
        .compensate(&job("restore-volumes", "backup.pre", run, json!({})))
        .await
        .expect("restore-volumes succeeds");
    assert_eq!(report["backup_id"], json!(id));
    assert_eq!(report["source"], json!("primary"));
    assert_eq!(report["volumes"][0]["matches_backup"], json!(true));
    assert_eq!(report["volumes"][0]["tree_sha256"], v["tree_sha256"]);
    assert_eq!(listing(&dir), before, "every file, link, mode and owner as backed up");

    // Nothing left beside the volume.
    let leftovers: Vec<_> = fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".baton-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The monthly restore test unpacks the volume from both locations.
    let test = env
        .role
        .restore_test(common::ZONE, common::SERVICE, "2026-12")
        .await
        .unwrap();
    assert_eq!(test.sites.len(), 2);
    assert!(test.sites.iter().all(|s| s.volumes == 1), "{test:?}");

    // The scheduled daily backup takes the volume too.
    let date = chrono::NaiveDate::from_ymd_opt(2026, 12, 7).unwrap();
    let daily = env
        .role
        .daily_backup(common::ZONE, common::SERVICE, date)
        .await
        .unwrap();
    assert_eq!(daily.volumes.len(), 1);
    assert_eq!(daily.volumes[0].tree_sha256, v["tree_sha256"].as_str().unwrap());
}

#[tokio::test]
async fn baton_backup_scheduled_pass_backs_up_and_restore_tests_the_volume() {
    let (env, dir) = env_with_volume(Vec::new(), Vec::new()).await;
    let config = common::write_config(&env);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-backup"))
        .arg("--config")
        .arg(&config)
        .arg("--scheduled-pass")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run baton-backup --scheduled-pass");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not a JSON report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let id = report["tasks"][0]["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(report["tasks"][2]["task"], json!("restore_test"), "{report:#}");
    // The day's backup holds the volume, with the tree hash of the volume as it is.
    let m = manifest(&env.primary_dir(&id));
    assert_eq!(m.volumes.len(), 1);
    assert_eq!(m.volumes[0].claim, CLAIM);
    assert_eq!(
        m.volumes[0].tree_sha256,
        baton_backup::volume::tree(&dir).unwrap().sha256
    );
    // The month's restore test unpacked it from both locations.
    let test = env
        .role
        .restore_test_of(
            common::ZONE,
            common::SERVICE,
            &chrono::Utc::now().format("%Y-%m").to_string(),
        )
        .await
        .unwrap()
        .expect("the restore test is recorded");
    assert!(test.sites.iter().all(|s| s.volumes == 1), "{test:?}");
}

#[tokio::test]
async fn a_tampered_volume_archive_is_refused_and_the_live_volume_left_alone() {
    let (env, dir) = env_with_volume(Vec::new(), Vec::new()).await;
    let run = Uuid::new_v4();
    let id = backup_id_of(
        &env.run(&job("pre-deploy", "backup.pre", run, seed_params()))
            .await
            .unwrap(),
    );
    let archive = format!("volume-{CLAIM}.tar.age");

    flip_byte(&env.primary_dir(&id).join(&archive));
    let err = env
        .run(&job(
            "verify",
            "backup.verify",
            Uuid::new_v4(),
            json!({"backup_id": id}),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code, "backup_corrupted", "{err}");
    assert!(err.message.contains(&archive), "{}", err.message);

    // With the copy damaged too, nothing can be restored, and nothing is.
    flip_byte(&env.copy_dir(&id).join(&archive));
    fs::write(dir.join("after.txt"), b"kept").unwrap();
    let live = listing(&dir);
    let err = env
        .compensate(&job("restore-volumes", "backup.pre", run, json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.code, "backup_corrupted", "{err}");
    assert_eq!(listing(&dir), live);
}

#[tokio::test]
async fn a_quiesced_copy_holds_the_service_and_a_failed_quiesce_copies_nothing() {
    let held = std::env::temp_dir().join(format!("baton-volume-held-{}", Uuid::new_v4().simple()));
    let log = held.with_extension("log");
    let quiesce = shell(format!(
        "touch {0} && echo quiesce >> {1}",
        held.display(),
        log.display()
    ));
    let resume = shell(format!("rm {0} && echo resume >> {1}", held.display(), log.display()));
    let (env, _dir) = env_with_volume(quiesce, resume).await;
    let out = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .expect("pre-deploy succeeds");
    assert_eq!(out["volumes"][0]["consistency"], json!("quiesced"));
    assert_eq!(fs::read_to_string(&log).unwrap(), "quiesce\nresume\n");
    assert!(!held.exists(), "resumed");

    // A service that cannot be held: no backup, and the error says why.
    let (mut env, dir) = env_with_volume(Vec::new(), Vec::new()).await;
    env.settings.volumes.get_mut(common::SERVICE).unwrap()[0] = VolumeConfig {
        claim: CLAIM.into(),
        path: dir,
        quiesce: shell("echo 'writes cannot be held now' >&2; exit 3".into()),
        resume: shell(format!("echo resume-after-failure >> {}", log.display())),
    };
    env.reconfigure();
    let run = Uuid::new_v4();
    let err = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "quiesce_failed", "{err}");
    assert!(err.retryable);
    assert!(err.message.contains("writes cannot be held now"), "{}", err.message);
    assert!(env.backups_in(&env.settings.primary.path).is_empty());
    // A quiesce that failed may have half taken effect: resume runs after it.
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "quiesce\nresume\nresume-after-failure\n"
    );
    let _ = fs::remove_file(&log);
}

#[test]
fn volume_configuration_mistakes_are_named() {
    let settings = |volumes: Vec<VolumeConfig>, service: &str| {
        let mut s: baton_backup::BackupSettings = serde_json::from_value(json!({
            "admin_url": "postgres://postgres@127.0.0.1/postgres",
            "recipients": ["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"],
            "identity_file": "/etc/baton/identity",
            "primary": {"path": "/srv/backups", "region": "nl-ams1"},
            "copy": {"path": "/mnt/copy", "region": "de-fra1"},
            "databases": {"shop-api": "postgres://postgres@127.0.0.1/shop"},
        }))
        .unwrap();
        s.volumes.insert(service.to_owned(), volumes);
        s
    };
    let vol = |claim: &str, path: &str| VolumeConfig {
        claim: claim.into(),
        path: path.into(),
        ..VolumeConfig::default()
    };
    let problem = |s: baton_backup::BackupSettings| s.validate().unwrap_err().to_string();

    assert!(
        settings(vec![vol("uploads", "/var/lib/k3s/storage/x")], "shop-api")
            .validate()
            .is_ok()
    );
    let p = problem(settings(vec![vol("uploads", "/x")], "billing"));
    assert!(p.contains("backup.volumes.billing") && p.contains("no database"), "{p}");
    let p = problem(settings(vec![vol("Uploads!", "/x")], "shop-api"));
    assert!(p.contains("backup.volumes.shop-api[0].claim"), "{p}");
    let p = problem(settings(vec![vol("a", "/x"), vol("a", "/y")], "shop-api"));
    assert!(p.contains("[1].claim") && p.contains("twice"), "{p}");
    let p = problem(settings(vec![vol("a", "relative/dir")], "shop-api"));
    assert!(p.contains("[0].path") && p.contains("absolute"), "{p}");
    let p = problem(settings(vec![vol("a", "/srv")], "shop-api"));
    assert!(p.contains("overlaps backup.primary.path"), "{p}");
    let mut half = vol("a", "/x");
    half.quiesce = vec!["/usr/bin/freeze".into()];
    let p = problem(settings(vec![half], "shop-api"));
    assert!(p.contains("[0].resume") && p.contains("is required"), "{p}");
}
