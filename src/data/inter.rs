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

fn ascii_number(b: &[u8]) -> Option<u32> {
    if b.is_empty() || b.len() > 9 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')))
}

fn parse_iso_datetime(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (ascii_number(&b[0..4])?, ascii_number(&b[5..7])?, ascii_number(&b[8..10])?);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y as i64, m) {
        return None;
    }
    let mut secs = days_from_civil(y as i64, m, d) as f64 * 86400.0;
    let rest = &b[10..];
    if rest.is_empty() {
        return Some(secs);
    }
    if rest[0] != b'T' && rest[0] != b' ' {
        return None;
    }
    let rest = &rest[1..];
    let rest = rest.strip_suffix(b"Z").unwrap_or(rest);
    let parts: Vec<&[u8]> = rest.split(|c| *c == b':').collect();
    if parts.len() < 2 || parts.len() > 3 || parts[0].len() != 2 || parts[1].len() != 2 {
        return None;
    }
    let (h, mi) = (ascii_number(parts[0])?, ascii_number(parts[1])?);
    let sec = match parts.get(2) {
        None => 0.0,
        Some(p) => {
            let (whole, frac) = match p.iter().position(|c| *c == b'.') {
                Some(i) => (&p[..i], Some(&p[i + 1..])),
                None => (&p[..], None),
            };
            if whole.len() != 2 {
                return None;
            }
            let mut v = f64::from(ascii_number(whole)?);
            if let Some(f) = frac {
                if f.is_empty() || !f.iter().all(u8::is_ascii_digit) {
                    return None;
                }
                let digits = &f[..f.len().min(9)];
                v += f64::from(ascii_number(digits)?) / 10f64.powi(digits.len() as i32);
            }
            v
        }
    };
    if h > 23 || mi > 59 || sec >= 60.0 {
        return None;
    }
    secs += f64::from(h) * 3600.0 + f64::from(mi) * 60.0 + sec;
    Some(secs)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
