//! The command's input and output files: standard output whose write errors are returned
//! (not the panics of `print!`), a check that an output path can be written before a long
//! run, and input files read with a size cap.
//!
//! A write to a closed pipe (`vmmu run --trace events | head -1`) fails with
//! [`std::io::ErrorKind::BrokenPipe`]: Rust ignores SIGPIPE, so the process is not killed and
//! `print!` would panic. The command ends quietly then ([`is_broken_pipe`]); any other write
//! error (ENOSPC on `> /dev/full`) is reported with exit status 1.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

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

/// Why an input file cannot be read. Each message is one line naming the file; a variant
/// that wraps an underlying error carries it as its source and includes its text.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Opening or reading it failed.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It is larger than the limit (or a device that never ends).
    #[error("{}: larger than the {} MiB limit for this input (is it the right file?)", path.display(), limit >> 20)]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit, in bytes.
        limit: u64,
    },
    /// It is not UTF-8 text.
    #[error("{}: not UTF-8 text (byte {})", path.display(), source.valid_up_to())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Where the text stops being UTF-8.
        source: std::str::Utf8Error,
    },
}

/// Reads a text input file of at most `limit` bytes. The error is one line naming the file
/// and, for a file that is too large (or a device that never ends), the limit.
pub fn read_text(path: &Path, limit: u64) -> Result<String, InputError> {
    let read = |source| InputError::Read { path: path.to_owned(), source };
    let f = std::fs::File::open(path).map_err(read)?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).map_err(read)?;
    if buf.len() as u64 > limit {
        return Err(InputError::TooLarge { path: path.to_owned(), limit });
    }
    String::from_utf8(buf).map_err(|e| InputError::NotUtf8 { path: path.to_owned(), source: e.utf8_error() })
}

/// Why an output path cannot be written. Each message is one line naming the path; a variant
/// that wraps an underlying error carries it as its source and includes its text.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The path is a directory.
    #[error("{}: is a directory", path.display())]
    IsDir {
        /// The path.
        path: PathBuf,
    },
    /// The existing file cannot be opened for writing.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file cannot be created.
    #[error("{}: cannot create: {source}", path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The probe file made to check the path cannot be removed again.
    #[error("{}: cannot remove the probe file: {source}", path.display())]
    RemoveProbe {
        /// The probe file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The output directory cannot be created.
    #[error("{}: cannot create the directory: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No file can be created in the output directory.
    #[error("{}: cannot write into the directory ({source})", path.display())]
    DirNotWritable {
        /// The directory.
        path: PathBuf,
        /// Why the probe file could not be made.
        source: Box<OutputError>,
    },
}

/// Checks, before a run, that `path` can be created or overwritten as an output file, so a
/// long run does not end with "cannot write". A file that does not exist yet is created and
/// removed again; an existing one is opened for writing without truncating it.
pub fn check_writable(path: &Path) -> Result<(), OutputError> {
    let path_buf = || path.to_owned();
    if path.is_dir() {
        return Err(OutputError::IsDir { path: path_buf() });
    }
    if path.exists() {
        return std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map(drop)
            .map_err(|source| OutputError::Write { path: path_buf(), source });
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| OutputError::Create { path: path_buf(), source })?;
    std::fs::remove_file(path).map_err(|source| OutputError::RemoveProbe { path: path_buf(), source })
}

/// Checks, before a run, that the directory `dir` exists or can be created and that files
/// can be created in it.
pub fn check_writable_dir(dir: &Path) -> Result<(), OutputError> {
    std::fs::create_dir_all(dir).map_err(|source| OutputError::CreateDir { path: dir.to_owned(), source })?;
    check_writable(&dir.join(format!(".vmmu-write-check-{}", std::process::id())))
        .map_err(|e| OutputError::DirNotWritable { path: dir.to_owned(), source: Box::new(e) })
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
        let e = read_text(&f, 99).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
        let e = read_text(Path::new("/dev/zero"), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("1 MiB limit"), "{e}");

        let new = dir.join("new.svg");
        check_writable(&new).unwrap();
        assert!(!new.exists(), "the probe is removed");
        check_writable(&f).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap().len(), 100, "not truncated");
        assert!(check_writable(&dir).unwrap_err().to_string().contains("is a directory"));
        let e = check_writable(&dir.join("no/such/dir/x.svg")).unwrap_err();
        assert!(e.to_string().contains("cannot create"), "{e}");
        let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<io::Error>()).expect("the io::Error");
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
        assert_eq!(e.to_string().matches(&io.to_string()).count(), 1, "{e}");
        check_writable_dir(&dir.join("sub")).unwrap();
        assert!(check_writable_dir(&f.join("sub")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
