//! The `fsb-agent` binary over gRPC against the real containerd: validation errors
//! name the field, exec streams output and the exit code, and a `kill -9` of the agent
//! with 20 running sandboxes loses nothing: the shim keeps writing their logs while the
//! agent is down, and the restarted agent reports the same 20, still running.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::{path::PathBuf, process::Stdio, time::Duration};

use fsb_proto::{
    agent::v1::{
        CreateSandboxRequest, DeleteSandboxRequest, ExecRequest, ExecStart, LogsRequest,
        StatsRequest, agent_client::AgentClient, exec_request,
    },
    fastpath::v1::{SandboxSpec, exec_response},
};
use fsb_tests::{ContainerdEnv, wait_until};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(30);

struct Agent {
    child: Child,
    client: AgentClient<Channel>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_agent(env: &ContainerdEnv, agent_id: &str, port: u16, capacity: u32) -> Agent {
    let bin =
        std::env::var("FSB_AGENT_BIN").expect("FSB_AGENT_BIN is set by tests/run.sh containerd");
    let child = Command::new(bin)
        .env("FSB_AGENT_ID", agent_id)
        .env("FSB_LISTEN", format!("127.0.0.1:{port}"))
        .env("FSB_CONTAINERD_SOCKET", &env.socket)
        .env("FSB_CONTAINERD_NAMESPACE", &env.namespace)
        .env(
            "FSB_LOG_DIR",
            env.run_dir.join("agent-bin-logs").join(agent_id),
        )
        .env("FSB_RUNTIME_ROOT", &env.runtime_root)
        .env("FSB_RUNSC", &env.runsc)
        .env("FSB_CAPACITY", capacity.to_string())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = wait_until("the agent to serve gRPC", DEADLINE, || async move {
        match Channel::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect()
            .await
        {
            Ok(ch) => Ok(Some(AgentClient::new(ch))),
            Err(_) => Ok(None),
        }
    })
    .await
    .unwrap();
    Agent { child, client }
}

fn create(id: &str, script: &str, ports: Vec<u32>) -> CreateSandboxRequest {
    CreateSandboxRequest {
        sandbox_id: id.to_owned(),
        namespace: "default".into(),
        name: format!("bin-{}", &id[..8]),
        spec: Some(SandboxSpec {
            pool_ref: "default".into(),
            image: ContainerdEnv::from_env().image,
            command: vec!["sh".into(), "-c".into(), script.into()],
            exposed_ports: ports,
            ..SandboxSpec::default()
        }),
        ..CreateSandboxRequest::default()
    }
}

fn last_line_number(log: &str) -> Option<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("line-")?.parse().ok())
        .next_back()
}

#[tokio::test]
async fn bad_input_is_refused_and_exec_streams() {
    let env = ContainerdEnv::from_env();
    let port = free_port();
    let mut agent = start_agent(&env, "bin-agent-exec", port, 4).await;

    let err = agent
        .client
        .create_sandbox(create("../../etc", "true", vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("sandbox_id"), "{}", err.message());
    let id = fsb_core::SandboxId::generate().to_string();
    let err = agent
        .client
        .create_sandbox(create(&id, "true", vec![u32::from(port)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("spec.exposedPorts[0]"),
        "{}",
        err.message()
    );

    agent
        .client
        .create_sandbox(create(&id, "sleep 600", vec![]))
        .await
        .unwrap();
    let start = ExecRequest {
        msg: Some(exec_request::Msg::Start(ExecStart {
            sandbox_id: id.clone(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo hi; echo oops >&2; exit 4".into(),
            ],
            ..ExecStart::default()
        })),
    };
    let mut out = agent
        .client
        .exec(tokio_stream::iter([start]))
        .await
        .unwrap()
        .into_inner();
    let (mut stdout, mut stderr, mut code) = (Vec::new(), Vec::new(), None);
    while let Some(msg) = out.message().await.unwrap() {
        match msg.msg {
            Some(exec_response::Msg::Stdout(b)) => stdout.extend(b),
            Some(exec_response::Msg::Stderr(b)) => stderr.extend(b),
            Some(exec_response::Msg::ExitCode(c)) => code = Some(c),
            None => {}
        }
    }
    assert_eq!(
        (
            String::from_utf8_lossy(&stdout).trim(),
            String::from_utf8_lossy(&stderr).trim()
        ),
        ("hi", "oops")
    );
    assert_eq!(code, Some(4));

    let gone = agent.client.delete_sandbox(DeleteSandboxRequest {
        sandbox_id: id.clone(),
        grace_period_seconds: Some(0),
    });
    assert!(gone.await.unwrap().into_inner().existed);
    let again = agent.client.delete_sandbox(DeleteSandboxRequest {
        sandbox_id: id,
        grace_period_seconds: Some(0),
    });
    assert!(
        !again.await.unwrap().into_inner().existed,
        "a second delete finds nothing"
    );
    agent.child.kill().await.unwrap();
}

#[tokio::test]
async fn kill_9_loses_nothing() {
    let env = ContainerdEnv::from_env();
    let port = free_port();
    let mut agent = start_agent(&env, "bin-agent-restart", port, 32).await;
    let script = "i=0; while :; do echo line-$i; i=$((i+1)); sleep 0.1; done";
    let ids: Vec<String> = (0..20)
        .map(|_| fsb_core::SandboxId::generate().to_string())
        .collect();
    for id in &ids {
        agent
            .client
            .create_sandbox(create(id, script, vec![]))
            .await
            .unwrap();
    }
    let log: PathBuf = env
        .run_dir
        .join("agent-bin-logs/bin-agent-restart")
        .join(&ids[0])
        .join("stdout.log");
    let before = wait_until("first log lines", DEADLINE, || async {
        Ok(last_line_number(
            &tokio::fs::read_to_string(&log).await.unwrap_or_default(),
        ))
    })
    .await
    .unwrap();

    agent.child.start_kill().unwrap(); // SIGKILL
    agent.child.wait().await.unwrap();
    // While the agent is down the shim keeps writing the log.
    let during = wait_until(
        "log lines written while the agent is down",
        DEADLINE,
        || async {
            let n = last_line_number(&tokio::fs::read_to_string(&log).await.unwrap_or_default());
            Ok(n.filter(|n| *n > before + 5))
        },
    )
    .await
    .unwrap();

    let mut agent = start_agent(&env, "bin-agent-restart", port, 32).await;
    let stats = agent
        .client
        .stats(StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut reported: Vec<String> = stats
        .sandboxes
        .iter()
        .map(|s| s.sandbox_id.clone())
        .collect();
    reported.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(reported, want, "the restarted agent reports the same 20");
    assert!(
        stats.sandboxes.iter().all(|s| s.pids >= 1),
        "still running: {:?}",
        stats.sandboxes.first()
    );

    // `logs -f`: follow from the start until a line printed while the agent was down.
    let mut logs = agent
        .client
        .logs(LogsRequest {
            sandbox_id: ids[0].clone(),
            follow: true,
            tail_lines: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let numbers = tokio::time::timeout(DEADLINE, async {
        loop {
            let chunk = logs
                .message()
                .await
                .unwrap()
                .expect("a followed stream stays open");
            text.push_str(&String::from_utf8(chunk.data).unwrap());
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            let numbers: Vec<u64> = complete
                .lines()
                .filter_map(|l| l.strip_prefix("line-")?.parse().ok())
                .collect();
            if numbers.last().is_some_and(|n| *n >= during) {
                return numbers;
            }
        }
    })
    .await
    .expect("followed logs reach the lines printed while the agent was down");
    drop(logs);
    assert_eq!(numbers.first(), Some(&0));
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "lines in order, none lost"
    );

    for id in &ids {
        let req = DeleteSandboxRequest {
            sandbox_id: id.clone(),
            grace_period_seconds: Some(0),
        };
        assert!(
            agent
                .client
                .delete_sandbox(req)
                .await
                .unwrap()
                .into_inner()
                .existed
        );
    }
    agent.child.kill().await.unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap()
}

/// Issue 3 bound: agent memory per running sandbox <= 100 KB (RSS at 0 and at 200).
#[tokio::test]
async fn memory_per_running_sandbox_stays_under_100_kib() {
    let env = ContainerdEnv::from_env();
    let port = free_port();
    let mut agent = start_agent(&env, "bin-agent-memory", port, 256).await;
    let pid = agent.child.id().unwrap();
    // Warm up lazily initialised paths (image cache, connections) with one sandbox.
    let warm = fsb_core::SandboxId::generate().to_string();
    agent
        .client
        .create_sandbox(create(&warm, "sleep 600", vec![]))
        .await
        .unwrap();
    let req = DeleteSandboxRequest {
        sandbox_id: warm,
        grace_period_seconds: Some(0),
    };
    agent.client.delete_sandbox(req).await.unwrap();
    let idle = rss_kib(pid);

    let ids: Vec<String> = (0..200)
        .map(|_| fsb_core::SandboxId::generate().to_string())
        .collect();
    // Steady state, not a burst: ten creates in flight at a time.
    for batch in ids.chunks(10) {
        let creates = batch.iter().map(|id| {
            let mut client = agent.client.clone();
            let req = create(id, "sleep 600", vec![]);
            async move { client.create_sandbox(req).await }
        });
        for result in futures::future::join_all(creates).await {
            result.unwrap();
        }
    }
    let loaded = rss_kib(pid);
    let per_sandbox = loaded.saturating_sub(idle) as f64 / 200.0;
    println!(
        "agent RSS: {idle} KiB idle, {loaded} KiB with 200 sandboxes, {per_sandbox:.1} KiB each"
    );

    let deletes = ids.iter().map(|id| {
        let mut client = agent.client.clone();
        let req = DeleteSandboxRequest {
            sandbox_id: id.clone(),
            grace_period_seconds: Some(0),
        };
        async move { client.delete_sandbox(req).await }
    });
    for result in futures::future::join_all(deletes).await {
        assert!(result.unwrap().into_inner().existed);
    }
    agent.child.kill().await.unwrap();
    assert!(
        per_sandbox <= 100.0,
        "{per_sandbox:.1} KiB per running sandbox"
    );
}
