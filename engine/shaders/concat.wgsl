// Block copy: dst[dst_off + i] = src[src_off + i] for i < n.
// concat writes each piece at its offset in the output; its backward cuts the gradient back into
// pieces by reading at the offsets.

struct P {
    n: u32,
    src_off: u32,
    dst_off: u32,
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n) { return; }
    dst[prm.dst_off + i] = src[prm.src_off + i];
}
