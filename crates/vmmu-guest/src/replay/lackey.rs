//! valgrind lackey's `--trace-mem=yes` output, parsed line by line into trace records.
//!
//! Lackey prints one access per line: `I  04015c8,3` (instruction fetch), ` L 1ffefff8a0,8`
//! (load), ` S ...` (store), ` M ...` (modify: load and store), addresses in hex. Valgrind's
//! own messages (`==pid== ...`, `--pid-- ...`, `**pid** ...`) are skipped.

use super::format::{FormatError, Kind, Record, TraceWriter};
use std::io::{BufRead, Read, Write};

/// Errors converting lackey output.
#[derive(Debug, thiserror::Error)]
pub enum LackeyError {
    /// Reading the input failed.
    #[error("reading lackey output: {0}")]
    Io(#[from] std::io::Error),
    /// A line is neither a lackey access nor a valgrind message.
    #[error("line {line}: not a lackey --trace-mem line: {text:?}")]
    BadLine {
        /// 1-based line number.
        line: u64,
        /// The line (cut to 80 characters).
        text: String,
    },
    /// A line longer than [`MAX_LINE`] (lackey's are about 25 bytes): not lackey output, or
    /// a stream without newlines that would otherwise be read into memory whole.
    #[error("line {line}: longer than {MAX_LINE} bytes: not lackey --trace-mem output")]
    LongLine {
        /// 1-based line number.
        line: u64,
    },
    /// Writing the trace failed.
    #[error(transparent)]
    Trace(#[from] FormatError),
}

/// Longest line [`convert`] reads (64 KiB: valgrind's own messages include the command line).
pub const MAX_LINE: usize = 64 << 10;

/// What a conversion read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LackeyStats {
    /// Lines read.
    pub lines: u64,
    /// Accesses converted.
    pub records: u64,
    /// Accesses left out at the start (`skip`).
    pub skipped_records: u64,
    /// Valgrind message lines and blank lines.
    pub messages: u64,
    /// Whether the conversion stopped at the record limit (more input was left).
    pub limited: bool,
}

fn hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0u64, |v, &c| Some(v << 4 | u64::from((c as char).to_digit(16)?)))
}

fn dec(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 9 {
        return None;
    }
    s.iter().try_fold(0u32, |v, &c| Some(v * 10 + (c as char).to_digit(10)?))
}

/// What a line of lackey output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// An access.
    Access(Record),
    /// A valgrind message or a blank line.
    Message,
    /// Neither.
    Invalid,
}

/// Parses one line.
pub fn parse_line(line: &[u8]) -> Line {
    parse_access(line).unwrap_or(Line::Invalid)
}

fn parse_access(line: &[u8]) -> Option<Line> {
    let t = line.trim_ascii();
    if t.is_empty() || t.starts_with(b"==") || t.starts_with(b"--") || t.starts_with(b"**") {
        return Some(Line::Message);
    }
    let kind = match t[0] {
        b'I' => Kind::Fetch,
        b'L' => Kind::Load,
        b'S' => Kind::Store,
        b'M' => Kind::Modify,
        _ => return None,
    };
    let rest = t[1..].trim_ascii_start();
    let comma = rest.iter().position(|&c| c == b',')?;
    let addr = hex(&rest[..comma])?;
    let size = dec(rest[comma + 1..].trim_ascii())?;
    Some(Line::Access(Record { kind, size, addr }))
}

/// Reads lackey output line by line (never all of it at once) and writes each access to
/// `out`, leaving out the first `skip` accesses (a program's start-up) and stopping after
/// `limit` records if given.
pub fn convert<R: BufRead, W: Write>(
    mut input: R,
    out: &mut TraceWriter<W>,
    skip: u64,
    limit: Option<u64>,
) -> Result<LackeyStats, LackeyError> {
    let mut st = LackeyStats::default();
    let mut line = Vec::with_capacity(64);
    loop {
        line.clear();
        if (&mut input).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)? == 0 {
            return Ok(st);
        }
        if line.len() > MAX_LINE {
            return Err(LackeyError::LongLine { line: st.lines + 1 });
        }
        if limit.is_some_and(|l| st.records >= l) {
            st.limited = true;
            return Ok(st);
        }
        st.lines += 1;
        match parse_line(&line) {
            Line::Access(_) if st.skipped_records < skip => st.skipped_records += 1,
            Line::Access(r) => {
                out.write(r)?;
                st.records += 1;
            }
            Line::Message => st.messages += 1,
            Line::Invalid => {
                let text = String::from_utf8_lossy(&line).trim_end().chars().take(80).collect();
                return Err(LackeyError::BadLine { line: st.lines, text });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::format::TraceReader;

    const SAMPLE: &str = "==12345== Lackey, an example Valgrind tool\n\
==12345== Command: /bin/true\n\
==12345== \n\
I  04001100,3\n\
 S 1ffefffd68,8\n\
I  04001103,5\n\
 L 04028e70,8\n\
 M 0402a0a8,4\n\
I  0400110d,15\n\
 L 1ffefffd70,32\n\
==12345== \n\
==12345== Counted 1 call to main()\n";

    #[test]
    fn parses_lackey_lines() {
        assert_eq!(
            parse_line(b"I  04001100,3\n"),
            Line::Access(Record { kind: Kind::Fetch, size: 3, addr: 0x4001100 })
        );
        assert_eq!(parse_line(b" M 0402a0a8,4"), Line::Access(Record { kind: Kind::Modify, size: 4, addr: 0x402a0a8 }));
        assert_eq!(parse_line(b"==1== hello"), Line::Message);
        assert_eq!(parse_line(b"--1-- warning"), Line::Message);
        assert_eq!(parse_line(b" X 1234,4"), Line::Invalid);
        assert_eq!(parse_line(b" L 12zz,4"), Line::Invalid);
        assert_eq!(parse_line(b" L 1234"), Line::Invalid);
    }

    #[test]
    fn converts_a_stream() {
        let mut w = TraceWriter::new(Vec::new()).unwrap();
        let st = convert(SAMPLE.as_bytes(), &mut w, 0, None).unwrap();
        assert_eq!((st.records, st.messages, st.limited), (7, 5, false));
        let (bytes, sum) = w.finish().unwrap();
        assert_eq!(sum.by_kind, [3, 2, 1, 1]);
        let recs: Vec<Record> = TraceReader::new(&bytes[..]).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(recs[1], Record { kind: Kind::Store, size: 8, addr: 0x1ffefffd68 });
        assert_eq!(recs[6], Record { kind: Kind::Load, size: 32, addr: 0x1ffefffd70 });

        let mut w = TraceWriter::new(Vec::new()).unwrap();
        let st = convert(SAMPLE.as_bytes(), &mut w, 0, Some(2)).unwrap();
        assert_eq!((st.records, st.limited), (2, true));
        let mut w = TraceWriter::new(Vec::new()).unwrap();
        let st = convert(SAMPLE.as_bytes(), &mut w, 5, Some(1)).unwrap();
        assert_eq!((st.skipped_records, st.records, st.limited), (5, 1, true));
        let (bytes, _) = w.finish().unwrap();
        let recs: Vec<Record> = TraceReader::new(&bytes[..]).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(recs, [Record { kind: Kind::Fetch, size: 15, addr: 0x400110d }]);

        let mut w = TraceWriter::new(Vec::new()).unwrap();
        let e = convert(&b"I  0400,3\nhello world\n"[..], &mut w, 0, None).unwrap_err();
        assert_eq!(e.to_string(), "line 2: not a lackey --trace-mem line: \"hello world\"");
        // A stream without newlines (`/dev/zero`) is refused at the line limit, not read whole.
        let mut w = TraceWriter::new(Vec::new()).unwrap();
        let e = convert(std::io::BufReader::new(std::io::repeat(0)), &mut w, 0, None).unwrap_err();
        assert_eq!(e.to_string(), format!("line 1: longer than {MAX_LINE} bytes: not lackey --trace-mem output"));
        // A line of exactly the limit is still read.
        let mut long = vec![b'='; MAX_LINE - 1];
        long.push(b'\n');
        let mut w = TraceWriter::new(Vec::new()).unwrap();
        assert_eq!(convert(&long[..], &mut w, 0, None).unwrap().messages, 1);
    }
}
