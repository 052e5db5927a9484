//! `release_startup_code` on a real process (this test binary): the pages
//! of its own code leave the resident set, and the code keeps running.

use std::time::Duration;

use mesh_core::{
    code_pages::{Code, release_startup_code},
    identity::RootCa,
};
use time::OffsetDateTime;

/// KiB resident of the mappings that start where `code`'s ranges start, from
/// `/proc/self/smaps`: a header line per mapping (it starts with the range,
/// in lower-case hex), then lines such as `Rss:   1234 kB`.
fn resident_kib(code: &Code) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
    let starts: Vec<String> = code
        .ranges()
        .iter()
        .map(|r| format!("{:x}-", r.start))
        .collect();
    let mut counting = false;
    let mut total = 0;
    for line in smaps.lines() {
        if line.starts_with(|c: char| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
            counting = starts.iter().any(|s| line.starts_with(s.as_str()));
        } else if let Some(kib) = line.strip_prefix("Rss:")
            && counting
        {
            let kib = kib.trim().trim_end_matches("kB").trim();
            total += kib.parse::<u64>().expect("Rss in kB");
        }
    }
    total
}

#[test]
fn the_executable_s_code_pages_leave_the_resident_set_and_run_again() {
    let code = Code::of_this_process().expect("this test's code mappings");
    assert!(!code.is_empty());
    // Start-up work that will not run again: making a root CA runs key
    // generation, certificate encoding and signing.
    let root = RootCa::generate(Duration::from_secs(3600), OffsetDateTime::now_utc());
    assert!(root.is_ok());
    let before = resident_kib(&code);
    let covered = release_startup_code().expect("released");
    let after = resident_kib(&code);
    assert_eq!(covered, code.len());
    // What comes straight back (the smaps reader, this function) is a few
    // pages; the test harness's code that ran to start is gone.
    assert!(
        before >= 1024 && after * 2 < before,
        "the code's resident pages went from {before} KiB to only {after} KiB"
    );
    // The code runs again, its pages faulting back in from the file: the
    // same mappings are found, by code that had been dropped.
    assert_eq!(Code::of_this_process().expect("found again"), code);
    assert!(resident_kib(&code) > after);
}
