//! Tests of image listing, reading and preprocessing.

use super::preprocess::{crop, crop_axis, over_white, resize_window};
use super::*;
use image::{GrayImage, ImageBuffer, Luma, LumaA, Rgb, RgbImage, Rgba};

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
    let reasons: Vec<(&str, &str)> = skipped.iter().map(|s| (s.path.file_name().unwrap().to_str().unwrap(), s.reason.as_str())).collect();
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
