//! Live migration must not lose guest writes, whatever ran before it (issue 9's reproducer):
//! idle tracking without EPT A/D bits leaves every SPTE of the slot access-tracked but still
//! writable in the vCPU's TLB; enabling dirty logging must flush anyway, or the guest's
//! writes during pre-copy bypass the log and the stop-and-copy check finds pages that differ.

use vmmu_cli::runner::{run, RunOptions};
use vmmu_cli::scenario::Scenario;

fn scenario(vm: &str, before: &str) -> Scenario {
    let toml = format!(
        r#"name = "dirty-log-miss"
[vm]
{vm}
[[memslot]]
gpa = "0"
size = "64MiB"
[guest]
layout = "identity"
[[phase]]
name = "p"
ops = [
  {before}
  {{ op = "migrate", slot = 0, workload = "first-touch", start = "32MiB", pages = 64, max_rounds = 1 }},
]
"#
    );
    Scenario::parse(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

#[test]
fn migrate_after_idle_tracking_loses_no_write() {
    let idle = r#"{ op = "idle-tracking", slot = 0, workload = "random", start = "32MiB", pages = 64, passes = 1 },"#;
    let idle_read =
        r#"{ op = "idle-tracking", slot = 0, workload = "read", start = "32MiB", pages = 64, passes = 2 },"#;
    for before in [idle, idle_read, ""] {
        for vm in ["eptad = false", "eptad = true", "eptad = true\npml = false", "tdp = \"npt\""] {
            for mmu in ["tdp", "legacy-tdp", "shadow"] {
                let s = scenario(vm, before);
                let opts = RunOptions { mmu: Some(mmu.into()), ..Default::default() };
                if let Err(e) = run(&s, &opts, |_, _| {}) {
                    panic!("{mmu}, {vm}, after {before:?}: {e}");
                }
            }
        }
    }
}
