//! PyTorch golden fixtures (written by tools/make_fixtures.py): every op and the composed MSM4SR
//! blocks (RecBole SASRec layer, attention-pool + MoE item encoder, NIP / CMCL / cross-entropy) must
//! reproduce PyTorch's (float64) outputs and gradients on both backends within 1e-4, in the
//! allclose sense: |got - want| <= 1e-5 + 1e-4 |want| for every element.

use std::collections::HashMap;
use std::path::PathBuf;

use msm4sr::engine::ops::*;
use msm4sr::engine::{backward, Device, Indices, Ragged, Tensor};
use msm4sr::model::nn::{self, AttentionPool, ItemEncoder, LayerNorm, Linear, MoeAdaptor, Seeds, TransformerLayer};
use msm4sr::Result;
use safetensors::SafeTensors;

use crate::padded;

struct Fixture {
    floats: HashMap<String, (Vec<usize>, Vec<f32>)>,
    ints: HashMap<String, Vec<u32>>,
}

fn load(name: &str) -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/fixtures").join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run tools/make_fixtures.py)", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut f = Fixture { floats: HashMap::new(), ints: HashMap::new() };
    for (n, v) in st.tensors() {
        match v.dtype() {
            safetensors::Dtype::F32 => {
                f.floats.insert(n.to_string(), (v.shape().to_vec(), bytemuck::pod_collect_to_vec(v.data())));
            }
            safetensors::Dtype::I32 => {
                let x: Vec<i32> = bytemuck::pod_collect_to_vec(v.data());
                f.ints.insert(n.to_string(), x.into_iter().map(|i| i as u32).collect());
            }
            d => panic!("unexpected dtype {d:?}"),
        }
    }
    f
}

type Build = fn(&HashMap<String, Tensor>, &HashMap<String, Vec<u32>>) -> Result<Tensor>;

fn run(name: &str, build: Build) {
    run_on(name, &[Device::Cpu, Device::Gpu], build)
}

fn run_on(name: &str, devices: &[Device], build: Build) {
    let f = load(name);
    for &dev in devices {
        let mut xs = HashMap::new();
        for (k, (shape, data)) in &f.floats {
            if let Some(n) = k.strip_prefix("x.") {
                xs.insert(n.to_string(), Tensor::from_vec(data.clone(), shape, dev).unwrap().param());
            }
        }
        let cs: HashMap<String, Vec<u32>> = f.ints.iter().map(|(k, v)| (k.trim_start_matches("c.").to_string(), v.clone())).collect();
        let out = build(&xs, &cs).unwrap_or_else(|e| panic!("{name} on {dev:?}: {e}"));
        let (wshape, w) = &f.floats["w"];
        let (oshape, want) = &f.floats["out"];
        assert_eq!(out.shape(), oshape.as_slice(), "{name}: output shape");
        let got = out.to_vec().unwrap();
        let (a, r, pass) = compare(&got, want);
        assert!(pass, "{name} on {dev:?}: output differs (max abs {a:.3e}, max rel {r:.3e})\n got {got:?}\nwant {want:?}");
        let wt = Tensor::from_vec(w.clone(), wshape, dev).unwrap();
        let loss = sum(&mul(&out, &wt).unwrap()).unwrap();
        let grads = backward(&loss).unwrap();
        for (n, x) in &xs {
            let (_, want) = &f.floats[&format!("g.{n}")];
            let got = grads.get(x).map(|g| g.to_vec().unwrap()).unwrap_or_else(|| vec![0.0; want.len()]);
            let (a, r, pass) = compare(&got, want);
            assert!(pass, "{name} on {dev:?}: gradient of {n} differs (max abs {a:.3e}, max rel {r:.3e})\n got {got:?}\nwant {want:?}");
        }
        eprintln!("fixture {name:<15} {dev:?}: ok");
    }
}

/// allclose(rtol = 1e-4, atol = 1e-5): (max abs err, max rel err, pass).
fn compare(got: &[f32], want: &[f32]) -> (f64, f64, bool) {
    let (mut a, mut r, mut pass) = (0f64, 0f64, got.len() == want.len());
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w as f64).abs();
        pass &= d <= 1e-5 + 1e-4 * (w as f64).abs();
        a = a.max(d);
        r = r.max(d / (w as f64).abs().max(1e-12));
    }
    (a, r, pass)
}

fn idx(c: &HashMap<String, Vec<u32>>, n: &str) -> Indices {
    Indices::new(c[n].clone())
}

fn lin(x: &HashMap<String, Tensor>, w: &str, b: &str) -> Linear {
    Linear { w: x[w].clone(), b: Some(x[b].clone()) }
}

#[test]
fn ops() {
    run("matmul", |x, _| matmul(&x["a"], &x["b"], false, false));
    run("linear", |x, _| linear(&x["x"], &x["w"], Some(&x["b"])));
    run("layernorm", |x, _| layernorm(&x["x"], &x["g"], &x["b"], 1e-12));
    run("softmax", |x, c| softmax(&x["x"], Some(&idx(c, "lens"))));
    run("gelu", |x, _| gelu(&x["x"]));
    run("l2norm", |x, _| l2norm(&x["x"], 1e-12));
    // The padded reference (padded.rs) against PyTorch's padded attention; the packed op is
    // checked against the reference there, and against PyTorch below.
    run_on("attention", &[Device::Cpu], |x, c| padded::attention(&x["q"], &x["k"], &x["v"], &idx(c, "lens"), 2, 0.0, 0, true));
    run("attention_pool", |x, c| attention_pool(&x["a"], &x["x"], &idx(c, "lens")));
    run("moe", |x, _| moe(&x["logits"], &x["experts"]));
    run("embedding", |x, c| embedding(&x["w"], &idx(c, "ids"), &[2, 3]));
    run("gather_last", |x, c| padded::gather_last(&x["x"], &idx(c, "lens")));
    run("cross_entropy", |x, c| cross_entropy(&x["logits"], &idx(c, "targets")));
    fn ragged(c: &HashMap<String, Vec<u32>>) -> Ragged {
        let lens = &c["lens"];
        Ragged::new(lens, *lens.iter().max().unwrap() as usize).unwrap()
    }
    run("attention_ragged_causal", |x, c| attention_ragged(&x["q"], &x["k"], &x["v"], &ragged(c), 2, 0.0, 0, true));
    run("attention_ragged_bidir", |x, c| attention_ragged(&x["q"], &x["k"], &x["v"], &ragged(c), 2, 0.0, 0, false));
    run("mean_ragged", |x, c| mean_ragged(&x["x"], &ragged(c)));
}

#[test]
fn losses() {
    run("nip", |x, c| nn::nip_loss(&x["m_hat"], &x["m_til"], &x["z"], &idx(c, "targets"), 0.07));
    run("cmcl", |x, c| nn::cmcl_loss(&x["a"], &x["b"], &idx(c, "targets"), 0.07));
}

#[test]
fn sasrec_layer() {
    // PyTorch's layer runs on the padded batch: so does the reference (padded.rs), which the
    // packed layer is checked against on every device.
    run_on("sasrec_layer", &[Device::Cpu], |x, c| {
        let layer = TransformerLayer {
            q: lin(x, "wq", "bq"),
            k: lin(x, "wk", "bk"),
            v: lin(x, "wv", "bv"),
            o: lin(x, "wo", "bo"),
            ln1: LayerNorm { g: x["ln1_g"].clone(), b: x["ln1_b"].clone(), eps: 1e-12 },
            ff1: lin(x, "w1", "b1"),
            ff2: lin(x, "w2", "b2"),
            ln2: LayerNorm { g: x["ln2_g"].clone(), b: x["ln2_b"].clone(), eps: 1e-12 },
            heads: 2,
            p_hidden: 0.2,
            p_attn: 0.2,
            causal: true,
            pre_ln: false,
            act: msm4sr::model::nn::Activation::Gelu,
        };
        padded::layer(&layer, &x["x"], &idx(c, "lens"), false, &mut Seeds::new(0))
    });
}

#[test]
fn item_encoder() {
    run("item_encoder", |x, c| {
        let enc = ItemEncoder {
            pool: AttentionPool { w1: lin(x, "pw1", "pb1"), w2: lin(x, "pw2", "pb2") },
            moe: MoeAdaptor {
                experts: lin(x, "ew", "eb"),
                ln: LayerNorm { g: x["ln_g"].clone(), b: x["ln_b"].clone(), eps: 1e-12 },
                gate: x["gw"].clone(),
                n_experts: 3,
                d0: 8,
                p: 0.2,
            },
        };
        enc.forward(&x["x"], None, &idx(c, "lens"), false, &mut Seeds::new(0))
    });
}
