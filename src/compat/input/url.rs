//! Callback URL checks. A URL herald accepts must pass both the CRD's CEL rule (Go's
//! `url.ParseRequestURI`, scheme http/https, a host) and reqwest's WHATWG parser, which
//! disagree at the edges: WHATWG reads `http:///x` as host `x` and `http://a\b` as
//! `http://a/b`, Go refuses bad `%` escapes. So the raw text is checked first, strictly,
//! then parsed.

use reqwest::Url;

/// The CRD's `maxLength` for `callbackUrl`.
pub const MAX_URL_CHARS: usize = 2048;

/// An absolute http or https URL with a host.
pub fn parse_http_url(raw: &str) -> Option<Url> {
    let url = parse_authority_url(raw)?;
    matches!(url.scheme(), "http" | "https").then_some(url)
}

/// A `scheme://host[:port]…` URL of any scheme, with a non-empty host.
pub fn parse_authority_url(raw: &str) -> Option<Url> {
    if raw.chars().count() > MAX_URL_CHARS
        || raw.chars().any(|c| c.is_whitespace() || c.is_control())
        || !percent_escapes_are_valid(raw)
    {
        return None;
    }
    let (scheme, rest) = raw.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if !is_scheme(scheme) || !is_host_and_port(authority.rsplit_once('@').map_or(authority, |(_, host)| host)) {
        return None;
    }
    let url = Url::parse(raw).ok()?;
    url.host_str().is_some_and(|host| !host.is_empty()).then_some(url)
}

fn is_scheme(scheme: &str) -> bool {
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// `name[:port]` or `[ipv6][:port]`; the port, when given, is digits (the parser checks
/// its range). Names are letters, digits, `-._~` and non-ASCII (internationalised names).
fn is_host_and_port(text: &str) -> bool {
    let (host, port) = match text.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((address, after)) if after.is_empty() || after.starts_with(':') => {
                (address, after.strip_prefix(':').unwrap_or_default())
            }
            _ => return false,
        },
        None => {
            let (host, port) = text.split_once(':').unwrap_or((text, ""));
            let host_chars_ok =
                host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') || !c.is_ascii());
            if !host_chars_ok {
                return false;
            }
            (host, port)
        }
    };
    !host.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
}

/// Every `%` starts a two-hex-digit escape.
fn percent_escapes_are_valid(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'%')
        .all(|(i, _)| bytes.get(i + 1..i + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls() {
        let long = format!("http://example.com/{}", "a".repeat(MAX_URL_CHARS));
        let table = [
            ("http://127.0.0.1:9000/cb", true),
            ("https://example.com", true),
            ("HTTP://Example.COM/path?q=1#frag", true),
            ("http://user:secret@example.com:8080/a%20b", true),
            ("http://[::1]:8080/cb", true),
            ("http://[::1]/cb", true),
            ("http://例子.测试/cb", true),
            ("http://my_host.local/", true),
            ("ftp://example.com/", false),
            ("example.com/cb", false),
            ("127.0.0.1:9000", false),
            ("http:example.com", false),
            ("http:/example.com", false),
            ("http:///example.com", false),
            ("http://", false),
            ("http://:80/", false),
            ("http://@/", false),
            ("http://a\\b/", false),
            ("http://exa mple.com/", false),
            ("http://example.com/a b", false),
            ("http://example.com/\n", false),
            ("http://example.com/%zz", false),
            ("http://example.com/%4", false),
            ("http://example.com:port/", false),
            ("http://example.com:70000/", false),
            ("http://[::1/", false),
            ("http://[::1]x/", false),
            ("http://[nope]/", false),
            ("http://a|b/", false),
            ("", false),
            (long.as_str(), false),
        ];
        for (raw, ok) in table {
            assert_eq!(parse_http_url(raw).is_some(), ok, "{raw:?}");
        }
    }

    #[test]
    fn other_schemes_with_an_authority() {
        let table = [
            ("tcp://127.0.0.1:9000", true),
            ("redis://cache:6379/0", true),
            ("1tcp://h:1", false),
            ("mailto:a@b", false),
        ];
        for (raw, ok) in table {
            assert_eq!(parse_authority_url(raw).is_some(), ok, "{raw:?}");
        }
    }
}
