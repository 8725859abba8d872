//! Warm instances end to end in local mode: `fsb up --warm IMAGE=3` keeps three
//! instances ready (fsb-init as PID 1); creates through the fast path take them (the
//! registry assigns an instance, its id becomes the sandbox id, the agent hands the
//! process over), each with its own command and env; 3x more creates than instances
//! all succeed, the extra ones cold with the reason in their timeline; the level
//! recovers. Real containerd, real `fsb up` binary.

#![allow(clippy::unwrap_used)] // test code

use std::{path::PathBuf, time::Duration};

use fsb_agent::{LABEL_WARM, runtime::TaskState};
use fsb_core::labels::LABEL_SANDBOX_NAME;
use fsb_proto::fastpath::v1 as fp;
use fsb_tests::{
    ContainerdEnv,
    local::{LocalUp, free_port},
    wait_until,
};

const WARM: usize = 3;

/// Ready (unclaimed, running) warm instances of `agent` in containerd.
async fn ready_instances(env: &ContainerdEnv, agent: &str) -> usize {
    let rt = fsb_tests::container_runtime(env).await.unwrap();
    rt.list(Some(agent))
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.labels.get(LABEL_WARM).is_some_and(|v| !v.is_empty()))
        .filter(|o| o.state == TaskState::Running)
        .count()
}

async fn wait_for_level(env: &ContainerdEnv, agent: &str) {
    wait_until(
        "the warm level to reach its target",
        Duration::from_secs(60),
        || async { Ok((ready_instances(env, agent).await >= WARM).then_some(())) },
    )
    .await
    .unwrap();
    // The registry hears of new instances from the agent's next report (every
    // 100 ms in local mode); leave it ample time.
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn creates_take_warm_instances_fall_back_cold_and_the_level_recovers() {
    let env = ContainerdEnv::from_env();
    let init = std::env::var("FSB_INIT_BIN").expect("FSB_INIT_BIN is set by tests/run.sh");
    let dir = PathBuf::from(std::env::var("FSB_TEST_RUN_DIR").unwrap_or_else(|_| "/tmp".into()))
        .join(format!("local-warm-{}", std::process::id()));
    let agent = format!("warm-{}", std::process::id());
    let warm_flag = format!("{}={WARM}", env.image);
    let mut up = LocalUp::start(
        &env,
        &dir,
        &agent,
        free_port().unwrap(),
        &["--warm", &warm_flag, "--init-binary", &init],
    )
    .await
    .unwrap();
    let mut client = up.client().unwrap();
    wait_for_level(&env, &agent).await;

    // 3x the instances, one at a time, each with its own command and env.
    let mut created = Vec::new();
    for i in 0..3 * WARM {
        let resp = client
            .create(fp::CreateRequest {
                request_id: format!("warm-{i}"),
                namespace: "default".into(),
                name: format!("w{i}"),
                mode: fp::ConsistencyMode::Fast as i32,
                spec: Some(fp::SandboxSpec {
                    image: env.image.clone(),
                    pool_ref: "default".into(),
                    command: vec!["sh".into(), "-c".into()],
                    args: vec![r#"echo "I am $WHO in $(pwd)"; exec sleep 600"#.into()],
                    envs: vec![fp::EnvVar {
                        name: "WHO".into(),
                        value: format!("w{i}"),
                    }],
                    working_dir: format!("/work/w{i}"),
                    ..fp::SandboxSpec::default()
                }),
                ..fp::CreateRequest::default()
            })
            .await
            .unwrap_or_else(|e| panic!("create {i} must succeed: {e}"))
            .into_inner();
        let timeline = resp.timeline.unwrap();
        let id = resp.sandbox.unwrap().status.unwrap().sandbox_id;
        created.push((format!("w{i}"), id, timeline));
    }
    let warm: Vec<_> = created
        .iter()
        .filter(|(_, _, t)| t.path == "warm")
        .collect();
    let cold: Vec<_> = created
        .iter()
        .filter(|(_, _, t)| t.path == "cold")
        .collect();
    assert_eq!(warm.len() + cold.len(), created.len());
    // The level was full, so the first three are warm; refills run meanwhile, so
    // some later ones may be warm too, but not all: they outpace a refill.
    for (name, _, t) in &created[..WARM] {
        assert_eq!(t.path, "warm", "{name}: {t:?}");
        assert!(
            t.stages.iter().any(|s| s.name == "runtime.handover"),
            "{name}: {t:?}"
        );
        assert!(t.started_unix_us > 0, "{name}: the start is reported");
    }
    assert!(
        !cold.is_empty(),
        "9 creates at once cannot all find an instance"
    );
    for (name, _, t) in &cold {
        assert_eq!(
            t.note, "cold: no warm instance",
            "{name}: the timeline says why"
        );
    }

    // Each one runs its own process, late-bound, with its own env and workdir.
    for (name, _, _) in &created {
        let text = wait_until("the sandbox's first line", Duration::from_secs(20), || {
            let mut client = client.clone();
            let name = name.clone();
            async move {
                let mut stream = client
                    .logs(fp::LogsRequest {
                        namespace: "default".into(),
                        name,
                        follow: false,
                        tail_lines: 0,
                    })
                    .await?
                    .into_inner();
                let mut text = String::new();
                while let Some(chunk) = stream.message().await? {
                    text.push_str(&String::from_utf8_lossy(&chunk.data));
                }
                Ok(text.contains("I am").then_some(text))
            }
        })
        .await
        .unwrap();
        assert!(
            text.contains(&format!("I am {name} in /work/{name}")),
            "{name}: {text:?}"
        );
        assert!(
            !text.contains("fsb-init started"),
            "the report line is hidden: {text:?}"
        );
    }

    // Claimed instances carry their sandbox's labels in containerd (set after the
    // handover, in the background).
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    for (name, id, _) in &warm {
        wait_until(
            "a claimed instance's labels",
            Duration::from_secs(10),
            || {
                let (rt, agent) = (rt.clone(), agent.clone());
                async move {
                    let listed = rt.list(Some(&agent)).await?;
                    let o = listed.iter().find(|o| o.id.as_str() == id).unwrap();
                    Ok((o.pending_labels.is_none()
                        && !o.labels.contains_key(LABEL_WARM)
                        && o.labels.get(LABEL_SANDBOX_NAME) == Some(name))
                    .then_some(()))
                }
            },
        )
        .await
        .unwrap();
    }

    // The pool refills to its target, and `fsb ls` (List) shows the level.
    wait_for_level(&env, &agent).await;
    let image = fsb_core::ImageRef::parse("image", &env.image)
        .unwrap()
        .to_string();
    wait_until(
        "List to show the warm level",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            let image = image.clone();
            async move {
                let warm = client
                    .list(fp::ListRequest::default())
                    .await?
                    .into_inner()
                    .warm;
                Ok(warm
                    .iter()
                    .any(|w| {
                        w.pool_ref == "default"
                            && w.image == image
                            && w.runtime == fp::Runtime::Runc as i32
                            && w.ready as usize >= WARM
                    })
                    .then_some(()))
            }
        },
    )
    .await
    .unwrap();

    for (name, _, _) in &created {
        client
            .delete(fp::DeleteRequest {
                namespace: "default".into(),
                name: name.clone(),
                grace_period_seconds: Some(0),
            })
            .await
            .unwrap();
    }
    up.terminate(Duration::from_secs(30)).await.unwrap();
    // What is left of this agent are its unclaimed instances (kept across restarts,
    // adopted by the next start); remove them.
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    for o in rt.list(Some(&agent)).await.unwrap() {
        assert!(
            o.labels.get(LABEL_WARM).is_some_and(|v| !v.is_empty()),
            "only unclaimed instances remain: {:?}",
            o.labels
        );
        rt.remove(&o.id, Duration::ZERO).await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--stop-sandboxes-on-exit` leaves no warm instance behind, not even one whose
/// start was still in flight when `fsb up` was told to stop.
#[tokio::test]
async fn stopping_fsb_up_removes_instances_still_starting() {
    let env = ContainerdEnv::from_env();
    let init = std::env::var("FSB_INIT_BIN").expect("FSB_INIT_BIN is set by tests/run.sh");
    let dir = PathBuf::from(std::env::var("FSB_TEST_RUN_DIR").unwrap_or_else(|_| "/tmp".into()))
        .join(format!("local-warm-stop-{}", std::process::id()));
    let agent = format!("warm-stop-{}", std::process::id());
    let warm_flag = format!("{}=16", env.image);
    let mut up = LocalUp::start(
        &env,
        &dir,
        &agent,
        free_port().unwrap(),
        &[
            "--warm",
            &warm_flag,
            "--warm-max-starting",
            "4",
            "--init-binary",
            &init,
            "--stop-sandboxes-on-exit",
        ],
    )
    .await
    .unwrap();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    // Stop as soon as containerd holds the first instance: others are mid-start.
    wait_until("a first warm instance", Duration::from_secs(60), || async {
        Ok((!rt.list(Some(&agent)).await?.is_empty()).then_some(()))
    })
    .await
    .unwrap();
    let status = up.terminate(Duration::from_secs(60)).await.unwrap();
    assert!(status.success(), "{status:?}");
    let left = rt.list(Some(&agent)).await.unwrap();
    for o in &left {
        let _ = rt.remove(&o.id, Duration::ZERO).await;
    }
    assert!(
        left.is_empty(),
        "left behind: {:?}",
        left.iter().map(|o| (&o.id, o.state)).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
