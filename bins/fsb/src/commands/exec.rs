//! `fsb exec`: a bidirectional stream; stdin is forwarded with `-i`, the remote exit
//! code becomes ours. `-t` asks the server for a terminal; the local terminal is not
//! switched to raw mode (line-buffered input still works).

use fsb_proto::fastpath::v1::{self as fp, exec_request, exec_response};
use tokio::io::AsyncReadExt;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use crate::{
    cli::ExecArgs, client::Conn, commands::run::write_chunk, config::Settings, error::CliError,
};

const STDIN_CHUNK: usize = 32 * 1024;

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
