//! Compiles `proto/steward/v1/steward.proto` with the system `protoc`
//! (Debian: `protobuf-compiler`; `PROTOC` overrides the path).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/steward/v1/steward.proto");
    tonic_prost_build::configure()
        // No `connect(url)` on the clients: the wire crate has no transport;
        // callers build their own (mutual TLS) channel.
        .build_transport(false)
        // Small starting buffers per stream (`steward_proto::codec`).
        .codec_path("crate::codec::LeanCodec")
        .compile_protos(&["proto/steward/v1/steward.proto"], &["proto"])?;
    Ok(())
}
