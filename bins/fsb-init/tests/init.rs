//! The fsb-init binary as a process (the agent runs it as a container's PID 1; here it
//! is a child subreaper of the test): spec in on stdin, report and the process's
//! output out on stdout, its exit status as ours, signals forwarded.
#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::MetadataExt,
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use fsb_init::{InitSpec, Started};

fn init() -> Child {
    Command::new(env!("CARGO_BIN_EXE_fsb-init"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn sh(script: &str) -> InitSpec {
    InitSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..InitSpec::default()
    }
}

fn send(child: &mut Child, spec: &InitSpec) {
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(spec.to_line().as_bytes()).unwrap();
    stdin.flush().unwrap();
}

fn lines(child: &mut Child) -> impl Iterator<Item = String> + use<> {
    let out: ChildStdout = child.stdout.take().unwrap();
    BufReader::new(out).lines().map(Result::unwrap)
}

/// Wait until the process has a handler for SIGTERM (its SigCgt mask), so a signal
/// sent now is not taken by the default action.
fn wait_for_term_handler(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0);
        if caught & (1 << (15 - 1)) != 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no TERM handler installed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The one child `pid` has forked (waiting for it to appear).
fn runner_of(pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let pids: Vec<u32> = children
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        match pids[..] {
            [runner] => return runner,
            [] => assert!(Instant::now() < deadline, "no runner forked"),
            _ => panic!("more than one child: {pids:?}"),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn term(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn runs_the_spec_with_its_env_and_a_created_cwd_then_exits_with_its_status() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("new/dir");
    let mut spec = sh(r#"echo "A=$A"; echo "HOME=${HOME:-unset}"; pwd; echo "$$"; exit 3"#);
    spec.env.push(("A".into(), "hello world".into()));
    spec.cwd = Some(cwd.display().to_string());
    let mut child = init();
    let runner = runner_of(child.id());
    send(&mut child, &spec);
    let out: Vec<String> = lines(&mut child).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3), "{out:?}");
    let report = Started::parse(&out[0]).unwrap_or_else(|| panic!("first line {out:?}"));
    // The process is the runner forked before the spec came: a claim costs no fork.
    assert_eq!(report.pid, runner);
    assert!(
        report.spec_us > 0 && report.spec_us <= report.unix_us,
        "{report:?}"
    );
    // Written by the process itself before its exec: its own pid, before its output.
    assert_eq!(out[4], report.pid.to_string());
    assert_eq!(
        &out[1..4],
        [
            "A=hello world".to_owned(),
            "HOME=unset".to_owned(),
            cwd.display().to_string()
        ],
        "only the spec's environment"
    );
}

#[test]
fn a_user_runs_as_that_user_in_a_cwd_it_owns() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path().join("home/nobody");
    let mut spec = sh("id -u; id -g; touch mine");
    spec.uid = Some(65534);
    spec.cwd = Some(cwd.display().to_string());
    let mut child = init();
    send(&mut child, &spec);
    let out: Vec<String> = lines(&mut child).skip(1).collect();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{out:?}");
    assert_eq!(out, ["65534", "65534"]);
    assert_eq!(std::fs::metadata(&cwd).unwrap().uid(), 65534);
    assert_eq!(std::fs::metadata(cwd.join("mine")).unwrap().uid(), 65534);
}

#[test]
fn term_is_forwarded_to_the_process() {
    let mut child = init();
    wait_for_term_handler(child.id());
    send(
        &mut child,
        &sh(r#"trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done"#),
    );
    let mut out = lines(&mut child);
    assert!(Started::parse(&out.next().unwrap()).is_some());
    assert_eq!(out.next().unwrap(), "ready");
    term(child.id());
    assert_eq!(out.next().unwrap(), "got-term");
    assert_eq!(child.wait().unwrap().code(), Some(7));
}

#[test]
fn term_before_any_spec_stops_at_once() {
    let mut child = init();
    // Held open: `wait` would close it, and an end of input is another way to stop.
    let _stdin = child.stdin.take();
    wait_for_term_handler(child.id());
    term(child.id());
    assert_eq!(child.wait().unwrap().code(), Some(143));
}

#[test]
fn an_unstartable_or_invalid_spec_exits_127_saying_why() {
    for (spec, want) in [
        (
            InitSpec {
                argv: vec!["/no/such/program".into()],
                ..InitSpec::default()
            }
            .to_line(),
            "starting /no/such/program",
        ),
        ("{\"argv\":[]}\n".to_owned(), "invalid spec: argv: empty"),
        (String::new(), "stdin closed before a spec"),
    ] {
        let mut child = init();
        {
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(spec.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(127), "{spec}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{spec}: {err}");
    }
}
