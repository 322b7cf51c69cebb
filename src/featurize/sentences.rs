//! Item text into sentences (fields, templates, sentence splitting) and the keyword lines of the
//! image modality (from a file, or built from named fields as a stand-in).

use std::collections::HashMap;
use std::path::Path;

use super::*;
use crate::{Error, Result};

// ---- sentences ------------------------------------------------------------------------------

/// How one text field becomes sentences.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldSpec {
    pub name: String,
    /// `None`: split the value into sentences; `Some(t)`: one sentence from template `t`.
    pub template: Option<String>,
}

const PLACEHOLDERS: [&str; 4] = ["{}", "{title}", "{list}", "{year}"];

impl FieldSpec {
    /// Parse `NAME` or `NAME=TEMPLATE`; a template needs exactly one placeholder.
    pub fn parse(spec: &str) -> Result<FieldSpec> {
        let (name, template) = match spec.split_once('=') {
            Some((n, t)) => (n.trim(), Some(t.to_string())),
            None => (spec.trim(), None),
        };
        if name.is_empty() {
            return Err(Error::Invalid(format!("text field \"{spec}\": empty field name")));
        }
        if let Some(t) = &template {
            let n: usize = PLACEHOLDERS.iter().map(|p| t.matches(p).count()).sum();
            if n != 1 {
                return Err(Error::Invalid(format!(
                    "text field \"{spec}\": the template needs exactly one placeholder of {} (found {n})",
                    PLACEHOLDERS.join(" ")
                )));
            }
        }
        Ok(FieldSpec { name: name.to_string(), template })
    }

    /// The sentences of one value of this field.
    pub fn sentences(&self, value: &str) -> Vec<String> {
        let value = value.trim();
        if is_missing(value) {
            return Vec::new();
        }
        let Some(t) = &self.template else { return split_sentences(value) };
        let (ph, at) = PLACEHOLDERS.iter().find_map(|p| t.find(p).map(|i| (*p, i))).expect("checked by parse");
        let filled = match ph {
            "{title}" => natural_title(value),
            "{list}" => {
                let words: Vec<&str> = value.split_whitespace().filter(|w| !is_missing(w)).collect();
                if words.is_empty() {
                    return Vec::new();
                }
                words.join(", ")
            }
            "{year}" => {
                if !value.chars().all(|c| c.is_ascii_digit()) {
                    return Vec::new();
                }
                value.to_string()
            }
            _ => value.to_string(),
        };
        let mut rest = &t[at + ph.len()..];
        if rest.starts_with('.') && filled.ends_with(['.', '!', '?']) {
            rest = &rest[1..];
        }
        let s = format!("{}{filled}{rest}", &t[..at]);
        let s = s.trim();
        if s.is_empty() {
            Vec::new()
        } else {
            vec![s.to_string()]
        }
    }
}

/// "Hunt for Red October, The" -> "The Hunt for Red October" (also ", A" and ", An").
pub fn natural_title(title: &str) -> String {
    for article in ["The", "A", "An"] {
        if let Some(head) = title.strip_suffix(&format!(", {article}")) {
            return format!("{article} {head}");
        }
    }
    title.to_string()
}

/// Split text at sentence boundaries (see the module docs); each piece trimmed, empty ones dropped.
pub fn split_sentences(text: &str) -> Vec<String> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        let (pos, c) = chars[i];
        if matches!(c, '.' | '!' | '?') {
            // Absorb runs of terminators and closing quotes/brackets: "Stop!!", "(see above.)".
            let mut j = i + 1;
            while j < chars.len() && matches!(chars[j].1, '.' | '!' | '?' | '"' | '\'' | ')' | ']' | '\u{201d}' | '\u{2019}') {
                j += 1;
            }
            let next_ws = j < chars.len() && chars[j].1.is_whitespace();
            let mut k = j;
            while k < chars.len() && chars[k].1.is_whitespace() {
                k += 1;
            }
            let opens = k < chars.len() && {
                let n = chars[k].1;
                n.is_uppercase() || n.is_ascii_digit() || matches!(n, '"' | '\'' | '(' | '[' | '\u{201c}' | '\u{2018}')
            };
            if next_ws && opens && !(c == '.' && is_abbreviation(&text[start..pos])) {
                let end = if j < chars.len() { chars[j].0 } else { text.len() };
                push_trimmed(&mut out, &text[start..end]);
                start = chars[k].0;
                i = k;
                continue;
            }
            i = j;
            continue;
        }
        i += 1;
    }
    push_trimmed(&mut out, &text[start..]);
    out
}

fn push_trimmed(out: &mut Vec<String>, s: &str) {
    let s = s.trim();
    if !s.is_empty() {
        out.push(s.to_string());
    }
}

/// Whether the word before a period (the end of `before`) is a single letter or a known abbreviation.
fn is_abbreviation(before: &str) -> bool {
    let word = before.rsplit(|c: char| c.is_whitespace() || c == '(').next().unwrap_or("");
    let w = word.trim_start_matches(['"', '\'']).to_lowercase();
    (w.chars().count() == 1 && w.chars().all(char::is_alphabetic)) || ABBREVIATIONS.contains(&w.as_str())
}

/// Sentences of every item: `(kept per item, dropped count)`.
pub fn item_sentences(table: &ItemTable, specs: &[FieldSpec], max_sentences: usize, file: &Path) -> Result<(Vec<Vec<String>>, usize)> {
    let cols = table.columns(specs.iter().map(|s| s.name.as_str()), "", file)?;
    let mut dropped = 0;
    let per_item = table
        .rows
        .iter()
        .map(|row| {
            let mut all: Vec<String> = specs.iter().zip(&cols).flat_map(|(s, &c)| s.sentences(&row[c])).collect();
            if all.len() > max_sentences {
                dropped += all.len() - max_sentences;
                all.truncate(max_sentences);
            }
            all
        })
        .collect();
    Ok((per_item, dropped))
}

/// Read an image-keywords file against the item tokens: per item, its images' sentences (at most
/// [`MAX_IMAGES`]), and the number of images dropped past that.
pub fn read_image_keywords(path: &Path, tokens: &[String]) -> Result<(Vec<Vec<String>>, usize)> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut images = vec![Vec::new(); tokens.len()];
    let mut dropped = 0;
    for (k, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let Some((tok, words)) = line.split_once('\t') else {
            return data_err(path, k + 1, "expected ITEM_TOKEN<TAB>space-separated words");
        };
        let tok = tok.trim();
        let Some(&i) = index.get(tok) else {
            return data_err(path, k + 1, format!("item \"{tok}\" is not in the .item file"));
        };
        // A third column (the cosines in NAME.image_words.tsv) is not part of the words.
        let words: Vec<&str> = words.split('\t').next().unwrap_or("").split_whitespace().collect();
        if words.is_empty() {
            return data_err(path, k + 1, format!("image of item \"{tok}\" has no words"));
        }
        if images[i].len() < MAX_IMAGES {
            images[i].push(words.join(" "));
        } else {
            dropped += 1;
        }
    }
    Ok((images, dropped))
}

/// One piece of the image stand-in: `FIELD` or `FIELD>N` (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct WordsSpec {
    pub field: String,
    /// Keep only the distinct words longer than this many characters; `None`: the value as it is.
    pub longer_than: Option<usize>,
}

impl WordsSpec {
    pub fn parse(spec: &str) -> Result<WordsSpec> {
        let bad =
            |why: &str| Error::Invalid(format!("--image-words-from \"{spec}\": {why} (expected FIELD or FIELD>N, e.g. title>3,brand)"));
        let (field, n) = match spec.split_once('>') {
            Some((f, n)) => (f.trim(), Some(n.trim().parse::<usize>().map_err(|_| bad("N is not a whole number"))?)),
            None => (spec.trim(), None),
        };
        if field.is_empty() {
            return Err(bad("empty field name"));
        }
        Ok(WordsSpec { field: field.to_string(), longer_than: n })
    }

    /// This spec's words of one value (empty for a missing value).
    pub fn words(&self, value: &str) -> Vec<String> {
        let value = value.trim();
        if is_missing(value) {
            return Vec::new();
        }
        let Some(n) = self.longer_than else { return vec![value.to_string()] };
        let mut seen = std::collections::HashSet::new();
        value
            .split(|c: char| !(c.is_alphanumeric() || matches!(c, '\'' | '-' | '&')))
            .map(|w| w.trim_matches(['\'', '-', '&']))
            .filter(|w| w.chars().count() > n && seen.insert(w.to_lowercase()))
            .map(str::to_string)
            .collect()
    }
}

/// The image stand-in: per item, one keyword sentence from the specs' fields (none when empty).
pub fn item_keyword_images(table: &ItemTable, specs: &[WordsSpec], file: &Path) -> Result<Vec<Vec<String>>> {
    let cols = table.columns(specs.iter().map(|s| s.field.as_str()), "--image-words-from: ", file)?;
    Ok(table
        .rows
        .iter()
        .map(|row| {
            let words: Vec<String> = specs.iter().zip(&cols).flat_map(|(s, &c)| s.words(&row[c])).collect();
            let line = words.join(" ").split_whitespace().collect::<Vec<_>>().join(" ");
            if line.is_empty() {
                Vec::new()
            } else {
                vec![line]
            }
        })
        .collect())
}

/// Lines of an image-keywords file (`ITEM<TAB>words`, one per image).
pub fn image_words_tsv(tokens: &[String], images: &[Vec<String>]) -> String {
    tokens.iter().zip(images).flat_map(|(t, im)| im.iter().map(move |w| format!("{t}\t{w}\n"))).collect()
}
