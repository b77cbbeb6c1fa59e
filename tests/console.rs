//! The console in a real browser: Debian's Chromium, headless, driven over WebDriver
//! (chromedriver), against herald on the test control plane with token authentication, and
//! real receivers on 127.0.0.1. Screenshots of each page go to target/console-screenshots/
//! (the committed ones, docs/console/, come from there). Run by tests/run.sh.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

mod common;

use common::browser::{Browser, KEY_ENTER, KEY_TAB};
use common::callback::CallbackServer;
use common::*;
use kube::api::{Patch, PatchParams, PostParams};
use std::time::Duration;

fn host_event(seq: i64) -> serde_json::Value {
    serde_json::json!({
        "event_type": "instdata", "action": "create", "obj_type": "host",
        "data": [{"cur_data": {"bk_host_id": seq}, "pre_data": null}], "bk_supplier_account": "0",
    })
}

/// Console messages a step provoked on purpose are HTTP refusals the page shows; anything
/// else (a script error, a missing asset) fails the test.
fn only_refusals(errors: Vec<String>, statuses: &[u16]) {
    for error in errors {
        let expected = statuses.iter().any(|s| error.contains(&format!("the server responded with a status of {s}")));
        assert!(expected, "a console error: {error}");
    }
}

/// `kubectl get esub` of the subscription with bk-cmdb id `id`, printed as `output`.
fn esub_with_id(cluster: &Cluster, ns: &str, id: i64, output: &str) -> (bool, String, String) {
    let selector = format!("herald.dev/subscription-id={id}");
    cluster.kubectl(&["get", "esub", "-n", ns, "-l", &selector, "-o", output])
}

/// `herald` answered `path` with the session cookie `cookie` (and `csrf`, when given).
async fn with_cookie(
    herald: &Herald,
    method: reqwest::Method,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new()
        .request(method, herald.url(path))
        .header("Cookie", format!("herald_console={cookie}"))
        .json(&body);
    if let Some(csrf) = csrf {
        request = request.header("X-CSRF-Token", csrf);
    }
    let response = request.send().await.expect("request");
    (response.status().as_u16(), response.json().await.unwrap_or_default())
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn the_console_signs_in_manages_subscriptions_and_shows_deliveries_in_chromium() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("console", &[]).await;
    let receiver = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "api: {auth: {anonymous: false}}").await;
    let token = cluster.service_account_token(&ns, "alice", "herald");
    let verbs = ["list", "create", "update", "delete", "publish", "replay"];
    cluster.grant_accounts(&ns, "alice", &verbs, &["0"]);
    let api = cluster.subscriptions(&ns);

    // Account 1's subscription, which alice must never see; and a kubectl-made one of
    // account 0 whose callback fails.
    let mut other = basic_spec("account-one-only");
    other["supplierAccount"] = "1".into();
    api.create(&PostParams::default(), &subscription("other", other)).await.expect("create");
    let mut failing = basic_spec("failing");
    failing["callbackUrl"] = receiver.url("status-500", "failing").into();
    failing["retry"] =
        serde_json::json!({"maxAttempts": 2, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1, "jitterPercent": 0});
    api.create(&PostParams::default(), &subscription("failing", failing)).await.expect("create");
    let failing_id = id(&wait_ready(&api, "failing").await).expect("an id");
    let other_id = id(&wait_ready(&api, "other").await).expect("an id");

    let browser = Browser::start((1280, 800)).await;
    let console = herald.url("/console/");

    // Sign in, by keyboard: the token field has the focus; Tab reaches the button.
    browser.goto(&console).await;
    browser.wait_text("h2", "登录").await;
    browser.screenshot("sign-in").await;
    browser.find("#token").await.send_keys(&format!("{token}{KEY_TAB}")).await;
    browser.focused().await.send_keys(&KEY_ENTER.to_string()).await;
    let list = browser.wait_text("#subscriptions", "failing").await;
    assert!(!list.contains("account-one-only"), "account 1 is not alice's: {list}");
    browser.wait_text("#user", "alice").await;
    browser.screenshot("list").await;
    only_refusals(browser.console_errors().await, &[]);

    // Create: a wrong field first, shown next to it; then test push and connectivity test
    // against a real receiver; then save.
    browser.click("#new").await;
    browser.fill("#f-subscription_name", "console-made").await;
    browser.fill("#f-callback_url", "ftp://127.0.0.1/nowhere").await;
    browser.fill("#f-subscription_form", "hostcreate").await;
    browser.click("#save").await;
    let error = browser.wait_text("#f-callback_url-error", "callback_url").await;
    let invalid = browser.find("#f-callback_url").await.attribute("aria-invalid").await;
    assert_eq!(invalid.as_deref(), Some("true"), "the field is marked: {error}");
    browser.screenshot("form-error").await;
    only_refusals(browser.console_errors().await, &[400]);
    browser.fill("#f-callback_url", &receiver.url("ok", "console-made")).await;
    browser.click("#test-push").await;
    let probe = browser.wait_text("#probe-result", "200").await;
    assert!(probe.contains("ok"), "the receiver's answer body: {probe}");
    assert_eq!(browser.text_of("#f-callback_url-error").await, "", "the fixed field's error is gone");
    assert_eq!(receiver.received("console-made").len(), 1, "the test push reached the receiver");
    browser.screenshot("form-test-push").await;
    browser.click("#telnet").await;
    browser.wait_text("#probe-result", "连接成功").await;
    browser.click("#save").await;
    browser.wait_text("h2", "console-made").await;
    let made_id: i64 = browser.find("#fact-id").await.text().await.parse().expect("a number");
    // The id label follows the status write that gave the id.
    common::helm::eventually(Duration::from_secs(30), "kubectl get esub shows it with its id", || {
        match esub_with_id(&cluster, &ns, made_id, "jsonpath={.items[*].spec.subscriptionName}") {
            (true, listed, _) if listed == "console-made" => Ok(()),
            (_, listed, err) => Err(format!("{listed}{err}")),
        }
    })
    .await;

    // Edit.
    browser.click("#edit").await;
    browser.fill("#f-system_name", "crm").await;
    browser.click("#save").await;
    browser.wait_text("#fact-system", "crm").await;
    only_refusals(browser.console_errors().await, &[]);

    // Deliveries failing: the log, the failure count, the chart and a dead letter.
    let published = reqwest::Client::new()
        .post(herald.url("/api/v3/event/publish"))
        .bearer_auth(&token)
        .json(&host_event(1))
        .send()
        .await
        .expect("publish");
    assert!(published.status().is_success(), "publish: {}", published.status());
    wait_for(&api, "failing", Duration::from_secs(30), "two failed attempts", |s| {
        s.status.as_ref().and_then(|st| st.statistics.as_ref()).is_some_and(|st| st.dead_lettered == 1)
    })
    .await;
    browser.goto(&format!("{console}#/subscription/{failing_id}")).await;
    let log = browser.wait_text("#delivery-log", "500").await;
    assert!(log.contains("进入死信") && log.contains("失败"), "both attempts logged: {log}");
    assert_eq!(browser.find("#fact-failure").await.text().await, "2");
    let bars = browser.find_all("svg.chart rect.failures").await;
    assert!(!bars.is_empty(), "the chart shows the failures");
    browser.wait_text("#dead-letters", "MaxAttempts").await;
    browser.screenshot("detail").await;
    browser.scroll_to("#chart-section").await;
    browser.screenshot("detail-failures").await;

    // Fix the receiver, replay the dead letter from the page: it is delivered, and the page
    // shows it without a reload (the fixed receiver answers 1.5 s late, so the outcome lands
    // well after the replay's answer re-drew the page).
    let patch = serde_json::json!({"spec": {"callbackUrl": receiver.url("slow-1500", "failing-fixed")}});
    let patched = api.patch("failing", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch");
    let generation = patched.metadata.generation;
    wait_for(&api, "failing", Duration::from_secs(30), "the fix observed", |s| {
        s.status.as_ref().is_some_and(|st| st.observed_generation == generation)
    })
    .await;
    browser.click("#replay-all").await;
    let delivered = receiver.wait_for("failing-fixed", 1, Duration::from_secs(30)).await;
    assert_eq!(delivered[0].distribution_id(), 1, "the dead letter, with its distribution id");
    browser.wait_text("#delivery-log", "成功").await;
    browser.wait_text("main", "没有死信").await;
    browser.scroll_to("#log-section").await;
    browser.screenshot("detail-replayed").await;
    only_refusals(browser.console_errors().await, &[]);

    // English, then back to Chinese.
    browser.click("#lang option[value=en]").await;
    browser.wait_text("#brand", "Event push").await;
    browser.wait_text("main", "Delivery log").await;
    browser.scroll_to("#chart-section").await;
    browser.screenshot("detail-en").await;
    browser.click("#lang option[value=zh]").await;
    browser.wait_text("#brand", "事件推送").await;

    // Another account is refused in the page, and outside it with the same cookie.
    browser.goto(&console).await;
    browser.fill("#account", "1").await;
    browser.click("#show").await;
    browser.wait_text(".alert", "没有操作权限").await;
    only_refusals(browser.console_errors().await, &[403]);
    let cookie = browser.cookie("herald_console").await;
    assert_eq!((&cookie["httpOnly"], &cookie["sameSite"]), (&true.into(), &"Strict".into()), "{cookie}");
    let session = cookie["value"].as_str().expect("the session id").to_string();
    let (_, me) =
        with_cookie(&herald, reqwest::Method::GET, "/console/session", &session, None, serde_json::json!(null)).await;
    let csrf = me["data"]["csrf"].as_str().expect("the CSRF token").to_string();
    let (status, _) =
        with_cookie(&herald, reqwest::Method::GET, "/console/subscriptions/1", &session, None, serde_json::json!(null))
            .await;
    assert_eq!(status, 403, "forged: another account's list");
    let (status, _) = with_cookie(
        &herald,
        reqwest::Method::GET,
        &format!("/console/subscriptions/1/{other_id}"),
        &session,
        None,
        serde_json::json!(null),
    )
    .await;
    assert_eq!(status, 403, "forged: another account's subscription");
    let (status, _) = with_cookie(
        &herald,
        reqwest::Method::GET,
        &format!("/console/subscriptions/0/{other_id}"),
        &session,
        None,
        serde_json::json!(null),
    )
    .await;
    assert_eq!(status, 400, "account 1's id is not found under account 0 (1199006)");
    let form = serde_json::json!({"subscription_name": "forged", "callback_url": receiver.url("ok", "forged"), "subscription_form": "hostcreate"});
    let (status, _) =
        with_cookie(&herald, reqwest::Method::POST, "/api/v3/event/subscribe/1/0", &session, Some(&csrf), form.clone())
            .await;
    assert_eq!(status, 403, "forged: a create in another account");
    let (status, refused) =
        with_cookie(&herald, reqwest::Method::POST, "/api/v3/event/subscribe/0/0", &session, None, form.clone()).await;
    assert_eq!((status, refused["bk_error_code"].as_i64()), (403, Some(9_900_403)), "no CSRF token: {refused}");
    assert!(refused["bk_error_msg"].as_str().is_some_and(|m| m.contains("CSRF")), "{refused}");
    let names: Vec<String> = api
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|s| s.spec.subscription_name.clone())
        .collect();
    assert!(!names.contains(&"forged".to_string()), "nothing was created: {names:?}");

    // A narrow window.
    browser.set_window_size(420, 800).await;
    browser.fill("#account", "0").await;
    browser.click("#show").await;
    browser.wait_text("#subscriptions", "console-made").await;
    browser.screenshot("list-narrow").await;
    browser.set_window_size(1280, 800).await;

    // Delete from the detail page.
    browser.goto(&format!("{console}#/subscription/{made_id}")).await;
    browser.wait_text("h2", "console-made").await;
    browser.click("#delete").await;
    browser.accept_alert().await;
    let list = browser.wait_text("#subscriptions", "failing").await;
    assert!(!list.contains("console-made"), "{list}");
    let (_, left, _) = esub_with_id(&cluster, &ns, made_id, "name");
    assert!(left.trim().is_empty(), "deleted: {left}");
    only_refusals(browser.console_errors().await, &[]);

    // Sign out: the session is gone for the browser and for the cookie.
    browser.click("#sign-out").await;
    browser.find("#token").await;
    let (_, me) =
        with_cookie(&herald, reqwest::Method::GET, "/console/session", &session, None, serde_json::json!(null)).await;
    assert!(me["data"]["user"].is_null(), "{me}");
    let (status, _) =
        with_cookie(&herald, reqwest::Method::GET, "/console/subscriptions/0", &session, None, serde_json::json!(null))
            .await;
    assert_eq!(status, 401, "the old cookie no longer signs anything");
    only_refusals(browser.console_errors().await, &[]);
}

/// The session cookie a sign-in answer set.
fn session_of(response: &reqwest::Response) -> Option<String> {
    let cookie = response.headers().get("set-cookie")?.to_str().ok()?;
    let value = cookie.split(';').next()?.strip_prefix("herald_console=")?;
    Some(value.to_string())
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn esb_app_credentials_sign_in_for_the_apps_accounts_only() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("console-esb", &[]).await;
    let dir = std::env::temp_dir().join(format!("{}-herald", ns.name));
    std::fs::create_dir_all(&dir).expect("directory");
    let apps = dir.join("apps.yaml");
    std::fs::write(&apps, "apps:\n- appCode: cmdb\n  appSecret: s3cret\n  accounts: ['0']\n").expect("apps file");
    let config = format!("api: {{auth: {{anonymous: false}}, esbCredentialsFile: {}}}\n", apps.display());
    let herald = Herald::start_in(&cluster, &ns, &config, &dir).await;
    let api = cluster.subscriptions(&ns);
    api.create(&PostParams::default(), &subscription("mine", basic_spec("mine"))).await.expect("create");
    wait_ready(&api, "mine").await;

    let http = reqwest::Client::new();
    let sign_in = |body: serde_json::Value| http.post(herald.url("/console/session")).json(&body).send();
    let anonymous = sign_in(serde_json::json!({})).await.expect("sign in");
    assert_eq!(anonymous.status(), 401, "an empty sign-in needs the development switch");
    let wrong = sign_in(serde_json::json!({"app_code": "cmdb", "app_secret": "guess"})).await.expect("sign in");
    assert_eq!(wrong.status(), 401, "a wrong secret opens no session");
    assert!(session_of(&wrong).is_none());
    let signed = sign_in(serde_json::json!({"app_code": "cmdb", "app_secret": "s3cret"})).await.expect("sign in");
    assert_eq!(signed.status(), 200);
    let session = session_of(&signed).expect("a session cookie");
    let set_cookie = signed.headers()["set-cookie"].to_str().expect("ASCII").to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(set_cookie.contains(attribute), "{attribute} in {set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    let me: serde_json::Value = signed.json().await.expect("JSON");
    assert_eq!(me["data"]["user"], "cmdb");
    // Behind a TLS-terminating proxy the cookie is Secure.
    let proxied = http
        .post(herald.url("/console/session"))
        .header("X-Forwarded-Proto", "https")
        .json(&serde_json::json!({"app_code": "cmdb", "app_secret": "s3cret"}))
        .send()
        .await
        .expect("sign in behind a proxy");
    let proxied_cookie = proxied.headers()["set-cookie"].to_str().expect("ASCII").to_string();
    assert!(proxied_cookie.ends_with("; Secure"), "{proxied_cookie}");
    let csrf = me["data"]["csrf"].as_str().expect("csrf").to_string();

    let null = serde_json::Value::Null;
    let (status, mine) =
        with_cookie(&herald, reqwest::Method::GET, "/console/subscriptions/0", &session, None, null.clone()).await;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(mine["data"]["info"][0]["subscription_name"], "mine");
    let (status, _) =
        with_cookie(&herald, reqwest::Method::GET, "/console/subscriptions/1", &session, None, null).await;
    assert_eq!(status, 403, "the app's accounts are 0 only");
    // The REST API through the session: a search of account 0 (POST, so with the CSRF token).
    let search = serde_json::json!({"condition": {}});
    let (status, found) = with_cookie(
        &herald,
        reqwest::Method::POST,
        "/api/v3/event/subscribe/search/0/0",
        &session,
        Some(&csrf),
        search,
    )
    .await;
    assert_eq!((status, &found["data"]["count"]), (200, &1.into()), "{found}");

    // What the ESB gateway never offered apps stays refused: publishing.
    let publish = http
        .post(herald.url("/api/v3/event/publish"))
        .header("X-Bkapi-Authorization", r#"{"bk_app_code": "cmdb", "bk_app_secret": "s3cret"}"#)
        .json(&host_event(1))
        .send()
        .await
        .expect("publish");
    assert_eq!(publish.status(), 403, "an app may not publish");

    // Only a JSON sign-in (a cross-site form cannot send one), and a new sign-in ends the
    // session the browser had.
    let form_post = http
        .post(herald.url("/console/session"))
        .header("Content-Type", "text/plain")
        .body(r#"{"app_code": "cmdb", "app_secret": "s3cret"}"#)
        .send()
        .await
        .expect("sign in");
    assert!(form_post.status().is_client_error() && session_of(&form_post).is_none(), "{}", form_post.status());
    let again = http
        .post(herald.url("/console/session"))
        .header("Cookie", format!("herald_console={session}"))
        .json(&serde_json::json!({"app_code": "cmdb", "app_secret": "s3cret"}))
        .send()
        .await
        .expect("sign in again");
    assert!(session_of(&again).is_some_and(|new| new != session));
    let (_, me) =
        with_cookie(&herald, reqwest::Method::GET, "/console/session", &session, None, serde_json::Value::Null).await;
    assert!(me["data"]["user"].is_null(), "the previous session ended: {me}");

    // The same in the browser's sign-in form.
    let browser = Browser::start((1280, 800)).await;
    browser.goto(&herald.url("/console/")).await;
    browser.fill("#app-code", "cmdb").await;
    browser.fill("#app-secret", "s3cret").await;
    browser.click("#sign-in").await;
    browser.wait_text("#subscriptions", "mine").await;
    browser.wait_text("#user", "cmdb").await;
    only_refusals(browser.console_errors().await, &[]);
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn with_the_development_switch_an_empty_sign_in_is_anonymous() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("console-anonymous", &[]).await;
    // The test defaults turn the switch on, as scripts/quickstart.sh does.
    let herald = Herald::start(&cluster, &ns, "").await;
    let signed = reqwest::Client::new()
        .post(herald.url("/console/session"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("sign in");
    let session = session_of(&signed).expect("a session cookie");
    let me: serde_json::Value = signed.json().await.expect("JSON");
    assert_eq!((&me["data"]["user"], &me["data"]["anonymous"]), (&"anonymous".into(), &true.into()), "{me}");
    let (status, list) =
        with_cookie(&herald, reqwest::Method::GET, "/console/subscriptions/0", &session, None, serde_json::Value::Null)
            .await;
    assert_eq!(status, 200, "{list}");
}
