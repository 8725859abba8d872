//! Local mode as a user drives it: the real `fsb up` against the harness's containerd
//! and the real `fsb` CLI, for the reference behaviours that need no Kubernetes (env
//! and working directory, same-name recreate, expiry, reset, update, logs in order,
//! capacity release, graceful delete with a SIGTERM trap, graceful shutdown of
//! `fsb up`), the CLI's exit codes, and `fsb bench --compare-raw`.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::{path::Path, process::Output, time::Duration};

use containerd_client::services::v1::{ListContainersRequest, containers_client::ContainersClient};
use fsb_tests::{
    ContainerdEnv,
    local::{LocalUp, free_port, fsb_bin},
    wait_until,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

const DEADLINE: Duration = Duration::from_secs(60);

/// Run `fsb ARGS` against the data directory of `up`.
async fn fsb(data_dir: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(fsb_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("FSB_ENDPOINT")
        .env_remove("FSB_TOKEN")
        .output()
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

async fn get_json(dir: &Path, name: &str) -> Value {
    let out = ok(fsb(dir, &["get", name, "-o", "json"]).await, "get -o json");
    serde_json::from_str(&out).unwrap()
}

async fn phase(dir: &Path, name: &str) -> String {
    get_json(dir, name).await["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn start(env: &ContainerdEnv, tag: &str, extra: &[&str]) -> LocalUp {
    let agent = format!("cli-{tag}-{}", &fsb_tests::unique_id()[..6]);
    let dir = env.run_dir.join(format!("up-{agent}"));
    LocalUp::start(env, &dir, &agent, free_port().unwrap(), extra)
        .await
        .unwrap()
}

async fn stop(mut up: LocalUp, env: &ContainerdEnv) {
    let agent = up
        .data_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("up-")
        .to_owned();
    let status = up.terminate(DEADLINE).await.unwrap();
    assert!(status.success(), "fsb up exited with {status}");
    assert!(
        !up.data_dir.join("endpoint").exists(),
        "the endpoint file outlived fsb up"
    );
    let rt = fsb_tests::container_runtime(env).await.unwrap();
    assert!(
        rt.list(Some(&agent)).await.unwrap().is_empty(),
        "--stop-sandboxes-on-exit left containers"
    );
}

#[actix_rt::test]
async fn run_rm_prints_hello_and_leaves_nothing() {
    let env = ContainerdEnv::from_env();
    let up = start(&env, "hello", &["--stop-sandboxes-on-exit"]).await;
    let d = &up.data_dir;
    let image = env.image.as_str();
    let out = ok(
        fsb(d, &["run", "--rm", "--image", image, "--", "echo", "hello"]).await,
        "run --rm",
    );
    assert_eq!(out, "hello\n");
    // Env and a missing working directory reach the process.
    let out = ok(
        fsb(
            d,
            &[
                "run",
                "--rm",
                "--image",
                image,
                "--env",
                "GREETING=hi there",
                "--workdir",
                "/tmp/made/here",
                "--",
                "sh",
                "-c",
                "echo \"$GREETING\"; pwd",
            ],
        )
        .await,
        "run --rm with env and workdir",
    );
    assert_eq!(out, "hi there\n/tmp/made/here\n");
    // The process's exit code is fsb's.
    let o = fsb(
        d,
        &["run", "--rm", "--image", image, "--", "sh", "-c", "exit 7"],
    )
    .await;
    assert_eq!(o.status.code(), Some(7));
    let listed = ok(fsb(d, &["ls", "-A", "-o", "json"]).await, "ls");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["kind"], "SandboxList", "{listed}");
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    stop(up, &env).await;
}

#[actix_rt::test]
async fn logs_update_reset_expiry_and_exit_codes() {
    let env = ContainerdEnv::from_env();
    let up = start(&env, "life", &["--stop-sandboxes-on-exit"]).await;
    let d = &up.data_dir;
    let image = env.image.as_str();

    // Logs in order, with and without follow, through the CLI (no port-forward).
    let name = ok(
        fsb(
            d,
            &[
                "run",
                "--name",
                "logs",
                "--image",
                image,
                "--",
                "sh",
                "-c",
                "echo Log-Line-1; sleep 1; echo Log-Line-2",
            ],
        )
        .await,
        "run logs",
    );
    assert_eq!(name.trim(), "logs");
    let followed = ok(fsb(d, &["logs", "-f", "logs"]).await, "logs -f");
    assert_eq!(followed, "Log-Line-1\nLog-Line-2\n");
    wait_until("logs sandbox succeeded", DEADLINE, || async {
        Ok((phase(d, "logs").await == "Succeeded").then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(
        ok(fsb(d, &["logs", "logs"]).await, "logs"),
        "Log-Line-1\nLog-Line-2\n"
    );
    assert_eq!(get_json(d, "logs").await["status"]["exitCode"], 0);

    // ls and get -o yaml show it.
    let table = ok(fsb(d, &["ls"]).await, "ls");
    assert!(
        table
            .lines()
            .any(|l| l.contains("logs") && l.contains("Succeeded")),
        "{table}"
    );
    let yaml = ok(fsb(d, &["get", "logs", "-o", "yaml"]).await, "get -o yaml");
    assert!(
        yaml.contains("kind: Sandbox") && yaml.contains("phase: Succeeded"),
        "{yaml}"
    );

    // Update labels, failure policy and expiry; reset restarts the process.
    ok(
        fsb(
            d,
            &[
                "run",
                "--name",
                "svc",
                "--image",
                image,
                "--",
                "sh",
                "-c",
                "echo started; sleep 3600",
            ],
        )
        .await,
        "run svc",
    );
    ok(
        fsb(
            d,
            &[
                "update",
                "svc",
                "--label",
                "team=a",
                "--failure-policy",
                "auto-recreate",
            ],
        )
        .await,
        "update",
    );
    let sb = get_json(d, "svc").await;
    assert_eq!(sb["metadata"]["labels"]["team"], "a", "{sb}");
    assert_eq!(sb["spec"]["failurePolicy"], "AutoRecreate", "{sb}");
    let id = sb["status"]["sandboxId"].as_str().unwrap().to_owned();
    ok(fsb(d, &["reset", "svc"]).await, "reset");
    wait_until("reset accepted", DEADLINE, || async {
        let sb = get_json(d, "svc").await;
        Ok(
            (sb["status"]["acceptedResetRevision"] == 1 && sb["status"]["phase"] == "Running")
                .then_some(sb),
        )
    })
    .await
    .unwrap();
    assert_eq!(get_json(d, "svc").await["status"]["sandboxId"], id.as_str());
    wait_until("the process ran again", DEADLINE, || async {
        let logs = ok(fsb(d, &["logs", "svc"]).await, "logs svc");
        Ok(logs.contains("started").then_some(()))
    })
    .await
    .unwrap();

    // Expiry: phase Expired, container gone, record kept without agent and id.
    ok(
        fsb(d, &["update", "svc", "--ttl", "1s"]).await,
        "update --ttl",
    );
    let expired = wait_until("svc expired", DEADLINE, || async {
        let sb = get_json(d, "svc").await;
        Ok((sb["status"]["phase"] == "Expired").then_some(sb))
    })
    .await
    .unwrap();
    assert_eq!(expired["status"]["sandboxId"], "", "{expired}");
    assert_eq!(expired["status"]["assignedAgent"], "", "{expired}");
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    assert!(
        !rt.list(None)
            .await
            .unwrap()
            .iter()
            .any(|c| c.id.as_str() == id),
        "the expired sandbox's container is still there"
    );
    let o = fsb(d, &["logs", "svc"]).await;
    assert_ne!(o.status.code(), Some(0), "logs of an expired sandbox");

    // Exit codes scripts rely on.
    assert_eq!(fsb(d, &["get", "nope"]).await.status.code(), Some(3));
    assert_eq!(fsb(d, &["rm", "nope"]).await.status.code(), Some(3));
    let o = fsb(
        d,
        &["run", "--name", "logs", "--image", image, "--", "true"],
    )
    .await;
    assert_eq!(o.status.code(), Some(4), "same name again: AlreadyExists");
    let o = fsb(d, &["run", "--image", image, "--port", "0", "--", "true"]).await;
    assert_eq!(o.status.code(), Some(2), "port 0 is a usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("port"), "{o:?}");
    // The server names the field too (the gateway's own port, which the CLI cannot know).
    let gateway_port = up.port.to_string();
    let o = fsb(
        d,
        &[
            "run",
            "--image",
            image,
            "--port",
            &gateway_port,
            "--",
            "true",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "the gateway's port: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("exposedPorts"),
        "{o:?}"
    );

    for n in ["logs", "svc"] {
        ok(fsb(d, &["rm", n]).await, "rm");
    }
    stop(up, &env).await;
}

#[actix_rt::test]
async fn recreate_capacity_and_graceful_delete() {
    let env = ContainerdEnv::from_env();
    let up = start(
        &env,
        "cap",
        &["--capacity", "5", "--stop-sandboxes-on-exit"],
    )
    .await;
    let d = &up.data_dir;
    let image = env.image.as_str();

    // Same name three times in a row: a new sandbox id each time, nothing left over.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ok(
            fsb(
                d,
                &[
                    "run", "--name", "again", "--image", image, "--", "sleep", "3600",
                ],
            )
            .await,
            "run again",
        );
        ids.push(
            get_json(d, "again").await["status"]["sandboxId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        ok(fsb(d, &["rm", "--grace", "0", "again"]).await, "rm again");
        assert_eq!(fsb(d, &["get", "again"]).await.status.code(), Some(3));
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "every recreate has a new sandbox id");

    // Capacity 5: the sixth is refused (exit 6), deleting 3 frees slots at once.
    for i in 0..5 {
        ok(
            fsb(
                d,
                &[
                    "run",
                    "--name",
                    &format!("c{i}"),
                    "--image",
                    image,
                    "--",
                    "sleep",
                    "3600",
                ],
            )
            .await,
            "run c",
        );
    }
    let o = fsb(
        d,
        &[
            "run", "--name", "c5", "--image", image, "--", "sleep", "3600",
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(6), "{o:?}");
    ok(
        fsb(d, &["rm", "--grace", "0", "c0", "c1", "c2"]).await,
        "rm three",
    );
    ok(
        fsb(
            d,
            &[
                "run", "--name", "c5", "--image", image, "--", "sleep", "3600",
            ],
        )
        .await,
        "run after release",
    );

    // Graceful delete: the trap runs (its output reaches the log) before removal.
    ok(
        fsb(
            d,
            &[
                "run",
                "--name",
                "trap",
                "--image",
                image,
                "--",
                "sh",
                "-c",
                "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        )
        .await,
        "run trap",
    );
    // Follow the log; once `ready` arrived the follower is attached, then delete.
    let mut follower = tokio::process::Command::new(fsb_bin())
        .arg("--data-dir")
        .arg(d)
        .args(["logs", "-f", "trap"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("ready"));
    ok(fsb(d, &["rm", "--grace", "10", "trap"]).await, "rm trap");
    let mut rest = Vec::new();
    while let Some(line) = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        rest.push(line);
    }
    assert_eq!(
        rest,
        ["got-term"],
        "the trap ran before the sandbox was removed"
    );
    assert!(follower.wait().await.unwrap().success());

    // Graceful shutdown of fsb up with --stop-sandboxes-on-exit removes the rest.
    stop(up, &env).await;
}

/// `fsb bench --compare-raw` against the real `fsb up` and the same containerd: the
/// JSON has the documented shape with real (millisecond) figures for both paths, and
/// the bench leaves no sandbox or container behind.
#[actix_rt::test]
async fn bench_compares_the_full_path_with_raw_containerd() {
    let env = ContainerdEnv::from_env();
    let up = start(&env, "bench", &["--stop-sandboxes-on-exit"]).await;
    let d = &up.data_dir;
    let socket = env.socket.display().to_string();
    let root = env.runtime_root.display().to_string();
    let out = ok(
        fsb(
            d,
            &[
                "bench",
                "--count",
                "4",
                "--warmup",
                "1",
                "--concurrency",
                "2",
                "--compare-raw",
                "--containerd-socket",
                &socket,
                "--runtime-root",
                &root,
                "--image",
                &env.image,
                "--runtime",
                "runc",
                "--json",
            ],
        )
        .await,
        "bench",
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["count"], 4, "{v}");
    assert_eq!(v["concurrency"], 2, "{v}");
    for path in ["fsb", "raw"] {
        for key in ["p50_ms", "p90_ms", "p99_ms", "max_ms"] {
            let ms = v[path][key].as_f64().unwrap_or(0.0);
            // A real runc create (shim start + runc create) takes milliseconds.
            assert!(ms > 1.0, "{path}.{key}: {v}");
        }
    }
    let ratio = v["ratio_p50"].as_f64().unwrap();
    assert!(ratio > 0.0, "{v}");
    let listed: Value =
        serde_json::from_str(&ok(fsb(d, &["ls", "-A", "-o", "json"]).await, "ls")).unwrap();
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    // The raw path's containers carry only the bench label (not ours).
    let channel = env.connect().await.unwrap();
    let leftovers = ContainersClient::new(channel)
        .list(env.request(ListContainersRequest {
            filters: vec!["labels.\"fast-sandbox.io/bench\"".to_owned()],
        }))
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(leftovers.is_empty(), "bench containers left: {leftovers:?}");
    stop(up, &env).await;
}
