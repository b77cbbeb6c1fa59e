//! The bk-cmdb REST API over real HTTP against a running herald and the real
//! kube-apiserver: direct paths, ESB paths, search, probes, auth and every error code.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

mod common;

use common::callback::CallbackServer;
use common::*;
use herald::crd::{EventSubscription, OPERATOR_ANNOTATION};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

struct Rest {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Rest {
    fn new(herald: &Herald) -> Self {
        Rest { http: reqwest::Client::new(), base: herald.url(""), token: None }
    }

    fn with_token(herald: &Herald, token: &str) -> Self {
        Rest { token: Some(token.to_string()), ..Rest::new(herald) }
    }

    /// (HTTP status, body) of a request with a raw body and extra headers.
    async fn send(&self, method: reqwest::Method, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).body(body.to_string());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, &body.to_string(), &[]).await
    }
}

fn code(body: &Value) -> i64 {
    body["bk_error_code"].as_i64().or_else(|| body["code"].as_i64()).unwrap_or(-1)
}

fn subscription_body(name: &str, url: &str) -> Value {
    json!({"subscription_name": name, "callback_url": url, "subscription_form": "hostcreate"})
}

async fn find(api: &Api<EventSubscription>, id: i64) -> EventSubscription {
    api.list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|s| common::id(s) == Some(id))
        .expect("object with that id")
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn create_update_delete_map_every_field_and_keep_id_and_statistics() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-crud", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let rest = Rest::new(&herald);
    let api = cluster.subscriptions(&ns);

    let body = json!({
        "subscription_name": " hosts ", "system_name": "asset-sync", "callback_url": server.url("ok", "crud"),
        "confirm_mode": "regular", "confirm_pattern": "ok", "timeout": 7, "subscription_form": "hostupdate, hostcreate,hostcreate",
    });
    let (status, answer) = rest
        .send(
            reqwest::Method::POST,
            "/api/v3/event/subscribe/0/3",
            &body.to_string(),
            &[("BK-User", "alice"), ("Cc_Request_Id", "req-42")],
        )
        .await;
    assert_eq!((status, &answer["result"], code(&answer)), (200, &json!(true), 0), "{answer}");
    assert_eq!(answer["bk_error_msg"], "success");
    let id = answer["data"]["subscription_id"].as_i64().expect("subscription_id");

    let object = find(&api, id).await;
    let spec = &object.spec;
    assert_eq!(spec.supplier_account.as_deref(), Some("0"));
    assert_eq!(spec.biz_id, Some(3));
    assert_eq!(spec.subscription_name, "hosts");
    assert_eq!(spec.system_name.as_deref(), Some("asset-sync"));
    assert_eq!(spec.callback_url, server.url("ok", "crud"));
    let confirm = spec.confirm.clone().unwrap();
    assert_eq!((confirm.mode, confirm.pattern.as_deref()), (Some(herald::crd::ConfirmMode::Regular), Some("ok")));
    assert_eq!(spec.events, ["hostcreate", "hostupdate"]);
    assert_eq!(spec.timeout_seconds, Some(7));
    assert_eq!(object.metadata.annotations.unwrap()[OPERATOR_ANNOTATION], "alice");

    // Statistics from one delivery, then a whole-record replace keeps id and statistics.
    let publish = json!({"event_type": "instdata", "action": "create", "obj_type": "host", "data": [{"cur_data": {"bk_host_id": 1}}]});
    rest.post("/api/v3/event/publish", publish).await;
    let name = object.metadata.name.clone().unwrap();
    wait_for(&api, &name, Duration::from_secs(30), "total 1", |s| {
        s.status.as_ref().and_then(|st| st.statistics.as_ref()).is_some_and(|st| st.total == 1)
    })
    .await;
    let replacement = json!({"subscription_name": "hosts-renamed", "callback_url": server.url("ok", "crud2"), "subscription_form": "setcreate", "time_out": 0});
    let (status, answer) = rest
        .send(reqwest::Method::PUT, &format!("/api/v3/event/subscribe/0/3/{id}"), &replacement.to_string(), &[])
        .await;
    assert_eq!((status, code(&answer)), (200, 0), "{answer}");
    let replaced =
        wait_for(&api, &name, Duration::from_secs(30), "replaced", |s| s.spec.subscription_name == "hosts-renamed")
            .await;
    assert_eq!(common::id(&replaced), Some(id));
    assert_eq!(replaced.spec.system_name.as_deref(), Some(""), "omitted fields become empty");
    assert_eq!(replaced.spec.timeout_seconds, Some(10), "time_out 0 becomes 10");
    assert_eq!(replaced.spec.confirm.unwrap().pattern.as_deref(), Some("200"));
    assert_eq!(replaced.status.unwrap().statistics.unwrap().total, 1, "statistics kept");

    // Renaming onto another subscription's name is refused like a duplicate create.
    let (_, other) = rest.post("/api/v3/event/subscribe/0/3", subscription_body("taken", &server.url("ok", "x"))).await;
    let (status, answer) =
        rest.post("/api/v3/event/subscribe/0/3", subscription_body("taken", &server.url("ok", "y"))).await;
    assert_eq!((status, &answer["result"], code(&answer)), (200, &json!(false), 1199014), "{answer}");
    assert!(other["data"]["subscription_id"].is_i64());
    let rename = subscription_body("taken", &server.url("ok", "crud"));
    let (status, answer) =
        rest.send(reqwest::Method::PUT, &format!("/api/v3/event/subscribe/0/3/{id}"), &rename.to_string(), &[]).await;
    assert_eq!((status, code(&answer)), (200, 1199014), "{answer}");

    let (status, answer) =
        rest.send(reqwest::Method::DELETE, &format!("/api/v3/event/subscribe/0/3/{id}"), "", &[]).await;
    assert_eq!((status, code(&answer)), (200, 0), "{answer}");
    let (status, answer) =
        rest.send(reqwest::Method::DELETE, &format!("/api/v3/event/subscribe/0/3/{id}"), "", &[]).await;
    assert_eq!((status, code(&answer)), (400, 1103001), "{answer}");
    let (status, answer) = rest
        .send(reqwest::Method::PUT, &format!("/api/v3/event/subscribe/0/3/{id}"), &replacement.to_string(), &[])
        .await;
    assert_eq!((status, code(&answer)), (400, 1103003), "{answer}");
    // Another account cannot see or delete this account's subscription.
    let other_id = other["data"]["subscription_id"].as_i64().unwrap();
    let (status, answer) =
        rest.send(reqwest::Method::DELETE, &format!("/api/v3/event/subscribe/7/3/{other_id}"), "", &[]).await;
    assert_eq!((status, code(&answer)), (400, 1103001), "{answer}");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn twenty_creates_of_one_name_give_one_subscription_while_200_distinct_names_all_succeed() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-race", &[]).await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let rest = std::sync::Arc::new(Rest::new(&herald));
    let create = |name: String, i: usize| {
        let rest = rest.clone();
        async move {
            let body = subscription_body(&name, &format!("http://127.0.0.1:9/{i}"));
            (name, rest.post("/api/v3/event/subscribe/0/0", body).await)
        }
    };
    // All 220 in flight at once, the contested ones interleaved with the distinct ones.
    let attempts = (0..220).map(|i| {
        let name = if i % 11 == 0 { "contested".to_string() } else { format!("distinct-{i:03}") };
        create(name, i)
    });
    let answers = futures::future::join_all(attempts).await;
    let (contested, distinct): (Vec<_>, Vec<_>) = answers.iter().partition(|(name, _)| name == "contested");
    assert_eq!((contested.len(), distinct.len()), (20, 200));
    let won = contested.iter().filter(|(_, (_, a))| code(a) == 0).count();
    let duplicate = contested.iter().filter(|(_, (s, a))| *s == 200 && code(a) == 1199014).count();
    assert_eq!((won, duplicate), (1, 19), "{contested:?}");
    let failed: Vec<_> = distinct.iter().filter(|(_, (_, a))| code(a) != 0).collect();
    assert!(failed.is_empty(), "every distinct name is created: {failed:?}");
    let ids: BTreeSet<i64> = answers.iter().filter_map(|(_, (_, a))| a["data"]["subscription_id"].as_i64()).collect();
    assert_eq!(ids.len(), 201, "each success answers an id of its own");
    let objects = cluster.subscriptions(&ns).list(&Default::default()).await.unwrap();
    assert_eq!(objects.items.iter().filter(|s| s.spec.subscription_name == "contested").count(), 1);
    assert_eq!(objects.items.len(), 201);
}

/// Read-your-writes across callers: the moment one caller's create, update or delete is
/// answered, another caller's search (and lookup by id) reflects it.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_search_right_after_another_callers_write_sees_it() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-ryw", &[]).await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let (writer, reader) = (Rest::new(&herald), Rest::new(&herald));
    let count_where = |condition: Value| {
        let reader = &reader;
        async move {
            let (_, answer) = reader.post("/api/v3/event/subscribe/search/0/0", json!({"condition": condition})).await;
            assert_eq!(code(&answer), 0, "{answer}");
            answer["data"]["count"].as_u64().unwrap()
        }
    };
    for round in 0..20 {
        let name = format!("ryw-{round}");
        let (_, created) =
            writer.post("/api/v3/event/subscribe/0/0", subscription_body(&name, "http://127.0.0.1:9/")).await;
        let id = created["data"]["subscription_id"].as_i64().unwrap_or_else(|| panic!("{created}"));
        assert_eq!(
            count_where(json!({"subscription_name": name, "subscription_id": id})).await,
            1,
            "round {round}: create"
        );

        let mut changed = subscription_body(&name, "http://127.0.0.1:9/");
        changed["system_name"] = json!(format!("changed-{round}"));
        let path = format!("/api/v3/event/subscribe/0/0/{id}");
        let (_, updated) = writer.send(reqwest::Method::PUT, &path, &changed.to_string(), &[]).await;
        assert_eq!(code(&updated), 0, "{updated}");
        assert_eq!(count_where(json!({"system_name": format!("changed-{round}")})).await, 1, "round {round}: update");

        // A rename by one caller, and at once a create of the old name by the other: the
        // name is free again.
        let renamed = subscription_body(&format!("{name}-renamed"), "http://127.0.0.1:9/");
        let (_, answer) = writer.send(reqwest::Method::PUT, &path, &renamed.to_string(), &[]).await;
        assert_eq!(code(&answer), 0, "{answer}");
        let (_, reused) =
            reader.post("/api/v3/event/subscribe/0/0", subscription_body(&name, "http://127.0.0.1:9/")).await;
        assert_eq!(code(&reused), 0, "round {round}: the old name is free after the rename: {reused}");
        let reused = reused["data"]["subscription_id"].as_i64().unwrap();

        // The other caller deletes by id right after; then the first caller's search.
        let (_, deleted) = reader.send(reqwest::Method::DELETE, &path, "", &[]).await;
        assert_eq!(code(&deleted), 0, "{deleted}");
        let (_, deleted) =
            writer.send(reqwest::Method::DELETE, &format!("/api/v3/event/subscribe/0/0/{reused}"), "", &[]).await;
        assert_eq!(code(&deleted), 0, "{deleted}");
        assert_eq!(
            count_where(json!({"subscription_name": {"$regex": format!("^{name}(-renamed)?$")}})).await,
            0,
            "round {round}: delete"
        );
    }
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn search_filters_projects_pages_sorts_and_counts_over_500_subscriptions() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-search", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let rest = Rest::new(&herald);
    let api = cluster.subscriptions(&ns);
    // 500 subscriptions made through the Kubernetes API (as kubectl would), 20 at a time.
    for chunk in 0..25 {
        let creates = (0..20).map(|j| {
            let i = chunk * 20 + j;
            let api = api.clone();
            let spec = json!({
                "subscriptionName": format!("n{i:03}"),
                "systemName": if i % 2 == 0 { "alpha" } else { "beta" },
                "callbackUrl": if i == 7 { server.url("ok", "seven") } else { format!("http://127.0.0.1:9/{i}") },
                "events": [if i % 5 == 0 { "setcreate" } else { "hostcreate" }],
                "timeoutSeconds": i % 300 + 1,
            });
            async move {
                api.create(&PostParams::default(), &subscription(&format!("k{i:03}"), spec)).await.expect("create")
            }
        });
        futures::future::join_all(creates).await;
    }
    for i in 0..500 {
        wait_ready(&api, &format!("k{i:03}")).await;
    }
    // One of them has delivered an event: search shows its statistics.
    rest.post("/api/v3/event/publish", json!({"event_type": "instdata", "action": "create", "obj_type": "host", "bk_supplier_account": "0", "data": [{"cur_data": {"bk_host_id": 9}}]})).await;
    server.wait_for("seven", 1, Duration::from_secs(30)).await;
    wait_for(&api, "k007", Duration::from_secs(60), "total 1", |s| {
        s.status.as_ref().and_then(|st| st.statistics.as_ref()).is_some_and(|st| st.total == 1)
    })
    .await;

    let rest = &rest;
    let search = |condition: Value| async move {
        let (status, answer) = rest.post("/api/v3/event/subscribe/search/0/0", json!({"condition": condition})).await;
        assert_eq!((status, code(&answer)), (200, 0), "{answer}");
        answer["data"].clone()
    };
    let count = |data: &Value| data["count"].as_u64().unwrap();
    assert_eq!(count(&search(json!({})).await), 500);
    assert_eq!(count(&search(json!({"system_name": "alpha"})).await), 250);
    assert_eq!(count(&search(json!({"system_name": {"$eq": "beta"}})).await), 250);
    assert_eq!(count(&search(json!({"system_name": {"$ne": "beta"}})).await), 250);
    assert_eq!(count(&search(json!({"time_out": {"$gt": 250}})).await), 50);
    assert_eq!(count(&search(json!({"time_out": {"$gte": 250}})).await), 51);
    assert_eq!(count(&search(json!({"time_out": {"$lt": 3}})).await), 4);
    assert_eq!(count(&search(json!({"time_out": {"$lte": 3}})).await), 6);
    assert_eq!(count(&search(json!({"subscription_name": {"$in": ["n001", "n002", "zzz"]}})).await), 2);
    assert_eq!(count(&search(json!({"subscription_form": {"$nin": ["setcreate"]}})).await), 400);
    assert_eq!(count(&search(json!({"subscription_name": {"$regex": "^n00[0-4]$"}})).await), 5);
    assert_eq!(count(&search(json!({"system_name": {"$exists": true}})).await), 500);
    assert_eq!(count(&search(json!({"nothing_here": {"$exists": true}})).await), 0);
    assert_eq!(
        count(&search(json!({"$and": [{"system_name": "alpha"}, {"subscription_form": "setcreate"}]})).await),
        50
    );
    assert_eq!(count(&search(json!({"$or": [{"subscription_name": "n000"}, {"subscription_name": "n499"}]})).await), 2);
    let seven = search(json!({"subscription_name": "n007"})).await;
    let record = &seven["info"][0];
    assert!(record["subscription_id"].as_i64().unwrap() > 0);
    assert_eq!(record["statistics"], json!({"total": 1, "failure": 0}));
    for key in [
        "subscription_id",
        "subscription_name",
        "system_name",
        "callback_url",
        "confirm_mode",
        "confirm_pattern",
        "time_out",
        "timeout",
        "subscription_form",
        "operator",
        "bk_supplier_account",
        "bk_biz_id",
        "last_time",
        "statistics",
    ] {
        assert!(record.get(key).is_some(), "record key {key}: {record}");
    }
    assert!(record["last_time"].as_str().unwrap().len() == 19, "YYYY-MM-DD HH:MM:SS: {record}");

    // Projection, paging and sort.
    let (_, answer) = rest
        .post("/api/v3/event/subscribe/search/0/0", json!({"condition": {"system_name": "beta"}, "fields": ["subscription_name"], "page": {"start": 10, "limit": 5, "sort": "-subscription_name"}}))
        .await;
    assert_eq!(answer["data"]["count"], 250);
    let names: Vec<&str> =
        answer["data"]["info"].as_array().unwrap().iter().map(|r| r["subscription_name"].as_str().unwrap()).collect();
    assert_eq!(names, ["n479", "n477", "n475", "n473", "n471"]);
    assert_eq!(answer["data"]["info"][0].as_object().unwrap().len(), 1, "only the projected field");
    let (_, all) =
        rest.post("/api/v3/event/subscribe/search/0/0", json!({"page": {"limit": 0, "sort": "subscription_id"}})).await;
    let ids: Vec<i64> =
        all["data"]["info"].as_array().unwrap().iter().map(|r| r["subscription_id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), 500, "limit 0 means no limit on direct paths");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted by id");
    // The account is forced into the filter; an unsupported operator names itself.
    let (_, answer) =
        rest.post("/api/v3/event/subscribe/search/7/0", json!({"condition": {"bk_supplier_account": "0"}})).await;
    assert_eq!(answer["data"]["count"], 0);
    let (status, answer) = rest
        .send(
            reqwest::Method::POST,
            "/api/v3/event/subscribe/search/0/0",
            &json!({"condition": {"time_out": {"$where": "1"}}}).to_string(),
            &[("HTTP_BLUEKING_LANGUAGE", "en")],
        )
        .await;
    assert_eq!((status, code(&answer)), (400, 1199006));
    assert!(answer["bk_error_msg"].as_str().unwrap().contains("$where"), "{answer}");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn ping_and_telnet_report_what_the_target_did() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-probe", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "api:\n  probeTimeoutSeconds: 2\n").await;
    let rest = Rest::new(&herald);
    for (behaviour, status, body) in [("ok", 200, "ok"), ("status-404", 404, ""), ("status-500", 500, "")] {
        let (http, answer) = rest
            .post(
                "/api/v3/event/subscribe/ping",
                json!({"callback_url": server.url(behaviour, "ping"), "data": "{\"hello\": 1}"}),
            )
            .await;
        assert_eq!((http, &answer["result"]), (200, &json!(true)), "{answer}");
        assert_eq!(answer["data"]["http_status"], status);
        assert_eq!(answer["data"]["response_body"], body);
    }
    let pinged = server.received("ping");
    assert_eq!(pinged[0].body, json!({"hello": 1}), "data is POSTed verbatim");
    // An object as data is serialised.
    rest.post(
        "/api/v3/event/subscribe/ping",
        json!({"callback_url": server.url("ok", "ping-object"), "data": {"a": [1]}}),
    )
    .await;
    assert_eq!(server.received("ping-object")[0].body, json!({"a": [1]}));

    let started = std::time::Instant::now();
    let (http, answer) = rest
        .post("/api/v3/event/subscribe/ping", json!({"callback_url": server.url("hang", "ping-hang"), "data": ""}))
        .await;
    assert_eq!((http, code(&answer)), (400, 1103004), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2 + 2), "the probe timeout bounds the ping");
    let closed = free_port();
    let (http, answer) = rest
        .post(
            "/api/v3/event/subscribe/ping",
            json!({"callback_url": format!("http://127.0.0.1:{closed}/x"), "data": ""}),
        )
        .await;
    assert_eq!((http, code(&answer)), (400, 1103004), "{answer}");

    let (http, answer) =
        rest.post("/api/v3/event/subscribe/telnet", json!({"callback_url": server.url("ok", "telnet")})).await;
    assert_eq!((http, code(&answer)), (200, 0), "{answer}");
    assert_eq!(answer["data"], "success", "the API document's answer to a connectivity test");
    assert!(server.received("telnet").is_empty(), "telnet sends nothing");
    let (http, answer) = rest
        .post("/api/v3/event/subscribe/telnet", json!({"callback_url": format!("http://127.0.0.1:{closed}/x")}))
        .await;
    assert_eq!((http, code(&answer)), (400, 1103005), "{answer}");
    let (http, answer) = rest
        .post("/api/v3/event/subscribe/telnet", json!({"callback_url": format!("127.0.0.1:{}", server.port)}))
        .await;
    assert_eq!((http, code(&answer)), (400, 1199006), "{answer}");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn loopback_targets_are_refused_before_connecting_unless_allowed() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-guard", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "callbackGuard:\n  allowCidrs: []\n").await;
    let rest = Rest::new(&herald);
    for url in [server.url("ok", "guard"), format!("http://localhost:{}/ok/guard", server.port)] {
        let (http, answer) = rest.post("/api/v3/event/subscribe/ping", json!({"callback_url": url, "data": ""})).await;
        assert_eq!((http, code(&answer)), (400, 1199006), "{answer}");
        let message = answer["bk_error_msg"].as_str().unwrap();
        assert!(message.contains("loopback"), "{answer}");
        // What a host name resolves to inside the cluster is not the caller's business.
        assert!(!message.contains("127.0.0.1") && !message.contains("::1"), "no resolved address: {answer}");
        let (http, answer) = rest.post("/api/v3/event/subscribe/telnet", json!({"callback_url": url})).await;
        assert_eq!((http, code(&answer)), (400, 1199006), "{answer}");
        assert!(!answer["bk_error_msg"].as_str().unwrap().contains("127.0.0.1"), "{answer}");
    }
    assert!(server.received("guard").is_empty(), "nothing reached the refused target");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn direct_paths_need_a_token_with_rights_on_the_account() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-auth", &[]).await;
    let herald = Herald::start(&cluster, &ns, "api:\n  auth:\n    anonymous: false\n    cacheSeconds: 1\n").await;
    let (status, answer) =
        Rest::new(&herald).post("/api/v3/event/subscribe/0/0", subscription_body("a", "http://127.0.0.1:9/")).await;
    assert_eq!((status, code(&answer)), (401, 1199027), "{answer}");
    let wrong_audience = cluster.service_account_token(&ns, "caller", "some-other-audience");
    let (status, answer) = Rest::with_token(&herald, &wrong_audience)
        .post("/api/v3/event/subscribe/0/0", subscription_body("a", "http://127.0.0.1:9/"))
        .await;
    assert_eq!((status, code(&answer)), (401, 1199027), "{answer}");

    let token = cluster.service_account_token(&ns, "caller", "herald");
    let rest = Rest::with_token(&herald, &token);
    let (status, answer) =
        rest.post("/api/v3/event/subscribe/0/0", subscription_body("a", "http://127.0.0.1:9/")).await;
    assert_eq!((status, code(&answer)), (403, 9900403), "{answer}");
    assert_eq!(answer["permission"]["actions"][0]["id"], "create", "{answer}");

    cluster.grant_accounts(&ns, "caller", &["create", "list"], &["0"]);
    // The refusal is cached for `cacheSeconds` (1 here), and RBAC takes a moment: the
    // grant holds within a few seconds.
    let granted_by = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, answer) =
            rest.post("/api/v3/event/subscribe/0/0", subscription_body("a", "http://127.0.0.1:9/")).await;
        if (status, code(&answer)) == (200, 0) {
            break;
        }
        assert_eq!((status, code(&answer)), (403, 9900403), "{answer}");
        assert!(std::time::Instant::now() < granted_by, "the grant did not take effect within 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, answer) = rest.post("/api/v3/event/subscribe/search/0/0", json!({})).await;
    assert_eq!((status, answer["data"]["count"].as_i64()), (200, Some(1)), "{answer}");
    // Rights on account 0 are not rights on account 1, and not delete rights.
    let (status, answer) =
        rest.post("/api/v3/event/subscribe/1/0", subscription_body("b", "http://127.0.0.1:9/")).await;
    assert_eq!((status, code(&answer)), (403, 9900403), "{answer}");
    let (status, answer) = rest.send(reqwest::Method::DELETE, "/api/v3/event/subscribe/0/0/1", "", &[]).await;
    assert_eq!((status, code(&answer)), (403, 9900403), "{answer}");
    // Publishing is an action of its own.
    let (status, answer) = rest
        .post("/api/v3/event/publish", json!({"event_type": "instdata", "action": "create", "obj_type": "host"}))
        .await;
    assert_eq!((status, code(&answer)), (403, 9900403), "{answer}");
    let _ = cluster.kubectl(&["delete", "clusterrole,clusterrolebinding", &format!("{}-caller", ns.name)]);
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn esb_paths_work_with_app_credentials_and_always_answer_200() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-esb", &[]).await;
    let server = CallbackServer::start().await;
    // App credentials from a Secret in herald's namespace.
    let apps = "apps:\n- appCode: cmdb\n  appSecret: s3cret\n  accounts: ['0']\n";
    let (ok, _, err) = cluster.kubectl(&[
        "create",
        "secret",
        "generic",
        "esb-apps",
        "-n",
        &ns,
        &format!("--from-literal=apps.yaml={apps}"),
    ]);
    assert!(ok, "{err}");
    let config = "api:\n  auth:\n    anonymous: false\n  esbCredentialsSecret: esb-apps\n";
    let herald = Herald::start(&cluster, &ns, config).await;
    let rest = Rest::new(&herald);
    let credentials = json!({"bk_app_code": "cmdb", "bk_app_secret": "s3cret", "bk_username": "bob"}).to_string();
    let esb = |name: &str, body: Value| {
        let rest = &rest;
        let credentials = credentials.clone();
        let path = format!("/api/c/compapi/v2/cc/{name}/");
        async move {
            rest.send(reqwest::Method::POST, &path, &body.to_string(), &[("X-Bkapi-Authorization", &credentials)]).await
        }
    };
    let mut create = subscription_body("esb-sub", &server.url("ok", "esb"));
    create["bk_supplier_account"] = "0".into();
    let (status, answer) = esb("subscribe_event", create).await;
    assert_eq!((status, &answer["result"], code(&answer)), (200, &json!(true), 0), "{answer}");
    assert!(answer["request_id"].is_string() && answer["message"] == "success");
    let id = answer["data"]["subscription_id"].as_i64().unwrap();
    let operator =
        find(&cluster.subscriptions(&ns), id).await.metadata.annotations.unwrap()[OPERATOR_ANNOTATION].clone();
    assert_eq!(operator, "bob");

    let (_, found) =
        esb("search_subscription", json!({"condition": {"subscription_id": id}, "page": {"limit": 1000}})).await;
    assert_eq!(found["data"]["count"], 1, "{found}");
    let mut update = subscription_body("esb-renamed", &server.url("ok", "esb"));
    update["subscription_id"] = id.into();
    let (status, answer) = esb("update_event_subscribe", update).await;
    assert_eq!((status, code(&answer)), (200, 0), "{answer}");
    let (_, answer) = esb("testing_connection", json!({"callback_url": server.url("ok", "esb")})).await;
    assert_eq!(code(&answer), 0, "{answer}");
    assert_eq!(answer["data"], "success", "{answer}");
    let (_, answer) = esb("unsubcribe_event", json!({"subscription_id": id})).await;
    assert_eq!(code(&answer), 0, "{answer}");
    let (status, answer) = esb("unsubcribe_event", json!({"subscription_id": id})).await;
    assert_eq!((status, &answer["result"], code(&answer)), (200, &json!(false), 1103001), "{answer}");

    // Credentials in the body work too; wrong, missing or unmapped ones answer result false with 200.
    let mut in_body = subscription_body("body-creds", &server.url("ok", "esb"));
    in_body["bk_app_code"] = "cmdb".into();
    in_body["bk_app_secret"] = "s3cret".into();
    let (status, answer) = rest.post("/api/c/compapi/v2/cc/subscribe_event/", in_body.clone()).await;
    assert_eq!((status, code(&answer)), (200, 0), "{answer}");
    in_body["bk_app_secret"] = "wrong".into();
    let (status, answer) = rest.post("/api/c/compapi/v2/cc/subscribe_event/", in_body.clone()).await;
    assert_eq!((status, &answer["result"], code(&answer)), (200, &json!(false), 1199027), "{answer}");
    let (status, answer) = rest.post("/api/c/compapi/v2/cc/search_subscription/", json!({})).await;
    assert_eq!((status, code(&answer)), (200, 1199027), "{answer}");
    let (status, answer) = esb("search_subscription", json!({"bk_supplier_account": "9"})).await;
    assert_eq!((status, &answer["result"], code(&answer)), (200, &json!(false), 9900403), "{answer}");
    assert!(!answer["permission"].is_null());
    let (status, answer) = esb("subscribe_event", json!({"callback_url": "x"})).await;
    assert_eq!((status, code(&answer)), (200, 1199010), "{answer}");
    // No secret ever comes back.
    assert!(!answer.to_string().contains("s3cret"));
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn bad_input_gets_its_documented_code_never_a_5xx() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-input", &[]).await;
    let herald = Herald::start(&cluster, &ns, "api:\n  maxBodyBytes: 65536\n").await;
    let rest = Rest::new(&herald);
    let create = "/api/v3/event/subscribe/0/0";
    let cases: Vec<(&str, String, u16, i64)> = vec![
        ("malformed JSON", "{\"subscription_name\": ".into(), 400, 1199000),
        ("not an object", "[1, 2]".into(), 400, 1199000),
        ("confirm_mode as a number", json!({"subscription_name": "a", "callback_url": "http://127.0.0.1/", "subscription_form": "hostcreate", "confirm_mode": 1}).to_string(), 400, 1199000),
        ("no subscription_name", json!({"callback_url": "http://127.0.0.1/", "subscription_form": "hostcreate"}).to_string(), 400, 1199010),
        ("no callback_url", json!({"subscription_name": "a", "subscription_form": "hostcreate"}).to_string(), 400, 1199010),
        ("no subscription_form", json!({"subscription_name": "a", "callback_url": "http://127.0.0.1/"}).to_string(), 400, 1199010),
        ("bad confirm_mode", json!({"subscription_name": "a", "callback_url": "http://127.0.0.1/", "subscription_form": "hostcreate", "confirm_mode": "json"}).to_string(), 400, 1199006),
        ("bad regex", json!({"subscription_name": "a", "callback_url": "http://127.0.0.1/", "subscription_form": "hostcreate", "confirm_mode": "regular", "confirm_pattern": "("}).to_string(), 400, 1199006),
        ("relative URL", json!({"subscription_name": "a", "callback_url": "/cb", "subscription_form": "hostcreate"}).to_string(), 400, 1199006),
        ("time_out too large", json!({"subscription_name": "a", "callback_url": "http://127.0.0.1/", "subscription_form": "hostcreate", "time_out": 301}).to_string(), 400, 1199006),
        ("oversize body", format!("{{\"subscription_name\": \"{}\"}}", "a".repeat(100_000)), 413, 1199000),
    ];
    for (case, body, status, expected) in cases {
        let (http, answer) = rest.send(reqwest::Method::POST, create, &body, &[("HTTP_BLUEKING_LANGUAGE", "en")]).await;
        assert_eq!((http, code(&answer)), (status, expected), "{case}: {answer}");
        assert_eq!(answer["result"], false);
    }
    let (http, answer) = rest.send(reqwest::Method::POST, "/api/v3/event/subscribe/0/0", "{}", &[]).await;
    assert_eq!((http, code(&answer)), (400, 1199010));
    assert!(
        answer["bk_error_msg"].as_str().unwrap().contains("subscription_name"),
        "Chinese by default, naming the field: {answer}"
    );
    let (http, answer) = rest.send(reqwest::Method::GET, "/api/v3/no/such/path", "", &[]).await;
    assert_eq!((http, code(&answer)), (404, 1199006));
    let (http, answer) = rest.send(reqwest::Method::GET, "/api/v3/event/subscribe/ping", "", &[]).await;
    assert_eq!((http, code(&answer)), (405, 1199006));
    let (http, answer) = rest.send(reqwest::Method::PUT, "/api/v3/event/subscribe/0/0/not-a-number", "{}", &[]).await;
    assert_eq!((http, code(&answer)), (400, 1103003));
    let (http, answer) = rest
        .send(
            reqwest::Method::POST,
            "/api/v3/event/publish",
            "{\"event_type\": \"bogus\", \"action\": \"create\", \"obj_type\": \"host\"}",
            &[],
        )
        .await;
    assert_eq!((http, code(&answer)), (400, 1199006));
    let (http, answer) = rest.send(reqwest::Method::POST, "/api/v3/event/publish", "nope", &[]).await;
    assert_eq!((http, code(&answer)), (400, 1199000));
    // The request id is echoed.
    let response = reqwest::Client::new()
        .post(herald.url(create))
        .header("Cc_Request_Id", "trace-7")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["cc_request_id"], "trace-7");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn server_side_faults_answer_their_codes() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-faults", &[]).await;

    // herald running with RBAC that lets it reconcile but not create subscriptions:
    // the REST create fails on the API server's side (1103000).
    let token = cluster.service_account_token(&ns, "limited", "https://kubernetes.default.svc");
    let role = format!("{}-limited", ns.name);
    for args in [
        vec![
            "create",
            "clusterrole",
            &role,
            "--verb=get,list,watch",
            "--resource=eventsubscriptions.herald.dev,namespaces",
        ],
        vec![
            "create",
            "clusterrolebinding",
            &role,
            &format!("--clusterrole={role}"),
            &format!("--serviceaccount={}:limited", ns.name),
        ],
        vec![
            "create",
            "role",
            "limited-state",
            "-n",
            &ns,
            "--verb=get,create,update",
            "--resource=configmaps,leases.coordination.k8s.io",
        ],
        vec![
            "create",
            "rolebinding",
            "limited-state",
            "-n",
            &ns,
            "--role=limited-state",
            &format!("--serviceaccount={}:limited", ns.name),
        ],
        vec![
            "create",
            "role",
            "limited-patch",
            "-n",
            &ns,
            "--verb=get,patch",
            "--resource=eventsubscriptions.herald.dev,eventsubscriptions.herald.dev/status",
        ],
        vec![
            "create",
            "rolebinding",
            "limited-patch",
            "-n",
            &ns,
            "--role=limited-patch",
            &format!("--serviceaccount={}:limited", ns.name),
        ],
    ] {
        let (ok, _, err) = cluster.kubectl(&args);
        assert!(ok, "{args:?}: {err}");
    }
    let limited_config =
        cluster.kubeconfig_with_token(&std::env::temp_dir().join(format!("{}-limited.kubeconfig", ns.name)), &token);
    let limited_cluster =
        Cluster { client: cluster.client.clone(), kubeconfig: limited_config, tools: cluster.tools.clone() };
    {
        let herald = Herald::start(&limited_cluster, &ns, "").await;
        let (status, answer) =
            Rest::new(&herald).post("/api/v3/event/subscribe/0/0", subscription_body("a", "http://127.0.0.1:9/")).await;
        assert_eq!((status, code(&answer)), (500, 1103000), "{answer}");
        // Nothing was stored, nothing is half-created.
        assert!(cluster.subscriptions(&ns).list(&Default::default()).await.unwrap().items.is_empty());
    }
    let _ = cluster.kubectl(&["delete", "clusterrole,clusterrolebinding", &role]);

    // The API server stopped: search answers from herald's cache (which shows every write
    // herald made), create fails (1103000), and token review fails (1199999); none of
    // them hang or panic.
    let herald = Herald::start(&cluster, &ns, "").await;
    let authed = Herald::start_in(
        &cluster,
        &ns,
        "api:\n  auth:\n    anonymous: false\nleaderElection:\n  enabled: false\n",
        &std::env::temp_dir().join(format!("{}-authed", ns.name)),
    )
    .await;
    let token = cluster.service_account_token(&ns, "someone", "herald");
    let rest = Rest::new(&herald);
    let (_, answer) =
        rest.post("/api/v3/event/subscribe/0/0", subscription_body("before-outage", "http://127.0.0.1:9/")).await;
    assert_eq!(code(&answer), 0, "{answer}");
    let (_, before) = rest.post("/api/v3/event/subscribe/search/0/0", json!({})).await;
    let outage = cluster.outage("kube-apiserver");
    let (status, answer) = rest.post("/api/v3/event/subscribe/search/0/0", json!({})).await;
    let search_result = (status, code(&answer), answer["data"]["count"].clone());
    let (status, answer) =
        rest.post("/api/v3/event/subscribe/0/0", subscription_body("during-outage", "http://127.0.0.1:9/")).await;
    let create_result = (status, code(&answer));
    let (status, answer) =
        Rest::with_token(&authed, &token).post("/api/v3/event/subscribe/search/0/0", json!({})).await;
    let review_result = (status, code(&answer));
    drop(outage);
    assert_eq!(search_result, (200, 0, before["data"]["count"].clone()), "{before}");
    assert!(before["data"]["count"].as_u64() >= Some(1), "{before}");
    assert_eq!(create_result, (500, 1103000));
    assert_eq!(review_result, (500, 1199999));
    // Recovered without a restart of herald: once its watches have reconnected (they back
    // off up to a few seconds, and the restarted API server needs a moment), creates work.
    let recovered_by = std::time::Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    let created = loop {
        attempt += 1;
        let name = format!("after-outage-{attempt}");
        let (status, answer) =
            rest.post("/api/v3/event/subscribe/0/0", subscription_body(&name, "http://127.0.0.1:9/")).await;
        if (status, code(&answer)) == (200, 0) {
            break name;
        }
        assert!(std::time::Instant::now() < recovered_by, "no successful create within 60 s of recovery: {answer}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    drop(authed);
    let names: BTreeSet<String> = cluster
        .subscriptions(&ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.spec.subscription_name)
        .collect();
    assert!(names.contains(&created));
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn the_api_is_served_over_tls_when_a_certificate_is_configured() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-tls", &[]).await;
    let dir = std::env::temp_dir().join(format!("{}-tls", ns.name));
    std::fs::create_dir_all(&dir).unwrap();
    // A CA and a server certificate it signs (webpki refuses a CA as the end entity).
    let script = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=herald-test-ca -keyout ca.key -out ca.crt \
        && openssl req -newkey rsa:2048 -nodes -subj /CN=herald -keyout tls.key -out tls.csr \
        && printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext \
        && openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile ext -out tls.crt";
    let status = std::process::Command::new("bash")
        .args(["-c", script])
        .current_dir(&dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let config = format!(
        "api:\n  tls:\n    certFile: {}\n    keyFile: {}\n",
        dir.join("tls.crt").display(),
        dir.join("tls.key").display()
    );
    let herald = Herald::start(&cluster, &ns, &config).await;
    assert!(herald.url("/").starts_with("https://"));
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.crt")).unwrap()).unwrap();
    let client = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let answer: Value = client
        .post(herald.url("/api/v3/event/subscribe/search/0/0"))
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(code(&answer), 0, "{answer}");
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{}/readyz", herald.port)).send().await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true), "plain HTTP is not served");
    let untrusting = reqwest::Client::new().get(herald.url("/readyz")).send().await;
    assert!(untrusting.is_err(), "an unknown certificate is refused by a verifying client");
}

/// The sum of the API server's `apiserver_request_total` for TokenReviews (every code).
fn token_reviews_served(cluster: &common::Cluster) -> u64 {
    let (ok, metrics, err) = cluster.kubectl(&["get", "--raw", "/metrics"]);
    assert!(ok, "{err}");
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains(r#"resource="tokenreviews""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Seconds from creating a subscription to its Ready=True: herald's own API-server
/// traffic (watch, counter, status write).
async fn seconds_to_ready(api: &Api<EventSubscription>, name: &str) -> f64 {
    let started = std::time::Instant::now();
    api.create(&PostParams::default(), &subscription(name, basic_spec(name))).await.unwrap();
    wait_ready(api, name).await;
    started.elapsed().as_secs_f64()
}

/// An unauthenticated client floods herald with random, well-formed bearer tokens (64 at
/// a time for 10 s). TokenReviews reaching the API server stay within herald's bound
/// (100 a second after a burst of 200, at most 8 in flight); the flood is answered 401 or
/// 503 (never 500); herald's own API-server traffic goes on (a subscription still becomes
/// Ready; the times with and without the flood are printed, not asserted), and a caller
/// whose token is cached is still served. Prints the figures.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_flood_of_random_bearer_tokens_keeps_token_reviews_bounded() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("rest-flood", &[]).await;
    // Answers cached for a minute: the caller's review stays cached through the flood.
    let herald = Herald::start(&cluster, &ns, "api:\n  auth:\n    anonymous: false\n    cacheSeconds: 60\n").await;
    let api = cluster.subscriptions(&ns);
    let quiet = seconds_to_ready(&api, "quiet").await;
    let token = cluster.service_account_token(&ns, "caller", "herald");
    cluster.grant_accounts(&ns, "caller", &["list"], &["0"]);
    let rest = Rest::with_token(&herald, &token);
    wait_until(Duration::from_secs(30), "the caller's grant", async || {
        let (status, answer) = rest.post("/api/v3/event/subscribe/search/0/0", json!({})).await;
        if status == 200 { Ok(()) } else { Err(format!("{status} {answer}")) }
    })
    .await;

    const FLOOD: Duration = Duration::from_secs(10);
    let before = token_reviews_served(&cluster);
    let url = herald.url("/api/v3/event/subscribe/search/0/0");
    let started = std::time::Instant::now();
    let flooders: Vec<_> = (0..64)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut answers = std::collections::BTreeMap::<u16, u64>::new();
                let segment = |n: usize| -> String { (0..n).map(|_| fastrand::alphanumeric()).collect() };
                while started.elapsed() < FLOOD {
                    // Shaped like a real JWT (segment lengths base64 can have), so herald's
                    // local check passes it on to a TokenReview.
                    let forged = format!("eyJ{}.{}.{}", segment(29), segment(120), segment(86));
                    let status = match http.post(&url).bearer_auth(forged).body("{}").send().await {
                        Ok(answer) => answer.status().as_u16(),
                        Err(_) => 0,
                    };
                    *answers.entry(status).or_default() += 1;
                }
                answers
            })
        })
        .collect();
    let during = seconds_to_ready(&api, "flooded").await;
    let (status, answer) = rest.post("/api/v3/event/subscribe/search/0/0", json!({})).await;
    assert_eq!(status, 200, "a caller whose token is cached is served during the flood: {answer}");
    let mut answers = std::collections::BTreeMap::<u16, u64>::new();
    for flooder in flooders {
        for (status, n) in flooder.await.unwrap() {
            *answers.entry(status).or_default() += n;
        }
    }
    let took = started.elapsed().as_secs_f64();
    let reviews = token_reviews_served(&cluster) - before;
    let metrics = reqwest::get(herald.url("/metrics")).await.unwrap().text().await.unwrap();
    let herald_reviews: Vec<&str> = metrics.lines().filter(|l| l.starts_with("herald_auth_")).collect();
    let requests: u64 = answers.values().sum();
    println!(
        "random-token flood: {requests} requests in {took:.1} s ({:.0}/s) answered {answers:?}; TokenReviews at the API server {reviews} ({:.0}/s; bound 100/s after a burst of 200); subscription Ready in {quiet:.2} s quiet, {during:.2} s during the flood (ratio {:.2}); machine {} cores; herald: {herald_reviews:?}",
        requests as f64 / took,
        reviews as f64 / took,
        during / quiet,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    assert!(answers.keys().all(|status| [401, 503].contains(status)), "{answers:?}");
    assert!(reviews >= 100, "the flood reached the TokenReview path: {reviews}");
    assert!(reviews as f64 <= 200.0 + 100.0 * took + 50.0, "{reviews} TokenReviews in {took:.1} s");
    drop(herald);
}
