//! Leader election between two `fsb-controller` processes on the same ports: only the
//! Lease holder serves; when it is `kill -9`ed the standby takes over once the lease
//! expires, rebuilds the registry from the Sandbox objects and serves creates; a
//! leader whose Lease is taken by someone else stops.
#![cfg(feature = "k8s")]

use std::time::Duration;

use anyhow::Result;
use fsb_controller::crd::Sandbox;
use fsb_proto::fastpath::v1::{self as fp, fast_path_client::FastPathClient};
use fsb_tests::{
    cluster::{ControllerProcess, free_port, install_crds, namespace, pool, strong_sleeper},
    containerd::ContainerdEnv,
    k8s::kube_client,
    kubelet::Kubelet,
    wait::wait_until,
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};

const LEASE: &str = "fsb-controller";
/// Short, so the takeover is quick: renewals every second.
const LEASE_SECONDS: &str = "3";

/// A STRONG create in pool `p`: its sandbox id, `None` while nothing serves.
async fn create(url: &str, ns: &str, name: &str, image: &str) -> Result<Option<String>> {
    strong_sleeper(url, ns, name, "p", image).await
}

fn holder(l: &Lease) -> (Option<String>, i32) {
    let spec = l.spec.clone().unwrap_or_default();
    (spec.holder_identity, spec.lease_transitions.unwrap_or(0))
}

#[actix_rt::test]
async fn the_standby_takes_over_a_killed_leader_and_a_displaced_leader_stops() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let client = kube_client().await?;
    install_crds(&client).await?;
    let ns = format!("leader-{}", &fsb_tests::unique_id()[..8]);
    namespace(&client, &ns).await?;
    let kubelet = Kubelet::start(client.clone(), &ns).await?;
    let (fast, agents) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{fast}");
    let flags = [
        "--lease-duration-seconds",
        LEASE_SECONDS,
        "--startup-wait-seconds",
        "5",
    ];
    let a = ControllerProcess::spawn(&ns, fast, agents, "replica-a", &flags)?;
    pool(&client, &ns, "p", 10, 1).await?;
    let first = wait_until("replica-a to serve", Duration::from_secs(90), || {
        create(&url, &ns, "s1", &image)
    })
    .await?;

    // The standby on the same ports: it must neither take the lease nor serve.
    let mut b = ControllerProcess::spawn(&ns, fast, agents, "replica-b", &flags)?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let renewed_at = |l: &Lease| l.spec.as_ref().and_then(|s| s.renew_time.clone());
    let before = renewed_at(&leases.get(LEASE).await?);
    // Two renewals by A (one per second) while B runs: B had the time to try.
    for _ in 0..2 {
        let seen = before.clone();
        wait_until("replica-a to renew", Duration::from_secs(10), || {
            let (leases, seen) = (&leases, seen.clone());
            async move {
                let l = leases.get(LEASE).await?;
                Ok((renewed_at(&l) != seen).then_some(()))
            }
        })
        .await?;
    }
    assert_eq!(
        holder(&leases.get(LEASE).await?),
        (Some("replica-a".into()), 0)
    );
    assert!(
        b.try_exit()?.is_none(),
        "the standby waits, it does not exit"
    );

    // kill -9 the leader: B takes over after the lease expires and serves, with the
    // sandbox A made still recorded and running under the same id.
    let killed = tokio::time::Instant::now();
    a.kill9().await?;
    wait_until("replica-b to serve", Duration::from_secs(60), || {
        create(&url, &ns, "s2", &image)
    })
    .await?;
    let took = killed.elapsed();
    assert_eq!(
        holder(&leases.get(LEASE).await?),
        (Some("replica-b".into()), 1)
    );
    assert!(
        took >= Duration::from_secs(2),
        "B waited for the lease to expire, took {took:?}"
    );
    let sandboxes: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let s1 = sandboxes.get("s1").await?;
    assert_eq!(
        s1.status.as_ref().and_then(|s| s.sandbox_id.clone()),
        Some(first),
        "the leader's sandbox survives the takeover under its id"
    );
    let mut fp = FastPathClient::connect(url.clone()).await?;
    let listed = fp
        .list(fp::ListRequest {
            namespace: ns.clone(),
            ..fp::ListRequest::default()
        })
        .await?
        .into_inner();
    let mut names: Vec<String> = listed.sandboxes.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, ["s1", "s2"]);

    // Someone else takes the lease: B must stop, not serve beside them.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    );
    leases
        .patch(
            LEASE,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "spec": {"holderIdentity": "intruder", "renewTime": now, "leaseDurationSeconds": 600}
            })),
        )
        .await?;
    let status = wait_until("replica-b to stop", Duration::from_secs(30), || {
        let status = b.try_exit();
        async move { status }
    })
    .await?;
    assert!(!status.success(), "a displaced leader exits with failure");

    // Clean up: a last controller (lease freed) deletes the sandboxes.
    leases.delete(LEASE, &DeleteParams::default()).await?;
    let c = ControllerProcess::spawn(&ns, fast, agents, "replica-c", &flags)?;
    for name in ["s1", "s2"] {
        sandboxes.delete(name, &DeleteParams::default()).await?;
    }
    wait_until("the sandboxes to go", Duration::from_secs(60), || {
        let sandboxes = &sandboxes;
        async move {
            Ok(sandboxes
                .list(&Default::default())
                .await?
                .items
                .is_empty()
                .then_some(()))
        }
    })
    .await?;
    c.kill9().await?;
    drop(kubelet);
    Ok(())
}
