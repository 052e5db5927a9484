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

/// Drops this process's resident pages of `code` (`MADV_DONTNEED`); they
/// come back from the page cache when next run. See
/// [`crate::code_pages`].
#[cfg(target_os = "linux")]
pub fn forget_code_pages(code: &crate::code_pages::Code) -> std::io::Result<()> {
    for range in code.ranges() {
        // SAFETY: `Code` holds only page-aligned ranges that
        // `/proc/self/maps` lists as read-only, executable, private mappings
        // of this process's own executable file, and an executable is never
        // unmapped while it runs. Nothing writes those pages (Rust binaries
        // carry no text relocations), so each is an unmodified copy of the
        // file: dropping it loses no data, and the next instruction fetch
        // from it faults it back in from the file. No Rust reference points
        // into code pages, so no reference is invalidated.
        let rc = unsafe {
            libc::madvise(
                range.start as *mut libc::c_void,
                range.end - range.start,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Only Linux has `/proc/self/maps`; nothing to drop elsewhere.
#[cfg(not(target_os = "linux"))]
pub fn forget_code_pages(_code: &crate::code_pages::Code) -> std::io::Result<()> {
    Ok(())
}
