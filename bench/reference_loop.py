"""The reference: one training step written the way diffusers' `examples/dreambooth/train_dreambooth.py` does it.

Every step tokenizes the prompts, encodes the images with the VAE, runs the frozen text encoder, then the
UNet with its loss; fp32 master weights, autocast around the UNet under mixed precision (the script casts the
frozen VAE and text encoder to that dtype), plain `torch.optim.AdamW`, gradient clipping, the prior-preservation
loss on the second half of the batch. One difference in the reference's favour: images arrive decoded, as
tensors, where the script decodes and transforms them with PIL in its data loader.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.families.base import Components

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ReferenceLoop:
    """UNet fine-tuning with the text encoder frozen, as `train_dreambooth.py --with_prior_preservation` runs it."""

    def __init__(self, models: Components, cfg: TrainConfig, device: torch.device):
        self.models, self.cfg, self.device = models, cfg, device
        weight_dtype = PRECISIONS.get(cfg.mixed_precision, torch.float32)
        models.vae.requires_grad_(False).to(device, weight_dtype)
        self.text_encoder = models.text_encoders["text_encoder"].requires_grad_(False).to(device, weight_dtype)
        self.tokenizer = models.tokenizers["tokenizer"]
        models.unet.requires_grad_(True).to(device)  # fp32 master weights
        self.autocast = (torch.autocast(device.type, dtype=weight_dtype) if cfg.mixed_precision != "no"
                         else nullcontext())
        self.optimizer = torch.optim.AdamW(models.unet.parameters(), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)

    def step(self, pixels: torch.Tensor, prompts: list[str]) -> float:
        """One step on instance images followed by as many class images (and their prompts)."""
        models, device = self.models, self.device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        pixels = pixels.to(device, models.vae.dtype)
        latents = models.vae.encode(pixels).latent_dist.sample() * models.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, models.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  device=device)
        noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
        text = self.text_encoder(ids)[0]
        with self.autocast:
            prediction = models.unet(noisy, timesteps, text, return_dict=False)[0]
        prediction, prior_prediction = prediction.chunk(2)
        target, prior_target = noise.chunk(2)
        loss = (F.mse_loss(prediction.float(), target.float())
                + self.cfg.prior_loss_weight * F.mse_loss(prior_prediction.float(), prior_target.float()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.unet.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
