//! Interaction files (`NAME.inter`): the RecBole atomic-file reader and its timestamps.

use std::path::Path;

use super::{data_err, read_text, short};
use crate::{Error, Result};

/// One row of a `.inter` file.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub user: String,
    pub item: String,
    /// Seconds since 1970-01-01 UTC (or whatever unit a numeric column uses); 0 without a
    /// timestamp column.
    pub timestamp: f64,
}

/// Read a RecBole atomic `.inter` file (see the module docs for the format).
pub fn read_inter(path: &Path) -> Result<Vec<Interaction>> {
    let text = read_text(path)?;
    parse_inter(&text, &path.display().to_string())
}

/// Parse the text of a `.inter` file; `file` names it in error messages.
pub fn parse_inter(text: &str, file: &str) -> Result<Vec<Interaction>> {
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let header = lines.next().unwrap_or("");
    let header = header.strip_prefix('\u{feff}').unwrap_or(header);
    if header.trim().is_empty() {
        return data_err(file, 1, "empty file: expected a header line such as `user_id:token<TAB>item_id:token<TAB>timestamp:float`");
    }
    let fields: Vec<&str> = header.split('\t').collect();
    let names: Vec<&str> = fields.iter().map(|f| f.split(':').next().unwrap_or("").trim()).collect();
    let find = |want: &str| -> Result<Option<usize>> {
        let hits: Vec<usize> = names.iter().enumerate().filter(|(_, n)| **n == want).map(|(i, _)| i).collect();
        if hits.len() > 1 {
            return data_err(file, 1, format!("header names the field `{want}` {} times", hits.len()));
        }
        Ok(hits.first().copied())
    };
    let required = |want: &str, spelled: &str| -> Result<usize> {
        find(want)?.ok_or_else(|| Error::Data {
            file: file.to_string(),
            line: 1,
            msg: format!("header has no `{spelled}` field (found: {})", fields.join(", ")),
        })
    };
    let ucol = required("user_id", "user_id:token")?;
    let icol = required("item_id", "item_id:token")?;
    let tcol = find("timestamp")?;
    let ncols = fields.len();

    let mut out = Vec::new();
    for (k, line) in lines.enumerate() {
        let lineno = k + 2;
        if line.trim().is_empty() {
            continue;
        }
        let vals: Vec<&str> = line.split('\t').collect();
        if vals.len() != ncols {
            return data_err(file, lineno, format!("expected {ncols} tab-separated fields as in the header, found {}", vals.len()));
        }
        let (user, item) = (vals[ucol], vals[icol]);
        if user.is_empty() {
            return data_err(file, lineno, "empty user_id");
        }
        if item.is_empty() {
            return data_err(file, lineno, "empty item_id");
        }
        let timestamp = match tcol {
            None => 0.0,
            Some(c) => parse_timestamp(vals[c]).ok_or_else(|| Error::Data {
                file: file.to_string(),
                line: lineno,
                msg: format!("cannot parse timestamp `{}` (expected a finite number or a date YYYY-MM-DD[THH:MM:SS])", short(vals[c])),
            })?,
        };
        out.push(Interaction { user: user.to_string(), item: item.to_string(), timestamp });
    }
    Ok(out)
}

/// Parse a timestamp: a finite number, or an ISO date `YYYY-MM-DD` optionally followed by a time
/// `THH:MM[:SS[.fff]]` (or with a space instead of `T`) and an optional `Z`, read as UTC.
/// Returns seconds since 1970-01-01 for dates, the number itself otherwise.
pub fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        return v.is_finite().then_some(v);
    }
    parse_iso_datetime(s)
}

/// An ISO date with an optional time (jiff's ISO 8601 / RFC 3339 parser, which also takes a space
/// for `T` and fractions of a second), read as UTC; a trailing `Z` says so explicitly. Time zone
/// offsets and the loose forms jiff accepts (`2015-6-23`, week dates) are refused: a timestamp
/// column holds one form.
fn parse_iso_datetime(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    // YYYY-MM-DD exactly, then nothing, or a time after `T` or a space.
    let date_ok =
        b.len() >= 10 && b[4] == b'-' && b[7] == b'-' && [0..4, 5..7, 8..10].into_iter().all(|r| b[r].iter().all(u8::is_ascii_digit));
    if !date_ok || (b.len() > 10 && b[10] != b'T' && b[10] != b' ') {
        return None;
    }
    let civil = s.strip_suffix('Z').unwrap_or(s);
    if civil[10..].contains(['+', 'Z', 'z', '[']) || civil[10..].matches('-').count() > 0 {
        return None;
    }
    let dt: jiff::civil::DateTime = civil.parse().ok()?;
    let ts = dt.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp();
    Some(ts.as_second() as f64 + f64::from(ts.subsec_nanosecond()) / 1e9)
}
