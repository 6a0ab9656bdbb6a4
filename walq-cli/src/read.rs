//! The read commands: `inspect`, `verify`, `dump`, `tail`. None of them
//! modifies the directory, takes its lock or runs recovery.

use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use walq::inspect::{self, ConsumerState, IndexStatus, LogReader, SegmentEnd, Survey};

use crate::{CmdResult, Failure, Format, consumers, output};

fn stdout() -> BufWriter<io::StdoutLock<'static>> {
    BufWriter::new(io::stdout().lock())
}

fn index_json(status: &IndexStatus) -> Value {
    match status {
        IndexStatus::Sealed { entries } => json!({ "state": "sealed", "entries": entries }),
        IndexStatus::Active { entries, synced_mark } => {
            json!({ "state": "active", "entries": entries, "synced_mark": synced_mark })
        }
        IndexStatus::Missing => json!({ "state": "missing" }),
        IndexStatus::Unusable(why) => json!({ "state": "unusable", "reason": why }),
        _ => json!({ "state": status.to_string() }),
    }
}

fn end_json(end: &SegmentEnd) -> Value {
    match end {
        SegmentEnd::Damaged(d) => json!({
            "state": if d.is_torn_tail() { "torn" } else { "corrupt" },
            "position": d.position,
            "reason": d.reason,
            "garbage_end": d.garbage_end,
            "records_after": d.records_after,
            "synced_batch_after": d.synced_batch_after,
        }),
        _ => json!({ "state": "clean" }),
    }
}

/// The survey as one JSON object; each section is a key, so that sections
/// can be added without breaking readers.
fn survey_json(s: &Survey, c: &ConsumerState) -> Value {
    let segments: Vec<Value> = s
        .segments
        .iter()
        .map(|g| {
            json!({
                "base": g.base,
                "next_offset": g.next_offset,
                "records": g.records(),
                "file": g.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "file_bytes": g.file_bytes,
                "data_bytes": g.data_bytes,
                "first_timestamp_ms": g.first_timestamp_ms,
                "last_timestamp_ms": g.last_timestamp_ms,
                "active": g.active,
                "header_problem": g.header_problem,
                "index": index_json(&g.index),
                "end": end_json(&g.end),
            })
        })
        .collect();
    let last = s.last_recovery.as_ref().map(|r| {
        json!({
            "unix_time_ms": r.unix_time_ms,
            "next_offset": r.next_offset,
            "bytes_cut": r.bytes_cut,
            "records_cut": r.records_cut,
            "cut_file": r.cut_at.as_ref().map(|c| c.0.clone()),
            "cut_position": r.cut_at.as_ref().map(|c| c.1),
            "indexes_rebuilt": r.indexes_rebuilt,
            "unfinished_segments_removed": r.unfinished_segments_removed,
            "temp_files_removed": r.temp_files_removed,
        })
    });
    let first_ts = s.segments.iter().find_map(|g| g.first_timestamp_ms);
    let last_ts = s.segments.iter().rev().find_map(|g| g.last_timestamp_ms);
    json!({
        "dir": s.dir.display().to_string(),
        "locked": s.locked,
        "first_offset": s.first_offset(),
        "next_offset": s.next_offset(),
        "records": s.next_offset() - s.first_offset(),
        "file_bytes": s.file_bytes(),
        "first_timestamp_ms": first_ts,
        "last_timestamp_ms": last_ts,
        "segments": segments,
        "last_recovery": last,
        "next_open_cuts": s.torn_tail().map(|d| json!({
            "file": s.segments.last().and_then(|g| g.path.file_name()).map(|n| n.to_string_lossy().into_owned()),
            "position": d.position,
            "bytes": d.garbage_end - d.position,
        })),
        "other_files": s.other_files.iter().map(|f| json!({ "name": f.name, "kind": f.kind.as_str() })).collect::<Vec<_>>(),
        "consumers": consumers::consumers_json(c),
        "groups": consumers::groups_json(c),
        "consumer_journal": consumers::journal_json(c),
    })
}

pub fn inspect(dir: &Path, as_json: bool) -> CmdResult {
    let s = inspect::survey(dir)?;
    let c = s.consumers()?;
    let mut out = stdout();
    if as_json {
        serde_json::to_writer_pretty(&mut out, &survey_json(&s, &c)).map_err(io::Error::from)?;
        writeln!(out)?;
        return Ok(out.flush()?);
    }
    writeln!(out, "directory   {}", s.dir.display())?;
    let lock = if s.locked {
        "locked by a live queue (read anyway, read-only)"
    } else {
        "not locked (no live queue)"
    };
    writeln!(out, "lock        {lock}")?;
    writeln!(
        out,
        "offsets     {}..{} ({} records)",
        s.first_offset(),
        s.next_offset(),
        s.next_offset() - s.first_offset()
    )?;
    let first_ts = s.segments.iter().find_map(|g| g.first_timestamp_ms);
    let last_ts = s.segments.iter().rev().find_map(|g| g.last_timestamp_ms);
    match (first_ts, last_ts) {
        (Some(a), Some(b)) => writeln!(out, "time        {} .. {}", output::time(a), output::time(b))?,
        _ => writeln!(out, "time        (no records)")?,
    }
    let plural = if s.segments.len() == 1 { "" } else { "s" };
    writeln!(out, "size        {} in {} segment{plural}", output::size(s.file_bytes()), s.segments.len())?;

    writeln!(out, "\nsegments")?;
    let mut rows = vec![
        ["base", "records", "data", "file", "first record", "last record", "index", "end"]
            .map(String::from)
            .to_vec(),
    ];
    for g in &s.segments {
        let end = match &g.end {
            SegmentEnd::Damaged(d) if d.is_torn_tail() && g.active => {
                format!("torn tail at byte {}", d.position)
            }
            SegmentEnd::Damaged(d) => format!("CORRUPT at byte {}", d.position),
            _ if g.active => "active".to_string(),
            _ => "sealed".to_string(),
        };
        rows.push(vec![
            g.base.to_string(),
            g.records().to_string(),
            output::size(g.data_bytes),
            output::size(g.file_bytes),
            g.first_timestamp_ms.map_or("-".into(), output::time),
            g.last_timestamp_ms.map_or("-".into(), output::time),
            g.index.to_string(),
            end,
        ]);
        if let Some(p) = &g.header_problem {
            rows.push(vec![String::new(), format!("header: {p}")]);
        }
    }
    output::table(&mut out, &rows, &[true, true, true, true])?;

    writeln!(out, "\nlast recovery")?;
    match &s.last_recovery {
        None => {
            writeln!(out, "  none recorded: no open of this directory has cut, rebuilt or removed anything")?
        }
        Some(r) => {
            let when = output::time(r.unix_time_ms);
            match &r.cut_at {
                Some((file, pos)) => writeln!(
                    out,
                    "  {when}: cut {} bytes ({} records) of a torn tail at {file} byte {pos}",
                    r.bytes_cut, r.records_cut
                )?,
                None => writeln!(out, "  {when}: cut nothing")?,
            }
            writeln!(
                out,
                "  rebuilt {} indexes, removed {} unfinished segments and {} leftover files; the log then ended at offset {}",
                r.indexes_rebuilt, r.unfinished_segments_removed, r.temp_files_removed, r.next_offset
            )?;
        }
    }

    writeln!(out, "\nnext open")?;
    let corrupt = s.segments.iter().find_map(|g| match &g.end {
        SegmentEnd::Damaged(d) if !(g.active && d.is_torn_tail()) => Some((g, d)),
        _ => None,
    });
    if let Some((g, d)) = corrupt {
        writeln!(
            out,
            "  fails: corrupt data in {} at byte {}: {} (run walq verify, then walq repair)",
            g.path.display(),
            d.position,
            d.reason
        )?;
    } else if let Some(d) = s.torn_tail() {
        writeln!(
            out,
            "  cuts a torn tail of {} bytes at byte {} ({} valid records lie beyond)",
            d.garbage_end - d.position,
            d.position,
            d.records_after
        )?;
    } else {
        writeln!(out, "  nothing to cut (as far as this quick look reads; walq verify reads everything)")?;
    }

    writeln!(out, "\nconsumers")?;
    consumers::write_consumers(&mut out, &c)?;
    writeln!(out, "\ngroups")?;
    consumers::write_groups(&mut out, &c)?;
    if let Some(d) = &c.damage {
        writeln!(
            out,
            "  {} is DAMAGED at byte {}: {} (shown as of the last valid entry, which the next open uses)",
            c.journal.display(),
            d.position,
            d.reason
        )?;
    }

    if !s.other_files.is_empty() {
        writeln!(out, "\nother files")?;
        let rows: Vec<Vec<String>> =
            s.other_files.iter().map(|f| vec![f.name.clone(), f.kind.as_str().to_string()]).collect();
        output::table(&mut out, &rows, &[])?;
    }
    Ok(out.flush()?)
}

pub fn verify(dir: &Path, as_json: bool) -> CmdResult {
    let bar = if io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("verifying {bar:40} {bytes}/{total_bytes} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = inspect::verify_with_progress(dir, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = report?;
    let mut out = stdout();
    if as_json {
        let problems: Vec<Value> = report
            .problems
            .iter()
            .map(|p| {
                json!({
                    "file": p.path.display().to_string(),
                    "position": p.position,
                    "kind": p.kind.as_str(),
                    "message": p.message,
                })
            })
            .collect();
        let v = json!({
            "dir": dir.display().to_string(),
            "ok": report.problems.is_empty(),
            "locked": report.locked,
            "segments": report.segments,
            "batches": report.batches,
            "records": report.records,
            "bytes": report.bytes,
            "first_offset": report.offsets.0,
            "next_offset": report.offsets.1,
            "problems": problems,
        });
        serde_json::to_writer_pretty(&mut out, &v).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        for p in &report.problems {
            writeln!(out, "{p}")?;
        }
        let verdict = match report.problems.len() {
            0 => "no problems".to_string(),
            1 => "1 problem".to_string(),
            n => format!("{n} problems"),
        };
        writeln!(
            out,
            "verified {} segments, {} batches, {} records (offsets {}..{}), {}: {verdict}",
            report.segments,
            report.batches,
            report.records,
            report.offsets.0,
            report.offsets.1,
            output::size(report.bytes)
        )?;
        if report.locked {
            writeln!(out, "(a live queue holds the directory: a tail being written is not reported)")?;
        }
    }
    out.flush()?;
    if report.problems.is_empty() { Ok(()) } else { Err(Failure::Problems) }
}

/// Prints records from `reader` up to `to`; returns how many.
fn print_records(
    out: &mut impl Write,
    reader: &mut LogReader,
    to: Option<u64>,
    format: Format,
) -> Result<u64, Failure> {
    let mut n = 0;
    while let Some(r) = reader.next()? {
        if to.is_some_and(|to| r.offset() >= to) {
            break;
        }
        output::record(out, &r, format)?;
        n += 1;
    }
    Ok(n)
}

pub fn dump(dir: &Path, from: u64, consumer: Option<&str>, to: Option<u64>, format: Format) -> CmdResult {
    let from = match consumer {
        None => from,
        Some(name) => inspect::consumers(dir)?
            .consumer(name)
            .map(|c| c.position)
            .ok_or_else(|| walq::Error::UnknownConsumer { kind: "consumer", name: name.to_string() })?,
    };
    let mut reader = LogReader::open(dir, from)?;
    let mut out = stdout();
    let result = print_records(&mut out, &mut reader, to, format);
    out.flush()?;
    result.map(|_| ())
}

pub fn tail(dir: &Path, lines: u64, follow: bool, interval_ms: u64, format: Format) -> CmdResult {
    let s = inspect::survey(dir)?;
    let start = s.next_offset().saturating_sub(lines).max(s.first_offset());
    let mut reader = LogReader::open(dir, start)?;
    let mut out = stdout();
    print_records(&mut out, &mut reader, None, format)?;
    out.flush()?;
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(interval_ms.max(1)));
        if print_records(&mut out, &mut reader, None, format)? > 0 {
            out.flush()?;
        }
    }
}
