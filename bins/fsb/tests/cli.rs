//! Component tests of the `fsb` client against a FAKE `FastPath` server.
//!
//! The server here is a small in-memory implementation of `fastpath.v1.FastPath`
//! written for these tests only (it is not the gateway): it checks the bearer token,
//! keeps sandboxes in a map, and "runs" a process only in the sense that a command
//! `exit N` makes the sandbox Succeeded/Failed with exit code N and some canned log
//! output. It shows that the real `fsb` binary finds the endpoint and token in a data
//! directory, sends the token, renders what comes back and maps errors to the
//! documented exit codes. It says nothing about the real gateway; the end-to-end
//! tests against `fsb up` with containerd do that.

#![allow(clippy::unwrap_used)] // the fake server and helpers below are test code too

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    process::{Command, Output},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use fsb_proto::fastpath::v1::{
    self as fp, exec_request, exec_response,
    fast_path_server::{FastPath, FastPathServer},
    images_server::{Images, ImagesServer},
    pull_image_progress,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "s3cret-token";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What the fake remembers.
#[derive(Default)]
struct State {
    sandboxes: HashMap<(String, String), fp::Sandbox>,
    logs: HashMap<(String, String), Vec<fp::LogChunk>>,
    next: u32,
    /// Every CreateRequest received, for assertions.
    creates: Vec<fp::CreateRequest>,
    /// Watch calls received.
    watches: usize,
    /// Warm levels List returns.
    warm: Vec<fp::WarmLevel>,
    /// Usage requests received.
    usages: Vec<fp::UsageRequest>,
}

#[derive(Clone, Default)]
struct FakeFastPath {
    state: Arc<Mutex<State>>,
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_owned(), name.to_owned())
}

fn chunk(stream: fp::LogStream, data: &str) -> fp::LogChunk {
    fp::LogChunk {
        stream: stream as i32,
        data: data.as_bytes().to_vec(),
        time: None,
    }
}

#[tonic::async_trait]
impl FastPath for FakeFastPath {
    async fn create(
        &self,
        req: Request<fp::CreateRequest>,
    ) -> Result<Response<fp::CreateResponse>, Status> {
        let req = req.into_inner();
        let mut st = self.state.lock().unwrap();
        st.creates.push(req.clone());
        let spec = req
            .spec
            .clone()
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        if spec.image.is_empty() {
            return Err(Status::invalid_argument("spec.image: required"));
        }
        st.next += 1;
        let name = if req.name.is_empty() {
            format!("sbx-{}", st.next)
        } else {
            req.name.clone()
        };
        let k = key(&req.namespace, &name);
        if st.sandboxes.contains_key(&k) {
            return Err(Status::already_exists(format!(
                "sandbox {}/{name} already exists",
                req.namespace
            )));
        }
        let timeline = fp::Timeline {
            stages: vec![
                fp::Stage {
                    name: "allocate".into(),
                    start_us: 10,
                    duration_us: 40,
                },
                fp::Stage {
                    name: "runtime".into(),
                    start_us: 50,
                    duration_us: 4200,
                },
            ],
            total_us: 4250,
            path: "cold".into(),
            note: String::new(),
            started_unix_us: 0,
        };
        // `exit N`: the process has already run and exited with N.
        let mut status = fp::SandboxStatus {
            phase: fp::Phase::Running as i32,
            assigned_agent: "fake-agent".into(),
            sandbox_id: format!("id-{}", st.next),
            recorded: true,
            timeline: Some(timeline.clone()),
            ..Default::default()
        };
        let argv: Vec<&str> = spec
            .command
            .iter()
            .chain(&spec.args)
            .map(String::as_str)
            .collect();
        let mut logs = Vec::new();
        if let ["exit", code] = argv.as_slice() {
            let code: i32 = code
                .parse()
                .map_err(|_| Status::invalid_argument("exit N"))?;
            status.phase = if code == 0 {
                fp::Phase::Succeeded
            } else {
                fp::Phase::Failed
            } as i32;
            status.exit_code = Some(code);
            logs.push(chunk(fp::LogStream::Stdout, "hello from the sandbox\n"));
            logs.push(chunk(fp::LogStream::Stderr, "a warning\n"));
        }
        let sb = fp::Sandbox {
            namespace: req.namespace.clone(),
            name: name.clone(),
            uid: format!("uid-{}", st.next),
            labels: req.labels.clone(),
            spec: Some(spec),
            status: Some(status),
            create_time: Some(SystemTime::now().into()),
        };
        st.sandboxes.insert(k.clone(), sb.clone());
        st.logs.insert(k, logs);
        Ok(Response::new(fp::CreateResponse {
            sandbox: Some(sb),
            timeline: Some(timeline),
            replayed: false,
            mode: fp::ConsistencyMode::Fast as i32,
        }))
    }

    async fn delete(
        &self,
        req: Request<fp::DeleteRequest>,
    ) -> Result<Response<fp::DeleteResponse>, Status> {
        let req = req.into_inner();
        let mut st = self.state.lock().unwrap();
        match st.sandboxes.remove(&key(&req.namespace, &req.name)) {
            Some(_) => Ok(Response::new(fp::DeleteResponse {})),
            None => Err(Status::not_found(format!(
                "sandbox {}/{} not found",
                req.namespace, req.name
            ))),
        }
    }

    async fn get(&self, req: Request<fp::GetRequest>) -> Result<Response<fp::Sandbox>, Status> {
        let req = req.into_inner();
        let st = self.state.lock().unwrap();
        st.sandboxes
            .get(&key(&req.namespace, &req.name))
            .cloned()
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(format!("sandbox {}/{} not found", req.namespace, req.name))
            })
    }

    async fn list(
        &self,
        req: Request<fp::ListRequest>,
    ) -> Result<Response<fp::ListResponse>, Status> {
        let req = req.into_inner();
        let st = self.state.lock().unwrap();
        let sandboxes = st
            .sandboxes
            .values()
            .filter(|s| req.namespace.is_empty() || s.namespace == req.namespace)
            .filter(|s| {
                req.pool_ref.is_empty()
                    || s.spec
                        .as_ref()
                        .is_some_and(|sp| sp.pool_ref == req.pool_ref)
            })
            .filter(|s| {
                req.label_selector
                    .iter()
                    .all(|(k, v)| s.labels.get(k) == Some(v))
            })
            .cloned()
            .collect();
        let warm = st.warm.clone();
        Ok(Response::new(fp::ListResponse { sandboxes, warm }))
    }

    async fn update(
        &self,
        req: Request<fp::UpdateRequest>,
    ) -> Result<Response<fp::Sandbox>, Status> {
        let req = req.into_inner();
        let mut st = self.state.lock().unwrap();
        let sb = st
            .sandboxes
            .get_mut(&key(&req.namespace, &req.name))
            .ok_or_else(|| Status::not_found("sandbox not found"))?;
        if let (Some(rev), Some(spec)) = (req.reset_revision, sb.spec.as_mut()) {
            spec.reset_revision = rev;
        }
        if let Some(patch) = req.labels {
            sb.labels.extend(patch.set);
            for k in patch.remove {
                sb.labels.remove(&k);
            }
        }
        Ok(Response::new(sb.clone()))
    }

    type WatchStream = BoxStream<fp::WatchEvent>;

    async fn watch(
        &self,
        req: Request<fp::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        let mut st = self.state.lock().unwrap();
        st.watches += 1;
        let initial: Vec<Result<fp::WatchEvent, Status>> = st
            .sandboxes
            .values()
            .filter(|s| s.namespace == req.namespace && (req.name.is_empty() || s.name == req.name))
            .map(|s| {
                Ok(fp::WatchEvent {
                    r#type: fp::watch_event::Type::Added as i32,
                    sandbox: Some(s.clone()),
                })
            })
            .collect();
        // Initial state, then nothing more (the stream stays open like a real watch).
        let stream = tokio_stream::iter(initial).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }

    type ExecStream = BoxStream<fp::ExecResponse>;

    /// Echoes stdin to stdout after the argv; `exit N` as the command sets the code.
    async fn exec(
        &self,
        req: Request<Streaming<fp::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut input = req.into_inner();
        let Some(Ok(fp::ExecRequest {
            msg: Some(exec_request::Msg::Start(start)),
        })) = input.next().await
        else {
            return Err(Status::invalid_argument("the first message must be start"));
        };
        if !self
            .state
            .lock()
            .unwrap()
            .sandboxes
            .contains_key(&key(&start.namespace, &start.name))
        {
            return Err(Status::not_found("sandbox not found"));
        }
        let mut echoed = Vec::new();
        // `nowait`: answers without reading stdin, like a process that exits early.
        if start.stdin && start.command.first().map(String::as_str) != Some("nowait") {
            while let Some(Ok(msg)) = input.next().await {
                match msg.msg {
                    Some(exec_request::Msg::Stdin(b)) => echoed.extend_from_slice(&b),
                    Some(exec_request::Msg::CloseStdin(_)) => break,
                    _ => {}
                }
            }
        }
        let code = match start.command.as_slice() {
            [e, n] if e == "exit" => n.parse().unwrap_or(1),
            _ => 0,
        };
        let out = vec![
            Ok(fp::ExecResponse {
                msg: Some(exec_response::Msg::Stdout(
                    format!("ran: {}\n", start.command.join(" ")).into_bytes(),
                )),
            }),
            Ok(fp::ExecResponse {
                msg: Some(exec_response::Msg::Stdout(echoed)),
            }),
            Ok(fp::ExecResponse {
                msg: Some(exec_response::Msg::ExitCode(code)),
            }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    type LogsStream = BoxStream<fp::LogChunk>;

    async fn logs(
        &self,
        req: Request<fp::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = req.into_inner();
        let st = self.state.lock().unwrap();
        let chunks = st
            .logs
            .get(&key(&req.namespace, &req.name))
            .cloned()
            .ok_or_else(|| Status::not_found("sandbox not found"))?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn usage(
        &self,
        req: Request<fp::UsageRequest>,
    ) -> Result<Response<fp::UsageResponse>, Status> {
        let req = req.into_inner();
        if req.pool_ref.contains('/') {
            return Err(Status::invalid_argument("pool_ref: not a pool name"));
        }
        self.state.lock().unwrap().usages.push(req);
        Ok(Response::new(fp::UsageResponse {
            agents: vec![fp::AgentUsage {
                agent_id: "agent-1".into(),
                namespace: "default".into(),
                pool_ref: "default".into(),
                node_name: "node-a".into(),
                healthy: true,
                slots_used: 3,
                slots_capacity: 8,
                warm_ready: 2,
                ports_used: 1,
            }],
            pools: vec![fp::PoolUsage {
                namespace: "default".into(),
                pool_ref: "default".into(),
                agents: 1,
                healthy_agents: 1,
                slots_used: 3,
                slots_capacity: 8,
                slots_free: 5,
                warm_ready: 2,
            }],
            warm: Vec::new(),
        }))
    }
}

/// One Load as the fake saw it: name, pool, chunk sizes.
type LoadSeen = (String, String, Vec<usize>);

/// Images: Load counts bytes and chunks, Pull streams two progress messages.
#[derive(Clone, Default)]
struct FakeImages {
    /// (name, pool, chunk sizes) of every Load.
    loads: Arc<Mutex<Vec<LoadSeen>>>,
}

#[tonic::async_trait]
impl Images for FakeImages {
    type PullStream = BoxStream<fp::PullImageProgress>;

    async fn pull(
        &self,
        req: Request<fp::PullImageRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let req = req.into_inner();
        if req.username == "bad" {
            return Err(Status::permission_denied(
                "registry refused the credentials",
            ));
        }
        let blob = |done| fp::PullImageProgress {
            msg: Some(pull_image_progress::Msg::Blob(fp::BlobProgress {
                digest: "sha256:abcdef0123456789".into(),
                kind: "layer".into(),
                done,
                total: 2048,
                cached: false,
            })),
        };
        let done = fp::PullImageProgress {
            msg: Some(pull_image_progress::Msg::Done(fp::ImageInfo {
                name: format!("{}@{}", req.image, req.password),
                digest: "sha256:feed".into(),
                size_bytes: 2048,
                in_use: false,
            })),
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(
            [blob(1024), blob(2048), done].into_iter().map(Ok),
        ))))
    }

    async fn load(
        &self,
        req: Request<Streaming<fp::LoadImageChunk>>,
    ) -> Result<Response<fp::ImageInfo>, Status> {
        let mut stream = req.into_inner();
        let (mut name, mut pool, mut sizes) = (String::new(), String::new(), Vec::new());
        while let Some(c) = stream.next().await {
            let c = c?;
            if sizes.is_empty() {
                (name, pool) = (c.name.clone(), c.pool_ref.clone());
            }
            sizes.push(c.data.len());
        }
        let total: usize = sizes.iter().sum();
        self.loads.lock().unwrap().push((name.clone(), pool, sizes));
        Ok(Response::new(fp::ImageInfo {
            name,
            digest: "sha256:loaded".into(),
            size_bytes: total as u64,
            in_use: false,
        }))
    }

    async fn list(
        &self,
        _req: Request<fp::ListImagesRequest>,
    ) -> Result<Response<fp::ListImagesResponse>, Status> {
        Ok(Response::new(fp::ListImagesResponse {
            images: vec![fp::ImageInfo {
                name: "fsb.local/busybox:latest".into(),
                digest: "sha256:b0x".into(),
                size_bytes: 1_200_000,
                in_use: true,
            }],
        }))
    }
}

/// Only requests carrying our token get through.
#[allow(clippy::result_large_err)] // tonic's interceptor signature
fn check_token(req: Request<()>) -> Result<Request<()>, Status> {
    let expected = format!("Bearer {TOKEN}");
    match req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        Some(v) if v == expected => Ok(req),
        _ => Err(Status::unauthenticated("missing or wrong bearer token")),
    }
}

/// A running fake server and a data directory pointing at it.
struct Fixture {
    _tmp: tempfile::TempDir,
    data_dir: PathBuf,
    endpoint: String,
    state: Arc<Mutex<State>>,
    images: FakeImages,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Fixture {
    fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let fake = FakeFastPath::default();
        let state = fake.state.clone();
        let images = FakeImages::default();
        let served_images = images.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(FastPathServer::with_interceptor(fake, check_token))
                    .add_service(ImagesServer::with_interceptor(served_images, check_token))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async {
                            let _ = rx.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        // What `fsb up` writes: the endpoint and a 0600 token.
        std::fs::write(data_dir.join("endpoint"), format!("{endpoint}\n")).unwrap();
        std::fs::write(data_dir.join("token"), TOKEN).unwrap();
        std::fs::set_permissions(
            data_dir.join("token"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        Self {
            _tmp: tmp,
            data_dir,
            endpoint,
            state,
            images,
            _shutdown: tx,
        }
    }

    /// `fsb ARGS` against this data directory, with no FSB_* from the outside.
    fn fsb(&self, args: &[&str]) -> Output {
        fsb_in(&self.data_dir, args, &[])
    }

    fn fsb_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        fsb_in(&self.data_dir, args, env)
    }
}

fn fsb_in(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fsb"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FSB_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("FSB_DATA_DIR", data_dir).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

#[test]
fn run_ls_get_rm_round_trip() {
    let f = Fixture::start();
    let out = f.fsb(&[
        "run", "--name", "web", "--label", "app=web", "-e", "A=1", "--port", "8080", "--", "sleep",
        "60",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "web\n");
    {
        let st = f.state.lock().unwrap();
        let req = st.creates.last().unwrap();
        let spec = req.spec.as_ref().unwrap();
        assert_eq!(spec.image, "fsb.local/busybox:latest");
        assert_eq!(spec.pool_ref, "default");
        assert_eq!(spec.command, ["sleep"]);
        assert_eq!(spec.args, ["60"]);
        assert_eq!(spec.exposed_ports, [8080]);
        assert_eq!(req.namespace, "default");
        assert!(uuid::Uuid::parse_str(&req.request_id).is_ok());
    }

    let out = f.fsb(&["ls"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("NAMESPACE"), "{text}");
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        row[..5],
        [
            "default",
            "web",
            "Running",
            "fsb.local/busybox:latest",
            "fake-agent"
        ]
    );

    let out = f.fsb(&["ls", "-l", "app=other"]);
    assert_eq!(
        stdout(&out).lines().count(),
        1,
        "only the header: {}",
        stdout(&out)
    );

    // Ready warm instances follow the sandboxes, as a table of their own.
    f.state.lock().unwrap().warm = vec![fp::WarmLevel {
        namespace: "default".into(),
        pool_ref: "default".into(),
        image: "fsb.local/busybox:latest".into(),
        runtime: fp::Runtime::Runc as i32,
        ready: 4,
    }];
    let out = f.fsb(&["ls"]);
    let text = stdout(&out);
    let last: Vec<&str> = text.lines().last().unwrap().split_whitespace().collect();
    assert_eq!(
        last,
        [
            "default",
            "default",
            "fsb.local/busybox:latest",
            "runc",
            "4"
        ],
        "{text}"
    );
    let out = f.fsb(&["ls", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["warm"][0]["ready"], 4, "{}", stdout(&out));

    let out = f.fsb(&["get", "web", "-o", "json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["apiVersion"], "sandbox.fast.io/v1alpha1");
    assert_eq!(v["metadata"]["name"], "web");
    assert_eq!(v["metadata"]["labels"]["app"], "web");
    assert_eq!(v["spec"]["envs"][0]["name"], "A");
    assert_eq!(v["status"]["phase"], "Running");
    assert_eq!(v["status"]["timeline"]["stages"][1]["name"], "runtime");
    assert_eq!(v["status"]["timeline"]["stages"][1]["durationUs"], 4200);

    let out = f.fsb(&["get", "web", "-o", "yaml"]);
    assert!(stdout(&out).contains("phase: Running"), "{}", stdout(&out));

    let out = f.fsb(&["rm", "web"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "web\n");
    assert!(f.state.lock().unwrap().sandboxes.is_empty());
}

#[test]
fn run_rm_streams_logs_and_exits_with_the_process_code() {
    let f = Fixture::start();
    let out = f.fsb(&["run", "--rm", "--", "exit", "0"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello from the sandbox\n");
    assert!(stderr(&out).contains("a warning"), "{}", stderr(&out));
    assert!(
        f.state.lock().unwrap().sandboxes.is_empty(),
        "--rm deletes it"
    );

    let out = f.fsb(&["run", "--rm", "--", "exit", "42"]);
    assert_eq!(code(&out), 42, "{}", stderr(&out));
    assert!(f.state.lock().unwrap().sandboxes.is_empty());
}

#[test]
fn run_timings_print_the_stages() {
    let f = Fixture::start();
    let out = f.fsb(&["run", "--timings", "--", "sleep", "1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("runtime") && err.contains("4.200"), "{err}");
    assert!(err.contains("total 4.250 ms (cold path)"), "{err}");
}

#[test]
fn run_from_manifest_with_flag_override() {
    let f = Fixture::start();
    let manifest = f.data_dir.join("sbx.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: sandbox.fast.io/v1alpha1\nkind: Sandbox\nmetadata: {name: m1, namespace: team}\n\
         spec: {image: alpine, poolRef: p1, command: [sleep, '5']}\n",
    )
    .unwrap();
    let m = manifest.to_str().unwrap();
    let out = f.fsb(&["run", "-f", m, "--pool", "p2"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "m1\n");
    let st = f.state.lock().unwrap();
    let req = st.creates.last().unwrap();
    assert_eq!(req.namespace, "team");
    let spec = req.spec.as_ref().unwrap();
    assert_eq!(
        (spec.image.as_str(), spec.pool_ref.as_str()),
        ("alpine", "p2")
    );
    drop(st);
    // FSB_IMAGE does not beat the manifest; a flag does.
    let out = f.fsb_env(
        &["run", "-f", m, "--name", "m2"],
        &[("FSB_IMAGE", "envimg")],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let st = f.state.lock().unwrap();
    assert_eq!(
        st.creates.last().unwrap().spec.as_ref().unwrap().image,
        "alpine"
    );
}

#[test]
fn logs_split_stdout_and_stderr() {
    let f = Fixture::start();
    let out = f.fsb(&["run", "--name", "job", "--", "exit", "0"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = f.fsb(&["logs", "job"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello from the sandbox\n");
    assert_eq!(stderr(&out), "a warning\n");
}

#[test]
fn exec_forwards_stdin_and_exits_with_the_remote_code() {
    let f = Fixture::start();
    assert_eq!(
        code(&f.fsb(&["run", "--name", "box", "--", "sleep", "60"])),
        0
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_fsb"))
        .env("FSB_DATA_DIR", &f.data_dir)
        .args(["exec", "-i", "box", "--", "exit", "5"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"typed input\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert_eq!(stdout(&out), "ran: exit 5\ntyped input\n");
}

#[test]
fn reset_bumps_the_revision_and_update_patches_labels() {
    let f = Fixture::start();
    assert_eq!(
        code(&f.fsb(&["run", "--name", "r", "--label", "a=1", "--", "sleep", "9"])),
        0
    );
    let out = f.fsb(&["reset", "r"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "r reset (revision 1)\n");
    let out = f.fsb(&["reset", "r"]);
    assert_eq!(stdout(&out), "r reset (revision 2)\n");
    let out = f.fsb(&[
        "update",
        "r",
        "--label",
        "b=2",
        "--remove-label",
        "a",
        "-o",
        "json",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["metadata"]["labels"], serde_json::json!({"b": "2"}));
    assert_eq!(v["spec"]["resetRevision"], 2);
}

#[test]
fn exit_codes_for_not_found_exists_and_unauthenticated() {
    let f = Fixture::start();
    let out = f.fsb(&["get", "missing"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.starts_with("fsb: get default/missing: "), "{err}");
    assert!(err.contains("fsb ls -A"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    assert_eq!(code(&f.fsb(&["rm", "missing"])), 3);

    assert_eq!(code(&f.fsb(&["run", "--name", "dup", "--", "true"])), 0);
    let out = f.fsb(&["run", "--name", "dup", "--", "true"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));

    let out = f.fsb_env(&["ls"], &[("FSB_TOKEN", "wrong")]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(stderr(&out).contains("FSB_TOKEN"), "{}", stderr(&out));

    // No token file and no FSB_TOKEN: no header, refused.
    std::fs::remove_file(f.data_dir.join("token")).unwrap();
    assert_eq!(code(&f.fsb(&["ls"])), 7);
}

#[test]
fn a_token_file_readable_by_others_is_refused() {
    let f = Fixture::start();
    std::fs::set_permissions(
        f.data_dir.join("token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = f.fsb(&["ls"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
}

#[test]
fn no_endpoint_file_means_fsb_up_is_not_running() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fsb_in(tmp.path(), &["ls"], &[]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "fsb: fsb up is not running (no {}/endpoint); start it with `fsb up`\n",
            tmp.path().display()
        )
    );
    // An endpoint nobody listens on is unavailable too.
    let out = fsb_in(tmp.path(), &["ls", "--endpoint", "http://127.0.0.1:1"], &[]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
}

#[test]
fn precedence_flag_env_config() {
    let f = Fixture::start();
    let config = f.data_dir.join("config.yaml");
    // The config file points elsewhere; the env and the flag are checked against it.
    std::fs::write(&config, "endpoint: http://127.0.0.1:1\nnamespace: cfgns\n").unwrap();
    let out = f.fsb(&["ls"]);
    assert_eq!(code(&out), 5, "config endpoint used: {}", stderr(&out));
    let out = f.fsb_env(&["ls"], &[("FSB_ENDPOINT", &f.endpoint)]);
    assert_eq!(code(&out), 0, "env beats config: {}", stderr(&out));
    let out = f.fsb_env(
        &["ls", "--endpoint", "http://127.0.0.1:1"],
        &[("FSB_ENDPOINT", &f.endpoint)],
    );
    assert_eq!(code(&out), 5, "flag beats env: {}", stderr(&out));
    // namespace from the config file, then env, then flag.
    let run = |env: &[(&str, &str)], extra: &[&str]| {
        let mut args = vec!["run", "--endpoint", &f.endpoint];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sleep", "1"]);
        let out = f.fsb_env(&args, env);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        f.state
            .lock()
            .unwrap()
            .creates
            .last()
            .unwrap()
            .namespace
            .clone()
    };
    assert_eq!(run(&[], &[]), "cfgns");
    assert_eq!(run(&[("FSB_NAMESPACE", "envns")], &[]), "envns");
    assert_eq!(
        run(&[("FSB_NAMESPACE", "envns")], &["-n", "flagns"]),
        "flagns"
    );
    // A broken config file is bad config.
    std::fs::write(&config, "endpoint: [oops\n").unwrap();
    assert_eq!(code(&f.fsb(&["ls"])), 64);
}

#[test]
fn non_loopback_listen_exits_64() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fsb_in(tmp.path(), &["up", "--listen", "0.0.0.0:7370"], &[]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(stderr(&out).contains("loopback"), "{}", stderr(&out));
}

#[test]
fn help_and_completion() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fsb_in(tmp.path(), &["--help"], &[]);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("5   unavailable"), "{}", stdout(&out));
    let out = fsb_in(tmp.path(), &["completion", "bash"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("_fsb"), "{}", stdout(&out));
    assert_eq!(code(&fsb_in(tmp.path(), &["run", "--port", "x"], &[])), 2);
}

#[test]
fn bench_measures_creates_and_deletes_every_sandbox() {
    let f = Fixture::start();
    let out = f.fsb(&[
        "bench",
        "--count",
        "5",
        "--concurrency",
        "2",
        "--warmup",
        "1",
        "--json",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["count"], 5);
    assert_eq!(v["concurrency"], 2);
    assert!(v["fsb"]["p50_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v["fsb"]["max_ms"].as_f64() >= v["fsb"]["p99_ms"].as_f64(),
        "{v}"
    );
    assert!(v["raw"].is_null() && v["ratio_p50"].is_null(), "{v}");
    let st = f.state.lock().unwrap();
    // 1 warm-up + 5 measured, each with its own request id, all deleted.
    assert_eq!(st.creates.len(), 6);
    let ids: std::collections::HashSet<_> = st.creates.iter().map(|c| &c.request_id).collect();
    assert_eq!(ids.len(), 6);
    assert_eq!(
        st.creates[0].spec.as_ref().unwrap().command,
        ["sleep", "3600"]
    );
    assert!(st.sandboxes.is_empty(), "bench leaves nothing behind");
}

#[test]
fn image_load_streams_1_mib_chunks() {
    let f = Fixture::start();
    let archive = f.data_dir.join("img.tar");
    std::fs::write(&archive, vec![7u8; 2 * 1024 * 1024 + 5]).unwrap();
    let out = f.fsb(&[
        "image",
        "load",
        archive.to_str().unwrap(),
        "--name",
        "my/img:1",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("my/img:1"), "{}", stdout(&out));
    assert!(stdout(&out).contains("2.0 MiB"), "{}", stdout(&out));
    let loads = f.images.loads.lock().unwrap();
    assert_eq!(loads[0].0, "my/img:1");
    assert_eq!(loads[0].2, [1024 * 1024, 1024 * 1024, 5]);
    drop(loads);
    let out = f.fsb(&["image", "load", "/nonexistent.tar"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
}

#[test]
fn image_pull_reports_progress_and_reads_the_password_from_stdin() {
    let f = Fixture::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fsb"))
        .env("FSB_DATA_DIR", &f.data_dir)
        .args([
            "image",
            "pull",
            "reg/img:1",
            "--username",
            "u",
            "--password-stdin",
            "-o",
            "json",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"pw\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Not a TTY: one plain line per finished blob, no carriage returns.
    assert_eq!(stderr(&out), "layer abcdef012345: 2.0 KiB / 2.0 KiB\n");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v[0]["name"], "reg/img:1@pw");
    let out = f.fsb(&[
        "image",
        "pull",
        "r",
        "--username",
        "bad",
        "--password-stdin",
    ]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
}

#[test]
fn image_ls_and_version() {
    let f = Fixture::start();
    let out = f.fsb(&["image", "ls"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(
        text.contains("fsb.local/busybox:latest") && text.contains("yes"),
        "{text}"
    );
    let out = f.fsb(&["version"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("client: fsb {}\n", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    // The fake serves no health service: reachable, but health unknown.
    assert!(text.contains(&format!("server: {}", f.endpoint)), "{text}");
    let tmp = tempfile::tempdir().unwrap();
    let out = fsb_in(tmp.path(), &["version"], &[]);
    assert_eq!(code(&out), 0);
    assert!(
        stdout(&out).contains("server: not reachable (fsb up is not running"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn exec_exits_when_the_remote_process_does_even_if_stdin_stays_open() {
    let f = Fixture::start();
    assert_eq!(
        code(&f.fsb(&["run", "--name", "box", "--", "sleep", "60"])),
        0
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_fsb"))
        .env("FSB_DATA_DIR", &f.data_dir)
        .args(["exec", "-i", "box", "--", "nowait"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Our end of its stdin stays open for the whole test.
    let _stdin = child.stdin.take().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("fsb exec -i hung on its open stdin after the remote exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn ctrl_c_during_run_rm_deletes_the_sandbox_and_exits_130() {
    let f = Fixture::start();
    let child = Command::new(env!("CARGO_BIN_EXE_fsb"))
        .env("FSB_DATA_DIR", &f.data_dir)
        .args(["run", "--rm", "--", "sleep", "600"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the watch is open, fsb is waiting (and its Ctrl-C handler is installed).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while f.state.lock().unwrap().watches == 0 {
        assert!(std::time::Instant::now() < deadline, "fsb never watched");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(f.state.lock().unwrap().sandboxes.len(), 1);
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 130, "{}", stderr(&out));
    assert!(
        f.state.lock().unwrap().sandboxes.is_empty(),
        "deleted on Ctrl-C"
    );
}

#[test]
fn the_request_id_flag_is_the_idempotency_key() {
    let f = Fixture::start();
    let out = f.fsb(&[
        "run",
        "--request-id",
        "req-1",
        "--name",
        "a",
        "--",
        "sleep",
        "1",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        f.state.lock().unwrap().creates.last().unwrap().request_id,
        "req-1"
    );
}

#[test]
fn top_once_prints_pools_and_agents_as_tables_and_json() {
    let f = Fixture::start();
    let out = f.fsb(&["top", "--once"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["NAMESPACE", "POOL", "HEALTHY", "SLOTS", "FREE", "WARM"],
            vec!["default", "default", "1/1", "3/8", "5", "2"],
            vec![
                "NAMESPACE",
                "POOL",
                "AGENT",
                "NODE",
                "STATE",
                "SLOTS",
                "WARM",
                "PORTS"
            ],
            vec![
                "default", "default", "agent-1", "node-a", "healthy", "3/8", "2", "1"
            ],
        ],
        "{text}"
    );
    {
        let st = f.state.lock().unwrap();
        let req = st.usages.last().unwrap();
        assert_eq!(req.namespace, "", "every namespace unless -n");
        assert_eq!(req.pool_ref, "");
    }

    let out = f.fsb(&["top", "--once", "-o", "json", "-n", "team", "--pool", "p1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["kind"], "Usage");
    assert_eq!(v["agents"][0]["agentId"], "agent-1");
    assert_eq!(v["agents"][0]["slotsUsed"], 3);
    assert_eq!(v["agents"][0]["healthy"], true);
    assert_eq!(v["pools"][0]["slotsFree"], 5);
    {
        let st = f.state.lock().unwrap();
        let req = st.usages.last().unwrap();
        assert_eq!(
            (req.namespace.as_str(), req.pool_ref.as_str()),
            ("team", "p1")
        );
    }

    let out = f.fsb(&["top", "--once", "--pool", "a/b"]);
    assert_eq!(code(&out), 2, "InvalidArgument is a usage error");
    assert!(stderr(&out).contains("pool_ref"), "{}", stderr(&out));
}
