//! Generates the `mesh.v1` gRPC API from `proto/` with the protoc shipped in
//! `protoc-bin-vendored`, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/mesh/v1/common.proto",
        "proto/mesh/v1/identity.proto",
        "proto/mesh/v1/discovery.proto",
        "proto/mesh/v1/policy.proto",
        "proto/mesh/v1/registry.proto",
        "proto/mesh/v1/federation.proto",
    ];
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &protos, &["proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
