//! Reserved tunnel targets that both ends of a gateway tunnel name: the
//! control plane's identity service, and workloads reached through the
//! gateway of their own cluster (VMs with no other route).

/// The target that leads to the control plane's identity service (Certify,
/// TrustBundle). A caller without a certificate (a VM joining) may ask for
/// this one only.
pub const IDENTITY: &str = "identity.mesh-system.mesh:8080";

/// What every workload target ends with, before the port.
pub const VM_SUFFIX: &str = ".vm.mesh";

/// The target for workload `namespace/name` behind the gateway, whose
/// proxy listens on `proxy_port`: `<name>.<namespace>.vm.mesh:<port>`.
pub fn vm(namespace: &str, name: &str, proxy_port: u16) -> String {
    format!("{name}.{namespace}{VM_SUFFIX}:{proxy_port}")
}

/// `(namespace, name, port)` of a workload target; `None` for anything else.
pub fn parse_vm(target: &str) -> Option<(&str, &str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let (name, namespace) = host.strip_suffix(VM_SUFFIX)?.split_once('.')?;
    let label = crate::names::is_dns_label;
    (label(name) && label(namespace)).then_some((namespace, name, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_targets_round_trip_and_nothing_else_parses() {
        assert_eq!(vm("shop", "billing-1", 4143), "billing-1.shop.vm.mesh:4143");
        assert_eq!(
            parse_vm("billing-1.shop.vm.mesh:4143"),
            Some(("shop", "billing-1", 4143))
        );
        for bad in [
            "billing-1.shop.vm.mesh",
            "billing-1.shop.vm.mesh:0",
            "a.b.shop.vm.mesh:1",
            "Billing.shop.vm.mesh:1",
            ".shop.vm.mesh:1",
            "api.shop.svc.cluster.local:80",
            IDENTITY,
        ] {
            assert_eq!(parse_vm(bad), None, "{bad}");
        }
    }
}
