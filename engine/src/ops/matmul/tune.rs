//! Which matmul kernel variant computes a GPU product: a one-time autotune per shape and adapter,
//! cached on disk.
//!
//! - Key: the adapter (name, driver, backend), M, N, K, ta, tb, nout, nsum and whether a bias is
//!   fused. M, N and K above 64 are rounded up to the next power of two, so that the products of
//!   packed batches, whose row count changes every step, share a few keys instead of tuning again
//!   each step; at 64 and below they are exact (variant 5 takes K <= 64, variant 6 N <= 8).
//! - Tuning: on the first product of a key, queued work is flushed and waited for, then every
//!   variant that supports the product runs it on the real operands a few times (into outputs of its
//!   own, dropped afterwards: tuning never writes the product's output) and the fastest is kept with
//!   every variant's time. A product whose shape falls in the key but which the kept variant does not
//!   support (e.g. an M that is not a multiple of 4 where vec4 loads need one) takes the fastest
//!   timed variant that does, else variant 1.
//! - Cache: `$MSM4SR_CACHE_DIR/matmul_tune.json`, else `$XDG_CACHE_HOME/msm4sr/matmul_tune.json`,
//!   else `~/.cache/msm4sr/matmul_tune.json`; written after each new key (merged with what another
//!   process may have written meanwhile; a temporary file renamed over it). A file that cannot be
//!   read or parsed is ignored with one warning.
//! - Policy: `MSM4SR_MATMUL=<name or number>` forces one variant (where it supports the product;
//!   no tuning); `MSM4SR_AUTOTUNE=1` or `0` turns tuning on or off, by default on for hardware
//!   adapters and off for software ones (lavapipe). Without tuning every product uses variant 1.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use super::variants::{gemm_gpu_with, Gemm, MatmulVariant, Support};
use crate::error::{shape_err, Result};
use crate::gpu::{gpu, Gpu, GpuBuf};
use crate::tensor::{same_device, Storage, Tensor};

/// Timing rounds per variant (the fastest counts), and products per round, after one warm-up.
const ROUNDS: usize = 3;
const REPS: usize = 2;
/// The cache file's format version.
const VERSION: u32 = 1;

/// What a tuning result is kept for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Key {
    /// "name / driver driver_info / backend".
    pub adapter: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub nout: usize,
    pub nsum: usize,
    pub bias: bool,
    /// The fused GELU epilogue (`linear_gelu`).
    #[serde(default)]
    pub gelu: bool,
}

/// A size as the key holds it: exact up to 64, else the next power of two.
fn bucket(x: usize) -> usize {
    if x <= 64 {
        x
    } else {
        x.next_power_of_two()
    }
}

impl Key {
    pub fn new(adapter: &str, p: &Gemm, bias: bool) -> Key {
        Key {
            adapter: adapter.to_string(),
            m: bucket(p.m),
            n: bucket(p.n),
            k: bucket(p.k),
            ta: p.ta,
            tb: p.tb,
            nout: p.nout,
            nsum: p.nsum,
            bias,
            gelu: p.gelu,
        }
    }
}

/// The adapter part of a key.
pub fn adapter_id(g: &Gpu) -> String {
    let a = &g.adapter;
    format!("{} / {} {} / {}", a.name, a.driver, a.driver_info, a.backend)
}

/// One tuned key: the variant picked and what every variant measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub key: Key,
    /// The exact (M, N, K) the timings were measured at.
    pub tuned_on: [usize; 3],
    pub pick: MatmulVariant,
    /// Microseconds per product of each variant that ran, by name.
    pub micros: BTreeMap<String, f64>,
    /// Why each other variant did not run, by name.
    #[serde(default)]
    pub not_run: BTreeMap<String, String>,
}

impl Entry {
    /// The variant for product `p` (of this entry's key): the pick if it supports `p`, else the
    /// fastest timed variant that does, else variant 1.
    fn variant_for(&self, p: &Gemm, g: &Gpu) -> MatmulVariant {
        let ok = |v: MatmulVariant| v.supports(p, &g.limits, g.features) == Support::Yes;
        if ok(self.pick) {
            return self.pick;
        }
        let mut timed: Vec<(f64, MatmulVariant)> =
            self.micros.iter().filter_map(|(name, &us)| MatmulVariant::parse(name).map(|v| (us, v))).filter(|&(_, v)| ok(v)).collect();
        timed.sort_by(|x, y| x.0.total_cmp(&y.0));
        timed.first().map_or(MatmulVariant::Tile64, |&(_, v)| v)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheFile {
    version: u32,
    entries: Vec<Entry>,
}

/// How variants are chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Use this variant wherever it supports the product (no tuning).
    pub forced: Option<MatmulVariant>,
    /// Tune keys not seen yet (else they use variant 1).
    pub tune: bool,
    /// The cache file (None: tuning results live in memory only).
    pub cache: Option<PathBuf>,
}

impl Policy {
    /// The policy for the values of `MSM4SR_MATMUL` and `MSM4SR_AUTOTUNE` on a software or hardware
    /// adapter; unknown values are reported (in the returned warnings) and ignored.
    pub fn resolve(matmul: Option<&str>, autotune: Option<&str>, software: bool, cache: Option<PathBuf>) -> (Policy, Vec<String>) {
        let mut warnings = Vec::new();
        let forced = matmul.filter(|s| !s.trim().is_empty()).and_then(|s| {
            let v = MatmulVariant::parse(s);
            if v.is_none() {
                let names: Vec<_> = MatmulVariant::ALL.iter().map(|v| v.name()).collect();
                warnings.push(format!("MSM4SR_MATMUL={s} names no matmul variant ({}); ignored", names.join(", ")));
            }
            v
        });
        let tune = match autotune.map(str::trim).filter(|s| !s.is_empty()) {
            Some("1") => true,
            Some("0") => false,
            Some(other) => {
                warnings.push(format!("MSM4SR_AUTOTUNE={other} is neither 0 nor 1; ignored"));
                !software
            }
            None => !software,
        };
        (Policy { forced, tune: tune && forced.is_none(), cache }, warnings)
    }

    /// The policy from the environment for this adapter.
    pub fn from_env(software: bool) -> (Policy, Vec<String>) {
        let var = |k: &str| std::env::var(k).ok();
        Policy::resolve(var("MSM4SR_MATMUL").as_deref(), var("MSM4SR_AUTOTUNE").as_deref(), software, default_cache_file())
    }
}

/// `$MSM4SR_CACHE_DIR/matmul_tune.json`, else under `$XDG_CACHE_HOME/msm4sr/`, else `~/.cache/msm4sr/`.
pub fn default_cache_file() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = var("MSM4SR_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("msm4sr")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("msm4sr")))?;
    Some(dir.join("matmul_tune.json"))
}

/// The entries of a cache file: none if it does not exist; an error message if it cannot be read
/// or parsed.
pub fn read_cache(path: &Path) -> std::result::Result<Vec<Entry>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let file: CacheFile = serde_json::from_str(&text).map_err(|e| format!("{} is not a matmul tuning cache: {e}", path.display()))?;
    if file.version != VERSION {
        return Err(format!("{} has format version {}, not {VERSION}", path.display(), file.version));
    }
    Ok(file.entries)
}

/// Write `entries` to `path` atomically (a temporary file in the same directory, renamed over it).
pub fn write_cache(path: &Path, entries: &[Entry]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&CacheFile { version: VERSION, entries: entries.to_vec() }).map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Tuning results and the policy that makes them.
pub struct Tuner {
    policy: Policy,
    entries: HashMap<Key, Entry>,
    loaded: bool,
    warned: bool,
    /// Warnings given so far (each also printed once).
    pub warnings: Vec<String>,
}

impl Tuner {
    pub fn new(policy: Policy) -> Tuner {
        Tuner { policy, entries: HashMap::new(), loaded: false, warned: false, warnings: Vec::new() }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The tuned keys.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Warn once per tuner (the first problem with its cache file).
    fn warn(&mut self, msg: String) {
        if !self.warned {
            eprintln!("msm4sr: {msg}; tuning results are not cached");
            self.warned = true;
        }
        self.warnings.push(msg);
    }

    fn load(&mut self) {
        if self.loaded {
            return;
        }
        self.loaded = true;
        let Some(path) = self.policy.cache.clone() else { return };
        match read_cache(&path) {
            Ok(entries) => self.entries.extend(entries.into_iter().map(|e| (e.key.clone(), e))),
            Err(e) => self.warn(format!("ignoring the matmul tuning cache: {e}")),
        }
    }

    fn save(&mut self) {
        let Some(path) = self.policy.cache.clone() else { return };
        // Keep what other processes tuned meanwhile (an unreadable file is replaced).
        let mut all: BTreeMap<String, Entry> = BTreeMap::new();
        for e in read_cache(&path).unwrap_or_default().into_iter().chain(self.entries.values().cloned()) {
            all.insert(serde_json::to_string(&e.key).unwrap_or_default(), e);
        }
        let entries: Vec<Entry> = all.into_values().collect();
        if let Err(e) = write_cache(&path, &entries) {
            self.warn(format!("cannot write the matmul tuning cache {}: {e}", path.display()));
        }
    }

    /// The variant for product `p` of operands `a`, `b` (and `bias`): tuned on first sight of its
    /// key when tuning is on.
    pub fn pick(&mut self, a: &GpuBuf, b: &GpuBuf, bias: Option<&GpuBuf>, p: &Gemm) -> Result<MatmulVariant> {
        let g = gpu()?;
        let supported = |v: MatmulVariant| v.supports(p, &g.limits, g.features) == Support::Yes;
        if let Some(v) = self.policy.forced {
            return Ok(if supported(v) { v } else { MatmulVariant::Tile64 });
        }
        if !self.policy.tune {
            return Ok(MatmulVariant::Tile64);
        }
        self.load();
        let key = Key::new(&adapter_id(g), p, bias.is_some());
        if let Some(e) = self.entries.get(&key) {
            return Ok(e.variant_for(p, g));
        }
        let entry = tune(g, a, b, bias, p, key.clone())?;
        let v = entry.variant_for(p, g);
        self.entries.insert(key, entry);
        self.save();
        Ok(v)
    }
}

/// Time every variant that supports `p` on the operands; outputs are dropped.
fn tune(g: &Gpu, a: &GpuBuf, b: &GpuBuf, bias: Option<&GpuBuf>, p: &Gemm, key: Key) -> Result<Entry> {
    g.sync()?;
    let mut micros = BTreeMap::new();
    let mut not_run = BTreeMap::new();
    let mut best: Option<(f64, MatmulVariant)> = None;
    for v in MatmulVariant::ALL {
        match v.supports(p, &g.limits, g.features) {
            Support::Yes => {}
            no => {
                not_run.insert(v.name().to_string(), no.to_string());
                continue;
            }
        }
        drop(gemm_gpu_with(a, b, bias, p, v)?); // warm-up: pipeline creation
        g.sync()?;
        let mut secs = f64::INFINITY;
        for _ in 0..ROUNDS {
            let t0 = Instant::now();
            for _ in 0..REPS {
                drop(gemm_gpu_with(a, b, bias, p, v)?);
            }
            g.sync()?;
            secs = secs.min(t0.elapsed().as_secs_f64() / REPS as f64);
        }
        micros.insert(v.name().to_string(), secs * 1e6);
        if best.is_none_or(|(s, _)| secs < s) {
            best = Some((secs, v));
        }
    }
    let pick = best.map_or(MatmulVariant::Tile64, |(_, v)| v);
    Ok(Entry { key, tuned_on: [p.m, p.n, p.k], pick, micros, not_run })
}

/// The process's tuner, from the environment on first use.
static TUNER: Mutex<Option<Tuner>> = Mutex::new(None);

/// The variant the runtime uses for product `p` (see the module docs).
pub(crate) fn choose(a: &GpuBuf, b: &GpuBuf, bias: Option<&GpuBuf>, p: &Gemm) -> Result<MatmulVariant> {
    let mut t = TUNER.lock().unwrap_or_else(|e| e.into_inner());
    let tuner = match &mut *t {
        Some(t) => t,
        None => {
            let (policy, warnings) = Policy::from_env(gpu()?.adapter.is_software());
            for w in warnings {
                eprintln!("msm4sr: {w}");
            }
            t.insert(Tuner::new(policy))
        }
    };
    tuner.pick(a, b, bias, p)
}

/// op(a) . op(b) (+ bias) on the GPU with the variant `tuner` picks (tuning the product's key first
/// if the tuner is on and has not seen it), without autograd; returns the product and the variant.
pub fn matmul_tuned(
    a: &Tensor,
    b: &Tensor,
    ta: bool,
    tb: bool,
    bias: Option<&Tensor>,
    tuner: &mut Tuner,
) -> Result<(Tensor, MatmulVariant)> {
    let (p, shape) = Gemm::plan("matmul_tuned", a.shape(), b.shape(), ta, tb)?;
    let dev = same_device("matmul_tuned", &[a, b])?;
    if dev != crate::device::Device::Gpu {
        return shape_err("matmul_tuned", "the kernel variants run on the GPU: give GPU tensors");
    }
    let bias_buf = bias.map(|t| t.gbuf()).transpose()?;
    let (ga, gb) = (a.gbuf()?, b.gbuf()?);
    let v = tuner.pick(&ga, &gb, bias_buf.as_deref(), &p)?;
    let out = gemm_gpu_with(&ga, &gb, bias_buf.as_deref(), &p, v)?;
    Ok((Tensor::from_storage(Storage::Gpu(out), shape), v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(m: usize, pick: MatmulVariant) -> Entry {
        let p = Gemm { m, n: 64, k: 64, ta: false, tb: true, a_bs: 0, b_bs: 0, nout: 1, nsum: 1, gelu: false };
        Entry {
            key: Key::new("gpu / driver 1.0 / Vulkan", &p, true),
            tuned_on: [m, 64, 64],
            pick,
            micros: [("tile64".to_string(), 12.5), ("vec4".to_string(), 7.25)].into_iter().collect(),
            not_run: [("subgroup".to_string(), "not eligible: needs N <= 8".to_string())].into_iter().collect(),
        }
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("msm4sr-tune-test-{}-{name}", std::process::id())).join("matmul_tune.json")
    }

    #[test]
    fn the_cache_round_trips() {
        let path = temp("round-trip");
        let entries = vec![entry(51200, MatmulVariant::Vec4), entry(100, MatmulVariant::SkinnyK)];
        write_cache(&path, &entries).unwrap();
        assert_eq!(read_cache(&path).unwrap(), entries);
        assert_eq!(entries[0].key.m, 65536, "rows are bucketed");
        assert_eq!(entries[1].key.m, 128);
        // A tuner loads it without tuning again.
        let mut t = Tuner::new(Policy { forced: None, tune: true, cache: Some(path.clone()) });
        t.load();
        assert_eq!(t.entries().count(), 2);
        assert!(t.warnings.is_empty());
        assert!(!path.with_extension(format!("json.tmp.{}", std::process::id())).exists(), "the temporary file was renamed");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_corrupt_cache_is_ignored_with_a_warning() {
        let path = temp("corrupt");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        for text in ["{ not json", r#"{"version": 99, "entries": []}"#, r#"{"version": 1, "entries": [{"pick": "tile512"}]}"#] {
            std::fs::write(&path, text).unwrap();
            assert!(read_cache(&path).is_err(), "{text}");
            let mut t = Tuner::new(Policy { forced: None, tune: true, cache: Some(path.clone()) });
            t.load();
            assert_eq!(t.entries().count(), 0);
            assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        }
        // A directory where the file should be: unreadable, also ignored.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(&path).unwrap();
        assert!(read_cache(&path).is_err());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        assert_eq!(read_cache(&path).unwrap(), Vec::new(), "no file: no entries, no error");
    }

    #[test]
    fn the_policy_follows_the_environment_values() {
        let r = |m: Option<&str>, a: Option<&str>, sw: bool| Policy::resolve(m, a, sw, None);
        assert_eq!(r(None, None, false).0, Policy { forced: None, tune: true, cache: None });
        assert_eq!(r(None, None, true).0, Policy { forced: None, tune: false, cache: None });
        assert!(r(None, Some("1"), true).0.tune);
        assert!(!r(None, Some("0"), false).0.tune);
        let (p, w) = r(Some("vec4"), Some("1"), false);
        assert_eq!((p.forced, p.tune, w.len()), (Some(MatmulVariant::Vec4), false, 0));
        assert_eq!(r(Some("5"), None, true).0.forced, Some(MatmulVariant::SkinnyK));
        let (p, w) = r(Some("tile512"), Some("yes"), false);
        assert_eq!((p.forced, p.tune, w.len()), (None, true, 2));
    }
}
