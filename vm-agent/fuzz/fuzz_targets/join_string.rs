//! A join string, from arbitrary bytes (what a user pastes): never a
//! panic; one that decodes passes every check, and encodes to a string that
//! decodes to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_vm_agent::JoinString;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(js) = JoinString::decode(text) {
        js.check().expect("a decoded join string passes its checks");
        assert_eq!(JoinString::decode(&js.encode()).expect("re-encoded decodes"), js);
    }
});
