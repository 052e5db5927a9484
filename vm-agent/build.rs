//! Generates the SPIFFE Workload API server (and the client the tests use
//! to send what the spiffe crate never sends) from `proto/workload.proto`
//! with the protoc shipped in `protoc-bin-vendored`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/workload.proto";
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &[proto], &["proto"])?;
    println!("cargo:rerun-if-changed={proto}");
    Ok(())
}
