//! fsb-agent's logs and exec against the real containerd of `tests/run.sh containerd`,
//! for runc, crun and gVisor: following the shim-written log files until the exit,
//! tailing them, and exec through containerd's task Exec (separate streams, exit
//! codes, stdin to end-of-file, a terminal, a missing sandbox).

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::time::Duration;

use fsb_agent::{
    AgentError,
    exec::{ExecRequest, ExecSession, exec},
    logs::{LogOptions, LogStream, stream_logs},
};
use fsb_core::{ErrorCode, HasErrorCode, SandboxId, spec::Runtime};
use fsb_tests::ContainerdEnv;
use futures::StreamExt;
use tokio::{io::AsyncWriteExt, sync::watch};

const DEADLINE: Duration = Duration::from_secs(30);
const RUNTIMES: [Runtime; 3] = [Runtime::Runc, Runtime::Crun, Runtime::Gvisor];

/// stdout, stderr and the last item of an exec's output.
async fn finish(session: ExecSession) -> (String, String, Result<i32, AgentError>) {
    let r = fsb_tests::exec_output(session, DEADLINE).await.unwrap();
    (r.stdout, r.stderr, r.exit)
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn logs_follow_until_exit_and_tail_on_every_runtime() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    for runtime in RUNTIMES {
        let mut exits = Box::pin(rt.exits().await.unwrap());
        let plan = fsb_tests::shell_plan(
            &env,
            &rt,
            runtime,
            "echo Log-Line-1; echo Err-Line >&2; sleep 0.3; echo Log-Line-2",
        )
        .await
        .unwrap();
        let id = plan.id.clone();
        rt.create(&plan)
            .await
            .unwrap_or_else(|e| panic!("{runtime:?}: {e}"));

        // The exit event, from containerd, ends the follower.
        let (exited_tx, exited_rx) = watch::channel(false);
        let watched = id.clone();
        let watcher = tokio::spawn(async move {
            while let Some(exit) = exits.next().await {
                if exit.id == watched {
                    let _ = exited_tx.send(true);
                    return;
                }
            }
        });
        let follow = stream_logs(
            rt.log_paths(&id),
            LogOptions {
                follow: true,
                tail_lines: 0,
                until_exited: Some(exited_rx),
            },
        );
        let chunks: Vec<_> = tokio::time::timeout(DEADLINE, follow.collect::<Vec<_>>())
            .await
            .unwrap_or_else(|_| panic!("{runtime:?}: the follower ends after the exit"));
        watcher.await.unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for c in chunks {
            let c = c.unwrap();
            match c.stream {
                LogStream::Stdout => out.extend_from_slice(&c.data),
                LogStream::Stderr => err.extend_from_slice(&c.data),
            }
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Log-Line-1\nLog-Line-2\n",
            "{runtime:?}"
        );
        assert_eq!(String::from_utf8(err).unwrap(), "Err-Line\n", "{runtime:?}");

        // The last line only.
        let tail: Vec<_> = stream_logs(
            rt.log_paths(&id),
            LogOptions {
                follow: false,
                tail_lines: 1,
                until_exited: None,
            },
        )
        .collect()
        .await;
        let tail_out: Vec<u8> = tail
            .into_iter()
            .map(Result::unwrap)
            .filter(|c| c.stream == LogStream::Stdout)
            .flat_map(|c| c.data.to_vec())
            .collect();
        assert_eq!(tail_out, b"Log-Line-2\n", "{runtime:?}");
        assert!(rt.remove(&id, Duration::ZERO).await.unwrap());
    }
}

#[tokio::test]
async fn exec_on_every_runtime() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    for runtime in RUNTIMES {
        let plan = fsb_tests::shell_plan(&env, &rt, runtime, "while :; do sleep 1; done")
            .await
            .unwrap();
        let id = plan.id.clone();
        rt.create(&plan)
            .await
            .unwrap_or_else(|e| panic!("{runtime:?}: {e}"));

        // Separate streams and the exit code, last.
        let session = exec(
            &rt,
            &id,
            ExecRequest {
                args: args(&["sh", "-c", "echo out; echo err >&2; exit 5"]),
                ..ExecRequest::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{runtime:?}: {e}"));
        let exec_dir = rt.log_paths(&id).dir.join("exec").join(&session.exec_id);
        assert!(exec_dir.exists());
        let (out, err, exit) = finish(session).await;
        assert_eq!(out, "out\n", "{runtime:?}");
        assert_eq!(err, "err\n", "{runtime:?}");
        assert_eq!(exit.unwrap(), 5, "{runtime:?}");
        assert!(!exec_dir.exists(), "{runtime:?}: FIFOs are removed");

        // Env, cwd, and stdin until end-of-file.
        let mut session = exec(
            &rt,
            &id,
            ExecRequest {
                args: args(&["sh", "-c", "echo \"$GREETING in $(pwd)\"; cat"]),
                env: vec!["GREETING=hello".to_owned()],
                cwd: Some("/tmp".to_owned()),
                stdin: true,
                ..ExecRequest::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{runtime:?}: {e}"));
        let mut stdin = session.stdin.take().expect("stdin was asked for");
        stdin.write_all(b"line one\nline two\n").await.unwrap();
        stdin.close().await.unwrap();
        let (out, err, exit) = finish(session).await;
        assert_eq!(
            out, "hello in /tmp\nline one\nline two\n",
            "{runtime:?} (stderr: {err})"
        );
        assert_eq!(exit.unwrap(), 0, "{runtime:?}: cat ends at end-of-file");

        // A missing binary is the exec's error, not a hang.
        let missing = exec(
            &rt,
            &id,
            ExecRequest {
                args: args(&["/no/such/binary"]),
                ..ExecRequest::default()
            },
        )
        .await;
        match missing {
            Err(e) => assert!(e.to_string().contains("exec"), "{runtime:?}: {e}"),
            // Some runtimes start the process and report the failure as its exit code.
            Ok(session) => assert_ne!(finish(session).await.2.unwrap(), 0, "{runtime:?}"),
        }

        // The sandbox keeps running after all of it.
        assert_eq!(
            rt.task_state(&id).await.unwrap(),
            fsb_agent::runtime::TaskState::Running,
            "{runtime:?}"
        );
        assert!(rt.remove(&id, Duration::ZERO).await.unwrap());
    }
}

#[tokio::test]
async fn exec_with_a_terminal() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    let plan = fsb_tests::shell_plan(&env, &rt, Runtime::Runc, "while :; do sleep 1; done")
        .await
        .unwrap();
    let id = plan.id.clone();
    rt.create(&plan).await.unwrap();
    let mut session = exec(
        &rt,
        &id,
        ExecRequest {
            args: args(&["sh", "-c", "read line; stty size; echo \"got $line\""]),
            tty: true,
            stdin: true,
            ..ExecRequest::default()
        },
    )
    .await
    .unwrap();
    session
        .resize
        .as_ref()
        .expect("a terminal can be resized")
        .resize(100, 40)
        .await
        .unwrap();
    let mut stdin = session.stdin.take().unwrap();
    stdin.write_all(b"typed\n").await.unwrap();
    let (out, err, exit) = finish(session).await;
    drop(stdin);
    assert!(out.contains("40 100"), "{out:?}");
    assert!(out.contains("got typed"), "{out:?}");
    assert_eq!(err, "", "a terminal merges the streams");
    assert_eq!(exit.unwrap(), 0);
    assert!(rt.remove(&id, Duration::ZERO).await.unwrap());
}

#[tokio::test]
async fn dropping_the_output_kills_the_exec() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    let plan = fsb_tests::shell_plan(&env, &rt, Runtime::Runc, "while :; do sleep 1; done")
        .await
        .unwrap();
    let id = plan.id.clone();
    rt.create(&plan).await.unwrap();
    let session = exec(
        &rt,
        &id,
        ExecRequest {
            args: args(&["sleep", "1000"]),
            ..ExecRequest::default()
        },
    )
    .await
    .unwrap();
    let exec_dir = rt.log_paths(&id).dir.join("exec").join(&session.exec_id);
    drop(session);
    fsb_tests::wait_until("the exec is cleaned up", DEADLINE, || async {
        Ok((!exec_dir.exists()).then_some(()))
    })
    .await
    .unwrap();
    // The sandbox's own process is untouched.
    assert_eq!(
        rt.task_state(&id).await.unwrap(),
        fsb_agent::runtime::TaskState::Running
    );
    assert!(rt.remove(&id, Duration::ZERO).await.unwrap());
}

#[tokio::test]
async fn exec_into_a_missing_sandbox_is_not_found() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    let err = exec(
        &rt,
        &SandboxId::generate(),
        ExecRequest {
            args: args(&["true"]),
            ..ExecRequest::default()
        },
    )
    .await
    .expect_err("no such sandbox");
    assert!(err.is_not_found(), "{err}");
    assert_eq!(err.error_code(), ErrorCode::NotFound);
    let empty = exec(&rt, &SandboxId::generate(), ExecRequest::default()).await;
    assert!(matches!(empty, Err(AgentError::InvalidArgument(_))));
}
