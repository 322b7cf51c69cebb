//! Train a tiny content-based recommender on synthetic data and watch the loss fall.
//!
//!     cargo run --release --example tiny              # a hardware GPU if present, else the CPU backend
//!     cargo run --release --example tiny -- gpu       # any GPU adapter (software Vulkan included)
//!     cargo run --release --example tiny -- cpu

use msm4sr::engine::DeviceChoice;
use msm4sr::model::demo::{Tiny, TinyConfig};

fn main() {
    msm4sr::startup();
    let choice = match std::env::args().nth(1).as_deref() {
        Some("gpu") => DeviceChoice::Gpu,
        Some("cpu") => DeviceChoice::Cpu,
        _ => DeviceChoice::Auto,
    };
    let result = (|| -> msm4sr::Result<()> {
        let (dev, desc) = choice.resolve(false)?;
        println!("device: {desc}");
        let mut m = Tiny::new(TinyConfig::default(), dev)?;
        let start = std::time::Instant::now();
        let mut avg = 0.0;
        for step in 1..=300 {
            let loss = m.step()?;
            avg += loss / 25.0;
            if step % 25 == 0 {
                println!("step {step:>4}  loss {avg:.4}  ({:.0} steps/s)", step as f64 / start.elapsed().as_secs_f64());
                avg = 0.0;
            }
        }
        let per_topic = (m.cfg.items / m.cfg.topics) as f32;
        println!(
            "chance level is ln({}) = {:.3}; the best possible is ln({per_topic}) = {:.3} (the next topic is predictable, the item within it is not)",
            m.cfg.items,
            (m.cfg.items as f32).ln(),
            per_topic.ln()
        );
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
