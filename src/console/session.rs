//! Console sessions: a sign-in exchanges a Kubernetes token or ESB app credentials (or,
//! with the development anonymous switch, nothing) for a session cookie (HttpOnly,
//! SameSite=Strict) and a CSRF token the page sends back on every change. Sessions live in
//! memory, end after `IDLE` without use or `LIFETIME` after sign-in, and are bounded in
//! number: signing in past `MAX_PER_USER` ends that user's oldest, past `MAX_SESSIONS` the
//! oldest of all (the one nearest its end of life), each in O(1).
//!
//! What herald keeps of a session is of no use without the browser's cookie, so that a
//! heap dump, a core file or a logged `Debug` of the store replays nothing:
//! - the cookie is 256 random bits herald never stores: sessions are found by a key
//!   derived from it (HKDF-SHA256), which cannot be turned back into the cookie;
//! - an ESB app's session keeps the app's verified identity, never its secret (the bridge
//!   presents the secret herald's configuration already holds);
//! - a Kubernetes session keeps its token only sealed (AES-256-GCM) under a key derived from
//!   the cookie, opened for one request at a time. The token is kept at all because the REST
//!   API authenticates every request from its headers with a TokenReview: so a token that
//!   expires or is revoked ends the console's access at once, as it ends any REST caller's;
//! - the CSRF token is derived from the cookie, not stored.

use crate::api::auth::Identity;
use base64::Engine;
use parking_lot::Mutex;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The cookie over HTTPS. `__Host-` makes browsers accept it only with `Secure`, `Path=/`
/// and no `Domain`, so neither a sibling subdomain nor a plain-HTTP page can plant or
/// overwrite it (no session fixation by cookie tossing).
pub const COOKIE_HTTPS: &str = "__Host-herald-session";
/// The cookie over plain HTTP (development, or a cluster-internal address). A `__Host-`
/// cookie must be `Secure`, which browsers store only for secure contexts: Chromium and
/// Firefox count http://localhost and 127.0.0.1 as one, Safari does not, and no browser counts
/// any other http:// origin. Over plain HTTP anyone on the path can read and set cookies
/// anyway, so the prefix would guard nothing there; the plain name keeps the console
/// working (tests/console.rs drives it over http://127.0.0.1).
pub const COOKIE_HTTP: &str = "herald_console";
pub const CSRF_HEADER: &str = "x-csrf-token";
pub const IDLE: Duration = Duration::from_secs(30 * 60);
pub const LIFETIME: Duration = Duration::from_secs(8 * 60 * 60);
pub const MAX_SESSIONS: usize = 10_000;
/// Sessions one user may hold: signing in past it ends that user's oldest, so no user can
/// push the others' sessions out.
pub const MAX_PER_USER: usize = 16;

/// The session cookie's name over HTTPS or plain HTTP (see `COOKIE_HTTPS`, `COOKIE_HTTP`).
pub fn cookie_name(https: bool) -> &'static str {
    if https { COOKIE_HTTPS } else { COOKIE_HTTP }
}

/// The `Set-Cookie` value: no `Domain` (so the cookie goes back to this host only), `Path=/`
/// (the page calls the REST API beside it), and `Secure` with the `__Host-` name over HTTPS.
pub fn set_cookie(https: bool, value: &str, max_age: u64) -> String {
    let secure = if https { "; Secure" } else { "" };
    format!("{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}", cookie_name(https))
}

/// The session cookie in a request's cookies: only the name this request's scheme uses, so
/// a plain-named cookie planted in an HTTPS browser is never read.
pub fn cookie_value(headers: &axum::http::HeaderMap, https: bool) -> Option<&str> {
    let name = cookie_name(https);
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('='))
}

/// What a session acts with. Given to `Sessions::open`, which seals a token and keeps
/// nothing else of it; given back by `Live::credential` for one request.
#[derive(Clone, PartialEq)]
pub enum Credential {
    /// A Kubernetes bearer token.
    Token(String),
    /// An ESB app's verified identity (`Identity::EsbApp`): never its secret.
    App(Identity),
    Anonymous,
}

/// Never the token.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(_) => f.write_str("Token(…)"),
            Credential::App(identity) => f.debug_tuple("App").field(identity).finish(),
            Credential::Anonymous => f.write_str("Anonymous"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the system random number generator failed")]
    Random,
    #[error("deriving the session's keys failed")]
    Derive,
    #[error("sealing the session's token failed")]
    Seal,
    #[error("the session's token does not unseal")]
    Unseal,
}

/// A session key (the lookup key, or the sealing key): derived from the cookie.
type Key = [u8; 32];

/// The cookie's 256 bits, held only while a request is served.
#[derive(Clone)]
struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// HKDF `info` labels: one key per purpose, none derivable from another.
const LOOKUP: &[u8] = b"herald console session lookup";
const SEALING: &[u8] = b"herald console session token sealing";
const CSRF: &[u8] = b"herald console session csrf";

impl Secret {
    /// The cookie's text back into its bits: anything but 43 base64url characters is no
    /// cookie herald set.
    fn parse(cookie: &str) -> Option<Secret> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cookie.as_bytes()).ok()?;
        Some(Secret(bytes.try_into().ok()?))
    }

    fn text(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0)
    }

    fn derive(&self, purpose: &[u8]) -> Result<Key, SessionError> {
        // The input is uniformly random, so HKDF needs no secret salt.
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(&self.0);
        let mut key = [0u8; 32];
        prk.expand(&[purpose], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut key))
            .map_err(|_| SessionError::Derive)?;
        Ok(key)
    }

    fn csrf(&self) -> Result<String, SessionError> {
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.derive(CSRF)?))
    }

    fn sealing_key(&self) -> Result<LessSafeKey, SessionError> {
        let key = UnboundKey::new(&AES_256_GCM, &self.derive(SEALING)?).map_err(|_| SessionError::Derive)?;
        Ok(LessSafeKey::new(key))
    }
}

/// Each session's sealing key seals exactly one token, once, so a fixed nonce is never
/// reused under one key.
fn nonce() -> Nonce {
    Nonce::assume_unique_for_key([0; NONCE_LEN])
}

/// What a session keeps to act with.
#[derive(Clone)]
enum Kept {
    /// The token, sealed; the lookup key is its associated data, so it opens for this
    /// session only.
    Sealed(Vec<u8>),
    App(Identity),
    Anonymous,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kept::Sealed(sealed) => write!(f, "Sealed({} bytes)", sealed.len()),
            Kept::App(identity) => f.debug_tuple("App").field(identity).finish(),
            Kept::Anonymous => f.write_str("Anonymous"),
        }
    }
}

#[derive(Debug)]
struct Session {
    /// Shown on the page, and what `MAX_PER_USER` counts by.
    user: String,
    kept: Kept,
    ends: Instant,
    idle_until: Instant,
}

impl Session {
    fn live(&self, now: Instant) -> bool {
        now < self.ends && now < self.idle_until
    }
}

/// The open sessions by lookup key, with the orders eviction takes them in.
#[derive(Debug, Default)]
struct Store {
    open: HashMap<Key, Session>,
    /// Every open session's key in sign-in order, which is also the order of their ends
    /// (`LIFETIME` after sign-in): the oldest is at the front. A closed session's key stays
    /// until it reaches the front or the queue is compacted, so nothing scans on close.
    order: VecDeque<Key>,
    /// Each user's open sessions in sign-in order: at most `MAX_PER_USER`, so removing one
    /// is O(1).
    by_user: HashMap<String, VecDeque<Key>>,
}

impl Store {
    fn remove(&mut self, key: &Key) {
        if let Some(session) = self.open.remove(key)
            && let Some(theirs) = self.by_user.get_mut(&session.user)
        {
            theirs.retain(|other| other != key);
            if theirs.is_empty() {
                self.by_user.remove(&session.user);
            }
        }
    }

    fn insert(&mut self, key: Key, session: Session, now: Instant, limits: Limits) {
        // Ended sessions at the front go first: each key leaves the queue once, so this is
        // O(1) per sign-in on average.
        while let Some(front) = self.order.front().copied() {
            if self.open.get(&front).is_some_and(|s| s.live(now)) {
                break;
            }
            self.order.pop_front();
            self.remove(&front);
        }
        while let Some(oldest) =
            self.by_user.get(&session.user).filter(|theirs| theirs.len() >= limits.per_user).and_then(|t| t.front())
        {
            let oldest = *oldest;
            self.remove(&oldest);
        }
        // Every open session's key is in `order`, so this ends.
        while self.open.len() >= limits.sessions {
            let Some(oldest) = self.order.pop_front() else { break };
            self.remove(&oldest);
        }
        self.order.push_back(key);
        self.by_user.entry(session.user.clone()).or_default().push_back(key);
        self.open.insert(key, session);
        // Closed sessions' keys: at most as many again as open ones, so the queue stays
        // bounded and compacting costs O(1) per sign-in on average.
        if self.order.len() > 2 * limits.sessions {
            self.order.retain(|key| self.open.contains_key(key));
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    sessions: usize,
    per_user: usize,
}

pub struct Sessions {
    store: Mutex<Store>,
    limits: Limits,
    random: SystemRandom,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::with_limits(MAX_SESSIONS, MAX_PER_USER)
    }
}

/// The store, never a cookie, token or CSRF token (none is in it).
impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("store", &*self.store.lock()).field("limits", &self.limits).finish()
    }
}

/// A live session, as one request sees it.
#[derive(Debug)]
pub struct Live {
    pub user: String,
    pub csrf: String,
    key: Key,
    kept: Kept,
    secret: Secret,
}

impl Live {
    /// What the session acts with; a token is unsealed for this request only.
    pub fn credential(&self) -> Result<Credential, SessionError> {
        match &self.kept {
            Kept::Sealed(sealed) => {
                let mut opened = sealed.clone();
                let token = self
                    .secret
                    .sealing_key()?
                    .open_in_place(nonce(), Aad::from(&self.key), &mut opened)
                    .map_err(|_| SessionError::Unseal)?;
                String::from_utf8(token.to_vec()).map(Credential::Token).map_err(|_| SessionError::Unseal)
            }
            Kept::App(identity) => Ok(Credential::App(identity.clone())),
            Kept::Anonymous => Ok(Credential::Anonymous),
        }
    }

    /// Whether a change carries this session's CSRF token. Compared without an early exit,
    /// so timing does not reveal how much of a guess matched.
    pub fn csrf_matches(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|presented| {
            presented.len() == self.csrf.len()
                && presented.bytes().zip(self.csrf.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        })
    }
}

impl Sessions {
    fn with_limits(sessions: usize, per_user: usize) -> Self {
        Sessions {
            store: Mutex::new(Store::default()),
            limits: Limits { sessions: sessions.max(1), per_user: per_user.max(1) },
            random: SystemRandom::new(),
        }
    }

    /// Opens a session for `user`, acting with `credential`; returns the cookie's value and
    /// the CSRF token.
    pub fn open(&self, credential: Credential, user: String) -> Result<(String, String), SessionError> {
        self.open_at(credential, user, Instant::now())
    }

    fn open_at(&self, credential: Credential, user: String, now: Instant) -> Result<(String, String), SessionError> {
        let mut bytes = [0u8; 32];
        self.random.fill(&mut bytes).map_err(|_| SessionError::Random)?;
        let secret = Secret(bytes);
        let key = secret.derive(LOOKUP)?;
        let kept = match credential {
            Credential::Token(token) => {
                let mut sealed = token.into_bytes();
                secret
                    .sealing_key()?
                    .seal_in_place_append_tag(nonce(), Aad::from(&key), &mut sealed)
                    .map_err(|_| SessionError::Seal)?;
                Kept::Sealed(sealed)
            }
            Credential::App(identity) => Kept::App(identity),
            Credential::Anonymous => Kept::Anonymous,
        };
        let session = Session { user, kept, ends: now + LIFETIME, idle_until: now + IDLE };
        self.store.lock().insert(key, session, now, self.limits);
        Ok((secret.text(), secret.csrf()?))
    }

    /// The live session `cookie` names, its idle time restarted.
    pub fn get(&self, cookie: &str) -> Option<Live> {
        self.get_at(cookie, Instant::now())
    }

    fn get_at(&self, cookie: &str, now: Instant) -> Option<Live> {
        let secret = Secret::parse(cookie)?;
        let key = secret.derive(LOOKUP).ok()?;
        let mut store = self.store.lock();
        let session = store.open.get_mut(&key)?;
        if !session.live(now) {
            store.remove(&key);
            return None;
        }
        session.idle_until = now + IDLE;
        let (user, kept) = (session.user.clone(), session.kept.clone());
        drop(store);
        let csrf = secret.csrf().ok()?;
        Some(Live { user, csrf, key, kept, secret })
    }

    pub fn close(&self, cookie: &str) {
        if let Some(key) = Secret::parse(cookie).and_then(|secret| secret.derive(LOOKUP).ok()) {
            self.store.lock().remove(&key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.store.lock().open.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLW9mLWFsaWNl";

    fn app() -> Identity {
        Identity::EsbApp { app_code: "cmdb".into(), username: None, accounts: vec!["0".into()] }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|window| window == needle)
    }

    #[test]
    fn sessions_are_random_found_by_cookie_and_closed() {
        let sessions = Sessions::default();
        let (a, csrf_a) = sessions.open(Credential::Anonymous, "anonymous".into()).unwrap();
        let (b, csrf_b) = sessions.open(Credential::Token(TOKEN.into()), "alice".into()).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, csrf_a);
        assert_ne!(csrf_a, csrf_b);
        assert_eq!(a.len(), 43, "32 random bytes, base64url");
        let live = sessions.get(&b).unwrap();
        assert_eq!((live.user.as_str(), live.csrf.as_str()), ("alice", csrf_b.as_str()));
        assert_eq!(live.credential().unwrap(), Credential::Token(TOKEN.into()), "unsealed for a request");
        assert_eq!(sessions.get(&a).unwrap().csrf, csrf_a);
        sessions.close(&a);
        assert!(sessions.get(&a).is_none());
        for forged in ["forged", "", &"A".repeat(43), &b[..42], &format!("{b}A")] {
            assert!(sessions.get(forged).is_none(), "{forged}");
        }
    }

    #[test]
    fn a_session_keeps_no_token_cookie_or_csrf_token() {
        let sessions = Sessions::default();
        let (cookie, csrf) = sessions.open(Credential::Token(TOKEN.into()), "alice".into()).unwrap();
        let printed = format!("{sessions:?}");
        for secret in [TOKEN, cookie.as_str(), csrf.as_str()] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("Sealed("), "{printed}");
        let store = sessions.store.lock();
        let (key, session) = store.open.iter().next().unwrap();
        let Kept::Sealed(sealed) = &session.kept else { panic!("a sealed token: {session:?}") };
        let raw = Secret::parse(&cookie).unwrap();
        assert!(!contains(sealed, TOKEN.as_bytes()), "the token is not in what is kept");
        assert!(!contains(sealed, &TOKEN.as_bytes()[..16]), "nor a piece of it");
        assert_ne!(key, &raw.0, "sessions are found by a derived key, not the cookie");
        assert!(!contains(sealed, &raw.0) && !contains(sealed, cookie.as_bytes()));
        drop(store);
        // Without the cookie the sealed token opens for no other session's key.
        let (other, _) = sessions.open(Credential::Anonymous, "bob".into()).unwrap();
        let mut stolen = sessions.get(&other).unwrap();
        stolen.kept = sessions.get(&cookie).unwrap().kept;
        assert!(matches!(stolen.credential(), Err(SessionError::Unseal)));
        assert_eq!(format!("{:?}", Credential::Token(TOKEN.into())), "Token(…)");
        assert!(!format!("{:?}", sessions.get(&cookie).unwrap()).contains(TOKEN));
    }

    #[test]
    fn an_app_session_keeps_the_verified_identity() {
        let sessions = Sessions::default();
        let (cookie, _) = sessions.open(Credential::App(app()), "cmdb".into()).unwrap();
        assert_eq!(sessions.get(&cookie).unwrap().credential().unwrap(), Credential::App(app()));
        assert!(format!("{sessions:?}").contains("EsbApp"), "the identity, which has no secret");
    }

    #[test]
    fn the_csrf_token_must_match_exactly() {
        let sessions = Sessions::default();
        let (cookie, csrf) = sessions.open(Credential::Anonymous, "anonymous".into()).unwrap();
        let live = sessions.get(&cookie).unwrap();
        assert!(live.csrf_matches(Some(&csrf)));
        assert!(!live.csrf_matches(None));
        assert!(!live.csrf_matches(Some("")));
        assert!(!live.csrf_matches(Some(&csrf[..42])));
        assert!(!live.csrf_matches(Some(&cookie)));
    }

    #[test]
    fn sessions_end_when_idle_and_after_their_lifetime() {
        let sessions = Sessions::default();
        let start = Instant::now();
        let (idle, _) = sessions.open_at(Credential::Anonymous, "a".into(), start).unwrap();
        let (used, _) = sessions.open_at(Credential::Anonymous, "b".into(), start).unwrap();
        let mut now = start;
        // Used every 20 minutes, a session lives its whole lifetime; unused, 30 minutes.
        while now + Duration::from_secs(20 * 60) < start + LIFETIME {
            now += Duration::from_secs(20 * 60);
            assert!(sessions.get_at(&used, now).is_some(), "{:?}", now - start);
        }
        let second = Duration::from_secs(1);
        assert!(sessions.get_at(&idle, start + IDLE - second).is_some(), "used: its idle time restarts");
        assert!(sessions.get_at(&idle, start + IDLE - second + IDLE).is_none(), "then idle for 30 minutes");
        assert!(sessions.get_at(&used, start + LIFETIME).is_none(), "8 hours after sign-in");
        assert_eq!(sessions.len(), 0, "both removed once found ended");
        // Ended sessions no one asks for again go at the next sign-in.
        let (_, _) = sessions.open_at(Credential::Anonymous, "c".into(), start).unwrap();
        sessions.open_at(Credential::Anonymous, "d".into(), start + LIFETIME).unwrap();
        assert_eq!(sessions.len(), 1);
    }

    #[test]
    fn sessions_are_bounded_and_the_oldest_goes_first() {
        let sessions = Sessions::with_limits(100, MAX_PER_USER);
        let start = Instant::now();
        let cookies: Vec<String> = (0..1_000u64)
            .map(|n| {
                let at = start + Duration::from_millis(n);
                sessions.open_at(Credential::Anonymous, format!("user-{n}"), at).unwrap().0
            })
            .collect();
        assert_eq!(sessions.len(), 100);
        let now = start + Duration::from_secs(1);
        assert!(cookies[..900].iter().all(|c| sessions.get_at(c, now).is_none()), "the oldest went");
        assert!(cookies[900..].iter().all(|c| sessions.get_at(c, now).is_some()), "the newest stay");
        let store = sessions.store.lock();
        assert!(
            store.order.len() <= 200 && store.by_user.len() == 100,
            "{} {}",
            store.order.len(),
            store.by_user.len()
        );
    }

    #[test]
    fn signing_in_and_out_again_and_again_keeps_the_store_bounded() {
        let sessions = Sessions::with_limits(10, MAX_PER_USER);
        for _ in 0..1_000 {
            let (cookie, _) = sessions.open(Credential::Anonymous, "alice".into()).unwrap();
            sessions.close(&cookie);
        }
        let store = sessions.store.lock();
        assert!(store.open.is_empty() && store.by_user.is_empty());
        assert!(store.order.len() <= 20, "closed sessions' keys are compacted: {}", store.order.len());
    }

    #[test]
    fn the_full_store_holds_max_sessions() {
        let sessions = Sessions::default();
        for n in 0..MAX_SESSIONS + 10 {
            sessions.open(Credential::Anonymous, format!("user-{n}")).unwrap();
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
    }

    #[test]
    fn one_user_signing_in_again_and_again_ends_only_their_own_oldest_sessions() {
        let sessions = Sessions::default();
        let (other, _) = sessions.open(Credential::Anonymous, "bob".into()).unwrap();
        let first = sessions.open(Credential::Token(TOKEN.into()), "alice".into()).unwrap().0;
        for _ in 0..MAX_PER_USER {
            sessions.open(Credential::Token(TOKEN.into()), "alice".into()).unwrap();
        }
        assert!(sessions.get(&first).is_none(), "alice's oldest went");
        assert!(sessions.get(&other).is_some(), "bob's stays");
        assert_eq!(sessions.len(), MAX_PER_USER + 1);
    }

    #[test]
    fn the_cookie_is_found_among_others_under_its_schemes_name_only() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::COOKIE, "x=1; herald_console=abc; y=2".parse().unwrap());
        assert_eq!(cookie_value(&headers, false), Some("abc"));
        assert_eq!(cookie_value(&headers, true), None, "a plain cookie planted in an HTTPS browser");
        headers.insert(axum::http::header::COOKIE, "x=1; __Host-herald-session=def".parse().unwrap());
        assert_eq!(cookie_value(&headers, true), Some("def"));
        assert_eq!(cookie_value(&headers, false), None);
        headers.insert(axum::http::header::COOKIE, "herald_consoleX=abc".parse().unwrap());
        assert_eq!(cookie_value(&headers, false), None);
    }

    #[test]
    fn the_https_cookie_is_host_prefixed_secure_and_has_no_domain() {
        let cookie = set_cookie(true, "v", LIFETIME.as_secs());
        assert!(cookie.starts_with("__Host-herald-session=v;"), "{cookie}");
        let attributes: Vec<&str> = cookie.split(';').skip(1).map(str::trim).collect();
        for attribute in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
            assert!(attributes.contains(&attribute), "{attribute} in {cookie}");
        }
        assert!(!cookie.to_ascii_lowercase().contains("domain"), "{cookie}");
        let plain = set_cookie(false, "v", 0);
        assert_eq!(plain, "herald_console=v; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    }
}
