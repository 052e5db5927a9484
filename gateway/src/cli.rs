//! `mesh gateway` and `mesh-gateway`: run until SIGTERM or SIGINT.

use std::process::ExitCode;

use crate::{Gateway, GatewayArgs};

pub fn run(args: GatewayArgs) -> ExitCode {
    mesh_core::shutdown::run_component(Gateway::start(args), Gateway::shutdown)
}
