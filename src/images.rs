//! Item images for CLIP features: which image files belong to which item, reading them, and turning
//! each into the CLIP vision model's input exactly as Hugging Face transformers' PIL-based
//! `CLIPImageProcessor` does.
//!
//! **Which images** ([`ImageSource`], [`list_images`]). A source is either
//! - a TSV file (`ImageSource::Tsv`): one line per image, `ITEM<TAB>PATH` (the path is the rest of the
//!   line, trimmed), relative paths taken from the TSV file's folder; blank lines are skipped, a line
//!   without a tab is an error naming file and line; an item's images keep the file order; or
//! - a folder (`ImageSource::Folder`): files named `ITEM.EXT` or `ITEM_K.EXT` (K a non-negative
//!   integer, EXT `jpg`, `jpeg`, `png` or `webp` in any case), `ITEM.EXT` first, then by K numerically,
//!   ties by file name. A name is matched against the item tokens as a whole first, so an item token
//!   may contain `_`: with items `a` and `a_1`, `a_1.jpg` is item `a_1`'s image and `a_1_2.jpg` its
//!   second. Other files, hidden files (`.name`), sub-folders and names that are not UTF-8 are ignored.
//!
//! At most [`MAX_IMAGES_PER_ITEM`] images are kept per item, the first in that order; the rest are
//! counted in [`ImageList::dropped`]. Lines or files naming items that are not in the token list are
//! reported in [`ImageList::unknown`] (for a folder, the token is the file stem without an `_K` suffix),
//! not an error.
//!
//! **Reading** ([`load_image`]). JPEG, PNG and WebP, recognised by content (a misnamed file is read
//! as what it is), decoded by the `image` crate within limits ([`MAX_FILE_BYTES`], [`MAX_IMAGE_SIDE`]
//! pixels a side, [`MAX_DECODE_BYTES`] of decoder memory) so that a decompression bomb is an error.
//! Every failure is an error naming the path and the reason (missing file, unreadable, unsupported
//! format, corrupt or truncated data, too large); a decoder panic is caught and reported as corrupt
//! data. A JPEG file cut short is an error as in PIL (the `image` crate alone would fill it with grey).
//! EXIF orientation is not applied (neither PIL's `Image.open` nor transformers applies it).
//! [`load_all`] / [`load_items`] decode and preprocess in parallel (rayon) and list every image that
//! failed in [`Skipped`] instead of stopping; an item whose images all failed has none.
//!
//! **Preprocessing** ([`preprocess`]) follows transformers' PIL path step by step (transformers 4.x
//! `CLIPImageProcessor.preprocess`; 5.x `CLIPImageProcessorPil`, i.e. `PilBackend._preprocess`; both
//! call `transformers/image_transforms.py`), with the settings of a `preprocessor_config.json`
//! ([`ImageProcessorConfig`]):
//! 1. **RGB, 8 bits** (`convert_to_rgb`): grey is replicated into the three channels; an alpha
//!    channel is dropped without compositing ([`Alpha::Drop`]: PIL's `convert("RGB")`, transformers
//!    4.x) or composited onto white with PIL's `alpha_composite` integer arithmetic ([`Alpha::OnWhite`]:
//!    transformers 5.x). 16-bit PNGs are reduced as PIL opens them: RGB(A) and grey+alpha keep the
//!    high byte, 16-bit grey is clamped to 255 (PIL's `I;16` to `RGB` conversion, which makes most
//!    such images white).
//! 2. **Resize** (`get_resize_output_image_size`, then `PIL.Image.resize` on the 8-bit image): with
//!    `size = {"shortest_edge": N}` the short side becomes N and the long side `int(N * long / short)`
//!    (Python ints: the exact quotient rounded once to a double, then truncated; a square image becomes
//!    N x N); with `{"height": H, "width": W}` exactly W x H. [`resize_like_pil`] reproduces PIL's
//!    resampling (`libImaging/Resample.c`) bit for bit: two separable passes, a pass skipped when its
//!    size does not change. Per output pixel i of a pass from `in` to `out` pixels: `scale = in / out`,
//!    `filterscale = max(scale, 1)` (antialiasing when shrinking), `support = 2 * filterscale`
//!    (bicubic: Keys cubic, a = -0.5) or `1 * filterscale` (bilinear), `center = (i + 0.5) * scale`,
//!    source pixels `int(center - support + 0.5) .. int(center + support + 0.5)` clipped to the image,
//!    weights `filter((x - center + 0.5) / filterscale)` normalised to sum 1 in double precision, then
//!    fixed point with 22 fractional bits (`(int)(w * 2^22 ± 0.5)`), summed in integers from `2^21`
//!    and floored and clipped to 0..=255 after each pass. The passes run horizontal first, except
//!    that Pillow 13 runs the vertical one first when the height shrinks by more than twice as many
//!    pixels as the width ([`Pillow`]; with `shortest_edge` that happens for downscaled images more
//!    than about twice as tall as wide, and changes some pixels by up to ~12 levels).
//! 3. **Center crop** (`center_crop`, on the 8-bit image) to `crop_size` H x W:
//!    `top = (height - H) // 2`, `left = (width - W) // 2` (floor). Along a side shorter than the crop
//!    the image is placed at offset `ceil((H - height) / 2)` in a zero (black) canvas, so padded
//!    pixels come out as `(0 - mean) / std`, not 0.
//! 4. **Rescale** (`rescale`): `float32(float64(v) * rescale_factor)`.
//! 5. **Normalise** (`normalize`): `(x - mean[c]) / std[c]` in float32, mean and std rounded to
//!    float32.
//!
//! The output is float32 CHW, (3, crop_h, crop_w) ([`output_shape`] gives it for any settings). Only
//! the resized pixels inside the crop are computed (and the intermediate ones they need), which gives
//! the same values as resizing everything and cropping.
//!
//! **How close.** Given the same decoded 8-bit pixels the output equals transformers' bit for bit:
//! checked against transformers 4.49 (the fixture in `kernels-tests/fixtures/clip`, Pillow 13.0), 4.57
//! and 5.x with Pillow 12.3 and 13.0, on PNG, WebP, RGBA, grey and grey+alpha images of many sizes and
//! aspect ratios; the tests hold PIL outputs. What remains is JPEG decoding: the `image` crate's
//! decoder (zune-jpeg) upsamples chroma and rounds differently from PIL's libjpeg-turbo, which moves
//! pixels by up to 4 levels on photographs (Pillow's JPEG test images, CMYK included: mean 0.005 to
//! 0.4 levels after preprocessing; the fixture's b.jpg: 4 levels, mean 0.43) and more on synthetic
//! noise (up to 6 levels after preprocessing). Corrupt JPEG data that both decoders accept may come
//! out differently. PNG and WebP decode identically.
//!
//! Not reproduced: transformers 5.x's default `CLIPImageProcessor`, which is the torchvision backend
//! (its resize and fused normalisation differ slightly, and it pads a too-small image at
//! `floor((H - height) / 2)`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageError, ImageFormat, ImageReader, Limits, RgbImage};
use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Images kept per item.
pub const MAX_IMAGES_PER_ITEM: usize = 10;
/// File extensions (compared case-insensitively) of images in a folder source.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
/// Largest image side the decoder accepts, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Most memory the decoder may allocate for one image.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// Largest image file read.
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// Most values [`preprocess_file`] produces for one image (1 GiB of f32; only reachable without
/// center crop).
pub const MAX_OUTPUT_VALUES: usize = 1 << 28;
/// openai/clip-vit-base-patch32's `image_mean` (transformers' `OPENAI_CLIP_MEAN`).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// openai/clip-vit-base-patch32's `image_std` (transformers' `OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Fractional bits of PIL's 8-bit resampling coefficients (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 22;

fn data_err<T>(file: &Path, line: usize, msg: impl Into<String>) -> Result<T> {
    Err(Error::Data { file: file.display().to_string(), line, msg: msg.into() })
}

fn io_err(path: &Path, e: io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source: e }
}

// ---- settings -------------------------------------------------------------------------------

/// PIL resampling filters that [`resize_like_pil`] reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// PIL `BILINEAR` (code 2): the triangle filter, support 1.
    Bilinear,
    /// PIL `BICUBIC` (code 3, what CLIP uses): the Keys cubic with a = -0.5, support 2.
    Bicubic,
}

impl Resample {
    /// The filter for a PIL resampling code; an error names the code and PIL's name for it.
    pub fn from_pil(code: i64) -> std::result::Result<Resample, String> {
        match code {
            2 => Ok(Resample::Bilinear),
            3 => Ok(Resample::Bicubic),
            _ => {
                let names = ["NEAREST", "LANCZOS", "BILINEAR", "BICUBIC", "BOX", "HAMMING"];
                let name = usize::try_from(code).ok().and_then(|i| names.get(i)).map(|n| format!(" (PIL {n})")).unwrap_or_default();
                Err(format!("resample {code}{name} is not supported: use 2 (bilinear) or 3 (bicubic)"))
            }
        }
    }

    fn support(self) -> f64 {
        match self {
            Resample::Bilinear => 1.0,
            Resample::Bicubic => 2.0,
        }
    }

    /// PIL's `bilinear_filter` / `bicubic_filter`, operation for operation.
    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Resample::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// The resize target (`size` in `preprocessor_config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// `{"shortest_edge": N}` or `N`: the short side becomes N, the aspect ratio is kept.
    ShortestEdge(u32),
    /// `{"height": H, "width": W}`: exactly H x W.
    Exact { height: u32, width: u32 },
}

/// The center-crop size (`crop_size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropSize {
    pub height: u32,
    pub width: u32,
}

/// What happens to an alpha channel when an image is made RGB (not a `preprocessor_config.json` key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Alpha {
    /// Drop it, keeping the colour channels as they are: PIL's `convert("RGB")`, as transformers 4.x's
    /// `convert_to_rgb` does (transparent pixels show whatever colour they store, often black).
    #[default]
    Drop,
    /// Composite onto opaque white, as transformers 5.x's `convert_to_rgb` does (PIL
    /// `alpha_composite`, same integer rounding).
    OnWhite,
}

/// Which Pillow release's `Image.resize` to reproduce (not a `preprocessor_config.json` key). They
/// compute each pass the same way and differ only in which pass runs first, which changes some
/// pixels by a few levels. With `size = {"shortest_edge": N}` that happens only for downscaled
/// images more than about twice as tall as wide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pillow {
    /// Pillow 13 and later: the vertical pass first when the height shrinks by more pixels than twice
    /// the width does (`in_h - out_h > 0 && in_h - out_h > 2 * (in_w - out_w)`), else horizontal first.
    #[default]
    V13,
    /// Pillow 12 and earlier: horizontal first. (Pillow 12.3's `Image.resize` also runs the vertical
    /// pass first for an image more than 100 times taller than wide whose height shrinks; with
    /// `shortest_edge` that needs a height above [`MAX_IMAGE_SIDE`], so it is not reproduced.)
    V12,
}

impl Pillow {
    fn vertical_first(self, in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
        let (dw, dh) = (in_w as i64 - out_w as i64, in_h as i64 - out_h as i64);
        self == Pillow::V13 && dh > 0 && dh > 2 * dw
    }
}

/// Preprocessing settings: a Hugging Face `preprocessor_config.json` (keys as there; unknown keys and
/// `null` values ignored), plus [`Alpha`] and [`Pillow`]. `Default` is openai/clip-vit-base-patch32's.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub size: Size,
    pub resample: Resample,
    pub do_center_crop: bool,
    pub crop_size: CropSize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    /// Per channel (R, G, B), rounded to f32 as numpy does.
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// Read for completeness: images are always made 3-channel RGB, since the model needs that (with
    /// `false`, transformers would fail on or pass through non-RGB images).
    pub do_convert_rgb: bool,
    /// Not in the JSON file; [`Alpha::Drop`] unless set.
    pub alpha: Alpha,
    /// Not in the JSON file; [`Pillow::V13`] unless set.
    pub pillow: Pillow,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: Size::ShortestEdge(224),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: CropSize { height: 224, width: 224 },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN.map(|v| v as f32),
            image_std: OPENAI_CLIP_STD.map(|v| v as f32),
            do_convert_rgb: true,
            alpha: Alpha::Drop,
            pillow: Pillow::V13,
        }
    }
}

impl ImageProcessorConfig {
    /// Read a `preprocessor_config.json`; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        Self::parse(&text, path)
    }

    /// Parse the text of a `preprocessor_config.json`; `file` names it in errors.
    ///
    /// `size` is `{"shortest_edge": N}`, `N` (the same) or `{"height": H, "width": W}`; `crop_size` is
    /// `{"height": H, "width": W}` or `N` (N x N); `[H, W]` is accepted for both. `resample` is a PIL
    /// code, 2 or 3. `image_mean` / `image_std` are 3 numbers or one for all channels.
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).or_else(|e| data_err(file, 0, format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return data_err(file, 0, "expected a JSON object of image preprocessing settings");
        };
        let keys = Keys { map: &map, file };
        let d = Self::default();
        let size = match keys.get("size") {
            Some(v) => parse_size(v, false).or_else(|why| keys.bad("size", &why))?,
            None => d.size,
        };
        let crop_size = match keys.get("crop_size") {
            Some(v) => match parse_size(v, true).or_else(|why| keys.bad("crop_size", &why))? {
                Size::Exact { height, width } => CropSize { height, width },
                Size::ShortestEdge(_) => return keys.bad("crop_size", "expected {\"height\": H, \"width\": W} or an integer"),
            },
            None => d.crop_size,
        };
        let resample = match keys.get("resample") {
            Some(v) => match v.as_i64() {
                Some(code) => Resample::from_pil(code).or_else(|why| keys.bad("resample", &why))?,
                None => return keys.bad("resample", &format!("expected a PIL resampling code (2 or 3), found {v}")),
            },
            None => d.resample,
        };
        let rescale_factor = match keys.get("rescale_factor") {
            Some(v) => match v.as_f64() {
                Some(f) if f.is_finite() => f,
                _ => return keys.bad("rescale_factor", &format!("expected a number, found {v}")),
            },
            None => d.rescale_factor,
        };
        let image_std = keys.triple("image_std", d.image_std)?;
        if image_std.contains(&0.0) {
            return keys.bad("image_std", "a standard deviation of 0 would divide by zero");
        }
        Ok(ImageProcessorConfig {
            do_resize: keys.flag("do_resize", d.do_resize)?,
            size,
            resample,
            do_center_crop: keys.flag("do_center_crop", d.do_center_crop)?,
            crop_size,
            do_rescale: keys.flag("do_rescale", d.do_rescale)?,
            rescale_factor,
            do_normalize: keys.flag("do_normalize", d.do_normalize)?,
            image_mean: keys.triple("image_mean", d.image_mean)?,
            image_std,
            do_convert_rgb: keys.flag("do_convert_rgb", d.do_convert_rgb)?,
            alpha: d.alpha,
            pillow: d.pillow,
        })
    }
}

/// The keys of a settings file, with errors naming the file and the key.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    file: &'a Path,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn bad<T>(&self, key: &str, why: &str) -> Result<T> {
        data_err(self.file, 0, format!("\"{key}\": {why}"))
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().map_or_else(|| self.bad(key, &format!("expected true or false, found {v}")), Ok),
        }
    }

    fn triple(&self, key: &str, default: [f32; 3]) -> Result<[f32; 3]> {
        // numpy's float32 rounding of Python floats.
        let finite = |v: &Value| v.as_f64().filter(|f| f.is_finite()).map(|f| f as f32);
        let Some(v) = self.get(key) else { return Ok(default) };
        let values: Option<Vec<f32>> = match v {
            Value::Array(a) => a.iter().map(finite).collect(),
            _ => finite(v).map(|f| vec![f; 3]),
        };
        match values.as_deref() {
            Some(&[r, g, b]) => Ok([r, g, b]),
            _ => self.bad(key, &format!("expected 3 numbers (R, G, B), found {v}")),
        }
    }
}

/// A `size` / `crop_size` value; a bare integer means the shortest edge (`square == false`) or a
/// square (`square == true`), as transformers' `get_size_dict` reads it.
fn parse_size(v: &Value, square: bool) -> std::result::Result<Size, String> {
    let dim = |v: &Value| -> std::result::Result<u32, String> {
        match v.as_u64() {
            Some(n) if (1..=MAX_IMAGE_SIDE as u64).contains(&n) => Ok(n as u32),
            _ => Err(format!("expected an integer from 1 to {MAX_IMAGE_SIDE}, found {v}")),
        }
    };
    let expected = "expected {\"shortest_edge\": N}, {\"height\": H, \"width\": W} or an integer";
    match v {
        Value::Number(_) => {
            let n = dim(v)?;
            Ok(if square { Size::Exact { height: n, width: n } } else { Size::ShortestEdge(n) })
        }
        Value::Array(a) if a.len() == 2 => Ok(Size::Exact { height: dim(&a[0])?, width: dim(&a[1])? }),
        Value::Object(m) => {
            let set: Vec<&str> = m.iter().filter(|(_, v)| !v.is_null()).map(|(k, _)| k.as_str()).collect();
            match set.as_slice() {
                ["shortest_edge"] => Ok(Size::ShortestEdge(dim(&m["shortest_edge"])?)),
                ["height", "width"] | ["width", "height"] => Ok(Size::Exact { height: dim(&m["height"])?, width: dim(&m["width"])? }),
                _ => Err(format!("{expected}, found {v} (other size rules are not supported)")),
            }
        }
        _ => Err(format!("{expected}, found {v}")),
    }
}

// ---- preprocessing --------------------------------------------------------------------------

/// The size (width, height) an image of `width` x `height` is resized to, before the crop
/// (transformers' `get_resize_output_image_size`; see the module docs). An empty image stays empty.
pub fn resized_size(cfg: &ImageProcessorConfig, width: u32, height: u32) -> (u32, u32) {
    if !cfg.do_resize || width == 0 || height == 0 {
        return (width, height);
    }
    match cfg.size {
        Size::Exact { height, width } => (width, height),
        Size::ShortestEdge(n) => {
            let (short, long) = if width <= height { (width, height) } else { (height, width) };
            // Python: int(n * long / short); the product is exact in f64 and `/` rounds once.
            let new_long = (n as f64 * long as f64 / short as f64) as u32;
            if width <= height {
                (n, new_long)
            } else {
                (new_long, n)
            }
        }
    }
}

/// The shape [channels, height, width] of [`preprocess`]'s output for an image of `width` x `height`.
pub fn output_shape(cfg: &ImageProcessorConfig, width: u32, height: u32) -> [usize; 3] {
    if cfg.do_center_crop {
        [3, cfg.crop_size.height as usize, cfg.crop_size.width as usize]
    } else {
        let (w, h) = resized_size(cfg, width, height);
        [3, h as usize, w as usize]
    }
}

/// Preprocess one image into CLIP's input: float32, CHW, shape [`output_shape`] ((3, crop_h, crop_w)
/// with center crop), as transformers' PIL-based CLIP image processor computes it (module docs).
pub fn preprocess(img: &DynamicImage, cfg: &ImageProcessorConfig) -> Vec<f32> {
    let rgb = match img {
        DynamicImage::ImageRgb8(b) => Cow::Borrowed(b),
        _ => Cow::Owned(to_rgb_like_pil(img, cfg.alpha)),
    };
    let (rw, rh) = resized_size(cfg, rgb.width(), rgb.height());
    let [_, oh, ow] = output_shape(cfg, rgb.width(), rgb.height());
    // Which resized pixels survive the crop, and where they go.
    let (sx, dx, nx) = crop_axis(rw, ow as u32);
    let (sy, dy, ny) = crop_axis(rh, oh as u32);
    let window = resize_window(&rgb, rw, rh, cfg.resample, cfg.pillow, sx..sx + nx, sy..sy + ny);
    let table = value_table(cfg);
    let plane = oh * ow;
    // Padding is a zero (black) pixel before rescaling and normalising.
    let mut out: Vec<f32> = table.iter().flat_map(|t| std::iter::repeat_n(t[0], plane)).collect();
    for (y, row) in window.rows().enumerate() {
        for (x, p) in row.enumerate() {
            let at = (dy as usize + y) * ow + dx as usize + x;
            for c in 0..3 {
                out[c * plane + at] = table[c][p[c] as usize];
            }
        }
    }
    out
}

/// Center crop along one side of `len` pixels to `crop` (transformers' `center_crop`): the first
/// source pixel kept, where it lands in the output, and how many are kept.
fn crop_axis(len: u32, crop: u32) -> (u32, u32, u32) {
    if len >= crop {
        ((len - crop) / 2, 0, crop)
    } else {
        (0, (crop - len).div_ceil(2), len)
    }
}

/// The output value of each 8-bit level, per channel: rescale in f64 then f32, normalise in f32.
fn value_table(cfg: &ImageProcessorConfig) -> [[f32; 256]; 3] {
    let mut table = [[0f32; 256]; 3];
    for (c, t) in table.iter_mut().enumerate() {
        for (v, out) in t.iter_mut().enumerate() {
            let x = if cfg.do_rescale { (v as f64 * cfg.rescale_factor) as f32 } else { v as f32 };
            *out = if cfg.do_normalize { (x - cfg.image_mean[c]) / cfg.image_std[c] } else { x };
        }
    }
    table
}

/// An image as 8-bit RGB, converted the way PIL opens and converts it (module docs, step 1).
pub fn to_rgb_like_pil(img: &DynamicImage, alpha: Alpha) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let with_alpha = |v: u8, a: u8| match alpha {
        Alpha::Drop => v,
        Alpha::OnWhite => over_white(v, a),
    };
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(b) => b.clone(),
        DynamicImage::ImageLuma8(b) => RgbImage::from_fn(w, h, |x, y| image::Rgb([b.get_pixel(x, y)[0]; 3])),
        DynamicImage::ImageLumaA8(b) => RgbImage::from_fn(w, h, |x, y| {
            let [v, a] = b.get_pixel(x, y).0;
            image::Rgb([with_alpha(v, a); 3])
        }),
        DynamicImage::ImageRgba8(b) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, bl, a] = b.get_pixel(x, y).0;
            image::Rgb([with_alpha(r, a), with_alpha(g, a), with_alpha(bl, a)])
        }),
        DynamicImage::ImageLuma16(b) => RgbImage::from_fn(w, h, |x, y| image::Rgb([b.get_pixel(x, y)[0].min(255) as u8; 3])),
        DynamicImage::ImageLumaA16(b) => RgbImage::from_fn(w, h, |x, y| {
            let [v, a] = b.get_pixel(x, y).0;
            image::Rgb([with_alpha(hi(v), hi(a)); 3])
        }),
        DynamicImage::ImageRgb16(b) => RgbImage::from_fn(w, h, |x, y| image::Rgb(b.get_pixel(x, y).0.map(hi))),
        DynamicImage::ImageRgba16(b) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, bl, a] = b.get_pixel(x, y).0.map(hi);
            image::Rgb([with_alpha(r, a), with_alpha(g, a), with_alpha(bl, a)])
        }),
        // Float images (not produced by the JPEG, PNG or WebP decoders).
        other => other.to_rgb8(),
    }
}

/// One channel of PIL's `alpha_composite` of `(v, a)` over opaque white (`AlphaComposite.c`: with
/// the destination alpha 255, `outa255 = 255 * 255` and `coef1 = a * 128`).
fn over_white(v: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let coef1 = a as u32 * 128;
    let coef2 = 255 * 128 - coef1;
    let tmp = v as u32 * coef1 + 255 * coef2 + (0x80 << 7);
    ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
}

/// Resize 8-bit RGB to `width` x `height` exactly as PIL's `Image.resize(..., resample=filter)`
/// does in the given Pillow release (`libImaging/Resample.c`, 8 bits per channel; details in the
/// module docs).
pub fn resize_like_pil(src: &RgbImage, width: u32, height: u32, filter: Resample, pillow: Pillow) -> RgbImage {
    resize_window(src, width, height, filter, pillow, 0..width, 0..height)
}

/// The pixels `cols` x `rows` of [`resize_like_pil`]`(src, out_w, out_h, filter, pillow)`, computing
/// only those and the intermediate pixels they need: every output pixel of a pass depends only on its
/// own taps, so this equals resizing everything and cropping.
fn resize_window(src: &RgbImage, out_w: u32, out_h: u32, filter: Resample, pillow: Pillow, cols: Range<u32>, rows: Range<u32>) -> RgbImage {
    let (w, h) = src.dimensions();
    if cols.is_empty() || rows.is_empty() || w == 0 || h == 0 {
        return RgbImage::new(cols.len() as u32, rows.len() as u32);
    }
    // PIL skips a pass whose size does not change (`need_horizontal` / `need_vertical`).
    let horizontal = (out_w != w).then(|| taps(w, out_w, filter, cols.clone()));
    let vertical = (out_h != h).then(|| taps(h, out_h, filter, rows.clone()));
    if pillow.vertical_first(w, h, out_w, out_h) {
        let src_cols = horizontal.as_deref().map_or(cols, span);
        let tmp = match &vertical {
            Some(t) => vertical_pass(src, t, 0, src_cols.clone()),
            None => crop(src, src_cols.clone(), rows),
        };
        match &horizontal {
            Some(t) => horizontal_pass(&tmp, t, src_cols.start, 0..tmp.height()),
            None => tmp,
        }
    } else {
        let src_rows = vertical.as_deref().map_or(rows, span);
        let tmp = match &horizontal {
            Some(t) => horizontal_pass(src, t, 0, src_rows.clone()),
            None => crop(src, cols, src_rows.clone()),
        };
        match &vertical {
            Some(t) => vertical_pass(&tmp, t, src_rows.start, 0..tmp.width()),
            None => tmp,
        }
    }
}

fn crop(src: &RgbImage, cols: Range<u32>, rows: Range<u32>) -> RgbImage {
    image::imageops::crop_imm(src, cols.start, rows.start, cols.len() as u32, rows.len() as u32).to_image()
}

/// The source pixels a pass's taps read.
fn span(taps: &[(usize, Vec<i32>)]) -> Range<u32> {
    let first = taps.iter().map(|(s, _)| *s).min().unwrap_or(0);
    let end = taps.iter().map(|(s, k)| s + k.len()).max().unwrap_or(0);
    first as u32..end as u32
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the outputs `outs` of a pass from
/// `in_size` to `out_size` pixels: per output, its first source pixel and fixed-point weights.
fn taps(in_size: u32, out_size: u32, filter: Resample, outs: Range<u32>) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    let one = (1u32 << PRECISION_BITS) as f64;
    outs.map(|xx| {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) truncates toward zero; both ends are then clipped to the image.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let mut k: Vec<f64> = (xmin..xmax).map(|x| filter.eval((x as f64 - center + 0.5) * ss)).collect();
        let mut ww = 0.0;
        for w in &k {
            ww += w;
        }
        if ww != 0.0 {
            k.iter_mut().for_each(|w| *w /= ww);
        }
        let fixed = k.iter().map(|&w| if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 }).collect();
        (xmin as usize, fixed)
    })
    .collect()
}

/// Round a fixed-point sum to 8 bits as PIL's `clip8` does (floor, then clip to 0..=255).
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The horizontal pass over the rows `rows` of `src`, one output column per tap list; `col0` is the
/// source column of `src`'s first column.
fn horizontal_pass(src: &RgbImage, taps: &[(usize, Vec<i32>)], col0: u32, rows: Range<u32>) -> RgbImage {
    let stride = src.width() as usize * 3;
    let raw = src.as_raw();
    let mut out = RgbImage::new(taps.len() as u32, rows.len() as u32);
    for (dst, y) in out.rows_mut().zip(rows) {
        let row = &raw[y as usize * stride..(y as usize + 1) * stride];
        for (p, (start, k)) in dst.zip(taps) {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (j, &w) in k.iter().enumerate() {
                let x = (start + j - col0 as usize) * 3;
                for c in 0..3 {
                    acc[c] += row[x + c] as i64 * w as i64;
                }
            }
            p.0 = acc.map(clip8);
        }
    }
    out
}

/// The vertical pass over the columns `cols` of `src`, one output row per tap list; `row0` is the
/// source row of `src`'s first row.
fn vertical_pass(src: &RgbImage, taps: &[(usize, Vec<i32>)], row0: u32, cols: Range<u32>) -> RgbImage {
    let stride = src.width() as usize * 3;
    let (c0, c1) = (cols.start as usize * 3, cols.end as usize * 3);
    let raw = src.as_raw();
    let mut out = RgbImage::new(cols.len() as u32, taps.len() as u32);
    for (dst, (start, k)) in out.chunks_exact_mut(c1 - c0).zip(taps) {
        let mut acc = vec![1i64 << (PRECISION_BITS - 1); c1 - c0];
        for (j, &w) in k.iter().enumerate() {
            let y = start + j - row0 as usize;
            for (a, &s) in acc.iter_mut().zip(&raw[y * stride + c0..y * stride + c1]) {
                *a += s as i64 * w as i64;
            }
        }
        for (d, a) in dst.iter_mut().zip(acc) {
            *d = clip8(a);
        }
    }
    out
}

// ---- reading --------------------------------------------------------------------------------

/// Why an image could not be read: the file itself, or its content.
enum Failure {
    Io(io::Error),
    Bad(String),
}

impl Failure {
    fn reason(&self) -> String {
        match self {
            Failure::Io(e) if e.kind() == io::ErrorKind::NotFound => format!("missing file ({})", one_line(e)),
            Failure::Io(e) => format!("cannot read the file ({})", one_line(e)),
            Failure::Bad(msg) => msg.clone(),
        }
    }

    fn into_error(self, path: &Path) -> Error {
        match self {
            Failure::Io(e) => io_err(path, e),
            Failure::Bad(msg) => Error::Data { file: path.display().to_string(), line: 0, msg },
        }
    }
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        _ => "image",
    }
}

/// Decoder messages can span lines; a reason is one line.
fn one_line(msg: impl std::fmt::Display) -> String {
    msg.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether JPEG data has its end-of-image marker (FF D9) after its last start-of-scan marker (FF DA).
/// Neither can occur inside entropy-coded data, so a file cut short lacks it even when an embedded
/// thumbnail has its own. The `image` crate's JPEG decoder fills a cut-off image with grey and
/// succeeds; PIL reports "image file is truncated", as this check does. Without a scan it says yes
/// and leaves the error to the decoder.
fn jpeg_complete(data: &[u8]) -> bool {
    match data.windows(2).rposition(|w| w == [0xFF, 0xDA]) {
        Some(sos) => data[sos..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => true,
    }
}

fn decode_file(path: &Path) -> std::result::Result<DynamicImage, Failure> {
    let size = std::fs::metadata(path).map_err(Failure::Io)?.len();
    if size > MAX_FILE_BYTES {
        return Err(Failure::Bad(format!("file too large ({size} bytes; at most {} MiB)", MAX_FILE_BYTES >> 20)));
    }
    let data = std::fs::read(path).map_err(Failure::Io)?;
    let mut reader = ImageReader::new(io::Cursor::new(&data[..]));
    // The content decides; the extension is the fallback when the content is not recognised.
    if let Ok(f) = ImageFormat::from_path(path) {
        reader.set_format(f);
    }
    let mut reader = reader.with_guessed_format().map_err(Failure::Io)?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP)) => f,
        Some(f) => return Err(Failure::Bad(format!("unsupported image format {f:?} (JPEG, PNG and WebP are read)"))),
        None => return Err(Failure::Bad("not a JPEG, PNG or WebP image (unrecognised content)".into())),
    };
    let name = format_name(format);
    if format == ImageFormat::Jpeg && !jpeg_complete(&data) {
        return Err(Failure::Bad("truncated JPEG file (no end-of-image marker after the last scan)".into()));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let img = match catch_unwind(AssertUnwindSafe(|| reader.decode())) {
        Err(_) => return Err(Failure::Bad(format!("corrupt {name} data (the decoder panicked)"))),
        Ok(Err(e)) => {
            return Err(Failure::Bad(match e {
                ImageError::Decoding(e) => format!("corrupt or truncated {name} data ({})", one_line(e)),
                ImageError::Limits(e) => format!(
                    "image too large to decode ({}; at most {MAX_IMAGE_SIDE} pixels a side and {} MiB)",
                    one_line(e),
                    MAX_DECODE_BYTES >> 20
                ),
                ImageError::Unsupported(e) => format!("unsupported {name} variant ({})", one_line(e)),
                ImageError::IoError(e) if e.kind() == io::ErrorKind::UnexpectedEof => format!("truncated {name} file ({})", one_line(e)),
                e => format!("cannot decode the {name} image ({})", one_line(e)),
            }))
        }
        Ok(Ok(img)) => img,
    };
    if img.width() == 0 || img.height() == 0 {
        return Err(Failure::Bad(format!("the {name} image has no pixels ({}x{})", img.width(), img.height())));
    }
    Ok(img)
}

/// Read a JPEG, PNG or WebP image (recognised by content). Errors name the path and the reason:
/// [`Error::Io`] when the file cannot be opened or read, [`Error::Data`] for unsupported formats,
/// corrupt or truncated data and images past the decoder limits.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    decode_file(path).map_err(|f| f.into_error(path))
}

fn preprocess_path(path: &Path, cfg: &ImageProcessorConfig) -> std::result::Result<Vec<f32>, Failure> {
    let img = decode_file(path)?;
    let shape = output_shape(cfg, img.width(), img.height());
    if shape.iter().product::<usize>() > MAX_OUTPUT_VALUES {
        return Err(Failure::Bad(format!("preprocessing would give a {shape:?} array (more than {MAX_OUTPUT_VALUES} values)")));
    }
    Ok(preprocess(&img, cfg))
}

/// [`load_image`] then [`preprocess`].
pub fn preprocess_file(path: &Path, cfg: &ImageProcessorConfig) -> Result<Vec<f32>> {
    preprocess_path(path, cfg).map_err(|f| f.into_error(path))
}

// ---- which images belong to which item ------------------------------------------------------

/// Where an item's images are listed (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// `ITEM<TAB>PATH` lines.
    Tsv(PathBuf),
    /// `ITEM.EXT` / `ITEM_K.EXT` files.
    Folder(PathBuf),
}

impl ImageSource {
    /// A folder is a [`ImageSource::Folder`], anything else a [`ImageSource::Tsv`]; a missing path is
    /// an error.
    pub fn parse(spec: &Path) -> Result<ImageSource> {
        let meta = std::fs::metadata(spec).map_err(|e| io_err(spec, e))?;
        Ok(if meta.is_dir() { ImageSource::Folder(spec.to_path_buf()) } else { ImageSource::Tsv(spec.to_path_buf()) })
    }
}

/// Each item's image files, as [`list_images`] found them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageList {
    /// The item tokens, in the order given.
    pub tokens: Vec<String>,
    /// Per item (same order), its image paths, at most [`MAX_IMAGES_PER_ITEM`].
    pub per_item: Vec<Vec<PathBuf>>,
    /// Images past [`MAX_IMAGES_PER_ITEM`] for their item.
    pub dropped: usize,
    /// (token, path) of lines or files naming items that are not in `tokens`.
    pub unknown: Vec<(String, PathBuf)>,
}

impl ImageList {
    fn new(tokens: &[String]) -> ImageList {
        ImageList { tokens: tokens.to_vec(), per_item: vec![Vec::new(); tokens.len()], dropped: 0, unknown: Vec::new() }
    }

    fn push(&mut self, item: usize, path: PathBuf) {
        if self.per_item[item].len() < MAX_IMAGES_PER_ITEM {
            self.per_item[item].push(path);
        } else {
            self.dropped += 1;
        }
    }

    /// Images kept, over all items.
    pub fn images(&self) -> usize {
        self.per_item.iter().map(Vec::len).sum()
    }

    /// Items with at least one image.
    pub fn items_with_images(&self) -> usize {
        self.per_item.iter().filter(|p| !p.is_empty()).count()
    }
}

/// List each item's images from `src` (module docs), in the order of `item_tokens`.
pub fn list_images(src: &ImageSource, item_tokens: &[String]) -> Result<ImageList> {
    let index: HashMap<&str, usize> = item_tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    match src {
        ImageSource::Tsv(file) => list_tsv(file, item_tokens, &index),
        ImageSource::Folder(dir) => list_folder(dir, item_tokens, &index),
    }
}

fn list_tsv(file: &Path, tokens: &[String], index: &HashMap<&str, usize>) -> Result<ImageList> {
    let text = std::fs::read_to_string(file).map_err(|e| io_err(file, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let dir = file.parent().unwrap_or(Path::new(""));
    let mut list = ImageList::new(tokens);
    for (k, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let Some((tok, path)) = line.split_once('\t') else {
            return data_err(file, k + 1, "expected ITEM<TAB>PATH (the item token, a tab, the image path)");
        };
        let (tok, path) = (tok.trim(), path.trim());
        if tok.is_empty() {
            return data_err(file, k + 1, "empty item token before the tab");
        }
        if path.is_empty() {
            return data_err(file, k + 1, format!("empty image path for item \"{tok}\""));
        }
        let path = if Path::new(path).is_absolute() { PathBuf::from(path) } else { dir.join(path) };
        match index.get(tok) {
            Some(&i) => list.push(i, path),
            None => list.unknown.push((tok.to_string(), path)),
        }
    }
    Ok(list)
}

/// A folder file's stem: (item, its `_K` number or `None` for `ITEM.EXT`), or the token it names
/// when that item is unknown.
fn match_stem(stem: &str, index: &HashMap<&str, usize>) -> std::result::Result<(usize, Option<u64>), String> {
    if let Some(&i) = index.get(stem) {
        return Ok((i, None));
    }
    if let Some((base, k)) = stem.rsplit_once('_') {
        if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) {
            if let (Some(&i), Ok(k)) = (index.get(base), k.parse::<u64>()) {
                return Ok((i, Some(k)));
            }
            return Err(base.to_string());
        }
    }
    Err(stem.to_string())
}

fn list_folder(dir: &Path, tokens: &[String], index: &HashMap<&str, usize>) -> Result<ImageList> {
    let mut found: Vec<(usize, Option<u64>, String, PathBuf)> = Vec::new();
    let mut unknown = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        // A broken symbolic link is listed (and later skipped as missing); folders are not.
        if path.is_dir() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        let Some((stem, ext)) = name.rsplit_once('.') else { continue };
        if name.starts_with('.') || !IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()) {
            continue;
        }
        match match_stem(stem, index) {
            Ok((item, k)) => found.push((item, k, name.clone(), path)),
            Err(token) => unknown.push((token, path)),
        }
    }
    // `None` (ITEM.EXT) sorts before every `Some(k)`.
    found.sort();
    unknown.sort_by(|a, b| a.1.cmp(&b.1));
    let mut list = ImageList::new(tokens);
    for (item, _, _, path) in found {
        list.push(item, path);
    }
    list.unknown = unknown;
    Ok(list)
}

// ---- loading everything ---------------------------------------------------------------------

/// An image that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub item: String,
    pub path: PathBuf,
    /// What went wrong (missing file, unsupported format, corrupt or truncated data, too large ...).
    pub reason: String,
}

/// Read and preprocess every listed image (in parallel): per item, per kept image, the
/// [`preprocess`] output; images that fail are left out and listed in the second value, in list
/// order. Holds every image in memory (3 x 224 x 224 f32 = 588 KiB each); see [`load_items`].
pub fn load_all(list: &ImageList, cfg: &ImageProcessorConfig) -> (Vec<Vec<Vec<f32>>>, Vec<Skipped>) {
    load_items(list, 0..list.per_item.len(), cfg)
}

/// [`load_all`] for the items `items` only (`result[i]` is item `items.start + i`), to process a
/// large list in pieces.
pub fn load_items(list: &ImageList, items: Range<usize>, cfg: &ImageProcessorConfig) -> (Vec<Vec<Vec<f32>>>, Vec<Skipped>) {
    let jobs: Vec<(usize, &Path)> = items.clone().flat_map(|i| list.per_item[i].iter().map(move |p| (i, p.as_path()))).collect();
    let results: Vec<std::result::Result<Vec<f32>, Failure>> = jobs.par_iter().map(|&(_, path)| preprocess_path(path, cfg)).collect();
    let mut out = vec![Vec::new(); items.len()];
    let mut skipped = Vec::new();
    for ((i, path), r) in jobs.into_iter().zip(results) {
        match r {
            Ok(v) => out[i - items.start].push(v),
            Err(f) => skipped.push(Skipped { item: list.tokens[i].clone(), path: path.to_path_buf(), reason: f.reason() }),
        }
    }
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, LumaA, Rgb, Rgba};

    /// A fresh folder under the system temp dir for one test.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("msm4sr-images-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn cfg_json(json: &str) -> Result<ImageProcessorConfig> {
        ImageProcessorConfig::parse(json, Path::new("preprocessor_config.json"))
    }

    /// The 8-bit grey test pattern the PIL references below were made from, as RGB.
    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([((x * 73 + y * 151 + (x * y) % 7 * 29) % 256) as u8; 3]))
    }

    fn channel0(img: &RgbImage) -> Vec<u8> {
        img.pixels().map(|p| p[0]).collect()
    }

    fn tokens(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn config_defaults_and_size_forms() {
        let d = ImageProcessorConfig::default();
        assert_eq!(d.size, Size::ShortestEdge(224));
        assert_eq!(d.crop_size, CropSize { height: 224, width: 224 });
        assert_eq!(d.resample, Resample::Bicubic);
        assert_eq!(d.image_mean, [0.48145466f64 as f32, 0.4578275f64 as f32, 0.40821073f64 as f32]);
        assert_eq!(d.rescale_factor, 1.0 / 255.0);
        assert_eq!((d.alpha, d.pillow), (Alpha::Drop, Pillow::V13));
        // openai/clip-vit-base-patch32's file (transformers 4.x keys), unknown keys ignored.
        let clip = r#"{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true, "do_convert_rgb": true,
            "do_normalize": true, "do_rescale": true, "do_resize": true, "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": 224}}"#;
        assert_eq!(cfg_json(clip).unwrap(), d);
        // The older integer forms; null means the default.
        let old = cfg_json(r#"{"size": 336, "crop_size": 336, "resample": 2, "image_std": null, "do_center_crop": false}"#).unwrap();
        assert_eq!(old.size, Size::ShortestEdge(336));
        assert_eq!(old.crop_size, CropSize { height: 336, width: 336 });
        assert_eq!(old.resample, Resample::Bilinear);
        assert_eq!(old.image_std, d.image_std);
        assert!(!old.do_center_crop);
        let exact = cfg_json(r#"{"size": {"height": 256, "width": 192}, "crop_size": [200, 100], "image_mean": 0.5}"#).unwrap();
        assert_eq!(exact.size, Size::Exact { height: 256, width: 192 });
        assert_eq!(exact.crop_size, CropSize { height: 200, width: 100 });
        assert_eq!(exact.image_mean, [0.5; 3]);
        assert_eq!(cfg_json("{}").unwrap(), d);
    }

    #[test]
    fn config_errors_name_the_key_and_value() {
        let err = |json: &str| cfg_json(json).unwrap_err().to_string();
        let e = err(r#"{"resample": 1}"#);
        assert!(e.starts_with("preprocessor_config.json: \"resample\": resample 1 (PIL LANCZOS) is not supported"), "{e}");
        assert!(err(r#"{"resample": 0}"#).contains("resample 0 (PIL NEAREST)"));
        assert!(err(r#"{"resample": "bicubic"}"#).contains("expected a PIL resampling code"));
        assert!(err(r#"{"image_mean": [0.5, 0.5]}"#).contains("\"image_mean\": expected 3 numbers"));
        assert!(err(r#"{"image_std": [0.5, 0, 0.5]}"#).contains("divide by zero"));
        assert!(err(r#"{"do_resize": "yes"}"#).contains("\"do_resize\": expected true or false, found \"yes\""));
        assert!(err(r#"{"size": {"shortest_edge": 224, "longest_edge": 1333}}"#).contains("other size rules are not supported"));
        assert!(err(r#"{"size": 0}"#).contains("\"size\": expected an integer from 1 to 16384, found 0"));
        assert!(err(r#"{"crop_size": {"shortest_edge": 224}}"#).contains("\"crop_size\""));
        assert!(err("[1, 2]").contains("expected a JSON object"));
        assert!(err("{\"size\": 224,").contains("not valid JSON"));
        let missing = ImageProcessorConfig::load(Path::new("/nonexistent/preprocessor_config.json")).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }), "{missing}");
    }

    #[test]
    fn resize_rule_and_crop_offsets() {
        let d = ImageProcessorConfig::default();
        // int(224 * long / short), the short side to 224.
        assert_eq!(resized_size(&d, 300, 200), (336, 224));
        assert_eq!(resized_size(&d, 99, 180), (224, 407)); // 407.27
        assert_eq!(resized_size(&d, 157, 233), (224, 332)); // 332.43
        assert_eq!(resized_size(&d, 233, 157), (332, 224));
        assert_eq!(resized_size(&d, 500, 500), (224, 224));
        assert_eq!(resized_size(&d, 1, 16384), (224, 3670016));
        let exact = ImageProcessorConfig { size: Size::Exact { height: 10, width: 300 }, ..d.clone() };
        assert_eq!(resized_size(&exact, 99, 180), (300, 10));
        assert_eq!(resized_size(&ImageProcessorConfig { do_resize: false, ..d.clone() }, 99, 180), (99, 180));
        // Crop: floor((len - crop) / 2); a short side lands at ceil((crop - len) / 2).
        assert_eq!(crop_axis(336, 224), (56, 0, 224));
        assert_eq!(crop_axis(407, 224), (91, 0, 224));
        assert_eq!(crop_axis(332, 224), (54, 0, 224));
        assert_eq!(crop_axis(224, 224), (0, 0, 224));
        assert_eq!(crop_axis(5, 8), (0, 2, 5));
        assert_eq!(crop_axis(4, 8), (0, 2, 4));
        assert_eq!(output_shape(&d, 99, 180), [3, 224, 224]);
        assert_eq!(output_shape(&ImageProcessorConfig { do_center_crop: false, ..d }, 99, 180), [3, 407, 224]);
    }

    #[test]
    fn constant_colour_gives_exact_normalised_values() {
        let cfg = ImageProcessorConfig::default();
        let colour = [10u8, 128, 250];
        let want: Vec<f32> = (0..3).map(|c| ((colour[c] as f64 * (1.0 / 255.0)) as f32 - cfg.image_mean[c]) / cfg.image_std[c]).collect();
        for (w, h) in [(300, 200), (99, 180), (157, 233), (1000, 700), (224, 224), (3, 2)] {
            let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, Rgb(colour)));
            for pillow in [Pillow::V13, Pillow::V12] {
                for resample in [Resample::Bicubic, Resample::Bilinear] {
                    let out = preprocess(&img, &ImageProcessorConfig { pillow, resample, ..cfg.clone() });
                    assert_eq!(out.len(), 3 * 224 * 224);
                    for (c, plane) in out.chunks(224 * 224).enumerate() {
                        assert!(plane.iter().all(|&v| v == want[c]), "{w}x{h} channel {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn grey_and_alpha_convert_like_pil() {
        let grey = DynamicImage::ImageLuma8(GrayImage::from_fn(3, 2, |x, y| Luma([(x * 50 + y * 7) as u8])));
        let rgb = to_rgb_like_pil(&grey, Alpha::Drop);
        assert!(rgb.enumerate_pixels().all(|(x, y, p)| p.0 == [(x * 50 + y * 7) as u8; 3]));
        // PIL's convert("RGB") drops alpha without compositing; transparent pixels keep their colour.
        let rgba = DynamicImage::ImageRgba8(ImageBuffer::from_fn(2, 1, |x, _| Rgba([200, 100, 0, [0, 128][x as usize]])));
        assert_eq!(to_rgb_like_pil(&rgba, Alpha::Drop).as_raw(), &vec![200, 100, 0, 200, 100, 0]);
        // transformers 5: alpha_composite onto white. a = 0 gives white, a = 255 the colour.
        assert_eq!(to_rgb_like_pil(&rgba, Alpha::OnWhite).as_raw(), &vec![255, 255, 255, 227, 177, 127]);
        let la = DynamicImage::ImageLumaA8(ImageBuffer::from_fn(1, 1, |_, _| LumaA([90, 255])));
        assert_eq!(to_rgb_like_pil(&la, Alpha::OnWhite).as_raw(), &vec![90, 90, 90]);
        // PIL's integer alpha_composite equals the rounded blend (numpy's half-to-even) for every pair.
        for a in 0..=255u8 {
            for v in 0..=255u8 {
                let af = a as f64 / 255.0;
                let blend = (af * v as f64 + (1.0 - af) * 255.0).round_ties_even();
                assert_eq!(over_white(v, a) as f64, blend, "v {v} a {a}");
            }
        }
        // 16 bits as PIL opens them: RGB keeps the high byte, grey clamps to 255.
        let rgb16 = DynamicImage::ImageRgb16(ImageBuffer::from_fn(1, 1, |_, _| Rgb([0x1280, 0x00ff, 0xfeff])));
        assert_eq!(to_rgb_like_pil(&rgb16, Alpha::Drop).as_raw(), &vec![0x12, 0x00, 0xfe]);
        let grey16 = DynamicImage::ImageLuma16(ImageBuffer::from_fn(3, 1, |x, _| Luma([[0x00ff, 0x0100, 7][x as usize]])));
        assert_eq!(to_rgb_like_pil(&grey16, Alpha::Drop).as_raw(), &vec![255, 255, 255, 255, 255, 255, 7, 7, 7]);
    }

    /// Outputs of PIL's `Image.resize` on `pattern` (made with Pillow 13.0 and 12.3; channel 0).
    #[test]
    fn resize_matches_pil_bit_for_bit() {
        #[rustfmt::skip]
        let bicubic_13: [u8; 63] = [114,142,130,140,185,146,160,133,78,179,150,157,85,138,133,179,166,121,149,141,214,122,128,178,94,115,108,187,133,125,193,141,96,130,153,130,186,97,148,129,167,144,131,123,135,144,115,141,103,102,79,69,111,102,96,49,165,181,82,155,127,183,118];
        #[rustfmt::skip]
        let bicubic_12: [u8; 63] = [114,142,129,139,185,146,160,133,77,179,150,157,84,138,133,178,166,121,148,141,213,122,127,178,95,115,108,187,133,124,193,141,96,130,152,130,186,98,149,129,167,144,131,123,135,144,115,141,104,102,80,70,111,102,96,49,165,181,82,155,127,183,118];
        #[rustfmt::skip]
        let bilinear_13: [u8; 63] = [118,135,135,144,178,148,160,130,93,171,150,154,99,143,134,166,164,123,143,139,203,126,133,172,107,116,117,184,130,129,181,141,105,126,153,131,173,107,145,128,160,140,131,129,133,138,120,141,109,104,86,74,111,104,98,55,158,169,88,150,126,168,114];
        #[rustfmt::skip]
        let bilinear_12: [u8; 63] = [118,136,135,144,178,148,160,131,93,171,150,155,99,143,134,166,164,123,143,139,203,126,134,171,107,116,117,184,130,129,181,141,105,126,154,131,173,107,144,129,160,140,131,128,133,139,120,141,109,104,85,73,111,103,98,55,158,168,88,150,126,168,114];
        #[rustfmt::skip]
        let upscale: [u8; 84] = [0,0,19,55,92,132,171,213,217,136,50,17,47,56,91,128,134,129,150,199,211,135,52,19,138,156,209,247,200,121,112,173,200,133,58,29,85,110,177,230,182,96,85,150,188,144,89,68,38,60,121,170,132,62,63,136,185,159,120,107,150,146,140,124,75,21,43,143,209,178,129,113,220,201,155,99,44,0,33,148,223,188,132,114];
        // 11x23 -> 7x9: the height shrinks by 14 > 2 * 4, so Pillow 13 runs the vertical pass first.
        let src = pattern(11, 23);
        assert_eq!(channel0(&resize_like_pil(&src, 7, 9, Resample::Bicubic, Pillow::V13)), bicubic_13);
        assert_eq!(channel0(&resize_like_pil(&src, 7, 9, Resample::Bicubic, Pillow::V12)), bicubic_12);
        assert_eq!(channel0(&resize_like_pil(&src, 7, 9, Resample::Bilinear, Pillow::V13)), bilinear_13);
        assert_eq!(channel0(&resize_like_pil(&src, 7, 9, Resample::Bilinear, Pillow::V12)), bilinear_12);
        for pillow in [Pillow::V13, Pillow::V12] {
            assert_eq!(channel0(&resize_like_pil(&pattern(5, 4), 12, 7, Resample::Bicubic, pillow)), upscale);
            // Same size: a copy.
            assert_eq!(resize_like_pil(&src, 11, 23, Resample::Bicubic, pillow), src);
        }
    }

    #[test]
    fn window_equals_full_resize_then_crop() {
        for (w, h, ow, oh) in [(40, 31, 17, 60), (13, 90, 30, 25), (64, 64, 64, 20), (50, 20, 50, 77), (9, 9, 31, 5)] {
            let src = RgbImage::from_fn(w, h, |x, y| Rgb([(x * 31 + y * 17) as u8, (x * y) as u8, (x ^ y) as u8 * 9]));
            for pillow in [Pillow::V13, Pillow::V12] {
                let full = resize_like_pil(&src, ow, oh, Resample::Bicubic, pillow);
                for (cols, rows) in [(0..ow, 0..oh), (3..ow - 2, 1..oh / 2), (ow / 2..ow / 2 + 1, oh - 1..oh)] {
                    let part = resize_window(&src, ow, oh, Resample::Bicubic, pillow, cols.clone(), rows.clone());
                    assert_eq!(part, crop(&full, cols, rows), "{w}x{h} -> {ow}x{oh}");
                }
            }
        }
    }

    /// transformers' CLIP image processor (PIL backend) with size {"shortest_edge": 5}, crop 12 x 4,
    /// no rescale or normalisation, on `pattern(11, 23)`: resized to 5 x 10, cropped at left 0, and
    /// padded by one black row above and below (made with transformers 5.x / Pillow 13.0 and
    /// transformers 4.57 / Pillow 12.3; channel 0).
    #[test]
    fn preprocess_matches_transformers_resize_crop_and_padding() {
        #[rustfmt::skip]
        let pillow_13: [f32; 48] = [0.,0.,0.,0.,124.,141.,141.,177.,103.,125.,159.,122.,152.,180.,141.,154.,109.,169.,109.,105.,126.,159.,120.,121.,141.,166.,142.,117.,149.,121.,138.,149.,118.,119.,142.,113.,105.,66.,95.,107.,179.,129.,141.,154.,0.,0.,0.,0.];
        #[rustfmt::skip]
        let pillow_12: [f32; 48] = [0.,0.,0.,0.,124.,141.,140.,177.,102.,125.,159.,122.,152.,180.,141.,153.,109.,169.,109.,105.,126.,159.,120.,122.,141.,166.,142.,117.,149.,121.,138.,149.,118.,119.,142.,114.,105.,66.,95.,107.,179.,129.,141.,155.,0.,0.,0.,0.];
        let img = DynamicImage::ImageRgb8(pattern(11, 23));
        for (pillow, want) in [(Pillow::V13, pillow_13), (Pillow::V12, pillow_12)] {
            let cfg = ImageProcessorConfig {
                size: Size::ShortestEdge(5),
                crop_size: CropSize { height: 12, width: 4 },
                do_rescale: false,
                do_normalize: false,
                pillow,
                ..Default::default()
            };
            assert_eq!(output_shape(&cfg, 11, 23), [3, 12, 4]);
            let out = preprocess(&img, &cfg);
            for plane in out.chunks(48) {
                assert_eq!(plane, want);
            }
        }
        // Normalised, the padding is (0 - mean) / std.
        let cfg = ImageProcessorConfig { size: Size::ShortestEdge(5), crop_size: CropSize { height: 12, width: 4 }, ..Default::default() };
        let out = preprocess(&img, &cfg);
        for c in 0..3 {
            assert_eq!(out[c * 48], (0.0 - cfg.image_mean[c]) / cfg.image_std[c]);
        }
    }

    #[test]
    fn tsv_listing() {
        let dir = temp_dir("tsv");
        let sub = dir.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        let tsv = sub.join("images.tsv");
        let mut text = String::from("\u{feff}a\tone.jpg\n\n  \nb\t/abs/two.png\nzzz\tx.jpg\r\na\t pics/three.jpg \r\n");
        for k in 0..12 {
            text += &format!("c\tc{k}.jpg\n");
        }
        std::fs::write(&tsv, text).unwrap();
        let src = ImageSource::parse(&tsv).unwrap();
        assert_eq!(src, ImageSource::Tsv(tsv.clone()));
        let list = list_images(&src, &tokens(&["a", "b", "c", "d"])).unwrap();
        assert_eq!(list.per_item[0], vec![sub.join("one.jpg"), sub.join("pics/three.jpg")]);
        assert_eq!(list.per_item[1], vec![PathBuf::from("/abs/two.png")]);
        assert_eq!(list.per_item[2], (0..10).map(|k| sub.join(format!("c{k}.jpg"))).collect::<Vec<_>>());
        assert!(list.per_item[3].is_empty());
        assert_eq!((list.dropped, list.images(), list.items_with_images()), (2, 13, 3));
        assert_eq!(list.unknown, vec![("zzz".to_string(), sub.join("x.jpg"))]);
        // A line without a tab names file and line.
        std::fs::write(&tsv, "a\tone.jpg\n\na one.jpg\n").unwrap();
        let e = list_images(&src, &tokens(&["a"])).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:3: expected ITEM<TAB>PATH", tsv.display())), "{e}");
        std::fs::write(&tsv, "a\t \n").unwrap();
        assert!(list_images(&src, &tokens(&["a"])).unwrap_err().to_string().contains(":1: empty image path for item \"a\""));
        assert!(ImageSource::parse(&dir.join("missing.tsv")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn folder_listing() {
        let dir = temp_dir("folder");
        let mut names: Vec<&str> =
            "a.jpg a_2.png a_10.JPG a_1.jpeg a_01.webp a_x.jpg b_x.png b_x_1.png c_1.webp c_1_2.jpg c_3.png zzz.jpg q_3.png readme.txt .hidden.jpg a_4.gif noext"
                .split(' ')
                .collect();
        let d: Vec<String> = (0..12).map(|k| format!("d_{k}.jpg")).collect();
        names.extend(d.iter().map(String::as_str));
        for n in &names {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        std::fs::create_dir(dir.join("a_3.jpg")).unwrap();
        assert_eq!(ImageSource::parse(&dir).unwrap(), ImageSource::Folder(dir.clone()));
        let list = list_images(&ImageSource::Folder(dir.clone()), &tokens(&["a", "b_x", "c", "c_1", "d", "e"])).unwrap();
        let paths = |ns: &[&str]| ns.iter().map(|n| dir.join(n)).collect::<Vec<_>>();
        // ITEM.EXT first, then K numerically (01 and 1 tie, broken by name).
        assert_eq!(list.per_item[0], paths(&["a.jpg", "a_01.webp", "a_1.jpeg", "a_2.png", "a_10.JPG"]));
        // A token with "_" in it; the longest known token wins.
        assert_eq!(list.per_item[1], paths(&["b_x.png", "b_x_1.png"]));
        assert_eq!(list.per_item[2], paths(&["c_3.png"]));
        assert_eq!(list.per_item[3], paths(&["c_1.webp", "c_1_2.jpg"]));
        assert_eq!(list.per_item[4], (0..10).map(|k| dir.join(format!("d_{k}.jpg"))).collect::<Vec<_>>());
        assert!(list.per_item[5].is_empty());
        assert_eq!(list.dropped, 2);
        let unknown: Vec<(&str, PathBuf)> = list.unknown.iter().map(|(t, p)| (t.as_str(), p.clone())).collect();
        assert_eq!(unknown, vec![("a_x", dir.join("a_x.jpg")), ("q", dir.join("q_3.png")), ("zzz", dir.join("zzz.jpg"))]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A PNG header claiming `w` x `h` RGB pixels (no pixel data).
    fn png_header(w: u32, h: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in bytes {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                }
            }
            !c
        }
        let chunk = |kind: &[u8], data: &[u8]| {
            let body = [kind, data].concat();
            [&(data.len() as u32).to_be_bytes()[..], &body, &crc32(&body).to_be_bytes()].concat()
        };
        let ihdr = [&w.to_be_bytes()[..], &h.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
        [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &ihdr), &chunk(b"IDAT", &[0x78, 0x9c, 3, 0, 0, 0, 0, 1]), &chunk(b"IEND", &[])].concat()
    }

    #[test]
    fn bad_images_are_skipped_with_a_reason() {
        let dir = temp_dir("bad");
        let photo = RgbImage::from_fn(30, 20, |x, y| Rgb([(x * 8) as u8, (y * 12) as u8, 128]));
        photo.save(dir.join("good.png")).unwrap();
        photo.save(dir.join("good.jpg")).unwrap();
        photo.save(dir.join("good.webp")).unwrap();
        let jpg = std::fs::read(dir.join("good.jpg")).unwrap();
        // Without its end-of-image marker: the `image` crate alone would decode it.
        std::fs::write(dir.join("cut.jpg"), &jpg[..jpg.len() - 2]).unwrap();
        let png = std::fs::read(dir.join("good.png")).unwrap();
        std::fs::write(dir.join("cut.png"), &png[..png.len() / 2]).unwrap();
        std::fs::write(dir.join("empty.jpg"), b"").unwrap();
        std::fs::write(dir.join("text.png"), b"hello").unwrap();
        std::fs::write(dir.join("gif.jpg"), b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
        std::fs::write(dir.join("wide.png"), png_header(20000, 10)).unwrap();
        std::fs::write(dir.join("huge.png"), png_header(16000, 16000)).unwrap();
        // A misnamed PNG is read as what it is.
        std::fs::write(dir.join("misnamed.jpg"), &png).unwrap();
        std::fs::create_dir(dir.join("folder.png")).unwrap();
        let tsv = dir.join("images.tsv");
        let lines = [
            ("good", "good.png"),
            ("good", "good.jpg"),
            ("good", "misnamed.jpg"),
            ("bad", "missing.jpg"),
            ("bad", "cut.jpg"),
            ("bad", "cut.png"),
            ("bad", "empty.jpg"),
            ("bad", "text.png"),
            ("bad", "gif.jpg"),
            ("bad", "wide.png"),
            ("bad", "huge.png"),
            ("mixed", "good.webp"),
            ("mixed", "folder.png"),
        ];
        std::fs::write(&tsv, lines.iter().map(|(i, p)| format!("{i}\t{p}\n")).collect::<String>()).unwrap();
        let list = list_images(&ImageSource::Tsv(tsv), &tokens(&["good", "bad", "mixed"])).unwrap();
        let cfg = ImageProcessorConfig { size: Size::ShortestEdge(8), crop_size: CropSize { height: 8, width: 8 }, ..Default::default() };
        let (images, skipped) = load_all(&list, &cfg);
        assert_eq!(images.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 0, 1]);
        assert!(images.iter().flatten().all(|v| v.len() == 3 * 8 * 8));
        // The PNG and the WebP (lossless) decode to the same pixels.
        assert_eq!(images[0][0], images[2][0]);
        assert_eq!(images[0][0], images[0][2]);
        let reasons: Vec<(&str, &str)> =
            skipped.iter().map(|s| (s.path.file_name().unwrap().to_str().unwrap(), s.reason.as_str())).collect();
        let expect = [
            ("missing.jpg", "missing file"),
            ("cut.jpg", "truncated JPEG file"),
            ("cut.png", "truncated PNG file"),
            ("empty.jpg", "corrupt or truncated JPEG data"),
            ("text.png", "corrupt or truncated PNG data"),
            ("gif.jpg", "unsupported image format Gif"),
            ("wide.png", "image too large to decode"),
            ("huge.png", "image too large to decode"),
            ("folder.png", "cannot read the file"),
        ];
        assert_eq!(reasons.len(), expect.len(), "{reasons:?}");
        for ((name, reason), (want_name, want_reason)) in reasons.iter().zip(expect) {
            assert_eq!(*name, want_name);
            assert!(reason.starts_with(want_reason), "{name}: {reason}");
            assert!(!reason.contains('\n'));
        }
        assert!(skipped.iter().all(|s| s.item == if s.path.ends_with("folder.png") { "mixed" } else { "bad" }));
        // load_image: the file's own errors are I/O errors, bad content is a data error naming the file.
        assert!(matches!(load_image(&dir.join("missing.jpg")), Err(Error::Io { .. })));
        let e = load_image(&dir.join("cut.jpg")).unwrap_err().to_string();
        assert_eq!(e, format!("{}: truncated JPEG file (no end-of-image marker after the last scan)", dir.join("cut.jpg").display()));
        assert!(preprocess_file(&dir.join("good.jpg"), &cfg).is_ok());
        let (part, _) = load_items(&list, 2..3, &cfg);
        assert_eq!(part, vec![images[2].clone()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `kernels-tests/fixtures/clip` (tools/make_clip_fixtures.py): transformers 4.49's
    /// CLIPImageProcessor with Pillow 13.0 on its test images and its `preprocessor_config.json`.
    /// PNG and WebP decode as in PIL, so those match bit for bit; the JPEGs differ by the decoders
    /// (module docs), by at most `levels` here (in 1/255 steps: |difference| * std * 255; measured
    /// with zune-jpeg 0.5.15: b.jpg 4 levels, mean 0.43; f.jpg 1 level, mean 0.005).
    #[test]
    fn matches_transformers_fixture() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/fixtures/clip");
        let bytes = std::fs::read(dir.join("ref.safetensors")).unwrap();
        let refs = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let cfg = ImageProcessorConfig::load(&dir.join("model/preprocessor_config.json")).unwrap();
        assert_eq!(cfg, ImageProcessorConfig::default());
        for (name, levels) in [("a.png", 0.0), ("b.jpg", 5.0), ("c.png", 0.0), ("d.png", 0.0), ("e.webp", 0.0), ("f.jpg", 2.0)] {
            let view = refs.tensor(&format!("pixel_values.{name}")).unwrap();
            assert_eq!(view.shape(), [3, 224, 224]);
            let want: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let got = preprocess_file(&dir.join("images").join(name), &cfg).unwrap();
            let worst = got
                .iter()
                .zip(&want)
                .enumerate()
                .map(|(i, (g, w))| (g - w).abs() * cfg.image_std[i / (224 * 224)] * 255.0)
                .fold(0f32, f32::max);
            let mean = got.iter().zip(&want).enumerate().map(|(i, (g, w))| ((g - w).abs() * cfg.image_std[i / (224 * 224)] * 255.0) as f64);
            let mean = mean.sum::<f64>() / got.len() as f64;
            let max_abs = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            eprintln!("{name}: max |difference| {max_abs:.3e} (normalised) = {worst:.3} levels, mean {mean:.3} levels");
            if levels == 0.0 {
                assert!(got == want, "{name}: {worst} levels off");
            } else {
                assert!(worst <= levels, "{name}: {worst} levels off");
            }
        }
    }
}
