//! What each watch reports (`Health`) and the CmdbSource status built from it: per-resource
//! positions and the `Ready`, `Connected` and `CursorExpired` conditions, written by
//! server-side apply only when changed, within the shared status write budget.

use crate::conditions::set_condition;
use crate::crd::{CmdbSource, CmdbSourceStatus, ResourceStatus, WatchResource, apply_body_of};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{Resource, ResourceExt};

pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_CONNECTED: &str = "Connected";
pub const CONDITION_CURSOR_EXPIRED: &str = "CursorExpired";

/// Why a source or one of its watches is not working: a condition reason and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Problem { reason, message: message.into() }
    }
}

/// One watch's state, written by its loop and read by the status writer.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub cursor: Option<String>,
    pub last_event_at: Option<jiff::Timestamp>,
    pub events_read: i64,
    /// Since when herald has been behind the end of the stream (None: caught up).
    pub behind_since: Option<jiff::Timestamp>,
    /// Whether bk-cmdb answered the last request; None before the first.
    pub connected: Option<bool>,
    /// Why the last request failed, for `Connected`.
    pub unreachable: Option<String>,
    /// What keeps this watch from working until something changes (`Ready=False`).
    pub problem: Option<Problem>,
    /// The last gap: bk-cmdb lost the cursor (`CursorExpired`).
    pub gap: Option<String>,
    /// Watch events this process skipped because they can never be pushed, and the last.
    pub events_skipped: i64,
    pub last_skipped: Option<String>,
}

/// The status a source should show. `refusal` keeps the whole source from running.
pub fn desired_status(
    source: &CmdbSource,
    refusal: Option<&Problem>,
    watches: &[(WatchResource, Health)],
    at: jiff::Timestamp,
) -> CmdbSourceStatus {
    let generation = source.meta().generation;
    let current = source.status.clone().unwrap_or_default();
    let condition = |type_: &str, status: bool, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(at),
    };
    let mut conditions = current.conditions.clone();
    let problem = refusal.cloned().or_else(|| {
        watches.iter().find_map(|(resource, health)| {
            health.problem.as_ref().map(|p| Problem::new(p.reason, format!("{}: {}", name(*resource), p.message)))
        })
    });
    let ready = match &problem {
        Some(problem) => condition(CONDITION_READY, false, problem.reason, problem.message.clone()),
        None if watches.iter().all(|(_, h)| h.cursor.is_some()) => {
            condition(CONDITION_READY, true, "Watching", "every resource is being read".into())
        }
        // Still reading its positions: a Ready of this generation stays as it is, so that a
        // restart of herald does not flap it.
        None => match current.conditions.iter().find(|c| c.type_ == CONDITION_READY) {
            Some(shown)
                if shown.observed_generation == generation
                    && (shown.reason == "Watching" || shown.reason == "Starting") =>
            {
                shown.clone()
            }
            _ => condition(CONDITION_READY, false, "Starting", "finding where to start in bk-cmdb's watch".into()),
        },
    };
    set_condition(&mut conditions, ready);
    if refusal.is_none() {
        let down = watches.iter().find(|(_, h)| h.connected == Some(false));
        let connected = match down {
            Some((resource, health)) => Some(condition(
                CONDITION_CONNECTED,
                false,
                "Unreachable",
                format!("{}: {}", name(*resource), health.unreachable.clone().unwrap_or_default()),
            )),
            None if watches.iter().any(|(_, h)| h.connected == Some(true)) => {
                Some(condition(CONDITION_CONNECTED, true, "Answering", "bk-cmdb answers the watch".into()))
            }
            None => None,
        };
        if let Some(connected) = connected {
            set_condition(&mut conditions, connected);
        }
        let gaps: Vec<String> =
            watches.iter().filter_map(|(r, h)| h.gap.as_ref().map(|g| format!("{}: {g}", name(*r)))).collect();
        let expired = if gaps.is_empty() {
            condition(CONDITION_CURSOR_EXPIRED, false, "NoGap", "herald has read every change since it started".into())
        } else {
            condition(CONDITION_CURSOR_EXPIRED, true, "CursorExpired", gaps.join("; "))
        };
        set_condition(&mut conditions, expired);
    }
    let resources = watches
        .iter()
        .map(|(resource, health)| ResourceStatus {
            resource: *resource,
            cursor: health.cursor.clone(),
            last_event_time: health.last_event_at.map(|t| t.to_string()),
            events_read: health.events_read,
            events_skipped: health.events_skipped,
            last_skipped: health.last_skipped.clone(),
            lag_seconds: health.behind_since.map(|since| (at - since).get_seconds().max(0)).unwrap_or(0),
        })
        .collect();
    CmdbSourceStatus { observed_generation: generation, conditions, resources }
}

fn name(resource: WatchResource) -> &'static str {
    super::convert::resource_name(resource)
}

/// The status apply body, or None when the object already shows `desired`.
pub fn status_patch(source: &CmdbSource, desired: &CmdbSourceStatus) -> Option<serde_json::Value> {
    if source.status.as_ref() == Some(desired) {
        return None;
    }
    let mut body = apply_body_of::<CmdbSource>(&source.name_any(), serde_json::json!({}));
    body["status"] = serde_json::to_value(desired).ok()?;
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::CmdbSourceSpec;

    fn source() -> CmdbSource {
        let mut source = CmdbSource::new("cmdb", CmdbSourceSpec::default());
        source.metadata.generation = Some(3);
        source
    }

    #[test]
    fn conditions_follow_the_watches_and_an_unchanged_status_is_not_written() {
        let at = jiff::Timestamp::from_second(1_000).unwrap();
        let healthy = Health { cursor: Some("c".into()), connected: Some(true), events_read: 5, ..Default::default() };
        let status = desired_status(&source(), None, &[(WatchResource::Host, healthy.clone())], at);
        let find = |s: &CmdbSourceStatus, t: &str| s.conditions.iter().find(|c| c.type_ == t).cloned().unwrap();
        assert_eq!(find(&status, CONDITION_READY).status, "True");
        assert_eq!(find(&status, CONDITION_READY).observed_generation, Some(3));
        assert_eq!(find(&status, CONDITION_CONNECTED).status, "True");
        assert_eq!(find(&status, CONDITION_CURSOR_EXPIRED).status, "False");
        assert_eq!(status.resources[0].events_read, 5);

        let mut shown = source();
        shown.status = Some(status.clone());
        let later = jiff::Timestamp::from_second(2_000).unwrap();
        let again = desired_status(&shown, None, &[(WatchResource::Host, healthy.clone())], later);
        assert!(status_patch(&shown, &again).is_none(), "unchanged: no write, transition times kept");

        let down = Health { connected: Some(false), unreachable: Some("connect refused".into()), ..healthy.clone() };
        let gap = Health { gap: Some("up to 3h of changes may be missing".into()), ..healthy };
        let status = desired_status(&shown, None, &[(WatchResource::Host, down), (WatchResource::Set, gap)], later);
        assert_eq!(find(&status, CONDITION_CONNECTED).status, "False");
        assert!(find(&status, CONDITION_CONNECTED).message.contains("host: connect refused"));
        assert_eq!(find(&status, CONDITION_CURSOR_EXPIRED).status, "True");
        assert!(find(&status, CONDITION_CURSOR_EXPIRED).message.starts_with("set: up to 3h"));

        let refused = Problem::new("AccountNotAllowed", "namespace team may not publish account 0");
        let status = desired_status(&source(), Some(&refused), &[], at);
        assert_eq!(find(&status, CONDITION_READY).reason, "AccountNotAllowed");
    }
}
