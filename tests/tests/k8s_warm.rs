//! Warm instances in Kubernetes mode: a SandboxPool's `warmImages` reach its agent
//! pods (FSB_WARM), the agents start the instances, the pool's status counts them
//! (`warmReady`), and a fast-path create takes one (timeline path `warm`, the
//! instance's id as sandbox id); the level refills. Real API server, controller
//! in-process, real `fsb-agent` processes run by the kubelet fixture, real containerd.
#![cfg(feature = "k8s")]

use std::time::Duration;

use anyhow::Result;
use fsb_controller::crd::{PoolCapacity, RuntimeName, SandboxPool, SandboxPoolSpec, WarmImage};
use fsb_proto::fastpath::v1::{self as fp, fast_path_client::FastPathClient};
use fsb_tests::{
    cluster::{ControllerUnderTest, install_crds, namespace},
    containerd::ContainerdEnv,
    k8s::kube_client,
    kubelet::Kubelet,
    wait::wait_until,
};
use kube::{Api, api::PostParams};

const WARM: u32 = 2;
const DEADLINE: Duration = Duration::from_secs(90);

async fn warm_ready(pools: &Api<SandboxPool>) -> Result<u32> {
    Ok(pools.get("p").await?.status.map_or(0, |s| s.warm_ready))
}

#[actix_rt::test]
async fn a_pools_warm_images_are_kept_ready_counted_and_taken_by_creates() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let client = kube_client().await?;
    install_crds(&client).await?;
    let ns = format!("warm-{}", &fsb_tests::unique_id()[..8]);
    namespace(&client, &ns).await?;
    let controller = ControllerUnderTest::start(client.clone(), &ns, |_| {}).await?;
    let _kubelet = Kubelet::start(client.clone(), &ns).await?;
    let pools: Api<SandboxPool> = Api::namespaced(client.clone(), &ns);
    pools
        .create(
            &PostParams::default(),
            &SandboxPool::new(
                "p",
                SandboxPoolSpec {
                    capacity: PoolCapacity {
                        pool_min: 1,
                        pool_max: 1,
                        buffer_min: 0,
                        buffer_max: 0,
                    },
                    max_sandboxes_per_pod: 8,
                    runtime: RuntimeName::Runc,
                    warm_images: vec![WarmImage {
                        image: image.clone(),
                        count: WARM,
                    }],
                    agent_template: None,
                    sandbox_security: None,
                },
            ),
        )
        .await?;

    let wait_level = || {
        wait_until("the pool's warmReady to reach its target", DEADLINE, || {
            let pools = pools.clone();
            async move { Ok((warm_ready(&pools).await? >= WARM).then_some(())) }
        })
    };
    wait_level().await?;

    let mut c = FastPathClient::connect(controller.url()).await?;
    let resp = c
        .create(fp::CreateRequest {
            request_id: "warm-1".into(),
            namespace: ns.clone(),
            name: "w1".into(),
            mode: fp::ConsistencyMode::Strong as i32,
            spec: Some(fp::SandboxSpec {
                image: image.clone(),
                pool_ref: "p".into(),
                command: vec!["sleep".into(), "600".into()],
                ..fp::SandboxSpec::default()
            }),
            ..fp::CreateRequest::default()
        })
        .await?
        .into_inner();
    let timeline = resp.timeline.unwrap_or_default();
    assert_eq!(timeline.path, "warm", "{timeline:?}");
    assert!(timeline.started_unix_us > 0, "{timeline:?}");
    let phase = resp
        .sandbox
        .and_then(|s| s.status)
        .map(|s| s.phase())
        .unwrap_or_default();
    assert_eq!(phase, fp::Phase::Running);

    // The claimed instance is replaced.
    wait_level().await?;

    c.delete(fp::DeleteRequest {
        namespace: ns.clone(),
        name: "w1".into(),
        grace_period_seconds: Some(0),
    })
    .await?;
    controller.stop().await;
    Ok(())
}
