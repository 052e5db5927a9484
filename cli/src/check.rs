//! `mesh check [--pre]`: is this cluster ready for Mesh, and is Mesh
//! healthy on it. Each check prints √ or ×, and a hint naming the fix.
//! The exit code is non-zero when any check fails.

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::Args;
use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        },
        coordination::v1::Lease,
        core::v1::Secret,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, Client, api::PostParams};
use mesh_control::k8s::{crds, install};

/// The oldest Kubernetes minor version Mesh supports.
const MIN_MINOR: u32 = 29;
/// The issuer must outlive this.
const ISSUER_MIN_LEFT: Duration = Duration::from_secs(60 * 24 * 3600);
/// A Lease renewed longer ago than this has no live holder.
const LEASE_STALE: Duration = Duration::from_secs(15);
/// The injection webhook's configuration, when installed.
const WEBHOOK: &str = install::WEBHOOK;

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Before `mesh install`: may this cluster (and you) install Mesh?
    #[arg(long)]
    pre: bool,
    /// The kubeconfig [default: KUBECONFIG, ~/.kube/config, in-cluster].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Also check the data plane: meshed pods, their proxies and pods that
    /// escaped injection.
    #[arg(long, conflicts_with = "pre")]
    proxy: bool,
    /// With --proxy: only this namespace [default: all].
    #[arg(short = 'n', long, requires = "proxy")]
    namespace: Option<String>,
}

/// One check's result.
pub(crate) struct Outcome {
    name: String,
    result: Result<String, (String, String)>,
}

pub(crate) fn pass(name: &str, detail: impl Into<String>) -> Outcome {
    Outcome {
        name: name.to_owned(),
        result: Ok(detail.into()),
    }
}

pub(crate) fn fail(name: &str, problem: impl Into<String>, hint: impl Into<String>) -> Outcome {
    Outcome {
        name: name.to_owned(),
        result: Err((problem.into(), hint.into())),
    }
}

pub(crate) fn run(args: CheckArgs, out: &mut impl Write) -> Result<ExitCode> {
    let runtime = mesh_core::shutdown::runtime()?;
    let sections = runtime.block_on(checks(&args));
    let mut failed = 0;
    for (title, outcomes) in &sections {
        writeln!(out, "{title}\n{}", "-".repeat(title.chars().count()))?;
        for o in outcomes {
            match &o.result {
                Ok(detail) if detail.is_empty() => writeln!(out, "√ {}", o.name)?,
                Ok(detail) => writeln!(out, "√ {} ({detail})", o.name)?,
                Err((problem, hint)) => {
                    failed += 1;
                    writeln!(out, "× {}: {problem}\n    hint: {hint}", o.name)?;
                }
            }
        }
        writeln!(out)?;
    }
    if failed == 0 {
        writeln!(out, "Status check results are √")?;
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(out, "Status check results are × ({failed} failed)")?;
        Ok(ExitCode::FAILURE)
    }
}

async fn checks(args: &CheckArgs) -> Vec<(String, Vec<Outcome>)> {
    let mut api_checks = Vec::new();
    let client = match mesh_control::k8s::client(args.kubeconfig.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            api_checks.push(fail(
                "can build a client for the API server",
                e,
                "set KUBECONFIG or pass --kubeconfig",
            ));
            return vec![("kubernetes-api".into(), api_checks)];
        }
    };
    match client.apiserver_version().await {
        Err(e) => {
            api_checks.push(fail(
                "can reach the API server",
                e.to_string(),
                "check the kubeconfig's server address and credentials (kubectl version)",
            ));
            return vec![("kubernetes-api".into(), api_checks)];
        }
        Ok(v) => {
            api_checks.push(pass("can reach the API server", v.git_version.clone()));
            let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
            if v.major == "1" && minor >= MIN_MINOR {
                api_checks.push(pass("is running a supported Kubernetes version", ""));
            } else {
                api_checks.push(fail(
                    "is running a supported Kubernetes version",
                    format!("{}.{} is older than 1.{MIN_MINOR}", v.major, v.minor),
                    format!("upgrade the cluster to Kubernetes 1.{MIN_MINOR} or later"),
                ));
            }
        }
    }
    let mut sections = vec![("kubernetes-api".to_owned(), api_checks)];
    if args.pre {
        sections.push(("pre-kubernetes-setup".into(), pre_checks(&client).await));
    } else {
        sections.push(("mesh-crds".into(), crd_checks(&client).await));
        sections.push(("mesh-control-plane".into(), control_checks(&client).await));
        if args.proxy {
            sections.push((
                "mesh-data-plane".into(),
                crate::check_proxy::checks(&client, args.namespace.as_deref()).await,
            ));
        }
    }
    sections
}

async fn can(client: &Client, verb: &str, group: &str, resource: &str) -> Result<bool, String> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

async fn pre_checks(client: &Client) -> Vec<Outcome> {
    let mut out = Vec::new();
    for (verb, group, resource) in [
        (
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
        ),
        ("create", "", "namespaces"),
        ("create", "rbac.authorization.k8s.io", "clusterroles"),
        ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
        ("create", "apps", "deployments"),
    ] {
        let name = format!("can {verb} {resource}");
        out.push(match can(client, verb, group, resource).await {
            Ok(true) => pass(&name, ""),
            Ok(false) => fail(
                &name,
                "forbidden for your user",
                "install as a cluster administrator (mesh install creates cluster-wide RBAC and CRDs)",
            ),
            Err(e) => fail(&name, e, "check the API server is reachable"),
        });
    }
    let existing = Api::<Lease>::namespaced(client.clone(), install::NAMESPACE)
        .get_opt(install::LEASE)
        .await
        .ok()
        .flatten();
    out.push(match existing {
        None => pass("no Mesh control plane runs here yet", ""),
        Some(_) => fail(
            "no Mesh control plane runs here yet",
            format!("{}/{} exists", install::NAMESPACE, install::LEASE),
            "run `mesh check` (without --pre) to check the installed one",
        ),
    });
    out
}

async fn crd_checks(client: &Client) -> Vec<Outcome> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut missing = Vec::new();
    let mut stale = Vec::new();
    for want in crds::crds() {
        let name = want.metadata.name.clone().unwrap_or_default();
        match api.get_opt(&name).await {
            Ok(Some(have)) => {
                let established = have
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if !established || have.spec.versions != want.spec.versions {
                    stale.push(name);
                }
            }
            Ok(None) => missing.push(name),
            Err(e) => missing.push(format!("{name} ({e})")),
        }
    }
    let hint = "mesh install --crds | kubectl apply -f -";
    vec![
        if missing.is_empty() {
            pass("CRDs are installed", format!("{}", crds::crds().len()))
        } else {
            fail(
                "CRDs are installed",
                format!("missing: {}", missing.join(", ")),
                hint,
            )
        },
        if stale.is_empty() && missing.is_empty() {
            pass(
                "CRDs are current",
                format!("mesh {}", env!("CARGO_PKG_VERSION")),
            )
        } else if stale.is_empty() {
            fail("CRDs are current", "some are missing", hint)
        } else {
            fail(
                "CRDs are current",
                format!(
                    "differ from this version's or not established: {}",
                    stale.join(", ")
                ),
                hint,
            )
        },
    ]
}

async fn control_checks(client: &Client) -> Vec<Outcome> {
    let mut out = Vec::new();
    let lease = Api::<Lease>::namespaced(client.clone(), install::NAMESPACE)
        .get_opt(install::LEASE)
        .await;
    out.push(match lease {
        Ok(Some(lease)) => {
            let spec = lease.spec.unwrap_or_default();
            let holder = spec.holder_identity.unwrap_or_default();
            let age = spec.renew_time.map(|t| {
                let now = k8s_openapi::jiff::Timestamp::now();
                Duration::try_from(now.duration_since(t.0)).unwrap_or_default()
            });
            match age {
                Some(age) if !holder.is_empty() && age <= LEASE_STALE => pass(
                    "control plane is running",
                    format!("{holder} writes, renewed {}s ago", age.as_secs()),
                ),
                _ => fail(
                    "control plane is running",
                    format!("its Lease {}/{} has no live holder", install::NAMESPACE, install::LEASE),
                    "kubectl -n mesh-system get pods,deploy; kubectl -n mesh-system logs deploy/mesh-control",
                ),
            }
        }
        Ok(None) => fail(
            "control plane is running",
            "it has never started (no Lease)",
            "mesh install | kubectl apply -f -, then kubectl -n mesh-system logs deploy/mesh-control",
        ),
        Err(e) => fail("control plane is running", e.to_string(), "check your access to mesh-system"),
    });
    let secret = Api::<Secret>::namespaced(client.clone(), install::NAMESPACE)
        .get_opt(install::ISSUER_SECRET)
        .await;
    let name = "issuer is valid for more than 60 days";
    let renew = "create a new issuer with `mesh identity ca create --shared-root ...` and apply it with `mesh install --ca DIR`";
    out.push(match secret {
        Ok(Some(secret)) => match issuer_left(&secret) {
            Ok(left) if left > ISSUER_MIN_LEFT => {
                pass(name, format!("{} days left", left.as_secs() / 86_400))
            }
            Ok(left) => fail(
                name,
                format!("it expires in {} days", left.as_secs() / 86_400),
                renew,
            ),
            Err(e) => fail(name, e, renew),
        },
        Ok(None) => fail(
            name,
            format!(
                "Secret {}/{} does not exist",
                install::NAMESPACE,
                install::ISSUER_SECRET
            ),
            "mesh install --ca DIR | kubectl apply -f -",
        ),
        Err(e) => fail(
            name,
            e.to_string(),
            "check your access to mesh-system Secrets",
        ),
    });
    let webhook = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(WEBHOOK)
        .await;
    out.push(match webhook {
        Ok(None) => pass("injection webhook", "not installed"),
        Ok(Some(config)) => webhook_reachable(client, &config).await,
        Err(e) => fail(
            "injection webhook",
            e.to_string(),
            "check your access to mutatingwebhookconfigurations",
        ),
    });
    out
}

fn issuer_left(secret: &Secret) -> Result<Duration, String> {
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get(mesh_core::identity::files::ISSUER_CERT))
        .ok_or("the Secret has no issuer.crt")?;
    let certs = mesh_core::identity::cert::certs_from_pem(&pem.0).map_err(|e| e.to_string())?;
    let first = certs.first().ok_or("issuer.crt holds no certificate")?;
    let info = mesh_core::identity::cert::CertInfo::parse(first).map_err(|e| e.to_string())?;
    info.remaining(mesh_core::identity::cert::now())
        .map_err(|ago| {
            format!(
                "it expired {} ago",
                mesh_core::identity::cert::human_duration(ago)
            )
        })
}

/// A webhook declared by URL is dialled; by Service, the Service must have
/// a ready endpoint (else pods in meshed namespaces are refused).
async fn webhook_reachable(client: &Client, config: &MutatingWebhookConfiguration) -> Outcome {
    let name = "injection webhook is reachable";
    let Some(hook) = config.webhooks.as_ref().and_then(|w| w.first()) else {
        return fail(
            name,
            "the configuration lists no webhook",
            "mesh install | kubectl apply -f -",
        );
    };
    if let Some(url) = &hook.client_config.url {
        let authority = url
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        return match tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(authority.as_str()),
        )
        .await
        {
            Ok(Ok(_)) => pass(name, authority),
            _ => fail(
                name,
                format!("{authority} does not answer"),
                "kubectl -n mesh-system get pods; check the webhook's logs",
            ),
        };
    }
    let Some(service) = &hook.client_config.service else {
        return fail(
            name,
            "it names neither a URL nor a Service",
            "mesh install | kubectl apply -f -",
        );
    };
    let endpoints = Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(
        client.clone(),
        &service.namespace,
    )
    .list(
        &kube::api::ListParams::default()
            .labels(&format!("kubernetes.io/service-name={}", service.name)),
    )
    .await;
    let ready = endpoints.map(|list| {
        list.items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .count()
    });
    match ready {
        Ok(0) => fail(
            name,
            format!(
                "Service {}/{} has no ready endpoint: pods in meshed namespaces are refused until it has one",
                service.namespace, service.name
            ),
            "kubectl -n mesh-system get pods; kubectl -n mesh-system logs deploy/mesh-control",
        ),
        Ok(n) => pass(
            name,
            format!(
                "{n} ready endpoints behind Service {}/{}",
                service.namespace, service.name
            ),
        ),
        Err(e) => fail(name, e.to_string(), "check your access to endpointslices"),
    }
}
