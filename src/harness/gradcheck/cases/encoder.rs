use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::ops::{attention_pool, attention_pool_dot, cross_entropy, embedding, gelu, info_nce, mean_ragged, moe};
use crate::engine::{Indices, Ragged};
use crate::harness::gradcheck::{Case, Input};

fn ids(v: &[u32]) -> Indices {
    Indices::new(v.to_vec())
}

// Wide rows (D > 256, for the kernels' strided loops) use small x: finite-difference round-off
// grows like eps * sum|out * w| / h and must stay below the 1e-6 tolerance.
fn x_scale(d: usize) -> f64 {
    if d > 256 {
        0.05
    } else {
        1.0
    }
}

fn pool(rng: &mut ChaCha8Rng, n: usize, s: usize, d: usize, lens: &'static [u32]) -> Case {
    Case::new(
        "attention_pool",
        format!("({n},{s},{d}) lens {lens:?}"),
        vec![Input::randn(&[n, s], rng).scaled(2.0), Input::randn(&[n, s, d], rng).scaled(x_scale(d))],
        |x| attention_pool(&x[0], &x[1], &ids(lens)),
    )
}

fn moe_case(rng: &mut ChaCha8Rng, n: usize, o: usize, d: usize) -> Case {
    Case::new(
        "moe",
        format!("({n},{o},{d})"),
        vec![Input::randn(&[n, o], rng).scaled(2.0), Input::randn(&[n, o, d], rng).scaled(x_scale(d))],
        |x| moe(&x[0], &x[1]),
    )
}

/// As `pool` with constant rows x (raw item features): only the energies are differentiated, and
/// the backward makes no dx.
fn pool_const_x(rng: &mut ChaCha8Rng, n: usize, s: usize, d: usize, lens: &'static [u32]) -> Case {
    let x = Input::randn(&[n, s, d], rng).scaled(x_scale(d));
    Case::new(
        "attention_pool",
        format!("({n},{s},{d}) lens {lens:?}, x constant"),
        vec![Input::randn(&[n, s], rng).scaled(2.0), Input::constant(&x.shape, x.data)],
        |x| attention_pool(&x[0], &x[1], &ids(lens)),
    )
}

/// `lens` for a case's name: in full when short.
fn short(lens: &[u32]) -> String {
    match lens {
        [l, rest @ ..] if rest.len() >= 8 && rest.iter().all(|x| x == l) => format!("[{l}; {}]", lens.len()),
        _ => format!("{lens:?}"),
    }
}

/// Attention pooling with the energies of one vector w (D, 1); `track_x: false` keeps x constant
/// (raw item features: only w is differentiated and the backward makes no dx).
fn pool_dot(rng: &mut ChaCha8Rng, n: usize, s: usize, d: usize, lens: &'static [u32], track_x: bool) -> Case {
    // Energies of size ~2 as in `pool`: w scaled so that dot(x_j, w) has that spread.
    let xs = x_scale(d);
    let x = Input::randn(&[n, s, d], rng).scaled(xs);
    let x = if track_x { x } else { Input::constant(&x.shape, x.data) };
    let w = Input::randn(&[d, 1], rng).scaled(2.0 / (xs * (d as f64).sqrt()));
    Case::new(
        "attention_pool_dot",
        format!("({n},{s},{d}) lens {}{}", short(lens), if track_x { "" } else { ", x constant" }),
        vec![x, w],
        |x| attention_pool_dot(&x[0], &x[1], &ids(lens), None),
    )
}

/// `pool_dot` over items `rows` of a table of `m` items, read in place (constant table) or
/// gathered first (tracked table: its gradient is the gather's, repeats summed).
fn pool_dot_rows(
    rng: &mut ChaCha8Rng,
    m: usize,
    (s, d): (usize, usize),
    rows: &'static [u32],
    lens: &'static [u32],
    track_x: bool,
) -> Case {
    let x = Input::randn(&[m, s, d], rng);
    let x = if track_x { x } else { Input::constant(&x.shape, x.data) };
    let w = Input::randn(&[d], rng).scaled(2.0 / (d as f64).sqrt());
    Case::new(
        "attention_pool_dot",
        format!("({m},{s},{d}) items {rows:?} lens {lens:?}{}", if track_x { "" } else { ", x constant" }),
        vec![x, w],
        |x| attention_pool_dot(&x[0], &x[1], &ids(lens), Some(&ids(rows))),
    )
}

/// The mean of each sequence of `lens`, packed into (N, c) rows.
fn mean_case(rng: &mut ChaCha8Rng, lens: &[u32], c: usize) -> Case {
    let r = Ragged::new(lens, *lens.iter().max().unwrap() as usize).unwrap();
    let x = Input::randn(&[r.rows(), c], rng).scaled(x_scale(c));
    Case::new("mean_ragged", format!("lens {lens:?} c{c}"), vec![x], move |x| mean_ragged(&x[0], &r))
}

/// InfoNCE on (K, B, B) logits of size ~ cos / tau, with `pos` added to the first matrix's
/// diagonal (positives more similar than negatives, as after some training).
fn nce(rng: &mut ChaCha8Rng, what: &str, targets: Vec<u32>, num: &'static [bool], excl: &'static [bool], pos: f64) -> Case {
    let (k, b) = (num.len(), targets.len());
    let mut xs: Vec<Input> = (0..k).map(|_| Input::randn(&[b, b], rng).scaled(3.0)).collect();
    (0..b).for_each(|j| xs[0].data[j * b + j] += pos);
    let t = Indices::new(targets);
    Case::new("info_nce", format!("{what} {k} x ({b},{b})"), xs, move |x| info_nce(&x.iter().collect::<Vec<_>>(), &t, num, excl, 1.0))
}

pub fn cases(rng: &mut ChaCha8Rng) -> Vec<Case> {
    let mut v = vec![
        pool(rng, 4, 5, 7, &[0, 5, 1, 3]),
        pool(rng, 1, 1, 3, &[1]),
        pool(rng, 3, 11, 37, &[11, 9, 0]),
        pool(rng, 2, 3, 300, &[2, 3]),
        pool(rng, 2, 4, 2, &[0, 0]),
        pool_const_x(rng, 3, 10, 300, &[10, 4, 0]),
        moe_case(rng, 3, 8, 5),
        moe_case(rng, 1, 8, 1),
        moe_case(rng, 2, 3, 260),
        Case::new("embedding", "(7,5) ids (2,3) dup", vec![Input::randn(&[7, 5], rng)], |x| {
            embedding(&x[0], &ids(&[1, 4, 1, 1, 0, 6]), &[2, 3])
        }),
        Case::new("embedding", "(3,300) ids (1)", vec![Input::randn(&[3, 300], rng)], |x| embedding(&x[0], &ids(&[2]), &[1])),
        Case::new("embedding", "gelu(w) (4,3) ids (2,2,2)", vec![Input::randn(&[4, 3], rng)], |x| {
            embedding(&gelu(&x[0])?, &ids(&[3, 3, 0, 3, 1, 0, 3, 3]), &[2, 2, 2])
        }),
        Case::new("cross_entropy", "(3,11)", vec![Input::randn(&[3, 11], rng)], |x| cross_entropy(&x[0], &ids(&[0, 10, 4]))),
        Case::new("cross_entropy", "(1,1)", vec![Input::randn(&[1, 1], rng)], |x| cross_entropy(&x[0], &ids(&[0]))),
    ];
    // Large logits (x10, shifted by +100 so exp would overflow f32 without the max shift) with the
    // target at each row's maximum: the confident regime, with a loss small enough for finite
    // differences to resolve.
    let mut x = Input::randn(&[2, 300], rng).scaled(10.0);
    x.data.iter_mut().for_each(|v| *v += 100.0);
    let t: Vec<u32> = x.data.chunks(300).map(|r| (0..300).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap() as u32).collect();
    v.push(Case::new("cross_entropy", "(2,300) x10+100", vec![x], move |x| cross_entropy(&x[0], &ids(&t))));
    // A vocabulary-sized row with a clear winner (loss ~1).
    let mut x = Input::randn(&[2, 8011], rng);
    let t: Vec<u32> = (0..2).map(|_| rng.random_range(0..8011)).collect();
    t.iter().enumerate().for_each(|(b, &c)| x.data[b * 8011 + c as usize] += 9.0);
    v.push(Case::new("cross_entropy", "(2,8011) confident", vec![x], move |x| cross_entropy(&x[0], &ids(&t))));
    v.extend([
        nce(rng, "NIP", vec![3, 1, 3, 0, 1], &[true, true], &[false, false], 0.0),
        nce(rng, "CMCL", vec![3, 1, 3, 0, 1], &[true, false], &[false, true], 0.0),
        nce(rng, "NIP", vec![5], &[true], &[false], 0.0),
        nce(rng, "all same target", vec![2, 2, 2, 2], &[true, false, true], &[false, true, false], 0.0),
        nce(rng, "K=4", vec![0, 1, 2, 0, 1, 2, 9], &[false, true, false, true], &[true, false, true, false], 0.0),
    ]);
    let t: Vec<u32> = (0..260).map(|_| rng.random_range(0..200)).collect();
    v.push(nce(rng, "CMCL", t, &[true, false], &[false, true], 12.0));
    v.extend([mean_case(rng, &[3, 1, 4], 5), mean_case(rng, &[1], 1), mean_case(rng, &[2, 70, 5, 1], 300)]);
    // A generator of their own, so that the cases above keep their inputs. 70 items: three blocks
    // of dw's partial sums, the last one short.
    let r = &mut ChaCha8Rng::seed_from_u64(33);
    v.extend([
        pool_dot(r, 4, 5, 7, &[0, 5, 1, 3], true),
        pool_dot(r, 1, 1, 3, &[1], true),
        pool_dot(r, 3, 11, 37, &[11, 9, 0], true),
        pool_dot(r, 2, 4, 2, &[0, 0], true),
        pool_dot(r, 3, 10, 300, &[10, 4, 0], false),
        pool_dot(r, 70, 3, 9, &[3; 70], false),
        pool_dot_rows(r, 6, (4, 7), &[5, 0, 5, 2], &[4, 0, 2, 3], false),
        pool_dot_rows(r, 6, (4, 7), &[5, 0, 5, 2], &[4, 0, 2, 3], true),
    ]);
    // InfoNCE of cosine-sized logits taken times 1 / tau inside the op, as the model calls it.
    for (what, targets, num, excl) in [
        ("NIP", vec![3, 1, 3, 0, 1], &[true, true] as &'static [bool], &[false, false] as &'static [bool]),
        ("CMCL", vec![3, 1, 3, 0, 1, 2, 2, 4, 0], &[true, false], &[false, true]),
    ] {
        let (k, b) = (num.len(), targets.len());
        let xs = (0..k).map(|_| Input::randn(&[b, b], r).scaled(0.2)).collect();
        let t = Indices::new(targets);
        v.push(Case::new("info_nce", format!("{what} {k} x ({b},{b}) x 1/0.07"), xs, move |x| {
            info_nce(&x.iter().collect::<Vec<_>>(), &t, num, excl, 1.0 / 0.07)
        }));
    }
    v
}
