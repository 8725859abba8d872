//! fsb-init: PID 1 of a warm instance (see `fsb_init`). Forks the runner, which reads
//! the process spec from stdin and becomes that process; forwards signals to it and
//! exits with its status; 127 if it cannot be started.

use std::process::ExitCode;

fn main() -> ExitCode {
    // First, while single-threaded: the runtime below starts no thread the runner
    // would inherit half-way.
    let status = fsb_init::fork_runner().and_then(|runner| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(fsb_init::InitError::Signal)?
            .block_on(fsb_init::supervise(runner))
    });
    match status {
        Ok(code) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
        Err(e) => {
            eprintln!("fsb-init: {e}");
            ExitCode::from(u8::try_from(fsb_init::EXIT_CANNOT_START).unwrap_or(1))
        }
    }
}
