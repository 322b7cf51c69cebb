//! RecBole `.item` files: the item table featurize reads (and `recommend` names items from).

use std::collections::HashMap;
use std::path::Path;

use super::*;
use crate::{Error, Result};

// ---- .item files ----------------------------------------------------------------------------

/// A RecBole `.item` file: field names (types stripped) and rows, the item token in `rows[i].0`.
#[derive(Clone, Debug)]
pub struct ItemTable {
    pub fields: Vec<String>,
    pub tokens: Vec<String>,
    /// One row of values per item, in `fields` order.
    pub rows: Vec<Vec<String>>,
}

impl ItemTable {
    pub fn field(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f == name)
    }

    /// The column of each named field; a missing one is an error naming the file's header
    /// (`what` prefixes the message, e.g. the flag that named the field).
    pub fn columns<'a>(&self, names: impl Iterator<Item = &'a str>, what: &str, file: &Path) -> Result<Vec<usize>> {
        names
            .map(|n| {
                self.field(n).ok_or_else(|| Error::Data {
                    file: file.display().to_string(),
                    line: 1,
                    msg: format!(
                        "{what}no {}field `{n}` in the header (fields: {})",
                        if what.is_empty() { "text " } else { "" },
                        self.fields.join(", ")
                    ),
                })
            })
            .collect()
    }
}

/// Read a RecBole `.item` file (tab-separated, header `field:type`, an `item_id` column).
pub fn read_item_table(path: &Path) -> Result<ItemTable> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let header = match lines.next() {
        Some(h) if !h.trim().is_empty() => h,
        _ => return data_err(path, 0, "empty file: expected a header line such as `item_id:token<TAB>title:token_seq`"),
    };
    let fields: Vec<String> = header.split('\t').map(|f| f.split(':').next().unwrap_or("").trim().to_string()).collect();
    let Some(id_col) = fields.iter().position(|f| f == "item_id") else {
        return data_err(path, 1, format!("the header has no item_id field (fields: {})", fields.join(", ")));
    };
    let mut table = ItemTable { fields, tokens: Vec::new(), rows: Vec::new() };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (k, line) in lines.enumerate() {
        let lineno = k + 2;
        if line.trim().is_empty() {
            continue;
        }
        let vals: Vec<String> = line.split('\t').map(str::to_string).collect();
        if vals.len() != table.fields.len() {
            return data_err(path, lineno, format!("expected {} tab-separated fields, found {}", table.fields.len(), vals.len()));
        }
        let tok = vals[id_col].trim().to_string();
        if tok.is_empty() {
            return data_err(path, lineno, "empty item_id");
        }
        if let Some(first) = seen.insert(tok.clone(), lineno) {
            return data_err(path, lineno, format!("duplicate item \"{tok}\" (first on line {first})"));
        }
        table.tokens.push(tok);
        table.rows.push(vals);
    }
    if table.rows.is_empty() {
        return data_err(path, 0, "no items (only a header)");
    }
    Ok(table)
}
