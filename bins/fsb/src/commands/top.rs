//! `fsb top`: the fast path's Usage, once or refreshed every interval.

use std::{io::IsTerminal, time::SystemTime};

use fsb_proto::fastpath::v1 as fp;

use crate::{
    cli::{OutputFormat, TopArgs},
    client::Conn,
    config::Settings,
    error::{CliError, exit},
    output::{self, UsageDoc},
};

/// `fsb top`. Ctrl-C ends a refreshing one with exit code 0: that is how it is left.
pub(crate) async fn top(args: &TopArgs, settings: &Settings) -> Result<u8, CliError> {
    let req = fp::UsageRequest {
        namespace: args.namespace.clone().unwrap_or_default(),
        pool_ref: args.pool.clone().unwrap_or_default(),
    };
    let conn = Conn::connect(settings).await?;
    let mut fast = conn.fast_path();
    // Clear the screen between tables only on a terminal; piped output just repeats.
    let clear =
        !args.once && settings.output == OutputFormat::Table && std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(exit::OK),
        }
        let usage = fast
            .usage(req.clone())
            .await
            .map_err(CliError::grpc("usage"))?
            .into_inner();
        let text = match (settings.output, args.once) {
            (OutputFormat::Table, _) => {
                let mut t = String::new();
                if clear {
                    t.push_str("\x1b[H\x1b[2J");
                }
                if !args.once {
                    t.push_str(&format!(
                        "{}  every {}\n\n",
                        humantime::format_rfc3339_seconds(SystemTime::now()),
                        humantime::format_duration(args.interval)
                    ));
                }
                t.push_str(&output::usage_tables(&usage));
                t
            }
            (f, true) => output::render_doc(f, &UsageDoc::from(&usage))?,
            // A stream of snapshots: one JSON document per line, YAML documents apart.
            (OutputFormat::Yaml, false) => format!(
                "---\n{}",
                output::render_doc(OutputFormat::Yaml, &UsageDoc::from(&usage))?
            ),
            (_, false) => output::json_line(&UsageDoc::from(&usage))?,
        };
        output::print(&text);
        if args.once {
            return Ok(exit::OK);
        }
    }
}
