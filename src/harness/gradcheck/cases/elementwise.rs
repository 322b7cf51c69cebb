use rand_chacha::ChaCha8Rng;

use crate::engine::ops::{add, dropout, gelu, mean, mul, quick_gelu, scale, sub, sum, sum_rows};
use crate::harness::gradcheck::{Case, Input};

pub fn cases(rng: &mut ChaCha8Rng) -> Vec<Case> {
    vec![
        Case::new("add", "(3,5,4)+(3,5,4)", vec![Input::randn(&[3, 5, 4], rng), Input::randn(&[3, 5, 4], rng)], |x| add(&x[0], &x[1])),
        Case::new("add", "(3,5,4)+(5,4)", vec![Input::randn(&[3, 5, 4], rng), Input::randn(&[5, 4], rng)], |x| add(&x[0], &x[1])),
        Case::new("add", "(1,7)-(7)", vec![Input::randn(&[1, 7], rng), Input::randn(&[7], rng)], |x| sub(&x[0], &x[1])),
        Case::new("add", "scale (2,3)", vec![Input::randn(&[2, 3], rng)], |x| scale(&x[0], -0.7)),
        Case::new("mul", "(4,6)*(4,6)", vec![Input::randn(&[4, 6], rng), Input::randn(&[4, 6], rng)], |x| mul(&x[0], &x[1])),
        Case::new("mul", "(2,3,5)*(5)", vec![Input::randn(&[2, 3, 5], rng), Input::randn(&[5], rng)], |x| mul(&x[0], &x[1])),
        Case::new("gelu", "(301)", vec![Input::randn(&[301], rng).scaled(3.0)], |x| gelu(&x[0])),
        Case::new("quick_gelu", "(301)", vec![Input::randn(&[301], rng).scaled(3.0)], |x| quick_gelu(&x[0])),
        Case::new("dropout", "(17,13) p=0.3", vec![Input::randn(&[17, 13], rng)], |x| dropout(&x[0], 0.3, 1234)),
        Case::new("dropout", "(5) p=0.5", vec![Input::randn(&[5], rng)], |x| dropout(&x[0], 0.5, 9)),
        Case::new("sum", "sum (1000)", vec![Input::randn(&[1000], rng)], |x| sum(&x[0])),
        Case::new("sum", "mean (3,7001)", vec![Input::randn(&[3, 7001], rng)], |x| mean(&x[0])),
        Case::new("sum", "sum_rows (300,7)", vec![Input::randn(&[300, 7], rng)], |x| sum_rows(&x[0])),
        Case::new("sum", "sum_rows (1,1)", vec![Input::randn(&[1, 1], rng)], |x| sum_rows(&x[0])),
    ]
}
