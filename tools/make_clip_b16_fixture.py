#!/usr/bin/env python3
"""A second, vision-only CLIP fixture in another layout: kernels-tests/fixtures/clip/model-b16/.

The main fixture (tools/make_clip_fixtures.py) has the ViT-B/32 geometry and QuickGELU. This one
checks that the geometry and the activation are read from config.json: 224 px images in 16 px
patches (196 patches + class token, as ViT-B/16 and, at 14 px, ViT-L/14), hidden_act "gelu" in the
vision tower, hidden 24, MLP 48, 2 layers, 4 heads, projection 8; a text tower with a 1000-word
vocabulary (only the vision tower is compared; the Rust test borrows the main fixture's
tokenizer.json). Weights: torch.manual_seed(1) initialisation with the class and position
embeddings at std 0.5 and the attention / MLP weights scaled up (so they matter), stored as float16;
the reference `image_embeds_f64` (ref_b16.safetensors) comes from the model reloaded in float64 on
the main fixture's pixel values (`pixel_values.NAME` of ref.safetensors, images in ref.json order).

Usage (the environment of tools/make_clip_fixtures.py): python tools/make_clip_b16_fixture.py
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch
from transformers import CLIPConfig, CLIPModel

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "kernels-tests/fixtures/clip"


def main():
    out = FIX / "model-b16"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=77, eos_token_id=49407, hidden_act="quick_gelu"),
        vision_config=dict(image_size=224, patch_size=16, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, hidden_act="gelu"),
        projection_dim=8,
    )
    m = CLIPModel(cfg).eval()
    with torch.no_grad():
        emb = m.vision_model.embeddings
        emb.class_embedding.normal_(0, 0.5)
        emb.position_embedding.weight.normal_(0, 0.5)
        emb.patch_embedding.weight.mul_(2.0)
        for layer in m.vision_model.encoder.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.out_proj):
                lin.weight.mul_(5.0)
            for lin in (layer.mlp.fc1, layer.mlp.fc2):
                lin.weight.mul_(3.0)
            for ln in (layer.layer_norm1, layer.layer_norm2):
                ln.weight.mul_(torch.empty_like(ln.weight).uniform_(0.5, 1.5))
                ln.bias.normal_(0, 0.1)
    m.half().save_pretrained(out, safe_serialization=True)
    shutil.copy(FIX / "model/preprocessor_config.json", out / "preprocessor_config.json")
    ref = json.loads((FIX / "ref.json").read_text())
    px = load_file(str(FIX / "ref.safetensors"))
    m64 = CLIPModel.from_pretrained(out, torch_dtype=torch.float64, attn_implementation="eager").eval()
    pixels = torch.stack([torch.from_numpy(px[f"pixel_values.{n}"]).double() for n in ref["images"]])
    with torch.no_grad():
        e = m64.get_image_features(pixel_values=pixels)
    save_torch({"image_embeds_f64": e.contiguous()}, str(FIX / "ref_b16.safetensors"))
    print("wrote", out, "and ref_b16.safetensors:", tuple(e.shape))


if __name__ == "__main__":
    main()
