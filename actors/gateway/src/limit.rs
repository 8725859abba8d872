//! Per-client rate limiting of the fast path: one token bucket per client, checked
//! before the token and before any work, refusing with `ResourceExhausted`.
//!
//! A client is a connection on loopback, a host elsewhere ([`ClientKey::of`]). In
//! local mode every client is on 127.0.0.1 and holds the same 0600 token, so neither
//! the address nor the token tells two local programs apart: the connection does (one
//! tonic channel, one HTTP/2 connection). A remote client could open many connections,
//! so off loopback the whole host shares one bucket. With authenticated users
//! (Kubernetes mode TokenReview) the user would be the better key.
//!
//! [`RateLimitState`] is pure (time is passed in) and unit-tested; [`RateLimit`] is
//! the tonic interceptor around it (a mutex held for one map update, no await).

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tonic::{Request, Status};

use crate::GatewayError;

/// Requests per second and burst per client. `rate` 0 turns limiting off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Sustained requests per second per client.
    pub rate: u32,
    /// Requests a client may send at once after being idle.
    pub burst: u32,
}

impl RateLimitConfig {
    /// The default: 1,000 requests/s and bursts of 2,000 per client. `fsb bench`
    /// (one connection, a few hundred creates/s plus their deletes) stays well below;
    /// a client sending tens of thousands of cheap calls per second does not.
    pub const DEFAULT: Self = Self {
        rate: 1000,
        burst: 2000,
    };

    /// No limit.
    pub const OFF: Self = Self { rate: 0, burst: 0 };
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Whom a call counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// One connection (loopback peers).
    Connection(SocketAddr),
    /// One remote host.
    Host(IpAddr),
    /// The transport gave no peer address (not TCP): all such calls share a bucket.
    Unknown,
}

impl ClientKey {
    /// The key of a call from `peer`.
    pub fn of(peer: Option<SocketAddr>) -> Self {
        match peer {
            Some(a) if a.ip().is_loopback() => Self::Connection(a),
            Some(a) => Self::Host(a.ip()),
            None => Self::Unknown,
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connection(a) => write!(f, "connection {a}"),
            Self::Host(ip) => write!(f, "host {ip}"),
            Self::Unknown => f.write_str("an unknown peer"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets stay until this many clients are tracked; then full (idle) ones go.
const PRUNE_FROM: usize = 1024;

/// The buckets of every client seen recently. Memory is bounded by the clients active
/// within one refill period (`burst / rate` seconds): idle buckets are full and are
/// dropped when the map grows.
#[derive(Debug)]
pub struct RateLimitState {
    config: RateLimitConfig,
    buckets: HashMap<ClientKey, Bucket>,
    prune_at: usize,
}

impl RateLimitState {
    /// Empty state; `config.rate` must be positive.
    pub fn new(config: RateLimitConfig) -> Self {
        Self {
            config: RateLimitConfig {
                rate: config.rate.max(1),
                burst: config.burst.max(1),
            },
            buckets: HashMap::new(),
            prune_at: PRUNE_FROM,
        }
    }

    /// Take one token for `key` at `now`; if there is none, how long until there is.
    pub fn admit(&mut self, key: ClientKey, now: Instant) -> Result<(), Duration> {
        let (rate, burst) = (f64::from(self.config.rate), f64::from(self.config.burst));
        if self.buckets.len() >= self.prune_at {
            self.buckets
                .retain(|_, b| refilled(b, now, rate, burst) < burst);
            self.prune_at = PRUNE_FROM.max(2 * self.buckets.len());
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens = refilled(bucket, now, rate, burst);
        bucket.at = now.max(bucket.at);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }

    /// Clients tracked now.
    pub fn clients(&self) -> usize {
        self.buckets.len()
    }

    /// The limits in force.
    pub fn config(&self) -> RateLimitConfig {
        self.config
    }
}

fn refilled(b: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * rate).min(burst)
}

/// The interceptor: admits a call or refuses it with `ResourceExhausted`.
#[derive(Clone, Debug)]
pub struct RateLimit {
    state: Option<Arc<Mutex<RateLimitState>>>,
}

impl RateLimit {
    /// Limit per `config`; a zero rate admits everything.
    pub fn new(config: RateLimitConfig) -> Self {
        Self {
            state: (config.rate > 0).then(|| Arc::new(Mutex::new(RateLimitState::new(config)))),
        }
    }

    /// Admit a call from `peer` now.
    pub fn check(&self, peer: Option<SocketAddr>) -> Result<(), GatewayError> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let key = ClientKey::of(peer);
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        state.admit(key, Instant::now()).map_err(|wait| {
            let RateLimitConfig { rate, burst } = state.config();
            GatewayError::RateLimited(format!(
                "rate limit: more than {rate} requests/s (burst {burst}) from {key}; retry in {} ms",
                wait.as_millis().max(1)
            ))
        })
    }
}

impl tonic::service::Interceptor for RateLimit {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(req.remote_addr())?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(port: u16) -> ClientKey {
        ClientKey::of(Some(SocketAddr::from(([127, 0, 0, 1], port))))
    }

    #[test]
    fn burst_then_refused_then_refilled_at_the_rate() {
        let mut s = RateLimitState::new(RateLimitConfig { rate: 10, burst: 5 });
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(s.admit(conn(1), t0).is_ok());
        }
        let wait = s.admit(conn(1), t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100), "one token per 1/rate");
        assert!(s.admit(conn(1), t0 + Duration::from_millis(99)).is_err());
        assert!(s.admit(conn(1), t0 + Duration::from_millis(200)).is_ok());
        // A long idle period refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert!(s.admit(conn(1), later).is_ok());
        }
        assert!(s.admit(conn(1), later).is_err());
    }

    #[test]
    fn one_flooding_client_does_not_starve_another() {
        let mut s = RateLimitState::new(RateLimitConfig { rate: 1, burst: 3 });
        let t0 = Instant::now();
        let refused = (0..1000).filter(|_| s.admit(conn(1), t0).is_err()).count();
        assert_eq!(refused, 997);
        assert!(
            s.admit(conn(2), t0).is_ok(),
            "another connection has its own bucket"
        );
        let host = |last| ClientKey::of(Some(SocketAddr::from(([10, 0, 0, last], 9))));
        assert!(s.admit(host(7), t0).is_ok());
    }

    #[test]
    fn remote_connections_of_one_host_share_a_bucket() {
        let a = ClientKey::of(Some(SocketAddr::from(([10, 0, 0, 7], 1000))));
        let b = ClientKey::of(Some(SocketAddr::from(([10, 0, 0, 7], 2000))));
        assert_eq!(a, b);
        assert_ne!(conn(1000), conn(2000));
        assert_eq!(ClientKey::of(None), ClientKey::Unknown);
        let mut s = RateLimitState::new(RateLimitConfig { rate: 1, burst: 2 });
        let t0 = Instant::now();
        assert!(s.admit(a, t0).is_ok());
        assert!(s.admit(b, t0).is_ok());
        assert!(
            s.admit(a, t0).is_err(),
            "a new connection gets no fresh burst"
        );
    }

    #[test]
    fn idle_clients_are_forgotten_and_active_ones_kept() {
        let mut s = RateLimitState::new(RateLimitConfig { rate: 10, burst: 1 });
        let t0 = Instant::now();
        for port in 0..PRUNE_FROM as u16 {
            assert!(s.admit(conn(port), t0).is_ok());
        }
        assert_eq!(s.clients(), PRUNE_FROM);
        // A second later every bucket is full again: all pruned but the newcomer.
        let t1 = t0 + Duration::from_secs(1);
        assert!(s.admit(conn(60_000), t1).is_ok());
        assert_eq!(s.clients(), 1);
        // An emptied bucket survives pruning: a refused client cannot reset itself.
        assert!(s.admit(conn(60_000), t1).is_err());
        for port in 0..PRUNE_FROM as u16 {
            let _ = s.admit(conn(port), t1);
        }
        assert!(s.admit(conn(60_000), t1).is_err());
    }

    #[test]
    fn the_interceptor_answers_resource_exhausted_naming_the_client() {
        let limit = RateLimit::new(RateLimitConfig { rate: 1, burst: 1 });
        let peer = Some(SocketAddr::from(([127, 0, 0, 1], 4242)));
        assert!(limit.check(peer).is_ok());
        let status: Status = limit.check(peer).unwrap_err().into();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("127.0.0.1:4242"),
            "{}",
            status.message()
        );
        let off = RateLimit::new(RateLimitConfig::OFF);
        assert!((0..10_000).all(|_| off.check(peer).is_ok()));
    }
}
