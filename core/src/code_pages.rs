//! Giving back the resident pages of code that ran only to start.
//!
//! A proxy's resident set after start is mostly its own code, not its heap:
//! issue 18 measured 11.2 MiB resident of which 9.2 MiB were pages of the
//! executable and libc, and 2 MiB anonymous. Most of that code ran once
//! (configuration, the first certificate, the control plane's clients) and
//! never runs again, but a mapped page stays in the resident set until the
//! process exits, and the kernel keeps mapped executable pages in memory in
//! preference to others.
//!
//! [`release_startup_code`] drops this process's mappings of its own code
//! pages once, when the proxy is ready. Nothing is lost: the pages are clean
//! copies of the file, still in the page cache (shared by every process that
//! runs the same binary), and the code that runs again faults its pages back
//! in on first use, a minor fault each. What stays resident is then the code
//! the proxy actually serves with.
//!
//! Only the executable's read-only, executable, private mappings qualify.
//! Its read-only data is left alone on purpose: part of it is the relocated
//! RELRO segment, whose pages differ from the file, and dropping those would
//! lose the relocations.

use std::{io, ops::Range};

/// Bound on what is read from `/proc/self/maps`: a proxy maps a few hundred
/// regions, far below this.
const MAPS_LIMIT: u64 = 4 << 20;

/// Bound on the executable's code mappings kept: an ELF binary has one or two
/// executable segments.
const MAX_RANGES: usize = 16;

/// The executable's own code as this process maps it: read-only, executable,
/// private mappings of the file that holds this function. Only
/// [`Code::of_this_process`] makes one, so a range in it is always such a
/// mapping (what [`crate::sys::forget_code_pages`] relies on).
#[derive(Debug, PartialEq, Eq)]
pub struct Code {
    ranges: Vec<Range<usize>>,
}

/// Why the code mappings could not be found.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("reading /proc/self/maps: {0}")]
    Read(#[from] io::Error),
    #[error(
        "/proc/self/maps has no read-only executable file mapping at {anchor:#x}, \
         where this process's code is; nothing was released"
    )]
    NotFound { anchor: usize },
}

impl Code {
    /// Finds the executable's code mappings in `/proc/self/maps`. The file
    /// is picked by the mapping that holds this function's own code, not
    /// by the path or inode of `/proc/self/exe`: on overlayfs (every
    /// container) `stat` and the maps disagree on both.
    pub fn of_this_process() -> Result<Self, CodeError> {
        use std::io::Read;
        let mut maps = String::new();
        std::fs::File::open("/proc/self/maps")?
            .take(MAPS_LIMIT)
            .read_to_string(&mut maps)?;
        let anchor = Self::of_this_process as fn() -> Result<Self, CodeError> as usize;
        Self::from_maps(&maps, anchor).ok_or(CodeError::NotFound { anchor })
    }

    /// The mappings in `maps` (the format of `/proc/<pid>/maps`) of the file
    /// whose code mapping holds `anchor`; `None` when no read-only,
    /// executable, private file mapping holds it. Lines that do not parse are
    /// skipped.
    fn from_maps(maps: &str, anchor: usize) -> Option<Self> {
        let mappings: Vec<Mapping<'_>> = maps.lines().filter_map(Mapping::parse).collect();
        let home = mappings
            .iter()
            .find(|m| m.is_code() && m.range.contains(&anchor))?;
        let ranges: Vec<Range<usize>> = mappings
            .iter()
            .filter(|m| m.is_code() && m.file == home.file)
            .map(|m| m.range.clone())
            .take(MAX_RANGES)
            .collect();
        Some(Self { ranges })
    }

    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Bytes of address space the mappings cover (resident or not).
    pub fn len(&self) -> usize {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// Drops this process's resident pages of its own code (see the module
/// docs) and says how many bytes of code mappings that covered. Call it
/// once, when start-up is over.
pub fn release_startup_code() -> Result<usize, CodeError> {
    let code = Code::of_this_process()?;
    crate::sys::forget_code_pages(&code)?;
    Ok(code.len())
}

/// One line of `/proc/<pid>/maps`.
#[derive(Debug)]
struct Mapping<'a> {
    range: Range<usize>,
    perms: &'a str,
    /// Device, inode and path, as the kernel printed them.
    file: (&'a str, u64, &'a str),
}

/// The smallest page size: the kernel prints page-aligned ranges, and a
/// range that is not aligned to this did not come from it.
const PAGE: usize = 4096;

impl<'a> Mapping<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        let perms = fields.next()?;
        let _offset = fields.next()?;
        let device = fields.next()?;
        let inode: u64 = fields.next()?.parse().ok()?;
        // The path is the rest of the line and may hold spaces.
        let path = fields.next().map_or("", |first| {
            let at = first.as_ptr() as usize - line.as_ptr() as usize;
            &line[at..]
        });
        let aligned = start % PAGE == 0 && end % PAGE == 0 && start < end;
        aligned.then_some(Self {
            range: start..end,
            perms,
            file: (device, inode, path),
        })
    }

    /// Read-only, executable, private, and backed by a file.
    fn is_code(&self) -> bool {
        self.perms == "r-xp" && self.file.1 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::Code;

    const MAPS: &str = "\
5581a2c00000-5581a3000000 r--p 00000000 00:2a 1311 /usr/local/bin/mesh proxy
5581a3000000-5581a3a00000 r-xp 00400000 00:2a 1311 /usr/local/bin/mesh proxy
5581a3a00000-5581a3b00000 r--p 00e00000 00:2a 1311 /usr/local/bin/mesh proxy
5581a3b00000-5581a3b10000 rw-p 00f00000 00:2a 1311 /usr/local/bin/mesh proxy
5581a3b10000-5581a3b20000 r-xp 00f10000 00:2a 1311 /usr/local/bin/mesh proxy
5581a4000000-5581a4100000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000200000 r-xp 00028000 fd:01 777 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000300000-7f0000301000 r-xp 00000000 00:00 0
7fff00000000-7fff00002000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn keeps_the_executable_code_mappings_of_the_file_that_holds_the_anchor() {
        let code = Code::from_maps(MAPS, 0x5581a3000000 + 0x1234).unwrap();
        assert_eq!(
            code.ranges(),
            [
                0x5581a3000000..0x5581a3a00000,
                0x5581a3b10000..0x5581a3b20000
            ]
        );
        assert_eq!(code.len(), 0xa00000 + 0x10000);
    }

    #[test]
    fn never_keeps_data_relro_heap_or_another_file() {
        // The read-only segments (one of them RELRO, relocated in memory),
        // the writable one, the heap, libc and anonymous code are all left.
        let code = Code::from_maps(MAPS, 0x5581a3000000).unwrap();
        for kept in code.ranges() {
            assert!(kept.start >= 0x5581a3000000 && kept.end <= 0x5581a3b20000);
            assert!(!(0x5581a3a00000..0x5581a3b10000).contains(&kept.start));
        }
        // Anchored in libc: only libc's code.
        let libc = Code::from_maps(MAPS, 0x7f0000000100).unwrap();
        assert_eq!(libc.ranges().len(), 1);
        assert_eq!(libc.ranges()[0], 0x7f0000000000..0x7f0000200000);
    }

    #[test]
    fn an_anchor_outside_file_backed_code_releases_nothing() {
        // In the heap, in read-only data, in anonymous code, in the vDSO,
        // or nowhere at all.
        for anchor in [
            0x5581a4000010,
            0x5581a3a00010,
            0x7f0000300010,
            0x7fff00000010,
            0x10,
        ] {
            assert_eq!(Code::from_maps(MAPS, anchor), None, "{anchor:#x}");
        }
    }

    #[test]
    fn lines_that_are_not_the_kernel_s_are_skipped() {
        let hostile = "\
garbage
5581a3000000-5581a3a00000
5581a3000000-5581a3a00000 r-xp 0 00:2a notanumber /x
5581a3000001-5581a3a00000 r-xp 0 00:2a 1311 /x
5581a3a00000-5581a3000000 r-xp 0 00:2a 1311 /x
zzzz-5581a3a00000 r-xp 0 00:2a 1311 /x
5581a3000000-5581a3a00000 r-xp 0 00:2a 1311 /x
";
        let code = Code::from_maps(hostile, 0x5581a3000010).unwrap();
        assert_eq!(code.ranges().len(), 1);
        assert_eq!(code.ranges()[0], 0x5581a3000000..0x5581a3a00000);
        assert_eq!(Code::from_maps("", 0x5581a3000010), None);
    }

    #[test]
    fn at_most_a_bounded_number_of_ranges_is_kept() {
        let many: String = (0..1000usize)
            .map(|i| {
                let start = 0x10000000 + i * 0x2000;
                format!("{start:x}-{:x} r-xp 0 00:2a 9 /bin/x\n", start + 0x1000)
            })
            .collect();
        let code = Code::from_maps(&many, 0x10000010).unwrap();
        assert_eq!(code.ranges().len(), super::MAX_RANGES);
    }
}
