//! Mutual TLS between the controller and its agents, end to end: the controller
//! (in-process) keeps the agent CA in a Secret of the test namespace, the pool
//! reconciler issues each pool's certificate into `<pool>-agent-tls`, the kubelet
//! fixture projects it into real `fsb-agent` processes, which serve TLS and dial the
//! controller over TLS.
//!
//! Shown here: an agent's gRPC port refuses a caller without a certificate, with a
//! certificate of another CA, or with an agent's certificate (its own pool's or
//! another's), and answers the controller's; AgentControl refuses a registration
//! without a certificate, one whose certificate names another pool than it claims, and
//! one for a genuine pod with its pool's certificate that comes from another address
//! than the pod's.
#![cfg(feature = "k8s")]

use std::time::Duration;

use anyhow::{Context, Result};
use fsb_agent::tls::{CONTROLLER_NAME, TlsMaterial, agent_name};
use fsb_controller::tls::{AGENT_CA_NAME, Ca};
use fsb_proto::agent::v1::agent_control_client::AgentControlClient;
use fsb_proto::agent::v1::{self as av, agent_client::AgentClient};
use fsb_tests::{
    cluster::{ControllerUnderTest, controller_tls, install_crds, namespace, pool, pool_tls},
    k8s::kube_client,
    kubelet::{Kubelet, POD_IP, RunningPod},
    wait::wait_until,
};
use futures::StreamExt;
use kube::Client;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const DEADLINE: Duration = Duration::from_secs(30);
/// A connection the server dropped: the client notices while writing, while reading,
/// or in the HTTP/2 handshake, depending on timing.
const DROPPED: [&str; 4] = [
    "broken pipe",
    "connection closed",
    "connection reset",
    "h2 protocol error",
];
/// What a plaintext client sees from a TLS-only server: the server reads the HTTP/2
/// preface as a broken TLS record and drops the connection.
const PLAINTEXT_REFUSED: &[&str] = &DROPPED;
/// What a TLS client without a certificate sees: the server's alert, or (TLS 1.3: the
/// client may think the handshake done and be writing already) the dropped connection.
const NO_CERT_REFUSED: &[&str] = &[
    "received fatal alert: CertificateRequired",
    DROPPED[0],
    DROPPED[1],
    DROPPED[2],
];
/// What a client whose certificate comes from another CA sees. Both CAs have the same
/// subject name, so the server's verifier takes its own CA as the issuer and the
/// signature check fails (alert decrypt_error); or the dropped connection, as above.
const FOREIGN_CA_REFUSED: &[&str] = &[
    "received fatal alert: DecryptError",
    DROPPED[0],
    DROPPED[1],
    DROPPED[2],
];

struct Setup {
    client: Client,
    ns: String,
    controller: ControllerUnderTest,
    kubelet: Kubelet,
}

impl Setup {
    /// Pools `a` and `b`, one agent pod each, registered with the controller.
    async fn new(prefix: &str) -> Result<Self> {
        let client = kube_client().await?;
        install_crds(&client).await?;
        let ns = format!("{prefix}-{}", &fsb_tests::unique_id()[..8]);
        namespace(&client, &ns).await?;
        let controller = ControllerUnderTest::start(client.clone(), &ns, |_| {}).await?;
        let kubelet = Kubelet::start(client.clone(), &ns).await?;
        pool(&client, &ns, "a", 1, 1).await?;
        pool(&client, &ns, "b", 1, 1).await?;
        let book = controller.shared.book.clone();
        // Registered means: the agent dialled AgentControl over TLS with its pool's
        // certificate and passed every check.
        wait_until("both agents registered", DEADLINE, || {
            let n = book.all().into_iter().filter(|(_, a)| a.connected).count();
            async move { Ok((n == 2).then_some(())) }
        })
        .await?;
        Ok(Self {
            client,
            ns,
            controller,
            kubelet,
        })
    }

    /// The running agent of pool `pool`.
    fn agent(&self, pool: &str) -> Result<RunningPod> {
        self.kubelet
            .running()
            .into_iter()
            .find(|p| p.name.starts_with(&format!("{pool}-")))
            .with_context(|| format!("no agent of pool {pool} runs"))
    }
}

/// The outcome of one call: Ok, a gRPC status (code and message), or a connection that
/// failed before any status (the TLS handshake refused).
#[derive(Debug)]
enum Outcome {
    Ok,
    Status(tonic::Code, String),
    Refused(String),
}

/// Full error text, sources included.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn status_outcome(s: tonic::Status) -> Outcome {
    // A status the client made from a connection failure carries it as its source; one
    // the server sent has none.
    match std::error::Error::source(&s) {
        Some(_) => Outcome::Refused(chain(&s)),
        None => Outcome::Status(s.code(), s.message().to_owned()),
    }
}

/// `ListContainers` on the agent at `port`, over `tls` (None: plaintext).
async fn list_containers(port: u16, tls: Option<ClientTlsConfig>) -> Outcome {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = match Endpoint::from_shared(format!("{scheme}://{POD_IP}:{port}")) {
        Ok(e) => e.connect_timeout(Duration::from_secs(5)),
        Err(e) => return Outcome::Refused(chain(&e)),
    };
    if let Some(tls) = tls {
        endpoint = match endpoint.tls_config(tls) {
            Ok(e) => e,
            Err(e) => return Outcome::Refused(chain(&e)),
        };
    }
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return Outcome::Refused(chain(&e)),
    };
    match AgentClient::new(channel)
        .list_containers(av::ListContainersRequest {})
        .await
    {
        Ok(_) => Outcome::Ok,
        Err(s) => status_outcome(s),
    }
}

/// A client TLS config trusting `ca_pem`, expecting `server`, presenting `me` (if any).
fn client_tls(ca_pem: &str, server: &str, me: Option<&TlsMaterial>) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(server);
    if let Some(m) = me {
        c = c.identity(tonic::transport::Identity::from_pem(
            &m.cert_pem,
            &m.key_pem,
        ));
    }
    c
}

/// The connection failed before any gRPC status, with one of `needles` in the error
/// (a server that let the call through would answer with a status instead).
fn assert_refused(o: &Outcome, what: &str, needles: &[&str]) {
    eprintln!("{what}: {o:?}");
    match o {
        Outcome::Refused(m) if needles.iter().any(|n| m.contains(n)) => {}
        other => panic!("{what}: want a refused connection with one of {needles:?}, got {other:?}"),
    }
}

fn assert_denied(o: &Outcome, what: &str, needle: &str) {
    eprintln!("{what}: {o:?}");
    match o {
        Outcome::Status(tonic::Code::PermissionDenied, m) if m.contains(needle) => {}
        other => panic!("{what}: want PermissionDenied with {needle:?}, got {other:?}"),
    }
}

#[actix_rt::test]
async fn an_agent_answers_only_the_controller() -> Result<()> {
    let s = Setup::new("mtls-agent").await?;
    let a = s.agent("a")?;
    let a_name = agent_name("a", &s.ns);
    let controller = controller_tls(&s.client, &s.ns).await?;
    let tls_a = pool_tls(&s.client, &s.ns, "a").await?;
    let tls_b = pool_tls(&s.client, &s.ns, "b").await?;
    let ca = controller.ca_pem.clone();

    // Plaintext: the agent speaks TLS only.
    let o = list_containers(a.port, None).await;
    assert_refused(&o, "plaintext", PLAINTEXT_REFUSED);

    // TLS without a client certificate: the handshake is refused.
    let o = list_containers(a.port, Some(client_tls(&ca, &a_name, None))).await;
    assert_refused(&o, "no client certificate", NO_CERT_REFUSED);

    // The controller's name, but signed by another CA (a look-alike with the same CA
    // name): refused in the handshake.
    let foreign = Ca::generate(AGENT_CA_NAME)?.issue(CONTROLLER_NAME)?;
    let o = list_containers(a.port, Some(client_tls(&ca, &a_name, Some(&foreign)))).await;
    assert_refused(&o, "a foreign CA", FOREIGN_CA_REFUSED);

    // Agents' certificates come from the right CA but are not the controller's.
    let o = list_containers(a.port, Some(client_tls(&ca, &a_name, Some(&tls_b)))).await;
    assert_denied(&o, "another pool's certificate", CONTROLLER_NAME);
    let o = list_containers(a.port, Some(client_tls(&ca, &a_name, Some(&tls_a)))).await;
    assert_denied(&o, "its own pool's certificate", CONTROLLER_NAME);

    // The controller's certificate is answered...
    let o = list_containers(a.port, Some(controller.client(&a_name))).await;
    assert!(matches!(o, Outcome::Ok), "the controller: {o:?}");
    // ...and the controller, in turn, accepts the agent only under its pool's name.
    let o = list_containers(a.port, Some(controller.client(&agent_name("b", &s.ns)))).await;
    assert_refused(
        &o,
        "agent a's server certificate checked for pool b",
        &[&format!(
            "certificate not valid for name \"{}\"",
            agent_name("b", &s.ns)
        )],
    );
    s.controller.stop().await;
    Ok(())
}

/// Send `register` for the real agent of `claim` over `tls` (None: plaintext); the
/// outcome of the controller's first answer.
async fn register(s: &Setup, claim: &str, tls: Option<ClientTlsConfig>) -> Result<Outcome> {
    let agent = s.agent(claim)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", s.controller.addrs.agents))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::Refused(chain(&e))),
    };
    let reg = av::Register {
        agent_id: agent.uid.clone(),
        pool: claim.into(),
        namespace: s.ns.clone(),
        node_name: s.kubelet.node().into(),
        pod_name: agent.name.clone(),
        pod_uid: agent.uid.clone(),
        endpoint: "http://127.0.0.1:1".into(),
        agent_port: 1,
        capacity: 1,
        ..av::Register::default()
    };
    let msg = av::AgentMessage {
        msg: Some(av::agent_message::Msg::Register(reg)),
    };
    // The stream stays open: the controller answers before it ends.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(msg).await?;
    let out = AgentControlClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    Ok(match out {
        Err(status) => status_outcome(status),
        Ok(r) => match r.into_inner().next().await {
            Some(Ok(_)) => Outcome::Ok,
            Some(Err(status)) => status_outcome(status),
            None => Outcome::Status(tonic::Code::Unknown, "stream ended".into()),
        },
    })
}

#[actix_rt::test]
async fn agent_control_accepts_only_the_pool_a_certificate_names() -> Result<()> {
    let s = Setup::new("mtls-ctl").await?;
    let tls_a = pool_tls(&s.client, &s.ns, "a").await?;
    let ca = tls_a.ca_pem.clone();

    let o = register(&s, "b", None).await?;
    assert_refused(&o, "plaintext", PLAINTEXT_REFUSED);
    let o = register(&s, "b", Some(client_tls(&ca, CONTROLLER_NAME, None))).await?;
    assert_refused(&o, "no client certificate", NO_CERT_REFUSED);
    let foreign = Ca::generate(AGENT_CA_NAME)?.issue(&agent_name("b", &s.ns))?;
    let o = register(
        &s,
        "b",
        Some(client_tls(&ca, CONTROLLER_NAME, Some(&foreign))),
    )
    .await?;
    assert_refused(&o, "pool b's name from a foreign CA", FOREIGN_CA_REFUSED);
    // Pool a's genuine certificate, claiming to be pool b's genuine pod (which the API
    // server would vouch for): the certificate decides.
    let o = register(&s, "b", Some(tls_a.client(CONTROLLER_NAME))).await?;
    assert_denied(
        &o,
        "pool a's certificate claiming pool b",
        &format!("the client certificate is not {}", agent_name("b", &s.ns)),
    );
    // Pool a's certificate used from somewhere that is not pod a (here: pod a reports
    // another address than the one the test dials from): the right certificate and the
    // right pod are not enough.
    let a = s.agent("a")?;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(s.client.clone(), &s.ns);
    // Once the test kubelet has reported pod a Ready it writes its status no more;
    // patched before that, its Ready report would put the pod's address back.
    wait_until("pod a Ready", DEADLINE, || async {
        let pod = pods.get(&a.name).await?;
        let ready = pod
            .status
            .and_then(|st| st.conditions)
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Ok(ready.then_some(()))
    })
    .await?;
    let elsewhere = serde_json::json!({"status": {
        "podIP": "10.255.0.1", "podIPs": [{"ip": "10.255.0.1"}],
    }});
    pods.patch_status(
        &a.name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&elsewhere),
    )
    .await?;
    let o = register(&s, "a", Some(tls_a.client(CONTROLLER_NAME))).await?;
    assert_denied(
        &o,
        "pool a's certificate for pod a from another address",
        &format!("connection from {POD_IP}, which is not the pod's address (10.255.0.1)"),
    );
    // The genuine agent of b is still the one registered (the refused attempts changed
    // nothing), and the controller reaches it over TLS: its inventory is fresh.
    let b = s.agent("b")?;
    let state = s
        .controller
        .shared
        .book
        .get(&fsb_core::AgentId::from(b.uid.as_str()))
        .context("agent b")?;
    assert!(state.connected);
    assert!(
        state.register.endpoint.starts_with("https://"),
        "{}",
        state.register.endpoint
    );
    s.controller.stop().await;
    Ok(())
}
