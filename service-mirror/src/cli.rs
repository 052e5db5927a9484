//! `mesh service-mirror` and `mesh-service-mirror`: run until SIGTERM or SIGINT.

use std::process::ExitCode;

use crate::{MirrorArgs, ServiceMirror};

pub fn run(args: MirrorArgs) -> ExitCode {
    mesh_core::shutdown::run_component(ServiceMirror::start(args), ServiceMirror::shutdown)
}
