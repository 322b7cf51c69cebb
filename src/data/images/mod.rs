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

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageError, ImageFormat, ImageReader, Limits};
use rayon::prelude::*;

use crate::{Error, Result};

mod preprocess;
mod settings;
#[cfg(test)]
mod tests;

pub use preprocess::*;
pub use settings::*;
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
