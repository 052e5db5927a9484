//! Gateway names: a Link may name its gateway by DNS name. Names are
//! resolved with hickory-resolver, whose cache keeps each answer for its
//! TTL, so a record that changes is followed once its TTL has run out
//! (new tunnel connections go to the new address; open ones stay).
//! Addresses that are IP literals are used as they are.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, OnceLock},
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};

/// A resolver, built on first use (never for IP literals).
#[derive(Clone, Default)]
pub struct Dns {
    resolver: Arc<OnceLock<Result<TokioResolver, String>>>,
    /// A name server to use instead of the system's (`/etc/resolv.conf`).
    nameserver: Option<SocketAddr>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("nameserver", &self.nameserver)
            .finish_non_exhaustive()
    }
}

impl Dns {
    /// The system's configuration (`/etc/resolv.conf`, `/etc/hosts`).
    pub fn system() -> Self {
        Self::default()
    }

    /// Only `nameserver` (over UDP), for tests and special setups.
    pub fn with_nameserver(nameserver: SocketAddr) -> Self {
        Self {
            resolver: Arc::default(),
            nameserver: Some(nameserver),
        }
    }

    fn resolver(&self) -> io::Result<&TokioResolver> {
        self.resolver
            .get_or_init(|| {
                let builder = match self.nameserver {
                    Some(ns) => {
                        let mut udp = ConnectionConfig::udp();
                        udp.port = ns.port();
                        let config =
                            ResolverConfig::from_name_servers(vec![NameServerConfig::new(
                                ns.ip(),
                                true,
                                vec![udp],
                            )]);
                        TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
                    }
                    None => TokioResolver::builder_tokio()
                        .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?,
                };
                builder.build().map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| io::Error::other(e.clone()))
    }

    /// The addresses of `host:port` (`[v6]:port` too), IPv4 first.
    pub async fn resolve(&self, host_port: &str) -> io::Result<Vec<SocketAddr>> {
        let (host, port) = host_port
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| io::Error::other(format!("{host_port:?} is not host:port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let lookup = self
            .resolver()?
            .lookup_ip(host)
            .await
            .map_err(|e| io::Error::other(format!("cannot resolve {host}: {e}")))?;
        let mut addrs: Vec<SocketAddr> =
            lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
        addrs.sort_by_key(|a| a.is_ipv6());
        if addrs.is_empty() {
            return Err(io::Error::other(format!("{host} resolves to nothing")));
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };

    /// A DNS server answering every A question with 10.0.0.<n> (n counts
    /// the A questions it got) and TTL 1 s; other questions get no answer.
    async fn dns_server() -> (SocketAddr, Arc<AtomicU32>) {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let asked = Arc::new(AtomicU32::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let query = &buf[..n];
                // The question: labels up to the root, then type and class.
                let mut end = 12;
                while end < n && query[end] != 0 {
                    end += usize::from(query[end]) + 1;
                }
                let question = &query[12..end + 5];
                let qtype = u16::from_be_bytes([query[end + 1], query[end + 2]]);
                let a = qtype == 1;
                let mut answer = query[..2].to_vec(); // the query's id
                answer.extend([0x81, 0x80, 0, 1, 0, u8::from(a), 0, 0, 0, 0]);
                answer.extend_from_slice(question);
                if a {
                    let k = count.fetch_add(1, Ordering::SeqCst) + 1;
                    // Name (pointer to the question), A, IN, TTL 1, 4 bytes.
                    answer.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 10, 0, 0, k as u8]);
                }
                let _ = socket.send_to(&answer, from).await;
            }
        });
        (addr, asked)
    }

    #[tokio::test]
    async fn names_are_resolved_again_when_their_ttl_runs_out() {
        let (server, asked) = dns_server().await;
        let dns = Dns::with_nameserver(server);
        let first = dns.resolve("gw.east.example:4143").await.unwrap();
        assert_eq!(first, ["10.0.0.1:4143".parse().unwrap()]);
        // Within the TTL the cached answer serves, without asking again.
        let again = dns.resolve("gw.east.example:4143").await.unwrap();
        assert_eq!(again, first);
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // After it, the name is resolved again and the new address used.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let later = dns.resolve("gw.east.example:4143").await.unwrap();
        assert_eq!(later, ["10.0.0.2:4143".parse().unwrap()]);
        assert_eq!(asked.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn literals_need_no_resolver_and_bad_addresses_say_why() {
        let dns = Dns::system();
        assert_eq!(
            dns.resolve("127.0.0.2:4143").await.unwrap(),
            ["127.0.0.2:4143".parse().unwrap()]
        );
        assert_eq!(
            dns.resolve("[::1]:4143").await.unwrap(),
            ["[::1]:4143".parse().unwrap()]
        );
        assert!(dns.resolver.get().is_none(), "no resolver was built");
        let e = dns.resolve("gw.example").await.unwrap_err();
        assert!(e.to_string().contains("not host:port"), "{e}");
    }
}
