//! Observability from the CLI against the real `fsb up` and containerd: `fsb get`
//! shows the start timeline of a STRONG and a FAST create once recorded, the same
//! after an `fsb up` restart (it is in the store, not in memory), and `fsb top`
//! shows the local agent's used slots move with creates and deletes.

#![allow(clippy::unwrap_used)] // test code

use std::time::Duration;

use fsb_tests::{
    ContainerdEnv,
    local::{LocalUp, free_port},
    wait_until,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// The local agent's row of `fsb top --once -o json`.
async fn agent_usage(up: &LocalUp, agent: &str) -> Value {
    let v = up.cli_json(&["top", "--once"]).await.unwrap();
    v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agentId"] == agent)
        .cloned()
        .unwrap_or_else(|| panic!("agent {agent} missing from fsb top: {v}"))
}

async fn wait_used(up: &LocalUp, agent: &str, used: u64) -> Value {
    wait_until(&format!("{used} slots used"), DEADLINE, || async {
        let a = agent_usage(up, agent).await;
        Ok((a["slotsUsed"] == used).then_some(a))
    })
    .await
    .unwrap()
}

/// A recorded sandbox's timeline: cold, with every gateway stage and a total.
async fn recorded_timeline(up: &LocalUp, name: &str, stages: &[&str]) -> Value {
    let sb = wait_until(&format!("{name} recorded"), DEADLINE, || async {
        let sb = up.cli_json(&["get", name]).await?;
        Ok((sb["status"]["recorded"] == true).then_some(sb))
    })
    .await
    .unwrap();
    let t = sb["status"]["timeline"].clone();
    assert_eq!(t["path"], "cold", "{sb}");
    assert!(t["totalUs"].as_u64().unwrap() > 0, "{t}");
    let names: Vec<&str> = t["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .filter(|n| !n.starts_with("runtime."))
        .collect();
    assert_eq!(names, stages, "{t}");
    assert!(
        t["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"].as_str().unwrap().starts_with("runtime.")),
        "the agent's own stages are kept: {t}"
    );
    t
}

#[tokio::test]
async fn get_shows_the_recorded_timeline_across_a_restart_and_top_shows_slots() {
    let env = ContainerdEnv::from_env();
    let agent = format!("top-{}", &fsb_tests::unique_id()[..6]);
    let dir = env.run_dir.join(format!("up-{agent}"));
    let port = free_port().unwrap();
    let mut up = LocalUp::start(&env, &dir, &agent, port, &[]).await.unwrap();

    let before = wait_used(&up, &agent, 0).await;
    assert_eq!(before["healthy"], true, "{before}");
    assert!(before["slotsCapacity"].as_u64().unwrap() >= 2, "{before}");

    let image = env.image.as_str();
    for (name, mode) in [("strong1", "strong"), ("fast1", "fast")] {
        let out = up
            .cli(&[
                "run", "--name", name, "--mode", mode, "--image", image, "--", "sleep", "600",
            ])
            .await
            .unwrap();
        assert_eq!(out.trim(), name);
    }
    let strong = recorded_timeline(
        &up,
        "strong1",
        &["validate", "allocate", "record", "agent", "runtime"],
    )
    .await;
    let fast = recorded_timeline(&up, "fast1", &["validate", "allocate", "agent", "runtime"]).await;
    let table = up.cli(&["get", "strong1"]).await.unwrap();
    assert!(table.contains("Timeline:"), "{table}");
    assert!(table.contains("(cold path)"), "{table}");
    assert!(
        table.contains("STAGE") && table.contains("allocate"),
        "{table}"
    );

    let used = wait_used(&up, &agent, 2).await;
    let top = up.cli_json(&["top", "--once"]).await.unwrap();
    let pool = &top["pools"][0];
    assert_eq!(pool["slotsUsed"], 2, "{top}");
    assert_eq!(
        pool["slotsFree"].as_u64().unwrap(),
        used["slotsCapacity"].as_u64().unwrap() - 2,
        "{top}"
    );
    let table = up.cli(&["top", "--once"]).await.unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.contains(&agent) && l.contains("healthy")),
        "{table}"
    );

    // The timelines come from the store: the same after a restart.
    let status = up.terminate(DEADLINE).await.unwrap();
    assert!(status.success(), "fsb up exited with {status}");
    up = LocalUp::start(&env, &dir, &agent, port, &[]).await.unwrap();
    for (name, timeline) in [("strong1", &strong), ("fast1", &fast)] {
        let sb = up.cli_json(&["get", name]).await.unwrap();
        assert_eq!(&sb["status"]["timeline"], timeline, "{name} after restart");
    }
    wait_used(&up, &agent, 2).await;

    up.cli(&["rm", "strong1", "fast1", "--grace", "0"])
        .await
        .unwrap();
    wait_used(&up, &agent, 0).await;
    let status = up.terminate(DEADLINE).await.unwrap();
    assert!(status.success(), "fsb up exited with {status}");
}
