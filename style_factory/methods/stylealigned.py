"""StyleAligned (Hertz et al., CVPR 2024; google/style-aligned): zero-shot, nothing trains.

Every image of a batch is generated together with a reference, and each target's self-attention (every `attn1` of
the UNet, on any family) also attends to the reference's keys and values, after AdaIN moves its queries and keys to
the reference's statistics. The reference is one of (`reference`):
- `inverted` (default): a real StyleRef image; its latent is DDIM-inverted with its caption through the family's
  pipeline, and at every sampling step the reference row is overwritten with the inverted latent of that step;
- `generated`: the paper's first mode, a prompts-only set: the reference is the first image the set generates, from
  `reference_prompt` (default: the reference image's caption and the style's descriptor) and `reference_seed`.
  It attends to itself only, so every set of the model shares the same reference.

With `control: canny | depth` the set also follows a structure map through a ControlNet (the paper's third
application): the map is computed once, offline, from `control_image` resized to the run's resolution (Canny
edges, or a configured depth model's depth: style_factory/control.py), every target gets its residual at
`control_scale`, and the reference row a zero residual, so the reference is denoised as without ControlNet. The
family's ControlNet pipeline (its `controlnet_pipeline_class`) shares the base pipeline's components.

The "model" is the base model plus that reference: a folder with the reference image, its prompt, the options,
(inverted) the trajectory for `inversion_steps`, and (control) the structure map `control.png` and the content's
Canny edges `control_edges.png`, which evaluation scores the set's `edge_alignment` against.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDIMInverseScheduler, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from style_factory.config import ConfigPath, StyleConfig, TrainConfig
from style_factory.control import CONTROL_EDGES, CONTROL_MAP, canny_map, depth_map, zero_reference_residuals
from style_factory.data import StyleData
from style_factory.families.base import Family
from style_factory.methods.base import Method


class StyleAlignedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shared_score_scale: float = Field(1.0, gt=0)  # s; < 1 (e.g. 0.5) weakens a famous reference
    shared_score_shift: float = 0.0  # beta; log 2 for style transfer from a real image
    adain_queries: bool = True
    adain_keys: bool = True
    inversion_steps: int = Field(50, ge=1)
    inversion_guidance_scale: float = Field(2.0, ge=0)  # the paper inverts with CFG 2
    reference_index: int = Field(0, ge=0)  # which StyleRef image (in curated order) is the reference
    reference: Literal["inverted", "generated"] = "inverted"  # a real image inverted, or the set's first image
    reference_prompt: str | None = None  # generated: None = the reference image's caption, then the descriptor
    reference_seed: int = 0  # generated: the seed of the reference's noise
    control: Literal["none", "canny", "depth"] = "none"  # a structure map every target follows, through a ControlNet
    controlnet: Annotated[str | None, ConfigPath(model=True)] = None  # its hub id or local diffusers folder
    control_image: Annotated[str | None, ConfigPath()] = None  # the content image the map is computed from
    control_scale: float = Field(0.8, ge=0)  # the targets' controlnet_conditioning_scale (the paper: depth at 0.8)
    canny_low: int = Field(100, ge=0, le=255)  # Canny's hysteresis thresholds
    canny_high: int = Field(200, ge=0, le=255)
    depth_model: Annotated[str | None, ConfigPath(model=True)] = None  # depth: a transformers depth-estimation model

    @model_validator(mode="after")
    def _control_complete(self) -> StyleAlignedOptions:
        if self.control == "none":
            if self.controlnet or self.control_image or self.depth_model:
                raise ValueError("controlnet / control_image / depth_model are for control: canny or depth")
            return self
        if not (self.controlnet and self.control_image):
            raise ValueError(f"control: {self.control} needs controlnet (a ControlNet's hub id or local folder) and "
                             "control_image (the content image whose structure the set follows)")
        if self.control == "depth" and not self.depth_model:
            raise ValueError("control: depth needs depth_model (a transformers depth-estimation model, hub id or "
                             "local folder, e.g. Intel/dpt-hybrid-midas), and none is configured; or use "
                             "control: canny, which needs no model")
        if self.control == "canny" and not self.canny_low < self.canny_high:
            raise ValueError("canny_low must be below canny_high")
        return self


def adain(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN(x, y) = sigma(y) (x - mu(x)) / sigma(x) + mu(y), per head and channel over the tokens (dim -2)."""
    mu_x, mu_y = x.mean(-2, keepdim=True), y.mean(-2, keepdim=True)
    sigma_x, sigma_y = (x.var(-2, keepdim=True) + eps).sqrt(), (y.var(-2, keepdim=True) + eps).sqrt()
    return sigma_y * (x - mu_x) / sigma_x + mu_y


class SharedAttnProcessor:
    """Self-attention where each target also attends to its group's reference.

    The batch is made of groups of `images_per_group` rows, each led by the reference (under classifier-free
    guidance the pipeline's batch holds two such groups, unconditional then conditional).

    For a target t and its reference r (Q, K, V of shape heads x tokens x d):
        Q^_t = AdaIN(Q_t, Q_r),  K^_t = AdaIN(K_t, K_r)                (values get no AdaIN)
        out_t = softmax([Q^_t K^_t^T / sqrt(d),  s Q^_t K_r^T / sqrt(d) + beta]) [V_t; V_r]
    s = shared_score_scale, beta = shared_score_shift (added to the scaled scores, as in sa_handler.py).
    The reference attends to itself only, so its features are those of the plain model.
    Written for the UNet transformer blocks' self-attention (`attn1`; SD 1.x, 2.x and SDXL alike): 3-D input, no
    norms or residual inside.
    """

    def __init__(self, opts: StyleAlignedOptions):
        self.opts = opts
        self.images_per_group = 1  # the reference and its targets; 1: the reference alone, plain attention

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        # (batch, tokens, heads*d) -> (groups, images per group, heads, tokens, d)
        q, k, v = (f(hidden_states).view(batch, tokens, attn.heads, -1).transpose(1, 2)
                   .unflatten(0, (-1, self.images_per_group)) for f in (attn.to_q, attn.to_k, attn.to_v))
        q_r, k_r, v_r = q[:, :1], k[:, :1], v[:, :1]
        out = F.scaled_dot_product_attention(q_r, k_r, v_r, scale=attn.scale)
        if self.images_per_group > 1:
            q_t, k_t, v_t = q[:, 1:], k[:, 1:], v[:, 1:]
            if self.opts.adain_queries:
                q_t = adain(q_t, q_r)
            if self.opts.adain_keys:
                k_t = adain(k_t, k_r)
            keys = torch.cat([k_t, self.opts.shared_score_scale * k_r.expand_as(k_t)], dim=-2)
            values = torch.cat([v_t, v_r.expand_as(v_t)], dim=-2)
            shift = torch.zeros(tokens, 2 * tokens, dtype=q.dtype, device=q.device)
            shift[:, tokens:] = self.opts.shared_score_shift
            out_t = F.scaled_dot_product_attention(q_t, keys, values, attn_mask=shift, scale=attn.scale)
            out = torch.cat([out, out_t], dim=1)
        out = out.flatten(0, 1).transpose(1, 2).reshape(batch, tokens, -1)
        return attn.to_out[1](attn.to_out[0](out))


@torch.no_grad()
def ddim_invert(pipe: DiffusionPipeline, image: Image.Image, prompt: str, steps: int,
                guidance_scale: float) -> torch.Tensor:
    """The DDIM trajectory of a real image, from noise to its clean latent: (steps + 1, C, h, w).

    Runs the pipeline's own loop (whatever the family's pipeline class) with DDIMInverseScheduler (timesteps
    ascending), recording each latent; entry i is the latent the sampler holds before its step i, and the last
    entry is the clean latent.
    """
    pixels = pipe.image_processor.preprocess(image).to(pipe.device, pipe.vae.dtype)
    clean = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    inverse = type(pipe)(**{**pipe.components, "scheduler": DDIMInverseScheduler.from_config(
        pipe.scheduler.config)})
    inverse.set_progress_bar_config(disable=True)
    trajectory = [clean]

    def record(_pipe, _step, _timestep, tensors):
        trajectory.append(tensors["latents"].clone())
        return {}

    inverse(prompt, latents=clean, height=image.height, width=image.width, num_inference_steps=steps,
            guidance_scale=guidance_scale, output_type="latent", callback_on_step_end=record)
    return torch.cat(trajectory[::-1])


class StyleAlignedSampler:
    """Called like the pipeline by style_factory/sampling.py; each call (one batch of `evaluate.batch_size` targets, from
    any prompts) generates its targets beside the reference, which every call carries at row 0. The reference attends
    to itself only and each target to itself and the reference, so how a set is cut into calls does not change it."""

    def __init__(self, pipe: DiffusionPipeline, reference: Image.Image | None, caption: str,
                 opts: StyleAlignedOptions, trajectory: torch.Tensor | None,
                 control: tuple[DiffusionPipeline, Image.Image] | None = None):
        """`reference`, `trajectory`: the inverted image and its stored inversion; None in generated mode, where
        `caption` is the reference's prompt. `control`: the family's ControlNet pipeline around `pipe`'s components
        and the structure map the targets follow; None: no ControlNet."""
        self.pipe, self.reference, self.caption, self.opts = pipe, reference, caption, opts
        self.processor = SharedAttnProcessor(opts)
        pipe.unet.set_attn_processor({name: self.processor if name.endswith("attn1.processor") else processor
                                      for name, processor in pipe.unet.attn_processors.items()})
        self.control = control
        if control is not None:
            zero_reference_residuals(control[0].controlnet, lambda: self.processor.images_per_group)
        self.trajectories = {} if trajectory is None else {(opts.inversion_steps, *reference.size): trajectory}

    def trajectory(self, steps: int, height: int, width: int) -> torch.Tensor:
        """The stored inversion, or a new one when sampling uses other steps or another size."""
        if (steps, width, height) not in self.trajectories:
            self.processor.images_per_group = 1  # the reference alone is in the batch: plain attention
            reference = self.reference.resize((width, height), Image.Resampling.LANCZOS)
            self.trajectories[(steps, width, height)] = ddim_invert(
                self.pipe, reference, self.caption, steps, self.opts.inversion_guidance_scale)
        return self.trajectories[(steps, width, height)]

    def reference_noise(self, height: int, width: int) -> torch.Tensor:
        """Generated mode: the reference's starting noise, the same in every call."""
        scale = self.pipe.vae_scale_factor
        shape = (1, self.pipe.unet.config.in_channels, height // scale, width // scale)
        return randn_tensor(shape, generator=torch.Generator().manual_seed(self.opts.reference_seed),
                            device=self.pipe.device, dtype=self.pipe.unet.dtype)

    @torch.no_grad()
    def __call__(self, prompt: list[str], generator: list[torch.Generator], height: int, width: int,
                 num_inference_steps: int, guidance_scale: float, output_type: str = "pil"):
        callback = None
        if self.opts.reference == "generated":
            start = self.reference_noise(height, width)
        else:
            trajectory = self.trajectory(num_inference_steps, height, width).to(self.pipe.device)
            start = trajectory[:1]

            def callback(_pipe, step, _timestep, tensors):
                tensors["latents"][0] = trajectory[step + 1]  # the reference row replays its inversion
                return tensors
        # the targets' noise exactly as the plain pipeline draws it from these generators
        noise = randn_tensor((len(prompt), *start.shape[1:]), generator=generator, device=self.pipe.device,
                             dtype=start.dtype)
        self.processor.images_per_group = 1 + len(prompt)
        pipe, controls = self.pipe, {}
        if self.control is not None:  # the reference row's residual is zeroed (zero_reference_residuals)
            pipe, structure = self.control
            controls = {"image": structure.resize((width, height), Image.Resampling.BICUBIC),
                        "controlnet_conditioning_scale": self.opts.control_scale}
        output = pipe([self.caption] + list(prompt), latents=torch.cat([start, noise]), height=height,
                      width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      output_type=output_type, callback_on_step_end=callback, **controls)
        output.images = output.images[1:]
        return output


class StyleAligned(Method):
    name = "stylealigned"
    Options = StyleAlignedOptions
    trains = False

    def check_data(self, data: StyleData, cfg: TrainConfig) -> None:
        index, count = self.options(cfg).reference_index, int((data.roles == "ref").sum())
        if index >= count:
            raise ValueError(f"reference_index is {index} but the style has only {count} StyleRef images")

    def prepare_reference(self, data: StyleData, cfg: TrainConfig, family: Family, base_model: str, out_dir: Path,
                          device: str) -> None:
        opts = self.options(cfg)
        row = np.flatnonzero(data.roles == "ref")[opts.reference_index]
        if opts.reference == "generated":  # drawn with each set, at its steps and guidance: nothing to store
            caption = opts.reference_prompt or self.eval_prompt(data.captions[row], self.style)
        else:
            reference, caption = Image.fromarray(data.images[row]), data.captions[row]
            trajectory = ddim_invert(family.load_pipeline(base_model, device), reference, caption,
                                     opts.inversion_steps, opts.inversion_guidance_scale)
            save_file({"latents": trajectory.cpu().contiguous()}, out_dir / "trajectory.safetensors")
            reference.save(out_dir / "reference.png")
        if opts.control != "none":
            # at the sampling size, as ControlNets were trained: a map resized afterwards has blurred, wider edges
            content = Image.open(opts.control_image).convert("RGB").resize((data.resolution, data.resolution),
                                                                           Image.Resampling.BICUBIC)
            edges = canny_map(content, opts.canny_low, opts.canny_high)
            structure = edges if opts.control == "canny" else depth_map(content, opts.depth_model, device)
            structure.save(out_dir / CONTROL_MAP)
            edges.save(out_dir / CONTROL_EDGES)
        (out_dir / "reference.json").write_text(json.dumps({"caption": caption, "options": opts.model_dump()}))

    def load_for_sampling(self, family: Family, base_model: str, model_dir: str, device: str) -> StyleAlignedSampler:
        folder = Path(model_dir)
        meta = json.loads((folder / "reference.json").read_text())
        opts = StyleAlignedOptions.model_validate(meta["options"])
        pipe = family.load_pipeline(base_model, device)
        control = None
        if opts.control != "none":
            if family.controlnet_pipeline_class is None:
                raise ValueError(f"control: {opts.control}: the {family.name} family has no ControlNet pipeline")
            controlnet = ControlNetModel.from_pretrained(opts.controlnet).to(device)
            control = (family.controlnet_pipeline_class.from_pipe(pipe, controlnet=controlnet),
                       Image.open(folder / CONTROL_MAP).convert("RGB"))
        if opts.reference == "generated":
            return StyleAlignedSampler(pipe, None, meta["caption"], opts, None, control)
        return StyleAlignedSampler(pipe, Image.open(folder / "reference.png").convert("RGB"), meta["caption"], opts,
                                   load_file(folder / "trajectory.safetensors")["latents"].to(device), control)

    def eval_prompt(self, content: str, style: StyleConfig) -> str:
        """The base model's prompt (content + descriptor): the shared attention alone carries the reference."""
        return f"{content}, {style.descriptor}"
