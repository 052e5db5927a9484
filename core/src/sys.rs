//! The one module with `unsafe` code (STYLE.md, rule 11): calls into the C
//! library that no kept crate wraps. Each call says why it is sound.
#![allow(unsafe_code)]

/// Asks the C allocator to give the free pages of every arena back to the
/// kernel, and says whether it gave any.
///
/// glibc returns freed memory by itself only from the top of each arena, so
/// after a burst of connections closes, the pages freed below a long-lived
/// allocation stay resident. `malloc_trim(0)` also releases those (with
/// `MADV_DONTNEED`). Live allocations are untouched. It walks and locks each
/// arena in turn, so call it off the async workers and not per request.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() -> bool {
    // SAFETY: `malloc_trim` takes no pointer and touches no memory of ours;
    // glibc documents it as MT-Safe (it takes each arena's lock while it
    // walks that arena).
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other C libraries (musl) return free memory themselves or have no such
/// call: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}
