//! Tenancy: which namespaces a cluster admin has granted what, per supplier account
//! (docs/design.md §7, docs/rbac.md). herald's own namespace holds every grant; any other
//! namespace holds a grant for an account only when its label or annotation lists it:
//!
//! - `herald.dev/supplier-accounts`: **receive**. Subscriptions there get the account's
//!   events.
//! - `herald.dev/publish-accounts`: **publish**. CmdbSources there may push changes into
//!   the account, reaching every subscription of it. Receiving never implies publishing:
//!   a team allowed to see an account's events must not be able to forge them for others.
//! - `herald.dev/import-accounts`: **import**. Subscriptions there may keep the id they
//!   had in the system they came from (`herald.dev/imported-id`), so nobody without this
//!   trust can pre-claim or exhaust the ids a migration will need.
//!
//! Namespaces are cluster-scoped objects: namespace `edit` and `admin` cannot change
//! their labels, so only whoever may patch Namespaces gives or takes a grant.
//!
//! Label values cannot hold commas, so a label lists accounts separated by `.`; the
//! annotation of the same key takes a comma list for account names that a label value
//! cannot carry. An account is granted when either lists it.

use crate::crd::{IMPORT_ACCOUNTS_LABEL, PUBLISH_ACCOUNTS_LABEL, SUPPLIER_ACCOUNTS_LABEL};
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{ObjectRef, Store};
use std::collections::BTreeMap;

/// What a namespace may do with an account's events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Subscriptions there receive the account's events.
    Receive,
    /// CmdbSources there publish into the account.
    Publish,
    /// Subscriptions there keep an imported id.
    Import,
}

impl Grant {
    /// The namespace label (and annotation) that lists the accounts granted.
    pub fn key(self) -> &'static str {
        match self {
            Grant::Receive => SUPPLIER_ACCOUNTS_LABEL,
            Grant::Publish => PUBLISH_ACCOUNTS_LABEL,
            Grant::Import => IMPORT_ACCOUNTS_LABEL,
        }
    }
}

/// The rule over the live Namespace cache, as the controller, the REST API, delivery and
/// the sources all apply it.
#[derive(Clone)]
pub struct Tenancy {
    namespaces: Store<Namespace>,
    herald_namespace: String,
    enforce: bool,
}

impl Tenancy {
    /// `enforce: false` (`controller.enforceTenancy`) grants everything everywhere.
    pub fn new(namespaces: Store<Namespace>, herald_namespace: String, enforce: bool) -> Self {
        Tenancy { namespaces, herald_namespace, enforce }
    }

    /// Whether subscriptions in `namespace` receive `account`'s events.
    pub fn allows(&self, account: &str, namespace: &str) -> bool {
        self.grants(Grant::Receive, account, namespace)
    }

    pub fn grants(&self, grant: Grant, account: &str, namespace: &str) -> bool {
        !self.enforce
            || namespace_grants(
                grant,
                account,
                namespace,
                &self.herald_namespace,
                self.namespaces.get(&ObjectRef::new(namespace)).as_deref(),
            )
    }
}

/// The accounts a namespace is granted `grant` for: its label (`.`-separated) and
/// annotation (comma-separated) of the grant's key.
pub fn granted_accounts(grant: Grant, namespace: &Namespace) -> impl Iterator<Item = &str> {
    let key = grant.key();
    listed(namespace.metadata.labels.as_ref(), key, '.').chain(listed(
        namespace.metadata.annotations.as_ref(),
        key,
        ',',
    ))
}

fn listed<'a>(map: Option<&'a BTreeMap<String, String>>, key: &str, separator: char) -> impl Iterator<Item = &'a str> {
    map.and_then(|m| m.get(key))
        .map(String::as_str)
        .unwrap_or_default()
        .split(separator)
        .map(str::trim)
        .filter(|account| !account.is_empty())
}

/// herald's own namespace holds every grant; any other must list the account.
pub fn namespace_grants(
    grant: Grant,
    account: &str,
    namespace: &str,
    herald_namespace: &str,
    labels: Option<&Namespace>,
) -> bool {
    namespace == herald_namespace || labels.is_some_and(|ns| granted_accounts(grant, ns).any(|a| a == account))
}

/// A Namespace "team" with the tenancy label and/or annotation (tests).
#[cfg(test)]
pub(crate) fn labelled_namespace(label: Option<&str>, annotation: Option<&str>) -> Namespace {
    use kube::api::ObjectMeta;
    let entry = |v: Option<&str>| v.map(|v| BTreeMap::from([(SUPPLIER_ACCOUNTS_LABEL.to_string(), v.to_string())]));
    Namespace {
        metadata: ObjectMeta {
            name: Some("team".into()),
            labels: entry(label),
            annotations: entry(annotation),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(label: Option<&str>, annotation: Option<&str>) -> Namespace {
        labelled_namespace(label, annotation)
    }

    #[test]
    fn tenancy_follows_the_namespace_label_and_annotation() {
        let receives =
            |account, ns: Option<&Namespace>| namespace_grants(Grant::Receive, account, "team", "herald-system", ns);
        assert!(namespace_grants(Grant::Receive, "0", "herald-system", "herald-system", None));
        assert!(!receives("0", None));
        assert!(!receives("0", Some(&namespace(None, None))));
        assert!(receives("7", Some(&namespace(Some("0.7"), None))));
        assert!(!receives("70", Some(&namespace(Some("0.7"), None))));
        assert!(receives("acme corp", Some(&namespace(None, Some("0, acme corp")))));
        assert!(!receives("acme", Some(&namespace(None, Some("0, acme corp")))));
    }

    #[test]
    fn receiving_an_account_grants_neither_publishing_nor_importing_it() {
        let team = namespace(Some("0"), None);
        assert!(namespace_grants(Grant::Receive, "0", "team", "herald-system", Some(&team)));
        for grant in [Grant::Publish, Grant::Import] {
            assert!(!namespace_grants(grant, "0", "team", "herald-system", Some(&team)), "{grant:?}");
            assert!(namespace_grants(grant, "0", "herald-system", "herald-system", None), "herald's own namespace");
        }
        let mut publisher = Namespace::default();
        publisher.metadata.labels = Some(BTreeMap::from([(PUBLISH_ACCOUNTS_LABEL.to_string(), "0.7".to_string())]));
        publisher.metadata.annotations =
            Some(BTreeMap::from([(IMPORT_ACCOUNTS_LABEL.to_string(), "acme corp".to_string())]));
        assert!(namespace_grants(Grant::Publish, "7", "team", "herald-system", Some(&publisher)));
        assert!(!namespace_grants(Grant::Receive, "7", "team", "herald-system", Some(&publisher)));
        assert!(namespace_grants(Grant::Import, "acme corp", "team", "herald-system", Some(&publisher)));
        assert!(!namespace_grants(Grant::Publish, "acme corp", "team", "herald-system", Some(&publisher)));
    }
}
