//! Compiles `proto/peergrid.proto` into Rust with tonic-prost-build.
//!
//! The protoc binary comes from the `protoc-bin-vendored` crate, so a machine with nothing but cargo
//! builds the crate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // Values and keys are opaque bytes: `bytes::Bytes` lets them travel without extra copies.
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &["proto/peergrid.proto"], &["proto"])?;
    Ok(())
}
