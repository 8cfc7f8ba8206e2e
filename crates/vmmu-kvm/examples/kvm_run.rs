//! Runs one built-in workload on /dev/kvm and prints the result as JSON, or a table.
//!
//! ```sh
//! cargo run -p vmmu-kvm --example kvm_run -- first-touch 4096
//! cargo run -p vmmu-kvm --example kvm_run -- cr3-switch 256 10 --int3 --json
//! ```

use vmmu_kvm::{run_workload, KernelEntry, WorkloadSpec};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let nums: Vec<u64> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let n = nums.first().copied().unwrap_or(1024);
    let iters = nums.get(1).copied().unwrap_or(10);
    let count = |v: u64, what: &str| {
        u32::try_from(v).unwrap_or_else(|_| {
            eprintln!("{what} {v} is too large (at most {})", u32::MAX);
            std::process::exit(2);
        })
    };
    let spec = match args.first().map(String::as_str) {
        Some("first-touch") | None => WorkloadSpec::first_touch(n),
        Some("write-after-read") => WorkloadSpec::write_after_read(n),
        Some("pte-rewrite") => WorkloadSpec::pte_rewrite(count(n, "iteration count")),
        Some("cr3-switch") => WorkloadSpec::cr3_switch(n, count(iters, "iteration count")),
        Some(other) => {
            eprintln!("unknown workload {other}: first-touch, write-after-read, pte-rewrite, cr3-switch");
            std::process::exit(2);
        }
    };
    let spec = if flag("--int3") { spec.with_kernel_entry(KernelEntry::Int3) } else { spec };
    if flag("--trace") {
        // Print the captured tracepoints per phase.
        match vmmu_kvm::run_workload_traced(&spec) {
            Ok((run, t)) => {
                println!("{} on {}; {}; lost {}", run.workload, run.host, t.how, t.lost);
                let show = |name: &str, evs: &[vmmu_kvm::TraceEvent]| {
                    println!("== {name} ({} events)", evs.len());
                    for e in evs {
                        println!("  {:>14} [{:03}] {}-{}: {}: {}", e.ts_ns, e.cpu, e.task, e.pid, e.name, e.fields);
                    }
                };
                show("setup", &t.setup);
                for (p, evs) in run.phases.iter().zip(&t.phases) {
                    show(&p.name, evs);
                }
                show("after", &t.after);
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    match run_workload(&spec) {
        Ok(run) if flag("--json") => println!("{}", serde_json::to_string_pretty(&run).expect("serializable")),
        Ok(run) => {
            println!("{} on {}", run.workload, run.host);
            for p in &run.phases {
                let s: Vec<String> = p
                    .stats()
                    .into_iter()
                    .filter(|(k, v)| *v != 0 && !k.contains("hist") && !k.starts_with("halt"))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!("{:<12} {:>10} ns  {}", p.name, p.wall_ns, s.join(" "));
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
