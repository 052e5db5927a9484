//! The `mesh.v1` wire API (gRPC), generated from `core/proto/mesh/v1/`.
//! The `.proto` files are the documentation of record, field by field.

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}
