//! The `consumer` and `group` commands. `list` reads `consumers.journal`
//! through `walq::inspect::consumers`: no lock, nothing modified, so it works
//! beside a live queue. `reset` and `delete` open the queue for writing (the
//! directory lock: exit code 4 while a live queue holds it).

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args, Subcommand};
use serde_json::{Value, json};
use walq::inspect::{self, ConsumerState};
use walq::{Queue, StartAt};

use crate::{CmdResult, Failure, output};

#[derive(Debug, Subcommand)]
pub enum ConsumerCommand {
    /// List named consumers: committed position and lag (read-only, no lock).
    List {
        /// The queue directory.
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move a consumer's committed position (opens the queue: needs the directory lock).
    Reset(ResetArgs),
    /// Delete a consumer and its committed position (opens the queue: needs the directory lock).
    Delete {
        /// The queue directory.
        dir: PathBuf,
        /// The consumer's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups: ack floor, delivered not done, unacked, dead letters (read-only, no lock).
    List {
        /// The queue directory.
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a group's saved state; its dead-letter queue stays (opens the queue: needs the directory lock).
    Delete {
        /// The queue directory.
        dir: PathBuf,
        /// The group's name.
        name: String,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["to", "time"])))]
pub struct ResetArgs {
    /// The queue directory.
    dir: PathBuf,
    /// The consumer's name.
    name: String,
    /// Where to: earliest (the first record held), latest (the end: only new records) or an offset.
    #[arg(long, value_name = "earliest|latest|OFFSET", value_parser = parse_to)]
    to: Option<StartAt>,
    /// Where to: the first record at or after this time (Unix milliseconds, or RFC 3339 such as 2024-05-01T12:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = output::parse_time)]
    time: Option<u64>,
    /// Create the consumer if it does not exist (without it: exit code 3).
    #[arg(long)]
    create: bool,
    /// Print the outcome as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_to(s: &str) -> Result<StartAt, String> {
    match s {
        "earliest" => Ok(StartAt::Earliest),
        "latest" => Ok(StartAt::Latest),
        _ => s
            .parse()
            .map(StartAt::Offset)
            .map_err(|_| format!("{s:?} is not earliest, latest or an offset (for a time, use --time)")),
    }
}

pub fn consumer(command: &ConsumerCommand) -> CmdResult {
    match command {
        ConsumerCommand::List { dir, json } => list(dir, *json, Section::Consumers),
        ConsumerCommand::Reset(args) => reset(args),
        ConsumerCommand::Delete { dir, name } => {
            let queue = open_for_writing(dir)?;
            let position = queue.consumers().into_iter().find(|c| &c.name == name).map(|c| c.position);
            queue.delete_consumer(name)?;
            queue.close()?;
            let was = position.map_or(String::new(), |p| format!(" (it was at position {p})"));
            eprintln!("deleted consumer {name:?}{was}");
            Ok(())
        }
    }
}

pub fn group(command: &GroupCommand) -> CmdResult {
    match command {
        GroupCommand::List { dir, json } => list(dir, *json, Section::Groups),
        GroupCommand::Delete { dir, name } => {
            let queue = open_for_writing(dir)?;
            queue.delete_group(name)?;
            queue.close()?;
            eprintln!("deleted group {name:?}");
            let dead_letters = dir.join("dead-letters").join(name);
            if dead_letters.is_dir() {
                eprintln!("its dead-letter queue stays in {}", dead_letters.display());
            }
            Ok(())
        }
    }
}

/// Opens an existing queue: the directory lock, and recovery (which may cut
/// a torn tail, as any open does).
fn open_for_writing(dir: &Path) -> Result<Queue, Failure> {
    Ok(Queue::builder(dir).create(false).open()?)
}

fn reset(args: &ResetArgs) -> CmdResult {
    let start = match (args.to, args.time) {
        (Some(to), _) => to,
        (None, Some(ms)) => StartAt::Timestamp(ms),
        (None, None) => return Err(Failure::Usage("reset needs --to or --time".into())),
    };
    let queue = open_for_writing(&args.dir)?;
    let previous = queue.consumers().into_iter().find(|c| c.name == args.name).map(|c| c.position);
    if previous.is_none() && !args.create {
        return Err(walq::Error::UnknownConsumer { kind: "consumer", name: args.name.clone() }.into());
    }
    let position = queue.reset_consumer(&args.name, start)?;
    let next = queue.next_offset();
    queue.close()?;
    if args.json {
        let v = json!({ "name": args.name, "previous": previous, "position": position, "next_offset": next });
        let mut out = io::stdout().lock();
        serde_json::to_writer(&mut out, &v).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        let from = previous.map_or("created".to_string(), |p| format!("moved from {p}"));
        eprintln!(
            "consumer {:?} {from} to position {position} (lag {})",
            args.name,
            next.saturating_sub(position)
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Consumers,
    Groups,
}

fn list(dir: &Path, as_json: bool, section: Section) -> CmdResult {
    let state = inspect::consumers(dir)?;
    let mut out = BufWriter::new(io::stdout().lock());
    if as_json {
        let mut v = json!({
            "dir": dir.display().to_string(),
            "next_offset": state.next_offset,
            "journal": journal_json(&state),
        });
        match section {
            Section::Consumers => v["consumers"] = consumers_json(&state),
            Section::Groups => v["groups"] = groups_json(&state),
        }
        serde_json::to_writer_pretty(&mut out, &v).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        match section {
            Section::Consumers => write_consumers(&mut out, &state)?,
            Section::Groups => write_groups(&mut out, &state)?,
        }
    }
    out.flush()?;
    if let Some(d) = &state.damage {
        eprintln!(
            "walq: warning: {} is damaged at byte {} ({}): shown as of the last valid entry before it, as the next open will use it",
            state.journal.display(),
            d.position,
            d.reason
        );
    }
    Ok(())
}

/// The journal's own state, as JSON: whether it exists, entries, damage.
pub fn journal_json(state: &ConsumerState) -> Value {
    json!({
        "file": state.journal.file_name().map(|n| n.to_string_lossy().into_owned()),
        "exists": state.journal_exists,
        "entries": state.entries,
        "damage": state.damage.as_ref().map(|d| json!({ "position": d.position, "reason": d.reason })),
        "positions_past_log_end": state.clamped,
    })
}

pub fn consumers_json(state: &ConsumerState) -> Value {
    state.consumers.iter().map(|c| json!({ "name": c.name, "position": c.position, "lag": c.lag })).collect()
}

pub fn groups_json(state: &ConsumerState) -> Value {
    state
        .groups
        .iter()
        .map(|g| {
            json!({
                "name": g.name,
                "ack_floor": g.ack_floor,
                "delivered_to": g.delivered_to,
                "delivered_not_done": g.delivered_not_done,
                "done_above_floor": g.done_above_floor,
                "unacked": g.unacked,
                "dead_letters": g.dead_letters,
            })
        })
        .collect()
}

/// The consumers as a table (or a line saying there are none).
pub fn write_consumers(out: &mut impl Write, state: &ConsumerState) -> io::Result<()> {
    if state.consumers.is_empty() {
        return writeln!(out, "  no named consumers");
    }
    let mut rows = vec![["name", "position", "lag"].map(String::from).to_vec()];
    for c in &state.consumers {
        rows.push(vec![c.name.clone(), c.position.to_string(), c.lag.to_string()]);
    }
    output::table(out, &rows, &[false, true, true])?;
    if state.clamped {
        writeln!(
            out,
            "  (a saved position was past the log's end: shown at the end, where the next open moves it)"
        )?;
    }
    Ok(())
}

/// The groups as a table (or a line saying there are none).
pub fn write_groups(out: &mut impl Write, state: &ConsumerState) -> io::Result<()> {
    if state.groups.is_empty() {
        return writeln!(out, "  no consumer groups");
    }
    let mut rows = vec![
        ["name", "ack floor", "delivered, not done", "done above floor", "unacked", "dead letters"]
            .map(String::from)
            .to_vec(),
    ];
    for g in &state.groups {
        rows.push(vec![
            g.name.clone(),
            g.ack_floor.to_string(),
            g.delivered_not_done.to_string(),
            g.done_above_floor.to_string(),
            g.unacked.to_string(),
            g.dead_letters.map_or("-".into(), |n| n.to_string()),
        ]);
    }
    output::table(out, &rows, &[false, true, true, true, true, true])?;
    writeln!(out, "  (delivered, not done: in flight or waiting for redelivery)")
}
