//! Time formats: bk-cmdb shows times as `YYYY-MM-DD HH:MM:SS` in one configured zone;
//! Kubernetes status fields hold RFC 3339.
//!
//! IANA names resolve through jiff's database: the system's `/usr/share/zoneinfo` when
//! present, otherwise the copy bundled into the binary (feature `tzdb-bundle-always`), so
//! minimal container images work too.

use jiff::Timestamp;
use jiff::tz::{Offset, TimeZone};
use std::str::FromStr;

/// The zone bk-cmdb times are shown in, from the configuration: `UTC` (the default), a
/// fixed offset such as `+08:00` or `-05:30`, or an IANA name such as `Asia/Shanghai`.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct TimeZoneSetting(TimeZone);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown time zone {0:?}: expected UTC, an offset such as +08:00, or an IANA name such as Asia/Shanghai")]
pub struct UnknownTimeZone(pub String);

impl Default for TimeZoneSetting {
    fn default() -> Self {
        TimeZoneSetting(TimeZone::UTC)
    }
}

impl FromStr for TimeZoneSetting {
    type Err = UnknownTimeZone;

    fn from_str(setting: &str) -> Result<Self, Self::Err> {
        let name = setting.trim();
        let zone = if name.eq_ignore_ascii_case("UTC") || name.eq_ignore_ascii_case("Z") {
            Some(TimeZone::UTC)
        } else if name.starts_with(['+', '-']) {
            parse_offset(name).map(TimeZone::fixed)
        } else {
            TimeZone::get(name).ok()
        };
        zone.map(TimeZoneSetting).ok_or_else(|| UnknownTimeZone(setting.to_string()))
    }
}

impl TryFrom<String> for TimeZoneSetting {
    type Error = UnknownTimeZone;
    fn try_from(setting: String) -> Result<Self, UnknownTimeZone> {
        setting.parse()
    }
}

/// `±HH:MM`, `±HHMM` or `±HH`, at most 18 hours either way.
fn parse_offset(text: &str) -> Option<Offset> {
    let (sign, rest) = text.split_at(1);
    if !rest.is_ascii() {
        return None;
    }
    let (hours, minutes) = match (rest.len(), rest.as_bytes().get(2)) {
        (2, _) => (rest, "00"),
        (4, _) => rest.split_at(2),
        (5, Some(b':')) => (&rest[..2], &rest[3..]),
        _ => return None,
    };
    if !hours.bytes().chain(minutes.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hours: i32 = hours.parse().ok()?;
    let minutes: i32 = minutes.parse().ok()?;
    if minutes >= 60 || hours * 60 + minutes > 18 * 60 {
        return None;
    }
    let seconds = (hours * 60 + minutes) * 60;
    Offset::from_seconds(if sign == "-" { -seconds } else { seconds }).ok()
}

/// `YYYY-MM-DD HH:MM:SS` in the given zone, as bk-cmdb v3.5 shows `last_time`.
pub fn format_cmdb(ts: Timestamp, tz: &TimeZoneSetting) -> String {
    ts.to_zoned(tz.0.clone()).strftime("%Y-%m-%d %H:%M:%S").to_string()
}

/// An RFC 3339 timestamp (with `Z` or an offset), as written into status fields.
pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_formatting() {
        let instant = "2024-01-15T08:30:05Z";
        let table = [
            ("UTC", "2024-01-15 08:30:05"),
            (" utc ", "2024-01-15 08:30:05"),
            ("Z", "2024-01-15 08:30:05"),
            ("+08:00", "2024-01-15 16:30:05"),
            ("+0800", "2024-01-15 16:30:05"),
            ("+08", "2024-01-15 16:30:05"),
            ("-05:30", "2024-01-15 03:00:05"),
            ("+00:00", "2024-01-15 08:30:05"),
            ("Asia/Shanghai", "2024-01-15 16:30:05"),
            ("America/New_York", "2024-01-15 03:30:05"),
        ];
        let ts = parse_rfc3339(instant).unwrap();
        for (setting, shown) in table {
            let tz: TimeZoneSetting = setting.parse().unwrap_or_else(|e| panic!("{setting}: {e}"));
            assert_eq!(format_cmdb(ts, &tz), shown, "{setting}");
        }
        assert_eq!(format_cmdb(ts, &TimeZoneSetting::default()), "2024-01-15 08:30:05");
    }

    #[test]
    fn iana_zones_follow_daylight_saving() {
        let tz: TimeZoneSetting = "Europe/Berlin".parse().unwrap();
        let table = [("2024-01-15T12:00:00Z", "2024-01-15 13:00:00"), ("2024-07-15T12:00:00Z", "2024-07-15 14:00:00")];
        for (instant, shown) in table {
            assert_eq!(format_cmdb(parse_rfc3339(instant).unwrap(), &tz), shown);
        }
    }

    #[test]
    fn rejects_unknown_settings() {
        for setting in ["", "Mars/Olympus", "+8", "+08:0", "+19:00", "+08:60", "08:00", "+ab:cd", "+08:00:00", "UTC+8"]
        {
            assert!(setting.parse::<TimeZoneSetting>().is_err(), "{setting:?}");
        }
    }

    #[test]
    fn rfc3339() {
        let table = [
            ("2024-01-15T08:30:05Z", Some("2024-01-15T08:30:05Z")),
            ("2024-01-15T16:30:05+08:00", Some("2024-01-15T08:30:05Z")),
            (" 2024-01-15T08:30:05.123Z ", Some("2024-01-15T08:30:05.123Z")),
            ("2024-01-15T08:30:05", None),
            ("2024-01-15 08:30:05", None),
            ("", None),
            ("yesterday", None),
        ];
        for (text, expected) in table {
            assert_eq!(parse_rfc3339(text).map(|ts| ts.to_string()).as_deref(), expected, "{text:?}");
        }
    }
}
