//! User groups by history length (the paper's Fig. 4): test users split into `n` groups of equal
//! size by the length of their untruncated history before the test target, every metric per group.
//!
//! Boundaries: with the lengths sorted, group g (0-based) ends at the length found at position
//! round((g + 1) · U / n) - 1; a user goes to the first group whose upper boundary is at least
//! their length, so users tied at a boundary all go to the lower group (groups can then differ in
//! size, and a group can be empty when many users share one length).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::data::metrics::Metrics;
use crate::{Error, Result};

/// One group's users and metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UserGroup {
    /// Shortest and longest history in the group (`None` for an empty group).
    pub min_len: Option<usize>,
    pub max_len: Option<usize>,
    /// Upper boundary: users with a history of at most this length (and above the previous
    /// group's) are in this group.
    pub upper: usize,
    pub users: usize,
    /// `None` for an empty group.
    pub metrics: Option<Metrics>,
}

/// Upper boundaries of `n` groups of the lengths `lens` (see the module docs).
/// The most user groups `--groups` makes.
pub const MAX_GROUPS: usize = 100;

pub fn boundaries(lens: &[usize], n: usize) -> Result<Vec<usize>> {
    if !(1..=MAX_GROUPS).contains(&n) {
        return Err(Error::Invalid(format!("--groups {n}: must be between 1 and {MAX_GROUPS} (the paper uses 5)")));
    }
    if lens.is_empty() {
        return Err(Error::Invalid("no users to group".into()));
    }
    let mut sorted = lens.to_vec();
    sorted.sort_unstable();
    let u = sorted.len();
    Ok((1..=n).map(|g| sorted[(((g * u) as f64 / n as f64).round() as usize).clamp(1, u) - 1]).collect())
}

/// The group of a length given the upper boundaries.
pub fn group_of(len: usize, upper: &[usize]) -> usize {
    upper.iter().position(|&b| len <= b).unwrap_or(upper.len() - 1)
}

/// Per-group metrics of users given as (history length, rank of their target).
pub fn user_groups(users: &[(usize, u32)], n: usize) -> Result<Vec<UserGroup>> {
    let lens: Vec<usize> = users.iter().map(|u| u.0).collect();
    let upper = boundaries(&lens, n)?;
    let mut members: BTreeMap<usize, Vec<(usize, u32)>> = BTreeMap::new();
    for &(len, rank) in users {
        members.entry(group_of(len, &upper)).or_default().push((len, rank));
    }
    Ok(upper
        .iter()
        .enumerate()
        .map(|(g, &b)| {
            let m = members.get(&g).cloned().unwrap_or_default();
            let ranks: Vec<u32> = m.iter().map(|x| x.1).collect();
            UserGroup {
                min_len: m.iter().map(|x| x.0).min(),
                max_len: m.iter().map(|x| x.0).max(),
                upper: b,
                users: m.len(),
                metrics: (!ranks.is_empty()).then(|| Metrics::from_ranks(&ranks)),
            }
        })
        .collect())
}

/// The groups as a Markdown table (history lengths, users, the six metrics).
pub fn table(groups: &[UserGroup]) -> String {
    let keys = ["recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"];
    let mut out = format!("| group | history length | users | {} |\n|---|---|---|{}\n", keys.join(" | "), "---|".repeat(keys.len()));
    for (g, x) in groups.iter().enumerate() {
        let range = match (x.min_len, x.max_len) {
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => format!("(empty, ≤ {})", x.upper),
        };
        let cells: Vec<String> =
            keys.iter().map(|k| x.metrics.as_ref().and_then(|m| m.get(k)).map_or("-".into(), |v| format!("{v:.4}"))).collect();
        out += &format!("| {} | {range} | {} | {} |\n", g + 1, x.users, cells.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_at_a_boundary_go_to_the_lower_group() {
        // 10 users; 5 groups of 2 by position; lengths 3 3 | 4 5 | 5 5 | 6 9 | 10 12 → the fives
        // tied across the 2nd boundary all join group 2, leaving group 3 empty.
        let lens = [5, 3, 9, 4, 12, 5, 3, 6, 10, 5];
        assert_eq!(boundaries(&lens, 5).unwrap(), vec![3, 5, 5, 9, 12]);
        let users: Vec<(usize, u32)> = lens.iter().zip([0u32, 30, 4, 7, 1, 25, 9, 2, 19, 11]).map(|(&l, r)| (l, r)).collect();
        let g = user_groups(&users, 5).unwrap();
        assert_eq!(g.iter().map(|x| x.users).collect::<Vec<_>>(), vec![2, 4, 0, 2, 2]);
        assert_eq!((g[1].min_len, g[1].max_len), (Some(4), Some(5)));
        assert!(g[2].metrics.is_none());
        // Group 1: lengths 3, 3 with ranks 30 and 9: recall@10 = 1/2, recall@5 = 0.
        let m = g[0].metrics.unwrap();
        assert_eq!((m.recall5, m.recall10, m.recall20), (0.0, 0.5, 0.5));
        assert!((m.ndcg10 - 0.5 / (11f64).log2()).abs() < 1e-12);
        // Group 2: ranks 0 (len 5), 7 (len 4), 25 (len 5), 11 (len 5).
        let m = g[1].metrics.unwrap();
        assert_eq!((m.recall5, m.recall10, m.recall20), (0.25, 0.5, 0.75));
        // Group 5: lengths 10, 12 with ranks 19, 1.
        let m = g[4].metrics.unwrap();
        assert_eq!((m.recall5, m.recall20), (0.5, 1.0));
        assert!(table(&g).contains("| 3 | (empty, ≤ 5) | 0 |"));
    }

    #[test]
    fn one_group_is_everyone() {
        let users = [(4, 0u32), (9, 100), (2, 3)];
        let g = user_groups(&users, 1).unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].users, 3);
        assert_eq!(g[0].metrics.unwrap(), Metrics::from_ranks(&[0, 100, 3]));
        assert!(user_groups(&users, 0).is_err());
    }
}
