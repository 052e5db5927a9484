//! The tunnel over QUIC (UDP, same port as the TCP tunnel), with the same
//! checks: the caller's certificate in the QUIC handshake (TLS 1.3, ALPN
//! `mesh-tunnel/quic`), then per bidirectional stream a small header
//! naming the target, answered with a status, then raw bytes spliced to
//! the destination proxy (the caller's own mTLS session with it rides
//! inside; the gateway never decrypts it).
//!
//! Header: the target's length as 2 bytes big endian (1 to
//! [`MAX_TARGET`]), then the target (`<svc>.<ns>.svc.<domain>:<port>` or a
//! reserved target) in UTF-8. Answer: the status as 2 bytes big endian
//! (200 spliced; otherwise the TCP tunnel's refusal statuses, then the
//! stream ends).

use std::{sync::Arc, time::Duration};

use mesh_core::identity::{SpiffeId, cert::CertInfo, svid::leaf_spiffe_id};
use rustls::pki_types::CertificateDer;

use crate::{
    metrics::PeerLabels,
    tunnel::{PROBE_TARGET, Tunnel},
};

/// The header format, its parser and its encoder live with the client
/// (`mesh_proxy::outbound::tunnel`); the gateway parses what it sends.
pub use mesh_proxy::outbound::tunnel::{
    ALPN_QUIC, HeaderError, MAX_TARGET, encode_header, parse_header,
};

const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves QUIC tunnel connections until the task is dropped (which drops
/// every open connection).
pub async fn accept(endpoint: quinn::Endpoint, tunnel: Arc<Tunnel>) {
    let mut connections = tokio::task::JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        while connections.try_join_next().is_some() {}
        let tunnel = tunnel.clone();
        connections.spawn(async move {
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tunnel
                        .metrics
                        .tls_refused
                        .get_or_create(&crate::metrics::ReasonLabels {
                            reason: "quic_handshake",
                        })
                        .inc();
                    tracing::info!(error = %e, "QUIC tunnel handshake refused");
                    return;
                }
            };
            let Some(caller) = caller(&conn) else {
                conn.close(1u32.into(), b"no verified identity");
                return;
            };
            let td = caller.trust_domain();
            if td == tunnel.trust_domain {
                tunnel.metrics.refuse("same_trust_domain", td.as_str());
                conn.close(
                    2u32.into(),
                    b"callers of this cluster do not use its gateway",
                );
                return;
            }
            let labels = PeerLabels {
                peer_trust_domain: td.to_string(),
                transport: "quic",
            };
            tunnel.metrics.tunnels.get_or_create(&labels).inc();
            let open = tunnel.metrics.tunnels_open.get_or_create(&labels).clone();
            open.inc();
            let mut streams = tokio::task::JoinSet::new();
            while let Ok((send, recv)) = conn.accept_bi().await {
                while streams.try_join_next().is_some() {}
                streams.spawn(stream(tunnel.clone(), caller.clone(), send, recv));
            }
            open.dec();
        });
    }
}

/// The verified peer's SPIFFE ID (rustls verified the chain already).
fn caller(conn: &quinn::Connection) -> Option<SpiffeId> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    leaf_spiffe_id(&CertInfo::parse(chain.first()?).ok()?).ok()
}

async fn stream(
    tunnel: Arc<Tunnel>,
    caller: SpiffeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let td = caller.trust_domain().to_string();
    let target = match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut recv)).await {
        Ok(Ok(target)) => target,
        Ok(Err(e)) => {
            tunnel.metrics.refuse("bad_header", &td);
            tracing::info!(%caller, "QUIC tunnel stream refused: {e}");
            let _ = answer(&mut send, 400).await;
            return;
        }
        Err(_) => {
            tunnel.metrics.refuse("header_timeout", &td);
            return;
        }
    };
    if target == PROBE_TARGET {
        let _ = answer(&mut send, tunnel.probe_status().as_u16()).await;
        return;
    }
    let upstream = match tunnel.open(&target).await {
        Ok(upstream) => upstream,
        Err(refusal) => {
            let code = tunnel.refused(Some(&caller), &refusal, "quic");
            let _ = answer(&mut send, code.as_u16()).await;
            return;
        }
    };
    if answer(&mut send, 200).await.is_err() {
        return;
    }
    tunnel
        .splice(Some(&caller), "quic", tokio::io::join(recv, send), upstream)
        .await;
}

async fn answer(send: &mut quinn::SendStream, status: u16) -> std::io::Result<()> {
    send.write_all(&status.to_be_bytes()).await?;
    if status != 200 {
        let _ = send.finish();
    }
    Ok(())
}

/// Reads exactly one header, no byte more (the rest is the caller's).
async fn read_header(recv: &mut quinn::RecvStream) -> Result<String, String> {
    let mut buf = Vec::with_capacity(64);
    loop {
        match parse_header(&buf) {
            Ok(Some((target, _))) => return Ok(target.to_owned()),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        // Read only as many bytes as the header still needs.
        let want = if buf.len() < 2 {
            2 - buf.len()
        } else {
            2 + usize::from(u16::from_be_bytes([buf[0], buf[1]])) - buf.len()
        };
        let mut chunk = vec![0u8; want];
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(None) => return Err("the stream ended inside its header".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_named() {
        let h = encode_header("api.shop.svc.cluster.local:8080").unwrap();
        assert_eq!(
            parse_header(&h).unwrap(),
            Some(("api.shop.svc.cluster.local:8080", h.len()))
        );
        for n in 0..h.len() {
            assert_eq!(parse_header(&h[..n]).unwrap(), None, "prefix of {n}");
        }
        let mut more = h.clone();
        more.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            parse_header(&more).unwrap().unwrap().1,
            h.len(),
            "stops at the header"
        );
        assert_eq!(parse_header(&[0, 0]), Err(HeaderError::Empty));
        assert_eq!(parse_header(&[0x02, 0x01]), Err(HeaderError::TooLong(513)));
        assert_eq!(parse_header(&[0, 2, 0xff, 0xfe]), Err(HeaderError::NotUtf8));
        assert!(encode_header(&"a".repeat(513)).is_err());
    }
}
