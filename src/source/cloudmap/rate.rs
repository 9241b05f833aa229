//! Client-side request budgets: one token bucket per Cloud Map API family, so a
//! large registry never exceeds the account's quotas on its own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket that hands out reservations: a caller that finds it empty is
/// told how long to wait for its token, and the token is already its own, so
/// waiters are served in order and the long-run rate never exceeds `rate`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// May go negative: the tokens already promised to waiting callers.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` requests per second with a burst of one second's worth (at least one).
    pub fn new(rate: f64, now: Instant) -> Self {
        let burst = rate.max(1.0);
        TokenBucket { rate, burst, tokens: burst, last: now }
    }

    /// Takes one token; returns how long the caller must wait before using it.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.rate) }
    }
}

/// A shared bucket for async callers.
#[derive(Debug, Clone)]
pub struct RateLimiter(Arc<Mutex<TokenBucket>>);

impl RateLimiter {
    pub fn new(rate: f64) -> Self {
        RateLimiter(Arc::new(Mutex::new(TokenBucket::new(rate, Instant::now()))))
    }

    /// Waits until the caller may send one request.
    pub async fn acquire(&self) {
        let wait = {
            // A poisoned lock only means a panic elsewhere mid-update; the bucket is still usable.
            let mut bucket = self.0.lock().unwrap_or_else(|e| e.into_inner());
            bucket.reserve(Instant::now())
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_paces_at_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(2.0, t0);
        assert_eq!(bucket.reserve(t0), Duration::ZERO);
        assert_eq!(bucket.reserve(t0), Duration::ZERO);
        // Empty: the third waits half a second, the fourth a whole one.
        assert_eq!(bucket.reserve(t0), Duration::from_millis(500));
        assert_eq!(bucket.reserve(t0), Duration::from_secs(1));
        // One second pays the debt of two tokens: the next waits again.
        assert_eq!(bucket.reserve(t0 + Duration::from_secs(1)), Duration::from_millis(500));
        // Later, the bucket has refilled.
        assert_eq!(bucket.reserve(t0 + Duration::from_secs(10)), Duration::ZERO);
    }

    #[test]
    fn refill_is_capped_at_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(100.0, t0);
        let later = t0 + Duration::from_secs(60);
        let free = (0..200).filter(|_| bucket.reserve(later).is_zero()).count();
        assert_eq!(free, 100);
    }

    #[test]
    fn slow_rates_still_allow_one_request() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(0.5, t0);
        assert_eq!(bucket.reserve(t0), Duration::ZERO);
        assert_eq!(bucket.reserve(t0), Duration::from_secs(2));
    }
}
