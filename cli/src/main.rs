//! `mesh`: the one binary users run. Each component and tool is a
//! subcommand, so one build runs everything.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod bench_cross;
mod bench_haproxy;
mod check;
mod check_proxy;
mod identity;
mod inject;
mod install;
mod multicluster;
mod viz;
mod vm;

#[derive(Debug, Parser)]
#[command(name = "mesh", version, about = "Mesh: a federated service mesh", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificate authorities, SVIDs and trust bundles.
    #[command(subcommand)]
    Identity(identity::IdentityCmd),
    /// Run a cluster's control plane, or manage a running one.
    Control(Box<mesh_control::cli::ControlArgs>),
    /// Run the sidecar proxy (configured by MESH_PROXY_* variables; see the README).
    Proxy(mesh_proxy::cli::ProxyArgs),
    /// Run a cluster's gateway: linked clusters tunnel to its exported services.
    Gateway(Box<mesh_gateway::GatewayArgs>),
    /// Run the service mirror: linked clusters' exports become local mirrored services.
    ServiceMirror(Box<mesh_service_mirror::MirrorArgs>),
    /// Link clusters: print Link resources and what to delete to unlink.
    #[command(subcommand)]
    Multicluster(multicluster::MulticlusterCmd),
    /// Print the Kubernetes manifests of the control plane (`--crds` first),
    /// for `kubectl apply -f -`.
    Install(Box<install::InstallArgs>),
    /// Print everything `mesh install` created, for `kubectl delete -f -`.
    Uninstall,
    /// Print the DaemonSet that installs the mesh-cni plugin on every node
    /// (chained after the cluster's network plugin), for `kubectl apply -f -`.
    InstallCni(install::InstallCniArgs),
    /// Mesh workloads in manifests: add `mesh.rs/inject: enabled` to pod
    /// templates and namespaces (or, with --manual, the whole injected spec).
    Inject(inject::InjectArgs),
    /// Undo `mesh inject` (with or without --manual) in manifests.
    Uninject(inject::UninjectArgs),
    /// Check a cluster before (`--pre`) and after `mesh install`: API
    /// server, CRDs, control plane, issuer, webhook; with `--proxy`, the
    /// meshed pods. Non-zero exit on failure.
    Check(check::CheckArgs),
    /// VMs: `token create` on the cluster side prints the line a VM runs;
    /// `join`, `run`, `leave`, `status` are the VM agent's own commands.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Measure the data plane on this machine: meshed against direct, in one run.
    Bench(bench::BenchArgs),
    /// Run a whole federated mesh on this machine from a topology file, with live traffic.
    Up(Box<mesh_topologies::cli::UpArgs>),
    /// Stop a `mesh up` run left in the background.
    Down(mesh_topologies::cli::StateArgs),
    /// Show a `mesh up` run: every process, its readiness, and the traffic so far.
    Status(mesh_topologies::cli::StateArgs),
    /// The demo workloads `mesh up` runs (HTTP/gRPC service, load generator).
    #[command(subcommand)]
    Demo(mesh_topologies::demo::DemoCmd),
    /// See every linked cluster: golden metrics, edges, routes, links,
    /// live requests (`serve` runs a cluster's viz; the rest ask one).
    #[command(subcommand)]
    Viz(mesh_viz::cli::VizCommand),
}

/// Prints an error the way every command does.
fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    mesh_core::crypto::install_default_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Identity(cmd) => {
            mesh_core::telemetry::init("warn");
            match identity::run(cmd, &mut std::io::stdout().lock()) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Control(args) => {
            let is_server = args.command.is_none();
            mesh_core::telemetry::init(if is_server { "info" } else { "warn" });
            mesh_control::cli::run(*args)
        }
        Command::Install(args) => {
            mesh_core::telemetry::init("warn");
            report(install::install(*args, &mut std::io::stdout().lock()))
        }
        Command::Check(args) => {
            mesh_core::telemetry::init("warn");
            report(check::run(args, &mut std::io::stdout().lock()))
        }
        Command::InstallCni(args) => {
            mesh_core::telemetry::init("warn");
            report(install::install_cni(args, &mut std::io::stdout().lock()))
        }
        Command::Inject(args) => {
            mesh_core::telemetry::init("warn");
            report(inject::inject(args, &mut std::io::stdout().lock()))
        }
        Command::Uninject(args) => {
            mesh_core::telemetry::init("warn");
            report(inject::uninject(args, &mut std::io::stdout().lock()))
        }
        Command::Uninstall => {
            mesh_core::telemetry::init("warn");
            report(install::uninstall(&mut std::io::stdout().lock()))
        }
        Command::Multicluster(cmd) => {
            mesh_core::telemetry::init("warn");
            match multicluster::run(cmd, &mut std::io::stdout().lock()) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Vm(cmd) => {
            let serving = matches!(
                cmd,
                vm::VmCmd::Agent(mesh_vm_agent::cli::AgentCommand::Run(_))
            );
            mesh_core::telemetry::init(if serving { "info" } else { "warn" });
            report(vm::run(cmd, &mut std::io::stdout().lock()))
        }
        Command::Bench(args) => {
            mesh_core::telemetry::init("warn");
            match bench::run(args) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Up(args) => {
            mesh_core::telemetry::init("warn");
            report(mesh_topologies::cli::up(*args))
        }
        Command::Down(args) => {
            mesh_core::telemetry::init("warn");
            report(mesh_topologies::cli::down(
                args,
                &mut std::io::stdout().lock(),
            ))
        }
        Command::Status(args) => {
            mesh_core::telemetry::init("warn");
            report(mesh_topologies::cli::status(
                args,
                &mut std::io::stdout().lock(),
            ))
        }
        Command::Viz(cmd) => {
            mesh_core::telemetry::init(match cmd {
                mesh_viz::cli::VizCommand::Serve(_) => "info",
                _ => "warn",
            });
            mesh_viz::cli::run(cmd, viz::resolve)
        }
        Command::Demo(cmd) => {
            mesh_core::telemetry::init("info");
            report(mesh_topologies::demo::run(cmd).map(|()| ExitCode::SUCCESS))
        }
        Command::Gateway(args) => {
            mesh_core::telemetry::init("info");
            mesh_gateway::cli::run(*args)
        }
        Command::ServiceMirror(args) => {
            mesh_core::telemetry::init("info");
            mesh_service_mirror::cli::run(*args)
        }
        Command::Proxy(args) => {
            mesh_core::telemetry::init("info");
            mesh_proxy::cli::main(args, std::env::vars().collect())
        }
    }
}
