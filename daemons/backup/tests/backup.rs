//! The backup role against real PostgreSQL 15, `pg_dump`, `pg_restore` and `psql`:
//! taking, copying, verifying, pruning and restoring backups.

mod common;

use std::collections::BTreeMap;
use std::io::Read;

use baton_backup::Policy;
use baton_backup::store::{self, Manifest};
use baton_shared::facts::verified_backup_of_run;
use chrono::Duration;
use common::{Env, ZONE, backup_id_of, flip_byte, job, scratch_databases, seed_params};
use serde_json::json;
use uuid::Uuid;

fn read_manifest(dir: &std::path::Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(dir.join(store::MANIFEST_FILE)).unwrap()).unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn pre_deploy_backup_is_encrypted_copied_and_restorable() {
    let env = Env::new().await;
    let run = Uuid::new_v4();
    let out = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .expect("pre-deploy succeeds");

    // The outputs contract, exactly.
    let mut keys: Vec<&str> = out.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "backup_id",
            "bytes",
            "copy_location",
            "copy_region",
            "location",
            "region",
            "run_id",
            "sha256",
            "tables",
            "verified"
        ]
    );
    let id = backup_id_of(&out);
    assert_eq!(out["run_id"], json!(run.to_string()));
    assert_eq!(out["verified"], json!(true));
    assert_eq!(out["tables"], json!(3));
    assert_eq!(out["region"], json!("nl-ams1"));
    assert_eq!(out["copy_region"], json!("de-fra1"));
    assert_eq!(out["location"], json!(env.primary_dir(&id).display().to_string()));
    assert_eq!(out["copy_location"], json!(env.copy_dir(&id).display().to_string()));

    // Encrypted at rest: an age file, no table names, no data.
    let dump = std::fs::read(env.primary_dir(&id).join(store::DUMP_FILE)).unwrap();
    assert!(dump.starts_with(baton_backup::crypto::AGE_HEADER), "not an age file");
    for word in ["customers", "invoices", "example.org", "PGDMP", "billing"] {
        assert!(!contains(&dump, word), "{word} visible in the encrypted dump");
    }
    let manifest_text = std::fs::read(env.primary_dir(&id).join(store::MANIFEST_FILE)).unwrap();
    assert!(
        !contains(&manifest_text, "customers"),
        "table names in the plaintext manifest"
    );
    assert_eq!(out["bytes"], json!(dump.len()));
    let sha = baton_backup::crypto::sha256_file(&env.primary_dir(&id).join(store::DUMP_FILE)).unwrap();
    assert_eq!(out["sha256"], json!(sha.sha256));

    // The cross-zone copy holds the same bytes.
    let copy_sha = baton_backup::crypto::sha256_file(&env.copy_dir(&id).join(store::DUMP_FILE)).unwrap();
    assert_eq!(copy_sha, sha);
    assert_eq!(read_manifest(&env.copy_dir(&id)), read_manifest(&env.primary_dir(&id)));

    // An operator with the identity can decrypt it to a pg_restore archive.
    let plain_path = env.root.join("decrypted.dump");
    let mut plain = Vec::new();
    age::Decryptor::new(&dump[..])
        .unwrap()
        .decrypt(std::iter::once(&env.identity as &dyn age::Identity))
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    assert!(plain.starts_with(b"PGDMP"), "custom-format archive inside");
    std::fs::write(&plain_path, &plain).unwrap();
    let listing = std::process::Command::new("pg_restore")
        .arg("--list")
        .arg(&plain_path)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("TABLE DATA public customers") && listing.contains("TABLE DATA billing invoices"),
        "{listing}"
    );

    // A later step finds the run's verified backup in its inputs.
    let mut inputs = BTreeMap::new();
    inputs.insert("backup.pre".to_owned(), out.clone());
    let found = verified_backup_of_run("backup.pre", &inputs["backup.pre"], run).unwrap();
    assert_eq!(found.backup_id, id);

    // verify, named by input or by param, restores into a scratch database and compares.
    let mut verify = job("verify", "backup.verify", run, json!({}));
    verify.inputs = inputs;
    let verified = env.run(&verify).await.expect("verify succeeds");
    assert_eq!(verified, out);
    let verified = env
        .run(&job("verify", "backup.verify", run, json!({"backup_id": id})))
        .await
        .expect("verify by id succeeds");
    assert_eq!(verified["sha256"], out["sha256"]);
    assert!(scratch_databases(&id).await.is_empty(), "scratch database left behind");
}

#[tokio::test]
async fn verify_fails_for_a_backup_with_one_byte_flipped() {
    let env = Env::new().await;
    let out = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    let id = backup_id_of(&out);
    flip_byte(&env.primary_dir(&id).join(store::DUMP_FILE));

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
    assert!(!err.retryable);
    for part in [id.as_str(), store::DUMP_FILE, "primary", "corrupted"] {
        assert!(err.message.contains(part), "{part} not in: {}", err.message);
    }
}

#[tokio::test]
async fn verify_fails_when_the_ciphertext_is_tampered_even_if_the_manifest_agrees() {
    let env = Env::new().await;
    let out = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    let id = backup_id_of(&out);
    // Flip a byte and rewrite both manifests to match: only age's MAC can tell now.
    for dir in [env.primary_dir(&id), env.copy_dir(&id)] {
        flip_byte(&dir.join(store::DUMP_FILE));
        let mut m = read_manifest(&dir);
        let d = baton_backup::crypto::sha256_file(&dir.join(store::DUMP_FILE)).unwrap();
        m.files.insert(store::DUMP_FILE.into(), d.into());
        store::write_json_atomic(&dir, store::MANIFEST_FILE, &m).unwrap();
    }
    let err = env.role.verify(ZONE, &id).await.unwrap_err();
    assert_eq!(err.code(), "decrypt_failed", "{err}");
    assert!(
        err.to_string().contains(&id) && err.to_string().contains("cannot decrypt"),
        "{err}"
    );
    assert!(scratch_databases(&id).await.is_empty(), "scratch database left behind");
}

#[tokio::test]
async fn verify_fails_for_a_missing_backup() {
    let env = Env::new().await;
    let err = env
        .run(&job(
            "verify",
            "backup.verify",
            Uuid::new_v4(),
            json!({"backup_id": "shop-api.backup.pre.nope"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code, "backup_missing", "{err}");
    assert!(
        err.message.contains("shop-api.backup.pre.nope") && err.message.contains("not found"),
        "{}",
        err.message
    );

    // A backup whose dump file vanished is missing too, and says which file.
    let out = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    let id = backup_id_of(&out);
    std::fs::remove_file(env.primary_dir(&id).join(store::DUMP_FILE)).unwrap();
    let err = env.role.verify(ZONE, &id).await.unwrap_err();
    assert_eq!(err.code(), "backup_missing", "{err}");
    assert!(
        err.to_string().contains(store::DUMP_FILE) && err.to_string().contains(&id),
        "{err}"
    );
}

#[tokio::test]
async fn copy_mismatch_and_missing_copy_fail_verify() {
    let env = Env::new().await;
    let out = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    let id = backup_id_of(&out);
    let copy_dump = env.copy_dir(&id).join(store::DUMP_FILE);
    let original = std::fs::read(&copy_dump).unwrap();
    flip_byte(&copy_dump);
    let err = env.role.verify(ZONE, &id).await.unwrap_err();
    assert_eq!(err.code(), "copy_mismatch", "{err}");
    assert!(
        err.to_string().contains("copy") && err.to_string().contains(&id),
        "{err}"
    );

    std::fs::write(&copy_dump, original).unwrap();
    env.role.verify(ZONE, &id).await.expect("repaired copy verifies");

    std::fs::remove_dir_all(env.copy_dir(&id)).unwrap();
    let err = env.role.verify(ZONE, &id).await.unwrap_err();
    assert_eq!(err.code(), "copy_missing", "{err}");
    assert!(err.to_string().contains("copy location"), "{err}");
}

#[tokio::test]
async fn pre_deploy_is_idempotent_for_the_same_run_and_step() {
    let env = Env::new().await;
    let run = Uuid::new_v4();
    let first = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .unwrap();
    let id = backup_id_of(&first);
    let created = read_manifest(&env.primary_dir(&id)).created_at;
    // The database changes; a redelivered job must still return the same backup.
    env.sql("INSERT INTO customers (email) VALUES ('late@example.org')")
        .await;
    let second = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(read_manifest(&env.primary_dir(&id)).created_at, created);
    assert_eq!(env.backups_in(&env.settings.primary.path), vec![id.clone()]);

    // A lost copy is made again on the next delivery.
    std::fs::remove_dir_all(env.copy_dir(&id)).unwrap();
    let third = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .unwrap();
    assert_eq!(third, first);
    assert!(env.copy_dir(&id).join(store::DUMP_FILE).exists());

    // Another run is another backup.
    let other = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    assert_ne!(backup_id_of(&other), id);
    assert_eq!(env.backups_in(&env.settings.copy.path).len(), 2);
}

#[tokio::test]
async fn post_deploy_takes_its_own_backup_and_requires_the_runs_pre_deploy_backup() {
    let env = Env::new().await;
    let run = Uuid::new_v4();
    let err = env
        .run(&job("post-deploy", "backup.post", run, seed_params()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "pre_deploy_backup_missing", "{err}");
    assert!(err.message.contains(&run.to_string()), "{}", err.message);

    let pre = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .unwrap();
    let post = env
        .run(&job("post-deploy", "backup.post", run, seed_params()))
        .await
        .unwrap();
    assert_ne!(backup_id_of(&pre), backup_id_of(&post));
    assert_eq!(post["verified"], json!(true));
    assert_eq!(post["run_id"], json!(run.to_string()));
    let m = read_manifest(&env.primary_dir(&backup_id_of(&post)));
    assert_eq!(m.kind, store::BackupKind::PostDeploy);

    // Without the requirement, post-deploy alone is fine.
    let alone = env
        .run(&job(
            "post-deploy",
            "backup.post",
            Uuid::new_v4(),
            json!({"require_pre_deploy": false}),
        ))
        .await
        .unwrap();
    assert_eq!(alone["verified"], json!(true));
}

#[tokio::test]
async fn restore_check_mismatch_is_reported_and_the_scratch_database_dropped() {
    let env = Env::new().await;
    let out = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    let id = backup_id_of(&out);
    // Rewrite the encrypted table list so it claims one more order than the dump holds.
    let keys = baton_backup::crypto::Keys::new(vec![env.identity.to_public()], vec![env.identity.clone()]).unwrap();
    let primary = env.primary_dir(&id);
    let mut plain = Vec::new();
    keys.decryptor(std::fs::File::open(primary.join(store::TABLES_FILE)).unwrap())
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    let mut stats: Vec<baton_backup::pg::TableStats> = serde_json::from_slice(&plain).unwrap();
    let orders = stats.iter_mut().find(|t| t.table == "orders").unwrap();
    orders.rows += 1;
    std::fs::remove_file(primary.join(store::TABLES_FILE)).unwrap();
    let d = keys
        .encrypt_to_file(&serde_json::to_vec(&stats).unwrap(), &primary.join(store::TABLES_FILE))
        .unwrap();
    let mut m = read_manifest(&primary);
    m.files.insert(store::TABLES_FILE.into(), d.into());
    for dir in [primary.clone(), env.copy_dir(&id)] {
        if dir != primary {
            std::fs::copy(primary.join(store::TABLES_FILE), dir.join(store::TABLES_FILE)).unwrap();
        }
        store::write_json_atomic(&dir, store::MANIFEST_FILE, &m).unwrap();
    }
    let err = env.role.verify(ZONE, &id).await.unwrap_err();
    assert_eq!(err.code(), "restore_check_failed", "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&id) && text.contains("public.orders") && text.contains("1000 rows restored"),
        "{text}"
    );
    assert!(scratch_databases(&id).await.is_empty(), "scratch database left behind");
}

#[tokio::test]
async fn restore_refuses_without_confirmation_and_restores_with_it() {
    let env = Env::new().await;
    let run = Uuid::new_v4();
    let before = env.stats().await;
    let out = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .unwrap();
    let id = backup_id_of(&out);

    // An irreversible migration: a column with data dropped, rows deleted, a new table and schema.
    env.sql(
        "ALTER TABLE customers DROP COLUMN balance;
         DELETE FROM orders WHERE id % 2 = 0;
         CREATE TABLE migrated_extra (x int); INSERT INTO migrated_extra VALUES (1);
         CREATE SCHEMA added; CREATE TABLE added.t (y int);",
    )
    .await;
    let damaged = env.stats().await;
    assert_ne!(damaged, before);

    for params in [
        json!({"backup_id": id}),
        json!({"backup_id": id, "confirm_backup_id": "yes"}),
        json!({"backup_id": id, "confirm_backup_id": format!("{id}x")}),
    ] {
        let err = env
            .run(&job("restore", "restore", run, params.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code, "confirmation_required", "{params}: {err}");
        assert!(err.message.contains("confirm_backup_id") && err.message.contains(&id));
    }
    assert_eq!(env.stats().await, damaged, "a refused restore changed the database");

    let misspelt = env
        .run(&job(
            "restore",
            "restore",
            run,
            json!({"backup_id": id, "confirm_backupid": id}),
        ))
        .await
        .unwrap_err();
    assert_eq!(misspelt.code, "invalid_params", "{misspelt}");

    let report = env
        .run(&job(
            "restore",
            "restore",
            run,
            json!({"backup_id": id, "confirm_backup_id": id}),
        ))
        .await
        .expect("confirmed restore succeeds");
    assert_eq!(report["restored"], json!(true));
    assert_eq!(report["matches_backup"], json!(true));
    assert_eq!(report["source"], json!("primary"));
    assert_eq!(
        env.stats().await,
        before,
        "restored database differs from the backed-up state"
    );
    let mut conn = env.connect().await;
    let balance: Option<String> = sqlx::query_scalar("SELECT balance::text FROM customers WHERE id = 2")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(balance.as_deref(), Some("3.00"));
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'added')
              + (SELECT count(*) FROM pg_class WHERE relname = 'migrated_extra')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(leftovers, 0, "objects created after the backup survived the restore");
}

#[tokio::test]
async fn restore_falls_back_to_the_copy_when_the_primary_is_corrupted() {
    let env = Env::new().await;
    let before = env.stats().await;
    let out = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    let id = backup_id_of(&out);
    env.sql("DELETE FROM orders").await;
    flip_byte(&env.primary_dir(&id).join(store::DUMP_FILE));
    let report = env
        .role
        .restore(ZONE, common::SERVICE, &id, Some(&id))
        .await
        .expect("restore from the copy");
    assert_eq!(report.source, "copy");
    assert_eq!(env.stats().await, before);
}

#[tokio::test]
async fn prune_deletes_exactly_what_retention_says_in_both_locations() {
    let env = Env::new().await;
    let out = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    let real_id = backup_id_of(&out);
    let template = read_manifest(&env.primary_dir(&real_id));
    // Just after the real backup, which is then the newest of its service.
    let now = template.created_at + Duration::minutes(1);
    // A history for two services: clones of the real backup with other ids and times.
    let mut history = Vec::new();
    let ages_hours: Vec<i64> = vec![
        1,
        3,
        20,
        26,
        50,
        51,
        24 * 10,
        24 * 29 + 1,
        24 * 31,
        24 * 40,
        24 * 45,
        24 * 70,
        24 * 200,
        24 * 380,
        24 * 800,
        24 * 2000,
        24 * 3000,
    ];
    for (service, offset) in [("shop-api", 0i64), ("billing", 5)] {
        for (i, h) in ages_hours.iter().enumerate() {
            let id = format!("{service}.hist-{i:02}.{}", Uuid::new_v4());
            let at = now - Duration::hours(*h + offset);
            let mut m = template.clone();
            m.backup_id = id.clone();
            m.service = service.to_owned();
            m.created_at = at;
            for root in [&env.settings.primary.path, &env.settings.copy.path] {
                let dir = root.join(ZONE).join(&id);
                std::fs::create_dir_all(&dir).unwrap();
                // Verified, as every backup retention keeps must be.
                for f in [store::DUMP_FILE, store::TABLES_FILE, store::VERIFIED_FILE] {
                    std::fs::copy(env.primary_dir(&real_id).join(f), dir.join(f)).unwrap();
                }
                store::write_json_atomic(&dir, store::MANIFEST_FILE, &m).unwrap();
            }
            history.push((service, id, at));
        }
    }
    // The real backup itself, the newest of shop-api.
    history.push((common::SERVICE, real_id.clone(), template.created_at));
    // Not a backup: never touched.
    std::fs::create_dir_all(env.settings.primary.path.join(ZONE).join("operator-notes")).unwrap();

    let policy = Policy::default();
    let mut expected_kept = std::collections::BTreeSet::new();
    for service in ["shop-api", "billing"] {
        let of: Vec<(String, _)> = history
            .iter()
            .filter(|(s, _, _)| *s == service)
            .map(|(_, id, at)| (id.clone(), *at))
            .collect();
        expected_kept.extend(baton_backup::retention::keep(&of, now, policy));
    }
    let expected_deleted: Vec<String> = {
        let mut d: Vec<String> = history
            .iter()
            .map(|(_, id, _)| id.clone())
            .filter(|id| !expected_kept.contains(id))
            .collect();
        d.sort();
        d
    };
    assert!(!expected_deleted.is_empty() && expected_deleted.len() < history.len());

    // Without the protection of recent backups (tested on its own below).
    let role = baton_backup::BackupRole::from_settings(&baton_backup::BackupSettings {
        keep_recent_hours: 0,
        ..env.settings.clone()
    })
    .unwrap();
    let report = role.prune(ZONE, policy, now).await.unwrap();
    assert_eq!(report.deleted, expected_deleted);
    assert!(report.protected.is_empty(), "{:?}", report.protected);
    for root in [&env.settings.primary.path, &env.settings.copy.path] {
        let mut left = env.backups_in(root);
        left.retain(|n| n != "operator-notes");
        assert_eq!(
            left,
            expected_kept.iter().cloned().collect::<Vec<_>>(),
            "in {}",
            root.display()
        );
    }
    assert!(env.settings.primary.path.join(ZONE).join("operator-notes").exists());

    // Leftovers of an interrupted attempt in staging go once they are old.
    let stale = env.settings.primary.path.join(".incoming").join("shop-api.x.partial");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::File::open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 24 * 3600))
        .unwrap();
    let fresh = env.settings.copy.path.join(".incoming").join("shop-api.y.partial");
    std::fs::create_dir_all(&fresh).unwrap();

    // Pruning again deletes no backup.
    let again = role.prune(ZONE, policy, now).await.unwrap();
    assert!(again.deleted.is_empty(), "{:?}", again.deleted);
    assert_eq!(again.stale_removed, 1);
    assert!(
        !stale.exists() && fresh.exists(),
        "only stale staging entries are removed"
    );

    // The prune action: with today's clock, the real backup (newest) stays.
    let out = env
        .run(&job("prune", "backup.prune", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    assert!(out["kept"].as_array().unwrap().contains(&json!(real_id)));
    assert_eq!(out["policy"], json!({"daily": 30, "monthly": 12, "yearly": 7}));
}

#[tokio::test]
async fn unknown_actions_params_and_services_are_refused() {
    let env = Env::empty().await;
    let err = env
        .run(&job("snapshot", "x", Uuid::new_v4(), json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.code, "invalid_params");
    assert!(err.message.contains("unknown action"), "{}", err.message);
    let err = env
        .run(&job(
            "pre-deploy",
            "backup.pre",
            Uuid::new_v4(),
            json!({"retention": {"daily": "many"}}),
        ))
        .await
        .unwrap_err();
    assert!(err.message.contains("retention"), "{}", err.message);
    let mut other = job("pre-deploy", "backup.pre", Uuid::new_v4(), json!({}));
    other.deploy.service = "unknown-svc".into();
    let err = env.run(&other).await.unwrap_err();
    assert_eq!(err.code, "no_database");
    assert!(err.message.contains("backup.databases.unknown-svc"), "{}", err.message);
    let err = env
        .run(&job("verify", "v", Uuid::new_v4(), json!({"backup_id": "../../etc"})))
        .await
        .unwrap_err();
    assert_eq!(err.code, "invalid_params", "{err}");
    let mut comp = job("pre-deploy", "backup.pre", Uuid::new_v4(), json!({}));
    comp.kind = baton_shared::protocol::JobKind::Compensate;
    let ctx = baton_shared::runtime::ExecContext {
        cancel: tokio_util::sync::CancellationToken::new(),
        daemon: "test".into(),
    };
    let err = baton_shared::runtime::Role::compensate(&env.role, &comp, &ctx)
        .await
        .unwrap_err();
    assert_eq!(err.code, "no_compensation");
}

#[tokio::test]
async fn an_empty_database_backs_up_and_verifies() {
    let env = Env::empty().await;
    let out = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await
        .unwrap();
    assert_eq!(out["tables"], json!(0));
    env.role.verify(ZONE, &backup_id_of(&out)).await.unwrap();
}

#[tokio::test]
async fn a_backup_failing_its_check_is_set_aside_and_the_next_attempt_takes_a_fresh_one() {
    let env = Env::new().await;
    let run = Uuid::new_v4();
    let first = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .unwrap();
    let id = backup_id_of(&first);
    flip_byte(&env.primary_dir(&id).join(store::DUMP_FILE));

    let err = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .unwrap_err();
    assert_eq!(err.code, "backup_corrupted", "{err}");
    assert!(!env.primary_dir(&id).exists() && !env.copy_dir(&id).exists());
    for root in [&env.settings.primary.path, &env.settings.copy.path] {
        let rejected: Vec<_> = std::fs::read_dir(root.join(ZONE).join(store::REJECTED_DIR))
            .unwrap()
            .collect();
        assert_eq!(rejected.len(), 1, "set aside for inspection in {}", root.display());
    }

    let second = env
        .run(&job("pre-deploy", "backup.pre", run, seed_params()))
        .await
        .unwrap();
    assert_eq!(backup_id_of(&second), id);
    assert_ne!(second["sha256"], first["sha256"], "a fresh backup was taken");
    assert_eq!(second["verified"], json!(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_is_consistent_while_the_database_is_written() {
    use sqlx::Connection;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let env = Env::new().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn({
        let (url, stop) = (env.db_url.clone(), stop.clone());
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            let mut started = Some(started_tx);
            let mut n = 0u32;
            // Bounded: stops when the backup is done or after 20000 rows.
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                sqlx::query("INSERT INTO orders (customer_id, amount, note) VALUES (1, 1.5, 'during backup')")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                n += 1;
                if let Some(tx) = started.take() {
                    let _ = tx.send(());
                }
            }
            n
        }
    });
    started_rx.await.unwrap();
    let out = env
        .run(&job("pre-deploy", "backup.pre", Uuid::new_v4(), seed_params()))
        .await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    // The spot check restored the dump and found exactly the statistics recorded
    // from the same snapshot, although rows kept arriving.
    let out = out.expect("backup under concurrent writes verifies");
    assert_eq!(out["verified"], json!(true));
    let mut conn = env.connect().await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(total, 1000 + i64::from(written));
    // The snapshot saw the rows committed before it and none of those after.
    let keys = baton_backup::crypto::Keys::new(vec![env.identity.to_public()], vec![env.identity.clone()]).unwrap();
    let mut plain = Vec::new();
    let tables = env.primary_dir(&backup_id_of(&out)).join(store::TABLES_FILE);
    keys.decryptor(std::fs::File::open(tables).unwrap())
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    let stats: Vec<baton_backup::pg::TableStats> = serde_json::from_slice(&plain).unwrap();
    let recorded = stats.iter().find(|t| t.table == "orders").unwrap().rows;
    assert!((1001..=total).contains(&recorded), "recorded {recorded}, total {total}");
    eprintln!(
        "rows written during the backup: {written}; in the snapshot: {}",
        recorded - 1000
    );
}
