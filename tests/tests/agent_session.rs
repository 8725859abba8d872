//! The agent's Session client (`fsb_agent::session`) against a fake controller: a
//! tonic `AgentControl` server in this test that records what the agent sends. The
//! claim is about our client, so a fake controller is enough; the agent itself is
//! real (AgentHandle on the harness's containerd).
//!
//! Shown: register first (agent id, capacity), then a full inventory, heartbeats at
//! the controller's interval, a created sandbox reported as a RUNNING event and in an
//! inventory, a controller restart on the same port answered by a new register plus a
//! full inventory holding the sandbox, inventory_request and drain handled, and a
//! deleted sandbox leaving the inventory.

#![allow(clippy::unwrap_used)] // test code

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use fsb_agent::{
    AgentConfig, AgentHandle, CreateSandbox, SessionConfig, SessionTask, spawn_session,
};
use fsb_core::{
    SandboxId,
    spec::{SandboxSpec, SpecLimits},
};
use fsb_proto::{
    agent::v1::{
        AgentMessage, ControllerMessage, Drain, Inventory, InventoryRequest, Register, Registered,
        agent_control_server::{AgentControl, AgentControlServer},
        agent_message::Msg,
        controller_message::Msg as CMsg,
    },
    fastpath::v1::Phase,
};
use fsb_tests::{ContainerdEnv, wait_until};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const DEADLINE: Duration = Duration::from_secs(30);

type Outbound = mpsc::Sender<Result<ControllerMessage, Status>>;

/// Records every agent message; answers `register` with `registered` (100 ms).
struct FakeController {
    record: mpsc::UnboundedSender<AgentMessage>,
    streams: Arc<Mutex<Vec<Outbound>>>,
}

#[tonic::async_trait]
impl AgentControl for FakeController {
    type SessionStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let (out, rx) = mpsc::channel(16);
        self.streams.lock().unwrap().push(out.clone());
        let record = self.record.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                if matches!(msg.msg, Some(Msg::Register(_))) {
                    let _ = out
                        .send(Ok(ControllerMessage {
                            msg: Some(CMsg::Registered(Registered {
                                heartbeat_interval_ms: 100,
                            })),
                        }))
                        .await;
                }
                if record.send(msg).is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A running fake controller and what it received.
struct Fake {
    server: JoinHandle<()>,
    received: mpsc::UnboundedReceiver<AgentMessage>,
    streams: Arc<Mutex<Vec<Outbound>>>,
}

impl Fake {
    async fn start(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let (record, received) = mpsc::unbounded_channel();
        let streams = Arc::new(Mutex::new(Vec::new()));
        let service = AgentControlServer::new(FakeController {
            record,
            streams: streams.clone(),
        });
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self {
            server,
            received,
            streams,
        }
    }

    /// Send `msg` on every open stream.
    async fn send(&self, msg: CMsg) {
        let streams: Vec<Outbound> = self.streams.lock().unwrap().clone();
        for s in streams {
            let _ = s.send(Ok(ControllerMessage { msg: Some(msg) })).await;
        }
    }

    /// The controller dies: open streams fail, the listener closes.
    async fn kill(self) {
        let streams: Vec<Outbound> = self.streams.lock().unwrap().drain(..).collect();
        for s in streams {
            let _ = s
                .send(Err(Status::unavailable("fake controller killed")))
                .await;
        }
        self.server.abort();
        let _ = self.server.await;
    }

    async fn next(&mut self) -> Msg {
        tokio::time::timeout(DEADLINE, self.received.recv())
            .await
            .expect("no message from the agent in time")
            .expect("fake controller's record channel closed")
            .msg
            .expect("empty agent message")
    }

    /// The first message matching `pred` (others are skipped).
    async fn find<T>(&mut self, what: &str, mut pred: impl FnMut(&Msg) -> Option<T>) -> T {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let msg = self.next().await;
                if let Some(t) = pred(&msg) {
                    return t;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never received {what}"))
    }
}

fn inventory_phase(inv: &Inventory, id: &SandboxId) -> Option<Phase> {
    inv.sandboxes
        .iter()
        .find(|s| s.sandbox_id == id.as_str())
        .map(|s| s.phase())
}

fn session_agent_config(env: &ContainerdEnv, agent: &str) -> AgentConfig {
    let mut config = fsb_tests::agent_config(env, agent, 7);
    config.stop_grace = Duration::from_secs(1);
    config
}

fn session_config(addr: SocketAddr, agent: &str) -> SessionConfig {
    SessionConfig {
        controller: format!("http://{addr}"),
        tls: None,
        register: Register {
            agent_id: agent.into(),
            pool: "default".into(),
            namespace: "default".into(),
            capacity: 7,
            version: "test".into(),
            ..Register::default()
        },
        // The fake's `registered` overrides this with 100 ms.
        heartbeat_interval: Duration::from_secs(60),
        jitter: 0.2,
        reconnect_backoff_max: Duration::from_millis(500),
    }
}

#[actix_rt::test]
async fn session_registers_reports_and_survives_a_controller_restart() {
    let env = ContainerdEnv::from_env();
    let agent_id = format!("agent-session-{}", &fsb_tests::unique_id()[..8]);
    let agent = AgentHandle::start(session_agent_config(&env, &agent_id))
        .await
        .unwrap();

    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut fake = Fake::start(addr).await;
    let session: SessionTask = spawn_session(agent.clone(), session_config(addr, &agent_id));

    // register first, then a full inventory.
    match fake.next().await {
        Msg::Register(r) => {
            assert_eq!(r.agent_id, agent_id);
            assert_eq!(r.capacity, 7);
        }
        other => panic!("first message was not register: {other:?}"),
    }
    match fake.next().await {
        Msg::Inventory(inv) => assert!(inv.sandboxes.is_empty(), "{inv:?}"),
        other => panic!("second message was not inventory: {other:?}"),
    }

    // Heartbeats at the controller's 100 ms: at least 3 within 2 s.
    let mut beats = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), async {
        while beats.len() < 3 {
            if let Msg::Heartbeat(h) = fake.next().await {
                beats.push(h);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} heartbeats within 2 s", beats.len()));
    assert!(beats.windows(2).all(|w| w[0].seq < w[1].seq), "{beats:?}");
    assert!(
        beats
            .iter()
            .all(|h| h.healthy && h.used == 0 && h.time.is_some())
    );

    // A sandbox: its RUNNING event, then an inventory holding it.
    let spec = SandboxSpec {
        namespace: "team-a".into(),
        name: "session".into(),
        pool_ref: "default".into(),
        image: env.image.clone(),
        command: vec!["sleep".into(), "300".into()],
        ..SandboxSpec::default()
    }
    .validate(&SpecLimits::default())
    .unwrap();
    let id = SandboxId::generate();
    agent
        .create(CreateSandbox {
            id: id.clone(),
            namespace: "team-a".into(),
            name: "session".into(),
            claim_uid: String::new(),
            request_id: String::new(),
            spec,
        })
        .await
        .unwrap();
    fake.find("a RUNNING event for the sandbox", |m| match m {
        Msg::Event(e) if e.sandbox_id == id.as_str() && e.phase() == Phase::Running => Some(()),
        _ => None,
    })
    .await;
    fake.find("an inventory with the sandbox running", |m| match m {
        Msg::Inventory(inv) if inventory_phase(inv, &id) == Some(Phase::Running) => Some(()),
        _ => None,
    })
    .await;
    fake.find("a heartbeat counting the sandbox", |m| match m {
        Msg::Heartbeat(h) if h.used == 1 => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(session.registrations(), 1);

    // The controller dies; a new one on the same port gets register + full inventory.
    fake.kill().await;
    let mut fake = Fake::start(addr).await;
    match fake.next().await {
        Msg::Register(r) => assert_eq!(r.agent_id, agent_id),
        other => panic!("first message after restart was not register: {other:?}"),
    }
    match fake.next().await {
        Msg::Inventory(inv) => {
            assert_eq!(inventory_phase(&inv, &id), Some(Phase::Running), "{inv:?}");
            assert_eq!(inv.sandboxes.len(), 1, "{inv:?}");
        }
        other => panic!("second message after restart was not inventory: {other:?}"),
    }
    assert_eq!(session.registrations(), 2);
    assert!(session.is_connected());

    // inventory_request is answered; drain is recorded.
    fake.send(CMsg::InventoryRequest(InventoryRequest {})).await;
    fake.find("an inventory answering inventory_request", |m| match m {
        Msg::Inventory(inv) if inventory_phase(inv, &id).is_some() => Some(()),
        _ => None,
    })
    .await;
    assert!(!session.drain_requested());
    fake.send(CMsg::Drain(Drain {})).await;
    wait_until("drain recorded", DEADLINE, || async {
        Ok(session.drain_requested().then_some(()))
    })
    .await
    .unwrap();

    // Delete: a TERMINATING event, then an inventory without the sandbox.
    agent
        .delete(id.clone(), Some(Duration::from_millis(200)))
        .await
        .unwrap();
    fake.find("a TERMINATING event", |m| match m {
        Msg::Event(e) if e.sandbox_id == id.as_str() && e.phase() == Phase::Terminating => Some(()),
        _ => None,
    })
    .await;
    fake.find("an inventory without the sandbox", |m| match m {
        Msg::Inventory(inv) if inventory_phase(inv, &id).is_none() => Some(()),
        _ => None,
    })
    .await;

    session.stop().await;
    fake.kill().await;
}
