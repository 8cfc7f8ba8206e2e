//! The library behind the `vmmu` command: scenario files, the runner that builds a VM from
//! one and drives the guest through its phases, the reports, and sweeps over grids of
//! configurations with their plots.
#![warn(missing_docs)]

pub mod bench;
pub mod chart;
pub mod clock;
pub mod compare;
pub mod compare_trace;
pub mod dirty_log;
pub mod error;
pub mod explain;
pub mod idle;
pub mod machine;
pub mod migrate;
pub mod ops;
pub mod out;
pub mod record;
pub mod replay;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod size;
pub mod svg;
pub mod sweep;

/// The scenario `vmmu run` runs when given no file.
pub const DEFAULT_SCENARIO: &str = include_str!("../../../scenarios/default.toml");
