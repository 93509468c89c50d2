"""Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5 and its fine-tunes): one CLIP ViT-L text encoder, the UNet
conditioned on its last hidden state, epsilon prediction, 512 px. The base class's hooks are this family's."""
from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel

from style_factory.families.base import CLIP_VOCAB_SIZE, SD_SCHEDULE, Family, clip_tokenizer

# The tiny architecture, shared by the random `tiny` preset and the trained `tiny-pretrained` model:
# 64 px images, 4x16x16 latents, attention at 8x8 and 4x4 (at 16x16 it would cost most of the step).
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), norm_num_groups=16,
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=32, norm_num_groups=16,
)
TINY_TEXT_ENCODER = dict(
    vocab_size=CLIP_VOCAB_SIZE, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


class SD1(Family):
    name = "sd1"
    pipeline_class = StableDiffusionPipeline
    pipeline_class_name = "StableDiffusionPipeline"
    controlnet_pipeline_class = StableDiffusionControlNetPipeline  # SD 2.x's too
    text_encoder_classes = {"text_encoder": CLIPTextModel}
    default_resolution = 512
    linear_projection = False  # SD 2.x has the same pipeline class; its UNet alone projects attention linearly
    tiny_preset = "tiny"
    # the preset's parts (TINY_VAE is every SD preset's)
    tiny_unet = TINY_UNET
    tiny_text_encoder = TINY_TEXT_ENCODER
    tiny_pad_token = "<|endoftext|>"
    tiny_prediction_type = "epsilon"

    @classmethod
    def matches(cls, model_index: dict, unet_config: dict) -> bool:
        return (super().matches(model_index, unet_config)
                and unet_config.get("use_linear_projection", False) == cls.linear_projection)

    def build_tiny(self, seed: int = 0) -> StableDiffusionPipeline:
        torch.manual_seed(seed)
        return StableDiffusionPipeline(
            vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**self.tiny_text_encoder)),
            tokenizer=clip_tokenizer(pad_token=self.tiny_pad_token), unet=UNet2DConditionModel(**self.tiny_unet),
            scheduler=DDIMScheduler(**SD_SCHEDULE, prediction_type=self.tiny_prediction_type),
            **self.pipeline_extras(),
        )
