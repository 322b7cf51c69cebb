//! The `msm4sr` command line: a thin shell over the library.

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use msm4sr::cli_run::{self, Plan, TrainJob, Where};
use msm4sr::config::{self, Flags};
use msm4sr::data::MissingFeatures;
use msm4sr::engine::gpu::{self, list_adapters};
use msm4sr::engine::{Device, DeviceChoice};
use msm4sr::metrics;
use msm4sr::train::RunConfig;
use msm4sr::{bench, gradcheck, synth};

/// Write a line to standard output: a closed pipe ends the program quietly (exit 0, as Unix tools
/// do), any other write error (a full disk, /dev/full) is a clean error.
macro_rules! outln {
    () => {
        emit(format_args!("\n"))?
    };
    ($($t:tt)*) => {
        emit(format_args!("{}\n", format_args!($($t)*)))?
    };
}

/// [`outln!`] without the newline.
macro_rules! out {
    ($($t:tt)*) => {
        emit(format_args!($($t)*))?
    };
}

/// A message of at most about `max` characters: a very long value echoed in it (a 100k-character
/// token, a deeply nested TOML line) keeps its start and end, with how much was left out.
fn cut_middle(msg: &str, max: usize) -> String {
    let n = msg.chars().count();
    if n <= max {
        return msg.to_string();
    }
    let head: String = msg.chars().take(max * 3 / 4).collect();
    let tail: String = msg.chars().skip(n - max / 4).collect();
    format!("{head} [... {} characters left out ...] {tail}", n - head.chars().count() - tail.chars().count())
}

fn stdout_result(r: std::io::Result<()>) -> msm4sr::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(msm4sr::Error::Io { path: "standard output".into(), source: e }),
    }
}

fn emit(args: std::fmt::Arguments) -> msm4sr::Result<()> {
    use std::io::Write;
    stdout_result(std::io::stdout().lock().write_fmt(args))
}

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

/// Dataset, configuration and hyper-parameter flags shared by the training commands. Every
/// hyper-parameter flag overrides the `--config` file, which overrides the defaults of SPEC.md.
#[derive(Args, Clone)]
struct RunArgs {
    /// Dataset directory: one NAME.inter, optionally NAME.features.safetensors + NAME.items.txt.
    #[arg(long)]
    data: PathBuf,
    /// TOML file with [model] and [train] sections (any subset of keys; see `--print-config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Items in .inter without features: fail (error) or give them zero features (zero).
    #[arg(long, value_enum, default_value = "error")]
    missing_features: MissingArg,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Write the run into this directory (model.safetensors, model.epochs.csv, ...) instead of
    /// beside --out.
    #[arg(long, conflicts_with = "out")]
    run_dir: Option<PathBuf>,
    /// Replace an earlier run's output files (without it, existing outputs are refused unless
    /// --resume continues that run).
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MissingArg {
    Error,
    Zero,
}

impl RunArgs {
    /// The training command's job: the effective configuration and where it writes. `None` when
    /// only `--print-config` was asked (printed here).
    fn job(
        &self,
        plan: impl FnOnce(&RunConfig) -> Plan,
        out: Option<PathBuf>,
        init: Option<PathBuf>,
        resume: bool,
    ) -> msm4sr::Result<Option<TrainJob>> {
        let cfg = config::resolve(self.config.as_deref(), &self.flags)?;
        if self.print_config {
            out!("{}", config::to_toml(&cfg));
            return Ok(None);
        }
        let plan = plan(&cfg);
        if let Some(dir) = self.run_dir.as_ref().filter(|d| d.exists() && !d.is_dir()) {
            return Err(msm4sr::Error::Invalid(format!(
                "--run-dir {}: it is a file; give a directory (new or of this run)",
                dir.display()
            )));
        }
        let out = match (&self.run_dir, out) {
            (Some(dir), _) => cli_run::run_dir_checkpoint(dir),
            (None, Some(out)) => out,
            (None, None) => cli_run::default_out(&self.data, &cfg),
        };
        Ok(Some(TrainJob {
            data: self.data.clone(),
            config_file: self.config.clone(),
            cfg,
            plan,
            out,
            init,
            resume,
            overwrite: self.overwrite,
            missing: missing_of(self.missing_features),
            quiet: self.json,
        }))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Pre-train and fine-tune a model (both stages for msm4sr), then evaluate on the test split.
    Train {
        #[command(flatten)]
        run: RunArgs,
        /// Best fine-tuned weights go here (pre-training to <stem>.pretrain.safetensors; the run's
        /// log and results to <stem>.epochs.csv, ...; default runs/DATA-MODEL.safetensors).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Skip pre-training (MSM4SR w/o pre-train).
        #[arg(long)]
        no_pretrain: bool,
        /// One stage with the pre-training and fine-tuning losses summed (MSM4SR E2E).
        #[arg(long)]
        e2e: bool,
        /// Continue an interrupted run from <stem>.last.safetensors.
        #[arg(long)]
        resume: bool,
    },
    /// Pre-train the M²SE backbone only (NIP + CMCL).
    Pretrain {
        #[command(flatten)]
        run: RunArgs,
        /// The best pre-trained weights go here (start `finetune --init` from them); the run's other
        /// files are named by its stem.
        #[arg(long, required_unless_present = "run_dir")]
        out: Option<PathBuf>,
        /// Continue an interrupted run from <stem>.last.safetensors.
        #[arg(long)]
        resume: bool,
    },
    /// Fine-tune (from pre-trained weights with --init), then evaluate on the test split.
    Finetune {
        #[command(flatten)]
        run: RunArgs,
        /// The best fine-tuned weights go here; the run's other files are named by its stem.
        #[arg(long, required_unless_present = "run_dir")]
        out: Option<PathBuf>,
        /// Start from these weights (e.g. a `pretrain` checkpoint).
        #[arg(long)]
        init: Option<PathBuf>,
        /// Continue an interrupted run from <stem>.last.safetensors.
        #[arg(long)]
        resume: bool,
    },
    /// Evaluate a checkpoint on the validation and test splits.
    Evaluate {
        /// Dataset directory (the one the checkpoint was trained on: same items, same order).
        #[arg(long)]
        data: PathBuf,
        /// A checkpoint written by train, pretrain or finetune (or a --run-dir directory).
        #[arg(long)]
        ckpt: PathBuf,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Also write every user's target rank (TSV: split, user, target, rank) for paired
        /// significance tests between models (`msm4sr report`).
        #[arg(long)]
        ranks: Option<PathBuf>,
        /// Items in .inter without features: fail (error) or give them zero features (zero).
        #[arg(long, value_enum, default_value = "error")]
        missing_features: MissingArg,
        /// Replace an existing --ranks file.
        #[arg(long)]
        overwrite: bool,
        /// Also split the test users into N equal-size groups by history length (paper Fig. 4)
        /// and report every metric per group (1 to 100).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
        groups: Option<usize>,
    },
    /// Top-k recommendations for users of the dataset (one, a list or all) or for a new user's
    /// item history.
    Recommend {
        /// Dataset directory (the one the checkpoint was trained on).
        #[arg(long)]
        data: PathBuf,
        /// A checkpoint written by train, pretrain or finetune (or a --run-dir directory).
        #[arg(long)]
        ckpt: PathBuf,
        /// One user's token in NAME.inter.
        #[arg(long, conflicts_with_all = ["users", "history"], required_unless_present_any = ["users", "history"])]
        user: Option<String>,
        /// Many users: `all`, or a file with one user token per line.
        #[arg(long, conflicts_with = "history")]
        users: Option<String>,
        /// A user not in the dataset: their item tokens, oldest first, comma-separated.
        #[arg(long, value_delimiter = ',')]
        history: Option<Vec<String>>,
        /// Items to recommend per user.
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// Leave out the items each user has already interacted with.
        #[arg(long)]
        mask_history: bool,
        /// Write the recommendations here as TSV (user, rank, item, score, in_history, title).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing --out file.
        #[arg(long)]
        overwrite: bool,
        /// Print the recommendations as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Items in .inter without features: fail (error) or give them zero features (zero).
        #[arg(long, value_enum, default_value = "error")]
        missing_features: MissingArg,
    },
    /// Embed item texts with a BERT sentence model into NAME.features.safetensors + NAME.items.txt.
    Featurize {
        /// RecBole atomic NAME.item file.
        #[arg(long)]
        items: PathBuf,
        /// Output dataset directory (NAME.inter is copied there when it sits beside the .item file).
        #[arg(long)]
        out: PathBuf,
        /// NAME or NAME=TEMPLATE ({} {title} {list} {year}); repeatable or comma-separated; default: every field but item_id.
        #[arg(long = "text-fields", alias = "text-field", value_name = "NAME[=TEMPLATE]", value_delimiter = ',')]
        text_fields: Vec<String>,
        /// Sentences kept per item (the first ones; the paper uses 10).
        #[arg(long, default_value_t = 10)]
        max_sentences: usize,
        /// One line per image: item token, TAB, space-separated keywords (e.g. from CLIP).
        #[arg(long)]
        image_keywords: Option<PathBuf>,
        /// Data without images: one keyword sentence per item as an image stand-in, from FIELD (as it is) or FIELD>N (its distinct words longer than N characters); repeatable or comma-separated, e.g. title>3,brand.
        #[arg(long = "image-words-from", value_name = "FIELD[>N]", value_delimiter = ',', conflicts_with = "image_keywords")]
        image_words_from: Vec<String>,
        /// Item images to turn into words with --clip: a TSV of ITEM<TAB>PATH lines, or a folder of ITEM.ext / ITEM_k.ext files (jpg, png, webp).
        #[arg(long, value_name = "TSV|DIR", conflicts_with_all = ["image_keywords", "image_words_from"], requires = "clip")]
        images: Option<PathBuf>,
        /// A Hugging Face CLIP model folder (config.json, model.safetensors, tokenizer.json, preprocessor_config.json).
        #[arg(long, value_name = "DIR", requires = "images")]
        clip: Option<PathBuf>,
        /// The words CLIP chooses from, one per line (default: the words of the text fields seen in at least 2 items).
        #[arg(long, value_name = "FILE", requires = "images")]
        vocab: Option<PathBuf>,
        /// Words per image (the paper's N).
        #[arg(long, default_value_t = 15)]
        top_n: usize,
        /// How a word is put to CLIP's text tower; {} is the word (e.g. "a photo of {}.").
        #[arg(long, default_value = "{}")]
        word_template: String,
        /// A BERT sentence model folder (model.safetensors, tokenizer.json, config.json); see tools/get_minilm.sh.
        #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
        model_dir: PathBuf,
        /// Sentences per batch, at most (default 64).
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Replace existing feature files in --out.
        #[arg(long)]
        overwrite: bool,
    },
    /// Write a synthetic dataset with planted multimodal structure.
    Synth {
        /// Output dataset directory (synth.inter, synth.features.safetensors, synth.items.txt).
        #[arg(long, required_unless_present = "print_config")]
        out: Option<PathBuf>,
        /// TOML file with any generator settings (see `--print-config` for the keys and defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the effective generator settings as TOML and exit.
        #[arg(long)]
        print_config: bool,
        /// Users (default 1000).
        #[arg(long)]
        users: Option<usize>,
        /// Items (default 3000).
        #[arg(long)]
        items: Option<usize>,
        /// Generator seed (default 42; the output is a function of the settings).
        #[arg(long)]
        seed: Option<u64>,
        /// Replace an existing synthetic dataset in --out.
        #[arg(long)]
        overwrite: bool,
    },
    /// Summarise runs: a Markdown table (mean ± sd over seeds), paired bootstrap comparisons and
    /// SVG plots (loss and validation curves, sweep lines) in --out.
    Report {
        /// Runs: a run directory, a checkpoint or stem, a result JSON, or a sweep directory;
        /// LABEL=RUN names the group (runs with one label are seeds of one model).
        #[arg(required = true)]
        runs: Vec<String>,
        /// Output directory (table.md, paired.md, curves.svg, report.json).
        #[arg(long)]
        out: PathBuf,
        /// Paired comparison A:B of two group labels (repeatable); default: the first group
        /// against each other one.
        #[arg(long)]
        compare: Vec<String>,
        /// Split of the paired comparisons: valid or test.
        #[arg(long, default_value = "test", value_parser = ["valid", "test"])]
        split: String,
        /// Bootstrap resamples of the users (1 to 1000000).
        #[arg(long, default_value_t = 10_000)]
        resamples: usize,
        /// Seed of the bootstrap resamples.
        #[arg(long, default_value_t = 2024)]
        seed: u64,
        /// Replace an earlier report in --out.
        #[arg(long)]
        overwrite: bool,
        /// Also split the test users into N groups by history length (needs --data; 1 to 100):
        /// groups.md and groups.svg.
        #[arg(long, requires = "data", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
        groups: Option<usize>,
        /// The dataset the runs were trained on (for --groups).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Train every point of a grid (variants × setting values × seeds), one run directory each;
    /// finished runs are skipped and an interrupted one resumes when the command is run again.
    Sweep {
        /// The grid (TOML; see experiments/ for the paper's).
        grid: PathBuf,
        /// Dataset directory.
        #[arg(long)]
        data: PathBuf,
        /// The sweep directory (sweep.json and one run directory per point and seed).
        #[arg(long)]
        out: PathBuf,
        /// Items in .inter without features: fail (error) or give them zero features (zero).
        #[arg(long, value_enum, default_value = "error")]
        missing_features: MissingArg,
        /// Print each run's summary lines only (no progress bars).
        #[arg(long)]
        quiet: bool,
        /// Override a base setting of every run, e.g. --set train.pretrain_epochs=20 (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// List GPU adapters, the chosen device, its limits and features.
    Info {
        /// Print the adapters, device, limits and features as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every op: f64 finite differences on the CPU, and the GPU kernels against the CPU.
    Gradcheck {
        /// Print every check as JSON.
        #[arg(long)]
        json: bool,
        /// Only these ops (repeatable), e.g. --op matmul --op attention.
        #[arg(long)]
        op: Vec<String>,
    },
    /// Benchmark kernels at the model's shapes.
    Bench {
        /// Print the timings as JSON.
        #[arg(long)]
        json: bool,
        /// Seconds to spend on each entry (at least one call).
        #[arg(long, default_value_t = 1.0)]
        secs: f64,
        /// Shrink the shapes 8x (for software adapters).
        #[arg(long)]
        quick: bool,
        /// Also time Sentence-BERT inference (sentences/s) with the model in --model-dir.
        #[arg(long)]
        bert: bool,
        /// Skip the training-step benchmark (one step of each model at the paper's shapes).
        #[arg(long)]
        no_steps: bool,
        /// The BERT sentence model folder for --bert (see tools/get_minilm.sh).
        #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
        model_dir: PathBuf,
        /// Sentences for the BERT benchmark.
        #[arg(long, default_value_t = 512)]
        sentences: usize,
        /// Also validate and time every GPU matmul kernel variant side by side.
        #[arg(long)]
        matmul_variants: bool,
        /// Also time CLIP inference (images/s through the vision tower, texts/s through the text tower) with this model folder.
        #[arg(long, value_name = "DIR")]
        clip: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    msm4sr::startup();
    let cli = Cli::parse();
    gpu::request_adapter(cli.adapter.clone());
    if let Err(e) = msm4sr::interrupt::install() {
        eprintln!("warning: {e}");
    }
    let result = run(cli).and_then(|code| {
        use std::io::Write;
        stdout_result(std::io::stdout().flush()).map(|()| code)
    });
    match result {
        Ok(code) => code,
        Err(e @ msm4sr::Error::Interrupted(_)) => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {}", cut_middle(&e.to_string(), 2000));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> msm4sr::Result<ExitCode> {
    let named = cli.adapter.is_some();
    let at = Where { choice: cli.device, named };
    match cli.cmd {
        Cmd::Info { json } => info(cli.device, named, json),
        Cmd::Train { run, out, no_pretrain, e2e, resume } => {
            if no_pretrain && e2e {
                return Err(msm4sr::Error::Invalid(
                    "--e2e trains the pre-training and fine-tuning losses together; --no-pretrain leaves out pre-training: pass one".into(),
                ));
            }
            let job = run.job(|cfg| Plan::train(cfg, no_pretrain, e2e), out, None, resume)?;
            train_cmd(job, run.json, at)
        }
        Cmd::Pretrain { run, out, resume } => train_cmd(run.job(|_| Plan::PRETRAIN, out, None, resume)?, run.json, at),
        Cmd::Finetune { run, out, init, resume } => train_cmd(run.job(|_| Plan::FINETUNE, out, init, resume)?, run.json, at),
        Cmd::Evaluate { data, ckpt, json, ranks, missing_features, overwrite, groups } => {
            let r = cli_run::evaluate(&data, &ckpt, ranks.as_deref(), overwrite, missing_of(missing_features), groups, at)?;
            print_result(&r, json)?;
            if let (Some(g), false) = (&r.groups, json) {
                outln!("\ntest users by history length ({} groups):\n{}", g.len(), msm4sr::groups::table(g));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Recommend { data, ckpt, user, users, history, k, mask_history, out, overwrite, json, missing_features } => {
            use msm4sr::recommend::Who;
            let who = match (user, users, history) {
                (Some(u), _, _) => Who::Users(vec![u]),
                (_, Some(all), _) if all == "all" => Who::All,
                (_, Some(file), _) => {
                    let text = std::fs::read_to_string(&file).map_err(|e| msm4sr::Error::Io { path: file.clone(), source: e })?;
                    let list: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
                    if list.is_empty() {
                        return Err(msm4sr::Error::Data {
                            file: file.clone(),
                            line: 0,
                            msg: "no user tokens (expected one per line; --users all recommends for everyone)".into(),
                        });
                    }
                    Who::Users(list)
                }
                (_, _, Some(h)) => Who::History(h),
                _ => return Err(msm4sr::Error::Invalid("give --user, --users or --history".into())),
            };
            let target = out.as_deref().map(|o| (o, overwrite));
            let recs = cli_run::recommend_from(&data, &ckpt, &who, k, mask_history, missing_of(missing_features), target, at, json)?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&recs.iter().map(|(u, r)| serde_json::json!({"user": u, "items": r})).collect::<Vec<_>>())
                        .unwrap()
                );
            } else if let Some(o) = &out {
                eprintln!(
                    "wrote {} recommendations for {} users to {}",
                    recs.iter().map(|r| r.1.len()).sum::<usize>(),
                    recs.len(),
                    o.display()
                );
            } else if recs.len() == 1 {
                outln!("{:>4}  {:<20} {:>10}  {:<10} title", "rank", "item", "score", "in history");
                for (r, x) in recs[0].1.iter().enumerate() {
                    outln!(
                        "{:>4}  {:<20} {:>10.4}  {:<10} {}",
                        r + 1,
                        x.item,
                        x.score,
                        if x.in_history { "yes" } else { "" },
                        x.title.as_deref().unwrap_or("")
                    );
                }
            } else {
                out!("{}", msm4sr::recommend::tsv(&recs));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Featurize {
            items,
            out,
            text_fields,
            max_sentences,
            image_keywords,
            image_words_from,
            images,
            clip,
            vocab,
            top_n,
            word_template,
            model_dir,
            batch,
            json,
            overwrite,
        } => {
            let opts = msm4sr::featurize::FeaturizeOptions {
                items,
                text_fields,
                out,
                max_sentences,
                image_keywords,
                image_words_from,
                images,
                clip,
                vocab,
                top_n,
                word_template,
                model_dir,
                batch,
            };
            let s = cli_run::featurize(&opts, overwrite, json, at)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&s).unwrap());
            } else {
                outln!(
                    "wrote {}: text {:?}, {} sentences ({} distinct), {:.0} sentences/s on {}, {:.1} s in all",
                    s.features.display(),
                    s.text_shape,
                    s.sentences,
                    s.distinct_sentences,
                    s.sentences_per_s,
                    s.device,
                    s.total_seconds
                );
                let hist: Vec<String> = s.text_len_histogram.iter().enumerate().map(|(k, n)| format!("{k}:{n}")).collect();
                outln!("sentences per item: mean {:.2}; items by count {}", s.sentences_per_item, hist.join(" "));
                if let Some(shape) = s.image_shape {
                    let what = match (&s.image_stand_in, s.clip_images_per_s) {
                        (Some(spec), _) => format!("a keyword stand-in from {spec}, not image content"),
                        (None, Some(ips)) => format!(
                            "CLIP words of {} images ({:.1} images/s; dictionary of {} words{}), {} images skipped",
                            s.images,
                            ips,
                            s.clip_dictionary.unwrap_or(0),
                            if s.clip_words_cached == Some(true) { ", from the cache" } else { "" },
                            s.images_skipped.len()
                        ),
                        (None, None) => "image keywords".to_string(),
                    };
                    outln!("image {shape:?}: {} of {} items, {what}", s.items_with_images, s.items);
                }
                if let Some(p) = &s.image_words {
                    outln!("keyword lines: {}", p.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Synth { out, config, print_config, users, items, seed, overwrite } => {
            let c = synth::SynthConfig::resolve(config.as_deref(), users, items, seed)?;
            if print_config {
                out!("{}", toml::to_string(&c).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            let out = out.ok_or_else(|| msm4sr::Error::Invalid("synth needs --out DIR".into()))?;
            cli_run::synth(&out, &c, config.as_deref(), overwrite)?;
            outln!("wrote a synthetic dataset ({} users, {} items, seed {}) to {}", c.users, c.items, c.seed, out.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report { runs, out, compare, split, resamples, seed, overwrite, groups, data } => {
            let groups = groups.zip(data);
            let opts = msm4sr::report::ReportOptions { runs, out, compare, split, resamples, seed, overwrite, groups };
            let w = msm4sr::report::report(&opts)?;
            out!("{}", w.table);
            for f in &w.files {
                eprintln!("wrote {}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sweep { grid, data, out, missing_features, quiet, sets } => {
            let outcomes = msm4sr::sweep::run(&grid, &sets, &data, &out, missing_of(missing_features), at, quiet)?;
            out!("{}", msm4sr::sweep::summary(&out)?);
            let failed: Vec<_> = outcomes.iter().filter(|(_, o)| matches!(o, msm4sr::sweep::Outcome::Failed(_))).collect();
            for (r, o) in &failed {
                if let msm4sr::sweep::Outcome::Failed(e) = o {
                    eprintln!("failed: {} seed {}: {e}", r.point, r.seed);
                }
            }
            if failed.len() < outcomes.len() {
                eprintln!("report: msm4sr report {} --out {}/report", out.display(), out.display());
            }
            if !failed.is_empty() {
                return Err(msm4sr::Error::Invalid(format!(
                    "{} of {} sweep runs failed (listed above); fix the cause and run the same command again (finished runs are skipped)",
                    failed.len(),
                    outcomes.len()
                )));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gradcheck { json, op } => {
            // Verifying kernels is the point here: any adapter (software included) counts unless --device cpu.
            let use_gpu = match cli.device {
                DeviceChoice::Cpu => false,
                DeviceChoice::Gpu => true,
                DeviceChoice::Auto => gpu::gpu().is_ok(),
            };
            if use_gpu {
                let g = gpu::gpu()?;
                eprintln!("gradcheck: fd on the f64 CPU backend; gpu checks on {} ({})", g.adapter.name, g.adapter.backend);
            } else {
                eprintln!("gradcheck: fd on the f64 CPU backend; no GPU checks (--device cpu or no adapter)");
            }
            let results = gradcheck::run(&op, use_gpu);
            if results.is_empty() {
                eprintln!("no op matches {:?}", op);
                return Ok(ExitCode::FAILURE);
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&results).unwrap());
            } else {
                outln!("{:<15} {:<32} {:<5} {:>12} {:>12}  pass", "op", "shape", "check", "max_abs_err", "max_rel_err");
                for r in &results {
                    outln!(
                        "{:<15} {:<32} {:<5} {:>12.3e} {:>12.3e}  {}{}",
                        r.op,
                        r.shape,
                        r.check,
                        r.max_abs_err,
                        r.max_rel_err,
                        if r.pass { "yes" } else { "NO" },
                        r.error.as_deref().map(|e| format!("  ({e})")).unwrap_or_default()
                    );
                }
                let failed = results.iter().filter(|r| !r.pass).count();
                outln!("{} checks, {} passed, {} failed", results.len(), results.len() - failed, failed);
            }
            Ok(if results.iter().all(|r| r.pass) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Bench { json, secs, quick, bert, no_steps, model_dir, sentences, matmul_variants, clip } => {
            let (dev, desc) = cli.device.resolve(named)?;
            eprintln!("bench on {desc}");
            let quick = quick || (dev == Device::Gpu && gpu::gpu()?.adapter.is_software());
            let mut results = bench::run(dev, secs, quick)?;
            let steps = if no_steps { Vec::new() } else { bench::train_steps(dev, secs, quick)? };
            let variants = if matmul_variants {
                if dev != Device::Gpu {
                    return Err(msm4sr::Error::Invalid("--matmul-variants times the GPU kernels: run with --device gpu".into()));
                }
                bench::matmul_variants(secs, quick)?
            } else {
                Vec::new()
            };
            if bert {
                let r = msm4sr::bert::bench(&model_dir, dev, sentences)?;
                results.push(bench::BenchResult {
                    name: "bert".into(),
                    shape: format!("{} sentences, {} tokens ({:.0} sentences/s)", r.sentences, r.tokens, r.sentences_per_s),
                    device: bench::device_name(dev),
                    seconds: r.seconds / r.sentences.max(1) as f64,
                    gflops: None,
                    iters: 1,
                });
            }
            if let Some(dir) = &clip {
                let r = msm4sr::clip::bench(dir, dev, if quick { 8 } else { 64 }, if quick { 64 } else { 512 })?;
                for (name, n, what, s) in
                    [("clip-image", r.images, "images", r.image_seconds), ("clip-text", r.texts, "texts", r.text_seconds)]
                {
                    results.push(bench::BenchResult {
                        name: name.into(),
                        shape: format!("{n} {what} ({:.1} {what}/s)", n as f64 / s.max(1e-9)),
                        device: bench::device_name(dev),
                        seconds: s / n.max(1) as f64,
                        gflops: None,
                        iters: 1,
                    });
                }
            }
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "kernels": results, "train_steps": steps, "matmul_variants": variants })
                    )
                    .unwrap()
                );
            } else {
                outln!("{:<10} {:<26} {:>12} {:>10} {:>6}  device", "kernel", "shape", "ms/call", "GFLOP/s", "iters");
                for r in &results {
                    let gf = r.gflops.map(|g| format!("{g:.1}")).unwrap_or_else(|| "-".into());
                    outln!("{:<10} {:<26} {:>12.3} {:>10} {:>6}  {}", r.name, r.shape, r.seconds * 1e3, gf, r.iters, r.device);
                }
                if !variants.is_empty() {
                    outln!();
                    outln!(
                        "{:<16} {:<26} {:>12} {:>10} {:>10} {:>6} {:>9}",
                        "variant",
                        "shape",
                        "ms/call",
                        "GFLOP/s",
                        "max err",
                        "iters",
                        "autotune"
                    );
                    for r in &variants {
                        let name = format!("{} {}", r.number, r.variant.name());
                        let pick = if r.autotune_pick { "<- pick" } else { "" };
                        match (r.seconds, r.gflops, r.max_err) {
                            (Some(s), Some(gf), Some(err)) => outln!(
                                "{:<16} {:<26} {:>12.3} {:>10.1} {:>10.1e} {:>6} {:>9}",
                                name,
                                r.shape,
                                s * 1e3,
                                gf,
                                err,
                                r.iters,
                                pick
                            ),
                            _ => outln!("{:<16} {:<26} {}", name, r.shape, r.status),
                        }
                    }
                }
                if !steps.is_empty() {
                    outln!();
                    outln!(
                        "{:<20} {:<48} {:>10} {:>10} {:>10} {:>6} {:>11} {:>8} {:>7}",
                        "training step",
                        "shape",
                        "ms/step",
                        "tokens/s",
                        "samples/s",
                        "steps",
                        "dispatches",
                        "submits",
                        "copies"
                    );
                    let per = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
                    for r in &steps {
                        outln!(
                            "{:<20} {:<48} {:>10.1} {:>10.0} {:>10.0} {:>6} {:>11} {:>8} {:>7}",
                            r.model,
                            r.shape,
                            r.seconds * 1e3,
                            r.tokens_per_s,
                            r.samples_per_s,
                            r.steps,
                            per(r.dispatches_per_step),
                            per(r.submits_per_step),
                            per(r.copies_per_step)
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn info(choice: DeviceChoice, named: bool, json: bool) -> msm4sr::Result<ExitCode> {
    let adapters = list_adapters();
    let chosen = choice.resolve(named);
    if json {
        let mut v = serde_json::json!({
            "adapters": adapters.iter().map(|(a, l)| serde_json::json!({
                "adapter": a, "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
                "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
                "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
            })).collect::<Vec<_>>(),
        });
        match &chosen {
            Ok((d, desc)) => {
                v["device"] = serde_json::json!({"kind": d, "description": desc});
                if *d == Device::Gpu {
                    let g = gpu::gpu()?;
                    v["features"] = serde_json::json!(format!("{:?}", g.features));
                    v["limits"] = serde_json::json!(format!("{:?}", g.limits));
                }
            }
            Err(e) => v["device_error"] = serde_json::json!(e.to_string()),
        }
        outln!("{}", serde_json::to_string_pretty(&v).unwrap());
        return Ok(ExitCode::SUCCESS);
    }
    outln!("GPU adapters ({}):", adapters.len());
    for (a, l) in &adapters {
        outln!(
            "  - {} [{}; {}; driver {} {}] max storage binding {} MiB, workgroup memory {} KiB",
            a.name,
            a.backend,
            a.device_type,
            a.driver,
            a.driver_info,
            l.max_storage_buffer_binding_size >> 20,
            l.max_compute_workgroup_storage_size >> 10
        );
    }
    if adapters.is_empty() {
        outln!("  (none: install a Vulkan driver, e.g. `apt-get install mesa-vulkan-drivers` for software Vulkan)");
    }
    let (dev, desc) = chosen?;
    outln!("chosen device: {desc}");
    if dev == Device::Gpu {
        let g = gpu::gpu()?;
        let l = &g.limits;
        outln!("limits:");
        outln!("  max_storage_buffer_binding_size     {}", l.max_storage_buffer_binding_size);
        outln!("  max_buffer_size                     {}", l.max_buffer_size);
        outln!("  max_storage_buffers_per_shader_stage {}", l.max_storage_buffers_per_shader_stage);
        outln!("  max_compute_workgroup_storage_size  {}", l.max_compute_workgroup_storage_size);
        outln!("  max_compute_invocations_per_workgroup {}", l.max_compute_invocations_per_workgroup);
        outln!("  max_compute_workgroups_per_dimension {}", l.max_compute_workgroups_per_dimension);
        outln!("  min_subgroup_size / max              {} / {}", g.adapter.subgroup_min_size, g.adapter.subgroup_max_size);
        outln!("features: {:?}", g.features);
    }
    Ok(ExitCode::SUCCESS)
}

fn missing_of(m: MissingArg) -> MissingFeatures {
    match m {
        MissingArg::Error => MissingFeatures::Error,
        MissingArg::Zero => MissingFeatures::Zero,
    }
}

fn print_result(r: &cli_run::RunResult, json: bool) -> msm4sr::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(r).unwrap());
    } else {
        let present: Vec<(&str, &metrics::Metrics)> =
            [("valid", &r.valid), ("test", &r.test)].into_iter().filter_map(|(n, m)| m.as_ref().map(|m| (n, m))).collect();
        for (n, m) in [("valid", &r.valid), ("test", &r.test)] {
            if m.is_none() {
                outln!("{n}: no samples");
            }
        }
        if !present.is_empty() {
            outln!("{}", metrics::table(&present));
        }
        outln!("model {}, {} epochs, {:.1} s", r.model, r.epochs, r.seconds);
    }
    Ok(())
}

/// Run a training job (none: `--print-config` only) and print its result.
fn train_cmd(job: Option<TrainJob>, json: bool, at: Where) -> msm4sr::Result<ExitCode> {
    if let Some(job) = job {
        print_result(&cli_run::train(&job, at)?, json)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// An error message echoing a huge value stays readable.
    #[test]
    fn long_messages_are_cut_in_the_middle() {
        let long = format!("item \"{}\" is not in the file", "x".repeat(100_000));
        let m = super::cut_middle(&long, 2000);
        assert!(m.chars().count() < 2100 && m.starts_with("item \"xxx") && m.ends_with("is not in the file"), "{}", m.len());
        assert!(m.contains("characters left out"));
        assert_eq!(super::cut_middle("short", 2000), "short");
    }

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
