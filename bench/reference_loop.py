"""The reference: one training step written the way diffusers' `examples/dreambooth/train_dreambooth.py` does it.

Every step tokenizes the prompts, encodes the images with the VAE, runs the frozen text encoder, then the
UNet with its loss; fp32 master weights, autocast around the UNet under mixed precision (the script casts the
frozen VAE and text encoder to that dtype), plain `torch.optim.AdamW`, gradient clipping, the prior-preservation
loss on the second half of the batch (without it when `prior_loss_weight` is 0). SDXL (a UNet with `text_time`
added conditioning) as `train_dreambooth_lora_sdxl.py` conditions it: both encoders' penultimate hidden states side by
side, the last encoder's pooled output and the uncropped size as time ids. One difference in the reference's favour:
images arrive decoded, as tensors, where the script decodes and transforms them with PIL in its data loader.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from style_factory.config import TrainConfig
from style_factory.families.base import Components

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ReferenceLoop:
    """UNet fine-tuning with the text encoder frozen, as `train_dreambooth.py --with_prior_preservation` runs it."""

    def __init__(self, models: Components, cfg: TrainConfig, device: torch.device):
        self.models, self.cfg, self.device = models, cfg, device
        weight_dtype = PRECISIONS.get(cfg.mixed_precision, torch.float32)
        models.vae.requires_grad_(False).to(device, weight_dtype)
        self.text_encoders = [encoder.requires_grad_(False).to(device, weight_dtype)
                              for encoder in models.text_encoders.values()]
        self.tokenizers = list(models.tokenizers.values())
        self.sdxl = models.unet.config.addition_embed_type == "text_time"
        models.unet.requires_grad_(True).to(device)  # fp32 master weights
        self.autocast = (torch.autocast(device.type, dtype=weight_dtype) if cfg.mixed_precision != "no"
                         else nullcontext())
        self.optimizer = torch.optim.AdamW(models.unet.parameters(), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)

    def step(self, pixels: torch.Tensor, prompts: list[str]) -> float:
        """One step on instance images followed by as many class images (and their prompts)."""
        models, device = self.models, self.device
        pixels = pixels.to(device, models.vae.dtype)
        latents = models.vae.encode(pixels).latent_dist.sample() * models.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, models.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  device=device)
        noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
        text, added = self.encode_prompts(prompts, pixels.shape[-2:])
        with self.autocast:
            prediction = models.unet(noisy, timesteps, text, added_cond_kwargs=added, return_dict=False)[0]
        if self.cfg.prior_loss_weight > 0:
            prediction, prior_prediction = prediction.chunk(2)
            target, prior_target = noise.chunk(2)
            loss = (F.mse_loss(prediction.float(), target.float())
                    + self.cfg.prior_loss_weight * F.mse_loss(prior_prediction.float(), prior_target.float()))
        else:
            loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.unet.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def encode_prompts(self, prompts: list[str], size) -> tuple[torch.Tensor, dict | None]:
        """The text encoders' output for `prompts`, tokenized and encoded every step; SDXL's added conditioning."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            if self.sdxl:
                output = encoder(ids, output_hidden_states=True, return_dict=False)
                hidden.append(output[-1][-2])
                pooled = output[0]
            else:
                hidden.append(encoder(ids)[0])
        if not self.sdxl:
            return hidden[0], None
        time_ids = torch.tensor([[*size, 0, 0, *size]] * len(prompts), device=self.device, dtype=pooled.dtype)
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}
