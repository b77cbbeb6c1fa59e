//! Console sessions: a sign-in exchanges a Kubernetes token or ESB app credentials (or,
//! with the development anonymous switch, nothing) for a random session id in an HttpOnly, SameSite=Strict cookie
//! and a CSRF token the page sends back on every change. Sessions live in memory, end after
//! `IDLE` without use or `LIFETIME` after sign-in, and are bounded in number: signing in
//! past `MAX_PER_USER` ends that user's oldest, past `MAX_SESSIONS` the one nearest its end.

use base64::Engine;
use parking_lot::Mutex;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const COOKIE: &str = "herald_console";
pub const CSRF_HEADER: &str = "x-csrf-token";
pub const IDLE: Duration = Duration::from_secs(30 * 60);
pub const LIFETIME: Duration = Duration::from_secs(8 * 60 * 60);
const MAX_SESSIONS: usize = 10_000;
/// Sessions one user may hold: signing in past it ends that user's oldest, so no user can
/// push the others' sessions out.
const MAX_PER_USER: usize = 16;

/// What the session acts with: every request is authenticated and authorised again with it,
/// exactly as the REST API does for a caller presenting it.
#[derive(Clone, PartialEq)]
pub enum Credential {
    Bearer(String),
    App { code: String, secret: String },
    Anonymous,
}

/// Never the token or the secret.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Bearer(_) => f.write_str("Bearer(…)"),
            Credential::App { code, .. } => write!(f, "App({code}, …)"),
            Credential::Anonymous => f.write_str("Anonymous"),
        }
    }
}

#[derive(Clone)]
pub struct Session {
    pub credential: Credential,
    pub csrf: String,
    /// Shown on the page.
    pub user: String,
    ends: Instant,
    idle_until: Instant,
}

pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
    random: SystemRandom,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions { open: Mutex::new(HashMap::new()), random: SystemRandom::new() }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomFailed;

impl Sessions {
    /// Opens a session; returns its id and CSRF token.
    pub fn open(&self, credential: Credential, user: String) -> Result<(String, String), RandomFailed> {
        let (id, csrf) = (self.random_token()?, self.random_token()?);
        let now = Instant::now();
        let session = Session { credential, csrf: csrf.clone(), user, ends: now + LIFETIME, idle_until: now + IDLE };
        let mut open = self.open.lock();
        open.retain(|_, s| s.live(now));
        let theirs = open.iter().filter(|(_, s)| s.user == session.user);
        if theirs.clone().count() >= MAX_PER_USER
            && let Some(oldest) = theirs.min_by_key(|(_, s)| s.ends).map(|(k, _)| k.clone())
        {
            open.remove(&oldest);
        }
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open.iter().min_by_key(|(_, s)| s.idle_until.min(s.ends)).map(|(k, _)| k.clone())
        {
            open.remove(&oldest);
        }
        open.insert(id.clone(), session);
        Ok((id, csrf))
    }

    /// The live session `id` names, its idle time restarted.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut open = self.open.lock();
        match open.get_mut(id) {
            Some(session) if session.live(now) => {
                session.idle_until = now + IDLE;
                Some(session.clone())
            }
            Some(_) => {
                open.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn close(&self, id: &str) {
        self.open.lock().remove(id);
    }

    fn random_token(&self) -> Result<String, RandomFailed> {
        let mut bytes = [0u8; 32];
        self.random.fill(&mut bytes).map_err(|_| RandomFailed)?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }
}

impl Session {
    fn live(&self, now: Instant) -> bool {
        now < self.ends && now < self.idle_until
    }
}

/// The session id in a request's cookies.
pub fn cookie_value(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sessions_are_random_found_by_id_and_closed() {
        let sessions = Sessions::default();
        let (a, csrf_a) = sessions.open(Credential::Anonymous, "anonymous".into()).unwrap();
        let (b, _) = sessions.open(Credential::Bearer("t".into()), "alice".into()).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, csrf_a);
        assert_eq!(a.len(), 43, "32 random bytes, base64url");
        assert_eq!(sessions.get(&b).unwrap().credential, Credential::Bearer("t".into()));
        assert_eq!(sessions.get(&a).unwrap().csrf, csrf_a);
        sessions.close(&a);
        assert!(sessions.get(&a).is_none());
        assert!(sessions.get("forged").is_none());
    }

    #[test]
    fn one_user_signing_in_again_and_again_ends_only_their_own_oldest_sessions() {
        let sessions = Sessions::default();
        let (other, _) = sessions.open(Credential::Anonymous, "bob".into()).unwrap();
        let first = sessions.open(Credential::Bearer("t".into()), "alice".into()).unwrap().0;
        for _ in 0..MAX_PER_USER {
            sessions.open(Credential::Bearer("t".into()), "alice".into()).unwrap();
        }
        assert!(sessions.get(&first).is_none(), "alice's oldest went");
        assert!(sessions.get(&other).is_some(), "bob's stays");
        assert_eq!(format!("{:?}", Credential::Bearer("secret-token".into())), "Bearer(…)");
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::COOKIE, "x=1; herald_console=abc; y=2".parse().unwrap());
        assert_eq!(cookie_value(&headers), Some("abc"));
        headers.insert(axum::http::header::COOKIE, "herald_consoleX=abc".parse().unwrap());
        assert_eq!(cookie_value(&headers), None);
    }
}
