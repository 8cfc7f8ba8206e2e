//! The binary memory-trace format (`.vtrace`): a 32-byte header, then one variable-length
//! record per access, then an end marker with the counts. Written and read as streams: the
//! writer keeps only the previous addresses and the set of pages seen, the reader only the
//! previous addresses. The layout is described in docs/decisions/0007-trace-format.md.
//!
//! ```text
//! header   magic "VMMUTRAC" | version u16 LE | flags u16 LE | reserved u32
//!          | records u64 LE | distinct 4 KiB pages u64 LE        (counts valid if flags bit 0)
//! record   tag u8 = kind (bits 0-1: 0 I, 1 L, 2 S, 3 M) | size << 2 (1..=62; 63: varint follows)
//!          [size varint] | address delta: zigzag varint
//! end      tag 0x00 | records varint | distinct pages varint
//! ```
//!
//! An instruction fetch's delta is taken from the end of the previous fetch (straight-line
//! code costs one byte), a data access's from the previous data address.

use std::collections::HashSet;
use std::io::{BufRead, ErrorKind, Seek, SeekFrom, Write};

/// The file's first eight bytes.
pub const MAGIC: [u8; 8] = *b"VMMUTRAC";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Header size in bytes.
pub const HEADER_LEN: usize = 32;
/// Header flag: the counts in the header are filled in.
const FLAG_COUNTS: u16 = 1;
/// Size code meaning "the size follows as a varint".
const SIZE_ESCAPE: u8 = 63;

/// Errors reading or writing a trace.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The underlying reader or writer failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Not a vmmu trace.
    #[error("not a vmmu trace (bad magic)")]
    BadMagic,
    /// A version this code does not read.
    #[error("trace format version {0} is not supported (this vmmu reads version {VERSION})")]
    Version(u16),
    /// The stream ended inside a record or before the end marker.
    #[error("trace is truncated after {0} records (no end marker: the recording was cut short)")]
    Truncated(u64),
    /// A malformed record.
    #[error("corrupt trace at record {record}: {problem}")]
    Corrupt {
        /// Index of the record.
        record: u64,
        /// What is wrong.
        problem: String,
    },
}

/// What kind of access a record is (valgrind lackey's letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// An instruction fetch (`I`).
    Fetch,
    /// A data load (`L`).
    Load,
    /// A data store (`S`).
    Store,
    /// A load and a store to the same place (`M`, e.g. `add [mem], reg`).
    Modify,
}

impl Kind {
    /// All kinds, in code order.
    pub const ALL: [Kind; 4] = [Kind::Fetch, Kind::Load, Kind::Store, Kind::Modify];

    /// The 2-bit code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The kind of a 2-bit code.
    pub fn from_code(c: u8) -> Kind {
        Kind::ALL[usize::from(c & 3)]
    }

    /// Lackey's letter.
    pub fn letter(self) -> char {
        ['I', 'L', 'S', 'M'][self as usize]
    }
}

/// One access: kind, size in bytes, virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Kind.
    pub kind: Kind,
    /// Bytes accessed.
    pub size: u32,
    /// Virtual address.
    pub addr: u64,
}

impl Record {
    /// The 4 KiB page numbers the access touches (one, or more if it crosses pages).
    pub fn pages(&self) -> std::ops::RangeInclusive<u64> {
        let last = self.addr.saturating_add(u64::from(self.size.max(1)) - 1);
        (self.addr >> 12)..=(last >> 12)
    }
}

/// Counts a trace carries in its header (when the writer could seek back) and its end marker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Records.
    pub records: u64,
    /// Distinct 4 KiB pages touched.
    pub distinct_pages: u64,
}

/// What a writer wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TraceSummary {
    /// Records and distinct pages.
    pub counts: Counts,
    /// Records per kind (I, L, S, M).
    pub by_kind: [u64; 4],
    /// Bytes written, header and end marker included.
    pub bytes: u64,
}

impl TraceSummary {
    /// Average bytes per record (the header and end marker included).
    pub fn bytes_per_record(&self) -> f64 {
        self.bytes as f64 / self.counts.records.max(1) as f64
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)).cast_unsigned()
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends `v` as an LEB128 varint; returns the bytes used.
fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(((v & 0x7f) as u8) | 0x80);
        v >>= 7;
    }
    buf.push((v & 0x7f) as u8);
}

/// Address predictors shared by the writer and the reader.
#[derive(Debug, Clone, Copy, Default)]
struct Predict {
    next_fetch: u64,
    last_data: u64,
}

impl Predict {
    fn base(&self, kind: Kind) -> u64 {
        if kind == Kind::Fetch {
            self.next_fetch
        } else {
            self.last_data
        }
    }

    fn update(&mut self, r: &Record) {
        if r.kind == Kind::Fetch {
            self.next_fetch = r.addr.wrapping_add(u64::from(r.size));
        } else {
            self.last_data = r.addr;
        }
    }
}

/// Writes a trace record by record to any `Write` (a file, a pipe).
pub struct TraceWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
    predict: Predict,
    pages: HashSet<u64>,
    summary: TraceSummary,
}

impl<W: Write> TraceWriter<W> {
    /// Writes the header (counts not filled in) and returns the writer.
    pub fn new(mut out: W) -> Result<Self, FormatError> {
        out.write_all(&header_bytes(None))?;
        Ok(TraceWriter {
            out,
            buf: Vec::with_capacity(64 << 10),
            predict: Predict::default(),
            pages: HashSet::new(),
            summary: TraceSummary { bytes: HEADER_LEN as u64, ..TraceSummary::default() },
        })
    }

    /// Appends one record.
    pub fn write(&mut self, r: Record) -> Result<(), FormatError> {
        let start = self.buf.len();
        let code = u8::try_from(r.size).ok().filter(|s| (1..SIZE_ESCAPE).contains(s)).unwrap_or(SIZE_ESCAPE);
        self.buf.push(r.kind.code() | (code << 2));
        if code == SIZE_ESCAPE {
            put_varint(&mut self.buf, u64::from(r.size));
        }
        put_varint(&mut self.buf, zigzag(r.addr.wrapping_sub(self.predict.base(r.kind)) as i64));
        self.predict.update(&r);
        self.summary.bytes += (self.buf.len() - start) as u64;
        self.summary.counts.records += 1;
        self.summary.by_kind[r.kind as usize] += 1;
        for p in r.pages() {
            self.pages.insert(p);
        }
        self.summary.counts.distinct_pages = self.pages.len() as u64;
        if self.buf.len() >= 60 << 10 {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// What was written so far.
    pub fn summary(&self) -> TraceSummary {
        self.summary
    }

    /// Writes the end marker and flushes; returns the output and the summary.
    pub fn finish(mut self) -> Result<(W, TraceSummary), FormatError> {
        let start = self.buf.len();
        self.buf.push(0);
        put_varint(&mut self.buf, self.summary.counts.records);
        put_varint(&mut self.buf, self.summary.counts.distinct_pages);
        self.summary.bytes += (self.buf.len() - start) as u64;
        self.out.write_all(&self.buf)?;
        self.out.flush()?;
        Ok((self.out, self.summary))
    }
}

impl<W: Write + Seek> TraceWriter<W> {
    /// [`finish`](TraceWriter::finish), then fills the counts into the header (for a file:
    /// a replay can then size guest memory before it starts).
    pub fn finish_seekable(self) -> Result<(W, TraceSummary), FormatError> {
        let (mut out, summary) = self.finish()?;
        out.seek(SeekFrom::Start(0))?;
        out.write_all(&header_bytes(Some(summary.counts)))?;
        out.seek(SeekFrom::End(0))?;
        out.flush()?;
        Ok((out, summary))
    }
}

fn header_bytes(counts: Option<Counts>) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    let c = counts.unwrap_or_default();
    h[10..12].copy_from_slice(&(if counts.is_some() { FLAG_COUNTS } else { 0 }).to_le_bytes());
    h[16..24].copy_from_slice(&c.records.to_le_bytes());
    h[24..32].copy_from_slice(&c.distinct_pages.to_le_bytes());
    h
}

/// Reads a trace record by record from any `BufRead`; an iterator of records. The end
/// marker's counts are checked against what was read.
pub struct TraceReader<R: BufRead> {
    input: R,
    header_counts: Option<Counts>,
    predict: Predict,
    read: u64,
    end: Option<Counts>,
    failed: bool,
}

impl<R: BufRead> TraceReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self, FormatError> {
        let mut h = [0u8; HEADER_LEN];
        input.read_exact(&mut h).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => FormatError::BadMagic,
            _ => FormatError::Io(e),
        })?;
        if h[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let flags = u16::from_le_bytes([h[10], h[11]]);
        let u = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default());
        let header_counts = (flags & FLAG_COUNTS != 0).then(|| Counts { records: u(16), distinct_pages: u(24) });
        Ok(TraceReader { input, header_counts, predict: Predict::default(), read: 0, end: None, failed: false })
    }

    /// The counts in the header, if the writer filled them in.
    pub fn header_counts(&self) -> Option<Counts> {
        self.header_counts
    }

    /// The end marker's counts, once the iterator has reached it.
    pub fn end_counts(&self) -> Option<Counts> {
        self.end
    }

    /// Records read so far.
    pub fn records_read(&self) -> u64 {
        self.read
    }

    fn byte(&mut self) -> Result<Option<u8>, FormatError> {
        let mut b = [0u8; 1];
        match self.input.read(&mut b) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(b[0])),
            Err(e) if e.kind() == ErrorKind::Interrupted => self.byte(),
            Err(e) => Err(e.into()),
        }
    }

    fn varint(&mut self) -> Result<u64, FormatError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?.ok_or(FormatError::Truncated(self.read))?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.corrupt("varint longer than 10 bytes"))
    }

    fn corrupt(&self, problem: impl Into<String>) -> FormatError {
        FormatError::Corrupt { record: self.read, problem: problem.into() }
    }

    fn next_record(&mut self) -> Result<Option<Record>, FormatError> {
        if self.end.is_some() {
            return Ok(None);
        }
        let tag = self.byte()?.ok_or(FormatError::Truncated(self.read))?;
        if tag == 0 {
            let counts = Counts { records: self.varint()?, distinct_pages: self.varint()? };
            if counts.records != self.read {
                return Err(
                    self.corrupt(format!("end marker says {} records, {} were read", counts.records, self.read))
                );
            }
            if let Some(h) = self.header_counts {
                if h != counts {
                    return Err(self.corrupt("header and end marker disagree on the counts"));
                }
            }
            if self.byte()?.is_some() {
                return Err(self.corrupt("bytes after the end marker"));
            }
            self.end = Some(counts);
            return Ok(None);
        }
        let kind = Kind::from_code(tag);
        let size = match tag >> 2 {
            0 => return Err(self.corrupt(format!("size code 0 in tag {tag:#04x}"))),
            SIZE_ESCAPE => {
                u32::try_from(self.varint()?).map_err(|_| self.corrupt("access size does not fit 32 bits"))?
            }
            s => u32::from(s),
        };
        let delta = unzigzag(self.varint()?);
        let r = Record { kind, size, addr: self.predict.base(kind).wrapping_add_signed(delta) };
        self.predict.update(&r);
        self.read += 1;
        Ok(Some(r))
    }
}

impl<R: BufRead> Iterator for TraceReader<R> {
    type Item = Result<Record, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.next_record().transpose();
        if matches!(r, Some(Err(_))) {
            self.failed = true;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn roundtrip(recs: &[Record]) -> (Vec<Record>, TraceSummary, Vec<u8>) {
        let mut w = TraceWriter::new(Cursor::new(Vec::new())).unwrap();
        for r in recs {
            w.write(*r).unwrap();
        }
        let (out, sum) = w.finish_seekable().unwrap();
        let bytes = out.into_inner();
        assert_eq!(bytes.len() as u64, sum.bytes);
        let rd = TraceReader::new(Cursor::new(&bytes)).unwrap();
        assert_eq!(rd.header_counts(), Some(sum.counts));
        let back: Vec<Record> = rd.map(|r| r.unwrap()).collect();
        (back, sum, bytes)
    }

    #[test]
    fn roundtrip_and_compactness() {
        let mut recs = Vec::new();
        let mut ip = 0x5555_5555_4000u64;
        for i in 0..1000u64 {
            recs.push(Record { kind: Kind::Fetch, size: 3 + (i % 4) as u32, addr: ip });
            ip += 3 + i % 4;
            recs.push(Record { kind: Kind::Load, size: 8, addr: 0x7ffd_0000_1000 - (i % 16) * 8 });
        }
        recs.push(Record { kind: Kind::Modify, size: 0, addr: 0 });
        recs.push(Record { kind: Kind::Store, size: 1 << 20, addr: u64::MAX });
        let (back, sum, bytes) = roundtrip(&recs);
        assert_eq!(back, recs);
        assert_eq!(sum.counts.records, recs.len() as u64);
        assert_eq!(sum.by_kind, [1000, 1000, 1, 1]);
        // Straight-line fetches cost 2 bytes, the nearby loads 2-3.
        assert!(bytes.len() < recs.len() * 3, "{} bytes", bytes.len());
    }

    #[test]
    fn distinct_pages_count_page_crossings() {
        let recs = [
            Record { kind: Kind::Load, size: 8, addr: 0x1ffc },
            Record { kind: Kind::Load, size: 4, addr: 0x2000 },
            Record { kind: Kind::Store, size: 1, addr: 0x9000 },
        ];
        let (_, sum, _) = roundtrip(&recs);
        assert_eq!(sum.counts.distinct_pages, 3);
    }

    #[test]
    fn errors_are_clear() {
        assert!(matches!(TraceReader::new(&b"not a trace at all, not at all!!"[..]), Err(FormatError::BadMagic)));
        let mut w = TraceWriter::new(Vec::new()).unwrap();
        w.write(Record { kind: Kind::Load, size: 8, addr: 0x1234 }).unwrap();
        let (bytes, _) = w.finish().unwrap();
        // Streamed to a non-seekable output: no counts in the header, the end marker has them.
        let mut rd = TraceReader::new(&bytes[..]).unwrap();
        assert_eq!(rd.header_counts(), None);
        assert!(rd.next().unwrap().is_ok());
        assert!(rd.next().is_none());
        assert_eq!(rd.end_counts(), Some(Counts { records: 1, distinct_pages: 1 }));
        // Cut short.
        let cut = &bytes[..bytes.len() - 3];
        let errs: Vec<_> = TraceReader::new(cut).unwrap().filter_map(|r| r.err()).collect();
        assert!(matches!(errs[..], [FormatError::Truncated(1)]), "{errs:?}");
        let mut v2 = bytes.clone();
        v2[8] = 9;
        assert!(matches!(TraceReader::new(&v2[..]), Err(FormatError::Version(9))));
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (0u8..4, prop_oneof![1u32..=16, 0u32..=1 << 20], prop_oneof![any::<u64>(), 0u64..1 << 47])
            .prop_map(|(k, size, addr)| Record { kind: Kind::from_code(k), size, addr })
    }

    proptest! {
        #[test]
        fn any_records_roundtrip(recs in proptest::collection::vec(arb_record(), 0..300)) {
            let (back, sum, _) = roundtrip(&recs);
            prop_assert_eq!(&back, &recs);
            let pages: HashSet<u64> = recs.iter().flat_map(|r| r.pages()).collect();
            prop_assert_eq!(sum.counts.distinct_pages, pages.len() as u64);
        }
    }
}
