//! The commands that write: `produce` (through a normal, locked `Queue`) and
//! `repair` (through `walq::inspect::RepairPlan`, which holds the lock).

use std::io::{self, BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde_json::json;
use walq::{Durability, Queue, Record};

use crate::{CmdResult, Failure, output};

/// Records gathered into one `append_batch` (one fdatasync when durable).
const PRODUCE_BATCH_RECORDS: usize = 1000;
/// Bytes gathered into one `append_batch`, at most (one more record may pass it).
const PRODUCE_BATCH_BYTES: usize = 1 << 20;

/// How durable `produce` makes each batch of lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    /// fdatasync before going on (walq's default).
    Sync,
    /// Hand to the OS; one flush (fdatasync) at the end.
    Os,
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Durability {
        match d {
            DurabilityArg::Sync => Durability::Sync,
            DurabilityArg::Os => Durability::Os,
        }
    }
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// The queue directory (created if missing).
    dir: PathBuf,
    /// Files to read lines from, in order ("-" is stdin); stdin if none.
    files: Vec<PathBuf>,
    /// The key of every record.
    #[arg(long)]
    key: Option<String>,
    /// A header NAME=VALUE added to every record (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// How durable each append is.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync)]
    durability: DurabilityArg,
    /// Print what was appended as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .ok_or_else(|| format!("header {s:?} is not NAME=VALUE"))
}

pub fn produce(args: &ProduceArgs) -> CmdResult {
    let durability = Durability::from(args.durability);
    let queue = Queue::builder(&args.dir).durability(durability).open()?;
    let mut sources: Vec<Box<dyn BufRead>> = Vec::new();
    if args.files.is_empty() {
        sources.push(Box::new(io::stdin().lock()));
    }
    for f in &args.files {
        if f.as_os_str() == "-" {
            sources.push(Box::new(io::stdin().lock()));
        } else {
            let file = std::fs::File::open(f)
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", f.display())))?;
            sources.push(Box::new(io::BufReader::new(file)));
        }
    }
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut pending_bytes = 0;
    let (mut first, mut count) = (None, 0u64);
    let mut append = |lines: &mut Vec<Vec<u8>>| -> Result<(), Failure> {
        if lines.is_empty() {
            return Ok(());
        }
        let records: Vec<Record<'_>> = lines
            .iter()
            .map(|l| {
                let mut r = Record::new(l);
                if let Some(k) = &args.key {
                    r = r.key(k.as_bytes());
                }
                for (n, v) in &args.headers {
                    r = r.header(n.as_bytes(), v.as_bytes());
                }
                r
            })
            .collect();
        let range = queue.append_batch(&records)?;
        first.get_or_insert(range.start);
        count += range.end - range.start;
        lines.clear();
        Ok(())
    };
    for mut source in sources {
        loop {
            let mut line = Vec::new();
            let n = source
                .read_until(b'\n', &mut line)
                .map_err(|e| walq_io_error_at("read", Path::new("<input>"), e))?;
            if n == 0 {
                break;
            }
            if line.last() == Some(&b'\n') {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
            }
            pending_bytes += line.len();
            lines.push(line);
            if lines.len() >= PRODUCE_BATCH_RECORDS || pending_bytes >= PRODUCE_BATCH_BYTES {
                append(&mut lines)?;
                pending_bytes = 0;
            }
        }
    }
    append(&mut lines)?;
    queue.flush()?;
    let next = queue.next_offset();
    queue.close()?;
    let first = first.unwrap_or(next);
    if args.json {
        let mut out = io::stdout().lock();
        serde_json::to_writer(
            &mut out,
            &json!({ "records": count, "first_offset": first, "next_offset": next }),
        )
        .map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        eprintln!("appended {count} records (offsets {first}..{next}) to {}", args.dir.display());
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct RepairArgs {
    /// The queue directory.
    dir: PathBuf,
    /// Cut without asking.
    #[arg(long, short)]
    yes: bool,
    /// Show what would be cut, and cut nothing (exit code 1 if there is damage).
    #[arg(long)]
    dry_run: bool,
    /// Where to write what was done (default: DIR/repair-T.txt, T the Unix time in seconds).
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Print the plan and the outcome as JSON on stdout (needs --yes or --dry-run).
    #[arg(long)]
    json: bool,
}

fn plan_text(plan: &walq::inspect::RepairPlan) -> String {
    let mut s = String::new();
    let what =
        if plan.torn_tail { "an unsynced torn tail (opening would cut it too)" } else { "corrupt data" };
    s +=
        &format!("damage: {what} in {} at byte {}: {}\n", plan.segment.display(), plan.position, plan.reason);
    s += &format!("cut: truncate {} at byte {}\n", plan.segment.display(), plan.position);
    for f in &plan.files_removed {
        s += &format!("remove: {}\n", f.display());
    }
    s += &format!(
        "drops: {} valid records beyond the damage{}, {} of non-zero data\n",
        plan.records_dropped,
        plan.offsets_dropped
            .as_ref()
            .map_or(String::new(), |r| format!(" (offsets {}..{} of later segments)", r.start, r.end)),
        output::size(plan.bytes_dropped)
    );
    s += &format!("after: the log ends at offset {}\n", plan.next_offset);
    s
}

fn plan_json(plan: &walq::inspect::RepairPlan) -> serde_json::Value {
    json!({
        "segment": plan.segment.display().to_string(),
        "position": plan.position,
        "reason": plan.reason,
        "torn_tail": plan.torn_tail,
        "next_offset": plan.next_offset,
        "records_dropped": plan.records_dropped,
        "offsets_dropped": plan.offsets_dropped.as_ref().map(|r| json!([r.start, r.end])),
        "bytes_dropped": plan.bytes_dropped,
        "files_removed": plan.files_removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    })
}

pub fn repair(args: &RepairArgs) -> CmdResult {
    let dir = &args.dir;
    if walq::inspect::is_locked(dir)? {
        return Err(walq::Error::Locked { dir: dir.clone() }.into());
    }
    let Some(plan) = walq::inspect::plan_repair(dir)? else {
        if args.json {
            println_json(&json!({ "damage": false, "repaired": false }))?;
        } else {
            eprintln!("nothing to repair: every batch of {} is intact", dir.display());
        }
        return Ok(());
    };
    let text = plan_text(&plan);
    if !args.json {
        eprint!("{text}");
    }
    if args.dry_run {
        if args.json {
            println_json(&json!({ "damage": true, "repaired": false, "plan": plan_json(&plan) }))?;
        }
        return Err(Failure::Problems);
    }
    if !args.yes {
        if args.json || !io::stdin().is_terminal() {
            eprintln!("walq: not cutting without --yes: standard input is not a terminal to ask on");
            return Err(Failure::Problems);
        }
        eprint!("cut the log as shown? [y/N] ");
        io::stderr().flush()?;
        let mut answer = String::new();
        io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing was cut");
            return Err(Failure::Problems);
        }
    }
    plan.apply()?;
    // Open once: recovery rebuilds the index and checks the result.
    let queue = Queue::builder(dir).create(false).open()?;
    let (first, next) = (queue.first_offset(), queue.next_offset());
    queue.close()?;
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let report_path = args.report.clone().unwrap_or_else(|| dir.join(format!("repair-{unix}.txt")));
    let report = format!(
        "walq repair of {} at {}\n{text}done: the queue opens with offsets {first}..{next}\n",
        dir.display(),
        output::time(unix * 1000)
    );
    write_report(&report_path, &report)?;
    if args.json {
        println_json(&json!({
            "damage": true,
            "repaired": true,
            "plan": plan_json(&plan),
            "first_offset": first,
            "next_offset": next,
            "report": report_path.display().to_string(),
        }))?;
    } else {
        eprintln!(
            "repaired: the queue opens with offsets {first}..{next}; report written to {}",
            report_path.display()
        );
    }
    Ok(())
}

fn write_report(path: &Path, text: &str) -> CmdResult {
    let mut f = std::fs::File::create(path).map_err(|e| walq_io_error_at("create", path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| walq_io_error_at("write", path, e))?;
    f.sync_all().map_err(|e| walq_io_error_at("fsync", path, e))?;
    Ok(())
}

fn walq_io_error_at(op: &'static str, path: &Path, source: io::Error) -> Failure {
    Failure::Walq(walq::Error::Io { op, path: path.into(), source })
}

fn println_json(v: &serde_json::Value) -> io::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).map_err(io::Error::from)?;
    writeln!(out)
}
