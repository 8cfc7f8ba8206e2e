//! Builds the guest: RAM (vm-memory), a GDT with CPL3 segments and a TSS whose I/O permission
//! bitmap lets CPL3 code `out` to the backend's ports, an IDT whose #UD and #BP handlers do
//! `invlpg` or `mov cr3` for the CPL3 workload, 4-level page tables with U/S set at every level, and the
//! workload's code (iced-x86's `CodeAssembler`). It also runs the workload on a model of its
//! own page tables to know what the guest must leave behind (the oracles in [`Expected`]).
//!
//! Guest-physical layout (everything below [`DATA_GPA`] is identity-mapped at the same GVA,
//! so the guest can rewrite its own page tables through that mapping):
//!
//! | GPA | what |
//! |---|---|
//! | `0x1000` | GDT: null, kernel code/data, user data/code (DPL 3), 64-bit TSS |
//! | `0x2000` | IDT: 32 interrupt gates (#BP's with DPL 3, so `int3` works from CPL3) |
//! | `0x3000` | TSS (RSP0) and its I/O permission bitmap (ports 0-255 allowed) |
//! | `0x4000-0x5fff` | kernel stack (exception frames) |
//! | `0x6000-0x7fff` | user stack |
//! | `0x10000` | code: the CPL3 workload, then the ring-0 handlers |
//! | `0x100000-0x1fffff` | page-table pool |
//! | `0x200000-` | workload data ([`DATA_GPA`]) |

use std::collections::{BTreeMap, HashMap};

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::KvmError;
use crate::spec::{Access, KernelEntry, Op, WorkloadSpec, DATA_GPA, PAGE};

pub(crate) const GDT_GPA: u64 = 0x1000;
pub(crate) const IDT_GPA: u64 = 0x2000;
pub(crate) const TSS_GPA: u64 = 0x3000;
pub(crate) const KSTACK_TOP: u64 = 0x6000;
pub(crate) const USTACK_TOP: u64 = 0x8000;
pub(crate) const CODE_GPA: u64 = 0x10000;
const PT_POOL: u64 = 0x10_0000;
const PT_POOL_END: u64 = 0x20_0000;

/// GDT selectors.
pub(crate) const SEL_KCODE: u16 = 0x08;
pub(crate) const SEL_UDATA: u16 = 0x18 | 3;
pub(crate) const SEL_UCODE: u16 = 0x20 | 3;
pub(crate) const SEL_TSS: u16 = 0x28;
pub(crate) const GDT_LIMIT: u16 = 0x38 - 1;
pub(crate) const IDT_VECTORS: u16 = 32;
/// The TSS: 0x68 bytes, then a 32-byte I/O bitmap (ports 0-255) and its 0xff terminator.
const IOPB_OFFSET: u16 = 0x68;
const IOPB_BYTES: u16 = 32;
pub(crate) const TSS_LIMIT: u32 = (IOPB_OFFSET + IOPB_BYTES) as u32;

/// [`PAGE`] as a buffer length.
// PAGE is 4096, which every usize holds.
#[allow(clippy::cast_possible_truncation)]
const PAGE_LEN: usize = PAGE as usize;
/// [`PAGE`] as an instruction immediate.
// PAGE is 4096, which an i32 holds.
#[allow(clippy::cast_possible_truncation)]
const PAGE_IMM: i32 = PAGE as i32;

/// Ports the guest writes (32-bit `out` with EAX).
/// End of phase EAX (0 is the implicit boot phase).
pub(crate) const PORT_PHASE: u16 = 0x10;
/// A ring-0 handler caught a fatal exception; EAX is the vector.
pub(crate) const PORT_FATAL: u16 = 0x11;
/// The workload is done.
pub(crate) const PORT_DONE: u16 = 0x12;

/// Page-table entry bits.
pub(crate) const PTE_P: u64 = 1;
pub(crate) const PTE_RW: u64 = 1 << 1;
pub(crate) const PTE_US: u64 = 1 << 2;
pub(crate) const PTE_A: u64 = 1 << 5;
pub(crate) const PTE_D: u64 = 1 << 6;
pub(crate) const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
const TABLE_FLAGS: u64 = PTE_P | PTE_RW | PTE_US;

/// `#UD` handler operations (RAX), with the argument in RDI.
const UD_INVLPG: i32 = 1;
const UD_MOV_CR3: i32 = 2;

/// What the guest must leave behind, from running the workload on the backend's own model of
/// its page tables.
#[derive(Debug, Default)]
pub(crate) struct Expected {
    /// Last sequence number written to each guest-physical page (the qword at its start).
    pub writes: BTreeMap<u64, u64>,
    /// The final value of every region leaf PTE (with the A/D bits the CPU must have set),
    /// by the PTE's guest-physical address.
    pub ptes: BTreeMap<u64, u64>,
    /// Root active at the end.
    pub final_root: usize,
    /// GVA -> GPA under the final root, for a few pages of each region (KVM_TRANSLATE oracle).
    pub translations: Vec<(u64, u64)>,
}

/// A guest ready to run.
pub(crate) struct BuiltGuest {
    pub mem: GuestMemoryMmap,
    pub roots: Vec<u64>,
    pub entry: u64,
    pub expected: Expected,
}

fn mem_err(e: impl std::fmt::Display) -> KvmError {
    KvmError::Memory(e.to_string())
}

fn asm_err(e: IcedError) -> KvmError {
    KvmError::Assemble(e.to_string())
}

struct Tables<'a> {
    mem: &'a GuestMemoryMmap,
    next: u64,
}

impl Tables<'_> {
    fn read(&self, gpa: u64) -> Result<u64, KvmError> {
        self.mem.read_obj::<u64>(GuestAddress(gpa)).map_err(mem_err)
    }

    fn write(&self, gpa: u64, v: u64) -> Result<(), KvmError> {
        self.mem.write_obj(v, GuestAddress(gpa)).map_err(mem_err)
    }

    fn alloc(&mut self) -> Result<u64, KvmError> {
        if self.next >= PT_POOL_END {
            return Err(KvmError::Workload(format!(
                "page tables need more than the {} KiB pool; map fewer pages",
                (PT_POOL_END - PT_POOL) / 1024
            )));
        }
        let t = self.next;
        self.next += PAGE;
        self.mem.write_slice(&[0u8; PAGE_LEN], GuestAddress(t)).map_err(mem_err)?;
        Ok(t)
    }

    /// The guest-physical address of the leaf PTE for `gva` under `root`, creating the
    /// intermediate tables (P, RW, US; A/D clear).
    fn leaf(&mut self, root: u64, gva: u64) -> Result<u64, KvmError> {
        let mut table = root;
        for level in (2..=4).rev() {
            let slot = table + ((gva >> (12 + 9 * (level - 1))) & 511) * 8;
            let e = self.read(slot)?;
            table = if e & PTE_P == 0 {
                let t = self.alloc()?;
                self.write(slot, t | TABLE_FLAGS)?;
                t
            } else {
                e & PTE_ADDR
            };
        }
        Ok(table + ((gva >> 12) & 511) * 8)
    }

    fn map(&mut self, root: u64, gva: u64, gpa: u64) -> Result<u64, KvmError> {
        let leaf = self.leaf(root, gva)?;
        self.write(leaf, gpa | TABLE_FLAGS)?;
        Ok(leaf)
    }
}

/// Pages in the guest's page-table pool.
pub const PT_POOL_PAGES: u64 = (PT_POOL_END - PT_POOL) / PAGE;

/// The page-table pages the guest builds for `spec` (a root per root, and for each root that
/// is not a copy the tables mapping the system area and every region), or `None` once they
/// are more than `limit`.
fn page_table_pages(spec: &WorkloadSpec, limit: u64) -> Option<u64> {
    let own_tables = (spec.roots - copied_roots(spec).len()) as u64;
    // Tables below a root, by the GVA bits above each level's index: PDPTs (>> 39), PDs
    // (>> 30), PTs (>> 21). The system area is [PAGE, DATA_GPA).
    let ranges = std::iter::once((PAGE, DATA_GPA)).chain(spec.regions.iter().map(|r| (r.gva, r.gva + r.pages * PAGE)));
    let mut per_root = 0u64;
    for shift in [39u32, 30, 21] {
        let mut keys = std::collections::HashSet::new();
        for (a, b) in ranges.clone() {
            for k in (a >> shift)..=((b - 1) >> shift) {
                keys.insert(k);
                if spec.roots as u64 + own_tables * (per_root + keys.len() as u64) > limit {
                    return None;
                }
            }
        }
        per_root += keys.len() as u64;
    }
    Some(spec.roots as u64 + own_tables * per_root)
}

/// Checks that the guest can be built for `spec` without building it: the spec is
/// consistent and its page tables fit the guest's page-table pool ([`PT_POOL_PAGES`]).
pub fn check_spec(spec: &WorkloadSpec) -> Result<(), KvmError> {
    validate(spec).map(drop)
}

fn validate(spec: &WorkloadSpec) -> Result<u64, KvmError> {
    let bad = |m: String| Err(KvmError::Workload(m));
    if spec.roots == 0 || spec.roots > 4 {
        return bad(format!("{} page-table roots (1 to 4 supported)", spec.roots));
    }
    let mut mem_end = DATA_GPA;
    for (i, r) in spec.regions.iter().enumerate() {
        let end = r.pages.checked_mul(PAGE).and_then(|b| r.gva.checked_add(b));
        if r.pages == 0 || r.gva % PAGE != 0 || r.gva < DATA_GPA || !matches!(end, Some(e) if e <= 1 << 47) {
            return bad(format!(
                "region {i}: gva {:#x} + {} pages must be page aligned, non-empty, in [2 MiB, 2^47)",
                r.gva, r.pages
            ));
        }
        if r.gpa.len() != spec.roots {
            return bad(format!("region {i}: {} GPA windows for {} roots", r.gpa.len(), spec.roots));
        }
        for &g in &r.gpa {
            if g < DATA_GPA || g % PAGE != 0 {
                return bad(format!("region {i}: GPA {g:#x} must be page aligned and >= {DATA_GPA:#x}"));
            }
            mem_end = mem_end.max(g + r.pages * PAGE);
        }
    }
    if u32::try_from(spec.phases.len()).is_err() {
        return bad(format!("{} phases (the guest numbers them with 32 bits)", spec.phases.len()));
    }
    for p in &spec.phases {
        if p.repeat == 0 {
            return bad(format!("phase {}: repeat must be at least 1", p.name));
        }
        for op in &p.ops {
            let region_ok =
                |r: usize, page: u64, n: u64| spec.regions.get(r).is_some_and(|reg| page + n <= reg.pages && n > 0);
            let ok = match *op {
                Op::Touch { region, first, pages, .. } => region_ok(region, first, pages),
                Op::SetPte { root, region, page, gpa } => {
                    mem_end = mem_end.max(gpa + PAGE);
                    root < spec.roots && region_ok(region, page, 1) && gpa >= DATA_GPA && gpa % PAGE == 0
                }
                Op::Invlpg { region, page } => region_ok(region, page, 1),
                Op::WalkPte { root, region, page } => root < spec.roots && region_ok(region, page, 1),
                Op::SwitchRoot(r) => r < spec.roots,
                Op::CopyRoot(r) => r > 0 && r < spec.roots,
            };
            if !ok {
                return bad(format!("phase {}: operation {op:?} is out of range", p.name));
            }
        }
    }
    // A copied root shares root 0's tables: same windows, and no switch to it before the copy.
    let copied = copied_roots(spec);
    for &c in &copied {
        if spec.regions.iter().any(|r| r.gpa[c] != r.gpa[0]) {
            return bad(format!("root {c} is a copy of root 0 (CopyRoot), so every region must map it like root 0"));
        }
        let first = |want: &dyn Fn(&Op) -> bool| {
            spec.phases.iter().flat_map(|p| p.ops.iter()).position(want).unwrap_or(usize::MAX)
        };
        if first(&|o| *o == Op::SwitchRoot(c)) < first(&|o| *o == Op::CopyRoot(c)) {
            return bad(format!("root {c} is switched to before the guest copies root 0 into it"));
        }
    }
    if page_table_pages(spec, PT_POOL_PAGES).is_none() {
        return bad(format!(
            "the regions need more page-table pages than the guest's page-table pool holds ({PT_POOL_PAGES} pages, \
             {} KiB): touch fewer pages, or pages closer together",
            (PT_POOL_END - PT_POOL) / 1024
        ));
    }
    if let Some(n) = spec.nr_mmu_pages.filter(|&n| n < 64) {
        return bad(format!("nr_mmu_pages {n} is below KVM's minimum of 64 (KVM_MIN_ALLOC_MMU_PAGES)"));
    }
    // Round RAM up to 2 MiB.
    let mem_end = mem_end.max(spec.memory);
    mem_end
        .checked_next_multiple_of(0x20_0000)
        .filter(|&m| m <= 1 << 46)
        .map_or_else(|| bad(format!("{mem_end:#x} bytes of guest RAM is more than this backend maps")), Ok)
}

/// Roots that the guest fills itself with [`Op::CopyRoot`].
fn copied_roots(spec: &WorkloadSpec) -> Vec<usize> {
    let mut v: Vec<usize> = spec
        .phases
        .iter()
        .flat_map(|p| p.ops.iter())
        .filter_map(|o| if let Op::CopyRoot(r) = *o { Some(r) } else { None })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Builds guest memory, tables, descriptors and code for `spec`.
pub(crate) fn build(spec: &WorkloadSpec) -> Result<BuiltGuest, KvmError> {
    let mem_size = validate(spec)?;
    let len = usize::try_from(mem_size)
        .map_err(|_| KvmError::Memory(format!("{mem_size} bytes of guest RAM do not fit the address space")))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)])
        .map_err(|e| KvmError::Memory(format!("allocating {mem_size} bytes of guest RAM: {e}")))?;

    // Page tables: the system area identity-mapped (page 0 left unmapped), then each region.
    let mut t = Tables { mem: &mem, next: PT_POOL };
    let roots: Vec<u64> = (0..spec.roots).map(|_| t.alloc()).collect::<Result<_, _>>()?;
    let mut ptes: HashMap<(usize, u64), (u64, u64)> = HashMap::new(); // (root, gva) -> (pte gpa, value)
    let copied = copied_roots(spec);
    for (ri, &root) in roots.iter().enumerate() {
        if copied.contains(&ri) {
            continue;
        }
        let mut gva = PAGE;
        while gva < DATA_GPA {
            t.map(root, gva, gva)?;
            gva += PAGE;
        }
    }
    for (ri, &root) in roots.iter().enumerate() {
        for r in &spec.regions {
            for p in 0..r.pages {
                let gva = r.gva + p * PAGE;
                if copied.contains(&ri) {
                    // Shares root 0's tables (and so its leaf PTEs) once the guest copied it.
                    let shared = ptes[&(0, gva)];
                    ptes.insert((ri, gva), shared);
                    continue;
                }
                let gpa = r.gpa[ri] + p * PAGE;
                let leaf = t.map(root, gva, gpa)?;
                ptes.insert((ri, gva), (leaf, gpa | TABLE_FLAGS));
            }
        }
    }

    // The entries each WalkPte loads: a copied root's PML4E is in its own page, the rest of
    // its path in root 0's tables.
    let mut paths: HashMap<(usize, u64), [u64; 4]> = HashMap::new();
    for op in spec.phases.iter().flat_map(|p| p.ops.iter()) {
        if let Op::WalkPte { root, region, page } = *op {
            let gva = spec.regions[region].gva + page * PAGE;
            let mut table = if copied.contains(&root) { roots[0] } else { roots[root] };
            let mut path = [0u64; 4];
            for (i, level) in (1..=4u64).rev().enumerate() {
                let slot = table + ((gva >> (12 + 9 * (level - 1))) & 511) * 8;
                path[i] = slot;
                if level > 1 {
                    table = t.read(slot)? & PTE_ADDR;
                }
            }
            path[0] = roots[root] + ((gva >> 39) & 511) * 8;
            paths.insert((root, gva), path);
        }
    }

    write_descriptors(&mem)?;
    let (code, entry, handlers) = assemble(spec, &ptes, &paths, &roots)?;
    if CODE_GPA + code.len() as u64 > PT_POOL {
        return Err(KvmError::Workload(format!(
            "generated code is {} bytes, more than the {} bytes reserved",
            code.len(),
            PT_POOL - CODE_GPA
        )));
    }
    mem.write_slice(&code, GuestAddress(CODE_GPA)).map_err(mem_err)?;
    write_idt(&mem, &handlers)?;

    let expected = simulate(spec, &mut ptes);
    Ok(BuiltGuest { mem, roots, entry, expected })
}

fn write_descriptors(mem: &GuestMemoryMmap) -> Result<(), KvmError> {
    let tss_low = (TSS_LIMIT as u64 & 0xffff)
        | ((TSS_GPA & 0xff_ffff) << 16)
        | (0xb << 40) // 64-bit TSS, busy (it is loaded in TR)
        | (1 << 47)
        | (((TSS_LIMIT as u64 >> 16) & 0xf) << 48)
        | (((TSS_GPA >> 24) & 0xff) << 56);
    let gdt: [u64; 7] = [
        0,
        0x00af_9a00_0000_ffff, // 0x08 kernel code: 64-bit, DPL 0
        0x00cf_9200_0000_ffff, // 0x10 kernel data
        0x00cf_f200_0000_ffff, // 0x18 user data: DPL 3
        0x00af_fa00_0000_ffff, // 0x20 user code: 64-bit, DPL 3
        tss_low,               // 0x28 TSS (16 bytes)
        TSS_GPA >> 32,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_GPA + 8 * i as u64)).map_err(mem_err)?;
    }
    // TSS: RSP0 at offset 4, I/O map base at offset 0x66, bitmap (all ports 0-255 allowed),
    // then the terminating 0xff byte.
    mem.write_obj(KSTACK_TOP, GuestAddress(TSS_GPA + 4)).map_err(mem_err)?;
    mem.write_obj(IOPB_OFFSET, GuestAddress(TSS_GPA + 0x66)).map_err(mem_err)?;
    mem.write_slice(&[0u8; IOPB_BYTES as usize], GuestAddress(TSS_GPA + u64::from(IOPB_OFFSET))).map_err(mem_err)?;
    mem.write_obj(0xffu8, GuestAddress(TSS_GPA + u64::from(IOPB_OFFSET + IOPB_BYTES))).map_err(mem_err)?;
    Ok(())
}

fn write_idt(mem: &GuestMemoryMmap, handlers: &[u64]) -> Result<(), KvmError> {
    for (v, &h) in handlers.iter().enumerate() {
        let low = (h & 0xffff)
            | ((SEL_KCODE as u64) << 16)
            | (if v == 3 { 0xee } else { 0x8e } << 40) // present, DPL 0 (3 for #BP), interrupt gate
            | (((h >> 16) & 0xffff) << 48);
        let at = IDT_GPA + 16 * v as u64;
        mem.write_obj(low, GuestAddress(at)).map_err(mem_err)?;
        mem.write_obj(h >> 32, GuestAddress(at + 8)).map_err(mem_err)?;
    }
    Ok(())
}

/// Assembles the CPL3 workload followed by the ring-0 handlers at [`CODE_GPA`]; returns the
/// code, the user entry point and the 32 exception handler addresses.
fn assemble(
    spec: &WorkloadSpec,
    ptes: &HashMap<(usize, u64), (u64, u64)>,
    paths: &HashMap<(usize, u64), [u64; 4]>,
    roots: &[u64],
) -> Result<(Vec<u8>, u64, Vec<u64>), KvmError> {
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    let mut entry = a.create_label();
    a.set_label(&mut entry).map_err(asm_err)?;
    emit_user(&mut a, spec, ptes, paths, roots).map_err(asm_err)?;
    let handlers = emit_handlers(&mut a).map_err(asm_err)?;
    let result = a.assemble_options(CODE_GPA, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS).map_err(asm_err)?;
    let entry_ip = result.label_ip(&entry).map_err(asm_err)?;
    let handler_ips = handlers.iter().map(|l| result.label_ip(l)).collect::<Result<Vec<_>, _>>().map_err(asm_err)?;
    Ok((result.inner.code_buffer, entry_ip, handler_ips))
}

fn phase_end(a: &mut CodeAssembler, index: u32) -> Result<(), IcedError> {
    a.mov(eax, index)?;
    a.out(PORT_PHASE as i32, eax)
}

/// The CPL3 program. Registers: R15 is the running sequence number stored by writes (starts
/// at 1), R14 the phase repeat counter, RCX/RDI the per-op loop; RAX/RDI carry `ud2` requests.
fn emit_user(
    a: &mut CodeAssembler,
    spec: &WorkloadSpec,
    ptes: &HashMap<(usize, u64), (u64, u64)>,
    paths: &HashMap<(usize, u64), [u64; 4]>,
    roots: &[u64],
) -> Result<(), IcedError> {
    phase_end(a, 0)?;
    for (phase, index) in spec.phases.iter().zip(1u32..) {
        let mut top = a.create_label();
        if phase.repeat > 1 {
            a.mov(r14d, phase.repeat)?;
        }
        a.set_label(&mut top)?;
        for op in &phase.ops {
            match *op {
                Op::Touch { region, first, pages, access } => {
                    let mut lp = a.create_label();
                    a.mov(rdi, spec.regions[region].gva + first * PAGE)?;
                    a.mov(rcx, pages)?;
                    a.set_label(&mut lp)?;
                    match access {
                        Access::Read => a.mov(rax, qword_ptr(rdi))?,
                        Access::Write => {
                            a.mov(qword_ptr(rdi), r15)?;
                            a.inc(r15)?;
                        }
                    }
                    a.add(rdi, PAGE_IMM)?;
                    a.dec(rcx)?;
                    a.jnz(lp)?;
                }
                Op::SetPte { root, region, page, gpa } => {
                    let gva = spec.regions[region].gva + page * PAGE;
                    let (leaf, _) = ptes[&(root, gva)];
                    a.mov(rax, gpa | TABLE_FLAGS)?;
                    a.mov(rdi, leaf)?;
                    a.mov(qword_ptr(rdi), rax)?;
                }
                Op::WalkPte { root, region, page } => {
                    for &entry in &paths[&(root, spec.regions[region].gva + page * PAGE)] {
                        a.mov(rdi, entry)?;
                        a.mov(rax, qword_ptr(rdi))?;
                    }
                }
                Op::Invlpg { region, page } => {
                    a.mov(eax, UD_INVLPG as u32)?;
                    a.mov(rdi, spec.regions[region].gva + page * PAGE)?;
                    enter_kernel(a, spec.kernel_entry)?;
                }
                Op::SwitchRoot(r) => {
                    a.mov(eax, UD_MOV_CR3 as u32)?;
                    a.mov(rdi, roots[r])?;
                    enter_kernel(a, spec.kernel_entry)?;
                }
                Op::CopyRoot(r) => {
                    let mut lp = a.create_label();
                    a.mov(rsi, roots[0])?;
                    a.mov(rdi, roots[r])?;
                    a.mov(ecx, 512u32)?;
                    a.set_label(&mut lp)?;
                    a.mov(rax, qword_ptr(rsi))?;
                    a.mov(qword_ptr(rdi), rax)?;
                    a.add(rsi, 8)?;
                    a.add(rdi, 8)?;
                    a.dec(rcx)?;
                    a.jnz(lp)?;
                }
            }
        }
        if phase.repeat > 1 {
            a.dec(r14d)?;
            a.jnz(top)?;
        }
        phase_end(a, index)?;
    }
    let mut done = a.create_label();
    a.set_label(&mut done)?;
    a.out(PORT_DONE as i32, eax)?;
    a.jmp(done)
}

fn enter_kernel(a: &mut CodeAssembler, how: KernelEntry) -> Result<(), IcedError> {
    match how {
        KernelEntry::Ud2 => a.ud2(),
        KernelEntry::Int3 => a.int3(),
    }
}

/// The ring-0 handlers: #UD (after `ud2`) and #BP (after `int3`) do the requested `invlpg` / `mov cr3`, skips the `ud2` and
/// returns with `iretq` (#UD first skips the `ud2`; #BP is a trap, its saved RIP is already
/// past the `int3`); every other vector reports itself on [`PORT_FATAL`] and halts.
fn emit_handlers(a: &mut CodeAssembler) -> Result<Vec<CodeLabel>, IcedError> {
    let mut labels = Vec::new();
    for vector in 0..u32::from(IDT_VECTORS) {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        if vector == 6 || vector == 3 {
            let mut not_invlpg = a.create_label();
            let mut not_cr3 = a.create_label();
            let mut done = a.create_label();
            a.cmp(rax, UD_INVLPG)?;
            a.jne(not_invlpg)?;
            a.invlpg(byte_ptr(rdi))?;
            a.jmp(done)?;
            a.set_label(&mut not_invlpg)?;
            a.cmp(rax, UD_MOV_CR3)?;
            a.jne(not_cr3)?;
            a.mov(cr3, rdi)?;
            a.set_label(&mut done)?;
            if vector == 6 {
                a.add(qword_ptr(rsp), 2)?; // skip ud2 (0f 0b)
            }
            a.iretq()?;
            a.set_label(&mut not_cr3)?;
        }
        let mut halt = a.create_label();
        a.mov(eax, vector)?;
        a.out(PORT_FATAL as i32, eax)?;
        a.set_label(&mut halt)?;
        a.hlt()?;
        a.jmp(halt)?;
        labels.push(l);
    }
    Ok(labels)
}

/// Runs the workload on the backend's model of the guest's tables: which frame each write
/// lands in, which A/D bits each PTE ends with, and where each region page maps at the end.
fn simulate(spec: &WorkloadSpec, ptes: &mut HashMap<(usize, u64), (u64, u64)>) -> Expected {
    let mut e = Expected::default();
    let mut root = 0usize;
    let mut seq = 1u64;
    // PTE values by the PTE's address: a copied root's entries alias root 0's.
    let mut vals: HashMap<u64, u64> = ptes.values().map(|&(at, v)| (at, v)).collect();
    let leaf = |r: usize, gva: u64| ptes.get(&(r, gva)).expect("mapped").0;
    for phase in &spec.phases {
        for _ in 0..phase.repeat {
            for op in &phase.ops {
                match *op {
                    Op::Touch { region, first, pages, access } => {
                        for p in first..first + pages {
                            let gva = spec.regions[region].gva + p * PAGE;
                            let pte = vals.get_mut(&leaf(root, gva)).expect("mapped");
                            *pte |= PTE_A;
                            if access == Access::Write {
                                *pte |= PTE_D;
                                e.writes.insert(*pte & PTE_ADDR, seq);
                                seq += 1;
                            }
                        }
                    }
                    Op::SetPte { root: r, region, page, gpa } => {
                        let gva = spec.regions[region].gva + page * PAGE;
                        vals.insert(leaf(r, gva), gpa | TABLE_FLAGS);
                    }
                    Op::Invlpg { .. } | Op::WalkPte { .. } | Op::CopyRoot(_) => {}
                    Op::SwitchRoot(r) => root = r,
                }
            }
        }
    }
    e.ptes = vals.iter().map(|(&at, &v)| (at, v)).collect();
    e.final_root = root;
    for r in &spec.regions {
        for p in [0, r.pages / 2, r.pages - 1] {
            let gva = r.gva + p * PAGE + 0x123;
            let gpa = (vals[&leaf(root, gva & !(PAGE - 1))] & PTE_ADDR) + 0x123;
            if !e.translations.contains(&(gva, gpa)) {
                e.translations.push((gva, gpa));
            }
        }
    }
    e.translations.push((CODE_GPA + 0x10, CODE_GPA + 0x10));
    for (at, v) in ptes.values_mut() {
        *v = vals[at];
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_every_workload_and_predicts_writes() {
        let g = build(&WorkloadSpec::first_touch(1000)).unwrap();
        assert_eq!(g.expected.writes.len(), 1000);
        // Second pass overwrote the first: the first page holds 1001.
        assert_eq!(g.expected.writes[&DATA_GPA], 1001);
        assert!(g.expected.ptes.values().all(|v| v & (PTE_A | PTE_D) == PTE_A | PTE_D));

        let g = build(&WorkloadSpec::write_after_read(10)).unwrap();
        assert_eq!(g.expected.writes.len(), 10);

        let g = build(&WorkloadSpec::pte_rewrite(5)).unwrap();
        // Frames A and B each got writes; the page ends mapped to frame A.
        assert_eq!(g.expected.writes.len(), 2);
        assert_eq!(g.expected.translations[0].1 & !0xfff, DATA_GPA);

        let g = build(&WorkloadSpec::cr3_switch(64, 3)).unwrap();
        assert_eq!(g.roots.len(), 2);
        assert_eq!(g.expected.final_root, 1);
        assert_eq!(g.expected.writes.len(), 128);
    }

    #[test]
    fn copied_root_shares_root0s_tables() {
        let mut s = WorkloadSpec::first_touch(8);
        s.roots = 2;
        s.regions[0].gpa = vec![DATA_GPA, DATA_GPA];
        s.phases[1].ops.insert(0, Op::CopyRoot(1));
        s.phases[1].ops.insert(1, Op::SwitchRoot(1));
        let g = build(&s).unwrap();
        // Root 1's page stays empty until the guest copies it.
        assert_eq!(g.mem.read_obj::<u64>(GuestAddress(g.roots[1])).unwrap(), 0);
        assert_eq!(g.expected.final_root, 1);
        assert_eq!(g.expected.ptes.len(), 8, "one set of leaf PTEs, shared");
        assert_eq!(g.expected.writes[&DATA_GPA], 9);

        let mut bad = s.clone();
        bad.regions[0].gpa[1] = DATA_GPA + 0x10_0000;
        assert!(matches!(build(&bad), Err(KvmError::Workload(_))));
        let mut early = s.clone();
        early.phases[0].ops.insert(0, Op::SwitchRoot(1));
        assert!(matches!(build(&early), Err(KvmError::Workload(_))));
    }

    #[test]
    fn rejects_bad_specs() {
        let mut s = WorkloadSpec::first_touch(1);
        s.regions[0].gva = 0x1000;
        assert!(matches!(build(&s), Err(KvmError::Workload(_))));
        assert!(matches!(build(&WorkloadSpec::first_touch(1 << 20)), Err(KvmError::Workload(_))));
    }
}
