//! The status herald wants an EventSubscription to have, built from observation. Pure, so
//! that "nothing changed, write nothing" is a plain equality check.

use crate::conditions::set_condition;
use crate::crd::{EventSubscription, EventSubscriptionStatus, OPERATOR_ANNOTATION};
use crate::effective::Invalid;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

pub const CONDITION_READY: &str = "Ready";
pub const REASON_ACTIVE: &str = "Active";

pub fn ready_condition(verdict: &Result<(), Invalid>, generation: Option<i64>, now: jiff::Timestamp) -> Condition {
    let (status, reason, message) = match verdict {
        Ok(()) => ("True", REASON_ACTIVE, "the subscription receives matching events".to_string()),
        Err(invalid) => ("False", invalid.reason, invalid.message.clone()),
    };
    Condition {
        type_: CONDITION_READY.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// Who made the last spec change: the REST API's operator annotation, otherwise the
/// field manager whose managedFields entry touching `spec` is the most recent.
pub fn operator(sub: &EventSubscription) -> Option<String> {
    if let Some(op) = sub.annotations().get(OPERATOR_ANNOTATION).filter(|op| !op.is_empty()) {
        return Some(op.clone());
    }
    sub.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| entry.subresource.as_deref().unwrap_or_default().is_empty())
        .filter(|entry| entry.fields_v1.as_ref().is_some_and(|f| f.0.get("f:spec").is_some()))
        .max_by_key(|entry| entry.time.as_ref().map(|t| t.0))
        .and_then(|entry| entry.manager.clone())
}

/// The part of the status the controller owns (field manager `herald`); delivery owns
/// `statistics` and the `CallbackHealthy` condition under its own field manager, so
/// neither writer can roll back the other's fields.
#[derive(Clone, Debug, PartialEq)]
pub struct ControllerStatus {
    pub subscription_id: i64,
    pub observed_generation: Option<i64>,
    pub ready: Condition,
    pub operator: Option<String>,
    pub last_time: Option<String>,
}

impl ControllerStatus {
    /// What the object's status currently says about the controller's fields.
    pub fn current(sub: &EventSubscription) -> Option<Self> {
        let status = sub.status.as_ref()?;
        Some(ControllerStatus {
            subscription_id: status.subscription_id?,
            observed_generation: status.observed_generation,
            ready: status.conditions.iter().find(|c| c.type_ == CONDITION_READY)?.clone(),
            operator: status.operator.clone(),
            last_time: status.last_time.clone(),
        })
    }

    /// The server-side apply body's `status`.
    pub fn to_patch(&self) -> EventSubscriptionStatus {
        EventSubscriptionStatus {
            subscription_id: Some(self.subscription_id),
            observed_generation: self.observed_generation,
            conditions: vec![self.ready.clone()],
            operator: self.operator.clone(),
            last_time: self.last_time.clone(),
            statistics: None,
        }
    }
}

/// The desired controller status: `id` decided, Ready from `verdict`, `lastTime` moved
/// only when the spec's generation changed.
pub fn desired(
    sub: &EventSubscription,
    id: i64,
    verdict: &Result<(), Invalid>,
    now: jiff::Timestamp,
) -> ControllerStatus {
    let current = sub.status.clone().unwrap_or_default();
    let generation = sub.metadata.generation;
    let spec_unchanged = current.observed_generation.is_some() && current.observed_generation == generation;
    let last_time = match current.last_time {
        Some(t) if spec_unchanged => Some(t),
        _ => Some(now.to_string()),
    };
    let mut conditions = current.conditions;
    set_condition(&mut conditions, ready_condition(verdict, generation, now));
    let ready = conditions
        .into_iter()
        .find(|c| c.type_ == CONDITION_READY)
        .unwrap_or_else(|| ready_condition(verdict, generation, now));
    ControllerStatus { subscription_id: id, observed_generation: generation, ready, operator: operator(sub), last_time }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EventSubscriptionSpec;
    use crate::effective::Invalid;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).unwrap()
    }

    fn sub(generation: i64) -> EventSubscription {
        let mut s = EventSubscription::new("s", EventSubscriptionSpec::default());
        s.metadata.generation = Some(generation);
        s
    }

    fn entry(manager: &str, time: i64, spec: bool, subresource: Option<&str>) -> ManagedFieldsEntry {
        let fields = if spec { serde_json::json!({"f:spec": {}}) } else { serde_json::json!({"f:metadata": {}}) };
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            time: Some(Time(at(time))),
            fields_v1: Some(FieldsV1(fields)),
            subresource: subresource.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn first_status_carries_id_ready_and_times() {
        let status = desired(&sub(1), 7, &Ok(()), at(100));
        assert_eq!(status.subscription_id, 7);
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(status.last_time.as_deref(), Some("1970-01-01T00:01:40Z"));
        let ready = &status.ready;
        assert_eq!((ready.type_.as_str(), ready.status.as_str(), ready.reason.as_str()), ("Ready", "True", "Active"));
        assert_eq!(ready.observed_generation, Some(1));
    }

    #[test]
    fn unchanged_object_gives_identical_status_later() {
        let mut s = sub(1);
        s.status = Some(desired(&s, 7, &Ok(()), at(100)).to_patch());
        assert_eq!(Some(desired(&s, 7, &Ok(()), at(5000))), ControllerStatus::current(&s));
    }

    #[test]
    fn spec_change_moves_generation_and_last_time_but_not_transition_time() {
        let mut s = sub(1);
        s.status = Some(desired(&s, 7, &Ok(()), at(100)).to_patch());
        s.metadata.generation = Some(2);
        let next = desired(&s, 7, &Ok(()), at(200));
        assert_eq!(next.observed_generation, Some(2));
        assert_eq!(next.last_time.as_deref(), Some("1970-01-01T00:03:20Z"));
        assert_eq!(next.ready.last_transition_time, Time(at(100)));
        assert_eq!(next.ready.observed_generation, Some(2));
    }

    #[test]
    fn a_failed_check_flips_ready_with_its_reason() {
        let mut s = sub(1);
        s.status = Some(desired(&s, 7, &Ok(()), at(100)).to_patch());
        let invalid = Invalid { reason: "InvalidPattern", message: "bad".into() };
        let next = desired(&s, 7, &Err(invalid), at(200));
        let ready = &next.ready;
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str(), ready.message.as_str()),
            ("False", "InvalidPattern", "bad")
        );
        assert_eq!(ready.last_transition_time, Time(at(200)));
    }

    #[test]
    fn delivery_fields_are_not_the_controllers() {
        let mut s = sub(1);
        let mut status = desired(&s, 7, &Ok(()), at(100)).to_patch();
        status.statistics = Some(crate::crd::Statistics { total: 5, ..Default::default() });
        status.conditions.push(Condition {
            type_: "CallbackHealthy".into(),
            status: "True".into(),
            ..ready_condition(&Ok(()), Some(1), at(100))
        });
        s.status = Some(status);
        let patch = desired(&s, 7, &Ok(()), at(200)).to_patch();
        assert_eq!(patch.statistics, None);
        assert_eq!(patch.conditions.len(), 1);
        assert_eq!(Some(desired(&s, 7, &Ok(()), at(200))), ControllerStatus::current(&s));
    }

    #[test]
    fn operator_is_the_annotation_or_the_last_spec_writer() {
        let mut s = sub(1);
        s.metadata.managed_fields = Some(vec![
            entry("kubectl-client-side-apply", 10, true, None),
            entry("herald", 30, false, None),
            entry("herald", 40, true, Some("status")),
            entry("argocd", 20, true, None),
        ]);
        assert_eq!(operator(&s).as_deref(), Some("argocd"));
        s.metadata.annotations = Some([(OPERATOR_ANNOTATION.to_string(), "admin".to_string())].into());
        assert_eq!(operator(&s).as_deref(), Some("admin"));
    }
}
