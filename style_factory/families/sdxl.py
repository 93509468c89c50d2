"""Stable Diffusion XL (stabilityai/stable-diffusion-xl-base-1.0 and its fine-tunes), 1024 px.

What differs from SD 1.x:
- two text encoders, CLIP ViT-L (`text_encoder`) and OpenCLIP bigG with a projection (`text_encoder_2`); the UNet
  attends to both encoders' penultimate hidden states side by side;
- micro-conditioning: the UNet also takes the second encoder's pooled projection and six "time ids" per image,
  (original height, width, crop top, left, target height, width), built here from each training image's real
  source size and crop offset, which curation records;
- exports: kohya's own SDXL LoRA names (`lora_unet_<SGM path>`, `lora_te1_`, `lora_te2_`) and textual-inversion
  files holding one tensor per encoder (`clip_l`, `clip_g`), the form A1111 and ComfyUI load for SDXL.
The SDXL VAE overflows in float16; this project always encodes and caches latents in float32 (the loop checks that
they are finite), and the pipeline upcasts it to decode (`force_upcast` in the VAE config).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from style_factory.data import ImageGeometry
from style_factory.families.base import CLIP_VOCAB_SIZE, SD_SCHEDULE, Components, Conditioning, Family, clip_tokenizer
from style_factory.families.ldm_names import clip_state, open_clip_state
from style_factory.families.sd1 import TINY_VAE
from style_factory.families.sdxl_names import sgm_unet_name

# SDXL-shaped at toy size: two CLIP encoders (the second with a projection), text_time added conditioning.
TINY_SDXL_TEXT = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                      pad_token_id=49407)
TINY_SDXL_PROJECTION = 32
TINY_SDXL_TIME_EMBED = 8
TINY_SDXL_UNET = dict(  # SDXL's block layout (2 resnets per down block: kohya's SGM names index by it), toy widths
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2 * TINY_SDXL_TEXT["hidden_size"], attention_head_dim=(2, 4, 6), norm_num_groups=16,
    use_linear_projection=True, transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time",
    addition_time_embed_dim=TINY_SDXL_TIME_EMBED,
    projection_class_embeddings_input_dim=TINY_SDXL_PROJECTION + 6 * TINY_SDXL_TIME_EMBED,
)


class SDXL(Family):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    pipeline_class_name = "StableDiffusionXLPipeline"
    controlnet_pipeline_class = StableDiffusionXLControlNetPipeline
    text_encoder_classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    tokenizer_names = ("tokenizer", "tokenizer_2")
    default_resolution = 1024
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    embedding_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    tiny_preset = "tiny-sdxl"
    single_file_text = {"text_encoder": ("conditioner.embedders.0.", clip_state),
                        "text_encoder_2": ("conditioner.embedders.1.", open_clip_state)}

    def pipeline_extras(self) -> dict:
        return {"add_watermarker": False}

    def build_tiny(self, seed: int = 0) -> StableDiffusionXLPipeline:
        torch.manual_seed(seed)
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**TINY_VAE, force_upcast=True, scaling_factor=0.13025),
            text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT,
                                                                      projection_dim=TINY_SDXL_PROJECTION)),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
            unet=UNet2DConditionModel(**TINY_SDXL_UNET), scheduler=DDIMScheduler(**SD_SCHEDULE),
            **self.pipeline_extras(),
        )

    def encode_text(self, tokenizer, text_encoder, prompts: list[str], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The penultimate hidden states (as StableDiffusionXLPipeline.encode_prompt takes them), and the pooled
        projection of an encoder that has one."""
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        output = text_encoder(ids, output_hidden_states=True)
        return output.hidden_states[-2], getattr(output, "text_embeds", None)

    def denoise(self, models: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, geometry: ImageGeometry | None = None) -> torch.Tensor:
        if geometry is None:  # no source images (e.g. generated ones): as the pipeline samples, uncropped
            size = tuple(s * 2 ** (len(models.vae.config.block_out_channels) - 1) for s in noisy.shape[-2:])
            time_ids = torch.tensor([[*size, 0, 0, *size]] * len(noisy))
        else:
            time_ids = torch.from_numpy(time_ids_of(geometry))
        added = {"text_embeds": conditioning.pooled,
                 "time_ids": time_ids.to(noisy.device, conditioning.hidden_states.dtype)}
        return models.unet(noisy, timesteps, conditioning.hidden_states, added_cond_kwargs=added).sample

    def kohya_module_name(self, component: str, path: str) -> str:
        return sgm_unet_name(path) if component == "unet" else super().kohya_module_name(component, path)

    def single_file_unet_name(self, unet: UNet2DConditionModel, path: str) -> str:
        return sgm_unet_name(path)


def time_ids_of(geometry: ImageGeometry) -> np.ndarray:
    """(B, 6) float32: original (h, w), crop (top, left), target (h, w): SDXL's `add_time_ids` order."""
    return np.concatenate([geometry.original_sizes, geometry.crops_top_left, geometry.target_sizes],
                          axis=1).astype(np.float32)
