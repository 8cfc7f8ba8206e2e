//! `vmmu`: run scenarios on the KVM MMU model and report KVM's statistics and traces.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use vmmu_cli::error::RunError;
use vmmu_cli::out::{self, MAX_INPUT_BYTES};
use vmmu_cli::runner::{self, RunOptions, TraceMode};
use vmmu_cli::scenario::Scenario;
use vmmu_cli::{compare, report, DEFAULT_SCENARIO};

/// `eprintln!` without its panic when standard error cannot be written (`2>/dev/full`):
/// there is nowhere left to report that.
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// `eprint!` without its panic (see [`errln`]).
macro_rules! errs {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($t)*);
    }};
}

/// Writes `text` to standard output; on failure returns from the calling function with the
/// exit status [`stdout_failed`] gives.
macro_rules! print_out {
    ($text:expr) => {
        if let Err(e) = out::write_out(&$text) {
            return stdout_failed(&e);
        }
    };
}

/// The exit status when standard output cannot be written: a closed pipe (`| head -1`)
/// ends the command quietly with status 0, as the reader wanted no more; anything else
/// (ENOSPC on `> /dev/full`) is reported, status 1.
fn stdout_failed(e: &(dyn std::error::Error + 'static)) -> ExitCode {
    if out::is_broken_pipe(e) {
        return ExitCode::SUCCESS;
    }
    errln!("vmmu: writing to standard output: {e}");
    ExitCode::FAILURE
}

#[derive(Parser)]
#[command(name = "vmmu", version, about = "The Linux KVM x86 MMU as a program you can run, trace and measure")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Trace {
    /// Tracepoints, one line each.
    Events,
    /// Nested calls with durations.
    #[value(name = "function_graph", alias = "function-graph")]
    FunctionGraph,
}

#[derive(Clone, Copy, ValueEnum)]
enum InputKind {
    /// valgrind --tool=lackey --trace-mem=yes output.
    Lackey,
    /// ChampSim binary trace (input_instr records).
    Champsim,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario (the embedded default when no file is given).
    Run {
        /// Scenario file (TOML).
        scenario: Option<PathBuf>,
        /// MMU: tdp, shadow or legacy-tdp.
        #[arg(long)]
        mmu: Option<String>,
        /// Replace the phases with two passes of this workload (first-touch, re-touch,
        /// read-then-write, read, random, zipf).
        #[arg(long)]
        workload: Option<String>,
        /// Pages for --workload.
        #[arg(long)]
        pages: Option<u64>,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Trace the run: kernel tracepoints or the function_graph tracer.
        #[arg(long, value_enum)]
        trace: Option<Trace>,
        /// Write the trace to this file instead of standard output. A name ending in `.json`
        /// gets the Chrome/Perfetto trace-event format (tracepoints and function spans on a
        /// timeline per vCPU, whichever --trace is given).
        #[arg(long)]
        trace_out: Option<PathBuf>,
        /// Replay a recorded memory trace (`vmmu record`) as the guest process's workload:
        /// two passes over it replace the phases.
        #[arg(long, value_name = "TRACE")]
        replay: Option<PathBuf>,
        /// Guest RAM for --replay without a scenario file (default: sized from the trace).
        #[arg(long, value_name = "SIZE")]
        guest_memory: Option<String>,
    },
    /// Record a program's memory accesses under valgrind lackey into a binary trace.
    Record {
        /// Output trace file (`-` for standard output); default PROGRAM.vtrace.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Leave out the first N accesses (the program's start-up: dynamic loading).
        #[arg(long, default_value_t = 0, value_name = "N")]
        skip: u64,
        /// Stop after this many records (the program is killed there).
        #[arg(long)]
        limit: Option<u64>,
        /// The program and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "PROGRAM")]
        program: Vec<std::ffi::OsString>,
    },
    /// Convert a saved lackey log or a ChampSim trace (raw or .xz) to vmmu's trace format.
    Convert {
        /// Input format.
        #[arg(long, value_enum)]
        from: InputKind,
        /// Input file.
        input: PathBuf,
        /// Output trace file (`-` for standard output).
        #[arg(short, long)]
        output: PathBuf,
        /// Stop after this many records.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Run a scenario on vmmu and on the real KVM (/dev/kvm) and compare every MMU statistic
    /// per phase. Exit status 3: /dev/kvm not available (only the vmmu column is printed).
    Compare {
        /// Scenario file (TOML, identity layout at CPL3; see scenarios/compare/).
        scenario: PathBuf,
        /// vmmu MMU; must match the host's KVM (shadow with shadow, TDP with TDP).
        #[arg(long)]
        mmu: Option<String>,
        /// Print one JSON object instead of the tables.
        #[arg(long)]
        json: bool,
        /// `events`: also capture the real KVM's kvmmmu tracepoints from tracefs (root) and
        /// vmmu's, and show both streams per phase aligned, first divergence marked.
        #[arg(long, value_enum)]
        trace: Option<Trace>,
    },
    /// Explain the translation of a guest-virtual address on vCPU 0 at the end of a scenario
    /// (or after one of its phases): the 2D walk or the shadow walk, step by step.
    Explain {
        /// The guest-virtual address (hex with 0x, or decimal).
        gva: String,
        /// Scenario file (TOML; the embedded default when not given).
        scenario: Option<PathBuf>,
        /// MMU: tdp, shadow or legacy-tdp (default: the scenario's).
        #[arg(long)]
        mmu: Option<String>,
        /// Stop after this phase instead of running them all.
        #[arg(long, value_name = "NAME")]
        after_phase: Option<String>,
        /// The access to explain: read, write or fetch.
        #[arg(long, default_value = "read")]
        access: String,
        /// Also draw the walk as an SVG diagram into this file.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Run a grid of configurations (mmu x host backing x guest page x A/D x workload) in
    /// parallel and write results.jsonl, results.csv, SVG plots and index.html.
    Sweep {
        /// Grid file (TOML: mmu, backing, guest_page, ad, workload, pages); default: the
        /// built-in 96-cell grid.
        #[arg(long, value_name = "FILE.toml")]
        grid: Option<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "sweep-out", value_name = "DIR")]
        out: PathBuf,
        /// Cells run at once (default: all cores).
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Data pages per cell (overrides the grid's).
        #[arg(long, value_name = "N")]
        pages: Option<u64>,
    },
    /// Print the embedded default scenario.
    DefaultScenario,
    /// Run the micro-benchmarks of the MMU's hot paths.
    Bench {
        /// Iterations per benchmark.
        #[arg(long, default_value_t = 200_000)]
        iters: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version go to standard output: print them without a panic too.
            if !e.use_stderr() {
                print_out!(e.render().to_string());
                return ExitCode::SUCCESS;
            }
            if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                errs!("{}", e.render());
            } else {
                errln!("vmmu: {}", one_line(&e.render().to_string()));
            }
            return ExitCode::from(2);
        }
    };
    match cli.cmd {
        Cmd::Run { scenario, mmu, workload, pages, json, trace, trace_out, replay, guest_memory } => run(
            scenario,
            RunOptions {
                trace_records: trace_out.as_deref().is_some_and(is_chrome_trace),
                mmu,
                workload,
                pages,
                trace: match trace {
                    None => TraceMode::Off,
                    Some(Trace::Events) => TraceMode::Events,
                    Some(Trace::FunctionGraph) => TraceMode::FunctionGraph,
                },
                replay,
                fault_timing: false,
                trace_stream: None,
            },
            guest_memory,
            json,
            trace_out,
        ),
        Cmd::Record { output, skip, limit, program } => {
            let output = output.unwrap_or_else(|| {
                let name = PathBuf::from(&program[0]);
                let stem = name.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "trace".into());
                PathBuf::from(format!("{stem}.vtrace"))
            });
            finish_record(vmmu_cli::record::record(&program, &output, skip, limit))
        }
        Cmd::Convert { from, input, output, limit } => {
            let f = match from {
                InputKind::Lackey => vmmu_cli::record::InputFormat::Lackey,
                InputKind::Champsim => vmmu_cli::record::InputFormat::ChampSim,
            };
            finish_record(vmmu_cli::record::convert(f, &input, &output, limit))
        }
        Cmd::Compare { scenario, mmu, json, trace } => compare(&scenario, mmu, json, trace),
        Cmd::Explain { gva, scenario, mmu, after_phase, access, svg } => {
            explain(&gva, scenario.as_ref(), mmu, after_phase.as_deref(), &access, svg.as_deref())
        }
        Cmd::Sweep { grid, out, jobs, pages } => sweep(grid.as_deref(), &out, jobs, pages),
        Cmd::DefaultScenario => {
            print_out!(DEFAULT_SCENARIO);
            ExitCode::SUCCESS
        }
        Cmd::Bench { iters, json } => {
            if let Err(e) = vmmu_cli::bench::check_iters(iters) {
                errln!("vmmu: bench: --iters: {e}");
                return ExitCode::from(2);
            }
            match vmmu_cli::bench::run_all(iters) {
                Ok(r) => {
                    print_out!(format!(
                        "{}\n",
                        if json { vmmu_cli::bench::json(&r) } else { vmmu_cli::bench::text(&r) }
                    ));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    errln!("vmmu: bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// clap's error on one line: its lines joined with "; ", without the usage line.
fn one_line(text: &str) -> String {
    let mut out = String::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("Usage:")) {
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(l);
    }
    out.trim_start_matches("error: ").to_string()
}

fn finish_record(r: Result<vmmu_cli::record::RecordReport, vmmu_cli::record::RecordError>) -> ExitCode {
    match r {
        Ok(r) => {
            // With the trace on standard output (`-o -`) the report goes to standard error.
            if r.output.as_os_str() == "-" {
                errs!("{}", r.text());
            } else {
                print_out!(r.text());
            }
            ExitCode::SUCCESS
        }
        // The trace went to standard output and its reader went away (`-o - | head -c N`).
        Err(e) if out::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("vmmu: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads an input file (scenario or grid) and parses it. The error is one line: why the file
/// cannot be read, or `FILE: ` and the parse error's message. The parse error is printed with
/// `{}`, not by walking its chain: its message already includes its source's (a TOML error's
/// own text spans several lines).
fn parse_file<T, E: std::fmt::Display>(path: &Path, parse: impl FnOnce(&str) -> Result<T, E>) -> Result<T, String> {
    let text = out::read_text(path, MAX_INPUT_BYTES).map_err(|e| e.to_string())?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The scenario to run: the file, the replay's own, or the embedded default. Its error is
/// one message, printed with `{}`: the replay's [`vmmu_cli::error::ConfigError`] and a file's
/// [`vmmu_cli::out::InputError`] keep their sources, whose text their own messages already
/// include (`{:#}` would repeat it).
fn load_scenario(
    path: Option<&PathBuf>,
    opts: &RunOptions,
    guest_memory: Option<String>,
) -> anyhow::Result<(String, Scenario)> {
    if let (Some(_), Some(_)) = (path, &guest_memory) {
        anyhow::bail!("--guest-memory: only with --replay and no scenario file (the scenario's memslots say)");
    }
    if let (None, Some(t)) = (path, &opts.replay) {
        let mem = match guest_memory {
            Some(g) => Some(vmmu_cli::size::parse_size(&g).map_err(|e| anyhow::anyhow!("--guest-memory: {e}"))?),
            None => None,
        };
        return Ok(("<replay>".into(), vmmu_cli::replay::scenario_for(t, mem)?));
    }
    if guest_memory.is_some() {
        anyhow::bail!("--guest-memory: only with --replay");
    }
    let (name, text) = match path {
        None => ("<default scenario>".to_string(), DEFAULT_SCENARIO.to_string()),
        Some(p) => (p.display().to_string(), out::read_text(p, MAX_INPUT_BYTES)?),
    };
    let s = Scenario::parse(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    Ok((name, s))
}

fn run(
    path: Option<PathBuf>,
    opts: RunOptions,
    guest_memory: Option<String>,
    json: bool,
    trace_out: Option<PathBuf>,
) -> ExitCode {
    if let Some(p) = &trace_out {
        if opts.trace == TraceMode::Off {
            errln!(
                "vmmu: --trace-out {}: needs --trace (events or function_graph): there is no trace to write",
                p.display()
            );
            return ExitCode::from(2);
        }
        if let Err(e) = out::check_writable(p) {
            errln!("vmmu: --trace-out: {e}");
            return ExitCode::from(2);
        }
    }
    let (name, scenario) = match load_scenario(path.as_ref(), &opts, guest_memory) {
        Ok(x) => x,
        Err(e) => {
            errln!("vmmu: {e}");
            return ExitCode::from(2);
        }
    };
    let mut opts = opts;
    if opts.trace == TraceMode::Events && !opts.trace_records {
        // The text trace is written as the run goes, not kept until its end.
        let out: Box<dyn std::io::Write + Send> = match &trace_out {
            Some(p) => match std::fs::File::create(p) {
                Ok(f) => Box::new(std::io::BufWriter::new(f)),
                Err(e) => {
                    errln!("vmmu: --trace-out: cannot create {}: {e}", p.display());
                    return ExitCode::from(2);
                }
            },
            None => Box::new(std::io::BufWriter::new(std::io::stdout())),
        };
        opts.trace_stream = Some(runner::TraceStream::new(out));
    }
    let show_progress = !json && std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let mut shown = false;
    let result = runner::run_compare(&scenario, &opts, |phase, frac| {
        if show_progress && t0.elapsed().as_secs_f64() > 1.0 {
            errs!("\r  {phase}: {:>3.0}%   ", frac * 100.0);
            shown = true;
        }
    });
    if shown {
        errs!("\r{:40}\r", "");
    }
    if let Some(t) = &opts.trace_stream {
        match (t.error(), &trace_out) {
            // The trace's reader went away (`| head`): end quietly, as Unix tools do.
            (Some(std::io::ErrorKind::BrokenPipe), _) => return ExitCode::SUCCESS,
            (Some(_), None) => {
                errln!("vmmu: writing to standard output: {}", t.error_message().unwrap_or_default());
                return ExitCode::FAILURE;
            }
            (Some(_), Some(p)) => {
                errln!("vmmu: --trace-out {}: {}", p.display(), t.error_message().unwrap_or_default());
                return ExitCode::FAILURE;
            }
            (None, _) => {}
        }
    }
    match result {
        Ok(r) => match output(&r, &scenario, json, trace_out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Output::Stdout(e)) => stdout_failed(&e),
            Err(Output::File(e)) => {
                errln!("vmmu: {e:#}");
                ExitCode::FAILURE
            }
        },
        Err(RunError::Config(e)) => {
            errln!("vmmu: {name}: {e}");
            ExitCode::from(2)
        }
        Err(RunError::Failed(e)) => {
            errln!("vmmu: {name}: run failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `vmmu explain`: exit status 2 for bad input, 1 if the run failed, 0 otherwise (also when
/// the walk faults: that is explained, not an error).
fn explain(
    gva: &str,
    path: Option<&PathBuf>,
    mmu: Option<String>,
    after_phase: Option<&str>,
    access: &str,
    svg: Option<&Path>,
) -> ExitCode {
    use vmmu::x86_paging::access::AccessKind;
    let parsed = match gva.strip_prefix("0x").or_else(|| gva.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(&h.replace('_', ""), 16),
        None => gva.replace('_', "").parse(),
    };
    let Ok(addr) = parsed else {
        errln!("vmmu: GVA: `{gva}` is not an address (hex with 0x, or decimal)");
        return ExitCode::from(2);
    };
    let kind = match access {
        "read" => AccessKind::Read,
        "write" => AccessKind::Write,
        "fetch" => AccessKind::Fetch,
        other => {
            errln!("vmmu: --access: `{other}` is not one of read, write, fetch");
            return ExitCode::from(2);
        }
    };
    if let Some(p) = svg {
        if let Err(e) = out::check_writable(p) {
            errln!("vmmu: --svg: {e}");
            return ExitCode::from(2);
        }
    }
    let opts = RunOptions { mmu, ..RunOptions::default() };
    let (name, scenario) = match load_scenario(path, &opts, None) {
        Ok(x) => x,
        Err(e) => {
            errln!("vmmu: {e}");
            return ExitCode::from(2);
        }
    };
    let m = match runner::run_to(&scenario, &opts, after_phase) {
        Ok(m) => m,
        Err(RunError::Config(e)) => {
            errln!("vmmu: {name}: {e}");
            return ExitCode::from(2);
        }
        Err(RunError::Failed(e)) => {
            errln!("vmmu: {name}: run failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let e = match vmmu_cli::explain::explain(&m.kvm, &m.vcpus[0], addr, kind) {
        Ok(e) => e,
        Err(e) => {
            errln!("vmmu: {name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mmu_name = opts.mmu.clone().unwrap_or_else(|| scenario.vm.mmu.clone());
    let title = format!(
        "{} ({mmu_name}) {}",
        scenario.name,
        after_phase.map_or_else(|| "at the end".to_string(), |p| format!("after phase {p}"))
    );
    print_out!(e.text(&title));
    if let Some(p) = svg {
        if let Err(err) = std::fs::write(p, e.svg(&title)) {
            errln!("vmmu: writing {}: {err}", p.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// `vmmu compare`: exit status 0 when both sides ran, 3 when /dev/kvm is not available (the
/// vmmu column is still printed), 2 for a scenario that cannot be compared, 1 if a run failed.
fn compare(path: &Path, mmu: Option<String>, json: bool, trace: Option<Trace>) -> ExitCode {
    let name = path.display().to_string();
    let trace_events = match trace {
        None => false,
        Some(Trace::Events) => true,
        Some(Trace::FunctionGraph) => {
            errln!("vmmu: compare --trace: only `events` can be compared with the real KVM (not function_graph)");
            return ExitCode::from(2);
        }
    };
    let scenario = match parse_file(path, Scenario::parse) {
        Ok(s) => s,
        Err(e) => {
            errln!("vmmu: {e}");
            return ExitCode::from(2);
        }
    };
    let no_kvm = std::env::var_os(compare::NO_KVM_ENV).is_some_and(|v| v != "0");
    match compare::compare(&scenario, &compare::CompareOptions { mmu, no_kvm, trace_events }) {
        Ok(c) => {
            if json {
                print_out!(format!("{}\n", compare::json(&c)));
            } else {
                print_out!(compare::text(&c, &scenario.description));
            }
            match &c.kvm_unavailable_reason {
                None => ExitCode::SUCCESS,
                Some(r) => {
                    errln!("vmmu compare: /dev/kvm not available ({r}): printed the vmmu column only (exit status 3)");
                    ExitCode::from(3)
                }
            }
        }
        Err(e) if e.is_config() => {
            errln!("vmmu: {name}: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            errln!("vmmu: {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `--trace-out` names a Chrome/Perfetto trace (`*.json`).
fn is_chrome_trace(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Writes the runs' trace records as one Chrome/Perfetto trace-event file, a process per run.
fn write_chrome_trace(runs: &[runner::RunResult], p: &Path) -> anyhow::Result<()> {
    use vmmu::trace::chrome::{write_chrome_json, ChromeOptions, ChromeProcess};
    let names: Vec<String> = runs.iter().map(|r| format!("vmmu {} ({})", r.scenario, r.mmu)).collect();
    let procs: Vec<ChromeProcess<'_>> =
        runs.iter().zip(&names).map(|(r, name)| ChromeProcess { name, records: &r.trace_records }).collect();
    let f = std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let sum = write_chrome_json(&mut w, &procs, &ChromeOptions::default())
        .and_then(|s| std::io::Write::flush(&mut w).map(|_| s))
        .with_context(|| format!("writing the trace to {}", p.display()))?;
    if sum.dropped > 0 {
        errln!("vmmu: {}: trace capped at {} events ({} later events left out)", p.display(), sum.events, sum.dropped);
    }
    Ok(())
}

/// Why `vmmu run` could not write its output.
enum Output {
    /// Standard output failed (a closed pipe, a full disk).
    Stdout(std::io::Error),
    /// Writing `--trace-out` failed.
    File(anyhow::Error),
}

fn output(runs: &[runner::RunResult], s: &Scenario, json: bool, trace_out: Option<PathBuf>) -> Result<(), Output> {
    let mut text = String::new();
    match (json, runs) {
        (true, [r]) => text = format!("{}\n", report::json(r)),
        (true, rs) => text = format!("{}\n", report::json_compare(rs)),
        (false, rs) => {
            for (i, r) in rs.iter().enumerate() {
                if i > 0 {
                    text.push('\n');
                }
                text.push_str(&report::text(r, if i == 0 { &s.description } else { "" }));
            }
            if rs.len() > 1 {
                text.push('\n');
                text.push_str(&report::side_by_side(rs));
            }
        }
    }
    out::write_out(&text).map_err(Output::Stdout)?;
    if let Some(p) = trace_out.as_deref().filter(|p| is_chrome_trace(p)) {
        if runs.iter().any(|r| !r.trace_records.is_empty()) {
            write_chrome_trace(runs, p).map_err(Output::File)?;
        }
        return Ok(());
    }
    let traces: Vec<&String> = runs.iter().filter_map(|r| r.trace.as_ref()).collect();
    if !traces.is_empty() {
        let all: String = traces.into_iter().cloned().collect::<Vec<_>>().join("\n");
        match trace_out {
            Some(p) => std::fs::write(&p, all)
                .with_context(|| format!("writing the trace to {}", p.display()))
                .map_err(Output::File)?,
            None => out::write_out(&all).map_err(Output::Stdout)?,
        }
    }
    Ok(())
}

/// `vmmu sweep`: exit status 0 when every cell ran, 1 when some failed (the outputs are
/// still written) or the outputs could not be written, 2 for a bad grid or flag.
fn sweep(grid: Option<&Path>, out_dir: &Path, jobs: Option<usize>, pages: Option<u64>) -> ExitCode {
    use vmmu_cli::sweep::{self, Grid};
    let parsed = match grid {
        None => Ok(Grid::default()),
        Some(p) => parse_file(p, Grid::parse),
    };
    let mut g = match parsed {
        Ok(g) => g,
        Err(e) => {
            errln!("vmmu sweep: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(n) = pages {
        g.pages = n;
    }
    if let Err(e) = g.validate() {
        errln!("vmmu sweep: {}{e}", if pages.is_some() { "--" } else { "" });
        return ExitCode::from(2);
    }
    if jobs == Some(0) {
        errln!("vmmu sweep: --jobs: must be > 0");
        return ExitCode::from(2);
    }
    if let Err(e) = out::check_writable_dir(out_dir) {
        errln!("vmmu sweep: --out: {e}");
        return ExitCode::from(2);
    }
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let cells = g.cells();
    let tty = std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let bar = |done: usize, total: usize, r: &sweep::CellResult| {
        if !tty {
            return;
        }
        let width = 30;
        let filled = done * width / total.max(1);
        errs!(
            "\r\x1b[2K[{}{}] {done}/{total} cells {:>5.1} s  {}{}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            t0.elapsed().as_secs_f64(),
            r.config.id(),
            if r.run.is_err() { " FAILED" } else { "" }
        );
    };
    let results = sweep::run_cells(&cells, jobs, &bar);
    if tty {
        errs!("\r\x1b[2K");
    }
    let info = sweep::SweepInfo { grid: g, jobs, wall_ns: vmmu_cli::clock::elapsed_ns(t0) };
    let failed: Vec<&sweep::CellResult> = results.iter().filter(|r| r.run.is_err()).collect();
    for r in &failed {
        if let Err(e) = &r.run {
            errln!("vmmu sweep: {}: {e}", r.config.id());
        }
    }
    if let Err(e) = sweep::write_outputs(out_dir, &results, &info) {
        errln!("vmmu sweep: {e}");
        return ExitCode::FAILURE;
    }
    errln!(
        "vmmu sweep: {} cells ({} ok, {} failed) in {:.1} s on {jobs} threads; wrote {} ({})",
        results.len(),
        results.len() - failed.len(),
        failed.len(),
        info.wall_ns as f64 / 1e9,
        out_dir.display(),
        sweep::FILES.join(", ")
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
