//! The agent's side of `agent.v1.AgentControl/Session`: the one stream the agent keeps
//! open to its controller.
//!
//! A stream always starts the same way: `register`, wait for `registered` (its
//! `heartbeat_interval_ms`, when non-zero, overrides ours), then a full `inventory`.
//! After that, concurrently:
//! - a heartbeat every interval, each interval jittered by `±jitter` (missed ticks are
//!   skipped, never queued); `used` = sandboxes held, `healthy = true`;
//! - every [`PhaseChange`] from [`AgentHandle::subscribe`] forwarded as a
//!   `SandboxEvent`, followed by a fresh inventory once the batch settles (at most one
//!   inventory per [`INVENTORY_MIN_GAP`]);
//! - `inventory_request` answered with a full inventory; `drain` recorded in a flag
//!   ([`SessionTask::drain_requested`]); stopping admissions is future work.
//!
//! Inventory "deltas" are full snapshots for now: every inventory the agent sends is
//! the whole truth (sandboxes from the actor, images from containerd), so the
//! controller can replace what it holds. Removal of a deleted sandbox publishes no
//! phase change (the last one is `Deleting`), so the heartbeat also compares the
//! held ids with the last inventory sent and sends a fresh one when they differ.
//!
//! When the stream breaks or the controller is unreachable the task reconnects with
//! exponential backoff (jittered, capped at `reconnect_backoff_max`, reset after a
//! successful registration) and starts over with `register` + full inventory. It
//! never panics: errors are logged and retried until the task is stopped.
//!
//! Randomness for jitter comes from a xorshift64* generator seeded from the clock and
//! the pid: no dependency, and jitter needs no quality beyond "not in lockstep".

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use fsb_core::SandboxId;
use fsb_proto::{
    agent::v1::{
        AgentMessage, ControllerMessage, Heartbeat, ImageInfo, Inventory, Register, SandboxEvent,
        SandboxInfo, WarmCount, agent_control_client::AgentControlClient,
        agent_message::Msg as Out, controller_message::Msg as In,
    },
    fastpath::v1::Phase,
};
use tokio::{
    sync::{broadcast, mpsc},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};
use tokio_stream::wrappers::ReceiverStream;

use crate::{AgentHandle, PhaseChange, SandboxPhase, SandboxRecord, warm::WarmKey};

/// How often the warm instances are compared with the last inventory's.
const WARM_CHECK: Duration = Duration::from_millis(250);
/// Least time between two inventories sent because of phase changes.
pub const INVENTORY_MIN_GAP: Duration = Duration::from_millis(100);
/// First reconnect delay; doubles up to `reconnect_backoff_max`.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// How long the controller has to answer `register` (and to accept the connection).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Outbound messages buffered before sends wait for the controller.
const OUTBOUND_BUFFER: usize = 64;

/// Where and how the agent reports to its controller.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// The controller's AgentControl service, `http://host:port` (`https://` with
    /// `tls`).
    pub controller: String,
    /// Mutual TLS: our certificate, the CA, and the controller's name to verify
    /// (None: plaintext).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// What the agent says about itself first on every stream.
    pub register: Register,
    /// Heartbeat period unless the controller's `registered` names one.
    pub heartbeat_interval: Duration,
    /// Relative jitter of each heartbeat period and reconnect delay (0.2 = ±20%).
    pub jitter: f64,
    /// Longest wait between reconnect attempts.
    pub reconnect_backoff_max: Duration,
}

/// What the session task shares with its handle.
#[derive(Debug, Default)]
struct Shared {
    drain: AtomicBool,
    connected: AtomicBool,
    registrations: AtomicU64,
}

/// The running session; dropping it (or [`SessionTask::stop`]) ends the stream.
#[derive(Debug)]
pub struct SessionTask {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl SessionTask {
    /// Whether the controller asked this agent to drain (on any stream so far).
    pub fn drain_requested(&self) -> bool {
        self.shared.drain.load(Ordering::SeqCst)
    }

    /// Whether a stream is registered right now.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Streams registered so far (1 after the first, +1 per reconnect).
    pub fn registrations(&self) -> u64 {
        self.shared.registrations.load(Ordering::SeqCst)
    }

    /// End the session and wait for its task to finish.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.shared.connected.store(false, Ordering::SeqCst);
    }
}

impl Drop for SessionTask {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Start reporting `agent` to `config.controller`, reconnecting forever until the
/// returned handle is stopped or dropped. Must run inside a tokio runtime.
pub fn spawn_session(agent: AgentHandle, config: SessionConfig) -> SessionTask {
    let shared = Arc::new(Shared::default());
    let task = tokio::spawn(run(agent, config, shared.clone()));
    SessionTask {
        shared,
        task: Some(task),
    }
}

async fn run(agent: AgentHandle, config: SessionConfig, shared: Arc<Shared>) {
    let mut rng = XorShift::seeded();
    let max = config.reconnect_backoff_max.max(RECONNECT_BACKOFF_MIN);
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        let mut session = Session {
            agent: &agent,
            config: &config,
            shared: &shared,
            rng: &mut rng,
            registered: false,
        };
        let result = session.run().await;
        let registered = session.registered;
        shared.connected.store(false, Ordering::SeqCst);
        match result {
            Ok(()) => {
                tracing::warn!(controller = %config.controller, "controller ended the session stream; reconnecting")
            }
            Err(e) => {
                tracing::warn!(controller = %config.controller, error = %e, "session stream failed; reconnecting")
            }
        }
        if registered {
            backoff = RECONNECT_BACKOFF_MIN;
        }
        let delay = rng.jittered(backoff, config.jitter);
        tracing::debug!(?delay, "waiting before reconnecting");
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(max);
    }
}

/// Why a stream ended (logged, then retried).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("invalid controller address: {0}")]
    Address(String),
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("controller: {0}")]
    Status(#[from] tonic::Status),
    #[error("controller did not answer register within {0:?}")]
    RegisterTimeout(Duration),
    #[error("controller's first message was not registered")]
    NotRegistered,
    #[error("outbound stream closed")]
    OutboundClosed,
    #[error("agent: {0}")]
    Agent(#[from] crate::AgentError),
}

struct Session<'a> {
    agent: &'a AgentHandle,
    config: &'a SessionConfig,
    shared: &'a Shared,
    rng: &'a mut XorShift,
    registered: bool,
}

/// State of one stream's inventory reporting.
#[derive(Default)]
struct InventoryState {
    /// Ids in the last inventory sent.
    sent_ids: BTreeSet<SandboxId>,
    /// Images of the last successful listing (reused if containerd fails once).
    images: Vec<ImageInfo>,
    /// When the last inventory went out.
    last_sent: Option<Instant>,
    /// When the pending, coalesced inventory is due.
    due: Option<Instant>,
    /// Warm instance ids in the last inventory sent.
    sent_warm: BTreeSet<SandboxId>,
}

impl Session<'_> {
    async fn run(&mut self) -> Result<(), SessionError> {
        // Subscribe before the first inventory, so no change falls between the two.
        let mut changes = self.agent.subscribe().await?;
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.config.controller.clone())
            .map_err(|e| SessionError::Address(e.to_string()))?
            .connect_timeout(REGISTER_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = &self.config.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let channel = endpoint.connect().await?;
        let mut client = AgentControlClient::new(channel);
        let (tx, rx) = mpsc::channel::<AgentMessage>(OUTBOUND_BUFFER);
        let out = Outbound(tx);
        out.send(Out::Register(self.config.register.clone()))
            .await?;
        let mut inbound =
            tokio::time::timeout(REGISTER_TIMEOUT, client.session(ReceiverStream::new(rx)))
                .await
                .map_err(|_| SessionError::RegisterTimeout(REGISTER_TIMEOUT))??
                .into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| SessionError::RegisterTimeout(REGISTER_TIMEOUT))??;
        let registered = match first.and_then(|m| m.msg) {
            Some(In::Registered(r)) => r,
            _ => return Err(SessionError::NotRegistered),
        };
        let period = match registered.heartbeat_interval_ms {
            0 => self.config.heartbeat_interval,
            ms => Duration::from_millis(u64::from(ms)),
        }
        .max(Duration::from_millis(1));
        self.registered = true;
        self.shared.connected.store(true, Ordering::SeqCst);
        self.shared.registrations.fetch_add(1, Ordering::SeqCst);
        tracing::info!(controller = %self.config.controller, ?period, "registered with the controller");

        let mut inv = InventoryState::default();
        self.send_inventory(&out, &mut inv).await?;

        let mut heartbeat = tokio::time::interval_at(
            Instant::now() + self.rng.jittered(period, self.config.jitter),
            period,
        );
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Skip);
        // Warm levels change without phase changes (refills): looked at this often,
        // and an inventory goes out when the ready set changed.
        let mut warm_check = tokio::time::interval(WARM_CHECK);
        warm_check.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut seq: u64 = 0;
        loop {
            let due = inv.due;
            tokio::select! {
                _ = heartbeat.tick() => {
                    // Each period is jittered on its own; a late tick is skipped.
                    heartbeat.reset_after(self.rng.jittered(period, self.config.jitter));
                    seq += 1;
                    let held = self.agent.inventory().await?;
                    let used = u32::try_from(held.len()).unwrap_or(u32::MAX);
                    out.send(Out::Heartbeat(Heartbeat {
                        seq,
                        time: Some(SystemTime::now().into()),
                        healthy: true,
                        used,
                    }))
                    .await?;
                    let ids: BTreeSet<SandboxId> = held.into_iter().map(|r| r.id).collect();
                    if ids != inv.sent_ids && inv.due.is_none() {
                        inv.schedule();
                    }
                }
                change = changes.recv() => match change {
                    Ok(change) => {
                        out.send(Out::Event(event(&change))).await?;
                        inv.schedule();
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "phase changes lagged; sending a full inventory");
                        inv.schedule();
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(crate::AgentError::Unavailable("agent actor stopped".into()).into());
                    }
                },
                _ = warm_check.tick() => {
                    let ready: BTreeSet<SandboxId> = self
                        .agent
                        .warm_instances()
                        .await?
                        .into_iter()
                        .map(|(_, id)| id)
                        .collect();
                    if ready != inv.sent_warm {
                        inv.schedule();
                    }
                }
                _ = sleep_until_opt(due), if due.is_some() => {
                    self.send_inventory(&out, &mut inv).await?;
                }
                msg = inbound.message() => match msg? {
                    // The controller ended the stream.
                    None => return Ok(()),
                    Some(ControllerMessage { msg: None }) => {
                        tracing::debug!("ignoring an empty controller message");
                    }
                    Some(ControllerMessage { msg: Some(In::Registered(_)) }) => {
                        tracing::debug!("ignoring a repeated registered");
                    }
                    Some(ControllerMessage { msg: Some(In::InventoryRequest(_)) }) => {
                        self.send_inventory(&out, &mut inv).await?;
                    }
                    Some(ControllerMessage { msg: Some(In::Drain(_)) }) => {
                        tracing::info!("controller asked this agent to drain");
                        self.shared.drain.store(true, Ordering::SeqCst);
                    }
                },
            }
        }
    }

    async fn send_inventory(
        &mut self,
        out: &Outbound,
        inv: &mut InventoryState,
    ) -> Result<(), SessionError> {
        let held = self.agent.inventory().await?;
        match self.agent.images().list().await {
            Ok(images) => {
                inv.images = images
                    .into_iter()
                    .map(|i| ImageInfo {
                        name: i.name,
                        digest: i.digest,
                        size_bytes: i.size,
                        in_use: false,
                    })
                    .collect();
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing images failed; the inventory repeats the last list");
            }
        }
        let mut images = inv.images.clone();
        for image in &mut images {
            image.in_use = held.iter().any(|r| r.image == image.name);
        }
        inv.sent_ids = held.iter().map(|r| r.id.clone()).collect();
        let sandboxes = held.iter().map(sandbox_info).collect();
        let ready = self.agent.warm_instances().await?;
        inv.sent_warm = ready.iter().map(|(_, id)| id.clone()).collect();
        out.send(Out::Inventory(Inventory {
            images,
            sandboxes,
            warm: warm_counts(&ready),
        }))
        .await?;
        inv.last_sent = Some(Instant::now());
        inv.due = None;
        Ok(())
    }
}

/// Ready warm instances grouped by image and runtime, ids oldest first.
fn warm_counts(ready: &[(WarmKey, SandboxId)]) -> Vec<WarmCount> {
    let mut by_key: std::collections::BTreeMap<&WarmKey, Vec<String>> = Default::default();
    for (key, id) in ready {
        by_key.entry(key).or_default().push(id.to_string());
    }
    by_key
        .into_iter()
        .map(|(key, ids)| WarmCount {
            image: key.image.to_string(),
            runtime: crate::server::wire_runtime(key.runtime) as i32,
            ready: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            sandbox_ids: ids,
        })
        .collect()
}

impl InventoryState {
    /// Ask for an inventory: now, or [`INVENTORY_MIN_GAP`] after the last one.
    fn schedule(&mut self) {
        if self.due.is_some() {
            return;
        }
        let now = Instant::now();
        self.due = Some(match self.last_sent {
            Some(last) => (last + INVENTORY_MIN_GAP).max(now),
            None => now,
        });
    }
}

async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Outbound(mpsc::Sender<AgentMessage>);

impl Outbound {
    async fn send(&self, msg: Out) -> Result<(), SessionError> {
        self.0
            .send(AgentMessage { msg: Some(msg) })
            .await
            .map_err(|_| SessionError::OutboundClosed)
    }
}

/// The wire phase of an agent phase.
pub fn wire_phase(phase: SandboxPhase) -> Phase {
    match phase {
        SandboxPhase::Creating => Phase::Pending,
        SandboxPhase::Running => Phase::Running,
        SandboxPhase::Succeeded => Phase::Succeeded,
        SandboxPhase::Failed => Phase::Failed,
        SandboxPhase::Deleting => Phase::Terminating,
    }
}

/// The inverse of [`wire_phase`] (the controller reading an inventory or event).
pub fn phase_from_wire(phase: Phase) -> SandboxPhase {
    match phase {
        Phase::Running => SandboxPhase::Running,
        Phase::Succeeded => SandboxPhase::Succeeded,
        Phase::Failed | Phase::Lost | Phase::Expired => SandboxPhase::Failed,
        Phase::Terminating => SandboxPhase::Deleting,
        _ => SandboxPhase::Creating,
    }
}

/// A sandbox as the inventory reports it.
pub fn sandbox_info(r: &SandboxRecord) -> SandboxInfo {
    SandboxInfo {
        sandbox_id: r.id.to_string(),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        claim_uid: r.claim_uid.clone(),
        image: r.image.clone(),
        ports: r.ports.iter().map(|p| u32::from(p.get())).collect(),
        phase: wire_phase(r.phase).into(),
        exit_code: r.exit_code,
        // The agent does not record creation times yet.
        created_at: None,
        request_id: r.request_id.clone(),
    }
}

fn event(change: &PhaseChange) -> SandboxEvent {
    SandboxEvent {
        sandbox_id: change.id.to_string(),
        phase: wire_phase(change.phase).into(),
        exit_code: change.exit_code,
        message: String::new(),
        time: Some(SystemTime::now().into()),
    }
}

/// xorshift64* seeded from the clock and the pid; enough to keep agents out of step.
struct XorShift(u64);

impl XorShift {
    fn seeded() -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        Self(if seed == 0 { 1 } else { seed })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A uniform float in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `base` scaled by a uniform factor in [1 - jitter, 1 + jitter].
    fn jittered(&mut self, base: Duration, jitter: f64) -> Duration {
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let factor = 1.0 + jitter * (2.0 * self.unit() - 1.0);
        base.mul_f64(factor.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        let mut rng = XorShift::seeded();
        let base = Duration::from_millis(1000);
        for _ in 0..10_000 {
            let d = rng.jittered(base, 0.2);
            assert!(d >= Duration::from_millis(800) && d <= Duration::from_millis(1200));
        }
        assert_eq!(rng.jittered(base, 0.0), base);
        assert_eq!(rng.jittered(base, f64::NAN), base);
    }

    #[test]
    fn jitter_spreads() {
        let mut rng = XorShift::seeded();
        let base = Duration::from_millis(1000);
        let xs: BTreeSet<Duration> = (0..100).map(|_| rng.jittered(base, 0.2)).collect();
        assert!(xs.len() > 50);
    }

    #[test]
    fn phases_map_to_the_wire() {
        assert_eq!(wire_phase(SandboxPhase::Creating), Phase::Pending);
        assert_eq!(wire_phase(SandboxPhase::Running), Phase::Running);
        assert_eq!(wire_phase(SandboxPhase::Succeeded), Phase::Succeeded);
        assert_eq!(wire_phase(SandboxPhase::Failed), Phase::Failed);
        assert_eq!(wire_phase(SandboxPhase::Deleting), Phase::Terminating);
    }

    #[tokio::test]
    async fn inventories_are_coalesced_to_one_per_gap() {
        let mut inv = InventoryState::default();
        inv.schedule();
        let first = inv.due.unwrap_or_else(Instant::now);
        assert!(first <= Instant::now());
        inv.last_sent = Some(Instant::now());
        inv.due = None;
        inv.schedule();
        let second = inv.due.unwrap_or_else(Instant::now);
        inv.schedule();
        assert_eq!(
            inv.due,
            Some(second),
            "a pending inventory absorbs later changes"
        );
        assert!(second >= first + INVENTORY_MIN_GAP);
    }
}
