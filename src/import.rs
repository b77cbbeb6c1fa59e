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

use crate::compat::input::parse_subscription;
// Read as the controller reads it, so import and controller agree on which id is asked for.
use crate::controller::validation::imported_id;
use crate::crd::{
    EventSubscription, EventSubscriptionSpec, IMPORTED_ID_ANNOTATION, IMPORTED_STATISTICS_ANNOTATION,
    OPERATOR_ANNOTATION, apply_body,
};
use crate::effective::{DEFAULT_SUPPLIER_ACCOUNT, name_key};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

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
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading {path}: {source}")]
    ReadFile { path: String, source: std::io::Error },
    #[error("{what} is not a list of subscription records: {reason}")]
    Records { what: String, reason: String },
    #[error("searching {url} for account {account}: {reason}")]
    Search { url: String, account: String, reason: String },
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("listing EventSubscriptions: {0}")]
    List(#[source] kube::Error),
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
            let http = reqwest::Client::new();
            let mut records = Vec::new();
            for account in &options.accounts {
                records.extend(search_account(&http, source, account).await?);
            }
            records
        }
    };
    Ok(records)
}

/// Every record of `account`, page by page, in id order.
async fn search_account(http: &reqwest::Client, source: &ApiSource, account: &str) -> Result<Vec<Value>, ImportError> {
    let mut records = Vec::new();
    loop {
        let page = json!({ "start": records.len(), "limit": PAGE, "sort": "subscription_id" });
        let (url, request) = match source {
            ApiSource::Direct { url, user, token } => {
                let endpoint = format!("{}/api/v3/event/subscribe/search/{account}/0", url.trim_end_matches('/'));
                let mut request = http
                    .post(&endpoint)
                    .header("BK_User", user)
                    .header("HTTP_BLUEKING_SUPPLIER_ID", account)
                    .json(&json!({ "page": page }));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                (endpoint, request)
            }
            ApiSource::Esb { url, app_code, app_secret, user } => {
                let endpoint = format!("{}/api/c/compapi/v2/cc/search_subscription/", url.trim_end_matches('/'));
                let credentials =
                    json!({ "bk_app_code": app_code, "bk_app_secret": app_secret, "bk_username": user }).to_string();
                let body = json!({ "bk_supplier_account": account, "page": page });
                (endpoint.clone(), http.post(&endpoint).header("X-Bkapi-Authorization", credentials).json(&body))
            }
        };
        let failed = |reason: String| ImportError::Search { url: url.clone(), account: account.to_string(), reason };
        let answer: Value = request
            .send()
            .await
            .map_err(|e| failed(crate::outbound::describe(&e)))?
            .json()
            .await
            .map_err(|e| failed(format!("not a JSON answer: {e}")))?;
        if answer["result"] != true {
            let message = answer["bk_error_msg"].as_str().or(answer["message"].as_str()).unwrap_or_default();
            return Err(failed(format!(
                "{} {message}",
                answer["bk_error_code"].as_i64().or(answer["code"].as_i64()).unwrap_or(-1)
            )));
        }
        let count = usize::try_from(answer["data"]["count"].as_u64().unwrap_or(0)).unwrap_or(usize::MAX);
        let info = answer["data"]["info"].as_array().cloned().unwrap_or_default();
        let got = info.len();
        records.extend(info);
        if got == 0 || records.len() >= count {
            return Ok(records);
        }
    }
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
