//! The `mesh-cni` binary: the CNI protocol (no arguments, `CNI_*`
//! variables, config on stdin), or `mesh-cni install` on a node.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "install") {
        return mesh_cni::installer::main(&args[1..]);
    }
    mesh_cni::plugin::main(std::env::vars().collect())
}
