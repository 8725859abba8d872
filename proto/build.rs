//! Generates the fastpath.v1 and agent.v1 code and the descriptor set served by gRPC
//! reflection. Needs `protoc` (Debian: protobuf-compiler, libprotobuf-dev).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Malformed messages are InvalidArgument (see src/codec.rs).
        .codec_path("crate::codec::Codec")
        .file_descriptor_set_path(out.join("fsb_descriptor.bin"))
        .compile_protos(
            &["fastpath/v1/fastpath.proto", "agent/v1/agent.proto"],
            &["."],
        )?;
    Ok(())
}
