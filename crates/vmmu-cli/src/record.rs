//! `vmmu record` and `vmmu convert`: real programs' memory traces into vmmu's binary trace
//! format.
//!
//! `record` runs the program under valgrind's lackey tool (`--trace-mem=yes`) with lackey's
//! output on a pipe of its own (`--log-fd`), so the program keeps its stdout and stderr, and
//! converts the text to the binary format line by line as it arrives: neither the text nor
//! the trace is ever held whole. `convert` does the same for a lackey log saved to a file, or
//! reads a ChampSim trace (`.xz` ones through `xz -dc`).

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use vmmu_guest::replay::champsim::{ChampSimError, ChampSimReader, XZ_MAGIC};
use vmmu_guest::replay::format::FormatError;
use vmmu_guest::replay::lackey::{self, LackeyError};
use vmmu_guest::replay::{TraceSummary, TraceWriter};

/// Recording and conversion failures.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// valgrind is not installed.
    #[error(
        "valgrind not found (looked for `{0}`): `vmmu record` runs the program under valgrind's \
         lackey tool; install valgrind (e.g. `apt-get install valgrind`) or set VMMU_VALGRIND"
    )]
    ValgrindMissing(String),
    /// No program given.
    #[error("no program to record: vmmu record [-o FILE] -- PROGRAM ARGS...")]
    NoProgram,
    /// valgrind ran but produced no trace (e.g. the program does not exist).
    #[error("valgrind exited with {0} and traced nothing (does the program exist and run?)")]
    NothingTraced(String),
    /// An I/O failure on a named file or pipe.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Bad lackey output.
    #[error(transparent)]
    Lackey(#[from] LackeyError),
    /// Bad ChampSim input.
    #[error(transparent)]
    ChampSim(#[from] ChampSimError),
    /// Writing the trace failed.
    #[error("writing the trace: {0}")]
    Format(#[from] FormatError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RecordError {
    let what = what.into();
    move |source| RecordError::Io { what, source }
}

/// What a recording or conversion produced.
#[derive(Debug, Clone)]
pub struct RecordReport {
    /// The trace file (`-` for standard output).
    pub output: PathBuf,
    /// Records, kinds, distinct pages, bytes.
    pub summary: TraceSummary,
    /// Accesses left out at the start (`--skip`).
    pub skipped_records: u64,
    /// Stopped at `--limit` (the program was killed there).
    pub limited: bool,
    /// How valgrind (the program) exited, if it ran to the end.
    pub exit: Option<ExitStatus>,
}

impl RecordReport {
    /// The summary `vmmu record` prints.
    pub fn text(&self) -> String {
        let s = &self.summary;
        let [i, l, st, m] = s.by_kind;
        let mut out = format!(
            "trace {}: {} records (I {i}, L {l}, S {st}, M {m}), {} distinct pages ({:.1} MiB), {} bytes, {:.2} bytes/record\n",
            self.output.display(),
            s.counts.records,
            s.counts.distinct_pages,
            (s.counts.distinct_pages * 4096) as f64 / f64::from(1 << 20),
            s.bytes,
            s.bytes_per_record()
        );
        if self.skipped_records > 0 {
            out.push_str(&format!("the first {} accesses were left out (--skip)\n", self.skipped_records));
        }
        if self.limited {
            out.push_str("stopped at the record limit (the program was killed there)\n");
        } else if let Some(e) = self.exit.filter(|e| !e.success()) {
            out.push_str(&format!("the program exited with {e}\n"));
        }
        out
    }
}

/// Where a trace goes: a file (its header gets the counts) or standard output.
enum Sink {
    File(TraceWriter<BufWriter<File>>),
    Stdout(TraceWriter<BufWriter<std::io::Stdout>>),
}

impl Sink {
    fn open(path: &Path) -> Result<Sink, RecordError> {
        if path.as_os_str() == "-" {
            return Ok(Sink::Stdout(TraceWriter::new(BufWriter::new(std::io::stdout()))?));
        }
        let f = File::create(path).map_err(io(format!("creating {}", path.display())))?;
        Ok(Sink::File(TraceWriter::new(BufWriter::with_capacity(1 << 16, f))?))
    }

    fn finish(self) -> Result<TraceSummary, RecordError> {
        Ok(match self {
            Sink::File(w) => w.finish_seekable()?.1,
            Sink::Stdout(w) => w.finish()?.1,
        })
    }
}

/// The valgrind to run: `$VMMU_VALGRIND`, else `valgrind` on the PATH.
fn valgrind() -> Result<PathBuf, RecordError> {
    let name = std::env::var_os("VMMU_VALGRIND").unwrap_or_else(|| "valgrind".into());
    let p = PathBuf::from(&name);
    if p.components().count() > 1 {
        return if p.is_file() { Ok(p) } else { Err(RecordError::ValgrindMissing(p.display().to_string())) };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(&p))
        .find(|c| c.is_file())
        .ok_or_else(|| RecordError::ValgrindMissing(p.display().to_string()))
}

/// Whether valgrind can be found (tests skip when it cannot).
pub fn valgrind_available() -> bool {
    valgrind().is_ok()
}

/// Runs `program` under valgrind lackey and writes its accesses to `output`: the first
/// `skip` are left out (start-up), then at most `limit` records (the program is killed when
/// the limit is reached).
pub fn record(program: &[OsString], output: &Path, skip: u64, limit: Option<u64>) -> Result<RecordReport, RecordError> {
    let (prog, args) = program.split_first().ok_or(RecordError::NoProgram)?;
    let vg = valgrind()?;
    let (reader, writer) = std::io::pipe().map_err(io("creating the lackey pipe"))?;
    let fd = writer.as_raw_fd();
    let mut cmd = Command::new(&vg);
    cmd.arg("--tool=lackey").arg("--trace-mem=yes").arg(format!("--log-fd={fd}")).arg(prog).args(args);
    cmd.stdin(Stdio::inherit());
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl(2),
    // which is async-signal-safe; it touches no memory of the parent's.
    unsafe {
        cmd.pre_exec(move || {
            // The pipe is close-on-exec; the child's copy must survive into valgrind.
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut sink = Sink::open(output)?;
    let child = cmd.spawn().map_err(io(format!("running {}", vg.display())))?;
    drop(cmd);
    drop(writer);
    let mut child = KillOnDrop(Some(child));
    let input = BufReader::with_capacity(1 << 16, reader);
    let st = match &mut sink {
        Sink::File(w) => lackey::convert(input, w, skip, limit)?,
        Sink::Stdout(w) => lackey::convert(input, w, skip, limit)?,
    };
    let exit = if st.limited {
        child.kill();
        None
    } else {
        Some(child.wait().map_err(io("waiting for valgrind"))?)
    };
    let summary = sink.finish()?;
    if summary.counts.records == 0 {
        if output.as_os_str() != "-" {
            let _ = std::fs::remove_file(output);
        }
        let how = exit.map_or_else(|| "no status".to_string(), |e| e.to_string());
        return Err(RecordError::NothingTraced(how));
    }
    Ok(RecordReport {
        output: output.to_path_buf(),
        summary,
        skipped_records: st.skipped_records,
        limited: st.limited,
        exit,
    })
}

/// Kills and reaps the child if it is still running when dropped (an error mid-recording).
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self.0.take() {
            Some(mut c) => c.wait(),
            None => Err(std::io::Error::other("child already reaped")),
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The formats `convert` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// valgrind lackey `--trace-mem=yes` text.
    Lackey,
    /// ChampSim binary trace (raw, or xz-compressed).
    ChampSim,
}

/// Converts a lackey log or a ChampSim trace file to vmmu's format.
pub fn convert(
    from: InputFormat,
    input: &Path,
    output: &Path,
    limit: Option<u64>,
) -> Result<RecordReport, RecordError> {
    let mut f = File::open(input).map_err(io(format!("opening {}", input.display())))?;
    let mut magic = [0u8; 6];
    let n = f.read(&mut magic).map_err(io(format!("reading {}", input.display())))?;
    drop(f);
    let mut xz = None;
    let raw: Box<dyn BufRead> = if n == 6 && magic == XZ_MAGIC {
        let mut c = Command::new("xz")
            .arg("-dc")
            .arg(input)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(io(format!("running `xz -dc {}` (is xz installed?)", input.display())))?;
        let out = c.stdout.take().ok_or_else(|| RecordError::Io {
            what: "xz -dc".into(),
            source: std::io::Error::other("no stdout pipe"),
        })?;
        xz = Some(KillOnDrop(Some(c)));
        Box::new(BufReader::with_capacity(1 << 16, out))
    } else {
        let f = File::open(input).map_err(io(format!("opening {}", input.display())))?;
        Box::new(BufReader::with_capacity(1 << 16, f))
    };
    let mut sink = Sink::open(output)?;
    let mut limited = false;
    match from {
        InputFormat::Lackey => {
            let st = match &mut sink {
                Sink::File(w) => lackey::convert(raw, w, 0, limit)?,
                Sink::Stdout(w) => lackey::convert(raw, w, 0, limit)?,
            };
            limited = st.limited;
        }
        InputFormat::ChampSim => {
            for (i, r) in ChampSimReader::new(raw).enumerate() {
                if limit.is_some_and(|l| i as u64 >= l) {
                    limited = true;
                    break;
                }
                let r = r?;
                match &mut sink {
                    Sink::File(w) => w.write(r)?,
                    Sink::Stdout(w) => w.write(r)?,
                }
            }
        }
    }
    if let Some(mut c) = xz {
        if limited {
            c.kill();
        } else {
            let st = c.wait().map_err(io("waiting for xz"))?;
            if !st.success() {
                return Err(RecordError::Io {
                    what: format!("xz -dc {}", input.display()),
                    source: std::io::Error::other(format!("exited with {st}")),
                });
            }
        }
    }
    let summary = sink.finish()?;
    Ok(RecordReport { output: output.to_path_buf(), summary, skipped_records: 0, limited, exit: None })
}
