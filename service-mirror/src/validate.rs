//! What a linked cluster sends is checked here before any of it becomes a
//! local resource. A peer control plane is another organisation's code,
//! possibly compromised: every name, namespace, identity and port it
//! sends is validated, the counts are bounded, and the mirrors are built as
//! typed resources and serialized (never pasted into YAML text). A bad
//! entry is refused with a reason and counted; the good ones are mirrored.

use std::collections::BTreeSet;

use mesh_control::resources::{
    parse::check_name,
    types::{MULTICLUSTER_V1ALPHA1, Metadata, MirroredServiceSpec, Object, ServicePort},
};
use mesh_core::{
    api::v1::{ExportedService, Exports, ProtocolHint},
    identity::{SpiffeId, TrustDomain},
};

/// Services mirrored from one link at most; more are refused.
pub const MAX_SERVICES: usize = 1_000;
/// Ports per mirrored service at most.
pub const MAX_PORTS: usize = 100;
/// Destination identities per mirrored service at most.
pub const MAX_IDENTITIES: usize = 100;
/// The label every mirror carries, naming its link.
pub const MIRROR_OF_LABEL: &str = "multicluster.mesh.rs/mirror-of";

/// One exported service that was not mirrored, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// `namespace/name` as sent, shortened and escaped for logs.
    pub service: String,
    /// A stable label for `exports_refused_total{reason}`.
    pub reason: &'static str,
    /// What was wrong, for the log.
    pub detail: String,
}

/// The mirrors of `exports` from the link to `cluster` (trust domain
/// `trust_domain`), in a stable order, and what was refused.
pub fn mirrors(
    cluster: &str,
    trust_domain: &TrustDomain,
    exports: &Exports,
    alive: bool,
) -> (Vec<Object<MirroredServiceSpec>>, Vec<Refused>) {
    let mut refused = Vec::new();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, svc) in exports.services.iter().enumerate() {
        let refuse = |reason, detail: String| Refused {
            service: shown(svc),
            reason,
            detail,
        };
        if i >= MAX_SERVICES {
            refused.push(refuse(
                "too_many_services",
                format!("past the first {MAX_SERVICES} services of the link"),
            ));
            continue;
        }
        match mirror(cluster, trust_domain, svc, alive) {
            Ok(m) if !seen.insert((m.metadata.namespace.clone(), m.metadata.name.clone())) => {
                refused.push(refuse("duplicate", "sent twice".into()));
            }
            Ok(m) => out.push(m),
            Err((reason, detail)) => refused.push(refuse(reason, detail)),
        }
    }
    out.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    (out, refused)
}

/// One service's mirror, or why it has none.
fn mirror(
    cluster: &str,
    trust_domain: &TrustDomain,
    svc: &ExportedService,
    alive: bool,
) -> Result<Object<MirroredServiceSpec>, (&'static str, String)> {
    check_name("name", &svc.name).map_err(|e| ("bad_name", e))?;
    check_name("namespace", &svc.namespace).map_err(|e| ("bad_namespace", e))?;
    let name = format!("{}-{cluster}", svc.name);
    check_name("mirror name", &name).map_err(|e| ("bad_name", e))?;
    if svc.ports.is_empty() || svc.ports.len() > MAX_PORTS {
        return Err((
            "bad_ports",
            format!("{} ports; 1 to {MAX_PORTS} are accepted", svc.ports.len()),
        ));
    }
    let mut ports = Vec::with_capacity(svc.ports.len());
    let mut seen = BTreeSet::new();
    for p in &svc.ports {
        let port = u16::try_from(p.port).ok().filter(|p| *p != 0);
        let target = match p.target_port {
            0 => port,
            t => u16::try_from(t).ok(),
        };
        let (Some(port), Some(target)) = (port, target) else {
            return Err((
                "bad_ports",
                format!("port {} -> {}: not in 1-65535", p.port, p.target_port),
            ));
        };
        if !seen.insert(port) {
            return Err(("bad_ports", format!("port {port} is listed twice")));
        }
        let protocol = match ProtocolHint::try_from(p.protocol) {
            Ok(ProtocolHint::Http1) => Some("http"),
            Ok(ProtocolHint::Http2) => Some("h2c"),
            Ok(ProtocolHint::Grpc) => Some("grpc"),
            Ok(ProtocolHint::Opaque) => Some("opaque"),
            _ => None,
        };
        ports.push(ServicePort {
            name: None,
            port,
            target_port: Some(target),
            app_protocol: protocol.map(str::to_owned),
            protocol: None,
        });
    }
    if svc.identities.len() > MAX_IDENTITIES {
        return Err((
            "too_many_identities",
            format!(
                "{} identities; at most {MAX_IDENTITIES}",
                svc.identities.len()
            ),
        ));
    }
    let mut identities = BTreeSet::new();
    for raw in &svc.identities {
        let id = SpiffeId::parse(raw).map_err(|e| ("bad_identity", e.to_string()))?;
        // A linked cluster speaks for its own trust domain only: it cannot
        // make local callers expect (and so trust) another domain's IDs.
        if !id.is_member_of(trust_domain) {
            return Err((
                "foreign_identity",
                format!("{id} is not of the link's trust domain {trust_domain}"),
            ));
        }
        identities.insert(id.to_string());
    }
    Ok(Object {
        api_version: MULTICLUSTER_V1ALPHA1.to_owned(),
        kind: "MirroredService".to_owned(),
        metadata: Metadata {
            name,
            namespace: svc.namespace.clone(),
            labels: [(MIRROR_OF_LABEL.to_owned(), cluster.to_owned())].into(),
            annotations: Default::default(),
        },
        spec: MirroredServiceSpec {
            link: cluster.to_owned(),
            remote_name: svc.name.clone(),
            ports,
            identities: identities.into_iter().collect(),
            ready: alive && svc.ready_endpoints > 0,
        },
    })
}

/// A peer's `namespace/name` fit for a log line: escaped, at most 80 chars.
fn shown(svc: &ExportedService) -> String {
    let text = format!("{:?}/{:?}", svc.namespace, svc.name);
    text.chars().take(80).collect()
}

/// The mirrors as one YAML file, through the serializer.
pub fn render(
    cluster: &str,
    mirrors: &[Object<MirroredServiceSpec>],
) -> Result<String, serde_saphyr::ser::Error> {
    // The cluster name comes from the operator's own Link, but the comment
    // stays one line whatever it holds.
    let cluster: String = cluster.chars().filter(|c| !c.is_control()).collect();
    let mut out =
        format!("# Written by the service mirror for the Link to {cluster}; do not edit.\n");
    if !mirrors.is_empty() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string_multiple(mirrors)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use mesh_control::resources::{Resource, parse::parse_file};
    use mesh_core::api::v1::ExportedPort;

    use super::*;

    fn service(ns: &str, name: &str, ids: &[&str]) -> ExportedService {
        ExportedService {
            namespace: ns.into(),
            name: name.into(),
            ports: vec![ExportedPort {
                port: 80,
                protocol: ProtocolHint::Http1 as i32,
                target_port: 8080,
            }],
            identities: ids.iter().map(|s| (*s).to_owned()).collect(),
            ready_endpoints: 1,
        }
    }

    /// A hostile peer control plane: names and identities that would have
    /// injected whole resources into text-assembled YAML, identities of
    /// other trust domains, bad ports and duplicates. Only the good entries
    /// are mirrored, each bad one is refused with its reason, and the file
    /// holds exactly the mirrors and nothing else.
    #[test]
    fn a_hostile_peer_gets_its_bad_entries_refused_and_its_good_ones_mirrored() {
        let api = "spiffe://east.mesh.local/ns/shop/sa/api";
        let inject = "x\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {name: all, namespace: shop}\nspec: {identities: ['*']}\n";
        let mut bad_port = service("shop", "badport", &[api]);
        bad_port.ports[0].port = 70_000;
        let mut no_port = service("shop", "noport", &[api]);
        no_port.ports.clear();
        let exports = Exports {
            services: vec![
                service("shop", "api", &[api]),
                service("shop", inject, &[api]),
                service(inject, "api2", &[api]),
                service(
                    "shop",
                    "idinject",
                    &[&format!("{api}\"]\n  ready: true\n---\nkind: Link")],
                ),
                service(
                    "shop",
                    "foreign",
                    &["spiffe://west.mesh.local/ns/kube-system/sa/admin"],
                ),
                bad_port,
                no_port,
                service("shop", "api", &[api]),
                service("shop", &"a".repeat(60), &[api]),
                // Valid YAML around an allow-all authentication: the old
                // text renderer wrote it into the config directory.
                service(
                    "shop\n  labels: {a: b}\nspec: {link: east, remoteName: x, ports: [{port: 80}], identities: []}\n---\napiVersion: policy.mesh.rs/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {name: all, namespace: shop}\nspec: {identities: ['*']}\n---\napiVersion: multicluster.mesh.rs/v1alpha1\nkind: MirroredService\nmetadata:\n  name: y\n  namespace: shop",
                    "api",
                    &[api],
                ),
            ],
            ..Default::default()
        };
        let td: TrustDomain = "east.mesh.local".parse().unwrap();
        let (mirrors, refused) = super::mirrors("east", &td, &exports, true);
        assert_eq!(mirrors.len(), 1, "{mirrors:?}");
        let reasons: Vec<&str> = refused.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            [
                "bad_name",
                "bad_namespace",
                "bad_identity",
                "foreign_identity",
                "bad_ports",
                "bad_ports",
                "duplicate",
                "bad_name",
                "bad_namespace"
            ]
        );
        assert!(
            refused.iter().all(|r| !r.service.contains('\n')),
            "{refused:?}"
        );

        let text = render("east", &mirrors).unwrap();
        let parsed = parse_file(Path::new("mirror-east.yaml"), &text).unwrap();
        assert_eq!(parsed.len(), 1, "{text}");
        let (_, Resource::MirroredService(m)) = &parsed[0] else {
            panic!("{text}");
        };
        assert_eq!(m.metadata.name, "api-east");
        assert_eq!(m.spec.identities, [api]);
    }

    #[test]
    fn counts_are_capped() {
        let api = "spiffe://east.mesh.local/ns/shop/sa/api";
        let td: TrustDomain = "east.mesh.local".parse().unwrap();
        let exports = Exports {
            services: (0..MAX_SERVICES + 5)
                .map(|i| service("shop", &format!("s{i}"), &[api]))
                .collect(),
            ..Default::default()
        };
        let (kept, refused) = mirrors("east", &td, &exports, true);
        assert_eq!(kept.len(), MAX_SERVICES);
        assert_eq!(refused.len(), 5);
        assert!(refused.iter().all(|r| r.reason == "too_many_services"));

        let mut many = service("shop", "many", &[]);
        many.identities = (0..=MAX_IDENTITIES)
            .map(|i| format!("spiffe://east.mesh.local/ns/shop/sa/s{i}"))
            .collect();
        let exports = Exports {
            services: vec![many],
            ..Default::default()
        };
        let (_, refused) = mirrors("east", &td, &exports, true);
        assert_eq!(refused[0].reason, "too_many_identities");
    }
}
