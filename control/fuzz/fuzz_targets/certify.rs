//! Arbitrary bytes as a Certify request, through the real handler: token
//! lookup in a real store, rate limit, CSR check and signing. It must never
//! panic, and whatever it issues must be exactly the identity asked for and
//! the caller was entitled to.
#![no_main]

use std::{
    sync::{Arc, OnceLock, RwLock},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use mesh_control::{
    admin_socket::create_token, certify::IdentityService, metrics::Metrics, ratelimit::RateLimiter,
    store::LocalStore,
};
use mesh_core::{
    api::v1::CertifyRequest,
    grpc::PeerInfo,
    identity::{
        BundleStore, CertificateAuthority, RootCa, SpiffeId, TrustBundle, TrustBundleSet,
        cert::{CertInfo, now},
        svid::leaf_spiffe_id,
    },
};
use prost::Message;

const ID: &str = "spiffe://fuzz.mesh.local/ns/a/sa/b";

struct World {
    runtime: tokio::runtime::Runtime,
    service: IdentityService,
    token: String,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        mesh_core::crypto::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let root = RootCa::generate(Duration::from_secs(86_400 * 365), now()).unwrap();
        let td = "fuzz.mesh.local".parse().unwrap();
        let ca = CertificateAuthority::generate(td, &root, Duration::from_secs(86_400 * 30), now()).unwrap();
        let bundle = TrustBundle::with_roots(ca.trust_domain().clone(), [root.cert().clone()]).unwrap();
        let store = Arc::new(LocalStore::open(dir.path()).unwrap());
        // Long-lived and never consumed unless a fuzzed CSR verifies.
        let token = create_token(store.as_ref(), "a", "b", Duration::from_secs(86_400 * 7), now().unix_timestamp(), None)
            .unwrap()
            .0;
        let service = IdentityService {
            trust_domain: ca.trust_domain().clone(),
            ca: Arc::new(RwLock::new(Arc::new(ca))),
            bundles: BundleStore::new([bundle].into_iter().collect::<TrustBundleSet>()),
            store,
            limiter: Arc::new(RateLimiter::new(u32::MAX, 1e9)),
            metrics: Metrics::new(),
            leaf_ttl: Duration::from_secs(3600),
            reviewer: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        World { runtime, service, token, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let (mode, rest) = data.split_first().unwrap_or((&0, data));
    // Either a whole fuzzed protobuf request, or fuzzed CSR bytes with a
    // real token or a real renewal peer.
    let request = match mode % 3 {
        0 => match CertifyRequest::decode(rest) {
            Ok(r) => r,
            Err(_) => return,
        },
        1 => CertifyRequest { identity: ID.into(), csr: rest.to_vec(), token: w.token.clone(), ttl_seconds: 0 },
        _ => CertifyRequest { identity: ID.into(), csr: rest.to_vec(), token: String::new(), ttl_seconds: 0 },
    };
    let peer = (mode % 3 == 2).then(|| PeerInfo {
        remote: "127.0.0.1:1".parse().unwrap(),
        identity: Some(SpiffeId::parse(ID).unwrap()),
    });
    let asked = request.identity.clone();
    if let Ok(resp) = w.runtime.block_on(w.service.handle(peer.as_ref(), request)) {
        let leaf = CertInfo::parse(&resp.chain[0]).expect("issued leaves parse");
        let id = leaf_spiffe_id(&leaf).expect("issued leaves are SVIDs");
        assert_eq!(id.as_str(), asked, "issued exactly the identity asked for");
        assert_eq!(id.as_str(), ID, "and only one the caller was entitled to");
    }
});
