//! The QUIC tunnel's stream header, from arbitrary bytes: never a panic;
//! a header that parses is exactly what encoding its target gives, and
//! nothing past it is consumed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_gateway::quic::{MAX_TARGET, encode_header, parse_header};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((target, used))) = parse_header(data) {
        assert!(used <= data.len());
        assert!(!target.is_empty() && target.len() <= MAX_TARGET);
        assert_eq!(encode_header(target).expect("a parsed target encodes"), &data[..used]);
    }
});
