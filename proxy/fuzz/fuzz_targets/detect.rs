//! Protocol detection on arbitrary first bytes: never panics, decides once
//! it has seen `PEEK` bytes, and a decision never changes when more bytes
//! arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_proxy::detect::{PEEK, detect};

fuzz_target!(|data: &[u8]| {
    let seen = &data[..data.len().min(PEEK)];
    let verdict = detect(seen);
    if seen.len() == PEEK {
        assert!(verdict.is_some(), "{PEEK} bytes are always enough to decide");
    }
    if let Some(decided) = verdict {
        for more in seen.len()..data.len().min(PEEK) {
            assert_eq!(detect(&data[..=more]), Some(decided), "a decision is final");
        }
    }
});
