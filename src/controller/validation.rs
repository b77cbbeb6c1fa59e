//! Whether a subscription may receive events, beyond what the schema checks: its regex
//! compiles, its namespace is allowed for its supplier account (`crate::tenancy`,
//! docs/design.md §7), and no older subscription uses its (supplier account, name). Pure
//! functions over what the caches hold, so they are unit-tested without a cluster.

use crate::controller::ids::MAX_ID;
use crate::crd::{EventSubscription, IMPORT_ACCOUNTS_LABEL, IMPORTED_ID_ANNOTATION, SUPPLIER_ACCOUNTS_LABEL};
use crate::effective::{Effective, Invalid, name_key};
use kube::ResourceExt;

pub const REASON_DUPLICATE_NAME: &str = "DuplicateName";
pub const REASON_NAMESPACE_NOT_ALLOWED: &str = "NamespaceNotAllowed";
pub const REASON_IMPORTED_ID_TAKEN: &str = "ImportedIdTaken";
pub const REASON_IMPORT_NOT_ALLOWED: &str = "ImportNotAllowed";
pub const REASON_IMPORTED_ID_OUT_OF_RANGE: &str = "ImportedIdOutOfRange";
pub const REASON_ID_OUT_OF_RANGE: &str = "IdOutOfRange";

/// The id an imported subscription asks to keep (its `herald.dev/imported-id`), when it
/// is an integer; whether it is one herald may give is `import_refusal`'s to say.
pub fn imported_id(sub: &EventSubscription) -> Option<i64> {
    sub.annotations().get(IMPORTED_ID_ANNOTATION)?.trim().parse().ok()
}

/// Why an imported id is not honoured before any counter is read: the namespace is not
/// trusted to import for the account (`herald.dev/import-accounts`), or the id is above
/// the ceiling (`controller.maxImportedId`).
pub fn import_refusal(wanted: i64, trusted: bool, ceiling: i64, account: &str, namespace: &str) -> Option<Invalid> {
    if !trusted {
        return Some(Invalid {
            reason: REASON_IMPORT_NOT_ALLOWED,
            message: format!(
                "namespace {namespace} may not import ids for supplier account {account:?}: import into herald's namespace, or have a cluster admin add the account to the namespace label {IMPORT_ACCOUNTS_LABEL}; it receives nothing"
            ),
        });
    }
    (!(1..=ceiling.min(MAX_ID)).contains(&wanted)).then(|| Invalid {
        reason: REASON_IMPORTED_ID_OUT_OF_RANGE,
        message: format!(
            "the imported id {wanted} is outside 1 to controller.maxImportedId ({ceiling}); it receives nothing"
        ),
    })
}

/// Whether `sub` may receive under `id`. An id past `MAX_ID` (decided before ids were
/// bounded) never may. An imported subscription receives only under the id it came with
/// (its receivers key on `subscription_id`), and only while its import is allowed
/// (`refusal`), checked on every reconcile like every other grant: one that took its id
/// before the import grant existed, or after it was withdrawn, receives nothing.
pub fn check_imported_id(
    sub: &EventSubscription,
    id: i64,
    refusal: impl Fn(i64) -> Option<Invalid>,
) -> Result<(), Invalid> {
    if id > MAX_ID {
        return Err(Invalid {
            reason: REASON_ID_OUT_OF_RANGE,
            message: format!(
                "id {id} is past {MAX_ID}, the largest a JSON client reads exactly; delete this subscription (docs/migration.md)"
            ),
        });
    }
    let Some(wanted) = imported_id(sub) else { return Ok(()) };
    if let Some(refused) = refusal(wanted) {
        return Err(refused);
    }
    if wanted != id {
        return Err(Invalid {
            reason: REASON_IMPORTED_ID_TAKEN,
            message: format!(
                "the imported id {wanted} was not free when this subscription's id was decided (herald had handed it out, or imported it for another subscription), or the annotation was added later; it has id {id} and receives nothing"
            ),
        });
    }
    Ok(())
}

/// Order of age: the older subscription keeps a contested name. Ties on the
/// (second-granular) creation time are broken by namespace and name, so every herald
/// instance decides the same way.
pub fn age_order(a: &EventSubscription, b: &EventSubscription) -> std::cmp::Ordering {
    fn key(s: &EventSubscription) -> (Option<jiff::Timestamp>, Option<&str>, Option<&str>) {
        let meta = &s.metadata;
        (meta.creation_timestamp.as_ref().map(|t| t.0), meta.namespace.as_deref(), meta.name.as_deref())
    }
    key(a).cmp(&key(b))
}

/// The older live subscription that holds `effective`'s name, if any. Only a
/// subscription in a namespace allowed for the account holds a name: otherwise anyone
/// could squat another account's names from their own namespace.
pub fn older_holder<'a>(
    sub: &EventSubscription,
    effective: &Effective,
    others: impl IntoIterator<Item = &'a EventSubscription>,
    allowed: impl Fn(&str, &str) -> bool,
) -> Option<&'a EventSubscription> {
    let key = effective.name_key();
    others
        .into_iter()
        .filter(|other| name_key(&other.spec) == key)
        .filter(|other| other.metadata.uid != sub.metadata.uid && other.metadata.deletion_timestamp.is_none())
        .filter(|other| age_order(other, sub).is_lt())
        .filter(|other| allowed(key.0, other.metadata.namespace.as_deref().unwrap_or_default()))
        .min_by(|a, b| age_order(a, b))
}

/// The first reason, in order of checks, that keeps `sub` from receiving events.
/// `allowed(account, namespace)` is the tenancy rule.
pub fn check<'a>(
    sub: &EventSubscription,
    effective: &Effective,
    others: impl IntoIterator<Item = &'a EventSubscription>,
    herald_namespace: &str,
    allowed: impl Fn(&str, &str) -> bool,
) -> Result<(), Invalid> {
    effective.validate()?;
    let ns = sub.namespace().unwrap_or_default();
    if !allowed(&effective.supplier_account, &ns) {
        return Err(Invalid {
            reason: REASON_NAMESPACE_NOT_ALLOWED,
            message: format!(
                "namespace {ns} is not allowed for supplier account {:?}: use namespace {herald_namespace} or have a cluster admin add the account to the namespace label {SUPPLIER_ACCOUNTS_LABEL}",
                effective.supplier_account
            ),
        });
    }
    if let Some(holder) = older_holder(sub, effective, others, allowed) {
        return Err(Invalid {
            reason: REASON_DUPLICATE_NAME,
            message: format!(
                "subscription name {:?} of supplier account {:?} is already used by {}/{}",
                effective.subscription_name,
                effective.supplier_account,
                holder.namespace().unwrap_or_default(),
                holder.name_any()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EventSubscriptionSpec;
    use crate::tenancy::{Grant, namespace_grants};
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn an_id_decided_before_the_bounds_is_refused_on_every_reconcile() {
        let mut imported = sub("team-a", "forged", "u1", 1, None, "forged");
        imported.metadata.annotations =
            Some([(IMPORTED_ID_ANNOTATION.to_string(), "5000".to_string())].into_iter().collect());
        let untrusted = |wanted| import_refusal(wanted, false, 1_000_000, "0", "team-a");
        let refused = check_imported_id(&imported, 5000, untrusted).expect_err("its import was never allowed");
        assert_eq!(refused.reason, REASON_IMPORT_NOT_ALLOWED, "although it holds the id it asked for");
        assert!(check_imported_id(&imported, 5000, |_| None).is_ok(), "allowed: it receives");
        let plain = sub("team-a", "plain", "u2", 1, None, "plain");
        let past = check_imported_id(&plain, MAX_ID + 1, |_| None).expect_err("past MAX_ID");
        assert_eq!(past.reason, REASON_ID_OUT_OF_RANGE);
        assert!(check_imported_id(&plain, MAX_ID, |_| None).is_ok());
    }

    #[test]
    fn an_imported_id_is_honoured_only_where_trusted_and_within_the_ceiling() {
        assert!(import_refusal(5000, true, 1_000_000, "0", "herald-system").is_none());
        let untrusted = import_refusal(5000, false, 1_000_000, "0", "team-a").expect("refused");
        assert_eq!(untrusted.reason, REASON_IMPORT_NOT_ALLOWED);
        assert!(untrusted.message.contains("herald.dev/import-accounts"), "{}", untrusted.message);
        for wanted in [1_000_001, 9_007_199_254_740_992, 0, -3] {
            let refused = import_refusal(wanted, true, 1_000_000, "0", "herald-system").expect("refused");
            assert_eq!(refused.reason, REASON_IMPORTED_ID_OUT_OF_RANGE, "{wanted}");
        }
        assert!(import_refusal(MAX_ID, true, i64::MAX, "0", "herald-system").is_none(), "the ceiling stops at MAX_ID");
        assert!(import_refusal(MAX_ID + 1, true, i64::MAX, "0", "herald-system").is_some());
    }

    fn sub(ns: &str, name: &str, uid: &str, created: i64, account: Option<&str>, sub_name: &str) -> EventSubscription {
        let mut s = EventSubscription::new(
            name,
            EventSubscriptionSpec {
                supplier_account: account.map(Into::into),
                subscription_name: sub_name.into(),
                callback_url: "http://127.0.0.1/cb".into(),
                events: vec!["hostcreate".into()],
                ..Default::default()
            },
        );
        s.metadata.namespace = Some(ns.into());
        s.metadata.uid = Some(uid.into());
        s.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(created).unwrap()));
        s
    }

    fn namespace(label: Option<&str>, annotation: Option<&str>) -> Namespace {
        crate::tenancy::labelled_namespace(label, annotation)
    }

    fn anywhere(_: &str, _: &str) -> bool {
        true
    }

    #[test]
    fn a_subscription_outside_its_allowed_namespaces_holds_no_name() {
        let squatter = sub("other", "squat", "u1", 100, None, "hosts");
        let owner = sub("herald-system", "real", "u2", 200, None, "hosts");
        let only_herald_ns = |_: &str, ns: &str| ns == "herald-system";
        let eff = Effective::from_spec(&owner.spec);
        assert_eq!(check(&owner, &eff, [&squatter], "herald-system", only_herald_ns), Ok(()));
        assert!(older_holder(&owner, &eff, [&squatter], anywhere).is_some());
    }

    #[test]
    fn the_older_subscription_keeps_the_name() {
        let old = sub("a", "old", "u1", 100, None, "hosts");
        let new = sub("b", "new", "u2", 200, Some("0"), " hosts");
        let other_account = sub("c", "x", "u3", 50, Some("9"), "hosts");
        let all = [old.clone(), new.clone(), other_account];
        let eff_new = Effective::from_spec(&new.spec);
        let err = check(&new, &eff_new, &all, "a", anywhere).unwrap_err();
        assert_eq!(err.reason, REASON_DUPLICATE_NAME);
        assert!(err.message.contains("a/old"), "{}", err.message);
        let eff_old = Effective::from_spec(&old.spec);
        assert_eq!(check(&old, &eff_old, &all, "a", anywhere), Ok(()));
    }

    #[test]
    fn same_second_ties_break_by_namespace_and_name() {
        let a = sub("ns", "a", "u1", 100, None, "hosts");
        let b = sub("ns", "b", "u2", 100, None, "hosts");
        let all = [a.clone(), b.clone()];
        assert!(older_holder(&a, &Effective::from_spec(&a.spec), &all, anywhere).is_none());
        assert_eq!(
            older_holder(&b, &Effective::from_spec(&b.spec), &all, anywhere).map(kube::ResourceExt::name_any),
            Some("a".into())
        );
    }

    #[test]
    fn a_subscription_being_deleted_frees_its_name() {
        let mut old = sub("ns", "old", "u1", 100, None, "hosts");
        old.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::from_second(300).unwrap()));
        let new = sub("ns", "new", "u2", 200, None, "hosts");
        assert!(older_holder(&new, &Effective::from_spec(&new.spec), [&old], anywhere).is_none());
    }

    #[test]
    fn namespace_check_comes_before_the_name_check() {
        let s = sub("team", "s", "u1", 100, Some("5"), "hosts");
        let ns = namespace(Some("0"), None);
        let allowed = |account: &str, namespace: &str| {
            namespace_grants(Grant::Receive, account, namespace, "herald-system", Some(&ns))
        };
        let err = check(&s, &Effective::from_spec(&s.spec), [], "herald-system", allowed).unwrap_err();
        assert_eq!(err.reason, REASON_NAMESPACE_NOT_ALLOWED);
    }
}
