//! The image processor's settings: Hugging Face `preprocessor_config.json` read into
//! [`ImageProcessorConfig`] (resize, crop, rescale, normalize; PIL's resampling filters).

use std::path::Path;

use serde_json::{Map, Value};

use crate::Result;

use super::*;

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

    pub(super) fn support(self) -> f64 {
        match self {
            Resample::Bilinear => 1.0,
            Resample::Bicubic => 2.0,
        }
    }

    /// PIL's `bilinear_filter` / `bicubic_filter`, operation for operation.
    pub(super) fn eval(self, x: f64) -> f64 {
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
    pub(super) fn vertical_first(self, in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
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
