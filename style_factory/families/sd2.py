"""Stable Diffusion 2.x (stabilityai/stable-diffusion-2-1 at 768 px, v-prediction; -base at 512 px, epsilon): SD 1.x's
hooks with an OpenCLIP ViT-H text encoder and linear attention projections. The prediction type is not a fact of
the family: the shared loop reads it from the base model's scheduler config (the preset's is v-prediction)."""
from __future__ import annotations

from style_factory.families.ldm_names import open_clip_state
from style_factory.families.sd1 import SD1, TINY_TEXT_ENCODER, TINY_UNET


class SD2(SD1):
    name = "sd2"
    default_resolution = 768
    linear_projection = True
    tiny_preset = "tiny-sd2"
    # diffusers' SD 2.x encoder is OpenCLIP ViT-H less its last layer (SD 2.x never used it); the file holds what is there
    single_file_text = {"text_encoder": ("cond_stage_model.", open_clip_state)}
    # SD 2.x-shaped at toy size: linear projections, per-block head counts, a GELU text encoder padding with "!"
    tiny_unet = {**TINY_UNET, "use_linear_projection": True, "attention_head_dim": (2, 4, 6)}
    tiny_text_encoder = {**TINY_TEXT_ENCODER, "hidden_act": "gelu"}
    tiny_pad_token = "!"
    tiny_prediction_type = "v_prediction"
