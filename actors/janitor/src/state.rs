//! The janitor's decision, pure and synchronous: given what containerd says about one
//! container and what the API server says about its Sandbox and its agent pod, keep it
//! or remove it. No I/O here; [`crate::janitor`] gathers the facts.

use std::{collections::HashMap, fmt, time::Duration, time::SystemTime};

use fsb_core::{
    SandboxId,
    labels::{
        LABEL_AGENT_UID, LABEL_CLAIM_UID, LABEL_ID, LABEL_MANAGED, LABEL_NAMESPACE,
        LABEL_SANDBOX_NAME,
    },
};

/// What containerd says about one container (its id, labels and creation time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerFacts {
    /// The containerd container id.
    pub id: SandboxId,
    /// `fast-sandbox.io/managed=true`.
    pub managed: bool,
    /// `fast-sandbox.io/namespace`: Kubernetes namespace of its Sandbox.
    pub namespace: Option<String>,
    /// `fast-sandbox.io/sandbox-name`: name of its Sandbox.
    pub sandbox_name: Option<String>,
    /// `fast-sandbox.io/claim-uid`: claim uid of the Sandbox it was created for.
    pub claim_uid: Option<String>,
    /// `fast-sandbox.io/id`: the sandbox id (the container id when absent).
    pub sandbox_id: Option<String>,
    /// `fast-sandbox.io/agent-uid`: UID of the agent pod that created it.
    pub agent_uid: Option<String>,
    /// When containerd created it (`None`: containerd did not say).
    pub created_at: Option<SystemTime>,
}

impl ContainerFacts {
    /// From a container's id, labels and creation time. Empty label values count as
    /// absent.
    pub fn from_labels(
        id: &SandboxId,
        labels: &HashMap<String, String>,
        created_at: Option<SystemTime>,
    ) -> Self {
        let label = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
        Self {
            id: id.clone(),
            managed: labels.get(LABEL_MANAGED).is_some_and(|v| v == "true"),
            namespace: label(LABEL_NAMESPACE),
            sandbox_name: label(LABEL_SANDBOX_NAME),
            claim_uid: label(LABEL_CLAIM_UID),
            sandbox_id: label(LABEL_ID),
            agent_uid: label(LABEL_AGENT_UID),
            created_at,
        }
    }

    /// The Sandbox to look up: (namespace, name), if both labels are there.
    pub fn sandbox_key(&self) -> Option<(&str, &str)> {
        Some((self.namespace.as_deref()?, self.sandbox_name.as_deref()?))
    }

    /// The sandbox id this container is: its `fast-sandbox.io/id` label, else its id.
    pub fn effective_sandbox_id(&self) -> &str {
        self.sandbox_id.as_deref().unwrap_or(self.id.as_str())
    }

    /// How old it is at `now` (zero if created "in the future" by clock skew); `None`
    /// without a creation time.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        self.created_at
            .map(|c| now.duration_since(c).unwrap_or(Duration::ZERO))
    }

    /// Whether [`decide`] needs the API server's answers for it: managed and older
    /// than the timeout. Otherwise the verdict is Keep whatever they are, and the
    /// janitor skips the lookups.
    pub fn needs_lookup(&self, now: SystemTime, orphan_timeout: Duration) -> bool {
        self.managed && self.age(now).is_some_and(|age| age >= orphan_timeout)
    }
}

/// What the API server says about the container's Sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxFacts {
    /// Its claim uid: metadata label `fast-sandbox.io/claim-uid` if present, else
    /// `metadata.uid`.
    pub claim_uid: String,
    /// The sandbox id it states, read as the store reads it
    /// ([`fsb_controller::store::stated_sandbox_id`]); `None` if it states none.
    pub sandbox_id: Option<String>,
}

/// A three-valued answer about an object (seed-review item 9): only [`Existence::Gone`]
/// is proof of absence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Existence<T> {
    /// The API server returned it.
    Exists(T),
    /// The API server said it does not exist (404 NotFound for this very object).
    Gone,
    /// Anything else: an error, a timeout, an unreachable server. Never proof.
    Unknown(String),
}

/// Why a container is an orphan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrphanReason {
    /// Its Sandbox does not exist.
    SandboxGone,
    /// Its Sandbox exists but is another object of the same name (recreated).
    ClaimUidMismatch {
        /// The container's `claim-uid` label.
        container: String,
        /// The Sandbox's claim uid.
        sandbox: String,
    },
    /// Its Sandbox exists, same claim, but points at another container.
    SandboxIdMismatch {
        /// This container's sandbox id.
        container: String,
        /// The Sandbox's `status.sandboxID`.
        sandbox: String,
    },
    /// The agent pod that created it does not exist.
    AgentPodGone,
}

impl fmt::Display for OrphanReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SandboxGone => f.write_str("sandbox gone"),
            Self::ClaimUidMismatch { container, sandbox } => write!(
                f,
                "sandbox recreated: claim uid {sandbox}, container claimed by {container}"
            ),
            Self::SandboxIdMismatch { container, sandbox } => write!(
                f,
                "sandbox points at {sandbox}, not at this container ({container})"
            ),
            Self::AgentPodGone => f.write_str("agent pod gone"),
        }
    }
}

/// Why a container stays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// Not labelled `fast-sandbox.io/managed=true`: not ours.
    NotManaged,
    /// containerd gave no creation time, so its age cannot be bounded.
    NoCreationTime,
    /// Younger than the orphan timeout (a FAST create's record may still land).
    TooYoung,
    /// Its Sandbox and agent pod exist and match it.
    Live,
    /// No namespace or sandbox-name label, and no proof against it otherwise.
    Unlabelled,
    /// An answer was unknown and nothing else proves it an orphan; retried next scan.
    Unknown(String),
}

/// The decision for one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Leave it.
    Keep(KeepReason),
    /// Remove it, for this reason.
    Remove(OrphanReason),
}

/// Decide one container's fate. See the crate documentation for the rules; in short:
/// only managed containers older than `orphan_timeout` can be removed, and only on
/// proof (a Sandbox or agent pod that is [`Existence::Gone`], or a Sandbox that exists
/// but belongs to something else). An [`Existence::Unknown`] answer never removes.
pub fn decide(
    container: &ContainerFacts,
    sandbox: &Existence<SandboxFacts>,
    agent_pod: &Existence<()>,
    now: SystemTime,
    orphan_timeout: Duration,
) -> Verdict {
    if !container.managed {
        return Verdict::Keep(KeepReason::NotManaged);
    }
    let Some(age) = container.age(now) else {
        return Verdict::Keep(KeepReason::NoCreationTime);
    };
    if age < orphan_timeout {
        return Verdict::Keep(KeepReason::TooYoung);
    }
    let mut unknown = None;
    if container.sandbox_key().is_some() {
        match sandbox {
            Existence::Gone => return Verdict::Remove(OrphanReason::SandboxGone),
            Existence::Exists(s) => {
                if let Some(claim) = &container.claim_uid
                    && *claim != s.claim_uid
                {
                    return Verdict::Remove(OrphanReason::ClaimUidMismatch {
                        container: claim.clone(),
                        sandbox: s.claim_uid.clone(),
                    });
                }
                if let Some(id) = &s.sandbox_id
                    && id != container.effective_sandbox_id()
                {
                    return Verdict::Remove(OrphanReason::SandboxIdMismatch {
                        container: container.effective_sandbox_id().to_owned(),
                        sandbox: id.clone(),
                    });
                }
            }
            Existence::Unknown(why) => unknown = Some(format!("sandbox: {why}")),
        }
    }
    if container.agent_uid.is_some() {
        match agent_pod {
            Existence::Gone => return Verdict::Remove(OrphanReason::AgentPodGone),
            Existence::Exists(()) => {}
            Existence::Unknown(why) => {
                let why = format!("agent pod: {why}");
                unknown = Some(match unknown {
                    Some(u) => format!("{u}; {why}"),
                    None => why,
                });
            }
        }
    }
    match unknown {
        Some(why) => Verdict::Keep(KeepReason::Unknown(why)),
        None if container.sandbox_key().is_none() => Verdict::Keep(KeepReason::Unlabelled),
        None => Verdict::Keep(KeepReason::Live),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(120);
    const ID: &str = "0123456789abcdef0123456789abcdef";
    const OTHER: &str = "4567456745674567456745674567abcd";
    const THIRD: &str = "99999999999999999999999999999999";

    fn sid(s: &str) -> SandboxId {
        SandboxId::parse("id", s).unwrap()
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    /// A managed, old container of Sandbox `ns/name`, claim `c1`, agent `a1`.
    fn container() -> ContainerFacts {
        ContainerFacts {
            id: sid(ID),
            managed: true,
            namespace: Some("team-a".into()),
            sandbox_name: Some("web".into()),
            claim_uid: Some("c1".into()),
            sandbox_id: Some(ID.into()),
            agent_uid: Some("a1".into()),
            created_at: Some(now() - TIMEOUT * 2),
        }
    }

    fn live() -> Existence<SandboxFacts> {
        Existence::Exists(SandboxFacts {
            claim_uid: "c1".into(),
            sandbox_id: Some(ID.into()),
        })
    }

    fn unknown<T>() -> Existence<T> {
        Existence::Unknown("connection refused".into())
    }

    fn run(c: &ContainerFacts, s: &Existence<SandboxFacts>, a: &Existence<()>) -> Verdict {
        decide(c, s, a, now(), TIMEOUT)
    }

    #[test]
    fn a_live_sandbox_is_kept() {
        let c = container();
        assert_eq!(
            run(&c, &live(), &Existence::Exists(())),
            Verdict::Keep(KeepReason::Live)
        );
    }

    #[test]
    fn labels_are_read_and_empty_values_are_absent() {
        let labels: HashMap<String, String> = [
            (LABEL_MANAGED, "true"),
            (LABEL_NAMESPACE, "team-a"),
            (LABEL_SANDBOX_NAME, "web"),
            (LABEL_CLAIM_UID, ""),
            (LABEL_ID, ID),
            (LABEL_AGENT_UID, "a1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let c = ContainerFacts::from_labels(&sid(ID), &labels, Some(now()));
        assert!(c.managed);
        assert_eq!(c.sandbox_key(), Some(("team-a", "web")));
        assert_eq!(c.claim_uid, None);
        assert_eq!(c.agent_uid.as_deref(), Some("a1"));
        let mut other = labels.clone();
        other.insert(LABEL_MANAGED.into(), "yes".into());
        assert!(!ContainerFacts::from_labels(&sid(ID), &other, None).managed);
    }

    #[test]
    fn the_sandbox_namespace_comes_from_the_label_never_default() {
        // Seed item 8: the key the janitor looks up is the container's own namespace.
        let c = container();
        assert_eq!(c.sandbox_key(), Some(("team-a", "web")));
    }

    #[test]
    fn sandbox_gone_removes_only_after_the_timeout() {
        let mut c = container();
        assert_eq!(
            run(&c, &Existence::Gone, &Existence::Exists(())),
            Verdict::Remove(OrphanReason::SandboxGone)
        );
        c.created_at = Some(now() - TIMEOUT + Duration::from_millis(1));
        assert_eq!(
            run(&c, &Existence::Gone, &Existence::Gone),
            Verdict::Keep(KeepReason::TooYoung)
        );
        c.created_at = Some(now() - TIMEOUT);
        assert_eq!(
            run(&c, &Existence::Gone, &Existence::Exists(())),
            Verdict::Remove(OrphanReason::SandboxGone),
            "exactly the timeout is old enough"
        );
        c.created_at = Some(now() + Duration::from_secs(3600));
        assert_eq!(
            run(&c, &Existence::Gone, &Existence::Gone),
            Verdict::Keep(KeepReason::TooYoung),
            "a creation time in the future (clock skew) is age zero"
        );
        c.created_at = None;
        assert_eq!(
            run(&c, &Existence::Gone, &Existence::Gone),
            Verdict::Keep(KeepReason::NoCreationTime)
        );
    }

    #[test]
    fn unknown_never_removes() {
        let c = container();
        for agent in [Existence::Exists(()), unknown()] {
            assert!(matches!(
                run(&c, &unknown(), &agent),
                Verdict::Keep(KeepReason::Unknown(_))
            ));
        }
        assert!(matches!(
            run(&c, &live(), &unknown()),
            Verdict::Keep(KeepReason::Unknown(_))
        ));
    }

    #[test]
    fn a_recreated_sandbox_or_another_sandbox_id_removes() {
        let c = container();
        let recreated = Existence::Exists(SandboxFacts {
            claim_uid: "c2".into(),
            sandbox_id: None,
        });
        assert_eq!(
            run(&c, &recreated, &Existence::Exists(())),
            Verdict::Remove(OrphanReason::ClaimUidMismatch {
                container: "c1".into(),
                sandbox: "c2".into()
            })
        );
        let moved = Existence::Exists(SandboxFacts {
            claim_uid: "c1".into(),
            sandbox_id: Some(OTHER.into()),
        });
        assert_eq!(
            run(&c, &moved, &Existence::Exists(())),
            Verdict::Remove(OrphanReason::SandboxIdMismatch {
                container: ID.into(),
                sandbox: OTHER.into()
            })
        );
        let pending = Existence::Exists(SandboxFacts {
            claim_uid: "c1".into(),
            sandbox_id: None,
        });
        assert_eq!(
            run(&c, &pending, &Existence::Exists(())),
            Verdict::Keep(KeepReason::Live),
            "a sandbox whose status has no id yet keeps its container"
        );
    }

    #[test]
    fn the_container_id_stands_in_for_a_missing_id_label() {
        let mut c = container();
        c.sandbox_id = None;
        assert_eq!(
            run(&c, &live(), &Existence::Exists(())),
            Verdict::Keep(KeepReason::Live)
        );
        c.id = sid(THIRD);
        assert!(matches!(
            run(&c, &live(), &Existence::Exists(())),
            Verdict::Remove(OrphanReason::SandboxIdMismatch { .. })
        ));
    }

    #[test]
    fn agent_pod_gone_removes_even_when_the_sandbox_is_unknown() {
        let c = container();
        assert_eq!(
            run(&c, &live(), &Existence::Gone),
            Verdict::Remove(OrphanReason::AgentPodGone)
        );
        assert_eq!(
            run(&c, &unknown(), &Existence::Gone),
            Verdict::Remove(OrphanReason::AgentPodGone)
        );
    }

    #[test]
    fn unmanaged_and_unlabelled_containers_stay() {
        let mut c = container();
        c.managed = false;
        assert_eq!(
            run(&c, &Existence::Gone, &Existence::Gone),
            Verdict::Keep(KeepReason::NotManaged)
        );
        let mut c = container();
        c.namespace = None;
        c.agent_uid = None;
        assert_eq!(
            run(&c, &Existence::Gone, &Existence::Gone),
            Verdict::Keep(KeepReason::Unlabelled),
            "without the labels, the answers were not about this container"
        );
    }

    // --- exhaustive: every combination of a small domain, checked against the rules --

    fn option_values(v: &str) -> [Option<String>; 2] {
        [None, Some(v.to_owned())]
    }

    fn all_containers() -> Vec<ContainerFacts> {
        let mut out = Vec::new();
        let ages = [
            None,
            Some(now() - TIMEOUT * 2),
            Some(now() - TIMEOUT),
            Some(now() - TIMEOUT / 2),
            Some(now() + TIMEOUT),
        ];
        for managed in [false, true] {
            for created_at in ages {
                for namespace in option_values("team-a") {
                    for sandbox_name in option_values("web") {
                        for claim_uid in option_values("c1") {
                            for sandbox_id in option_values(ID) {
                                for agent_uid in option_values("a1") {
                                    out.push(ContainerFacts {
                                        id: sid(ID),
                                        managed,
                                        namespace: namespace.clone(),
                                        sandbox_name: sandbox_name.clone(),
                                        claim_uid: claim_uid.clone(),
                                        sandbox_id: sandbox_id.clone(),
                                        agent_uid: agent_uid.clone(),
                                        created_at,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn all_sandboxes() -> Vec<Existence<SandboxFacts>> {
        let mut out = vec![Existence::Gone, unknown()];
        for claim in ["c1", "c2"] {
            for id in [None, Some(ID), Some(OTHER)] {
                out.push(Existence::Exists(SandboxFacts {
                    claim_uid: claim.into(),
                    sandbox_id: id.map(str::to_owned),
                }));
            }
        }
        out
    }

    /// The rules of the crate doc, written independently of `decide`'s control flow.
    fn proof(c: &ContainerFacts, s: &Existence<SandboxFacts>, a: &Existence<()>) -> bool {
        let sandbox_proof = c.sandbox_key().is_some()
            && match s {
                Existence::Gone => true,
                Existence::Exists(s) => {
                    c.claim_uid.as_ref().is_some_and(|cl| *cl != s.claim_uid)
                        || s.sandbox_id
                            .as_deref()
                            .is_some_and(|id| id != c.effective_sandbox_id())
                }
                Existence::Unknown(_) => false,
            };
        let agent_proof = c.agent_uid.is_some() && matches!(a, Existence::Gone);
        sandbox_proof || agent_proof
    }

    #[test]
    fn every_combination_follows_the_rules() {
        let agents = [Existence::Exists(()), Existence::Gone, unknown()];
        let mut checked = 0;
        for c in all_containers() {
            let old = c.age(now()).is_some_and(|a| a >= TIMEOUT);
            for s in all_sandboxes() {
                for a in &agents {
                    let v = run(&c, &s, a);
                    let should_remove = c.managed && old && proof(&c, &s, a);
                    assert_eq!(
                        matches!(v, Verdict::Remove(_)),
                        should_remove,
                        "{c:?} {s:?} {a:?} -> {v:?}"
                    );
                    if let Verdict::Remove(reason) = &v {
                        let consistent = match reason {
                            OrphanReason::SandboxGone => matches!(s, Existence::Gone),
                            OrphanReason::ClaimUidMismatch { .. }
                            | OrphanReason::SandboxIdMismatch { .. } => {
                                matches!(s, Existence::Exists(_))
                            }
                            OrphanReason::AgentPodGone => matches!(a, Existence::Gone),
                        };
                        assert!(consistent, "{c:?} {s:?} {a:?} -> {v:?}");
                    }
                    let relevant_unknown = (c.sandbox_key().is_some()
                        && matches!(s, Existence::Unknown(_)))
                        || (c.agent_uid.is_some() && matches!(a, Existence::Unknown(_)));
                    assert_eq!(
                        matches!(v, Verdict::Keep(KeepReason::Unknown(_))),
                        c.managed && old && !should_remove && relevant_unknown,
                        "{c:?} {s:?} {a:?} -> {v:?}"
                    );
                    if !c.needs_lookup(now(), TIMEOUT) {
                        assert!(
                            matches!(v, Verdict::Keep(_)),
                            "no lookup means no removal: {c:?} -> {v:?}"
                        );
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * 5 * 32 * 8 * 3);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn existence() -> impl Strategy<Value = Existence<SandboxFacts>> {
            prop_oneof![
                Just(Existence::Gone),
                ".{0,8}".prop_map(Existence::Unknown),
                (
                    "c[12]",
                    proptest::option::of(prop_oneof![Just(ID.to_owned()), Just(OTHER.to_owned())])
                )
                    .prop_map(|(claim_uid, sandbox_id)| {
                        Existence::Exists(SandboxFacts {
                            claim_uid,
                            sandbox_id,
                        })
                    }),
            ]
        }

        proptest! {
            /// Whatever the answers, an unknown one is never the reason for a removal,
            /// and nothing younger than the timeout is removed.
            #[test]
            fn unknown_and_young_never_remove(
                age_ms in 0u64..400_000,
                timeout_ms in 0u64..300_000,
                claim in proptest::option::of("c[12]"),
                id in prop_oneof![Just(ID), Just(OTHER)],
                sandbox in existence(),
                agent_label in any::<bool>(),
            ) {
                let timeout = Duration::from_millis(timeout_ms);
                let c = ContainerFacts {
                    id: sid(id),
                    managed: true,
                    namespace: Some("ns".into()),
                    sandbox_name: Some("n".into()),
                    claim_uid: claim,
                    sandbox_id: Some(id.to_owned()),
                    agent_uid: agent_label.then(|| "a".to_owned()),
                    created_at: Some(now() - Duration::from_millis(age_ms)),
                };
                let v = decide(&c, &sandbox, &Existence::Unknown("x".into()), now(), timeout);
                if age_ms < timeout_ms {
                    prop_assert_eq!(&v, &Verdict::Keep(KeepReason::TooYoung));
                } else if let Verdict::Remove(reason) = &v {
                    prop_assert!(!matches!(reason, OrphanReason::AgentPodGone));
                    prop_assert!(!matches!(sandbox, Existence::Unknown(_)));
                }
                if matches!(sandbox, Existence::Unknown(_)) {
                    prop_assert!(matches!(v, Verdict::Keep(_)));
                }
            }
        }
    }
}
