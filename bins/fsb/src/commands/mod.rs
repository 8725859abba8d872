//! One module per command group; each returns the process exit code.

pub(crate) mod bench;
pub(crate) mod exec;
pub(crate) mod image;
pub(crate) mod run;
pub(crate) mod sandbox;
pub(crate) mod top;
pub(crate) mod up;

use clap::CommandFactory;
use tonic_health::pb::HealthCheckRequest;

use crate::{
    cli::{Cli, CompletionArgs},
    client::Conn,
    config::Settings,
    error::{CliError, exit},
    output,
};

/// `fsb version`: the client's version always; the server's health if reachable.
pub(crate) async fn version(settings: &Settings) -> Result<u8, CliError> {
    output::print(&format!("client: fsb {}\n", env!("CARGO_PKG_VERSION")));
    let line = match Conn::connect(settings).await {
        Ok(conn) => {
            match conn
                .health()
                .check(HealthCheckRequest {
                    service: "fastpath.v1.FastPath".to_owned(),
                })
                .await
            {
                Ok(r) => format!(
                    "server: {} {}\n",
                    conn.endpoint,
                    r.into_inner().status().as_str_name()
                ),
                Err(s) => format!("server: {} health: {}\n", conn.endpoint, s.message()),
            }
        }
        Err(e) => format!("server: not reachable ({e})\n"),
    };
    output::print(&line);
    Ok(exit::OK)
}

/// `fsb completion SHELL`.
pub(crate) fn completion(args: &CompletionArgs) -> Result<u8, CliError> {
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "fsb", &mut out);
    output::print(&String::from_utf8_lossy(&out));
    Ok(exit::OK)
}
