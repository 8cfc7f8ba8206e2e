//! A loop of guest stores to a write-tracked page directory under shadow paging, for
//! profiling the write-tracking path (`perf record ./target/release/examples/shadow_pte_write`).

use vmmu::x86_paging::addr::Gva;
use vmmu_cli::machine::build;
use vmmu_cli::scenario::Scenario;

fn main() {
    let toml =
        "name = \"p\"\n[vm]\nmmu = \"shadow\"\n[[memslot]]\ngpa = 0\nsize = \"2GiB\"\n[guest]\nlayout = \"identity\"\n";
    let mut m = build(&Scenario::parse(toml).expect("scenario"), None).expect("vm");
    let x = 1u64 << 30;
    let v = &mut m.vcpus[0];
    v.write(Gva::new(x), 8, 1).expect("touch");
    // The PDE of x: walk the identity tables.
    let mut table = v.cpu().paging().cr3 & 0x000f_ffff_ffff_f000;
    for l in (3..=4u32).rev() {
        let at = table + ((x >> (12 + 9 * (l - 1))) & 511) * 8;
        table = v.read(Gva::new(at), 8).expect("walk") & 0x000f_ffff_ffff_f000;
    }
    let pde_at = table + ((x >> 21) & 511) * 8;
    let pde = v.read(Gva::new(pde_at), 8).expect("pde");
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let t = std::time::Instant::now();
    for i in 0..n {
        v.write(Gva::new(pde_at), 8, pde).expect("store");
        v.read(Gva::new(x + (i % 512) * 4096), 8).expect("load");
    }
    println!("{:.0} ns per store+load", t.elapsed().as_nanos() as f64 / n as f64);
}
