//! Public datasets in the formats their owners publish, turned into a dataset directory
//! (`NAME.inter` + `NAME.item`, RecBole's atomic files) that `featurize` and the training commands
//! read. Two families:
//!
//! - **Amazon reviews** (McAuley et al.; the 2014 release at jmcauley.ucsd.edu/data/amazon and the
//!   2018 one at nijianmo.github.io/amazon): a review file of JSON lines (`reviewerID`, `asin`,
//!   `unixReviewTime`; e.g. `reviews_Office_Products_5.json.gz`, `Prime_Pantry_5.json.gz`) and,
//!   optionally, the category's metadata (`meta_Office_Products.json.gz`: one Python dict literal
//!   per line in 2014, JSON in 2018). Output: `user_id`, `item_id` (the ASIN), `timestamp` (unix
//!   seconds), and per item `title`, `brand`, `categories` (the first category path without its
//!   root, the file's own category, comma separated) and `description`, with HTML entities
//!   decoded and whitespace collapsed. No filtering: a 5-core file stays 5-core, and the protocol's
//!   own filter (users with fewer than 5 interactions) applies when the data is loaded.
//! - **MovieLens 100K** (GroupLens, files.grouplens.org/datasets/movielens/ml-100k.zip): `u.data`
//!   (`user item rating timestamp`, tab-separated), `u.item` (`|`-separated, Latin-1) and `u.genre`.
//!   Output as RecBole ships it: `user_id`, `item_id`, `rating`, `timestamp`, and per item
//!   `movie_title` (without the year), `release_year` and `class` (the genres, space-separated).
//!
//! Either is gzip-compressed or plain (by the `.gz` suffix). Every interaction row is kept in the
//! file's order within a user's equal timestamps (the loader's stable sort keeps it too).

use std::collections::{HashMap, HashSet};

use super::io_err;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::{Error, Result};

/// A dataset read from raw files: interactions and an item table, ready to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// Header of `.inter` (`field:type` entries) and its rows.
    pub inter_header: Vec<&'static str>,
    pub inter: Vec<Vec<String>>,
    /// Header of `.item` and its rows (first column the item token).
    pub item_header: Vec<&'static str>,
    pub items: Vec<Vec<String>>,
    /// Items of the interactions with no metadata row (their text fields are empty).
    pub items_without_meta: usize,
}

impl Imported {
    /// The two files' text.
    pub fn files(&self) -> (String, String) {
        let table = |header: &[&str], rows: &[Vec<String>]| {
            let mut s = header.join("\t");
            s.push('\n');
            for r in rows {
                s += &r.join("\t");
                s.push('\n');
            }
            s
        };
        (table(&self.inter_header, &self.inter), table(&self.item_header, &self.items))
    }

    pub fn users(&self) -> usize {
        self.inter.iter().map(|r| r[0].as_str()).collect::<HashSet<_>>().len()
    }
}

fn data_err(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Data { file: path.display().to_string(), line, msg: msg.into() }
}

/// The file's bytes, gunzipped when its name ends in `.gz`.
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::MultiGzDecoder::new(BufReader::new(f)).read_to_end(&mut out).map_err(|e| {
            data_err(path, 0, format!("not a readable gzip file ({e}); give the file as downloaded, or unpacked without .gz"))
        })?;
    } else {
        BufReader::new(f).read_to_end(&mut out).map_err(|e| io_err(path, e))?;
    }
    Ok(out)
}

/// Item text as one line: HTML entities decoded, tabs and newlines to spaces, runs of whitespace
/// collapsed.
pub fn clean_text(s: &str) -> String {
    let decoded = html_escape::decode_html_entities(s);
    decoded.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Strings of the 2014 metadata were written by Python 2 from UTF-8 byte strings, so a character
/// such as "’" appears as the escapes `\xe2\x80\x99`, which read back as three Latin-1 characters:
/// when a string is made only of such characters and they form valid UTF-8, that is what it was.
fn undo_byte_escapes(s: &str) -> String {
    if s.chars().all(|c| (c as u32) < 0x100) && s.chars().any(|c| (c as u32) >= 0x80) {
        let bytes: Vec<u8> = s.chars().map(|c| c as u32 as u8).collect();
        if let Ok(t) = String::from_utf8(bytes) {
            return t;
        }
    }
    s.to_string()
}

/// A metadata field as text: a string, or a list of strings joined by spaces (2018's
/// `description`), else empty.
fn text_of(v: Option<&serde_json::Value>) -> String {
    let raw = match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" "),
        _ => String::new(),
    };
    clean_text(&undo_byte_escapes(&raw))
}

/// The first category path without its root: 2014's `categories` (a list of paths) or 2018's
/// `category` (one path).
fn categories_of(meta: &serde_json::Value) -> String {
    let path: Vec<String> = match (meta.get("categories"), meta.get("category")) {
        (Some(serde_json::Value::Array(paths)), _) => paths
            .first()
            .and_then(|p| p.as_array())
            .map(|p| p.iter().filter_map(|x| x.as_str()).map(String::from).collect())
            .unwrap_or_default(),
        (_, Some(serde_json::Value::Array(p))) => p.iter().filter_map(|x| x.as_str()).map(String::from).collect(),
        _ => Vec::new(),
    };
    let path: Vec<String> = path.iter().skip(usize::from(path.len() > 1)).map(|c| clean_text(&undo_byte_escapes(c))).collect();
    path.join(", ")
}

/// Amazon reviews (and optionally the category's metadata) as a dataset (module docs).
pub fn amazon(reviews: &Path, meta: Option<&Path>) -> Result<Imported> {
    let bytes = read_bytes(reviews)?;
    let mut users: HashMap<String, usize> = HashMap::new();
    let mut rows: Vec<(usize, i64, String, String)> = Vec::new();
    let mut item_order: Vec<String> = Vec::new();
    let mut item_seen: HashSet<String> = HashSet::new();
    for (k, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let lineno = k + 1;
        let line = std::str::from_utf8(line).map_err(|_| data_err(reviews, lineno, "not UTF-8 text"))?.trim();
        if line.is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| data_err(reviews, lineno, format!("not a JSON review ({e}); expected one JSON object per line")))?;
        let field = |name: &str| -> Result<String> {
            match v.get(name) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                _ => Err(data_err(reviews, lineno, format!("no {name} (a review needs reviewerID, asin and unixReviewTime)"))),
            }
        };
        let (user, item) = (field("reviewerID")?, field("asin")?);
        let time = v.get("unixReviewTime").and_then(|t| t.as_i64()).ok_or_else(|| {
            data_err(reviews, lineno, "no unixReviewTime as a whole number (a review needs reviewerID, asin and unixReviewTime)")
        })?;
        let n = users.len();
        let u = *users.entry(user.clone()).or_insert(n);
        if item_seen.insert(item.clone()) {
            item_order.push(item.clone());
        }
        rows.push((u, time, user, item));
    }
    if rows.is_empty() {
        return Err(data_err(reviews, 0, "no reviews"));
    }
    // By user (in order of first appearance), then time; equal times keep the file's order.
    rows.sort_by_key(|r| (r.0, r.1));
    let inter = rows.into_iter().map(|(_, t, u, i)| vec![u, i, t.to_string()]).collect();

    let mut metas: HashMap<String, serde_json::Value> = HashMap::new();
    if let Some(meta) = meta {
        let bytes = read_bytes(meta)?;
        for (k, line) in bytes.split(|b| *b == b'\n').enumerate() {
            let lineno = k + 1;
            let line = std::str::from_utf8(line).map_err(|_| data_err(meta, lineno, "not UTF-8 text"))?.trim();
            if line.is_empty() {
                continue;
            }
            // JSON (2018) or a Python dict literal (2014): JSON5 reads both.
            let v: serde_json::Value = json5::from_str(line).map_err(|e| {
                data_err(meta, lineno, format!("not an item record ({e}); expected one JSON object or Python dict per line"))
            })?;
            let Some(asin) = v.get("asin").and_then(|a| a.as_str()).map(str::to_string) else {
                return Err(data_err(meta, lineno, "no asin"));
            };
            if item_seen.contains(&asin) {
                metas.insert(asin, v);
            }
        }
    }
    let mut without = 0;
    let items = item_order
        .into_iter()
        .map(|asin| match metas.get(&asin) {
            Some(m) => {
                let row = vec![text_of(m.get("title")), text_of(m.get("brand")), categories_of(m), text_of(m.get("description"))];
                std::iter::once(asin).chain(row).collect()
            }
            None => {
                without += 1;
                vec![asin, String::new(), String::new(), String::new(), String::new()]
            }
        })
        .collect();
    Ok(Imported {
        inter_header: vec!["user_id:token", "item_id:token", "timestamp:float"],
        inter,
        item_header: vec!["item_id:token", "title:token_seq", "brand:token", "categories:token_seq", "description:token_seq"],
        items,
        items_without_meta: if meta.is_some() { without } else { 0 },
    })
}

/// MovieLens 100K from GroupLens' files in `dir` (module docs).
pub fn movielens_100k(dir: &Path) -> Result<Imported> {
    let text = |name: &str| -> Result<(std::path::PathBuf, String)> {
        let p = dir.join(name);
        let b = std::fs::read(&p).map_err(|e| io_err(&p, e))?;
        // u.item is Latin-1: each byte is the character of that code point.
        let s = match String::from_utf8(b) {
            Ok(s) => s,
            Err(e) => e.into_bytes().iter().map(|&b| b as char).collect(),
        };
        Ok((p, s))
    };
    let (gpath, genres) = text("u.genre")?;
    let mut genre_names: Vec<(usize, String)> = Vec::new();
    for (k, line) in genres.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (name, idx) = line.split_once('|').ok_or_else(|| data_err(&gpath, k + 1, "expected name|index"))?;
        let idx: usize = idx.trim().parse().map_err(|_| data_err(&gpath, k + 1, format!("genre index `{idx}` is not a number")))?;
        genre_names.push((idx, name.to_string()));
    }
    genre_names.sort();

    let (ipath, item_text) = text("u.item")?;
    let mut items = Vec::new();
    for (k, line) in item_text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('|').collect();
        if f.len() != 5 + genre_names.len() {
            return Err(data_err(&ipath, k + 1, format!("expected {} |-separated fields, found {}", 5 + genre_names.len(), f.len())));
        }
        // "Title (1995)" -> ("Title", "1995"); the year from the release date when the title has none.
        let full = f[1].trim();
        let (title, year) = match full.rsplit_once(" (") {
            Some((t, y)) if y.len() == 5 && y.ends_with(')') && y[..4].bytes().all(|b| b.is_ascii_digit()) => {
                (t.trim().to_string(), y[..4].to_string())
            }
            _ => (full.to_string(), f[2].rsplit('-').next().unwrap_or("").trim().to_string()),
        };
        let class: Vec<&str> =
            genre_names.iter().filter(|(i, _)| f.get(5 + i).is_some_and(|v| v.trim() == "1")).map(|(_, n)| n.as_str()).collect();
        items.push(vec![f[0].trim().to_string(), title, year, class.join(" ")]);
    }

    let (dpath, data) = text("u.data")?;
    let mut inter = Vec::new();
    for (k, line) in data.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').map(str::trim).collect();
        if f.len() != 4 || f.iter().any(|v| v.is_empty()) {
            return Err(data_err(&dpath, k + 1, "expected user<TAB>item<TAB>rating<TAB>timestamp"));
        }
        inter.push(f.iter().map(|v| v.to_string()).collect());
    }
    if inter.is_empty() {
        return Err(data_err(&dpath, 0, "no ratings"));
    }
    Ok(Imported {
        inter_header: vec!["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
        inter,
        item_header: vec!["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"],
        items,
        items_without_meta: 0,
    })
}
