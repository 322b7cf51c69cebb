//! Preprocessing exactly as transformers' PIL-based `CLIPImageProcessor`: RGB conversion, PIL's
//! fixed-point resampling, center crop, rescale and normalize.

use std::borrow::Cow;
use std::ops::Range;

use image::{DynamicImage, RgbImage};

use super::*;

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
pub(super) fn crop_axis(len: u32, crop: u32) -> (u32, u32, u32) {
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
pub(super) fn over_white(v: u8, a: u8) -> u8 {
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
pub(super) fn resize_window(
    src: &RgbImage,
    out_w: u32,
    out_h: u32,
    filter: Resample,
    pillow: Pillow,
    cols: Range<u32>,
    rows: Range<u32>,
) -> RgbImage {
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

pub(super) fn crop(src: &RgbImage, cols: Range<u32>, rows: Range<u32>) -> RgbImage {
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
