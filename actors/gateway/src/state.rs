//! The gateway's pure state: which names and request ids are being worked on.
//!
//! Why: two creates of one name, or a create racing a delete of it, must not both
//! proceed; a client retrying a create whose first attempt is still running must get
//! the first attempt's answer (idempotency), not a second sandbox. The store cannot
//! say this alone (in FAST mode the record lands after the answer), so the gateway
//! keeps reservations here, serialized by the [`crate::GatewayActor`]'s mailbox.
//!
//! Invariants: a name has at most one reservation; a request id maps to at most one
//! name; an outcome is published at most once per reservation; every reservation
//! is released exactly once (create finished and recorded, or failed; op finished).

use std::collections::HashMap;

use fsb_core::{NamespaceName, RequestId, SandboxName, spec::SpecDigest};
use fsb_proto::fastpath::v1 as fp;
use tokio::sync::watch;

/// A sandbox's key: (namespace, name).
pub type Key = (NamespaceName, SandboxName);

/// How a create ended, for duplicates that waited on it.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// It succeeded: the answer to replay.
    Done(Box<fp::CreateResponse>),
    /// It failed with this code and message.
    Failed(tonic::Code, String),
}

/// Answer to a create's reservation.
#[derive(Debug)]
pub enum Reservation {
    /// Go ahead; the name and request id are held until released.
    Granted,
    /// The same request (id and spec) is in flight: wait for its outcome.
    InFlight(watch::Receiver<Option<Outcome>>),
    /// Another operation holds the name.
    NameBusy,
    /// The request id is in flight for another name or spec.
    RequestIdReused {
        /// The name it is creating.
        key: Key,
    },
}

#[derive(Debug)]
struct Entry {
    request: Option<(RequestId, SpecDigest)>,
    outcome: watch::Sender<Option<Outcome>>,
}

/// Reservations by name and by request id.
#[derive(Debug, Default)]
pub struct GatewayState {
    by_key: HashMap<Key, Entry>,
    by_request: HashMap<RequestId, Key>,
}

impl GatewayState {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserve `key` for a create by `request_id` with spec `digest`.
    pub fn reserve_create(
        &mut self,
        key: Key,
        request_id: RequestId,
        digest: SpecDigest,
    ) -> Reservation {
        if let Some(held) = self.by_request.get(&request_id) {
            let entry = self.by_key.get(held);
            return match entry.and_then(|e| e.request.as_ref()) {
                Some((_, d)) if *d == digest => Reservation::InFlight(
                    entry.map_or_else(|| watch::channel(None).1, |e| e.outcome.subscribe()),
                ),
                _ => Reservation::RequestIdReused { key: held.clone() },
            };
        }
        if self.by_key.contains_key(&key) {
            return Reservation::NameBusy;
        }
        self.by_request.insert(request_id.clone(), key.clone());
        self.by_key.insert(
            key,
            Entry {
                request: Some((request_id, digest)),
                outcome: watch::channel(None).0,
            },
        );
        Reservation::Granted
    }

    /// Reserve `key` for a delete, reset or expiry; false if it is held.
    pub fn reserve_op(&mut self, key: Key) -> bool {
        if self.by_key.contains_key(&key) {
            return false;
        }
        self.by_key.insert(
            key,
            Entry {
                request: None,
                outcome: watch::channel(None).0,
            },
        );
        true
    }

    /// Tell waiters how the create holding `key` ended; the reservation stays until
    /// [`Self::release`] (a FAST create keeps it until its record lands).
    pub fn publish(&mut self, key: &Key, outcome: Outcome) {
        if let Some(e) = self.by_key.get(key) {
            e.outcome.send_replace(Some(outcome));
        }
    }

    /// Drop the reservation of `key`; true if there was one.
    pub fn release(&mut self, key: &Key) -> bool {
        let Some(entry) = self.by_key.remove(key) else {
            return false;
        };
        if let Some((rid, _)) = entry.request {
            self.by_request.remove(&rid);
        }
        true
    }

    /// Whether `key` is held.
    pub fn is_held(&self, key: &Key) -> bool {
        self.by_key.contains_key(key)
    }

    /// Reservations held.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        (
            NamespaceName::parse("ns", "default").unwrap(),
            SandboxName::parse("name", name).unwrap(),
        )
    }

    fn rid(s: &str) -> RequestId {
        RequestId::parse("request_id", s).unwrap()
    }

    fn digest(b: u8) -> SpecDigest {
        SpecDigest([b; 32])
    }

    #[test]
    fn a_name_is_held_once() {
        let mut s = GatewayState::new();
        assert!(matches!(
            s.reserve_create(key("a"), rid("r1"), digest(1)),
            Reservation::Granted
        ));
        assert!(matches!(
            s.reserve_create(key("a"), rid("r2"), digest(1)),
            Reservation::NameBusy
        ));
        assert!(!s.reserve_op(key("a")));
        assert!(s.release(&key("a")));
        assert!(!s.release(&key("a")), "double release is a no-op");
        assert!(s.reserve_op(key("a")));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_duplicate_request_waits_for_the_first_outcome() {
        let mut s = GatewayState::new();
        s.reserve_create(key("a"), rid("r1"), digest(1));
        let Reservation::InFlight(mut rx) = s.reserve_create(key("b"), rid("r1"), digest(1)) else {
            panic!("expected InFlight");
        };
        assert!(rx.borrow_and_update().is_none());
        s.publish(
            &key("a"),
            Outcome::Failed(tonic::Code::Unavailable, "x".into()),
        );
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            *rx.borrow(),
            Some(Outcome::Failed(tonic::Code::Unavailable, "x".into()))
        );
    }

    #[test]
    fn a_request_id_with_another_spec_is_refused() {
        let mut s = GatewayState::new();
        s.reserve_create(key("a"), rid("r1"), digest(1));
        match s.reserve_create(key("a"), rid("r1"), digest(2)) {
            Reservation::RequestIdReused { key: k } => assert_eq!(k, key("a")),
            other => panic!("{other:?}"),
        }
        s.release(&key("a"));
        assert!(matches!(
            s.reserve_create(key("a"), rid("r1"), digest(2)),
            Reservation::Granted
        ));
        assert!(s.is_held(&key("a")));
    }
}
