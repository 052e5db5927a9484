//! DNS for mesh names on the VM (UDP, on a loopback address).
//!
//! - `<svc>.<ns>.svc.<cluster-domain>` names, mirrored `<svc>-<cluster>`
//!   ones included, get an A record for [`MESH_ADDRESS`], a reserved address
//!   nothing answers at. It never carries traffic itself: an app that uses
//!   `HTTP_PROXY` names the service to the proxy, which resolves it through
//!   discovery. Apps that check a name before connecting get an answer, and
//!   AAAA queries get an empty one, never a leak to the upstream resolvers.
//! - Every other name is forwarded, as it came, to the VM's upstream
//!   resolvers (from `/etc/resolv.conf` at start), and the answer returned
//!   if its id matches.
//!
//! Parsing and building messages is hickory's. Bounded: queries over 4 KiB
//! are dropped, at most 64 forwards wait at once, each for 2 s.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata::A},
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::net::UdpSocket;

use crate::health::ReasonLabel;

/// What mesh names resolve to: in 240.0.0.0/4, reserved, routed nowhere.
pub const MESH_ADDRESS: Ipv4Addr = Ipv4Addr::new(240, 240, 240, 240);
/// Where the agent serves DNS unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.153:53";
const MAX_QUERY: usize = 4096;
const MAX_FORWARDS: usize = 64;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
const TTL: u32 = 5;

#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    /// Answered queries, by how (`mesh`, `forwarded`) or why not.
    pub queries: Family<ReasonLabel, Counter>,
}

impl DnsMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "mesh_vm_agent_dns_queries",
            "DNS queries by outcome: mesh, forwarded, refused (malformed), upstream_failed",
            self.queries.clone(),
        );
    }

    fn count(&self, reason: &str) {
        self.queries
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }
}

/// The DNS server's settings.
#[derive(Clone, Debug)]
pub struct Dns {
    /// Names under `svc.<cluster_domain>` are mesh names.
    pub cluster_domain: String,
    /// Where other names go.
    pub upstreams: Vec<SocketAddr>,
    pub metrics: DnsMetrics,
}

/// The `nameserver` lines of a resolv.conf, port 53, leaving out `own`.
pub fn upstreams_from_resolv_conf(text: &str, own: SocketAddr) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| *a != own)
        .take(3)
        .collect()
}

impl Dns {
    /// Whether `name` (any case, trailing dot or not) is a mesh name.
    pub fn is_mesh_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let suffix = format!(".svc.{}", self.cluster_domain.to_ascii_lowercase());
        name.strip_suffix(&suffix)
            .is_some_and(|svc_ns| svc_ns.split('.').count() == 2)
    }

    /// The answer to `query` when it asks for a mesh name; `None` when it
    /// must be forwarded; an error answer when it does not parse.
    pub fn answer(&self, query: &[u8]) -> Result<Option<Vec<u8>>, Option<Vec<u8>>> {
        let Ok(msg) = Message::from_vec(query) else {
            // Too broken to answer by id: dropped.
            return Err(None);
        };
        let id = msg.metadata.id;
        let bad = |code| Message::error_msg(id, OpCode::Query, code).to_vec().ok();
        if msg.metadata.message_type != MessageType::Query
            || msg.metadata.op_code != OpCode::Query
            || msg.queries.len() != 1
        {
            return Err(bad(ResponseCode::FormErr));
        }
        let q = &msg.queries[0];
        if !self.is_mesh_name(&q.name().to_ascii()) {
            return Ok(None);
        }
        let mut resp = Message::response(id, OpCode::Query);
        resp.metadata.authoritative = true;
        resp.metadata.recursion_desired = msg.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.queries.push(q.clone());
        if q.query_type() == RecordType::A {
            resp.add_answer(Record::from_rdata(
                q.name().clone(),
                TTL,
                RData::A(A(MESH_ADDRESS)),
            ));
        }
        resp.to_vec().map(Some).map_err(|_| None)
    }
}

/// Serves DNS on `socket` until the task is dropped.
pub async fn serve(socket: UdpSocket, dns: Dns) {
    let socket = Arc::new(socket);
    let forwards = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS));
    let dns = Arc::new(dns);
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let query = buf[..n].to_vec();
        match dns.answer(&query) {
            Ok(Some(answer)) => {
                dns.metrics.count("mesh");
                let _ = socket.send_to(&answer, from).await;
            }
            Err(reply) => {
                dns.metrics.count("refused");
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
            Ok(None) => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    dns.metrics.count("upstream_failed");
                    continue;
                };
                let (socket, dns) = (socket.clone(), dns.clone());
                tokio::spawn(async move {
                    match forward(&query, &dns.upstreams).await {
                        Some(answer) => {
                            dns.metrics.count("forwarded");
                            let _ = socket.send_to(&answer, from).await;
                        }
                        None => dns.metrics.count("upstream_failed"),
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// Asks each upstream in turn; the first answer whose id matches.
async fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for upstream in upstreams {
        let bind: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(upstream).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; MAX_QUERY];
        if let Ok(Ok(n)) = tokio::time::timeout(FORWARD_TIMEOUT, sock.recv(&mut buf)).await
            && n >= 2
            && &buf[..2] == id
        {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use hickory_proto::{op::Query, rr::Name};

    use super::*;

    fn dns() -> Dns {
        Dns {
            cluster_domain: "cluster.local".into(),
            upstreams: Vec::new(),
            metrics: DnsMetrics::default(),
        }
    }

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.queries
            .push(Query::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    #[test]
    fn mesh_names_get_the_reserved_address_and_others_are_forwarded() {
        let d = dns();
        for name in [
            "api.shop.svc.cluster.local.",
            "API.Shop.svc.Cluster.Local",
            "api-east.shop.svc.cluster.local.",
        ] {
            let answer = d.answer(&query(name, RecordType::A)).unwrap().unwrap();
            let m = Message::from_vec(&answer).unwrap();
            assert_eq!(m.answers.len(), 1, "{name}");
            assert_eq!(m.answers[0].data, RData::A(A(MESH_ADDRESS)));
        }
        let aaaa = d
            .answer(&query("api.shop.svc.cluster.local.", RecordType::AAAA))
            .unwrap()
            .unwrap();
        let m = Message::from_vec(&aaaa).unwrap();
        assert!(m.answers.is_empty() && m.metadata.response_code == ResponseCode::NoError);
        for other in [
            "example.com.",
            "svc.cluster.local.",
            "a.b.c.svc.cluster.local.",
        ] {
            assert_eq!(d.answer(&query(other, RecordType::A)), Ok(None), "{other}");
        }
        assert_eq!(d.answer(b"\x00\x01garbage"), Err(None));
    }

    #[tokio::test]
    async fn other_names_go_to_the_first_upstream_that_answers_with_the_same_id() {
        // A dead upstream first (nothing listens), then one that answers.
        let dead: SocketAddr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = up.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.queries = q.queries.clone();
            r.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                60,
                RData::A(A(Ipv4Addr::new(93, 184, 216, 34))),
            ));
            up.send_to(&r.to_vec().unwrap(), from).await.unwrap();
        });
        let q = query("example.com.", RecordType::A);
        let answer = forward(&q, &[dead, up_addr]).await.expect("an answer");
        let m = Message::from_vec(&answer).unwrap();
        assert_eq!(
            m.answers[0].data,
            RData::A(A(Ipv4Addr::new(93, 184, 216, 34)))
        );
    }

    #[test]
    fn upstreams_come_from_resolv_conf_without_ourselves() {
        let own: SocketAddr = "127.0.0.153:53".parse().unwrap();
        let got = upstreams_from_resolv_conf(
            "# comment\nnameserver 10.0.2.3\nnameserver 127.0.0.153\nsearch x\nnameserver ::1\n",
            own,
        );
        assert_eq!(
            got,
            vec![
                "10.0.2.3:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
