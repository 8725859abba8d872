//! [`KubeAuthorizer`]: Kubernetes RBAC on the fast path. The caller's bearer token is
//! checked with a TokenReview, then each call with a SubjectAccessReview for the
//! caller on `sandboxes.sandbox.fast.io` (verb, namespace, name, subresource), so the
//! same Roles that govern `kubectl` govern the fast path.
//!
//! Both answers are cached briefly ([`AuthTtl`]) and boundedly ([`TtlCache`]): a create
//! burst costs one review of each kind, a revoked RoleBinding or token stops working
//! within the TTL. Refusals are cached shorter than grants, so a new RoleBinding takes
//! effect quickly. An API server that cannot answer gives `Unavailable`, never a
//! silent allow, and is not cached.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

use fsb_gateway::{Access, Authorizer, auth::API_GROUP};
use futures::future::BoxFuture;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use sha2::{Digest, Sha256};
use tonic::Status;

/// How long answers are kept, and how many.
#[derive(Clone, Copy, Debug)]
pub struct AuthTtl {
    /// An authenticated token, and an allowed call.
    pub allowed: Duration,
    /// A rejected token, and a denied call.
    pub denied: Duration,
    /// Entries per cache (tokens; decisions).
    pub capacity: usize,
}

impl Default for AuthTtl {
    fn default() -> Self {
        Self {
            allowed: Duration::from_secs(10),
            denied: Duration::from_secs(2),
            capacity: 10_000,
        }
    }
}

/// A map whose entries expire, bounded: when full, expired entries go, and if it is
/// still full everything goes (a cache miss costs one review, never a wrong answer).
#[derive(Debug)]
pub struct TtlCache<K, V> {
    entries: HashMap<K, (V, Instant)>,
    capacity: usize,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    /// Empty, holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The value of `key` if it has not expired at `now`.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        match self.entries.get(key) {
            Some((v, until)) if now < *until => Some(v.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keep `value` for `key` until `now + ttl`.
    pub fn insert(&mut self, key: K, value: V, ttl: Duration, now: Instant) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, until)| now < *until);
            if self.entries.len() >= self.capacity {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (value, now + ttl));
    }

    /// Entries held (expired ones included until touched).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Who a token belongs to, as the API server said.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Caller {
    /// User name (`system:serviceaccount:ns:sa` for a ServiceAccount).
    pub username: String,
    /// User uid, if any.
    pub uid: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes (e.g. the ServiceAccount token's pod).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The token review's answer: who, or why not.
type Authn = Result<Caller, String>;
/// The access review's answer: allowed, or why not.
type Authz = Result<(), String>;

/// TokenReview + SubjectAccessReview against the API server, cached.
pub struct KubeAuthorizer {
    client: Client,
    ttl: AuthTtl,
    /// By SHA-256 of the token (tokens themselves are not kept).
    tokens: Mutex<TtlCache<[u8; 32], Authn>>,
    decisions: Mutex<TtlCache<(Caller, Access), Authz>>,
}

impl std::fmt::Debug for KubeAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuthorizer")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: kube::Error) -> Status {
    Status::unavailable(format!("{what} with the API server: {e}"))
}

impl KubeAuthorizer {
    /// Over `client`, whose identity needs `create` on `tokenreviews` and
    /// `subjectaccessreviews` (ClusterRole `system:auth-delegator` has both).
    pub fn new(client: Client, ttl: AuthTtl) -> Self {
        Self {
            client,
            ttl,
            tokens: Mutex::new(TtlCache::new(ttl.capacity)),
            decisions: Mutex::new(TtlCache::new(ttl.capacity)),
        }
    }

    fn ttl_of<T>(&self, answer: &Result<T, String>) -> Duration {
        if answer.is_ok() {
            self.ttl.allowed
        } else {
            self.ttl.denied
        }
    }

    /// Who holds `token`: cached, else a TokenReview.
    async fn caller(&self, token: &str) -> Result<Caller, Status> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = lock(&self.tokens).get(&key, Instant::now());
        let answer = match cached {
            Some(a) => a,
            None => {
                let a = self.review_token(token).await?;
                let ttl = self.ttl_of(&a);
                lock(&self.tokens).insert(key, a.clone(), ttl, Instant::now());
                a
            }
        };
        answer.map_err(|why| Status::unauthenticated(format!("token rejected: {why}")))
    }

    async fn review_token(&self, token: &str) -> Result<Authn, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        let done = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable("checking the token", e))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(Err(status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "the API server does not know it".into())));
        }
        let user = status.user.unwrap_or_default();
        Ok(Ok(Caller {
            username: user.username.unwrap_or_default(),
            uid: user.uid.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default().into_iter().collect(),
        }))
    }

    /// Whether `caller` may do `access`: cached, else a SubjectAccessReview.
    async fn decide(&self, caller: Caller, access: Access) -> Result<(), Status> {
        let key = (caller, access);
        let cached = lock(&self.decisions).get(&key, Instant::now());
        let answer = match cached {
            Some(a) => a,
            None => {
                let a = self.review_access(&key.0, &key.1).await?;
                let ttl = self.ttl_of(&a);
                lock(&self.decisions).insert(key.clone(), a.clone(), ttl, Instant::now());
                a
            }
        };
        let (caller, access) = key;
        answer.map_err(|why| {
            let mut msg = format!("forbidden: User \"{}\" cannot {access}", caller.username);
            if !why.is_empty() {
                msg.push_str(": ");
                msg.push_str(&why);
            }
            Status::permission_denied(msg)
        })
    }

    async fn review_access(&self, caller: &Caller, access: &Access) -> Result<Authz, Status> {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.username.clone()),
                uid: opt(&caller.uid),
                groups: Some(caller.groups.clone()),
                extra: Some(caller.extra.clone().into_iter().collect()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(API_GROUP.into()),
                    resource: Some(access.resource.into()),
                    subresource: opt(access.subresource),
                    verb: Some(access.verb.into()),
                    namespace: opt(&access.namespace),
                    name: opt(&access.name),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let done = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable("checking the caller's rights", e))?;
        let status = done.status.unwrap_or_default();
        if status.allowed && status.denied != Some(true) {
            Ok(Ok(()))
        } else {
            Ok(Err(status.reason.unwrap_or_default()))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it cannot leave a cache half-written in a way that
    // matters: entries are whole values.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Authorizer for KubeAuthorizer {
    fn authorize(
        &self,
        token: Option<String>,
        access: Access,
    ) -> BoxFuture<'_, Result<(), Status>> {
        Box::pin(async move {
            let Some(token) = token else {
                return Err(Status::unauthenticated(
                    "missing `authorization: Bearer <token>`: send a Kubernetes token \
                     (e.g. `FSB_TOKEN=$(kubectl create token NAME)`)",
                ));
            };
            let caller = self.caller(&token).await?;
            self.decide(caller, access).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(4);
        c.insert("a", 1, Duration::from_secs(10), t0);
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(9)), Some(1));
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(10)), None);
        assert!(c.is_empty(), "an expired entry goes when read");
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first_then_everything() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(3);
        c.insert(1, (), Duration::from_secs(1), t0);
        c.insert(2, (), Duration::from_secs(100), t0);
        c.insert(3, (), Duration::from_secs(100), t0);
        let later = t0 + Duration::from_secs(5);
        c.insert(4, (), Duration::from_secs(100), later);
        assert_eq!(c.len(), 3, "the expired entry made room");
        assert_eq!(c.get(&2, later), Some(()));
        c.insert(5, (), Duration::from_secs(100), later);
        assert_eq!(
            c.len(),
            1,
            "nothing expired: cleared, never grown past capacity"
        );
        assert_eq!(c.get(&5, later), Some(()));
        // Replacing a key never evicts.
        c.insert(5, (), Duration::from_secs(1), later);
        assert_eq!(c.len(), 1);
    }

    proptest::proptest! {
        #[test]
        fn never_exceeds_capacity(keys in proptest::collection::vec(0u8..50, 0..200), cap in 1usize..20) {
            let t0 = Instant::now();
            let mut c = TtlCache::new(cap);
            for (i, k) in keys.iter().enumerate() {
                let now = t0 + Duration::from_millis(i as u64);
                c.insert(*k, i, Duration::from_millis(30), now);
                proptest::prop_assert!(c.len() <= cap);
                proptest::prop_assert_eq!(c.get(k, now), Some(i));
            }
        }
    }
}
