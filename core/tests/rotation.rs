//! Credential rotation: swapping the server's SVID leaves open connections
//! working and gives new handshakes the new certificate.

mod support;

use std::sync::Arc;

use mesh_core::identity::{
    ExpectedIdentity,
    cert::CertInfo,
    tls::{TlsError, client_config, server_config},
};
use rustls::pki_types::ServerName;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The serial of the certificate the server presented on this connection.
fn server_serial(conn: &rustls::ClientConnection) -> String {
    let leaf = &conn.peer_certificates().unwrap()[0];
    CertInfo::parse(leaf).unwrap().serial
}

#[tokio::test]
async fn rotation_keeps_open_connections_and_serves_new_cert() {
    let west = Domain::new("west.mesh.local");
    let bundles = bundles(&[&west]);
    let first = west.creds("/ns/shop/sa/api");
    let first_serial = first.info().serial.clone();
    let store = creds_store(first);

    let server = server_config(
        store.clone(),
        bundles.clone(),
        ExpectedIdentity::trust_domain(west.td.clone()),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    // An echo server that serves every connection until it closes.
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let mut buf = [0u8; 64];
                loop {
                    let n = tls.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    tls.write_all(&buf[..n]).await.unwrap();
                }
            });
        }
    });

    let client = Arc::new(
        client_config(
            creds_store(west.creds("/ns/shop/sa/web")),
            bundles,
            ExpectedIdentity::Exact(west.id("/ns/shop/sa/api")),
        )
        .unwrap(),
    );
    let connect = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        TlsConnector::from(client.clone())
            .connect(ServerName::try_from("mesh.local").unwrap(), tcp)
            .await
            .unwrap()
    };
    async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
        tls.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    }

    let mut old_conn = connect().await;
    echo(&mut old_conn, b"before rotation").await;
    assert_eq!(server_serial(old_conn.get_ref().1), first_serial);

    // Renew: same identity, new key and certificate.
    let renewed = west.creds("/ns/shop/sa/api");
    let new_serial = renewed.info().serial.clone();
    assert_ne!(new_serial, first_serial);
    store.rotate(renewed).unwrap();

    echo(&mut old_conn, b"after rotation, same connection").await;
    let mut new_conn = connect().await;
    echo(&mut new_conn, b"new connection").await;
    assert_eq!(
        server_serial(new_conn.get_ref().1),
        new_serial,
        "new handshakes get the new certificate"
    );
    echo(&mut old_conn, b"old connection still alive").await;

    // An identity never changes in place.
    let err = store.rotate(west.creds("/ns/shop/sa/other")).unwrap_err();
    assert!(matches!(err, TlsError::IdentityChanged { .. }), "{err}");
    assert_eq!(store.current().info().serial, new_serial);
}
