//! The `msm4sr` command line: a thin shell over the library.

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use msm4sr::cli_run::{self, Plan};
use msm4sr::data::MissingFeatures;
use msm4sr::engine::gpu::{self, list_adapters};
use msm4sr::engine::{Device, DeviceChoice};
use msm4sr::metrics;
use msm4sr::model::{Mod, Modalities, ModelKind, Score};
use msm4sr::train::RunConfig;
use msm4sr::{bench, gradcheck, synth};

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
    /// Model: msm4sr (the paper), sasrec (IDs only) or sasrecm (IDs + both encoders summed). Default msm4sr.
    #[arg(long, value_enum)]
    model: Option<ModelKind>,
    /// Random seed of initialisation, shuffling and dropout (default 2024).
    #[arg(long)]
    seed: Option<u64>,
    /// Fine-tuning epochs (upper bound; early stopping on validation Recall@20; default 300).
    #[arg(long)]
    epochs: Option<usize>,
    /// Pre-training epochs (upper bound; early stopping on validation Recall@20; default 300).
    #[arg(long)]
    pretrain_epochs: Option<usize>,
    /// Fine-tuning samples per step (default 1024).
    #[arg(long)]
    batch: Option<usize>,
    /// Pre-training samples per step (default 1024).
    #[arg(long)]
    pretrain_batch: Option<usize>,
    /// Fine-tuning learning rate, Adam (default 1e-3).
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Pre-training learning rate, Adam (default 1e-3).
    #[arg(long, allow_negative_numbers = true)]
    pretrain_lr: Option<f32>,
    /// Fine-tuning weight decay (Adam, coupled as torch's; default 0).
    #[arg(long, allow_negative_numbers = true)]
    weight_decay: Option<f32>,
    /// Pre-training weight decay (default 0, as the authors pre-train).
    #[arg(long, allow_negative_numbers = true)]
    pretrain_weight_decay: Option<f32>,
    /// Fine-tuning early-stopping patience in epochs (default 10).
    #[arg(long)]
    patience: Option<usize>,
    /// Pre-training early-stopping patience in epochs (default 20).
    #[arg(long)]
    pretrain_patience: Option<usize>,
    /// Users with fewer interactions are dropped (default 5; at least 3).
    #[arg(long)]
    min_user_inter: Option<usize>,
    /// Hidden size d0 of the transformer and the item encoders (default 64).
    #[arg(long)]
    hidden: Option<usize>,
    /// Transformer layers (default 2).
    #[arg(long)]
    layers: Option<usize>,
    /// Attention heads; must divide --hidden (default 2).
    #[arg(long)]
    heads: Option<usize>,
    /// Transformer feed-forward size (default 256).
    #[arg(long)]
    inner: Option<usize>,
    /// Most recent items kept per input sequence (default 50).
    #[arg(long)]
    max_len: Option<usize>,
    /// Hidden and attention dropout of the transformer, in [0, 1) (default 0.2).
    #[arg(long, allow_negative_numbers = true)]
    dropout: Option<f32>,
    /// MoE experts per modality (default 8).
    #[arg(long)]
    experts: Option<usize>,
    /// Temperature of the contrastive losses and the cosine scorer (default 0.07).
    #[arg(long, allow_negative_numbers = true)]
    tau: Option<f32>,
    /// Weight of the CMCL loss in pre-training (default 0.01).
    #[arg(long, allow_negative_numbers = true)]
    lambda: Option<f32>,
    /// Fine-tuning scorer: cos (cosine / tau, the released code; default) or dot (the paper).
    #[arg(long, value_enum)]
    score: Option<Score>,
    /// Modalities the model uses: text, image or both (default both).
    #[arg(long, value_enum)]
    modalities: Option<Modalities>,
    /// Drop one score term at fine-tuning: text gives MSM4SR-V, image gives MSM4SR-T.
    #[arg(long, value_enum)]
    drop_score: Option<Mod>,
    /// Pre-train without the next-item-prediction loss (eq. 7).
    #[arg(long)]
    no_nip: bool,
    /// Pre-train without the cross-modal contrastive loss (eq. 9).
    #[arg(long)]
    no_cmcl: bool,
    /// Pre-train without complementary modality mixup.
    #[arg(long)]
    no_mixup: bool,
    /// Pre-training without the projection heads of eq. 6 (the authors' published command).
    #[arg(long)]
    no_heads: bool,
    /// Exclude each user's history from the ranking.
    #[arg(long)]
    mask_history: bool,
    /// Replace an earlier run's output files (without it, existing outputs are refused unless
    /// --resume continues that run).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MissingArg {
    Error,
    Zero,
}

impl RunArgs {
    fn config(&self) -> msm4sr::Result<RunConfig> {
        let mut c = match &self.config {
            Some(p) => cli_run::read_config(p)?,
            None => RunConfig::default(),
        };
        let (m, t) = (&mut c.model, &mut c.train);
        macro_rules! set {
            ($dst:expr, $src:expr) => {
                if let Some(v) = $src {
                    $dst = v;
                }
            };
        }
        set!(m.model, self.model);
        set!(t.seed, self.seed);
        set!(t.epochs, self.epochs);
        set!(t.pretrain_epochs, self.pretrain_epochs);
        set!(t.batch, self.batch);
        set!(t.pretrain_batch, self.pretrain_batch);
        set!(t.lr, self.lr);
        set!(t.pretrain_lr, self.pretrain_lr);
        set!(t.weight_decay, self.weight_decay);
        set!(t.pretrain_weight_decay, self.pretrain_weight_decay);
        set!(t.patience, self.patience);
        set!(t.pretrain_patience, self.pretrain_patience);
        set!(t.min_user_inter, self.min_user_inter);
        set!(m.hidden, self.hidden);
        set!(m.layers, self.layers);
        set!(m.heads, self.heads);
        set!(m.inner, self.inner);
        set!(m.max_len, self.max_len);
        if let Some(d) = self.dropout {
            m.dropout = d;
            m.attn_dropout = d;
        }
        set!(m.experts, self.experts);
        set!(m.tau, self.tau);
        set!(m.lambda, self.lambda);
        set!(m.score, self.score);
        set!(m.modalities, self.modalities);
        if self.drop_score.is_some() {
            m.drop_score = self.drop_score;
        }
        m.nip &= !self.no_nip;
        m.cmcl &= !self.no_cmcl;
        m.mixup &= !self.no_mixup;
        m.proj_heads &= !self.no_heads;
        t.mask_history |= self.mask_history;
        c.validate()?;
        Ok(c)
    }
    /// What a training command at `out` will write, checked before any work (see
    /// `cli_run::check_outputs`): its inputs are --data, --config and `init`.
    fn check_outputs(&self, out: &std::path::Path, init: Option<&std::path::Path>, pretrain: bool, resume: bool) -> msm4sr::Result<()> {
        let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--data", &self.data)];
        inputs.extend(self.config.as_deref().map(|c| ("--config", c)));
        inputs.extend(init.map(|c| ("--init", c)));
        let how = "pass --resume to continue that run or --overwrite to replace it";
        cli_run::check_outputs(&cli_run::run_outputs(out, pretrain), &inputs, resume || self.overwrite, how)
    }
    fn missing(&self) -> MissingFeatures {
        match self.missing_features {
            MissingArg::Error => MissingFeatures::Error,
            MissingArg::Zero => MissingFeatures::Zero,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Pre-train and fine-tune a model (both stages for msm4sr), then evaluate on the test split.
    Train {
        #[command(flatten)]
        run: RunArgs,
        /// Best fine-tuned weights go here (pre-training to <stem>.pretrain.safetensors).
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
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        resume: bool,
    },
    /// Fine-tune (from pre-trained weights with --init), then evaluate on the test split.
    Finetune {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long)]
        out: PathBuf,
        /// Start from these weights (e.g. a `pretrain` checkpoint).
        #[arg(long)]
        init: Option<PathBuf>,
        #[arg(long)]
        resume: bool,
    },
    /// Evaluate a checkpoint on the validation and test splits.
    Evaluate {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        ckpt: PathBuf,
        #[arg(long)]
        json: bool,
        /// Also write every user's target rank (TSV: split, user, target, rank) for paired
        /// significance tests between models (tools/paired_test.py).
        #[arg(long)]
        ranks: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "error")]
        missing_features: MissingArg,
        /// Replace an existing --ranks file.
        #[arg(long)]
        overwrite: bool,
    },
    /// Top-k recommendations for one user from their whole history.
    Recommend {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        ckpt: PathBuf,
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 10)]
        k: usize,
        #[arg(long)]
        json: bool,
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
        #[arg(long, default_value_t = 10)]
        max_sentences: usize,
        /// One line per image: item token, TAB, space-separated keywords (e.g. from CLIP).
        #[arg(long)]
        image_keywords: Option<PathBuf>,
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
    /// List GPU adapters, the chosen device, its limits and features.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Check every op: f64 finite differences on the CPU, and the GPU kernels against the CPU.
    Gradcheck {
        #[arg(long)]
        json: bool,
        /// Only these ops (repeatable), e.g. --op matmul --op attention.
        #[arg(long)]
        op: Vec<String>,
    },
    /// Benchmark kernels at the model's shapes.
    Bench {
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
        #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
        model_dir: PathBuf,
        /// Sentences for the BERT benchmark.
        #[arg(long, default_value_t = 512)]
        sentences: usize,
    },
}

fn main() -> ExitCode {
    msm4sr::startup();
    let cli = Cli::parse();
    gpu::request_adapter(cli.adapter.clone());
    if let Err(e) = msm4sr::interrupt::install() {
        eprintln!("warning: {e}");
    }
    match run(cli) {
        Ok(code) => code,
        Err(e @ msm4sr::Error::Interrupted(_)) => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> msm4sr::Result<ExitCode> {
    let named = cli.adapter.is_some();
    match cli.cmd {
        Cmd::Info { json } => info(cli.device, named, json),
        Cmd::Train { run, out, no_pretrain, e2e, resume } => {
            let cfg = run.config()?;
            if e2e && cfg.model.model != ModelKind::Msm4sr {
                return Err(msm4sr::Error::Invalid(format!(
                    "--e2e sums MSM4SR's pre-training and fine-tuning losses; --model {} has no pre-training loss (drop --e2e)",
                    format!("{:?}", cfg.model.model).to_lowercase()
                )));
            }
            let pre = cfg.model.model == ModelKind::Msm4sr && !no_pretrain && !e2e;
            let plan = Plan { pretrain: pre, finetune: !e2e, e2e };
            let name = format!("{:?}", cfg.model.model).to_lowercase();
            let out = out.unwrap_or_else(|| {
                PathBuf::from(format!("runs/{}-{name}.safetensors", run.data.file_name().and_then(|n| n.to_str()).unwrap_or("data")))
            });
            train_cmd(&run, cfg, plan, &out, None, resume, cli.device, named)
        }
        Cmd::Pretrain { run, out, resume } => {
            let mut cfg = run.config()?;
            cfg.model.model = ModelKind::Msm4sr;
            // `pretrain --out X` writes X itself: run the stage directly.
            if run.print_config {
                print!("{}", cli_run::config_toml(&cfg));
                return Ok(ExitCode::SUCCESS);
            }
            run.check_outputs(&out, None, false, resume)?;
            let (dev, desc) = cli.device.resolve(named)?;
            eprintln!("device: {desc}");
            let ds = cli_run::load_dataset(&run.data, &cfg, run.missing())?;
            eprintln!("{ds}");
            let split = cli_run::check_split(&ds, &cfg)?;
            let model = cli_run::build_model(&cfg, &ds, cfg.train.seed, dev)?;
            if !resume {
                save_config(&out, &cfg)?;
            }
            let s = msm4sr::train::fit(&model, &split, &cfg, msm4sr::train::Stage::Pretrain, &ds.item_tokens, &out, resume, run.json)?;
            if resume {
                save_config(&out, &cfg)?;
            }
            if run.json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap());
            } else {
                println!("pre-training: best epoch {} of {}, valid (modality scores) {}", s.best_epoch, s.epochs, s.valid);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Finetune { run, out, init, resume } => {
            let cfg = run.config()?;
            let plan = Plan { pretrain: false, finetune: true, e2e: false };
            train_cmd(&run, cfg, plan, &out, init.as_deref(), resume, cli.device, named)
        }
        Cmd::Evaluate { data, ckpt, json, ranks, missing_features, overwrite } => {
            if let Some(r) = &ranks {
                let inputs: [(&str, &std::path::Path); 2] = [("--data", &data), ("--ckpt", &ckpt)];
                cli_run::check_outputs(std::slice::from_ref(r), &inputs, overwrite, "pass --overwrite to replace it")?;
            }
            let (dev, desc) = cli.device.resolve(named)?;
            eprintln!("device: {desc}");
            let cfg = checkpoint_config(&ckpt)?;
            let ds = cli_run::load_dataset(&data, &cfg, missing_of(missing_features))?;
            let restored = cli_run::model_from_checkpoint(&ds, &ckpt, dev)?;
            let (model, cfg, with_id) = (&restored.model, &restored.cfg, restored.with_id());
            if !with_id {
                eprintln!("{} is a pre-training checkpoint: scoring with the modality encoders alone", ckpt.display());
            }
            let split = ds.split(cfg.model.max_len);
            let start = std::time::Instant::now();
            let tc = &cfg.train;
            let valid_ranks = msm4sr::train::ranks(model, &split.valid, tc.eval_batch, with_id, tc.mask_history)?;
            let test_ranks = msm4sr::train::ranks(model, &split.test, tc.eval_batch, with_id, tc.mask_history)?;
            if let Some(path) = ranks {
                let text = cli_run::ranks_tsv(&ds, &[("valid", &split.valid, &valid_ranks), ("test", &split.test, &test_ranks)]);
                msm4sr::checkpoint::write_atomic(&path, text.as_bytes())?;
                eprintln!("per-user ranks in {}", path.display());
            }
            let (valid, test) = (cli_run::metrics_of(&valid_ranks), cli_run::metrics_of(&test_ranks));
            let r = cli_run::RunResult { model: cli_run::model_name(cfg), valid, test, epochs: 0, seconds: start.elapsed().as_secs_f64() };
            print_result(&r, json);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Recommend { data, ckpt, user, k, json, missing_features } => {
            if k == 0 {
                return Err(msm4sr::Error::Invalid("--k 0: must be at least 1 (the number of items to recommend)".into()));
            }
            let (dev, _) = cli.device.resolve(named)?;
            let cfg = checkpoint_config(&ckpt)?;
            let ds = cli_run::load_dataset(&data, &cfg, missing_of(missing_features))?;
            let r = cli_run::model_from_checkpoint(&ds, &ckpt, dev)?;
            let recs = cli_run::recommend(&r.model, &ds, &user, k, r.with_id())?;
            if json {
                let v: Vec<_> = recs.iter().map(|(i, s, seen)| serde_json::json!({"item": i, "score": s, "in_history": seen})).collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap());
            } else {
                println!("{:>4}  {:<20} {:>10}  in history", "rank", "item", "score");
                for (r, (i, s, seen)) in recs.iter().enumerate() {
                    println!("{:>4}  {:<20} {:>10.4}  {}", r + 1, i, s, if *seen { "yes" } else { "" });
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Featurize { items, out, text_fields, max_sentences, image_keywords, model_dir, batch, json, overwrite } => {
            let name = items.file_stem().and_then(|n| n.to_str()).unwrap_or("items").to_string();
            let files = [out.join(format!("{name}.features.safetensors")), out.join(format!("{name}.items.txt"))];
            let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--items", &items), ("--model-dir", &model_dir)];
            inputs.extend(image_keywords.as_deref().map(|k| ("--image-keywords", k)));
            cli_run::check_outputs(&files, &inputs, overwrite, "pass --overwrite to replace it")?;
            let (dev, desc) = cli.device.resolve(named)?;
            eprintln!("device: {desc}");
            let opts = msm4sr::featurize::FeaturizeOptions { items, text_fields, out, max_sentences, image_keywords, model_dir, batch };
            let s = msm4sr::featurize::run(&opts, dev, json)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap());
            } else {
                println!(
                    "wrote {}: text {:?}, {} sentences ({} distinct), {:.0} sentences/s on {}",
                    s.features.display(),
                    s.text_shape,
                    s.sentences,
                    s.distinct_sentences,
                    s.sentences_per_s,
                    s.device
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Synth { out, config, print_config, users, items, seed, overwrite } => {
            let mut c = match config {
                Some(ref p) => synth::SynthConfig::from_toml_file(p)?,
                None => synth::SynthConfig::default(),
            };
            if let Some(u) = users {
                c.users = u;
            }
            if let Some(i) = items {
                c.items = i;
            }
            if let Some(s) = seed {
                c.seed = s;
            }
            c.validate()?;
            if print_config {
                print!("{}", toml::to_string(&c).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            let out = out.ok_or_else(|| msm4sr::Error::Invalid("synth needs --out DIR".into()))?;
            let files: Vec<PathBuf> =
                ["inter", "features.safetensors", "items.txt"].iter().map(|e| out.join(format!("{}.{e}", synth::NAME))).collect();
            let inputs: Vec<(&str, &std::path::Path)> = config.as_deref().map(|c| ("--config", c)).into_iter().collect();
            cli_run::check_outputs(&files, &inputs, overwrite, "pass --overwrite to replace it")?;
            synth::write(&out, &c)?;
            println!("wrote a synthetic dataset ({} users, {} items, seed {}) to {}", c.users, c.items, c.seed, out.display());
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
                println!("{}", serde_json::to_string_pretty(&results).unwrap());
            } else {
                println!("{:<15} {:<32} {:<5} {:>12} {:>12}  pass", "op", "shape", "check", "max_abs_err", "max_rel_err");
                for r in &results {
                    println!(
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
                println!("{} checks, {} passed, {} failed", results.len(), results.len() - failed, failed);
            }
            Ok(if results.iter().all(|r| r.pass) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Bench { json, secs, quick, bert, no_steps, model_dir, sentences } => {
            let (dev, desc) = cli.device.resolve(named)?;
            eprintln!("bench on {desc}");
            let quick = quick || (dev == Device::Gpu && gpu::gpu()?.adapter.is_software());
            let mut results = bench::run(dev, secs, quick)?;
            let steps = if no_steps { Vec::new() } else { bench::train_steps(dev, secs, quick)? };
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
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "kernels": results, "train_steps": steps })).unwrap());
            } else {
                println!("{:<10} {:<26} {:>12} {:>10} {:>6}  device", "kernel", "shape", "ms/call", "GFLOP/s", "iters");
                for r in &results {
                    let gf = r.gflops.map(|g| format!("{g:.1}")).unwrap_or_else(|| "-".into());
                    println!("{:<10} {:<26} {:>12.3} {:>10} {:>6}  {}", r.name, r.shape, r.seconds * 1e3, gf, r.iters, r.device);
                }
                if !steps.is_empty() {
                    println!();
                    println!(
                        "{:<20} {:<48} {:>10} {:>10} {:>10} {:>6}",
                        "training step", "shape", "ms/step", "tokens/s", "samples/s", "steps"
                    );
                    for r in &steps {
                        println!(
                            "{:<20} {:<48} {:>10.1} {:>10.0} {:>10.0} {:>6}",
                            r.model,
                            r.shape,
                            r.seconds * 1e3,
                            r.tokens_per_s,
                            r.samples_per_s,
                            r.steps
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
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return Ok(ExitCode::SUCCESS);
    }
    println!("GPU adapters ({}):", adapters.len());
    for (a, l) in &adapters {
        println!(
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
        println!("  (none: install a Vulkan driver, e.g. `apt-get install mesa-vulkan-drivers` for software Vulkan)");
    }
    let (dev, desc) = chosen?;
    println!("chosen device: {desc}");
    if dev == Device::Gpu {
        let g = gpu::gpu()?;
        let l = &g.limits;
        println!("limits:");
        println!("  max_storage_buffer_binding_size     {}", l.max_storage_buffer_binding_size);
        println!("  max_buffer_size                     {}", l.max_buffer_size);
        println!("  max_storage_buffers_per_shader_stage {}", l.max_storage_buffers_per_shader_stage);
        println!("  max_compute_workgroup_storage_size  {}", l.max_compute_workgroup_storage_size);
        println!("  max_compute_invocations_per_workgroup {}", l.max_compute_invocations_per_workgroup);
        println!("  max_compute_workgroups_per_dimension {}", l.max_compute_workgroups_per_dimension);
        println!("  min_subgroup_size / max              {} / {}", g.adapter.subgroup_min_size, g.adapter.subgroup_max_size);
        println!("features: {:?}", g.features);
    }
    Ok(ExitCode::SUCCESS)
}

fn missing_of(m: MissingArg) -> MissingFeatures {
    match m {
        MissingArg::Error => MissingFeatures::Error,
        MissingArg::Zero => MissingFeatures::Zero,
    }
}

fn checkpoint_config(ckpt: &std::path::Path) -> msm4sr::Result<RunConfig> {
    let ck = msm4sr::checkpoint::load(ckpt)?;
    let c = ck.meta.get("config").ok_or_else(|| msm4sr::Error::Invalid(format!("{} has no config metadata", ckpt.display())))?;
    serde_json::from_str(c).map_err(|e| msm4sr::Error::Invalid(format!("{}: {e}", ckpt.display())))
}

/// Save the effective config beside the checkpoint (`<stem>.config.toml`), once the run is validated.
fn save_config(out: &std::path::Path, cfg: &RunConfig) -> msm4sr::Result<()> {
    msm4sr::checkpoint::write_atomic(&cli_run::config_path(out), cli_run::config_toml(cfg).as_bytes())
}

fn print_result(r: &cli_run::RunResult, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).unwrap());
    } else {
        let present: Vec<(&str, &metrics::Metrics)> =
            [("valid", &r.valid), ("test", &r.test)].into_iter().filter_map(|(n, m)| m.as_ref().map(|m| (n, m))).collect();
        for (n, m) in [("valid", &r.valid), ("test", &r.test)] {
            if m.is_none() {
                println!("{n}: no samples");
            }
        }
        if !present.is_empty() {
            println!("{}", metrics::table(&present));
        }
        println!("model {}, {} epochs, {:.1} s", r.model, r.epochs, r.seconds);
    }
}

#[allow(clippy::too_many_arguments)]
fn train_cmd(
    run: &RunArgs,
    cfg: RunConfig,
    plan: Plan,
    out: &std::path::Path,
    init: Option<&std::path::Path>,
    resume: bool,
    choice: DeviceChoice,
    named: bool,
) -> msm4sr::Result<ExitCode> {
    if run.print_config {
        print!("{}", cli_run::config_toml(&cfg));
        return Ok(ExitCode::SUCCESS);
    }
    run.check_outputs(out, init, plan.pretrain, resume)?;
    let (dev, desc) = choice.resolve(named)?;
    let ds = cli_run::load_dataset(&run.data, &cfg, run.missing())?;
    if !run.json {
        eprintln!("device: {desc}");
        eprintln!("{ds}");
        eprintln!("effective configuration:\n{}", cli_run::config_toml(&cfg));
    }
    cli_run::check_split(&ds, &cfg)?;
    cli_run::check_model_fits(&cfg, &ds)?;
    // A resumed run's settings are checked against the interrupted run's first (train::fit).
    if !resume {
        save_config(out, &cfg)?;
    }
    let r = cli_run::run_training(&ds, &cfg, plan, out, init, resume, dev, run.json)?;
    if resume {
        save_config(out, &cfg)?;
    }
    print_result(&r, run.json);
    Ok(ExitCode::SUCCESS)
}
