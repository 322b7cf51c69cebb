//! `cargo bench`: the kernel benchmarks of `msm4sr bench`, on the CPU backend and (when an adapter
//! exists) the GPU. Software adapters get the reduced shapes.

use msm4sr::engine::gpu::gpu;
use msm4sr::engine::Device;
use msm4sr::harness::bench;

fn main() {
    let mut devices = vec![Device::Cpu];
    if gpu().is_ok() {
        devices.push(Device::Gpu);
    }
    for dev in devices {
        let quick = dev == Device::Gpu && gpu().map(|g| g.adapter.is_software()).unwrap_or(true);
        match bench::run(dev, 1.0, quick) {
            Ok(rows) => {
                for r in rows {
                    let gf = r.gflops.map(|g| format!("{g:>8.1} GFLOP/s")).unwrap_or_default();
                    println!("{:<10} {:<26} {:>10.3} ms {gf}  [{}]", r.name, r.shape, r.seconds * 1e3, r.device);
                }
            }
            Err(e) => eprintln!("bench on {dev:?} failed: {e}"),
        }
    }
}
