//! ChampSim's binary trace format, read as a stream of trace records.
//!
//! A ChampSim trace is a sequence of 64-byte `input_instr` structs (little-endian, no
//! padding): `ip` u64 at 0, `is_branch` u8 at 8, `branch_taken` u8 at 9,
//! `destination_registers[2]` u8 at 10, `source_registers[4]` u8 at 12,
//! `destination_memory[2]` u64 at 16, `source_memory[4]` u64 at 32. Traces are usually
//! xz-compressed; this reader takes the decompressed stream (the CLI pipes `.xz` files
//! through `xz -dc`). Each instruction becomes an 8-byte fetch of `ip`, a load for each
//! non-zero `source_memory` and a store for each non-zero `destination_memory`, all 8 bytes.

use super::format::{Kind, Record};
use std::io::{ErrorKind, Read};

/// Bytes per `input_instr`.
pub const RECORD_LEN: usize = 64;
/// The first bytes of an xz stream.
pub const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];

/// Errors reading a ChampSim trace.
#[derive(Debug, thiserror::Error)]
pub enum ChampSimError {
    /// Reading failed.
    #[error("reading the ChampSim trace: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended inside an instruction.
    #[error("ChampSim trace ends inside instruction {instr} ({bytes} of 64 bytes)")]
    Truncated {
        /// Instructions read whole.
        instr: u64,
        /// Bytes of the partial one.
        bytes: usize,
    },
    /// xz-compressed input given to the raw reader.
    #[error("the ChampSim trace is xz-compressed: decompress it first (xz -dc)")]
    Compressed,
}

/// One decoded `input_instr` (the fields a memory trace needs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Instr {
    /// Instruction pointer.
    pub ip: u64,
    /// Stores' addresses (0 = unused slot).
    pub destination_memory: [u64; 2],
    /// Loads' addresses (0 = unused slot).
    pub source_memory: [u64; 4],
}

impl Instr {
    /// Decodes one 64-byte record.
    pub fn decode(b: &[u8; RECORD_LEN]) -> Instr {
        let u = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        Instr { ip: u(0), destination_memory: [u(16), u(24)], source_memory: [u(32), u(40), u(48), u(56)] }
    }

    /// Encodes into a 64-byte record (branch and register fields zero).
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[..8].copy_from_slice(&self.ip.to_le_bytes());
        for (i, a) in self.destination_memory.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        for (i, a) in self.source_memory.iter().enumerate() {
            b[32 + 8 * i..40 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        b
    }

    /// The trace records of this instruction: fetch, loads, stores.
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        let rec = |kind, addr| Record { kind, size: 8, addr };
        std::iter::once(rec(Kind::Fetch, self.ip))
            .chain(self.source_memory.iter().filter(|&&a| a != 0).map(move |&a| rec(Kind::Load, a)))
            .chain(self.destination_memory.iter().filter(|&&a| a != 0).map(move |&a| rec(Kind::Store, a)))
    }
}

/// Streams trace records out of a raw (decompressed) ChampSim trace.
pub struct ChampSimReader<R: Read> {
    input: R,
    pending: Vec<Record>,
    instrs: u64,
    done: bool,
}

impl<R: Read> ChampSimReader<R> {
    /// A reader over `input`.
    pub fn new(input: R) -> Self {
        ChampSimReader { input, pending: Vec::with_capacity(7), instrs: 0, done: false }
    }

    /// Instructions read so far.
    pub fn instructions(&self) -> u64 {
        self.instrs
    }

    /// The next instruction, or None at the end.
    pub fn next_instr(&mut self) -> Result<Option<Instr>, ChampSimError> {
        let mut b = [0u8; RECORD_LEN];
        let mut got = 0;
        while got < RECORD_LEN {
            match self.input.read(&mut b[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.instrs == 0 && got >= XZ_MAGIC.len() && b[..XZ_MAGIC.len()] == XZ_MAGIC {
            return Err(ChampSimError::Compressed);
        }
        match got {
            0 => Ok(None),
            RECORD_LEN => {
                self.instrs += 1;
                Ok(Some(Instr::decode(&b)))
            }
            bytes => Err(ChampSimError::Truncated { instr: self.instrs, bytes }),
        }
    }
}

impl<R: Read> Iterator for ChampSimReader<R> {
    type Item = Result<Record, ChampSimError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.pending.pop() {
                return Some(Ok(r));
            }
            if self.done {
                return None;
            }
            match self.next_instr() {
                Ok(Some(i)) => {
                    self.pending.extend(i.records());
                    self.pending.reverse();
                }
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_instructions_in_order() {
        let a = Instr { ip: 0x401000, destination_memory: [0, 0x7ff0], source_memory: [0x6000, 0, 0x6008, 0] };
        let b = Instr { ip: 0x401004, ..Instr::default() };
        let mut raw = a.encode().to_vec();
        raw.extend_from_slice(&b.encode());
        // Branch and register bytes are ignored.
        raw[8] = 1;
        raw[12] = 6;
        let recs: Vec<Record> = ChampSimReader::new(&raw[..]).map(|r| r.unwrap()).collect();
        let want = [
            (Kind::Fetch, 0x401000),
            (Kind::Load, 0x6000),
            (Kind::Load, 0x6008),
            (Kind::Store, 0x7ff0),
            (Kind::Fetch, 0x401004),
        ];
        assert_eq!(recs.len(), want.len());
        for (r, (k, a)) in recs.iter().zip(want) {
            assert_eq!((r.kind, r.addr, r.size), (k, a, 8));
        }
    }

    #[test]
    fn truncated_and_compressed_inputs_fail_clearly() {
        let raw = Instr { ip: 1, ..Instr::default() }.encode();
        let r: Vec<_> = ChampSimReader::new(&raw[..40]).collect();
        assert!(matches!(r[..], [Err(ChampSimError::Truncated { instr: 0, bytes: 40 })]), "{r:?}");
        let mut xz = [0u8; 64];
        xz[..6].copy_from_slice(&XZ_MAGIC);
        assert!(matches!(ChampSimReader::new(&xz[..]).next(), Some(Err(ChampSimError::Compressed))));
    }
}
