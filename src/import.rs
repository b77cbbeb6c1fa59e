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
use crate::crd::{
    EventSubscription, IMPORTED_ID_ANNOTATION, IMPORTED_STATISTICS_ANNOTATION, OPERATOR_ANNOTATION, apply_body,
};
use crate::effective::{DEFAULT_SUPPLIER_ACCOUNT, name_key};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// Field manager of the objects `herald import` writes.
pub const FIELD_MANAGER: &str = "herald-import";
/// Page size of `search_subscription` requests (ESB caps pages at 200).
const PAGE: usize = 200;

/// Where the records come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// `POST {url}/api/v3/event/subscribe/search/{account}/0`, with `BK_User` and the
    /// owner header, and a bearer token when given (a herald source needs one).
    Direct { url: String, user: String, token: Option<String> },
    /// `POST {url}/api/c/compapi/v2/cc/search_subscription/` with app credentials.
    Esb { url: String, app_code: String, app_secret: String, user: String },
    /// A JSON array of records (or `{"info": [...]}`, as search answers).
    File(PathBuf),
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
        source => {
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
async fn search_account(http: &reqwest::Client, source: &Source, account: &str) -> Result<Vec<Value>, ImportError> {
    let mut records = Vec::new();
    loop {
        let page = json!({ "start": records.len(), "limit": PAGE, "sort": "subscription_id" });
        let (url, request) = match source {
            Source::Direct { url, user, token } => {
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
            Source::Esb { url, app_code, app_secret, user } => {
                let endpoint = format!("{}/api/c/compapi/v2/cc/search_subscription/", url.trim_end_matches('/'));
                let credentials =
                    json!({ "bk_app_code": app_code, "bk_app_secret": app_secret, "bk_username": user }).to_string();
                let body = json!({ "bk_supplier_account": account, "page": page });
                (endpoint.clone(), http.post(&endpoint).header("X-Bkapi-Authorization", credentials).json(&body))
            }
            Source::File(_) => return Ok(records),
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
    let mut summary = Summary::default();
    let mut seen_ids: HashMap<i64, usize> = HashMap::new();
    let mut seen_names: HashMap<(String, String), i64> = HashMap::new();
    for record in records {
        let id = record["subscription_id"].as_i64().unwrap_or(0);
        let account = record["bk_supplier_account"]
            .as_str()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .unwrap_or(DEFAULT_SUPPLIER_ACCOUNT)
            .to_string();
        let name = record["subscription_name"].as_str().unwrap_or_default().trim().to_string();
        let namespace = options.account_namespaces.get(&account).unwrap_or(&options.namespace).clone();
        let object = object_name(id);
        let target = format!("{namespace}/{object}");
        let action =
            decide(&record, id, &account, &name, &namespace, &object, &existing, options, &seen_ids, &seen_names);
        let mut row = Row { id, account: account.clone(), name: name.clone(), target, action };
        if !matches!(row.action, Action::Refused(_)) {
            seen_ids.insert(id, summary.rows.len());
            seen_names.insert((account.clone(), name.clone()), id);
        }
        if matches!(row.action, Action::Created | Action::Updated)
            && !options.dry_run
            && let Err(error) = apply(client, &namespace, &object, id, &account, &record).await
        {
            row.action = Action::Refused(error);
        }
        summary.rows.push(row);
    }
    Ok(summary)
}

#[allow(clippy::too_many_arguments)] // one decision over one record and what is around it
fn decide(
    record: &Value,
    id: i64,
    account: &str,
    name: &str,
    namespace: &str,
    object: &str,
    existing: &[EventSubscription],
    options: &ImportOptions,
    seen_ids: &HashMap<i64, usize>,
    seen_names: &HashMap<(String, String), i64>,
) -> Action {
    if !(1..=crate::controller::ids::MAX_ID).contains(&id) {
        return Action::Refused("no subscription_id between 1 and 2^53".into());
    }
    if seen_ids.contains_key(&id) {
        return Action::Refused(format!("id {id} appears twice in the source"));
    }
    if let Some(other) = seen_names.get(&(account.to_string(), name.to_string())) {
        return Action::Refused(format!("name {name:?} of account {account:?} is also record {other}'s"));
    }
    if let Err(error) = spec_of(record, account) {
        return Action::Refused(error);
    }
    let ours = |s: &EventSubscription| {
        s.namespace().as_deref() == Some(namespace)
            && s.name_any() == object
            && s.annotations().get(IMPORTED_ID_ANNOTATION) == Some(&id.to_string())
    };
    let live = existing.iter().filter(|s| s.metadata.deletion_timestamp.is_none());
    for other in live.clone().filter(|s| !ours(s)) {
        let held = other.status.as_ref().and_then(|st| st.subscription_id) == Some(id)
            || other.annotations().get(IMPORTED_ID_ANNOTATION) == Some(&id.to_string());
        if held {
            return Action::Refused(format!(
                "id {id} is held by {}/{}",
                other.namespace().unwrap_or_default(),
                other.name_any()
            ));
        }
        if name_key(&other.spec) == (account, name) {
            return Action::Refused(format!(
                "name {name:?} of account {account:?} is used by {}/{}",
                other.namespace().unwrap_or_default(),
                other.name_any()
            ));
        }
        if other.namespace().as_deref() == Some(namespace) && other.name_any() == object {
            return Action::Refused(format!("{namespace}/{object} exists and is not this record's"));
        }
    }
    match (live.clone().any(ours), options.existing) {
        (false, _) => Action::Created,
        (true, Existing::Skip) => Action::Skipped("imported before".into()),
        (true, Existing::Update) => Action::Updated,
    }
}

/// The spec a record maps to, exactly as the REST API maps a create.
fn spec_of(record: &Value, account: &str) -> Result<crate::crd::EventSubscriptionSpec, String> {
    let biz = record["bk_biz_id"].as_i64().unwrap_or(0);
    let body = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    parse_subscription(&body, account, biz).map(|input| input.to_spec()).map_err(|e| e.to_string())
}

async fn apply(
    client: &kube::Client,
    namespace: &str,
    object: &str,
    id: i64,
    account: &str,
    record: &Value,
) -> Result<(), String> {
    let spec = spec_of(record, account)?;
    let statistics = json!({
        "total": record["statistics"]["total"].as_i64().unwrap_or(0),
        "failure": record["statistics"]["failure"].as_i64().unwrap_or(0),
    });
    let mut annotations = serde_json::Map::new();
    annotations.insert(IMPORTED_ID_ANNOTATION.into(), id.to_string().into());
    annotations.insert(IMPORTED_STATISTICS_ANNOTATION.into(), statistics.to_string().into());
    if let Some(operator) = record["operator"].as_str().filter(|o| !o.is_empty()) {
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
