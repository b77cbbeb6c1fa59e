//! Whether a callback's answer confirms the delivery (docs/design.md §5).

use super::budget::ANSWER_BUDGET_EXHAUSTED;
use crate::crd::ConfirmMode;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Confirmation {
    Confirmed,
    /// A failed attempt; retry later.
    Failed(String),
    /// 429: a failed attempt whose next try waits at least `retry_after`.
    Throttled {
        retry_after: Option<Duration>,
    },
    /// 410: the receiver is gone for good; stop until the spec changes.
    Gone,
}

/// `httpstatus`: the status code as a decimal string equals the pattern exactly.
/// `regular`: the regex matches anywhere in the body as read (status ignored); `body` is
/// None when the answer budget cut the answer, which `regular` counts as failed (a match in
/// the part read could be one the whole answer would not give).
/// In both modes 429 and 410 mean what HTTP says.
pub fn judge(
    mode: ConfirmMode,
    pattern: &str,
    regex: Option<&regex::Regex>,
    status: u16,
    retry_after: Option<Duration>,
    body: Option<&[u8]>,
) -> Confirmation {
    match status {
        410 => return Confirmation::Gone,
        429 => return Confirmation::Throttled { retry_after },
        _ => {}
    }
    match mode {
        ConfirmMode::Httpstatus if status.to_string() == pattern => Confirmation::Confirmed,
        ConfirmMode::Httpstatus => Confirmation::Failed(format!("status {status}, expected {pattern}")),
        ConfirmMode::Regular => match (regex, body) {
            (None, _) => Confirmation::Failed("confirm pattern does not compile".into()),
            (Some(_), None) => Confirmation::Failed(format!("status {status}: {ANSWER_BUDGET_EXHAUSTED}")),
            (Some(regex), Some(body)) if regex.is_match(&String::from_utf8_lossy(body)) => Confirmation::Confirmed,
            (Some(_), Some(_)) => {
                Confirmation::Failed(format!("status {status}: response body does not match the confirm pattern"))
            }
        },
    }
}

/// `Retry-After` in seconds or as an HTTP date, capped.
pub fn retry_after(value: &str, now: jiff::Timestamp, cap: Duration) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
            Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn httpstatus_compares_the_code_exactly() {
        assert_eq!(judge(ConfirmMode::Httpstatus, "200", None, 200, None, Some(b"")), Confirmation::Confirmed);
        assert!(matches!(judge(ConfirmMode::Httpstatus, "201", None, 200, None, Some(b"")), Confirmation::Failed(_)));
        assert_eq!(judge(ConfirmMode::Httpstatus, "201", None, 201, None, Some(b"")), Confirmation::Confirmed);
        assert!(matches!(judge(ConfirmMode::Httpstatus, "200", None, 500, None, Some(b"ok")), Confirmation::Failed(_)));
    }

    #[test]
    fn regular_matches_anywhere_and_ignores_status() {
        let regex = regex::Regex::new(r#""result":\s*true"#).unwrap();
        let body = br#"{"code": 0, "result": true}"#;
        assert_eq!(judge(ConfirmMode::Regular, "", Some(&regex), 500, None, Some(body)), Confirmation::Confirmed);
        assert!(matches!(
            judge(ConfirmMode::Regular, "", Some(&regex), 200, None, Some(b"{\"result\": false}")),
            Confirmation::Failed(_)
        ));
    }

    #[test]
    fn a_cut_answer_fails_regular_but_not_httpstatus() {
        let regex = regex::Regex::new("").unwrap();
        assert_eq!(
            judge(ConfirmMode::Regular, "", Some(&regex), 200, None, None),
            Confirmation::Failed(format!("status 200: {ANSWER_BUDGET_EXHAUSTED}"))
        );
        assert_eq!(judge(ConfirmMode::Httpstatus, "200", None, 200, None, None), Confirmation::Confirmed);
        assert_eq!(judge(ConfirmMode::Regular, "", Some(&regex), 410, None, None), Confirmation::Gone);
    }

    #[test]
    fn gone_and_throttled_win_in_both_modes() {
        let regex = regex::Regex::new("").unwrap();
        assert_eq!(judge(ConfirmMode::Regular, "", Some(&regex), 410, None, Some(b"")), Confirmation::Gone);
        assert_eq!(judge(ConfirmMode::Httpstatus, "410", None, 410, None, Some(b"")), Confirmation::Gone);
        let wait = Some(Duration::from_secs(3));
        assert_eq!(
            judge(ConfirmMode::Httpstatus, "429", None, 429, wait, Some(b"")),
            Confirmation::Throttled { retry_after: wait }
        );
    }

    #[test]
    fn retry_after_takes_seconds_or_dates_and_is_capped() {
        let now = jiff::Timestamp::from_second(784_111_777).unwrap(); // Sun, 06 Nov 1994 08:49:37 GMT
        let cap = Duration::from_secs(300);
        assert_eq!(retry_after("7", now, cap), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("100000", now, cap), Some(cap));
        assert_eq!(retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now, cap), Some(Duration::from_secs(10)));
        assert_eq!(retry_after("soon", now, cap), None);
    }
}
