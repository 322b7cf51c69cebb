//! Layout tests: each kernel's Rust side of the contract with its shader (the parameter struct and
//! the storage bindings) against the WGSL, reflected with naga. They need no GPU.
//!
//! For every kernel of [`all_kernels`]: its source parses and validates, the entry point exists, the
//! `var<uniform>` at group 0, binding 0 is a struct with the Rust struct's field names, offsets and
//! scalar types in order and the same size, and each storage buffer the entry point uses sits at a
//! binding the kernel declares, with the same access (read vs read_write).

use std::collections::{HashMap, HashSet};

use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};

use crate::all_kernels;
use crate::gpu::{Access, Contract, ScalarKind, UNIFORM_STRIDE};

/// A parsed and validated shader.
struct Shader {
    module: naga::Module,
    info: ModuleInfo,
}

fn load(source: &str) -> Result<Shader, String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::all()).validate(&module).map_err(|e| e.emit_to_string(source))?;
    Ok(Shader { module, info })
}

/// The parameter-block kind of a WGSL type: 4-byte scalars only.
fn scalar_kind(ty: &naga::TypeInner) -> Option<ScalarKind> {
    use naga::ScalarKind as K;
    match *ty {
        naga::TypeInner::Scalar(naga::Scalar { kind: K::Uint, width: 4 }) => Some(ScalarKind::U32),
        naga::TypeInner::Scalar(naga::Scalar { kind: K::Sint, width: 4 }) => Some(ScalarKind::I32),
        naga::TypeInner::Scalar(naga::Scalar { kind: K::Float, width: 4 }) => Some(ScalarKind::F32),
        _ => None,
    }
}

/// Everything in which kernel `c` disagrees with its shader `sh` (empty when they agree).
fn mismatches(c: &Contract, sh: &Shader) -> Vec<String> {
    let m = &sh.module;
    let mut out = Vec::new();
    let Some(ep) = m.entry_points.iter().position(|e| e.name == c.entry && e.stage == naga::ShaderStage::Compute) else {
        return vec![format!("the shader has no compute entry point `{}`", c.entry)];
    };
    let uses = sh.info.get_entry_point(ep);

    // The parameter block.
    let uniform: Vec<_> =
        m.global_variables.iter().filter(|(_, v)| v.binding == Some(naga::ResourceBinding { group: 0, binding: 0 })).collect();
    match uniform[..] {
        [(_, var)] if var.space == naga::AddressSpace::Uniform => match &m.types[var.ty].inner {
            naga::TypeInner::Struct { members, span } => {
                let n = members.len().max(c.fields.len());
                for i in 0..n {
                    match (members.get(i), c.fields.get(i)) {
                        (Some(w), Some(r)) => {
                            let wname = w.name.as_deref().unwrap_or("?");
                            let wkind = scalar_kind(&m.types[w.ty].inner);
                            if wname != r.name || w.offset as usize != r.offset || wkind != Some(r.kind) {
                                let wkind = wkind.map_or_else(|| format!("{:?}", m.types[w.ty].inner), |k| format!("{k:?}"));
                                out.push(format!(
                                    "{}: field {i} is `{}: {:?}` at offset {} in Rust but `{wname}: {wkind}` at offset {} in WGSL",
                                    c.params, r.name, r.kind, r.offset, w.offset
                                ));
                            }
                        }
                        (Some(w), None) => out.push(format!(
                            "{}: WGSL field {i} `{}` at offset {} has no Rust field",
                            c.params,
                            w.name.as_deref().unwrap_or("?"),
                            w.offset
                        )),
                        (None, Some(r)) => {
                            out.push(format!("{}: Rust field {i} `{}` at offset {} has no WGSL field", c.params, r.name, r.offset))
                        }
                        (None, None) => unreachable!(),
                    }
                }
                if *span as usize != c.size {
                    out.push(format!("{}: {} bytes in Rust, {span} bytes in WGSL", c.params, c.size));
                }
                if c.size as u64 > UNIFORM_STRIDE {
                    out.push(format!("{}: {} bytes exceed the uniform stride {UNIFORM_STRIDE}", c.params, c.size));
                }
            }
            other => out.push(format!("the uniform at binding 0 is a {other:?}, not a struct")),
        },
        [(_, var)] => out.push(format!("binding 0 is in the {:?} address space, not a uniform", var.space)),
        [] => out.push("the shader declares no uniform at group 0, binding 0".into()),
        _ => out.push("the shader declares several variables at group 0, binding 0".into()),
    }

    // The storage buffers this entry point uses.
    let mut seen: HashMap<u32, &str> = HashMap::new();
    for (h, var) in m.global_variables.iter() {
        let (Some(rb), false) = (&var.binding, uses[h].is_empty()) else {
            continue;
        };
        let name = var.name.as_deref().unwrap_or("?");
        if rb.group != 0 {
            out.push(format!("`{name}` is in bind group {}; kernels bind group 0 only", rb.group));
            continue;
        }
        if rb.binding == 0 {
            continue;
        }
        if let Some(other) = seen.insert(rb.binding, name) {
            out.push(format!("`{other}` and `{name}` both use binding {}", rb.binding));
        }
        let naga::AddressSpace::Storage { access } = var.space else {
            out.push(format!("`{name}` at binding {} is not a storage buffer", rb.binding));
            continue;
        };
        let want = if access.contains(naga::StorageAccess::STORE) { Access::ReadWrite } else { Access::Read };
        match c.bindings.get(rb.binding as usize - 1) {
            None => out.push(format!("`{name}` uses binding {} but the kernel binds only {} buffers", rb.binding, c.bindings.len())),
            Some(&a) if a != want => out.push(format!("binding {} (`{name}`) is {want:?} in WGSL but {a:?} in Rust", rb.binding)),
            Some(_) => {}
        }
    }
    out
}

/// The problems of every kernel in `kernels`, each prefixed with the kernel.
fn check_all(kernels: &[Contract]) -> Vec<String> {
    let mut shaders: HashMap<&str, Result<Shader, String>> = HashMap::new();
    let mut out = Vec::new();
    for c in kernels {
        let what = format!("{}:{}", c.name, c.entry);
        match shaders.entry(c.source).or_insert_with(|| load(c.source)) {
            Ok(sh) => out.extend(mismatches(c, sh).into_iter().map(|p| format!("{what}: {p}"))),
            Err(e) => out.push(format!("{what}: the shader does not compile:\n{e}")),
        }
    }
    out
}

#[test]
fn every_kernel_matches_its_shader() {
    let problems = check_all(&all_kernels());
    assert!(problems.is_empty(), "{} kernel/shader mismatches:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn every_shader_file_and_entry_point_is_registered() {
    let kernels = all_kernels();
    // The pipeline cache is keyed by (name, entry): one source per name, entries unique.
    let mut keys = HashSet::new();
    let mut sources: HashMap<&str, &str> = HashMap::new();
    for c in &kernels {
        assert!(keys.insert((c.name, c.entry)), "kernel {}:{} is listed twice", c.name, c.entry);
        assert_eq!(*sources.entry(c.name).or_insert(c.source), c.source, "kernels named {} have different sources", c.name);
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "wgsl") || path.file_name().unwrap() == "common.wgsl" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(kernels.iter().any(|c| c.source.ends_with(&text)), "no kernel uses {}", path.display());
    }
    for (name, source) in sources {
        let sh = load(source).unwrap_or_else(|e| panic!("{name}: {e}"));
        for ep in &sh.module.entry_points {
            assert!(keys.contains(&(name, ep.name.as_str())), "entry point {name}:{} has no Kernel in all_kernels()", ep.name);
        }
    }
}

#[test]
fn the_workgroup_size_is_the_same_on_both_sides() {
    let source = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/common.wgsl"));
    let sh = load(source).unwrap();
    let (_, wg) = sh.module.constants.iter().find(|(_, c)| c.name.as_deref() == Some("WG")).expect("common.wgsl declares WG");
    let value = &sh.module.global_expressions[wg.init];
    assert!(matches!(value, naga::Expression::Literal(naga::Literal::U32(v)) if *v == crate::gpu::WG), "WG = {value:?} in WGSL");
}

mod mismatch {
    use super::*;
    use crate::gpu::{kernel_params, Access::*, Kernel};
    use crate::ops::wgsl;

    const SRC: &str = wgsl!("softmax.wgsl");

    kernel_params! {
        /// softmax.wgsl's `struct P` is (rows: u32, cols: u32, has_lens: u32).
        struct Wrong {
            cols: u32,
            rows: u32,
            has_lens: f32,
            extra: u32,
        }
    }

    kernel_params! {
        struct Right {
            rows: u32,
            cols: u32,
            has_lens: u32,
        }
    }

    static WRONG: Kernel<Wrong> = Kernel::new("softmax", SRC, "softmax_fwd", &[Read, Read, ReadWrite]);
    static WRONG_BINDINGS: Kernel<Right> = Kernel::new("softmax", SRC, "softmax_fwd", &[Read, ReadWrite]);
    static NO_ENTRY: Kernel<Right> = Kernel::new("softmax", SRC, "softmax_sideways", &[Read, Read, ReadWrite]);
    static RIGHT: Kernel<Right> = Kernel::new("softmax", SRC, "softmax_fwd", &[Read, Read, ReadWrite]);

    #[test]
    fn a_mismatched_struct_is_reported() {
        let p = check_all(&[WRONG.contract()]);
        let has = |s: &str| p.iter().any(|x| x.contains(s));
        assert!(has("field 0 is `cols: U32` at offset 0 in Rust but `rows: U32` at offset 0 in WGSL"), "{p:#?}");
        assert!(has("field 1 is `rows: U32` at offset 4 in Rust but `cols: U32`"), "{p:#?}");
        assert!(has("field 2 is `has_lens: F32` at offset 8 in Rust but `has_lens: U32`"), "{p:#?}");
        assert!(has("Rust field 3 `extra` at offset 12 has no WGSL field"), "{p:#?}");
        assert!(has("16 bytes in Rust, 12 bytes in WGSL"), "{p:#?}");
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p.iter().all(|x| x.starts_with("softmax:softmax_fwd: ") && x.contains("Wrong")), "{p:#?}");
    }

    #[test]
    fn mismatched_bindings_and_entry_points_are_reported() {
        let p = check_all(&[WRONG_BINDINGS.contract(), NO_ENTRY.contract()]);
        assert_eq!(
            p,
            [
                "softmax:softmax_fwd: binding 2 (`lens`) is Read in WGSL but ReadWrite in Rust",
                "softmax:softmax_fwd: `y` uses binding 3 but the kernel binds only 2 buffers",
                "softmax:softmax_sideways: the shader has no compute entry point `softmax_sideways`",
            ]
        );
        assert!(check_all(&[RIGHT.contract()]).is_empty());
    }

    #[test]
    fn a_broken_shader_is_reported() {
        static BROKEN: Kernel<Right> = Kernel::new("broken", "struct P { rows: u32 } fn f( {", "f", &[]);
        let p = check_all(&[BROKEN.contract()]);
        assert!(p.len() == 1 && p[0].starts_with("broken:f: the shader does not compile"), "{p:#?}");
    }
}
