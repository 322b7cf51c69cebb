//! The `msm4sr` command line: the flags of each command and a dispatch to its `app::<command>`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use msm4sr::app::{self, Where};
use msm4sr::engine::{gpu, DeviceChoice};

#[derive(Parser)]
#[command(name = "msm4sr", version, about = "MSM4SR multimodal sequential recommendation on a wgpu compute engine")]
struct Cli {
    /// Where to run: a hardware GPU if present (auto), a GPU adapter (gpu), or the native CPU backend.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Pick a GPU adapter by (part of) its name, e.g. "llvmpipe" for Mesa's software Vulkan.
    #[arg(long, global = true, env = "MSM4SR_ADAPTER")]
    adapter: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job in about a minute: SASRec and MSM4SR on a small synthetic dataset, test
    /// metrics side by side, recommendations by name, a report with plots.
    Quickstart(app::quickstart::Args),
    /// Pre-train and fine-tune a model (both stages for msm4sr), then evaluate on the test split.
    Train(app::train::TrainArgs),
    /// Pre-train the M²SE backbone only (NIP + CMCL).
    Pretrain(app::train::PretrainArgs),
    /// Fine-tune (from pre-trained weights with --init), then evaluate on the test split.
    Finetune(app::train::FinetuneArgs),
    /// Evaluate a checkpoint on the validation and test splits.
    Evaluate(app::evaluate::Args),
    /// Top-k recommendations for users of the dataset (one, a list or all) or for a new user's
    /// item history.
    Recommend(app::recommend::Args),
    /// Turn a public dataset's raw files (Amazon reviews, MovieLens 100K) into NAME.inter + NAME.item.
    Import(app::import::Args),
    /// Embed item texts with a BERT sentence model into NAME.features.safetensors + NAME.items.txt.
    Featurize(app::featurize::Args),
    /// Write a synthetic dataset with planted multimodal structure.
    Synth(app::synth::Args),
    /// Summarise runs: a Markdown table (mean ± sd over seeds), paired bootstrap comparisons and
    /// SVG plots (loss and validation curves, sweep lines) in --out.
    Report(app::report::Args),
    /// Train every point of a grid (variants × setting values × seeds), one run directory each;
    /// finished runs are skipped and an interrupted one resumes when the command is run again.
    Sweep(app::sweep::Args),
    /// List GPU adapters, the chosen device, its limits and features.
    Info(app::info::Args),
    /// Check every op: f64 finite differences on the CPU, and the GPU kernels against the CPU.
    Gradcheck(app::gradcheck::Args),
    /// Benchmark kernels at the model's shapes.
    Bench(app::bench::Args),
}

fn main() -> ExitCode {
    msm4sr::startup();
    let cli = Cli::parse();
    gpu::request_adapter(cli.adapter.clone());
    if let Err(e) = msm4sr::interrupt::install() {
        eprintln!("warning: {e}");
    }
    let at = Where { choice: cli.device, named: cli.adapter.is_some() };
    app::exit_code(match cli.cmd {
        Cmd::Quickstart(a) => app::quickstart::run(a, at),
        Cmd::Train(a) => app::train::train(a, at),
        Cmd::Pretrain(a) => app::train::pretrain(a, at),
        Cmd::Finetune(a) => app::train::finetune(a, at),
        Cmd::Evaluate(a) => app::evaluate::run(a, at),
        Cmd::Recommend(a) => app::recommend::run(a, at),
        Cmd::Import(a) => app::import::run(a, at),
        Cmd::Featurize(a) => app::featurize::run(a, at),
        Cmd::Synth(a) => app::synth::run(a, at),
        Cmd::Report(a) => app::report::run(a, at),
        Cmd::Sweep(a) => app::sweep::run(a, at),
        Cmd::Info(a) => app::info::run(a, at),
        Cmd::Gradcheck(a) => app::gradcheck::run(a, at),
        Cmd::Bench(a) => app::bench::run(a, at),
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag of every command says what it does (`msm4sr CMD --help`).
    #[test]
    fn every_flag_has_help() {
        super::Cli::command().debug_assert();
        let cli = super::Cli::command();
        let mut missing = Vec::new();
        let mut seen = 0;
        for cmd in std::iter::once(&cli).chain(cli.get_subcommands()) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                seen += 1;
                if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{} --{}", cmd.get_name(), arg.get_long().unwrap_or(id)));
                }
            }
        }
        assert!(seen > 60, "{seen} flags");
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }
}
