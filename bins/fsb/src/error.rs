//! Errors of the client and the exit codes scripts rely on (see `cli::EXIT_CODES`).
//! Every error prints one line, `fsb: <what happened>; <what to do>`.

use std::path::PathBuf;

use tonic::Code;

/// Exit codes.
pub(crate) mod exit {
    pub(crate) const OK: u8 = 0;
    pub(crate) const FAILURE: u8 = 1;
    pub(crate) const USAGE: u8 = 2;
    pub(crate) const NOT_FOUND: u8 = 3;
    pub(crate) const ALREADY_EXISTS: u8 = 4;
    pub(crate) const UNAVAILABLE: u8 = 5;
    pub(crate) const EXHAUSTED: u8 = 6;
    pub(crate) const PERMISSION: u8 = 7;
    pub(crate) const BAD_CONFIG: u8 = 64;
    /// 128 + SIGINT, as shells report an interrupted command.
    pub(crate) const INTERRUPTED: u8 = 130;
}

/// What went wrong in a command.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// Config file, manifest or flag values that cannot work (exit 64); the message
    /// already says what to do.
    #[error("{0}")]
    BadConfig(String),
    /// No endpoint file: `fsb up` is not running for this data directory.
    #[error(
        "fsb up is not running (no {}); start it with `fsb up`",
        endpoint_file.display()
    )]
    NotRunning { endpoint_file: PathBuf },
    /// The endpoint does not answer.
    #[error("cannot reach {endpoint}: {detail}; is `fsb up` running? start it with `fsb up`")]
    Unreachable { endpoint: String, detail: String },
    /// The token cannot be used.
    #[error("{0}")]
    Permission(String),
    /// A gRPC call failed; `what` says which (e.g. `get default/web`).
    #[error("{what}: {}; {}", one_line(status.message()), hint(status.code()))]
    Grpc { what: String, status: tonic::Status },
    /// Stopped by Ctrl-C after cleaning up (exit 130, as a shell reports SIGINT).
    #[error("{0}")]
    Interrupted(String),
    /// Anything else (exit 1).
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl CliError {
    /// `what` failed with `status`.
    pub(crate) fn grpc(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> Self {
        let what = what.into();
        move |status| Self::Grpc { what, status }
    }

    /// The process exit code for this error.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::BadConfig(_) => exit::BAD_CONFIG,
            Self::NotRunning { .. } | Self::Unreachable { .. } => exit::UNAVAILABLE,
            Self::Permission(_) => exit::PERMISSION,
            Self::Grpc { status, .. } => code_exit(status.code()),
            Self::Interrupted(_) => exit::INTERRUPTED,
            Self::Other(_) => exit::FAILURE,
        }
    }
}

/// Server messages on one line (the contract is one line per error).
fn one_line(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        return "no details from the server".to_owned();
    }
    s.lines().map(str::trim).collect::<Vec<_>>().join("; ")
}

/// Exit code of a gRPC status code.
pub(crate) fn code_exit(code: Code) -> u8 {
    match code {
        Code::Ok => exit::OK,
        Code::InvalidArgument | Code::OutOfRange => exit::USAGE,
        Code::NotFound => exit::NOT_FOUND,
        Code::AlreadyExists => exit::ALREADY_EXISTS,
        Code::Unavailable => exit::UNAVAILABLE,
        Code::ResourceExhausted => exit::EXHAUSTED,
        Code::Unauthenticated | Code::PermissionDenied => exit::PERMISSION,
        _ => exit::FAILURE,
    }
}

/// What to do about a gRPC error, by code.
pub(crate) fn hint(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument | Code::OutOfRange => "fix the field named above and retry",
        Code::NotFound => "check the name and namespace with `fsb ls -A`",
        Code::AlreadyExists => {
            "pick another --name (or --request-id), or delete the old one with `fsb rm NAME`"
        }
        Code::Unavailable => "is `fsb up` running? start it with `fsb up` and retry",
        Code::ResourceExhausted => {
            "delete sandboxes you no longer need (`fsb rm`) or start `fsb up` with a larger --capacity"
        }
        Code::Unauthenticated => {
            "the token was refused: use the one `fsb up` wrote (<data-dir>/token) or set FSB_TOKEN"
        }
        Code::PermissionDenied => "this token may not do that; use an allowed namespace or token",
        Code::FailedPrecondition => {
            "the sandbox is not in a state that allows this; see `fsb get NAME`"
        }
        Code::DeadlineExceeded => {
            "the server did not answer in time; retry, or check `fsb up`'s log"
        }
        Code::Unimplemented => {
            "the server does not support this; upgrade `fsb up` to match the client"
        }
        _ => "see `fsb up`'s log for details",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_documented_exit_codes() {
        let cases = [
            (Code::NotFound, 3),
            (Code::AlreadyExists, 4),
            (Code::Unavailable, 5),
            (Code::ResourceExhausted, 6),
            (Code::Unauthenticated, 7),
            (Code::PermissionDenied, 7),
            (Code::InvalidArgument, 2),
            (Code::Internal, 1),
            (Code::DeadlineExceeded, 1),
        ];
        for (code, exit) in cases {
            let e = CliError::grpc("get default/x")(tonic::Status::new(code, "boom"));
            assert_eq!(e.exit_code(), exit, "{code:?}");
        }
    }

    #[test]
    fn messages_say_what_happened_and_what_to_do() {
        let e = CliError::grpc("get default/web")(tonic::Status::not_found(
            "sandbox default/web not found",
        ));
        assert_eq!(
            e.to_string(),
            "get default/web: sandbox default/web not found; check the name and namespace with `fsb ls -A`"
        );
        let e = CliError::NotRunning {
            endpoint_file: PathBuf::from("/d/endpoint"),
        };
        assert_eq!(
            e.to_string(),
            "fsb up is not running (no /d/endpoint); start it with `fsb up`"
        );
        assert_eq!(e.exit_code(), 5);
        assert_eq!(CliError::BadConfig("x".into()).exit_code(), 64);
        let e = CliError::grpc("list")(tonic::Status::internal("a\nb\n"));
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        assert!(e.to_string().starts_with("list: a; b; "), "{e}");
        assert_eq!(CliError::Other(anyhow::anyhow!("x")).exit_code(), 1);
    }
}
