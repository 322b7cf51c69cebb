//! The contract between an op and its WGSL kernel: a [`Kernel`] names its entry point, its storage
//! bindings and, as a type, its parameter block (declared with [`kernel_params!`]), which the layout
//! tests check against the shader; and the workload helpers that size a dispatch.

use std::marker::PhantomData;

use super::WG;

/// Workgroups a dispatch may have along one dimension (WebGPU's guaranteed minimum); larger counts
/// are folded into 2-D.
const MAX_GROUPS_PER_DIM: u64 = 65535;

/// How a kernel binds one storage buffer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Access {
    Read,
    ReadWrite,
}

/// The WGSL scalar type of one parameter field.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ScalarKind {
    U32,
    I32,
    F32,
}

/// A Rust type that is one WGSL scalar in a parameter block.
pub trait Scalar: bytemuck::Pod {
    const KIND: ScalarKind;
}

impl Scalar for u32 {
    const KIND: ScalarKind = ScalarKind::U32;
}

impl Scalar for i32 {
    const KIND: ScalarKind = ScalarKind::I32;
}

impl Scalar for f32 {
    const KIND: ScalarKind = ScalarKind::F32;
}

/// One field of a parameter block: its name, byte offset and scalar type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub kind: ScalarKind,
}

/// A kernel's parameter block, uploaded as bytes into the uniform at binding 0. Declare one with
/// [`kernel_params!`], which also lists its fields for the layout tests.
pub trait Params: bytemuck::Pod {
    /// The fields in declaration order.
    const FIELDS: &'static [Field];
}

/// Declares the parameter block of a kernel (or of every kernel of a shader file sharing one
/// `struct P`): a `#[repr(C)]` `Pod` struct with the WGSL struct's field names, order and scalar
/// types (`u32`, `i32`, `f32`), and its [`Params`] impl listing the fields with their offsets.
///
/// ```ignore
/// kernel_params! {
///     /// `struct P` of softmax.wgsl.
///     pub(crate) struct SoftmaxParams { rows: u32, cols: u32, has_lens: u32 }
/// }
/// ```
macro_rules! kernel_params {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $crate::gpu::Params for $name {
            const FIELDS: &'static [$crate::gpu::Field] = &[$($crate::gpu::Field {
                name: stringify!($field),
                offset: ::core::mem::offset_of!($name, $field),
                kind: <$ty as $crate::gpu::Scalar>::KIND,
            }),*];
        }

        const _: () = assert!(
            ::core::mem::size_of::<$name>() as u64 <= $crate::gpu::UNIFORM_STRIDE,
            concat!("parameter block ", stringify!($name), " exceeds the uniform stride")
        );
    };
}
pub(crate) use kernel_params;

/// A compute kernel: WGSL source, entry point, its storage bindings (binding 0 is always the
/// `var<uniform>` parameter block; storage buffers follow at bindings 1..) and, as a type, its
/// parameter block `P`.
pub struct Kernel<P> {
    pub name: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub bindings: &'static [Access],
    params: PhantomData<fn() -> P>,
}

impl<P: Params> Kernel<P> {
    pub const fn new(name: &'static str, source: &'static str, entry: &'static str, bindings: &'static [Access]) -> Self {
        Kernel { name, source, entry, bindings, params: PhantomData }
    }

    /// The kernel with its parameter type erased: what the pipeline cache and the layout tests need.
    pub fn contract(&self) -> Contract {
        Contract {
            name: self.name,
            source: self.source,
            entry: self.entry,
            bindings: self.bindings,
            params: std::any::type_name::<P>(),
            fields: P::FIELDS,
            size: std::mem::size_of::<P>(),
        }
    }
}

/// The Rust side of a kernel's contract with its shader.
#[derive(Clone, Copy, Debug)]
pub struct Contract {
    pub name: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub bindings: &'static [Access],
    /// Type name of the parameter block.
    pub params: &'static str,
    pub fields: &'static [Field],
    /// Bytes of the parameter block.
    pub size: usize,
}

/// Workgroup counts for `n` invocations of a 1-D kernel of [`WG`] lanes, folded into 2-D when the
/// count exceeds one dimension's limit. Kernels rebuild the linear index with `lin(gid, nwg)` and
/// skip indices >= n. No work gives no workgroups (the dispatch is skipped).
pub fn groups_1d(n: usize) -> [u32; 3] {
    fold((n as u64).div_ceil(WG as u64))
}

/// Workgroup counts for one workgroup per row (of any workgroup size), folded into 2-D the same
/// way. Kernels recover the row with `row_index(wid, nwg)` and skip rows >= the row count.
pub fn row_groups(rows: usize) -> [u32; 3] {
    fold(rows as u64)
}

/// `g` workgroups as (x, y, 1) with x, y <= the per-dimension limit and x * y >= g.
fn fold(g: u64) -> [u32; 3] {
    if g <= MAX_GROUPS_PER_DIM {
        [g as u32, 1, 1]
    } else {
        let y = g.div_ceil(MAX_GROUPS_PER_DIM);
        [g.div_ceil(y) as u32, y as u32, 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_fold_into_two_dimensions() {
        assert_eq!(groups_1d(0), [0, 1, 1]);
        assert_eq!(groups_1d(1), [1, 1, 1]);
        assert_eq!(groups_1d(WG as usize * 65535), [65535, 1, 1]);
        assert_eq!(row_groups(65535), [65535, 1, 1]);
        for n in [65536usize, 100_000, 65535 * 3 + 1, 1 << 31] {
            let [x, y, z] = row_groups(n);
            assert!(x as u64 <= MAX_GROUPS_PER_DIM && y as u64 <= MAX_GROUPS_PER_DIM && z == 1, "{n}: {x} x {y}");
            assert!(x as u64 * y as u64 >= n as u64, "{n}: {x} x {y}");
            assert_eq!(groups_1d(n * WG as usize), [x, y, z]);
        }
    }
}
