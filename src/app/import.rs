//! `msm4sr import`: a public dataset from the files its owners publish into a dataset directory
//! (`NAME.inter` + `NAME.item`), ready for `featurize` and training ([`crate::data::raw`]).

use std::path::PathBuf;
use std::process::ExitCode;

use super::runs::check_outputs;
use super::Where;
use crate::data::raw;
use crate::{Error, Result};

/// Which publisher's format the raw files are in.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    /// Amazon reviews, 2014 or 2018 release: --reviews FILE (JSON lines, .gz or not) and
    /// optionally --meta FILE (the category's metadata).
    Amazon,
    /// MovieLens 100K as GroupLens ships it: --dir with u.data, u.item and u.genre.
    #[value(name = "ml-100k")]
    Ml100k,
}

/// Turn a public dataset's raw files into NAME.inter + NAME.item.
#[derive(clap::Args)]
pub struct Args {
    /// The raw files' format.
    #[arg(value_enum)]
    pub format: Format,
    /// amazon: the review file (reviewerID, asin, unixReviewTime per JSON line), e.g.
    /// reviews_Office_Products_5.json.gz.
    #[arg(long)]
    pub reviews: Option<PathBuf>,
    /// amazon: the metadata file of the same category (title, brand, categories, description),
    /// e.g. meta_Office_Products.json.gz; without it the item file has IDs only.
    #[arg(long)]
    pub meta: Option<PathBuf>,
    /// ml-100k: the unpacked ml-100k folder (u.data, u.item, u.genre).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Output dataset directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Dataset name: the files are NAME.inter and NAME.item (default: the --out folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace the NAME.inter and NAME.item an earlier import wrote in --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// What a refused output says to do.
const HOW: &str = "pass --overwrite to replace them";

/// `msm4sr import`.
pub fn run(args: Args, _at: Where) -> Result<ExitCode> {
    let Args { format, reviews, meta, dir, out, name, overwrite } = args;
    let name = match name.or_else(|| out.file_name().and_then(|n| n.to_str()).map(String::from)) {
        Some(n) if !n.is_empty() && !n.contains(['/', '\\']) => n,
        _ => return Err(Error::Invalid(format!("--out {}: give --name for the dataset's files", out.display()))),
    };
    let (inter_path, item_path) = (out.join(format!("{name}.inter")), out.join(format!("{name}.item")));
    let mut inputs: Vec<(&str, &std::path::Path)> = Vec::new();
    let data = match format {
        Format::Amazon => {
            let Some(reviews) = reviews.as_deref() else {
                return Err(Error::Invalid("import amazon needs --reviews FILE (and, for item text, --meta FILE)".into()));
            };
            if dir.is_some() {
                return Err(Error::Invalid("--dir is for ml-100k; import amazon takes --reviews and --meta".into()));
            }
            inputs.push(("--reviews", reviews));
            inputs.extend(meta.as_deref().map(|m| ("--meta", m)));
            check_outputs(&[inter_path.clone(), item_path.clone()], &inputs, overwrite, HOW)?;
            raw::amazon(reviews, meta.as_deref())?
        }
        Format::Ml100k => {
            let Some(dir) = dir.as_deref() else {
                return Err(Error::Invalid("import ml-100k needs --dir (the unpacked ml-100k folder)".into()));
            };
            if reviews.is_some() || meta.is_some() {
                return Err(Error::Invalid("--reviews and --meta are for amazon; import ml-100k takes --dir".into()));
            }
            inputs.push(("--dir", dir));
            check_outputs(&[inter_path.clone(), item_path.clone()], &inputs, overwrite, HOW)?;
            raw::movielens_100k(dir)?
        }
    };
    std::fs::create_dir_all(&out).map_err(|e| Error::Io { path: out.display().to_string(), source: e })?;
    let (inter, items) = data.files();
    crate::files::write_atomic(&item_path, items.as_bytes())?;
    crate::files::write_atomic(&inter_path, inter.as_bytes())?;
    outln!(
        "wrote {} ({} interactions of {} users) and {} ({} items{})",
        inter_path.display(),
        data.inter.len(),
        data.users(),
        item_path.display(),
        data.items.len(),
        if data.items_without_meta > 0 { format!(", {} without metadata", data.items_without_meta) } else { String::new() }
    );
    Ok(ExitCode::SUCCESS)
}
