//! fsb-init: PID 1 of a warm instance (see `fsb_init`). Reads the process spec from
//! stdin, runs it, exits with its status; 127 if it cannot be started.

use std::process::ExitCode;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fsb-init: runtime: {e}");
            return ExitCode::from(127);
        }
    };
    let status = runtime.block_on(fsb_init::run(tokio::io::stdin()));
    // tokio's stdin read runs on a blocking thread that cannot be cancelled: dropping
    // the runtime would wait for input that never comes (a TERM before any spec).
    runtime.shutdown_background();
    match status {
        Ok(code) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
        Err(e) => {
            eprintln!("fsb-init: {e}");
            ExitCode::from(u8::try_from(fsb_init::EXIT_CANNOT_START).unwrap_or(1))
        }
    }
}
