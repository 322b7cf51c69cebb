use rand_chacha::ChaCha8Rng;

use crate::engine::ops::{add_layernorm, attention_ragged, dropout_rows, layernorm, softmax};
use crate::engine::{Indices, Ragged};
use crate::harness::gradcheck::{Case, Input};

fn ln(shape: &[usize], pshape: &[usize], eps: f32, offset: f64, rng: &mut ChaCha8Rng) -> Case {
    let mut x = Input::randn(shape, rng);
    x.data.iter_mut().for_each(|v| *v += offset);
    let desc = format!("{shape:?} gamma {pshape:?}{}", if offset != 0.0 { format!(" mean+{offset}") } else { String::new() });
    Case::new("layernorm", desc, vec![x, Input::randn(pshape, rng), Input::randn(pshape, rng)], move |x| {
        layernorm(&x[0], &x[1], &x[2], eps)
    })
}

/// LayerNorm of a residual sum (the fused kernel on the GPU): gradients reach both summands.
fn add_ln(shape: &[usize], pshape: &[usize], eps: f32, rng: &mut ChaCha8Rng) -> Case {
    let inputs = vec![Input::randn(shape, rng), Input::randn(shape, rng), Input::randn(pshape, rng), Input::randn(pshape, rng)];
    Case::new("add_layernorm", format!("{shape:?} gamma {pshape:?}"), inputs, move |x| add_layernorm(&x[0], &x[1], &x[2], &x[3], eps))
}

fn sm(shape: &[usize], lens: Option<Vec<u32>>, scale: f64, rng: &mut ChaCha8Rng) -> Case {
    let desc = format!("{shape:?} lens {lens:?}{}", if scale != 1.0 { format!(" x{scale}") } else { String::new() });
    let lens = lens.map(Indices::new);
    Case::new("softmax", desc, vec![Input::randn(shape, rng).scaled(scale)], move |x| softmax(&x[0], lens.as_ref()))
}

/// Ragged attention over sequences of `lens` packed into (N, c) rows, keys relative to width `kl`.
fn attn_ragged(lens: Vec<u32>, kl: usize, c: usize, heads: usize, p: f32, causal: bool, rng: &mut ChaCha8Rng) -> Case {
    let desc = format!("lens {lens:?} c{c} h{heads} p{p}{}", if causal { "" } else { " bidir" });
    let r = Ragged::new(&lens, kl).unwrap();
    let n = r.rows();
    let inputs = vec![Input::randn(&[n, c], rng), Input::randn(&[n, c], rng), Input::randn(&[n, c], rng)];
    Case::new("attention_ragged", desc, inputs, move |x| attention_ragged(&x[0], &x[1], &x[2], &r, heads, p, 79, causal))
}

fn drop_rows(lens: Vec<u32>, kl: usize, c: usize, p: f32, rng: &mut ChaCha8Rng) -> Case {
    let r = Ragged::new(&lens, kl).unwrap();
    let desc = format!("lens {lens:?} c{c} p{p}");
    Case::new("dropout_rows", desc, vec![Input::randn(&[r.rows(), c], rng)], move |x| dropout_rows(&x[0], p, 5, &r.keys))
}

pub fn cases(rng: &mut ChaCha8Rng) -> Vec<Case> {
    vec![
        ln(&[3, 37], &[37], 1e-5, 0.0, rng),
        ln(&[2, 3, 64], &[64], 1e-12, 0.0, rng),
        ln(&[1, 37], &[37], 1e-12, 0.0, rng),
        ln(&[4, 3, 5], &[3, 5], 1e-5, 0.0, rng),
        ln(&[3, 37], &[37], 1e-12, 1000.0, rng),
        ln(&[70, 2, 3], &[2, 3], 1e-5, 0.0, rng),
        // Groups whose columns fill whole cache lines (the MoE's shape: rows, experts, d0); its own
        // generator, so the other cases keep their inputs.
        ln(&[9, 3, 32], &[3, 32], 1e-5, 0.0, &mut rand::SeedableRng::seed_from_u64(32)),
        add_ln(&[3, 37], &[37], 1e-5, rng),
        add_ln(&[300, 2, 3], &[2, 3], 1e-12, rng),
        sm(&[4, 1], None, 1.0, rng),
        sm(&[3, 7], None, 1.0, rng),
        sm(&[2, 3, 9], Some(vec![9, 0, 4, 1, 9, 2]), 1.0, rng),
        sm(&[2, 601], Some(vec![601, 300]), 1.0, rng),
        sm(&[3, 11], None, 10.0, rng),
        attn_ragged(vec![1], 1, 4, 1, 0.0, true, rng),
        attn_ragged(vec![7, 3, 1], 7, 6, 2, 0.0, true, rng),
        attn_ragged(vec![7, 3, 1], 9, 6, 2, 0.2, true, rng),
        attn_ragged(vec![2, 70, 5], 70, 4, 2, 0.1, true, rng),
        attn_ragged(vec![5, 1, 4], 6, 8, 4, 0.2, false, rng),
        attn_ragged(vec![1], 1, 4, 1, 0.0, false, rng),
        attn_ragged(vec![61, 3], 66, 2, 2, 0.1, false, rng),
        drop_rows(vec![3, 1, 4], 5, 7, 0.3, rng),
    ]
}
