//! Single-use tokens naming a pending streaming request: Exec/Attach/PortForward put
//! the request here and return a URL holding the token; the client's connection
//! takes it out. Tokens expire, and only so many may be outstanding, so a caller
//! that never connects cannot grow vesseld's memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore as _;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} streaming requests are already waiting for their client to connect; retry once some have connected or expired")]
pub struct TooManyTokens(pub usize);

pub struct TokenCache<T> {
    ttl: Duration,
    cap: usize,
    entries: Mutex<HashMap<String, (Instant, T)>>,
}

impl<T> TokenCache<T> {
    pub fn new(ttl: Duration, cap: usize) -> Self {
        Self {
            ttl,
            cap,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, T)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `value` under a new unguessable token (128 random bits, URL-safe).
    pub fn insert(&self, value: T) -> Result<String, TooManyTokens> {
        let now = Instant::now();
        let mut entries = self.lock();
        entries.retain(|_, (deadline, _)| *deadline > now);
        if entries.len() >= self.cap {
            return Err(TooManyTokens(entries.len()));
        }
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        let token = hex::encode(raw);
        entries.insert(token.clone(), (now + self.ttl, value));
        Ok(token)
    }

    /// Takes the value out: a token works once, and not after it expired.
    pub fn take(&self, token: &str) -> Option<T> {
        let (deadline, value) = self.lock().remove(token)?;
        (deadline > Instant::now()).then_some(value)
    }

    /// Reads the value without spending the token: a session refused for its
    /// limits keeps its URL for a retry.
    pub fn peek<R>(&self, token: &str, f: impl FnOnce(&T) -> R) -> Option<R> {
        let entries = self.lock();
        let (deadline, value) = entries.get(token)?;
        (*deadline > Instant::now()).then(|| f(value))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_work_once() {
        let c = TokenCache::new(Duration::from_secs(60), 10);
        let t = c.insert(7).unwrap();
        assert_eq!(t.len(), 32);
        assert_eq!(c.take("nope"), None);
        assert_eq!(c.peek(&t, |v| *v), Some(7));
        assert_eq!(c.take(&t), Some(7));
        assert_eq!(c.peek(&t, |v| *v), None);
        assert_eq!(c.take(&t), None);
    }

    #[test]
    fn tokens_expire() {
        let c = TokenCache::new(Duration::from_millis(30), 10);
        let t = c.insert(1).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.take(&t), None);
    }

    #[test]
    fn outstanding_tokens_are_capped_and_expired_ones_make_room() {
        let c = TokenCache::new(Duration::from_millis(50), 3);
        let toks: Vec<_> = (0..3).map(|i| c.insert(i).unwrap()).collect();
        assert_eq!(c.insert(9), Err(TooManyTokens(3)));
        // Taking one frees its slot.
        c.take(&toks[0]).unwrap();
        c.insert(3).unwrap();
        // Expired ones are swept on the next insert.
        std::thread::sleep(Duration::from_millis(80));
        c.insert(4).unwrap();
        assert_eq!(c.len(), 1);
    }
}
