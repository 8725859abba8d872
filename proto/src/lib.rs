//! fsb-proto: the gRPC contracts, generated from `proto/**/*.proto`; no logic.
//!
//! - [`fastpath::v1`]: the public API (Create, Delete, Get, List, Update, Watch, Exec, Logs)
//!   and `Images` (Pull, Load, List).
//! - [`agent::v1`]: controller <-> agent (Session, the agent's connect stream; CreateSandbox, DeleteSandbox,
//!   Exec, Logs, Stats).
//! - [`codec`]: prost's codec, with malformed messages reported as InvalidArgument.
//! - [`standard_services`]: gRPC health and reflection, served by every server we run.

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::doc_markdown,
    clippy::large_enum_variant
)]

pub mod codec;

/// Public API.
pub mod fastpath {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("fastpath.v1");
    }
}

/// Controller <-> agent API.
pub mod agent {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("agent.v1");
    }
}

/// Encoded descriptors of every proto here, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fsb_descriptor");

/// Fully qualified names of our services, as health and reflection list them.
pub const SERVICE_NAMES: [&str; 4] = [
    "fastpath.v1.FastPath",
    "fastpath.v1.Images",
    "agent.v1.AgentControl",
    "agent.v1.Agent",
];

pub use tonic_health::ServingStatus;
pub use tonic_health::server::HealthReporter;

/// gRPC health (`grpc.health.v1`) and reflection (v1) services, to add to any tonic
/// server. Mark served services with `reporter.set_service_status(name, Serving)`.
pub fn standard_services() -> Result<
    (
        HealthReporter,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    Ok((reporter, health, reflection))
}
