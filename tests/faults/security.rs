//! Security.

use super::*;

/// With no CIDR allowed, deliveries to loopback are refused before connecting, for an
/// IP literal and for a host name that resolves there (`localhost`), and count as failed
/// attempts. (The guard's classification of every refused range: unit tests in
/// src/delivery/guard.rs; ping and telnet refusals: tests/rest.rs
/// `loopback_targets_are_refused_before_connecting_unless_allowed`; a 301 to a refused
/// address is not followed: `hostile_callbacks_...` above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn deliveries_to_refused_addresses_are_refused_before_connecting() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-guard", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "callbackGuard:\n  allowCidrs: []\n").await;
    let api = cluster.subscriptions(&ns);
    let once = json!({"retry": {"maxAttempts": 1}});
    subscribe(&api, "name", &format!("http://localhost:{}/ok/name", server.port), once.clone()).await;
    subscribe(&api, "literal", &server.url("ok", "literal"), once).await;
    publish_ok(&herald, &host_events([1])).await;
    let mut outcome = Vec::new();
    for key in ["name", "literal"] {
        let s = wait_stats(&api, key, Duration::from_secs(60), "attempted", |s| s.total == 1).await;
        outcome.push((key, s.failure, s.last_error.clone().unwrap_or_default(), server.received(key).len()));
    }
    println!("{outcome:?}");
    for (key, failure, error, reached) in outcome {
        // HERALD BUG (F1 in docs/RELIABILITY.md) while this fails for "literal": an IP
        // literal never reaches the guarded resolver, so deliveries skip the guard.
        assert_eq!(reached, 0, "{key}: the callback was delivered to a refused address (loopback with allowCidrs [])");
        assert_eq!(failure, 1, "{key}: a refused destination is a failed attempt");
        assert!(error.contains("refused"), "{key}: lastError {error:?}");
    }
}

/// Every route but health, readiness, metrics and the OpenAPI document needs credentials
/// (401 / ESB 1199027 without, or with unusable ones) and rights on the account (403 /
/// ESB 9900403 without): iterated over docs/openapi.json. Then, after runs that used a
/// signing secret, ESB app secrets and bearer tokens (right and wrong ones), none of them
/// appears in herald's log, in any subscription's status, in the namespace's Events or in
/// any answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn every_route_needs_credentials_and_rights_and_no_secret_leaks() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-auth", &[]).await;
    let server = CallbackServer::start().await;
    let mut rng = fastrand::Rng::with_seed(seed());
    let mut secret = |prefix: &str| format!("{prefix}{}", (0..24).map(|_| rng.alphanumeric()).collect::<String>());
    let esb_secret = secret("esb-");
    let other_secret = secret("other-");
    let wrong_secret = secret("wrong-");
    let signing_raw = secret("");
    let signing_value = format!("whsec_{}", base64_encode(signing_raw.as_bytes()));
    let url_password = secret("pw");
    let garbage_token = secret("garbage.token.");
    let apps = test_dir(&ns, "apps.yaml");
    std::fs::write(
        &apps,
        format!(
            "apps:\n- appCode: cmdb\n  appSecret: {esb_secret}\n  accounts: ['0']\n- appCode: other\n  appSecret: {other_secret}\n  accounts: ['9']\n"
        ),
    )
    .unwrap();
    let config = format!("api:\n  auth:\n    anonymous: false\n  esbCredentialsFile: {}\n", apps.display());
    // At RUST_LOG=debug (the harness runs herald at info): the check reads everything
    // herald and its libraries log.
    let dir = test_dir(&ns, "herald");
    let instance = format!("herald-{}", ns.name);
    let launch =
        Launch { config_yaml: &config, rust_log: "debug", ..Launch::new(&cluster.kubeconfig, &ns, &instance, &dir) };
    let mut herald = Herald::from_launch(&launch);
    herald.wait_ready(Duration::from_secs(60)).await;
    let (made, _, err) = cluster.kubectl(&[
        "create",
        "secret",
        "generic",
        "sign",
        "-n",
        &ns,
        &format!("--from-literal=key={signing_value}"),
    ]);
    assert!(made, "{err}");
    let api = cluster.subscriptions(&ns);
    let signed = subscribe(
        &api,
        "signed",
        &server.url("ok", "signed"),
        json!({"signing": {"secretRef": {"name": "sign", "key": "key"}}}),
    )
    .await;
    subscribe(
        &api,
        "no-key",
        &server.url("ok", "no-key"),
        json!({"signing": {"secretRef": {"name": "sign", "key": "missing"}}, "retry": {"maxAttempts": 1}}),
    )
    .await;
    let with_password = format!("http://user:{url_password}@127.0.0.1:{}/status-500/password", server.port);
    subscribe(&api, "password", &with_password, json!({"retry": {"maxAttempts": 1}})).await;
    let nobody = cluster.service_account_token(&ns, "nobody", "herald");
    let writer = cluster.service_account_token(&ns, "writer", "herald");
    cluster.grant_accounts(&ns, "writer", &["get", "list", "create", "update", "delete", "publish", "replay"], &["0"]);
    let admin_token = std::fs::read_to_string(&cluster.kubeconfig)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: ").map(str::to_string))
        .unwrap();

    let http = reqwest::Client::new();
    let mut answers = Vec::new();
    let mut failures = Vec::new();
    let callback = server.url("ok", "probe");
    let esb_header = |code: &str, secret: &str| {
        json!({"bk_app_code": code, "bk_app_secret": secret, "bk_username": "alice"}).to_string()
    };
    for (method, template) in documented_routes() {
        if OPEN_ROUTES.contains(&template.as_str()) {
            let answer = send(http.get(herald.url(&template))).await.unwrap();
            if answer.status != 200 {
                failures.push(format!("{template}: {} without credentials", answer.status));
            }
            continue;
        }
        let ids: Vec<String> = if template.contains("{subscription_id}") {
            vec![signed.to_string(), "987654".into()]
        } else {
            vec![String::new()]
        };
        for id in ids {
            let path = fill_path(&template, &id);
            let body = valid_body(&template, signed, &callback).to_string();
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let request = || {
                http.request(method.clone(), herald.url(&path))
                    .header("content-type", "application/json")
                    .body(body.clone())
            };
            // (what, request, expected HTTP status, expected code)
            let mut tries = vec![
                ("no credentials", request(), 401, 1_199_027),
                ("an unusable token", request().bearer_auth(&garbage_token), 401, 1_199_027),
                ("a token without rights", request().bearer_auth(&nobody), 403, 9_900_403),
            ];
            if is_esb(&template) {
                tries = vec![
                    ("no credentials", request(), 200, 1_199_027),
                    (
                        "a wrong app secret",
                        request().header("X-Bkapi-Authorization", esb_header("cmdb", &wrong_secret)),
                        200,
                        1_199_027,
                    ),
                    (
                        "an app without the account",
                        request().header("X-Bkapi-Authorization", esb_header("other", &other_secret)),
                        200,
                        9_900_403,
                    ),
                    ("a token without rights", request().bearer_auth(&nobody), 200, 9_900_403),
                ];
            }
            for (what, request, status, expected) in tries {
                let answer = send(request).await.unwrap();
                let got = (answer.status, code(&answer.body), answer.body["result"].as_bool());
                if got != (status, expected, Some(false)) {
                    failures.push(format!(
                        "{method} {path} with {what}: expected {status}/{expected}, got {}/{} {}",
                        got.0, got.1, answer.text
                    ));
                }
                if expected == 9_900_403 && answer.body["permission"].is_null() && got.1 == expected {
                    failures.push(format!("{method} {path} with {what}: 403 without permission details"));
                }
                answers.push(answer.text);
            }
        }
    }

    // The rightful callers get through, and the signed deliveries happen.
    let answer = send(http.post(herald.url("/api/v3/event/publish")).bearer_auth(&writer).json(&host_events(1..=3)))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
    answers.push(answer.text);
    let answer = send(
        http.post(herald.url("/api/c/compapi/v2/cc/search_subscription/"))
            .header("X-Bkapi-Authorization", esb_header("cmdb", &esb_secret))
            .json(&json!({})),
    )
    .await
    .unwrap();
    assert_eq!(code(&answer.body), 0, "{}", answer.text);
    answers.push(answer.text);
    let got = server.wait_for("signed", 3, Duration::from_secs(30)).await;
    assert!(got[0].header("webhook-signature").starts_with("v1,"), "signed deliveries");
    let no_key = wait_stats(&api, "no-key", Duration::from_secs(60), "a failed attempt", |s| s.failure >= 1).await;
    assert!(
        no_key.last_error.clone().unwrap_or_default().contains("sign"),
        "names the Secret: {:?}",
        no_key.last_error
    );
    wait_stats(&api, "password", Duration::from_secs(60), "a failed attempt", |s| s.failure >= 1).await;

    let statuses = cluster.kubectl(&["get", "eventsubscriptions", "-n", &ns, "-o", "jsonpath={.items[*].status}"]).1;
    let events = cluster.kubectl(&["get", "events", "-n", &ns, "-o", "json"]).1;
    let log = herald.log_text();
    let secrets = [
        ("ESB app secret", esb_secret.as_str()),
        ("other ESB app secret", other_secret.as_str()),
        ("wrong ESB app secret", wrong_secret.as_str()),
        ("signing secret", signing_value.as_str()),
        ("signing secret (raw)", signing_raw.as_str()),
        ("callback URL password", url_password.as_str()),
        ("bearer token without rights", nobody.as_str()),
        ("bearer token with rights", writer.as_str()),
        ("unusable bearer token", garbage_token.as_str()),
        ("herald's own API token", admin_token.as_str()),
    ];
    for (what, value) in secrets {
        for (place, text) in [("herald's log", &log), ("status", &statuses), ("Events", &events)] {
            if text.contains(value) {
                failures.push(format!("the {what} appears in {place}"));
            }
        }
        // Search answers carry callback_url as configured (bk-cmdb does too), user-info included.
        if value != url_password && answers.iter().any(|a| a.contains(value)) {
            failures.push(format!("the {what} appears in an API answer"));
        }
    }
    println!("{} answers checked; debug log {} lines", answers.len(), log.lines().count());
    // HERALD BUG (F3 in docs/RELIABILITY.md) while this lists the dead-letter routes with
    // an unknown id: they answer before authenticating.
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
