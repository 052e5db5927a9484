//! A linked cluster's Exports message, as arbitrary protobuf bytes, through
//! the service mirror's validation and serializer. Whatever arrives, the
//! file written must parse back as exactly the mirrors that were accepted:
//! MirroredServices of this link, nothing else.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mesh_control::resources::{Resource, parse::parse_file};
use mesh_core::api::v1::Exports;
use mesh_service_mirror::validate::{MIRROR_OF_LABEL, mirrors, render};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&alive, bytes)) = data.split_first() else {
        return;
    };
    let Ok(exports) = Exports::decode(bytes) else {
        return;
    };
    let td = "east.mesh.local".parse().unwrap();
    let (kept, _refused) = mirrors("east", &td, &exports, alive & 1 == 1);
    let text = render("east", &kept).expect("mirrors always serialize");
    let parsed = parse_file(Path::new("mirror-east.yaml"), &text)
        .unwrap_or_else(|e| panic!("the mirrors file does not parse: {e}\n{text}"));
    assert_eq!(parsed.len(), kept.len(), "{text}");
    for ((_, resource), mirror) in parsed.iter().zip(&kept) {
        let Resource::MirroredService(m) = resource else {
            panic!("not a MirroredService: {text}");
        };
        assert_eq!(m, mirror, "what is read back is what was written");
        assert_eq!(m.metadata.labels.get(MIRROR_OF_LABEL).map(String::as_str), Some("east"));
    }
});
