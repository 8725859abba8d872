//! Kubernetes RBAC on the fast path, against the real API server (RBAC authorizer,
//! ServiceAccount tokens from the TokenRequest API): the controller (in-process,
//! `FastPathAuth::Kubernetes`) checks each caller's token with a TokenReview and each
//! call with a SubjectAccessReview, so Roles on `sandboxes.sandbox.fast.io` govern the
//! fast path as they govern kubectl.
//!
//! - no token, or a token the API server does not know: Unauthenticated;
//! - `alice` (ClusterRole `fast-sandbox-edit` as shipped in `deploy/rbac/users.yaml`,
//!   bound in namespace A only) creates, reads, execs, reads logs and
//!   deletes in A, and gets PermissionDenied in B and for a cluster-wide list; nothing
//!   is created in B;
//! - `bob` (`fast-sandbox-view` in A) reads, but exec (`sandboxes/exec`), logs
//!   (`sandboxes/log`), create and delete are refused;
//! - a revoked RoleBinding stops working once the (short, test-set) cache expires.
#![cfg(feature = "k8s")]

use std::time::Duration;

use anyhow::{Context, Result};
use fsb_controller::{crd::Sandbox, rbac::AuthTtl, run::FastPathAuth};
use fsb_proto::fastpath::v1::{self as fp, fast_path_client::FastPathClient};
use fsb_tests::{
    cluster::{ControllerUnderTest, install_crds, namespace, pool, strong_sleeper_request},
    containerd::ContainerdEnv,
    gateway::{self, Bearer, logs},
    k8s::kube_client,
    kubelet::Kubelet,
    wait::wait_until,
};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, RoleBinding},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tonic::{Code, transport::Channel};

const DEADLINE: Duration = Duration::from_secs(60);
/// How long the controller remembers a grant in this test (revocation waits for it).
const GRANT_TTL: Duration = Duration::from_secs(1);

type Fp = gateway::Client;

/// A fast-path client sending `token` (or no header).
async fn client(url: &str, token: Option<&str>) -> Result<Fp> {
    let channel = Channel::from_shared(url.to_owned())?.connect().await?;
    Ok(FastPathClient::with_interceptor(
        channel,
        Bearer::new(token)?,
    ))
}

/// The user ClusterRoles as shipped (`deploy/rbac/users.yaml`), applied for real.
async fn shipped_user_roles(client: &Client) -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac/users.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let api: Api<ClusterRole> = Api::all(client.clone());
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let role: ClusterRole = serde::Deserialize::deserialize(doc)?;
        let name = role
            .metadata
            .name
            .clone()
            .context("a ClusterRole without a name")?;
        api.patch(
            &name,
            &PatchParams::apply("fsb-tests").force(),
            &Patch::Apply(&role),
        )
        .await?;
    }
    Ok(())
}

/// ServiceAccount `name` in `ns` bound there to ClusterRole `role`; its token.
async fn account(client: &Client, ns: &str, name: &str, role: &str) -> Result<String> {
    let pp = PostParams::default();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    sas.create(
        &pp,
        &serde_json::from_value(json!({"metadata": {"name": name}}))?,
    )
    .await?;
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
            }))?,
        )
        .await?;
    let req = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request(name, &pp, &req)
        .await?
        .status
        .context("TokenRequest answered without a token")?
        .token;
    Ok(token)
}

fn create(ns: &str, name: &str, image: &str) -> fp::CreateRequest {
    strong_sleeper_request(ns, name, "p", image)
}

fn get(ns: &str, name: &str) -> fp::GetRequest {
    fp::GetRequest {
        namespace: ns.into(),
        name: name.into(),
    }
}

/// `Err(status)` of a call, failing the test if it succeeded.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) -> tonic::Status {
    match r {
        Ok(v) => panic!("{what}: expected a refusal, got {v:?}"),
        Err(s) => s,
    }
}

fn assert_denied(what: &str, s: &tonic::Status, needle: &str) {
    assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
    assert!(
        s.message().contains(needle),
        "{what}: {:?} should name {needle:?}",
        s.message()
    );
}

/// Exec `echo exec-ok` in `ns/name`: its stdout, or the call's error.
async fn exec(c: &mut Fp, ns: &str, name: &str) -> Result<String, tonic::Status> {
    let start = fp::ExecStart {
        namespace: ns.into(),
        name: name.into(),
        command: vec!["echo".into(), "exec-ok".into()],
        ..fp::ExecStart::default()
    };
    Ok(gateway::exec(c, start).await?.0)
}

#[actix_rt::test]
async fn kubernetes_rbac_governs_every_fast_path_call() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let kube = kube_client().await?;
    install_crds(&kube).await?;
    let id = &fsb_tests::unique_id()[..8];
    let (a, b) = (format!("auth-a-{id}"), format!("auth-b-{id}"));
    namespace(&kube, &a).await?;
    namespace(&kube, &b).await?;
    let controller = ControllerUnderTest::start(kube.clone(), &a, |c| {
        // Scoped to A like every test controller; B still goes through authorization
        // first (a refused call never reaches the scope check).
        c.auth = FastPathAuth::Kubernetes(AuthTtl {
            allowed: GRANT_TTL,
            denied: Duration::from_millis(200),
            ..AuthTtl::default()
        });
    })
    .await?;
    let _kubelet = Kubelet::start(kube.clone(), &a).await?;
    pool(&kube, &a, "p", 4, 1).await?;

    shipped_user_roles(&kube).await?;
    let alice = account(&kube, &a, "alice", "fast-sandbox-edit").await?;
    let bob = account(&kube, &a, "bob", "fast-sandbox-view").await?;
    let url = controller.url();

    // Unauthenticated: no header, and a token the API server does not know.
    let mut anon = client(&url, None).await?;
    let s = refused(
        "create without a token",
        anon.create(create(&a, "anon", &image)).await,
    );
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("authorization"), "{s:?}");
    let mut forged = client(&url, Some("not-a-real-token")).await?;
    let s = refused("get with a forged token", forged.get(get(&a, "x")).await);
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = refused(
        "list with a forged token",
        forged.list(fp::ListRequest::default()).await,
    );
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");

    // alice in A: everything her Role grants works, on a real sandbox.
    let mut ca = client(&url, Some(&alice)).await?;
    wait_until("alice's first create (agent registered)", DEADLINE, || {
        let mut ca = ca.clone();
        let req = create(&a, "s1", &image);
        async move {
            match ca.create(req).await {
                Ok(_) => Ok(Some(())),
                Err(s) if s.code() == Code::Unavailable => Ok(None),
                Err(s) => anyhow::bail!("alice create in her namespace: {s:?}"),
            }
        }
    })
    .await?;
    let got = ca.get(get(&a, "s1")).await?.into_inner();
    assert_eq!(got.name, "s1");
    let listed = ca
        .list(fp::ListRequest {
            namespace: a.clone(),
            ..fp::ListRequest::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.sandboxes.len(), 1);
    assert_eq!(exec(&mut ca, &a, "s1").await?.trim(), "exec-ok");
    logs(&mut ca, &a, "s1").await?;

    // alice in B, and cluster-wide: PermissionDenied, in the API server's words.
    let s = refused(
        "alice create in B",
        ca.create(create(&b, "s1", &image)).await,
    );
    assert_denied(
        "alice create in B",
        &s,
        &format!("in the namespace \"{b}\""),
    );
    assert!(s.message().contains("alice"), "{s:?}");
    assert!(
        s.message().contains("cannot create resource \"sandboxes\""),
        "{s:?}"
    );
    let s = refused("alice get in B", ca.get(get(&b, "s1")).await);
    assert_denied("alice get in B", &s, "cannot get");
    let s = refused("alice exec in B", exec(&mut ca, &b, "s1").await);
    assert_denied("alice exec in B", &s, "sandboxes/exec");
    let s = refused("alice logs in B", logs(&mut ca, &b, "s1").await);
    assert_denied("alice logs in B", &s, "sandboxes/log");
    let s = refused(
        "alice list everywhere",
        ca.list(fp::ListRequest::default()).await,
    );
    assert_denied("alice list everywhere", &s, "at the cluster scope");
    let in_b: Api<Sandbox> = Api::namespaced(kube.clone(), &b);
    assert!(
        in_b.list(&ListParams::default()).await?.items.is_empty(),
        "a refused create leaves nothing in B"
    );

    // bob reads A but may not exec, read logs, create or delete.
    let mut cb = client(&url, Some(&bob)).await?;
    assert_eq!(cb.get(get(&a, "s1")).await?.into_inner().name, "s1");
    let s = refused("bob exec", exec(&mut cb, &a, "s1").await);
    assert_denied("bob exec", &s, "cannot create resource \"sandboxes/exec\"");
    let s = refused("bob logs", logs(&mut cb, &a, "s1").await);
    assert_denied("bob logs", &s, "cannot get resource \"sandboxes/log\"");
    let s = refused("bob create", cb.create(create(&a, "s2", &image)).await);
    assert_denied("bob create", &s, "cannot create");
    let s = refused(
        "bob delete",
        cb.delete(fp::DeleteRequest {
            namespace: a.clone(),
            name: "s1".into(),
            ..fp::DeleteRequest::default()
        })
        .await,
    );
    assert_denied("bob delete", &s, "cannot delete");
    assert_eq!(
        ca.get(get(&a, "s1")).await?.into_inner().name,
        "s1",
        "bob's refused delete left the sandbox"
    );

    // alice deletes hers.
    ca.delete(fp::DeleteRequest {
        namespace: a.clone(),
        name: "s1".into(),
        ..fp::DeleteRequest::default()
    })
    .await?;

    // Revoking alice's RoleBinding takes effect once her cached grant expires.
    Api::<RoleBinding>::namespaced(kube.clone(), &a)
        .delete("alice", &DeleteParams::default())
        .await?;
    tokio::time::sleep(GRANT_TTL + Duration::from_millis(200)).await;
    let s = refused("alice after revocation", ca.get(get(&a, "s1")).await);
    assert_denied("alice after revocation", &s, "cannot get");

    controller.stop().await;
    Ok(())
}
