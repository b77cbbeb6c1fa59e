//! Tenancy: which namespaces may hold subscriptions that receive a supplier account's
//! events (docs/design.md §7). herald's own namespace serves every account; any other
//! must list the account in its `herald.dev/supplier-accounts` label or annotation.
//!
//! Label values cannot hold commas, so the label lists accounts separated by `.`; the
//! annotation of the same key takes a comma list for account names that a label value
//! cannot carry. An account is allowed when either lists it.

use crate::crd::SUPPLIER_ACCOUNTS_LABEL;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{ObjectRef, Store};
use std::collections::BTreeMap;

/// The rule over the live Namespace cache, as the controller, the REST API and delivery
/// all apply it.
#[derive(Clone)]
pub struct Tenancy {
    namespaces: Store<Namespace>,
    herald_namespace: String,
    enforce: bool,
}

impl Tenancy {
    /// `enforce: false` (`controller.enforceTenancy`) allows every namespace.
    pub fn new(namespaces: Store<Namespace>, herald_namespace: String, enforce: bool) -> Self {
        Tenancy { namespaces, herald_namespace, enforce }
    }

    pub fn allows(&self, account: &str, namespace: &str) -> bool {
        !self.enforce
            || namespace_allows(
                account,
                namespace,
                &self.herald_namespace,
                self.namespaces.get(&ObjectRef::new(namespace)).as_deref(),
            )
    }
}

/// The accounts a namespace allows: its `herald.dev/supplier-accounts` label
/// (`.`-separated) and annotation (comma-separated).
pub fn allowed_accounts(namespace: &Namespace) -> impl Iterator<Item = &str> {
    listed(namespace.metadata.labels.as_ref(), '.').chain(listed(namespace.metadata.annotations.as_ref(), ','))
}

fn listed(map: Option<&BTreeMap<String, String>>, separator: char) -> impl Iterator<Item = &str> {
    map.and_then(|m| m.get(SUPPLIER_ACCOUNTS_LABEL))
        .map(String::as_str)
        .unwrap_or_default()
        .split(separator)
        .map(str::trim)
        .filter(|account| !account.is_empty())
}

/// herald's own namespace serves every account; any other must list the account.
pub fn namespace_allows(account: &str, namespace: &str, herald_namespace: &str, labels: Option<&Namespace>) -> bool {
    namespace == herald_namespace || labels.is_some_and(|ns| allowed_accounts(ns).any(|a| a == account))
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
        assert!(namespace_allows("0", "herald-system", "herald-system", None));
        assert!(!namespace_allows("0", "team", "herald-system", None));
        assert!(!namespace_allows("0", "team", "herald-system", Some(&namespace(None, None))));
        assert!(namespace_allows("7", "team", "herald-system", Some(&namespace(Some("0.7"), None))));
        assert!(!namespace_allows("70", "team", "herald-system", Some(&namespace(Some("0.7"), None))));
        assert!(namespace_allows("acme corp", "team", "herald-system", Some(&namespace(None, Some("0, acme corp")))));
        assert!(!namespace_allows("acme", "team", "herald-system", Some(&namespace(None, Some("0, acme corp")))));
    }
}
