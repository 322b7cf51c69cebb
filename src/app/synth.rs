//! `msm4sr synth`: a synthetic dataset with planted multimodal structure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::runs::check_outputs;
use super::Where;
use crate::data::synth;
use crate::Result;

/// Write a synthetic dataset with planted multimodal structure.
#[derive(clap::Args)]
pub struct Args {
    /// Output dataset directory (synth.inter, synth.item with item names, synth.features.safetensors,
    /// synth.items.txt).
    #[arg(long, required_unless_present = "print_config")]
    pub out: Option<PathBuf>,
    /// TOML file with any generator settings (see `--print-config` for the keys and defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the effective generator settings as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Users (default 1000).
    #[arg(long)]
    pub users: Option<usize>,
    /// Items (default 3000).
    #[arg(long)]
    pub items: Option<usize>,
    /// Generator seed (default 42; the output is a function of the settings).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Replace an existing synthetic dataset in --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// `msm4sr synth`.
pub fn run(args: Args, _at: Where) -> Result<ExitCode> {
    let Args { out, config, print_config, users, items, seed, overwrite } = args;
    let c = synth::SynthConfig::resolve(config.as_deref(), users, items, seed)?;
    if print_config {
        out!("{}", toml::to_string(&c).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let out = out.ok_or_else(|| crate::Error::Invalid("synth needs --out DIR".into()))?;
    synth(&out, &c, config.as_deref(), overwrite)?;
    outln!("wrote a synthetic dataset ({} users, {} items, seed {}) to {}", c.users, c.items, c.seed, out.display());
    Ok(ExitCode::SUCCESS)
}

/// `synth`: its outputs checked (not `config_file`, not an earlier dataset's unless `overwrite`),
/// then [`crate::data::synth::write`].
pub fn synth(out: &Path, cfg: &crate::data::synth::SynthConfig, config_file: Option<&Path>, overwrite: bool) -> Result<()> {
    let inputs: Vec<(&str, &Path)> = config_file.map(|c| ("--config", c)).into_iter().collect();
    check_outputs(&crate::data::synth::SynthConfig::outputs(out), &inputs, overwrite, "pass --overwrite to replace it")?;
    crate::data::synth::write(out, cfg)
}
