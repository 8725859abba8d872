//! Warm-instance handoff on the real containerd, for runc, crun and gVisor: a container
//! whose PID 1 is the static `fsb-init` (bind-mounted read-only) is created and started
//! ahead of time with a stdin FIFO; claiming it writes the process spec there, and the
//! process runs with the claimed env, a created working directory and the claimed user,
//! reports its start first in the log, and its exit ends the instance.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fsb_agent::runtime::{ContainerdRuntime, TaskState};
use fsb_core::spec::Runtime;
use fsb_init::{InitSpec, REPORT_PREFIX};
use fsb_tests::{ContainerdEnv, wait_until};
use futures::StreamExt;

const DEADLINE: Duration = Duration::from_secs(20);

/// A warm plan: `/.fsb/init` (the static binary of `FSB_INIT_BIN`) as PID 1.
async fn warm_plan(
    env: &ContainerdEnv,
    rt: &ContainerdRuntime,
    runtime: Runtime,
) -> fsb_agent::runtime::ContainerPlan {
    let init = std::env::var("FSB_INIT_BIN").expect("FSB_INIT_BIN is set by tests/run.sh");
    let mut plan = fsb_tests::shell_plan(env, rt, runtime, "unused")
        .await
        .unwrap();
    let mut spec: serde_json::Value = serde_json::from_slice(&plan.spec_json).unwrap();
    spec["process"]["args"] = serde_json::json!(["/.fsb/init"]);
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/.fsb/init", "type": "bind", "source": init,
            "options": ["rbind", "ro", "nosuid", "nodev"]
        }));
    plan.spec_json = serde_json::to_vec(&spec).unwrap();
    plan.warm = true;
    plan
}

fn now_us() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_claimed_warm_instance_runs_the_claimed_process_on_every_runtime() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    for runtime in [Runtime::Runc, Runtime::Crun, Runtime::Gvisor] {
        let plan = warm_plan(&env, &rt, runtime).await;
        let id = plan.id.clone();
        let init_pid = rt.create(&plan).await.unwrap().pid;
        assert!(
            matches!(rt.task_state(&id).await.unwrap(), TaskState::Running),
            "{runtime:?}: fsb-init waits for its spec"
        );

        let spec = InitSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                r#"echo "hello $GREETING"; pwd; id -u; exit 4"#.into(),
            ],
            env: vec![
                ("PATH".into(), "/bin:/usr/bin".into()),
                ("GREETING".into(), "warm world".into()),
            ],
            cwd: Some("/work/new".into()),
            uid: Some(65534),
            gid: None,
        };
        let sent_us = now_us();
        let sent = Instant::now();
        // runc and crun: straight into the stdin pipe; gVisor: through the FIFO.
        let direct = (runtime != Runtime::Gvisor).then_some(init_pid);
        let report = rt.hand_over(&id, direct, &spec, DEADLINE).await.unwrap();
        eprintln!(
            "{runtime:?}: claim -> process started {} us (report seen after {:?})",
            report.unix_us.saturating_sub(sent_us),
            sent.elapsed()
        );
        assert!(
            report.unix_us >= sent_us,
            "{runtime:?}: started after the claim"
        );

        let state = wait_until("the claimed process to exit", DEADLINE, || async {
            Ok(match rt.task_state(&id).await? {
                s @ TaskState::Stopped { .. } => Some(s),
                _ => None,
            })
        })
        .await
        .unwrap();
        assert_eq!(state, TaskState::Stopped { exit_code: 4 }, "{runtime:?}");
        let log = tokio::fs::read_to_string(rt.log_paths(&id).stdout)
            .await
            .unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert!(
            lines[0].starts_with(REPORT_PREFIX),
            "{runtime:?}: the report comes first: {lines:?}"
        );
        assert_eq!(
            &lines[1..],
            ["hello warm world", "/work/new", "65534"],
            "{runtime:?}"
        );
        assert!(rt.remove(&id, Duration::from_secs(1)).await.unwrap());
    }
}

#[tokio::test]
async fn an_unclaimed_instance_stops_at_once_and_a_spent_one_cannot_be_claimed_again() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    // Unclaimed: SIGTERM ends fsb-init (status 143), no SIGKILL after the grace (137).
    let mut exits = Box::pin(rt.exits().await.unwrap());
    let plan = warm_plan(&env, &rt, Runtime::Runc).await;
    let started = rt.create(&plan).await.unwrap();
    // PID 1 of a pid namespace drops a TERM it has no handler for yet: wait until
    // fsb-init catches it (a TERM right after the task starts could come first).
    wait_until("fsb-init to catch SIGTERM", DEADLINE, || async move {
        let status = tokio::fs::read_to_string(format!("/proc/{}/status", started.pid)).await?;
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & (1 << (15 - 1)) != 0);
        Ok(caught.then_some(()))
    })
    .await
    .unwrap();
    let remover = {
        let (rt, id) = (rt.clone(), plan.id.clone());
        tokio::spawn(async move { rt.remove(&id, Duration::from_secs(30)).await })
    };
    let exit = tokio::time::timeout(DEADLINE, async {
        loop {
            let e = exits.next().await.expect("event stream open");
            if e.id == plan.id {
                return e;
            }
        }
    })
    .await
    .expect("exit event before the grace period is over");
    assert_eq!(exit.exit_code, 143, "ended by its TERM handler");
    assert!(remover.await.unwrap().unwrap());

    // Spent: once its process has exited, a second claim fails instead of hanging.
    let plan = warm_plan(&env, &rt, Runtime::Runc).await;
    let init_pid = rt.create(&plan).await.unwrap().pid;
    let spec = InitSpec {
        argv: vec!["true".into()],
        env: vec![("PATH".into(), "/bin".into())],
        ..InitSpec::default()
    };
    rt.hand_over(&plan.id, Some(init_pid), &spec, DEADLINE)
        .await
        .unwrap();
    wait_until("the process to exit", DEADLINE, || async {
        Ok(matches!(rt.task_state(&plan.id).await?, TaskState::Stopped { .. }).then_some(()))
    })
    .await
    .unwrap();
    // Its init is gone, so the direct way fails and the FIFO has no reader.
    let again = rt
        .hand_over(&plan.id, Some(init_pid), &spec, Duration::from_millis(500))
        .await;
    assert!(
        again.is_err(),
        "a spent instance is never claimed twice: {again:?}"
    );
    assert!(rt.remove(&plan.id, Duration::from_secs(1)).await.unwrap());
}

/// With the init's pid (runc, crun) the spec goes straight into the pipe that is the
/// init's stdin, not through the stdin FIFO: with the FIFO's path gone a claim still
/// works. A pid that is not the instance's init (this test's own) is never written
/// to: that claim falls back to the FIFO, and fails once the FIFO is gone.
#[tokio::test]
async fn a_claim_writes_into_the_inits_stdin_pipe_and_only_the_inits() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    let spec = InitSpec {
        argv: vec!["true".into()],
        env: vec![("PATH".into(), "/bin".into())],
        ..InitSpec::default()
    };
    let foreign = Some(std::process::id());
    for runtime in [Runtime::Runc, Runtime::Crun] {
        let direct = warm_plan(&env, &rt, runtime).await;
        let pid = rt.create(&direct).await.unwrap().pid;
        std::fs::remove_file(rt.stdin_fifo(&direct.id)).unwrap();
        rt.hand_over(&direct.id, Some(pid), &spec, DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("{runtime:?}: by pid, without the FIFO: {e}"));

        let fallback = warm_plan(&env, &rt, runtime).await;
        rt.create(&fallback).await.unwrap();
        rt.hand_over(&fallback.id, foreign, &spec, DEADLINE)
            .await
            .unwrap_or_else(|e| panic!("{runtime:?}: a foreign pid falls back to the FIFO: {e}"));

        let refused = warm_plan(&env, &rt, runtime).await;
        rt.create(&refused).await.unwrap();
        std::fs::remove_file(rt.stdin_fifo(&refused.id)).unwrap();
        let err = rt
            .hand_over(&refused.id, foreign, &spec, Duration::from_millis(500))
            .await;
        assert!(
            err.is_err(),
            "{runtime:?}: written to a foreign pid: {err:?}"
        );
        for id in [&direct.id, &fallback.id, &refused.id] {
            assert!(rt.remove(id, Duration::ZERO).await.unwrap());
        }
    }
}

/// Claim `plan`'s instance with `sh -c script` and return its stdout after the report.
async fn claim_and_read(rt: &ContainerdRuntime, id: &fsb_core::SandboxId, script: &str) -> String {
    let spec = InitSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/bin:/usr/bin".into())],
        ..InitSpec::default()
    };
    rt.hand_over(id, None, &spec, DEADLINE).await.unwrap();
    wait_until("the claimed process to exit", DEADLINE, || async {
        Ok(matches!(rt.task_state(id).await?, TaskState::Stopped { .. }).then_some(()))
    })
    .await
    .unwrap();
    let log = tokio::fs::read_to_string(rt.log_paths(id).stdout)
        .await
        .unwrap();
    log.lines()
        .filter(|l| !l.starts_with(REPORT_PREFIX))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn instances_of_one_image_share_nothing() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    // Both made ahead of time from the same image, as a warm pool holds them.
    let (a, b) = (
        warm_plan(&env, &rt, Runtime::Runc).await,
        warm_plan(&env, &rt, Runtime::Runc).await,
    );
    rt.create(&a).await.unwrap();
    rt.create(&b).await.unwrap();
    // Counts `sleep` processes this sandbox can see.
    const SLEEPERS: &str =
        "for p in /proc/[0-9]*; do cat $p/comm 2>/dev/null; done | grep -c '^sleep$'";
    // A writes a file, leaves a process behind and sets a variable; it sees its own
    // `sleep` (so the count below can see one). The background child is `sh` until it
    // has exec'd `sleep`: count until it shows (bounded), not once right after `&`.
    let out_a = claim_and_read(
        &rt,
        &a.id,
        &format!(
            "echo secret > /tmp/a-was-here; export A_SECRET=1; sleep 600 & \
             n=0; for i in $(seq 1 500); do n=$({SLEEPERS}); [ \"$n\" -ge 1 ] && break; done; echo $n"
        ),
    )
    .await;
    assert_eq!(out_a, "1", "A sees its own process");
    let out_b = claim_and_read(
        &rt,
        &b.id,
        &format!("ls /tmp; echo \"env=${{A_SECRET:-none}}\"; {SLEEPERS} || true"),
    )
    .await;
    assert_eq!(
        out_b.lines().collect::<Vec<_>>(),
        ["env=none", "0"],
        "B sees no file, variable or process of A"
    );
    for plan in [a, b] {
        assert!(rt.remove(&plan.id, Duration::from_secs(1)).await.unwrap());
    }
}

/// A sandbox's cgroup file (see [`fsb_tests::sandbox_cgroup_value`]).
fn cgroup_value(controller: &str, v1: &str, v2: &str, id: &fsb_core::SandboxId) -> String {
    fsb_tests::sandbox_cgroup_value(controller, v1, v2, id).unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test]
async fn limits_are_applied_to_a_running_instance_on_runc_and_crun() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    let limits = serde_json::json!({
        "pids": { "limit": 32 },
        "memory": { "limit": 64 << 20 },
        "cpu": { "quota": 50_000, "period": 100_000 },
    });
    for runtime in [Runtime::Runc, Runtime::Crun] {
        let plan = warm_plan(&env, &rt, runtime).await;
        rt.create(&plan).await.unwrap();
        rt.update_limits(&plan.id, &limits).await.unwrap();
        assert_eq!(
            cgroup_value("pids", "pids.max", "pids.max", &plan.id),
            "32",
            "{runtime:?}"
        );
        assert_eq!(
            cgroup_value("memory", "memory.limit_in_bytes", "memory.max", &plan.id),
            (64u64 << 20).to_string(),
            "{runtime:?}"
        );
        assert_eq!(
            cgroup_value("cpu", "cpu.cfs_quota_us", "cpu.max", &plan.id)
                .split_whitespace()
                .next()
                .unwrap(),
            "50000",
            "{runtime:?}"
        );
        // The claimed process lives under them: one of the limited cgroup's two
        // processes, beside fsb-init (`cgroup.procs` lists processes; `pids.current`
        // also counts fsb-init's threads).
        let spec = InitSpec {
            argv: vec!["sleep".into(), "30".into()],
            env: vec![("PATH".into(), "/bin:/usr/bin".into())],
            ..InitSpec::default()
        };
        rt.hand_over(&plan.id, None, &spec, DEADLINE).await.unwrap();
        wait_until(
            "init and the claimed process in the cgroup",
            DEADLINE,
            || {
                let id = plan.id.clone();
                async move {
                    let procs = cgroup_value("pids", "cgroup.procs", "cgroup.procs", &id);
                    Ok((procs.lines().count() == 2).then_some(()))
                }
            },
        )
        .await
        .unwrap();
        assert!(rt.remove(&plan.id, Duration::from_secs(1)).await.unwrap());
    }
}

/// An instance claimed just before its agent stopped (claim recorded, containerd's
/// labels not yet set: they follow a claim in the background): the next agent, which
/// wants exactly such an instance, recovers it as the sandbox the claim names and sets
/// those labels. It is never offered as a warm instance again.
#[actix_rt::test]
async fn an_instance_claimed_before_its_agent_stopped_is_recovered_as_that_sandbox() {
    use std::collections::HashMap;

    use fsb_agent::{AgentHandle, LABEL_WARM, warm::WarmConfig};
    use fsb_core::labels::{LABEL_AGENT_UID, LABEL_NAMESPACE, LABEL_SANDBOX_NAME};

    let env = ContainerdEnv::from_env();
    let agent = format!("warm-claimed-{}", std::process::id());
    let mut cfg = fsb_tests::agent_config(&env, &agent, 4);
    let cd = fsb_agent::containerd::Containerd::connect(fsb_tests::containerd_config(&env))
        .await
        .unwrap();
    let rt = ContainerdRuntime::new(cd, cfg.log_dir.clone());
    let (key, _) = WarmConfig::parse_target(&format!("{}=1", env.image), Runtime::Runc).unwrap();
    let mut plan = warm_plan(&env, &rt, Runtime::Runc).await;
    plan.labels.insert(LABEL_AGENT_UID.into(), agent.clone());
    plan.labels
        .insert(LABEL_WARM.into(), format!("runc|{}", key.image));
    let id = plan.id.clone();
    rt.create(&plan).await.unwrap();
    let claim: HashMap<String, String> = [
        (LABEL_WARM, ""),
        (LABEL_NAMESPACE, "team-a"),
        (LABEL_SANDBOX_NAME, "claimed"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    rt.record_claim(&id, &claim).await.unwrap();

    cfg.warm = WarmConfig {
        targets: vec![(key, 1)],
        init: Some(std::env::var("FSB_INIT_BIN").unwrap().into()),
        ..WarmConfig::default()
    };
    let handle = AgentHandle::start(cfg).await.unwrap();
    let inventory = handle.inventory().await.unwrap();
    let record = inventory.iter().find(|r| r.id == id);
    assert_eq!(
        record.map(|r| (r.namespace.as_str(), r.name.as_str())),
        Some(("team-a", "claimed")),
        "{inventory:?}"
    );
    let warm = handle.warm_instances().await.unwrap();
    assert!(
        warm.iter().all(|(_, w)| *w != id),
        "offered again: {warm:?}"
    );
    wait_until(
        "containerd to hold the claim's labels",
        DEADLINE,
        || async {
            let listed = rt.list(Some(&agent)).await?;
            let o = listed.iter().find(|o| o.id == id).expect("still there");
            let labels_pending = o.pending_labels.is_some();
            Ok((!labels_pending
                && o.labels.get(LABEL_SANDBOX_NAME).map(String::as_str) == Some("claimed"))
            .then_some(()))
        },
    )
    .await
    .unwrap();

    handle.stop_warm().await.unwrap();
    rt.remove(&id, Duration::ZERO).await.unwrap();
}
