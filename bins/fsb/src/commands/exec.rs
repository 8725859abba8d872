//! `fsb exec`: a bidirectional stream; stdin is forwarded with `-i`, the remote exit
//! code becomes ours. `-t` asks the server for a terminal; with `-i -t` on a local
//! terminal, that terminal goes to raw mode (keys reach the remote pty as typed, and
//! the remote side echoes) and window size changes are forwarded, as `kubectl exec -it`.

use fsb_proto::fastpath::v1::{self as fp, exec_request, exec_response};
use std::io::IsTerminal;

use tokio::io::AsyncReadExt;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use crate::{
    cli::ExecArgs, client::Conn, commands::run::write_chunk, config::Settings, error::CliError,
};

const STDIN_CHUNK: usize = 32 * 1024;

/// The local terminal in raw mode until dropped (also on errors).
struct RawMode;

impl RawMode {
    fn enable() -> Result<Self, CliError> {
        crossterm::terminal::enable_raw_mode().map_err(|e| {
            CliError::Other(anyhow::anyhow!("terminal raw mode: {e}; retry without -t"))
        })?;
        Ok(Self)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

fn terminal_size() -> Option<fp::ExecRequest> {
    let (cols, rows) = crossterm::terminal::size().ok()?;
    Some(fp::ExecRequest {
        msg: Some(exec_request::Msg::Resize(fp::TerminalSize {
            rows: u32::from(rows),
            cols: u32::from(cols),
        })),
    })
}

/// Forward SIGWINCH as resize messages until the stream closes.
async fn forward_resizes(tx: tokio::sync::mpsc::Sender<fp::ExecRequest>) {
    let Ok(mut winch) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
    else {
        return;
    };
    while winch.recv().await.is_some() {
        if let Some(msg) = terminal_size()
            && tx.send(msg).await.is_err()
        {
            return;
        }
    }
}

/// `fsb exec`.
pub(crate) async fn exec(args: &ExecArgs, settings: &Settings) -> Result<u8, CliError> {
    let namespace = settings.namespace(args.ns.namespace.as_deref());
    let what = format!("exec in {namespace}/{}", args.name);
    let conn = Conn::connect(settings).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<fp::ExecRequest>(16);
    let start = fp::ExecRequest {
        msg: Some(exec_request::Msg::Start(fp::ExecStart {
            namespace,
            name: args.name.clone(),
            command: args.command.clone(),
            envs: Vec::new(),
            working_dir: String::new(),
            tty: args.tty,
            stdin: args.interactive,
        })),
    };
    tx.send(start)
        .await
        .map_err(|_| CliError::Other(anyhow::anyhow!("exec: request stream closed")))?;
    let interactive_tty = args.tty && args.interactive && std::io::stdin().is_terminal();
    let _raw = if interactive_tty {
        if let Some(size) = terminal_size() {
            let _ = tx.send(size).await;
        }
        tokio::spawn(forward_resizes(tx.clone()));
        Some(RawMode::enable()?)
    } else {
        None
    };
    // Kept alive (not dropped) until the exit code arrives when stdin is not forwarded:
    // closing the request stream early could end the call.
    let mut hold = None;
    if args.interactive {
        tokio::spawn(forward_stdin(tx));
    } else {
        hold = Some(tx);
    }
    let mut responses = conn
        .fast_path()
        .exec(ReceiverStream::new(rx))
        .await
        .map_err(CliError::grpc(what.clone()))?
        .into_inner();
    while let Some(msg) = responses.next().await {
        match msg.map_err(CliError::grpc(what.clone()))?.msg {
            Some(exec_response::Msg::Stdout(b)) => {
                write_chunk(fp::LogStream::Stdout as i32, &b)?;
            }
            Some(exec_response::Msg::Stderr(b)) => {
                write_chunk(fp::LogStream::Stderr as i32, &b)?;
            }
            Some(exec_response::Msg::ExitCode(code)) => {
                drop(hold);
                return Ok((code & 0xff) as u8);
            }
            None => {}
        }
    }
    Err(CliError::Other(anyhow::anyhow!(
        "{what}: the stream ended without an exit code; see `fsb up`'s log"
    )))
}

/// Our stdin to the process, then close its stdin at EOF.
async fn forward_stdin(tx: tokio::sync::mpsc::Sender<fp::ExecRequest>) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let msg = fp::ExecRequest {
                    msg: Some(exec_request::Msg::Stdin(buf[..n].to_vec())),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx
        .send(fp::ExecRequest {
            msg: Some(exec_request::Msg::CloseStdin(true)),
        })
        .await;
}
