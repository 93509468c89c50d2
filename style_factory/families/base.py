"""What every model family provides, and the defaults the Stable Diffusion families share.

A family owns everything that differs between base models of one kind (SD 1.x, SD 2.x, SDXL): its facts are
class constants (component names, the pipeline class, default resolution, export names) and its behaviour is
four hooks that the shared loop, the methods and sampling call:

- `load_components(source)`: the parts training touches, any number of text encoders and tokenizers;
- `encode_prompts(models, prompts, device)`: prompts -> the `Conditioning` its denoiser takes;
- `denoise(models, noisy, timesteps, conditioning, geometry)`: one call of the denoiser;
- `pipeline(models, scheduler)` / `load_pipeline(source, device)`: the diffusers pipeline that samples it.

Nothing outside `style_factory/families/` imports a diffusers pipeline class or assumes one text encoder.
"""
from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from style_factory.data import ImageGeometry
from style_factory.families.ldm_names import clip_state, ldm_unet_name, unet_state, vae_state

CLIP_VOCAB_SIZE = 49408
# The SD noise schedule (SD 1.x, 2.x and SDXL share it); the tiny presets use it too.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def clip_tokenizer_files(out_dir: Path) -> Path:
    """Write CLIP's vocab.json and merges.txt from the BPE file bundled with open_clip (no network)."""
    import open_clip  # here, not at the top: importing it takes seconds, and a bad config should fail in less

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out_dir


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP tokenizer, built from the BPE file bundled with open_clip."""
    with tempfile.TemporaryDirectory() as tmp:
        files = clip_tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), pad_token=pad_token,
                             model_max_length=77)


@dataclass
class Conditioning:
    """What the denoiser is conditioned on for a batch of prompts."""

    parts: tuple[torch.Tensor, ...]  # per text encoder, its hidden states (B, 77, D_i), in component order
    pooled: torch.Tensor | None = None  # SDXL: the last encoder's pooled projection (B, P)

    @property
    def hidden_states(self) -> torch.Tensor:
        """The cross-attention input: the encoders' hidden states side by side."""
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=-1)


@dataclass(eq=False)  # hashed by identity: a job's copy is its own key in the frozen-prompt cache
class Components:
    """The parts of a latent diffusion model that training touches, named as the family's pipeline names them."""

    family: Family
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoders: dict[str, torch.nn.Module]  # component name -> encoder, in the family's order
    tokenizers: dict[str, Any]  # tokenizer component name -> tokenizer, in the same order
    noise_scheduler: DDPMScheduler
    source: str
    frozen_prompts: dict = field(default_factory=dict, repr=False)  # see Family.encode_prompts

    def module(self, name: str) -> torch.nn.Module:
        """A trainable part by component name: "unet", "text_encoder", "text_encoder_2", ..."""
        return self.unet if name == "unet" else self.text_encoders[name]

    def set_module(self, name: str, module: torch.nn.Module) -> None:
        if name == "unet":
            self.unet = module
        else:
            self.text_encoders[name] = module

    def encoder_pairs(self) -> list[tuple[Any, torch.nn.Module]]:
        """(tokenizer, text encoder) of each encoder, in order."""
        return list(zip(self.tokenizers.values(), self.text_encoders.values()))


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module  # DDP wraps the trained modules


class Family:
    """A model family: its facts as class constants, its behaviour as the hooks below (SD 1.x's by default)."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    pipeline_class_name: ClassVar[str]  # model_index.json's `_class_name` of a base model of this family
    # diffusers' ControlNet pipeline for this family (StyleAligned's `control`); None: the family has none
    controlnet_pipeline_class: ClassVar[type[DiffusionPipeline] | None] = None
    text_encoder_classes: ClassVar[dict[str, type]]  # component name -> transformers class, in order
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)  # one per text encoder, in the same order
    default_resolution: ClassVar[int]
    # kohya LoRA key prefix per component: what A1111 and ComfyUI match LoRA files by
    kohya_prefixes: ClassVar[dict[str, str]] = {"unet": "lora_unet", "text_encoder": "lora_te"}
    # textual-inversion file keys per text encoder; {} = the family's tools read one tensor under any key
    embedding_keys: ClassVar[dict[str, str]] = {}
    tiny_preset: ClassVar[str]  # the offline preset with this family's architecture and random weights
    # single-file checkpoints: per text encoder, its key prefix there and its layout (style_factory/families/ldm_names.py)
    single_file_text: ClassVar[dict[str, tuple[str, Callable]]] = {"text_encoder": ("cond_stage_model.", clip_state)}

    @classmethod
    def matches(cls, model_index: dict, unet_config: dict) -> bool:
        """Whether a base model (its model_index.json and unet/config.json) is of this family."""
        return model_index.get("_class_name") == cls.pipeline_class_name

    # --- loading -----------------------------------------------------------------------------------------
    def load_components(self, source: str) -> Components:
        """From a local diffusers folder or a hub id (offline, hub ids need their weights in the local HF cache)."""
        try:
            return Components(
                family=self,
                vae=AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True),
                unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True),
                text_encoders={name: cls.from_pretrained(source, subfolder=name, use_safetensors=True)
                               for name, cls in self.text_encoder_classes.items()},
                tokenizers={name: CLIPTokenizer.from_pretrained(source, subfolder=name)
                            for name in self.tokenizer_names},
                noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
                source=source,
            )
        except OSError as err:
            raise OSError(f"cannot load {self.name} base model {source!r}: give a local diffusers folder, or a hub "
                          f"id whose weights (safetensors) are in the local Hugging Face cache. ({err})") from err

    def pipeline(self, models: Components, scheduler) -> DiffusionPipeline:
        """A sampling pipeline around `models`' parts (their current weights)."""
        parts = {**dict(zip(self.tokenizer_names, models.tokenizers.values())), **models.text_encoders}
        return self.pipeline_class(vae=models.vae, unet=models.unet, scheduler=scheduler,
                                   **parts, **self.pipeline_extras())

    def pipeline_extras(self) -> dict:
        """Pipeline arguments beyond the components (SD's safety checker is off: research use, scored by hand)."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def load_pipeline(self, source: str, device: str = "cpu") -> DiffusionPipeline:
        """A sampling pipeline with the DDIM scheduler, for any saved model folder or hub id of this family."""
        pipe = self.pipeline_class.from_pretrained(source, use_safetensors=True, **self.pipeline_extras())
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def build_tiny(self, seed: int = 0) -> DiffusionPipeline:
        """The tiny preset: this family's architecture at toy size, random weights from a fixed seed."""
        raise NotImplementedError

    # --- conditioning and the denoiser -----------------------------------------------------------------------
    def encode_text(self, tokenizer, text_encoder, prompts: list[str], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One encoder's (hidden states, pooled output) for `prompts`. SD 1.x and 2.x: the last layer, no pool."""
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return text_encoder(ids)[0], None

    def encode_prompts(self, models: Components, prompts: list[str], device: torch.device) -> Conditioning:
        """The conditioning of `prompts`. Frozen text encoders (no trainable weight) encode each distinct prompt
        once per `models`: their output never changes, so later steps reuse it."""
        def encode(texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
            return [self.encode_text(tok, enc, texts, device) for tok, enc in models.encoder_pairs()]

        def conditioning(encoded: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Conditioning:
            return Conditioning(parts=tuple(hidden for hidden, _ in encoded), pooled=encoded[-1][1])

        if any(p.requires_grad for enc in models.text_encoders.values() for p in enc.parameters()):
            return conditioning(encode(prompts))
        precision = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        cache = models.frozen_prompts
        new = [p for p in dict.fromkeys(prompts) if (p, precision) not in cache]
        if new:
            with torch.no_grad():
                encoded = encode(new)
            for i, prompt in enumerate(new):
                cache[(prompt, precision)] = [(h[i], None if pool is None else pool[i]) for h, pool in encoded]
        rows = [cache[(p, precision)] for p in prompts]
        return conditioning([(torch.stack([row[k][0] for row in rows]),
                              None if rows[0][k][1] is None else torch.stack([row[k][1] for row in rows]))
                             for k in range(len(models.text_encoders))])

    def denoise(self, models: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning, geometry: ImageGeometry | None = None) -> torch.Tensor:
        """The denoiser's prediction. SD 1.x and 2.x condition on the text alone."""
        return models.unet(noisy, timesteps, conditioning.hidden_states).sample

    # --- exports ---------------------------------------------------------------------------------------------
    def kohya_module_name(self, component: str, path: str) -> str:
        """The module path kohya-named LoRA keys use for `path` (a diffusers module path) of `component`."""
        if component.startswith("text_encoder") and path.startswith(("embeddings.", "encoder.", "final_layer_norm")):
            return f"text_model.{path}"  # transformers 5 dropped CLIPTextModel's `text_model.` level; kohya keeps it
        return path

    def load_embeddings(self, pipe: DiffusionPipeline, path: Path) -> None:
        """Load one textual-inversion file written by `embedding_state` into `pipe` (its token: `<file stem>`)."""
        if not self.embedding_keys:
            pipe.load_textual_inversion(str(path))
            return
        state, token = load_file(path), f"<{path.stem}>"
        for encoder, key in self.embedding_keys.items():
            tokenizer = getattr(pipe, self.tokenizer_names[list(self.text_encoder_classes).index(encoder)])
            pipe.load_textual_inversion(state[key], token=token, text_encoder=getattr(pipe, encoder),
                                        tokenizer=tokenizer)

    def embedding_state(self, token: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A textual-inversion file's tensors from each text encoder's vectors of `token` (`<name>`)."""
        if not self.embedding_keys:
            (only,) = vectors.values()
            return {token: only}
        return {self.embedding_keys[encoder]: value for encoder, value in vectors.items()}

    def single_file_unet_name(self, unet: UNet2DConditionModel, path: str) -> str:
        """The original checkpoint's name of UNet module `path`, numbered from the UNet's own block layout."""
        config = unet.config
        return ldm_unet_name(path, config.layers_per_block, ["CrossAttn" in kind for kind in config.up_block_types])

    def single_file_state_dict(self, models: Components) -> dict[str, torch.Tensor]:
        """Every UNet, VAE and text-encoder weight of `models` under the original checkpoint's keys: the single
        file A1111 and ComfyUI load, and diffusers with `from_single_file`."""
        unet = unwrapped(models.unet)
        state = unet_state(unet.state_dict(), lambda path: self.single_file_unet_name(unet, path))
        state |= vae_state(models.vae.state_dict(), len(models.vae.config.up_block_types))
        for name, (prefix, layout) in self.single_file_text.items():
            state |= layout(unwrapped(models.text_encoders[name]).state_dict(), prefix)
        return state
