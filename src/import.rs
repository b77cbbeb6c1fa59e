//! `herald import`: brings the subscriptions of a bk-cmdb 3.5–3.9 event server (or of
//! another herald, which speaks the same API) into EventSubscriptions with their ids,
//! operators and statistics (docs/migration.md).
//!
//! Records come from `search_subscription` (direct path or ESB), paged per supplier
//! account, or from a JSON file of the same records. Each becomes the object
//! `cmdb-imported-<id>` whose annotations carry the id to keep (the controller honours it
//! once, as it allocates ids, and refuses an id another object holds) and the old
//! statistics (delivery adds its own counts to them). Re-running is safe: an imported
//! record is skipped, or applied again with `--existing update`.
//!
//! The reads carry app secrets and tokens, so they follow no redirect and use no
//! environment proxy (only `--proxy`); each answer is bounded in time and size, and paging
//! in pages and records (`Limits`), so a broken or hostile server ends the import with an
//! error instead of hanging it.

use crate::compat::input::parse_subscription;
// Read as the controller reads it, so import and controller agree on which id is asked for.
use crate::controller::validation::imported_id;
use crate::crd::{
    EventSubscription, EventSubscriptionSpec, IMPORTED_ID_ANNOTATION, IMPORTED_STATISTICS_ANNOTATION,
    OPERATOR_ANNOTATION, apply_body,
};
use crate::effective::{DEFAULT_SUPPLIER_ACCOUNT, name_key};
use crate::outbound::body::{BodyEnd, read_body};
use crate::outbound::describe;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

/// Field manager of the objects `herald import` writes.
pub const FIELD_MANAGER: &str = "herald-import";
/// Page size of `search_subscription` requests (ESB caps pages at 200).
const PAGE: usize = 200;

/// Where the records come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// An event server's `search_subscription`, for each of `ImportOptions::accounts`.
    Api(ApiSource),
    /// A JSON array of records (or `{"info": [...]}`, as search answers).
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub enum ApiSource {
    /// `POST {url}/api/v3/event/subscribe/search/{account}/0`, with `BK_User` and the
    /// owner header, and a bearer token when given (a herald source needs one).
    Direct { url: String, user: String, token: Option<String> },
    /// `POST {url}/api/c/compapi/v2/cc/search_subscription/` with app credentials.
    Esb { url: String, app_code: String, app_secret: String, user: String },
}

/// What to do with a record imported before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Existing {
    Skip,
    Update,
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub source: Source,
    /// Supplier accounts to read from an API source (a file holds its own).
    pub accounts: Vec<String>,
    /// Where the objects go: herald's namespace, unless `account_namespaces` names one.
    pub namespace: String,
    pub account_namespaces: BTreeMap<String, String>,
    pub existing: Existing,
    pub dry_run: bool,
    /// Proxy of the reads from an API source; environment proxies are never used, so that
    /// the credentials go only where the operator says.
    pub proxy: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading {path}: {source}")]
    ReadFile { path: String, source: std::io::Error },
    #[error("{what} is not a list of subscription records: {reason}")]
    Records { what: String, reason: String },
    #[error("searching {url} for account {account}: {reason}")]
    Search { url: String, account: String, reason: SearchError },
    #[error("invalid --proxy: {}", describe(.0))]
    Proxy(#[source] reqwest::Error),
    #[error("building the HTTP client: {}", describe(.0))]
    Client(#[source] reqwest::Error),
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("listing EventSubscriptions: {0}")]
    List(#[source] kube::Error),
}

/// Why reading an event server's subscriptions failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("{}", describe(.0))]
    Transport(#[source] reqwest::Error),
    #[error("timed out {during} after {after:?}")]
    Timeout { during: &'static str, after: Duration },
    #[error(
        "the server answered {status}{}; herald import follows no redirect (the credentials would go along): give --from-url the final address",
        location.as_deref().map(|l| format!(" pointing to {l}")).unwrap_or_default()
    )]
    Redirect { status: reqwest::StatusCode, location: Option<String> },
    #[error("the answer is longer than {cap} bytes")]
    TooLarge { cap: usize },
    #[error("not a JSON answer (HTTP {status}): {reason}")]
    NotJson { status: reqwest::StatusCode, reason: String },
    #[error("the server refused: {code} {message}")]
    Failed { code: i64, message: String },
    #[error("the server reports {count} subscriptions; herald import reads at most {max} in all")]
    CountAboveCap { count: usize, max: usize },
    #[error("the server sent more than {max} subscriptions in all")]
    RecordsAboveCap { max: usize },
    #[error("the page from record {start} holds only records already read (the server does not page)")]
    Repeated { start: usize },
    #[error("the server still had more after {max} pages")]
    TooManyPages { max: usize },
}

/// What happened to one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Created,
    Updated,
    Skipped(String),
    Refused(String),
}

#[derive(Clone, Debug)]
pub struct Row {
    pub id: i64,
    pub account: String,
    pub name: String,
    pub target: String,
    pub action: Action,
}

/// The whole import, a row per record.
#[derive(Debug, Default)]
pub struct Summary {
    pub rows: Vec<Row>,
}

impl Summary {
    fn count(&self, wanted: fn(&Action) -> bool) -> usize {
        self.rows.iter().filter(|r| wanted(&r.action)).count()
    }

    pub fn refused(&self) -> usize {
        self.count(|a| matches!(a, Action::Refused(_)))
    }

    /// The table `herald import` prints, then the totals.
    pub fn render(&self, dry_run: bool) -> String {
        let verb = |action: &Action| match (action, dry_run) {
            (Action::Created, false) => ("created", String::new()),
            (Action::Created, true) => ("would create", String::new()),
            (Action::Updated, false) => ("updated", String::new()),
            (Action::Updated, true) => ("would update", String::new()),
            (Action::Skipped(why), _) => ("skipped", why.clone()),
            (Action::Refused(why), _) => ("refused", why.clone()),
        };
        let mut out =
            format!("{:<8} {:<10} {:<32} {:<48} {:<12} REASON\n", "ID", "ACCOUNT", "NAME", "OBJECT", "ACTION");
        for row in &self.rows {
            let (action, reason) = verb(&row.action);
            out.push_str(&format!(
                "{:<8} {:<10} {:<32} {:<48} {:<12} {reason}\n",
                row.id, row.account, row.name, row.target, action
            ));
        }
        out.push_str(&format!(
            "{} created, {} updated, {} skipped, {} refused{}\n",
            self.count(|a| *a == Action::Created),
            self.count(|a| *a == Action::Updated),
            self.count(|a| matches!(a, Action::Skipped(_))),
            self.refused(),
            if dry_run { " (dry run: nothing written)" } else { "" }
        ));
        out
    }
}

/// The object name an imported record gets: stable, so two imports of one record meet on
/// one object.
pub fn object_name(id: i64) -> String {
    format!("cmdb-imported-{id}")
}

/// Reads every record of the source.
pub async fn read_records(options: &ImportOptions) -> Result<Vec<Value>, ImportError> {
    read_records_within(options, &Limits::DEFAULT).await
}

/// How far `herald import` trusts an event server: the credentials it sends must not be
/// carried elsewhere (no redirects, no environment proxies), and a slow, huge or endless
/// answer must end the import with an error rather than hang it or exhaust memory.
#[derive(Clone, Copy, Debug)]
struct Limits {
    connect_timeout: Duration,
    /// One request, from connecting until its body is read.
    request_timeout: Duration,
    /// Bytes of one answer (one page).
    body_cap: usize,
    /// Records of all accounts together.
    max_records: usize,
    /// Pages of one account.
    max_pages: usize,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        // A page of 200 records is tens of KiB; far more is not an event server.
        body_cap: 16 << 20,
        // Five times what one installation can hold (about 20,000 imported ids).
        max_records: 100_000,
        // Twice the pages the records need at 200 a page, for servers with smaller pages.
        max_pages: 1_000,
    };
}

async fn read_records_within(options: &ImportOptions, limits: &Limits) -> Result<Vec<Value>, ImportError> {
    let records = match &options.source {
        Source::File(path) => {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|source| ImportError::ReadFile { path: shown.clone(), source })?;
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| ImportError::Records { what: shown.clone(), reason: e.to_string() })?;
            let list = value.get("info").cloned().unwrap_or(value);
            match list {
                Value::Array(records) => records,
                _ => return Err(ImportError::Records { what: shown, reason: "expected an array".into() }),
            }
        }
        Source::Api(source) => {
            let http = http_client(limits, options.proxy.as_deref())?;
            let mut records = Vec::new();
            for account in &options.accounts {
                let room = limits.max_records.saturating_sub(records.len());
                records.extend(search_account(&http, source, account, limits, room).await?);
            }
            records
        }
    };
    Ok(records)
}

/// The client of the reads: app secrets and tokens travel in its headers and bodies, so
/// it follows no redirect and takes no proxy from the environment, only `--proxy`.
fn http_client(limits: &Limits, proxy: Option<&str>) -> Result<reqwest::Client, ImportError> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(limits.connect_timeout)
        .timeout(limits.request_timeout)
        .user_agent(concat!("herald-import/", env!("CARGO_PKG_VERSION")));
    if let Some(proxy) = proxy {
        builder = builder.proxy(reqwest::Proxy::all(proxy).map_err(ImportError::Proxy)?);
    }
    builder.build().map_err(ImportError::Client)
}

/// Every record of `account`, page by page, in id order; at most `room` of them.
async fn search_account(
    http: &reqwest::Client,
    source: &ApiSource,
    account: &str,
    limits: &Limits,
    room: usize,
) -> Result<Vec<Value>, ImportError> {
    let endpoint = match source {
        ApiSource::Direct { url, .. } => {
            format!("{}/api/v3/event/subscribe/search/{account}/0", url.trim_end_matches('/'))
        }
        ApiSource::Esb { url, .. } => format!("{}/api/c/compapi/v2/cc/search_subscription/", url.trim_end_matches('/')),
    };
    let failed =
        |reason: SearchError| ImportError::Search { url: endpoint.clone(), account: account.to_string(), reason };
    let mut records = Vec::new();
    let mut seen = HashSet::new();
    for _ in 0..limits.max_pages {
        let start = records.len();
        let page = json!({ "start": start, "limit": PAGE, "sort": "subscription_id" });
        let request = match source {
            ApiSource::Direct { user, token, .. } => {
                let mut request = http
                    .post(&endpoint)
                    .header("BK_User", user)
                    .header("HTTP_BLUEKING_SUPPLIER_ID", account)
                    .json(&json!({ "page": page }));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                request
            }
            ApiSource::Esb { app_code, app_secret, user, .. } => {
                let credentials =
                    json!({ "bk_app_code": app_code, "bk_app_secret": app_secret, "bk_username": user }).to_string();
                let body = json!({ "bk_supplier_account": account, "page": page });
                http.post(&endpoint).header("X-Bkapi-Authorization", credentials).json(&body)
            }
        };
        let mut answer = fetch_page(request, limits).await.map_err(failed)?;
        if answer["result"] != true {
            let message = answer["bk_error_msg"].as_str().or(answer["message"].as_str()).unwrap_or_default();
            let code = answer["bk_error_code"].as_i64().or(answer["code"].as_i64()).unwrap_or(-1);
            return Err(failed(SearchError::Failed { code, message: message.to_string() }));
        }
        let count = usize::try_from(answer["data"]["count"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX);
        if count > room {
            return Err(failed(SearchError::CountAboveCap { count, max: limits.max_records }));
        }
        let info = match answer.pointer_mut("/data/info").map(Value::take) {
            Some(Value::Array(info)) => info,
            _ => Vec::new(),
        };
        if info.is_empty() {
            return Ok(records);
        }
        // A server that ignores `start` answers the same page forever: a page with nothing
        // new ends the import (records without an id count as new; the caps bound them).
        let mut fresh = false;
        for record in &info {
            fresh |= record["subscription_id"].as_i64().is_none_or(|id| seen.insert(id));
        }
        if !fresh {
            return Err(failed(SearchError::Repeated { start }));
        }
        records.extend(info);
        if records.len() > room {
            return Err(failed(SearchError::RecordsAboveCap { max: limits.max_records }));
        }
        if records.len() >= count {
            return Ok(records);
        }
    }
    Err(failed(SearchError::TooManyPages { max: limits.max_pages }))
}

/// One page's answer: not a redirect, within the body cap and the timeouts, and JSON.
async fn fetch_page(request: reqwest::RequestBuilder, limits: &Limits) -> Result<Value, SearchError> {
    let transport = |error: reqwest::Error| match (error.is_timeout(), error.is_connect()) {
        (true, true) => SearchError::Timeout { during: "connecting", after: limits.connect_timeout },
        (true, false) => SearchError::Timeout { during: "waiting for the answer", after: limits.request_timeout },
        _ => SearchError::Transport(error),
    };
    let mut response = request.send().await.map_err(transport)?;
    let status = response.status();
    if status.is_redirection() {
        // Where it points, without path or query (they may carry anything).
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| response.url().join(l).ok())
            .map(|l| l.origin().ascii_serialization());
        return Err(SearchError::Redirect { status, location });
    }
    let body = read_body(&mut response, limits.body_cap, None).await.map_err(transport)?;
    if body.end != BodyEnd::Whole {
        return Err(SearchError::TooLarge { cap: limits.body_cap });
    }
    serde_json::from_slice(&body.bytes).map_err(|e| SearchError::NotJson { status, reason: e.to_string() })
}

/// The whole import against the cluster of the usual kubeconfig.
pub async fn run(options: &ImportOptions) -> Result<Summary, ImportError> {
    let client = kube::Client::try_default().await?;
    let records = read_records(options).await?;
    import(&client, options, records).await
}

/// Decides and (unless a dry run) writes every record; the cluster's subscriptions are
/// read once for the collision checks.
pub async fn import(
    client: &kube::Client,
    options: &ImportOptions,
    records: Vec<Value>,
) -> Result<Summary, ImportError> {
    let existing =
        Api::<EventSubscription>::all(client.clone()).list(&Default::default()).await.map_err(ImportError::List)?.items;
    let mut plan = Plan { existing: &existing, options, ids: HashSet::new(), names: HashMap::new() };
    let mut summary = Summary::default();
    for value in &records {
        let record = Record::read(value, options);
        let mut action = plan.decide(&record);
        if !matches!(action, Action::Refused(_)) {
            plan.take(&record);
        }
        if matches!(action, Action::Created | Action::Updated)
            && !options.dry_run
            && let Err(error) = record.apply(client).await
        {
            action = Action::Refused(error);
        }
        let target = format!("{}/{}", record.namespace, record.object);
        summary.rows.push(Row { id: record.id, account: record.account, name: record.name, target, action });
    }
    Ok(summary)
}

/// One source record, read once: what it is, where it goes, and its spec (as the REST
/// API maps a create) or why it has none.
struct Record<'a> {
    value: &'a Value,
    id: i64,
    account: String,
    name: String,
    namespace: String,
    object: String,
    spec: Result<EventSubscriptionSpec, String>,
}

impl<'a> Record<'a> {
    fn read(value: &'a Value, options: &ImportOptions) -> Self {
        let id = value["subscription_id"].as_i64().unwrap_or(0);
        let account = value["bk_supplier_account"]
            .as_str()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .unwrap_or(DEFAULT_SUPPLIER_ACCOUNT)
            .to_string();
        let biz = value["bk_biz_id"].as_i64().unwrap_or(0);
        let spec = serde_json::to_vec(value)
            .map_err(|e| e.to_string())
            .and_then(|body| parse_subscription(&body, &account, biz).map_err(|e| e.to_string()))
            .map(|input| input.to_spec());
        Record {
            value,
            id,
            name: value["subscription_name"].as_str().unwrap_or_default().trim().to_string(),
            namespace: options.account_namespaces.get(&account).unwrap_or(&options.namespace).clone(),
            object: object_name(id),
            account,
            spec,
        }
    }

    /// Whether `sub` is this record's object from an earlier import.
    fn is_ours(&self, sub: &EventSubscription) -> bool {
        sub.namespace().as_deref() == Some(self.namespace.as_str())
            && sub.name_any() == self.object
            && imported_id(sub) == Some(self.id)
    }

    async fn apply(&self, client: &kube::Client) -> Result<(), String> {
        let (namespace, object) = (&self.namespace, &self.object);
        let spec = self.spec.as_ref().map_err(Clone::clone)?;
        let statistics = json!({
            "total": self.value["statistics"]["total"].as_i64().unwrap_or(0),
            "failure": self.value["statistics"]["failure"].as_i64().unwrap_or(0),
        });
        let mut annotations = serde_json::Map::new();
        annotations.insert(IMPORTED_ID_ANNOTATION.into(), self.id.to_string().into());
        annotations.insert(IMPORTED_STATISTICS_ANNOTATION.into(), statistics.to_string().into());
        if let Some(operator) = self.value["operator"].as_str().filter(|o| !o.is_empty()) {
            annotations.insert(OPERATOR_ANNOTATION.into(), operator.into());
        }
        let mut body = apply_body(object, json!({ "annotations": annotations }));
        body["spec"] = json!(spec);
        Api::<EventSubscription>::namespaced(client.clone(), namespace)
            .patch(object, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(&body))
            .await
            .map(|_| ())
            .map_err(|e| format!("writing {namespace}/{object}: {}", crate::kube_error_summary(&e)))
    }
}

/// What records are judged against: the cluster as listed once, and the ids and names the
/// records before took.
struct Plan<'a> {
    existing: &'a [EventSubscription],
    options: &'a ImportOptions,
    ids: HashSet<i64>,
    names: HashMap<(String, String), i64>,
}

impl Plan<'_> {
    fn take(&mut self, record: &Record<'_>) {
        self.ids.insert(record.id);
        self.names.insert((record.account.clone(), record.name.clone()), record.id);
    }

    fn decide(&self, record: &Record<'_>) -> Action {
        let (id, account, name) = (record.id, record.account.as_str(), record.name.as_str());
        if !(1..=crate::controller::ids::MAX_ID).contains(&id) {
            return Action::Refused("no subscription_id between 1 and 2^53".into());
        }
        if self.ids.contains(&id) {
            return Action::Refused(format!("id {id} appears twice in the source"));
        }
        if let Some(other) = self.names.get(&(account.to_string(), name.to_string())) {
            return Action::Refused(format!("name {name:?} of account {account:?} is also record {other}'s"));
        }
        if let Err(error) = &record.spec {
            return Action::Refused(error.clone());
        }
        let live = self.existing.iter().filter(|s| s.metadata.deletion_timestamp.is_none());
        let held_by = |s: &EventSubscription| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any());
        for other in live.clone().filter(|s| !record.is_ours(s)) {
            let held =
                other.status.as_ref().and_then(|st| st.subscription_id) == Some(id) || imported_id(other) == Some(id);
            if held {
                return Action::Refused(format!("id {id} is held by {}", held_by(other)));
            }
            if name_key(&other.spec) == (account, name) {
                return Action::Refused(format!("name {name:?} of account {account:?} is used by {}", held_by(other)));
            }
            if other.namespace().as_deref() == Some(record.namespace.as_str()) && other.name_any() == record.object {
                return Action::Refused(format!("{} exists and is not this record's", held_by(other)));
            }
        }
        match (live.clone().any(|s| record.is_ours(s)), self.options.existing) {
            (false, _) => Action::Created,
            (true, Existing::Skip) => Action::Skipped("imported before".into()),
            (true, Existing::Update) => Action::Updated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Short bounds, so that the tests reach them quickly.
    const LIMITS: Limits = Limits {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_millis(300),
        body_cap: 64 << 10,
        max_records: 1_000,
        max_pages: 50,
    };

    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// A server whose every request is answered by `answer(start of the page asked for)`,
    /// and the number of requests it got.
    async fn pager(answer: impl Fn(u64) -> Value + Clone + Send + Sync + 'static) -> (String, Arc<AtomicUsize>) {
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let app = Router::new().fallback(move |axum::Json(body): axum::Json<Value>| {
            let answer = answer.clone();
            counted.fetch_add(1, Ordering::SeqCst);
            async move { axum::Json(answer(body["page"]["start"].as_u64().unwrap_or(0))) }
        });
        (serve(app).await, requests)
    }

    fn page(count: u64, ids: impl Iterator<Item = u64>) -> Value {
        let info: Vec<Value> =
            ids.map(|id| json!({ "subscription_id": id, "subscription_name": format!("s{id}") })).collect();
        json!({ "result": true, "data": { "count": count, "info": info } })
    }

    fn options(url: &str, esb: bool) -> ImportOptions {
        let source = if esb {
            ApiSource::Esb {
                url: url.into(),
                app_code: "app".into(),
                app_secret: "s3cret".into(),
                user: "admin".into(),
            }
        } else {
            ApiSource::Direct { url: url.into(), user: "admin".into(), token: Some("t0ken".into()) }
        };
        ImportOptions {
            source: Source::Api(source),
            accounts: vec!["0".into()],
            namespace: "herald-system".into(),
            account_namespaces: BTreeMap::new(),
            existing: Existing::Skip,
            dry_run: true,
            proxy: None,
        }
    }

    fn search_error(result: Result<Vec<Value>, ImportError>) -> SearchError {
        match result {
            Err(ImportError::Search { reason, .. }) => reason,
            other => panic!("expected a search error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_well_behaved_server_is_read_page_by_page() {
        let (url, requests) = pager(|start| page(250, (start + 1..=250).take(PAGE))).await;
        let records = read_records_within(&options(&url, false), &LIMITS).await.unwrap();
        assert_eq!(records.len(), 250);
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_redirect_is_refused_and_its_target_gets_nothing() {
        let target_hits = Arc::new(AtomicUsize::new(0));
        let counted = target_hits.clone();
        let target = serve(Router::new().fallback(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { axum::Json(page(0, std::iter::empty())) }
        }))
        .await;
        let location = format!("{target}/steal?secret=1");
        let source = serve(Router::new().fallback(move || {
            let location = location.clone();
            async move { (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response() }
        }))
        .await;
        for esb in [false, true] {
            let error = search_error(read_records_within(&options(&source, esb), &LIMITS).await);
            let text = error.to_string();
            assert!(
                matches!(&error, SearchError::Redirect { status, location: Some(l) }
                    if *status == StatusCode::TEMPORARY_REDIRECT && *l == target),
                "{text}"
            );
            assert!(text.contains("307") && !text.contains("steal"), "{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(target_hits.load(Ordering::SeqCst), 0, "nothing reached the redirect's target");
    }

    #[tokio::test]
    async fn an_answer_over_the_body_cap_is_refused() {
        let (url, _) = pager(|_| {
            let mut answer = page(1, 1..=1);
            answer["data"]["info"][0]["subscription_name"] = "x".repeat(LIMITS.body_cap).into();
            answer
        })
        .await;
        let error = search_error(read_records_within(&options(&url, false), &LIMITS).await);
        assert!(matches!(error, SearchError::TooLarge { cap } if cap == LIMITS.body_cap), "{error}");
    }

    #[tokio::test]
    async fn an_endless_pager_is_stopped() {
        // New records forever, always "one page more": stopped when the count passes the cap.
        let (url, requests) = pager(|start| page(start + PAGE as u64 + 1, (start + 1..).take(PAGE))).await;
        let error = search_error(read_records_within(&options(&url, false), &LIMITS).await);
        assert!(matches!(error, SearchError::CountAboveCap { count: 1_001, max: 1_000 }), "{error}");
        assert_eq!(requests.load(Ordering::SeqCst), 5);

        // More records on one page than the count and the cap allow.
        let (url, _) = pager(|_| page(1_000, 1..=1_001)).await;
        let error = search_error(read_records_within(&options(&url, false), &LIMITS).await);
        assert!(matches!(error, SearchError::RecordsAboveCap { max: 1_000 }), "{error}");

        // The same page whatever is asked for.
        let (url, requests) = pager(|_| page(1_000, 1..=PAGE as u64)).await;
        let error = search_error(read_records_within(&options(&url, false), &LIMITS).await);
        assert!(matches!(error, SearchError::Repeated { start: 200 }), "{error}");
        assert_eq!(requests.load(Ordering::SeqCst), 2);

        // One new record a page, always one more to come.
        let (url, requests) = pager(|start| page(start + 2, std::iter::once(start + 1))).await;
        let error = search_error(read_records_within(&options(&url, false), &LIMITS).await);
        assert!(matches!(error, SearchError::TooManyPages { max: 50 }), "{error}");
        assert_eq!(requests.load(Ordering::SeqCst), 50);

        // A count beyond the cap is refused at once.
        let (url, requests) = pager(|start| page(1_000_000, (start + 1..).take(PAGE))).await;
        let error = search_error(read_records_within(&options(&url, false), &LIMITS).await);
        assert!(matches!(error, SearchError::CountAboveCap { count: 1_000_000, max: 1_000 }), "{error}");
        assert_eq!(requests.load(Ordering::SeqCst), 1);
    }

    /// Reads one whole request (head, then a body of content-length bytes).
    async fn read_request(socket: &mut tokio::net::TcpStream) {
        use tokio::io::AsyncReadExt;
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let Ok(n @ 1..) = socket.read(&mut buffer).await else { return };
            request.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
            if let Some(head) = text.find("\r\n\r\n") {
                let length = text[..head]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|l| l.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if request.len() >= head + 4 + length {
                    return;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        use tokio::io::AsyncWriteExt;
        // Silent: accepts and holds every connection. Stalling: sends the head and a
        // first byte of the body, then nothing.
        for stalled_body in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((mut socket, _)) = listener.accept().await {
                    if stalled_body {
                        read_request(&mut socket).await;
                        let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{").await;
                    }
                    held.push(socket);
                }
            });
            let started = std::time::Instant::now();
            let error = search_error(read_records_within(&options(&url, false), &LIMITS).await);
            assert!(matches!(error, SearchError::Timeout { after, .. } if after == LIMITS.request_timeout), "{error}");
            assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        }
    }

    #[tokio::test]
    async fn only_an_explicit_proxy_is_used() {
        // The proxy answers the page itself; the event server's address is never dialled.
        let (proxy, proxied) = pager(|_| page(1, 1..=1)).await;
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", server.local_addr().unwrap());
        let dialled = Arc::new(AtomicUsize::new(0));
        let counted = dialled.clone();
        tokio::spawn(async move {
            while let Ok(_connection) = server.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let mut options = options(&url, false);
        options.proxy = Some(proxy);
        assert_eq!(read_records_within(&options, &LIMITS).await.unwrap().len(), 1);
        assert_eq!((proxied.load(Ordering::SeqCst), dialled.load(Ordering::SeqCst)), (1, 0));

        options.proxy = Some("not a url".into());
        let error = read_records_within(&options, &LIMITS).await.unwrap_err();
        assert!(matches!(error, ImportError::Proxy(_)), "{error}");
    }
}
