//! fsb: run local mode (`fsb up`) and talk to the fast path.
//!
//! Thin: parse the command line, start tracing on stderr, call the command's module.
//! Exit codes are documented in `cli::EXIT_CODES` (`fsb --help`) and bins/README.md.

mod cli;
mod client;
mod commands;
mod config;
mod error;
mod output;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, parser::ValueSource};

use crate::{
    cli::{Cli, Command},
    commands::run::Explicit,
    config::{ProcessEnv, Settings},
    error::CliError,
};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let up = matches!(cli.command, Command::Up(_));
    let _tracing = match fsb_telemetry::trace::init(
        "fsb",
        fsb_telemetry::trace::LogOptions {
            default_filter: if up { "info" } else { "warn" },
            stderr: true,
            ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            export: up,
        },
    ) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("fsb: {e}");
            return ExitCode::from(1);
        }
    };
    // Only values typed on the command line beat a `run -f` manifest.
    let explicit = matches
        .subcommand_matches("run")
        .map(|m| {
            let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
            Explicit {
                image: given("image"),
                pool: given("pool"),
                namespace: given("namespace"),
                mode: given("mode"),
                runtime: given("runtime"),
            }
        })
        .unwrap_or_default();
    let code = match dispatch(&cli, explicit, &ProcessEnv::read()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fsb: {e}");
            e.exit_code()
        }
    };
    ExitCode::from(code)
}

fn dispatch(cli: &Cli, explicit: Explicit, env: &ProcessEnv) -> Result<u8, CliError> {
    let settings = Settings::resolve(&cli.global, env)?;
    match &cli.command {
        // `fsb up` owns an actix system (the gateway's actors run on it).
        Command::Up(args) => commands::up::up(args, &settings),
        Command::Completion(args) => commands::completion(args),
        command => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CliError::Other(anyhow::anyhow!("starting the runtime: {e}")))?;
            let result = rt.block_on(client_command(command, explicit, &settings));
            // A pending read of our stdin (exec -i after the remote process exited) must
            // not keep us alive: dropping the runtime would wait for it.
            rt.shutdown_background();
            result
        }
    }
}

async fn client_command(
    command: &Command,
    explicit: Explicit,
    settings: &Settings,
) -> Result<u8, CliError> {
    use commands::{bench, exec, image, run, sandbox, top};
    match command {
        Command::Run(args) => run::run(args, explicit, settings).await,
        Command::Ls(args) => sandbox::ls(args, settings).await,
        Command::Get(args) => sandbox::get(args, settings).await,
        Command::Top(args) => top::top(args, settings).await,
        Command::Logs(args) => sandbox::logs(args, settings).await,
        Command::Exec(args) => exec::exec(args, settings).await,
        Command::Rm(args) => sandbox::rm(args, settings).await,
        Command::Update(args) => sandbox::update(args, settings).await,
        Command::Reset(args) => sandbox::reset(args, settings).await,
        Command::Image(cmd) => image::image(cmd, settings).await,
        Command::Bench(args) => bench::bench(args, settings).await,
        Command::Version => commands::version(settings).await,
        Command::Up(_) | Command::Completion(_) => Ok(error::exit::OK),
    }
}
