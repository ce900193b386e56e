//! The scheduler's HTTP API over a real scheduler: bearer tokens with roles, the
//! HMAC-signed CI webhook, errors as JSON, size limits, health and readiness.

use std::time::Duration;

use baton_scheduler::api::{Role, new_token};
use baton_tests::{SEED_BINDINGS, TestEnv, event};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);

struct Tokens {
    viewer: String,
    operator: String,
    approver: String,
}

fn configure(env: &TestEnv) -> Tokens {
    let (viewer, v) = new_token("vera", Role::Viewer);
    let (operator, o) = new_token("otto", Role::Operator);
    let (approver, a) = new_token("marta", Role::Approver);
    std::fs::write(env.dir.join("webhook-secret"), "ci-shared-secret\n").unwrap();
    let mut toml = format!(
        "[api]\nwebhook_secret = \"file:{}\"\nmax_body_bytes = 4096\n",
        env.dir.join("webhook-secret").display()
    );
    for e in [v, o, a] {
        let role = serde_json::to_value(e.role).unwrap();
        toml.push_str(&format!(
            "[[api.tokens]]\nname = {:?}\nrole = {}\nsha256 = {:?}\n",
            e.name, role, e.sha256
        ));
    }
    env.scheduler_config(&toml);
    Tokens {
        viewer,
        operator,
        approver,
    }
}

fn sign(body: &[u8], secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_roles_and_errors() {
    let env = TestEnv::new("api").await;
    let tokens = configure(&env);
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    let scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let base = scheduler.api.clone().unwrap();
    let http = reqwest::Client::new();

    assert_eq!(
        http.get(format!("{base}/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(
        ready.json::<Value>().await.unwrap(),
        json!({"database": true, "broker": true})
    );

    let run = env.enqueue(&event("api", 60, &["src/app.ts"]));
    assert_eq!(env.wait_terminal(run, RUN_TIMEOUT).await.status, "succeeded");

    // No token, a wrong token: 401 with a JSON error.
    let r = http.get(format!("{base}/v1/runs/{run}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["code"], "unauthenticated");
    let r = http
        .get(format!("{base}/v1/runs"))
        .bearer_auth("baton_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A viewer reads.
    let r = http
        .get(format!("{base}/v1/runs/{run}"))
        .bearer_auth(&tokens.viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["status"], "succeeded");
    let list: Value = http
        .get(format!("{base}/v1/runs?service=api&status=succeeded"))
        .bearer_auth(&tokens.viewer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);

    // ... but may not roll back; neither may an approver. An operator may.
    let rollback = |token: &str| {
        http.post(format!("{base}/v1/runs/{run}/rollback"))
            .bearer_auth(token.to_owned())
            .json(&json!({"reason": "error budget burnt"}))
            .send()
    };
    assert_eq!(rollback(&tokens.viewer).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(
        rollback(&tokens.approver).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let r = rollback(&tokens.operator).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
    let view = env.wait_terminal(run, RUN_TIMEOUT).await;
    assert_eq!(view.status, "rolled_back");
    assert!(
        view.rollback_reason.unwrap().contains("by otto"),
        "the operator is named"
    );
    assert_eq!(rollback(&tokens.operator).await.unwrap().status(), StatusCode::CONFLICT);

    // Not found, bad input and oversized bodies are JSON errors too.
    let r = http
        .get(format!("{base}/v1/runs/{}", uuid::Uuid::new_v4()))
        .bearer_auth(&tokens.viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "not_found");
    let r = http
        .get(format!("{base}/v1/runs/not-a-uuid"))
        .bearer_auth(&tokens.viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "bad_request");
    let r = http
        .post(format!("{base}/v1/runs/{run}/rollback"))
        .bearer_auth(&tokens.operator)
        .body(vec![b'x'; 10_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let e = r.json::<Value>().await.unwrap();
    assert_eq!(e["code"], "too_large", "{e}");
    assert!(e["message"].as_str().unwrap().contains("length limit"), "{e}");
    // Without a token, an oversize body or a bad query is 401 first.
    for (req, what) in [
        (
            http.post(format!("{base}/v1/runs/{run}/rollback"))
                .body(vec![b'x'; 10_000]),
            "oversize body",
        ),
        (http.get(format!("{base}/v1/runs?limit=many")), "bad query"),
        (
            http.post(format!("{base}/v1/runs/{run}/rollback"))
                .header("authorization", "Bearer not-a-token")
                .body(vec![b'x'; 10_000]),
            "unknown token",
        ),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(r.json::<Value>().await.unwrap()["code"], "unauthenticated", "{what}");
    }
    // The scheme is case-insensitive.
    let r = http
        .get(format!("{base}/v1/runs/{run}"))
        .header("authorization", format!("bearer {}", tokens.viewer))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http.get(format!("{base}/no/such/route")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.json::<Value>().await.unwrap()["message"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_webhook_accepts_a_valid_hmac_and_refuses_a_wrong_one() {
    let env = TestEnv::new("webhook").await;
    configure(&env);
    env.script(baton_tests::with_seed_facts(json!({"default": {"delay_ms": 20}})));
    let scheduler = env.scheduler("scheduler").await;
    let _daemon = env.daemon("daemon", SEED_BINDINGS).await;
    let base = scheduler.api.clone().unwrap();
    let http = reqwest::Client::new();
    let body = serde_json::to_vec(&event("hook", 61, &["src/app.ts"])).unwrap();
    let post = |sig: Option<String>, body: Vec<u8>| {
        let mut req = http.post(format!("{base}/v1/webhooks/ci")).body(body);
        if let Some(s) = sig {
            req = req.header("X-Baton-Signature", s);
        }
        req.send()
    };

    assert_eq!(
        post(None, body.clone()).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let wrong = post(Some(sign(&body, "not-the-secret")), body.clone()).await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        post(Some("md5=abc".to_owned()), body.clone()).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let mut tampered = body.clone();
    let at = tampered.len() - 2;
    tampered[at] = b' ';
    assert_eq!(
        post(Some(sign(&body, "ci-shared-secret")), tampered)
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let refused: i64 = sqlx::query_scalar("select count(*) from audit where kind = 'webhook_refused'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        refused, 4,
        "refused webhooks are audited: unsigned, wrong key, malformed, tampered"
    );
    let reasons: Vec<String> =
        sqlx::query_scalar("select detail->>'reason' from audit where kind = 'webhook_refused' order by id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        reasons,
        [
            "no X-Baton-Signature header",
            "bad HMAC signature",
            "malformed X-Baton-Signature header",
            "bad HMAC signature"
        ]
    );

    let ok = post(Some(sign(&body, "ci-shared-secret")), body.clone()).await.unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    let created: Value = ok.json().await.unwrap();
    let run: uuid::Uuid = created["run_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(env.wait_terminal(run, RUN_TIMEOUT).await.status, "succeeded");
    let again = post(Some(sign(&body, "ci-shared-secret")), body.clone()).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Value>().await.unwrap()["created"], false);

    let bad = br#"{"v": 1}"#.to_vec();
    let r = post(Some(sign(&bad, "ci-shared-secret")), bad).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(
        r.json::<Value>().await.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("missing field")
    );
}

#[test]
fn plan_fails_naming_why_when_the_configuration_does_not_load() {
    let event = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/merge-event.json");
    let out = std::process::Command::new(baton_tests::bin("baton-e2e"))
        .args(["plan", "--event", event])
        .env("BATON_SCHEDULER__LEASE_MS", "soon")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot load the configuration"), "{stderr}");
    assert!(stderr.contains("LEASE_MS"), "the bad key is named: {stderr}");
    assert!(out.stdout.is_empty(), "no plan from the seed pipeline instead");
    // With the pipeline given, the configuration is not needed.
    let pipeline = concat!(env!("CARGO_MANIFEST_DIR"), "/../scheduler/pipelines/seed.toml");
    let out = std::process::Command::new(baton_tests::bin("baton-e2e"))
        .args(["plan", "--event", event, "--pipeline", pipeline])
        .env("BATON_SCHEDULER__LEASE_MS", "soon")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
