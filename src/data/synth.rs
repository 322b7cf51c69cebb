//! A synthetic multimodal sequential-recommendation dataset with planted structure.
//!
//! The generator makes a small dataset in the same files as a real one (`synth.inter`,
//! `synth.features.safetensors`, `synth.items.txt`), so everything downstream runs on it unchanged,
//! and so that content features carry signal an ID-only model cannot get for rare items:
//!
//! - **Items** each have a latent topic (balanced at random over `topics`) and a unit latent vector
//!   `u`. Popularity is long-tailed: Zipf with exponent `zipf` over the items of a topic.
//! - **Text** rows (up to `sentences`) are noisy random projections of `[topic centre, first half
//!   of u]`; **image** rows (up to `images`) are noisy projections, with another random matrix, of
//!   `[topic centre / 2, second half of u]`. Each modality carries part of the signal; both together
//!   carry all of it.
//! - **Sequences** follow a Markov chain over topics (stay with probability `stay`, else move
//!   mostly to one of two fixed successor topics). Within a topic the next item is drawn with weight
//!   `popularity * exp(similarity * <u_prev, u_item>)`; with probability `noise` it is instead a
//!   random item drawn by popularity. A user never repeats an item. Lengths are in
//!   `min_len..=max_len`, skewed towards short.
//! - **Feature counts**: about a `partial` fraction of items have fewer rows than the maximum in
//!   each modality, and about a `missing` fraction have no rows in one modality (never both).
//!
//! The output is a deterministic function of the config (seed included). Files are written
//! atomically (a temporary file in the same directory, then a rename).

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{features_bytes, Interaction, Modality};
use crate::files::write_atomic;
use crate::{Error, Result};

/// Dataset name: the files are `synth.inter`, `synth.features.safetensors`, `synth.items.txt`.
pub const NAME: &str = "synth";
/// Bounds on what `synth` makes (checked before anything is allocated).
pub const MAX_USERS: usize = 10_000_000;
pub const MAX_ITEMS: usize = 10_000_000;
pub const MAX_INTERACTIONS: usize = 200_000_000;
/// Bytes of the features file at most (both modalities).
pub const MAX_FEATURE_BYTES: u64 = 16 << 30;

/// Generator settings. The defaults train an ID-only SASRec and MSM4SR in a few minutes on a
/// 2-core CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    pub users: usize,
    pub items: usize,
    pub topics: usize,
    /// S: maximum sentences per item (0 = no text modality).
    pub sentences: usize,
    /// V: maximum images per item (0 = no image modality).
    pub images: usize,
    /// d: feature size.
    pub dim: usize,
    /// Size of each item's own latent vector (at least 2).
    pub latent: usize,
    /// Shortest and longest user sequence (min_len at least 3).
    pub min_len: usize,
    pub max_len: usize,
    /// Zipf exponent of popularity within a topic.
    pub zipf: f64,
    /// Probability of staying in the current topic.
    pub stay: f64,
    /// Probability that the next item is a random popular item.
    pub noise: f64,
    /// Weight of latent similarity to the previous item.
    pub similarity: f64,
    /// Standard deviation of the noise added to every feature row.
    pub feature_noise: f64,
    /// A domain of a family (0: a dataset of its own). Domains 1, 2, ... with the same seed share
    /// their topics — topic centres, topic transitions and the feature projections — but not their
    /// items or users (tokens `d<domain>i<n>`, `d<domain>u<n>`): a source and a target for
    /// cross-domain transfer.
    #[serde(skip_serializing_if = "is_zero")]
    pub domain: u32,
    /// Fraction of items with fewer rows than the maximum, per modality.
    pub partial: f64,
    /// Fraction of items with no rows in one modality.
    pub missing: f64,
    pub seed: u64,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            users: 1000,
            items: 3000,
            topics: 16,
            sentences: 4,
            images: 3,
            dim: 32,
            latent: 16,
            min_len: 6,
            max_len: 20,
            zipf: 0.8,
            stay: 0.5,
            noise: 0.1,
            similarity: 8.0,
            feature_noise: 0.2,
            partial: 0.25,
            missing: 0.03,
            domain: 0,
            seed: 42,
        }
    }
}

impl SynthConfig {
    /// Read generator settings from a TOML file: any subset of the keys, the rest default.
    /// Unknown keys are an error (a misspelt setting must not be silently ignored).
    pub fn from_toml_file(path: &Path) -> Result<SynthConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        let cfg: SynthConfig = toml::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {}", path.display(), crate::config::with_suggestion(e.to_string()))))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The effective settings: defaults < the TOML file at `file` < `--users`, `--items`, `--seed`;
    /// validated.
    pub fn resolve(file: Option<&Path>, users: Option<usize>, items: Option<usize>, seed: Option<u64>) -> Result<SynthConfig> {
        let mut c = match file {
            Some(p) => SynthConfig::from_toml_file(p)?,
            None => SynthConfig::default(),
        };
        c.users = users.unwrap_or(c.users);
        c.items = items.unwrap_or(c.items);
        c.seed = seed.unwrap_or(c.seed);
        c.validate()?;
        Ok(c)
    }

    /// The files [`write`] writes into `dir`.
    pub fn outputs(dir: &Path) -> Vec<std::path::PathBuf> {
        ["inter", "item", "features.safetensors", "items.txt"].iter().map(|e| dir.join(format!("{NAME}.{e}"))).collect()
    }

    /// Check the settings, naming the first bad one (sizes included: see [`MAX_USERS`] and the
    /// other bounds).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(format!("synth config: {msg}")));
        if self.users == 0 {
            return bad("users must be at least 1".into());
        }
        if self.topics == 0 || self.topics > self.items {
            return bad(format!("topics must be in 1..=items ({}), got {}", self.items, self.topics));
        }
        if self.sentences == 0 && self.images == 0 {
            return bad("sentences and images are both 0: no modality to write".into());
        }
        if self.dim == 0 || self.latent < 2 {
            return bad(format!("dim must be at least 1 and latent at least 2, got {} and {}", self.dim, self.latent));
        }
        if self.min_len < 3 || self.min_len > self.max_len || self.max_len > self.items {
            return bad(format!(
                "need 3 <= min_len <= max_len <= items, got min_len {}, max_len {}, items {}",
                self.min_len, self.max_len, self.items
            ));
        }
        for (name, p) in [("stay", self.stay), ("noise", self.noise), ("partial", self.partial), ("missing", self.missing)] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} must be a probability, got {p}"));
            }
        }
        for (name, v) in [("zipf", self.zipf), ("similarity", self.similarity), ("feature_noise", self.feature_noise)] {
            if !v.is_finite() || v < 0.0 {
                return bad(format!("{name} must be finite and >= 0, got {v}"));
            }
        }
        // Sizes are bounded up front by what the output would take (the features are written as
        // one f32 tensor per modality, the interactions as text), never found by running out of memory.
        for (name, v, max) in [("users", self.users, MAX_USERS), ("items", self.items, MAX_ITEMS), ("topics", self.topics, MAX_ITEMS)] {
            if v > max {
                return bad(format!("{name} {v} is more than this generator makes (at most {max})"));
            }
        }
        let rows = self.sentences.saturating_add(self.images);
        let feature_bytes = (self.items as u128) * (rows as u128) * (self.dim as u128) * 4;
        if feature_bytes > MAX_FEATURE_BYTES as u128 {
            return bad(format!(
                "{} items x {rows} feature rows x {} dims would be {:.1} GiB of features (at most {} GiB): fewer items, rows or dims",
                self.items,
                self.dim,
                feature_bytes as f64 / (1u64 << 30) as f64,
                MAX_FEATURE_BYTES >> 30
            ));
        }
        if (self.users as u128) * (self.max_len as u128) > MAX_INTERACTIONS as u128 {
            return bad(format!("{} users x up to {} items each is more than {MAX_INTERACTIONS} interactions", self.users, self.max_len));
        }
        Ok(())
    }
}

/// A generated dataset in memory. Features follow `item_tokens` order (`[N, rows, dim]`, no
/// padding row), as in `synth.items.txt`.
#[derive(Debug, Clone, PartialEq)]
pub struct Synth {
    /// Rows of `synth.inter`, in file order (by time).
    pub interactions: Vec<Interaction>,
    /// `i1..iN`, the lines of `synth.items.txt`.
    pub item_tokens: Vec<String>,
    /// The planted topic of each item (same order).
    pub item_topics: Vec<u32>,
    pub text: Option<Modality>,
    pub image: Option<Modality>,
}

fn normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    // Box-Muller; 1 - u keeps the log argument in (0, 1].
    let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn unit_vector<R: Rng + ?Sized>(rng: &mut R, n: usize) -> Vec<f64> {
    let v: Vec<f64> = (0..n).map(|_| normal(rng)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.into_iter().map(|x| x / norm).collect()
}

/// Draw an index with probability proportional to `w` (None when every weight is 0).
fn draw<R: Rng + ?Sized>(rng: &mut R, w: &[f64]) -> Option<usize> {
    let total: f64 = w.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let mut x = rng.random::<f64>() * total;
    for (i, &wi) in w.iter().enumerate() {
        if wi > 0.0 {
            if x < wi {
                return Some(i);
            }
            x -= wi;
        }
    }
    w.iter().rposition(|&wi| wi > 0.0)
}

/// Generate the dataset in memory.
pub fn generate(cfg: &SynthConfig) -> Result<Synth> {
    cfg.validate()?;
    // Domain 0 draws everything from one generator (the order below); a domain d > 0 draws the
    // topic-level structure from `world` and everything item- or user-level from its own.
    let mut world = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut own = (cfg.domain > 0).then(|| ChaCha8Rng::seed_from_u64(cfg.seed ^ (cfg.domain as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    macro_rules! rng {
        () => {
            own.as_mut().unwrap_or(&mut world)
        };
    }
    let (n, t, k) = (cfg.items, cfg.topics, cfg.latent);
    let prefix = if cfg.domain > 0 { format!("d{}", cfg.domain) } else { String::new() };

    // Items: balanced random topics, Zipf popularity by rank within the topic, latent vectors.
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng!().random_range(0..=i));
    }
    let mut topic = vec![0usize; n];
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); t];
    let mut pop = vec![0.0f64; n];
    for (pos, &item) in order.iter().enumerate() {
        let tp = pos % t;
        topic[item] = tp;
        pop[item] = 1.0 / ((members[tp].len() + 1) as f64).powf(cfg.zipf);
        members[tp].push(item);
    }
    let centres: Vec<Vec<f64>> = (0..t).map(|_| unit_vector(&mut world, k)).collect();
    let latent: Vec<Vec<f64>> = (0..n).map(|_| unit_vector(rng!(), k)).collect();

    // Topic chain: stay, else one of two successors (80%) or any topic.
    let trans: Vec<Vec<f64>> = (0..t)
        .map(|a| {
            let succ = [world.random_range(0..t), world.random_range(0..t)];
            let mut row = vec![(1.0 - cfg.stay) * 0.2 / t as f64; t];
            row[a] += cfg.stay;
            for s in succ {
                row[s] += (1.0 - cfg.stay) * 0.4;
            }
            row
        })
        .collect();

    // Sequences.
    let base_time = 1_577_836_800i64; // 2020-01-01
    let mut events: Vec<(i64, usize, usize)> = Vec::new(); // (time, user, item)
    let mut seen = vec![false; n];
    let mut w = Vec::with_capacity(n);
    let rng = rng!();
    for user in 0..cfg.users {
        let span = (cfg.max_len - cfg.min_len + 1) as f64;
        let len = (cfg.min_len + (span * rng.random::<f64>().powi(2)) as usize).min(cfg.max_len);
        let mut tp = rng.random_range(0..t);
        let mut time = base_time + rng.random_range(0..365 * 86_400);
        let mut prev: Option<usize> = None;
        let mut seq = Vec::with_capacity(len);
        for step in 0..len {
            if step > 0 {
                tp = draw(rng, &trans[tp]).unwrap_or(tp);
                time += rng.random_range(60..3 * 86_400);
            }
            let pick = if rng.random::<f64>() < cfg.noise {
                None
            } else {
                w.clear();
                w.extend(members[tp].iter().map(|&j| {
                    if seen[j] {
                        return 0.0;
                    }
                    let sim = prev.map_or(0.0, |p| latent[p].iter().zip(&latent[j]).map(|(a, b)| a * b).sum::<f64>());
                    pop[j] * (cfg.similarity * sim).exp()
                }));
                draw(rng, &w).map(|i| members[tp][i])
            };
            let item = match pick {
                Some(i) => i,
                None => {
                    w.clear();
                    w.extend((0..n).map(|j| if seen[j] { 0.0 } else { pop[j] }));
                    match draw(rng, &w) {
                        Some(i) => i,
                        None => break, // cannot happen: max_len <= items
                    }
                }
            };
            seen[item] = true;
            seq.push(item);
            prev = Some(item);
            events.push((time, user, item));
        }
        for i in seq {
            seen[i] = false;
        }
    }
    events.sort_by_key(|e| e.0); // stable: a user's own order is kept on equal times
    let interactions = events
        .iter()
        .map(|&(time, u, i)| Interaction {
            user: format!("{prefix}u{}", u + 1),
            item: format!("{prefix}i{}", i + 1),
            timestamp: time as f64,
        })
        .collect();

    // Feature counts: text first; image may not also be empty.
    let count = |max: usize, forbid_zero: bool, rng: &mut ChaCha8Rng| -> usize {
        let x = rng.random::<f64>();
        if x < cfg.missing && !forbid_zero {
            0
        } else if x < cfg.missing + cfg.partial && max > 1 {
            rng.random_range(1..max)
        } else {
            max
        }
    };
    let text_len: Vec<usize> = (0..n).map(|_| if cfg.sentences > 0 { count(cfg.sentences, cfg.images == 0, rng!()) } else { 0 }).collect();
    let image_len: Vec<usize> = (0..n).map(|i| if cfg.images > 0 { count(cfg.images, text_len[i] == 0, rng!()) } else { 0 }).collect();

    // Feature rows: noisy projections of the modality's view of the latent state.
    let half = k / 2;
    let text_view = |i: usize| -> Vec<f64> { centres[topic[i]].iter().chain(&latent[i][..half]).copied().collect() };
    let image_view =
        |i: usize| -> Vec<f64> { centres[topic[i]].iter().map(|c| 0.5 * c).chain(latent[i][half..].iter().copied()).collect() };
    // `world` draws the projection, `rng` the noise (the same generator for domain 0).
    let modality = |rows: usize,
                    lens: &[usize],
                    view: &dyn Fn(usize) -> Vec<f64>,
                    world: &mut ChaCha8Rng,
                    mut rng: Option<&mut ChaCha8Rng>|
     -> Option<Modality> {
        if rows == 0 {
            return None;
        }
        let in_dim = view(0).len();
        let scale = 1.0 / (in_dim as f64).sqrt();
        let proj: Vec<f64> = (0..in_dim * cfg.dim).map(|_| normal(world) * scale * (cfg.dim as f64).sqrt()).collect();
        let mut data = vec![0.0f32; n * rows * cfg.dim];
        for i in 0..n {
            let v = view(i);
            let clean: Vec<f64> = (0..cfg.dim).map(|c| v.iter().enumerate().map(|(r, x)| x * proj[r * cfg.dim + c]).sum()).collect();
            for r in 0..lens[i] {
                let out = &mut data[(i * rows + r) * cfg.dim..(i * rows + r + 1) * cfg.dim];
                for (o, c) in out.iter_mut().zip(&clean) {
                    let r: &mut ChaCha8Rng = match rng.as_deref_mut() {
                        Some(r) => r,
                        None => &mut *world,
                    };
                    *o = (c / (cfg.dim as f64).sqrt() + cfg.feature_noise * normal(r)) as f32;
                }
            }
        }
        Some(Modality { rows, dim: cfg.dim, data, lens: lens.iter().map(|&l| l as u32).collect() })
    };
    let text = modality(cfg.sentences, &text_len, &text_view, &mut world, own.as_mut());
    let image = modality(cfg.images, &image_len, &image_view, &mut world, own.as_mut());

    Ok(Synth {
        interactions,
        item_tokens: (1..=n).map(|i| format!("{prefix}i{i}")).collect(),
        item_topics: topic.iter().map(|&t| t as u32).collect(),
        text,
        image,
    })
}

/// Kinds of things a synthetic topic stands for (topic t is `TOPIC_NOUNS[t % 24]`, numbered after
/// the first 24), and the words that tell its items apart: names for reading recommendations,
/// not features (the models never see them).
const TOPIC_NOUNS: [&str; 24] = [
    "notebook",
    "desk lamp",
    "kettle",
    "backpack",
    "headphones",
    "tea",
    "board game",
    "running shoe",
    "novel",
    "plant pot",
    "camera",
    "yoga mat",
    "coffee",
    "jigsaw",
    "scarf",
    "cookbook",
    "bicycle light",
    "candle",
    "keyboard",
    "water bottle",
    "sketchbook",
    "umbrella",
    "phone case",
    "hot sauce",
];
const ITEM_WORDS: [&str; 20] = [
    "Amber", "Slate", "Teal", "Crimson", "Ivory", "Olive", "Cobalt", "Sand", "Plum", "Coral", "Mint", "Graphite", "Saffron", "Indigo",
    "Birch", "Copper", "Fern", "Pearl", "Rust", "Sky",
];

/// The name of synthetic item `i` (0-based) of topic `topic`, e.g. "Teal kettle 17".
pub fn item_title(i: usize, topic: usize) -> String {
    let noun = TOPIC_NOUNS[topic % TOPIC_NOUNS.len()];
    let round = topic / TOPIC_NOUNS.len();
    let noun = if round == 0 { noun.to_string() } else { format!("{noun} {}", round + 1) };
    format!("{} {noun} {}", ITEM_WORDS[(i * 7 + topic) % ITEM_WORDS.len()], i + 1)
}

/// Generate and write `synth.inter`, `synth.item` (item names and topics, for reading
/// recommendations), `synth.features.safetensors` and `synth.items.txt` into `dir` (created if
/// needed), each atomically.
pub fn write(dir: &Path, cfg: &SynthConfig) -> Result<()> {
    let s = generate(cfg)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.display().to_string(), source: e })?;
    let mut inter = String::from("user_id:token\titem_id:token\ttimestamp:float\n");
    for r in &s.interactions {
        inter += &format!("{}\t{}\t{}\n", r.user, r.item, r.timestamp as i64);
    }
    let mut names = String::from("item_id:token\ttitle:token_seq\ttopic:token\n");
    for (i, (tok, &t)) in s.item_tokens.iter().zip(&s.item_topics).enumerate() {
        names += &format!("{tok}\t{}\t{}\n", item_title(i, t as usize), t + 1);
    }
    let mut items = s.item_tokens.join("\n");
    items.push('\n');
    // One metadata entry only: several would be written in hash order and the bytes would vary.
    let mut meta = HashMap::new();
    meta.insert("msm4sr_synth_config".to_string(), serde_json::to_string(cfg).map_err(|e| Error::Invalid(e.to_string()))?);
    let feats = features_bytes(s.text.as_ref(), s.image.as_ref(), meta)?;
    write_atomic(&dir.join(format!("{NAME}.features.safetensors")), &feats)?;
    write_atomic(&dir.join(format!("{NAME}.items.txt")), items.as_bytes())?;
    write_atomic(&dir.join(format!("{NAME}.item")), names.as_bytes())?;
    write_atomic(&dir.join(format!("{NAME}.inter")), inter.as_bytes())?;
    Ok(())
}
