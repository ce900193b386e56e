//! The `baton` binary's offline commands: plans, pipeline validation, and the
//! exit code 2 with a message naming the problem for every kind of bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::{Value, json};

fn baton(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .env_remove("BATON_SCHEDULER__PIPELINE")
        .output()
        .expect("run baton")
}

fn write(name: &str, text: &str) -> PathBuf {
    // Under target/, not /tmp: nothing is left behind outside the build.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("baton-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn event(paths: &[&str]) -> Value {
    json!({
        "v": 1, "service": "shop-api", "environment": "production",
        "repository": "git@example.org:shop/api.git",
        "commit_sha": "0123456789abcdef0123456789abcdef01234567",
        "pull_request": {"number": 42, "title": "Add orders", "author": "dev",
            "approvals": [{"by": "marta", "at": "2026-11-26T09:00:00Z"}]},
        "changed_paths": paths, "risk": "standard", "requested_by": "ci",
        "ci_run_url": "https://ci.example.org/runs/1"
    })
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn plan_explains_which_steps_run_and_why() {
    let ev = write("app.json", &event(&["src/app.ts"]).to_string());
    let out = baton(&["plan", "--event", ev.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let included: Vec<&str> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["included"] == true)
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        included,
        [
            "build",
            "backup.pre",
            "verify.staging",
            "apply.production",
            "backup.post"
        ]
    );
    assert_eq!(plan["hash"].as_str().unwrap().len(), 64);

    let text = baton(&["plan", "--event", ev.to_str().unwrap()]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("drizzle/migrations/**"), "skipped steps say why:\n{text}");
    assert!(
        text.lines().all(|l| l.chars().count() <= 80),
        "fits 80 columns:\n{text}"
    );
}

#[test]
fn invalid_merge_event_exits_2_naming_the_field() {
    let mut bad = event(&["src/app.ts"]);
    bad["commit_sha"] = "abc".into();
    let ev = write("bad-sha.json", &bad.to_string());
    for cmd in ["plan", "enqueue"] {
        let out = baton(&[cmd, "--event", ev.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        assert!(stderr(&out).contains("commit_sha"), "{cmd}: {}", stderr(&out));
    }
    let mut unknown = event(&["src/app.ts"]);
    unknown["colour"] = "blue".into();
    let ev = write("unknown.json", &unknown.to_string());
    let out = baton(&["plan", "--event", ev.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown field `colour`"), "{}", stderr(&out));
    let out = baton(&["plan", "--event", "/nonexistent/event.json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/event.json"), "{}", stderr(&out));
}

#[test]
fn invalid_pipelines_exit_2_naming_the_step_and_problem() {
    let ev = write("ok.json", &event(&["src/app.ts"]).to_string());
    let head = "[pipeline]\nname = \"t\"\npromotion = [\"staging\", \"production\"]\n";
    let cases = [
        (
            "unknown-role.toml",
            "[[step]]\nid = \"cdn\"\nrole = \"cnd\"\nzone = \"production\"\naction = \"deploy\"\n",
            vec!["cdn", "unknown role", "cnd"],
        ),
        (
            "cycle.toml",
            "[[step]]\nid = \"a\"\nrole = \"cdn\"\nzone = \"production\"\naction = \"deploy\"\nneeds = [\"b\"]\n\
             [[step]]\nid = \"b\"\nrole = \"cdn\"\nzone = \"production\"\naction = \"deploy\"\nneeds = [\"a\"]\n",
            vec!["cycle"],
        ),
        (
            "unknown-need.toml",
            "[[step]]\nid = \"a\"\nrole = \"cdn\"\nzone = \"production\"\naction = \"deploy\"\nneeds = [\"buid\"]\n",
            vec!["\"a\"", "buid"],
        ),
        (
            "duplicate.toml",
            "[[step]]\nid = \"a\"\nrole = \"cdn\"\nzone = \"production\"\naction = \"deploy\"\n\
             [[step]]\nid = \"a\"\nrole = \"cdn\"\nzone = \"production\"\naction = \"deploy\"\n",
            vec!["\"a\"", "duplicate"],
        ),
        (
            "bad-glob.toml",
            "[[step]]\nid = \"a\"\nrole = \"cdn\"\nzone = \"production\"\naction = \"deploy\"\nwhen = { paths = [\"assets/[\"] }\n",
            vec!["\"a\"", "assets/["],
        ),
        (
            "unknown-action.toml",
            "[[step]]\nid = \"a\"\nrole = \"cdn\"\nzone = \"production\"\naction = \"upload\"\n",
            vec!["\"a\"", "role cdn has no action \"upload\"", "deploy"],
        ),
    ];
    for (name, body, words) in cases {
        let p = write(name, &format!("{head}{body}"));
        for args in [
            vec!["pipeline", "validate", p.to_str().unwrap()],
            vec![
                "plan",
                "--event",
                ev.to_str().unwrap(),
                "--pipeline",
                p.to_str().unwrap(),
            ],
        ] {
            let out = baton(&args);
            assert_eq!(out.status.code(), Some(2), "{name} {args:?}: {}", stderr(&out));
            let err = stderr(&out);
            for w in &words {
                assert!(err.contains(w), "{name}: {err:?} should mention {w}");
            }
        }
    }
}

#[test]
fn the_shipped_seed_pipeline_validates() {
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/seed.toml");
    let out = baton(&["pipeline", "validate", seed, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"].as_array().unwrap().len(), 13);
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(baton(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(baton(&[]).status.code(), Some(2));
}

#[test]
fn token_and_keygen_json_output_parses() {
    let out = baton(&["--json", "token", "new", "--name", "alice", "--role", "approver"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["token"].as_str().unwrap().starts_with("baton_"));
    assert_eq!(v["entry"]["role"], "approver");
    assert_eq!(v["entry"]["sha256"].as_str().unwrap().len(), 64);
    let out = baton(&["token", "new", "--name", "x", "--role", "admin"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("viewer, operator or approver"),
        "{}",
        stderr(&out)
    );

    let key = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("baton-cli-key-{}", std::process::id()));
    let _ = std::fs::remove_file(&key);
    let out = baton(&["--json", "keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["public"].as_str().unwrap().contains(v["key_id"].as_str().unwrap()));
    // Never overwrites a key.
    let again = baton(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    std::fs::remove_file(&key).unwrap();
}

#[test]
fn operator_commands_without_an_api_token_say_how_to_set_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["locks"])
        .env_remove("BATON_CLIENT__TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("BATON_CLIENT__TOKEN"), "{}", stderr(&out));
    let out = baton(&["runs", "list", "--status", "sideways"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--status"), "{}", stderr(&out));
}
