"""Content adapters and StyleDrop's style + content composition (Sohn et al., arXiv 2306.00983, section 4.3).

A content adapter is the DreamBooth recipe on a subject's images (`subjects/<name>/`, a style folder's format):
instance prompts "<caption>, <token> <class_word>" with prior preservation on class images the base model generates,
trained into a UNet LoRA where StyleDrop puts its adapter (same places, rank and export) instead of the whole UNet.
A composition loads both adapters with `pipe.load_lora_weights`, so its style adapter is a LoRA (StyleDrop's default
`adapter: lora`).

A composition samples the base model with a style's StyleDrop adapter and a subject's content adapter loaded side by
side, and mixes their noise predictions at every denoiser call, each computed with only its own adapter active:
    eps = (1 - gamma) * eps_style + gamma * eps_content
The pipeline's classifier-free guidance then combines the mixed conditional and unconditional predictions as in any
other sampling, so gamma = 0 is the style adapter alone and gamma = 1 the content adapter alone, exactly.
"""
from __future__ import annotations

from pydantic import Field

from style_factory.config import TrainConfig
from style_factory.families.base import Components, Family
from style_factory.lora import add_lora
from style_factory.methods.dreambooth import DreamBooth, DreamBoothOptions
from style_factory.methods.styledrop import StyleDrop, StyleDropOptions

ADAPTERS = ("style", "content")  # the adapter names of a composition, in the order eps_style, eps_content


class ContentOptions(DreamBoothOptions):
    rank: int = Field(StyleDropOptions.model_fields["rank"].default, ge=1)
    alpha: float = Field(StyleDropOptions.model_fields["alpha"].default, gt=0)
    target_modules: list[str] = Field(default_factory=StyleDropOptions.model_fields["target_modules"].default_factory)


class Content(DreamBooth):
    """DreamBooth's prompts, prior and class images; a UNet LoRA where StyleDrop puts its adapter, exported and
    loaded as StyleDrop's."""

    name = "content"
    Options = ContentOptions
    trained_modules = StyleDrop.trained_modules
    export = StyleDrop.export
    load_for_sampling = StyleDrop.load_for_sampling

    def prepare(self, models: Components, cfg: TrainConfig) -> list[dict]:
        opts = self.options(cfg)
        models.vae.requires_grad_(False)
        for encoder in models.text_encoders.values():
            encoder.requires_grad_(False)
        return [{"params": add_lora(models.unet, opts.rank, opts.alpha, opts.target_modules), "lr": cfg.learning_rate}]


class ComposedSampler:
    """A pipeline with both adapters loaded whose UNet, while it samples, returns the gamma-mix of the two
    adapters' predictions; called as a pipeline (style_factory.sampling.sample)."""

    def __init__(self, pipe, gamma: float):
        self.pipe, self.gamma = pipe, gamma

    def mixed(self, forward):
        unet = self.pipe.unet

        def predict(*args, **kwargs):
            outputs = []
            for name in ADAPTERS:
                unet.set_adapter(name)
                outputs.append(forward(*args, **kwargs))
            style, content = outputs
            if isinstance(style, tuple):  # return_dict=False, as the pipelines call it
                return ((1 - self.gamma) * style[0] + self.gamma * content[0], *style[1:])
            style.sample = (1 - self.gamma) * style.sample + self.gamma * content.sample
            return style
        return predict

    def __call__(self, prompt: list[str], **kwargs):
        unet = self.pipe.unet
        unet.forward = self.mixed(unet.forward)
        try:
            return self.pipe(prompt, **kwargs)
        finally:
            del unet.forward  # the class's forward again


def load_composition(family: Family, base_model: str, style_dir: str, content_dir: str, gamma: float,
                     device: str) -> ComposedSampler:
    """The base model with a StyleDrop adapter (`style_dir`) and a content adapter (`content_dir`), mixed by gamma."""
    pipe = family.load_pipeline(base_model, device)
    for name, folder in zip(ADAPTERS, (style_dir, content_dir)):
        pipe.load_lora_weights(folder, adapter_name=name)
    return ComposedSampler(pipe, gamma)
