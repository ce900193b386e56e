//! The API against its OpenAPI document, by the contract fuzzer schemathesis
//! (PyPI; `.ci/run` installs it): a live scheduler, as an operator, a viewer
//! and with no token, every check schemathesis has (no 5xx, status codes,
//! content types and bodies as documented, schema-valid requests accepted and
//! invalid ones refused, authentication enforced). The seed is fixed so a
//! failure reproduces; each pass is bounded in examples and time.

use std::process::Command;

use baton_scheduler::api::{Role, new_token};
use baton_tests::TestEnv;

/// schemathesis, run as `python3 -m schemathesis.cli` (no script on PATH
/// needed), or a clear failure saying how to install it.
fn schemathesis() -> Command {
    let found = Command::new("python3")
        .args(["-m", "schemathesis.cli", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "schemathesis is not installed: python3 -m pip install schemathesis==4.32.5 (.ci/run does)"
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "schemathesis.cli"]);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_keeps_its_openapi_contract_for_operators_viewers_and_strangers() {
    let env = TestEnv::new("contract").await;
    let (viewer, v) = new_token("vera", Role::Viewer);
    let (operator, o) = new_token("otto", Role::Operator);
    std::fs::write(env.dir.join("webhook-secret"), "ci-shared-secret\n").unwrap();
    let mut toml = format!(
        "[api]\nwebhook_secret = \"file:{}\"\n",
        env.dir.join("webhook-secret").display()
    );
    for e in [v, o] {
        toml.push_str(&format!(
            "[[api.tokens]]\nname = {:?}\nrole = {}\nsha256 = {:?}\n",
            e.name,
            serde_json::to_value(e.role).unwrap(),
            e.sha256
        ));
    }
    env.scheduler_config(&toml);
    let scheduler = env.scheduler("scheduler").await;
    let base = scheduler.api.clone().unwrap();

    for (who, token) in [
        ("operator", Some(&operator)),
        ("viewer", Some(&viewer)),
        ("no token", None),
    ] {
        let mut cmd = schemathesis();
        cmd.args(["run", &format!("{base}/openapi.json")])
            .args(["--seed", "1", "--max-examples", "30", "--max-time", "45"])
            .args(["--checks", "all", "--max-failures", "20", "--no-color"])
            .current_dir(&env.dir);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = cmd.output().expect("run schemathesis");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis as {who} found failures:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("generated"), "schemathesis ran no test as {who}:\n{text}");
    }
    // The scheduler stayed healthy and its audit chain intact.
    let health = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert!(health.status().is_success());
    let out = env.baton(&["audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
