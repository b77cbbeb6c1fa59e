//! The effective view of a subscription: the user's spec with bk-cmdb's normalisation and
//! herald's defaults applied. The stored object is never rewritten; every consumer
//! (controller, REST API, delivery) reads subscriptions through this view.

use crate::crd::{ConfirmMode, EventSubscriptionSpec};
use std::time::Duration;

pub const DEFAULT_SUPPLIER_ACCOUNT: &str = "0";
pub const DEFAULT_HTTPSTATUS_PATTERN: &str = "200";
pub const DEFAULT_TIMEOUT_SECONDS: i64 = 10;
pub const MAX_TIMEOUT_SECONDS: i64 = 300;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
pub const DEFAULT_INITIAL_BACKOFF_SECONDS: u64 = 1;
pub const DEFAULT_MAX_BACKOFF_SECONDS: u64 = 300;
pub const DEFAULT_JITTER_PERCENT: u32 = 20;

/// A subscription as herald acts on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    pub supplier_account: String,
    pub biz_id: i64,
    pub subscription_name: String,
    pub system_name: String,
    pub callback_url: String,
    /// `callback_url` parsed once: every attempt posts to it (parsing it, host and IDNA
    /// processing included, per attempt was an eighth of herald's work at a fan-out of
    /// 1,000). `None` when it does not parse, which the schema's pattern should prevent.
    pub callback: Option<reqwest::Url>,
    pub confirm_mode: ConfirmMode,
    pub confirm_pattern: String,
    /// Trimmed, de-duplicated, sorted.
    pub events: Vec<String>,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub max_in_flight: u32,
    pub paused: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub jitter_percent: u32,
}

/// Why a subscription that passed schema validation still cannot receive events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// CamelCase reason for the `Ready=False` condition and the Warning Event.
    pub reason: &'static str,
    pub message: String,
}

pub const REASON_INVALID_PATTERN: &str = "InvalidPattern";

/// Trims names, drops empty ones, de-duplicates and sorts, as bk-cmdb does with
/// `subscription_form`.
pub fn normalise_events<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut events: Vec<String> = names
        .into_iter()
        .map(|name| name.chars().filter(|c| !c.is_whitespace()).collect::<String>())
        .filter(|name| !name.is_empty())
        .collect();
    events.sort();
    events.dedup();
    events
}

impl Effective {
    pub fn from_spec(spec: &EventSubscriptionSpec) -> Self {
        let confirm = spec.confirm.clone().unwrap_or_default();
        let confirm_mode = confirm.mode.unwrap_or_default();
        let pattern = confirm.pattern.unwrap_or_default();
        let confirm_pattern = match confirm_mode {
            ConfirmMode::Httpstatus if pattern.trim().is_empty() => DEFAULT_HTTPSTATUS_PATTERN.to_string(),
            ConfirmMode::Httpstatus => pattern.trim().to_string(),
            ConfirmMode::Regular => pattern,
        };
        let retry = spec.retry.clone().unwrap_or_default();
        let timeout_seconds = match spec.timeout_seconds {
            Some(t) if t > 0 => t.min(MAX_TIMEOUT_SECONDS),
            _ => DEFAULT_TIMEOUT_SECONDS,
        };
        Effective {
            supplier_account: name_key(spec).0.to_string(),
            biz_id: spec.biz_id.unwrap_or(0).max(0),
            subscription_name: name_key(spec).1.to_string(),
            system_name: spec.system_name.clone().unwrap_or_default(),
            callback_url: spec.callback_url.trim().to_string(),
            callback: reqwest::Url::parse(spec.callback_url.trim()).ok(),
            confirm_mode,
            confirm_pattern,
            events: normalise_events(spec.events.iter().map(String::as_str)),
            timeout: Duration::from_secs(timeout_seconds.unsigned_abs()),
            retry: RetryPolicy {
                max_attempts: positive_or(retry.max_attempts, DEFAULT_MAX_ATTEMPTS),
                initial_backoff: Duration::from_secs(positive_or(
                    retry.initial_backoff_seconds,
                    DEFAULT_INITIAL_BACKOFF_SECONDS,
                )),
                max_backoff: Duration::from_secs(positive_or(retry.max_backoff_seconds, DEFAULT_MAX_BACKOFF_SECONDS)),
                jitter_percent: retry
                    .jitter_percent
                    .and_then(|j| u32::try_from(j).ok())
                    .unwrap_or(DEFAULT_JITTER_PERCENT)
                    .min(100),
            },
            max_in_flight: positive_or(spec.max_in_flight, 1),
            paused: spec.paused.unwrap_or(false),
        }
    }

    /// What the schema cannot check: the regex compiles (bk-cmdb counted every delivery to
    /// a subscription with a broken regex as failed; herald refuses it up front).
    pub fn validate(&self) -> Result<(), Invalid> {
        match self.confirm_mode {
            ConfirmMode::Regular => compile_confirm_regex(&self.confirm_pattern).map(|_| ()),
            ConfirmMode::Httpstatus => Ok(()),
        }
    }

    /// The key under which `subscription_name` must be unique.
    pub fn name_key(&self) -> (&str, &str) {
        (&self.supplier_account, &self.subscription_name)
    }
}

/// The (supplier account, subscription name) a spec holds, normalised as the effective
/// view does, without building the whole view: name checks compare every pair of
/// subscriptions, so this must not allocate.
pub fn name_key(spec: &EventSubscriptionSpec) -> (&str, &str) {
    let account =
        spec.supplier_account.as_deref().map(str::trim).filter(|a| !a.is_empty()).unwrap_or(DEFAULT_SUPPLIER_ACCOUNT);
    (account, spec.subscription_name.trim())
}

/// Compiles a `regular` confirm pattern with a size limit, so a hostile pattern cannot
/// take unbounded memory.
pub fn compile_confirm_regex(pattern: &str) -> Result<regex::Regex, Invalid> {
    regex::RegexBuilder::new(pattern).size_limit(1 << 20).build().map_err(|e| Invalid {
        reason: REASON_INVALID_PATTERN,
        message: format!("confirm.pattern does not compile: {e}"),
    })
}

fn positive_or<T, U>(value: Option<T>, default: U) -> U
where
    U: TryFrom<T> + PartialOrd + Default,
{
    value.and_then(|v| U::try_from(v).ok()).filter(|v| *v > U::default()).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Confirm, Retry};

    fn spec() -> EventSubscriptionSpec {
        EventSubscriptionSpec {
            subscription_name: " hosts ".into(),
            callback_url: "http://127.0.0.1:9000/cb".into(),
            events: vec!["hostupdate".into(), " hostcreate".into(), "hostupdate".into(), " ".into()],
            ..Default::default()
        }
    }

    #[test]
    fn defaults_apply_to_an_empty_spec() {
        let e = Effective::from_spec(&spec());
        assert_eq!(e.supplier_account, "0");
        assert_eq!(e.subscription_name, "hosts");
        assert_eq!(e.events, vec!["hostcreate", "hostupdate"]);
        assert_eq!(e.confirm_mode, ConfirmMode::Httpstatus);
        assert_eq!(e.confirm_pattern, "200");
        assert_eq!(e.timeout, Duration::from_secs(10));
        assert_eq!(e.retry.max_attempts, 5);
        assert_eq!(e.retry.initial_backoff, Duration::from_secs(1));
        assert_eq!(e.retry.max_backoff, Duration::from_secs(300));
        assert_eq!(e.retry.jitter_percent, 20);
        assert_eq!(e.max_in_flight, 1);
        assert!(!e.paused);
    }

    #[test]
    fn user_values_win_and_out_of_range_values_fall_back() {
        let mut s = spec();
        s.supplier_account = Some(" tenant ".into());
        s.timeout_seconds = Some(0);
        s.max_in_flight = Some(-3);
        s.retry = Some(Retry { max_attempts: Some(1), jitter_percent: Some(250), ..Default::default() });
        s.confirm = Some(Confirm { mode: Some(ConfirmMode::Regular), pattern: Some(" ok ".into()) });
        let e = Effective::from_spec(&s);
        assert_eq!(e.supplier_account, "tenant");
        assert_eq!(e.timeout, Duration::from_secs(10));
        assert_eq!(e.max_in_flight, 1);
        assert_eq!(e.retry.max_attempts, 1);
        assert_eq!(e.retry.jitter_percent, 100);
        // A regex pattern is used as written: spaces may be meaningful.
        assert_eq!(e.confirm_pattern, " ok ");
    }

    #[test]
    fn validation_rejects_only_a_regex_that_does_not_compile() {
        let mut s = spec();
        s.confirm = Some(Confirm { mode: Some(ConfirmMode::Regular), pattern: Some("ok(".into()) });
        let invalid = Effective::from_spec(&s).validate().unwrap_err();
        assert_eq!(invalid.reason, REASON_INVALID_PATTERN);
        assert!(invalid.message.contains("confirm.pattern"), "{}", invalid.message);

        s.confirm = Some(Confirm { mode: Some(ConfirmMode::Regular), pattern: Some("\"result\":\\s*true".into()) });
        assert_eq!(Effective::from_spec(&s).validate(), Ok(()));
        s.confirm = Some(Confirm { mode: Some(ConfirmMode::Httpstatus), pattern: Some("(".into()) });
        assert_eq!(Effective::from_spec(&s).validate(), Ok(()));
    }
}
