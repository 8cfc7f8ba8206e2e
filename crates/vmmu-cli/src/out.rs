//! The command's input and output files: standard output whose write errors are returned
//! (not the panics of `print!`), a check that an output path can be written before a long
//! run, and input files read with a size cap.
//!
//! A write to a closed pipe (`vmmu run --trace events | head -1`) fails with
//! [`std::io::ErrorKind::BrokenPipe`]: Rust ignores SIGPIPE, so the process is not killed and
//! `print!` would panic. The command ends quietly then ([`is_broken_pipe`]); any other write
//! error (ENOSPC on `> /dev/full`) is reported with exit status 1.

use std::io::{self, Read, Write};
use std::path::Path;

/// Largest scenario or grid file read (16 MiB): a scenario is a few KiB of TOML, and a
/// device or a FIFO (`vmmu run /dev/zero`) must not be read forever.
pub const MAX_INPUT_BYTES: u64 = 16 << 20;

/// Writes `text` to standard output and flushes it, returning the write's error.
pub fn write_out(text: &str) -> io::Result<()> {
    let mut o = io::stdout().lock();
    o.write_all(text.as_bytes())?;
    o.flush()
}

/// Whether `e` or an error in its source chain is a write to a closed pipe (EPIPE).
pub fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe) {
            return true;
        }
        cur = x.source();
    }
    false
}

/// Reads a text input file of at most `limit` bytes. The error is one line naming the file
/// and, for a file that is too large (or a device that never ends), the limit.
pub fn read_text(path: &Path, limit: u64) -> Result<String, String> {
    let shown = path.display();
    let f = std::fs::File::open(path).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    if buf.len() as u64 > limit {
        return Err(format!(
            "{shown}: larger than the {} MiB limit for this input (is it the right file?)",
            limit >> 20
        ));
    }
    String::from_utf8(buf).map_err(|e| format!("{shown}: not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
}

/// Checks, before a run, that `path` can be created or overwritten as an output file, so a
/// long run does not end with "cannot write". A file that does not exist yet is created and
/// removed again; an existing one is opened for writing without truncating it.
pub fn check_writable(path: &Path) -> Result<(), String> {
    let shown = path.display();
    if path.is_dir() {
        return Err(format!("{shown}: is a directory"));
    }
    if path.exists() {
        return std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map(drop)
            .map_err(|e| format!("{shown}: cannot write: {e}"));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("{shown}: cannot create: {e}"))?;
    std::fs::remove_file(path).map_err(|e| format!("{shown}: cannot remove the probe file: {e}"))
}

/// Checks, before a run, that the directory `dir` exists or can be created and that files
/// can be created in it.
pub fn check_writable_dir(dir: &Path) -> Result<(), String> {
    let shown = dir.display();
    std::fs::create_dir_all(dir).map_err(|e| format!("{shown}: cannot create the directory: {e}"))?;
    check_writable(&dir.join(format!(".vmmu-write-check-{}", std::process::id())))
        .map_err(|e| format!("{shown}: cannot write into the directory ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_pipe_is_found_through_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("writing: {0}")]
        struct Outer(#[source] io::Error);
        let e = Outer(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(is_broken_pipe(&e));
        let e = Outer(io::Error::from(io::ErrorKind::StorageFull));
        assert!(!is_broken_pipe(&e));
    }

    #[test]
    fn inputs_are_capped_and_outputs_probed() {
        let dir = std::env::temp_dir().join(format!("vmmu-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("big.toml");
        std::fs::write(&f, "x".repeat(100)).unwrap();
        assert_eq!(read_text(&f, 100).unwrap().len(), 100);
        let e = read_text(&f, 99).unwrap_err();
        assert!(e.contains("limit"), "{e}");
        let e = read_text(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.contains("1 MiB limit"), "{e}");

        let new = dir.join("new.svg");
        check_writable(&new).unwrap();
        assert!(!new.exists(), "the probe is removed");
        check_writable(&f).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap().len(), 100, "not truncated");
        assert!(check_writable(&dir).unwrap_err().contains("is a directory"));
        assert!(check_writable(&dir.join("no/such/dir/x.svg")).unwrap_err().contains("cannot create"));
        check_writable_dir(&dir.join("sub")).unwrap();
        assert!(check_writable_dir(&f.join("sub")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
