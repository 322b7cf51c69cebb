//! Kernel tests: every op's backward against f64 finite differences on the CPU backend, and every
//! wgpu kernel (forward and backward) against the CPU backend. The GPU checks run on whatever
//! adapter wgpu picks (in CI: Mesa lavapipe); set MSM4SR_ADAPTER to choose one.

mod bert;
mod clip;
mod e2e;
mod fixtures;
mod padded;
mod workloads;

use msm4sr::harness::gradcheck::{all_cases, check_fd, check_gpu, CheckResult};

fn report(results: &[CheckResult]) {
    let bad: Vec<_> = results.iter().filter(|r| !r.pass).collect();
    for r in results {
        eprintln!(
            "{:<16} {:<28} {:<4} abs {:.2e} rel {:.2e} {}",
            r.op,
            r.shape,
            r.check,
            r.max_abs_err,
            r.max_rel_err,
            if r.pass { "ok" } else { "FAIL" }
        );
    }
    assert!(bad.is_empty(), "failed: {:#?}", bad);
}

fn fd(op: &str) {
    let cases: Vec<_> = all_cases().into_iter().filter(|c| c.op == op).collect();
    assert!(!cases.is_empty(), "no cases registered for {op}");
    report(&cases.iter().map(check_fd).collect::<Vec<_>>());
}

fn gpu(op: &str) {
    let cases: Vec<_> = all_cases().into_iter().filter(|c| c.op == op).collect();
    assert!(!cases.is_empty(), "no cases registered for {op}");
    report(&cases.iter().map(check_gpu).collect::<Vec<_>>());
}

macro_rules! op_tests {
    ($($op:ident),*) => {
        mod fd { $( #[test] fn $op() { super::fd(stringify!($op)); } )* }
        mod gpu { $( #[test] fn $op() { super::gpu(stringify!($op)); } )* }
    };
}

op_tests!(
    add,
    mul,
    gelu,
    quick_gelu,
    dropout,
    sum,
    layernorm,
    add_layernorm,
    softmax,
    attention_ragged,
    dropout_rows,
    attention_pool,
    attention_pool_dot,
    moe,
    mean_ragged,
    embedding,
    cross_entropy,
    catalog_ce,
    info_nce,
    matmul,
    linear_gelu,
    l2norm,
    concat
);

#[test]
fn adam() {
    report(&msm4sr::harness::gradcheck::cases::special_checks(&["adam".to_string()], true));
}
