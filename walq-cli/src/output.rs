//! Rendering for people and for machines: timestamps, byte strings, records
//! in each `--format`, and a plain text table.

use std::fmt::Write as _;
use std::io::{self, Write};

use serde_json::{Value, json};
use walq::RecordRef;

use crate::Format;

/// `2024-05-01T12:00:00.000Z` for milliseconds since the Unix epoch (UTC).
pub fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Milliseconds since the Unix epoch from either Unix milliseconds
/// (`1700000000123`) or an RFC 3339 time (`2023-11-14T22:13:20.123Z`,
/// `2023-11-14T23:13:20+01:00`; fractions past milliseconds are dropped).
pub fn parse_time(s: &str) -> Result<u64, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| format!("{s:?} is too large for Unix milliseconds"));
    }
    let bad =
        || format!("{s:?} is neither Unix milliseconds nor an RFC 3339 time such as 2024-05-01T12:00:00Z");
    let b = s.as_bytes();
    let digits = |from: usize, n: usize| -> Option<i64> {
        let part = b.get(from..from + n)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0, |a, &d| a * 10 + i64::from(d - b'0')))
    };
    let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
        return Err(bad());
    }
    let field = |from, n| digits(from, n).ok_or_else(bad);
    let (year, month, day) = (field(0, 4)?, field(5, 2)?, field(8, 2)?);
    let (hour, minute, second) = (field(11, 2)?, field(14, 2)?, field(17, 2)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&month)
        || !(1..=month_days[month as usize - 1]).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad());
    }
    let mut i = 19;
    let mut millis = 0;
    if at(i, b".") {
        let n = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return Err(bad());
        }
        millis = b[i + 1..i + 1 + n.min(3)].iter().fold(0, |a, &d| a * 10 + i64::from(d - b'0'))
            * 10i64.pow(3 - n.min(3) as u32);
        i += 1 + n;
    }
    let zone_secs = if at(i, b"Zz") && b.len() == i + 1 {
        0
    } else if at(i, b"+-") && at(i + 3, b":") && b.len() == i + 6 {
        let (h, m) = (field(i + 1, 2)?, field(i + 4, 2)?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        let secs = h * 3600 + m * 60;
        if b[i] == b'-' { -secs } else { secs }
    } else {
        return Err(bad());
    };
    // Howard Hinnant's days_from_civil (the inverse of `time`'s).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - zone_secs;
    u64::try_from(secs * 1000 + millis).map_err(|_| format!("{s:?} is before 1970"))
}

/// Bytes for a terminal: UTF-8 text as it is, anything else (and control
/// characters) escaped, so one record stays on one line.
pub fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_string(),
        _ => bytes.escape_ascii().to_string(),
    }
}

/// Bytes for JSON: a string if they are UTF-8, else `{"hex": "..."}`.
pub fn bytes_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => json!({ "hex": hex(bytes) }),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A record as JSON (one line of `--format json`).
pub fn record_json(r: &RecordRef<'_>) -> Value {
    json!({
        "offset": r.offset(),
        "timestamp_ms": r.timestamp_ms(),
        "time": time(r.timestamp_ms()),
        "key": r.key().map(bytes_json),
        "headers": r.headers().map(|(n, v)| json!([bytes_json(n), bytes_json(v)])).collect::<Vec<_>>(),
        "value": bytes_json(r.value()),
    })
}

/// Writes one record in `format`.
pub fn record(out: &mut impl Write, r: &RecordRef<'_>, format: Format) -> io::Result<()> {
    match format {
        Format::Text => {
            write!(out, "{}\t{}", r.offset(), time(r.timestamp_ms()))?;
            if let Some(k) = r.key() {
                write!(out, "\tkey={}", text(k))?;
            }
            for (n, v) in r.headers() {
                write!(out, "\t{}={}", text(n), text(v))?;
            }
            writeln!(out, "\t{}", text(r.value()))
        }
        Format::Json => {
            serde_json::to_writer(&mut *out, &record_json(r))?;
            writeln!(out)
        }
        Format::Raw => {
            out.write_all(r.value())?;
            writeln!(out)
        }
        Format::Hex => {
            write!(
                out,
                "offset {} time {} value {} bytes",
                r.offset(),
                time(r.timestamp_ms()),
                r.value().len()
            )?;
            if let Some(k) = r.key() {
                write!(out, " key {}", text(k))?;
            }
            writeln!(out)?;
            for (i, chunk) in r.value().chunks(16).enumerate() {
                let mut line = format!("  {:08x}  ", i * 16);
                for j in 0..16 {
                    match chunk.get(j) {
                        Some(b) => write!(line, "{b:02x} ").unwrap_or(()),
                        None => line.push_str("   "),
                    }
                    if j == 7 {
                        line.push(' ');
                    }
                }
                let ascii: String = chunk
                    .iter()
                    .map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' })
                    .collect();
                writeln!(out, "{line} |{ascii}|")?;
            }
            Ok(())
        }
    }
}

/// Left-aligned columns, two spaces apart; right-aligned where `right[i]`.
pub fn table(out: &mut impl Write, rows: &[Vec<String>], right: &[bool]) -> io::Result<()> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = widths[c] - cell.chars().count();
            if c > 0 {
                line.push_str("  ");
            }
            if right.get(c).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if c + 1 < row.len() {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        writeln!(out, "  {line}")?;
    }
    Ok(())
}

/// `1.5 MiB`-style sizes.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn times_parse_back() {
        for ms in [0, 1_700_000_000_123, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_time(&time(ms)), Ok(ms), "{}", time(ms));
        }
        assert_eq!(parse_time("1700000000123"), Ok(1_700_000_000_123));
        assert_eq!(parse_time("2023-11-14T23:13:20+01:00"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14t22:13:20.1234567z"), Ok(1_700_000_000_123));
        assert_eq!(parse_time("2023-11-14 22:13:20.5Z"), Ok(1_700_000_000_500));
        for bad in [
            "",
            "yesterday",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-02-29T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20+0100",
            "1969-12-31T23:59:59Z",
            "-5",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bytes_render_losslessly() {
        assert_eq!(text(b"hi there"), "hi there");
        assert_eq!(text(b"a\nb\xff"), "a\\nb\\xff");
        assert_eq!(bytes_json(b"ok"), json!("ok"));
        assert_eq!(bytes_json(b"\xff\x00"), json!({"hex": "ff00"}));
        assert_eq!(size(1536), "1.5 KiB");
    }
}
