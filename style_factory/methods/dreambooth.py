"""Style-DreamBooth (diffusers `examples/dreambooth/train_dreambooth.py`): prior preservation.

StyleBoost's two-term loss and trained modules, with the prior set replaced: instead of curated Aux
images, class images the base model generates from the class prompt (`style_factory/priors.py`), so the
second term keeps the model's own idea of the class while the first binds the token to the style:
    L = mean_i ||eps - eps_theta(z_t, t, "<caption>, <token> <class_word>")||^2
        + prior_loss_weight * mean_j ||eps' - eps_theta(z'_t', t', <class prompt>)||^2
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from style_factory.config import StyleConfig, TrainConfig
from style_factory.data import StyleData
from style_factory.methods.base import ClassImages
from style_factory.methods.styleboost import StyleBoost


class DreamBoothOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    class_prompt: str = "{class_word}"  # per concept; "{class_word}" is replaced, e.g. "a painting" or "style"
    num_class_images: int = Field(100, ge=1)  # the script's default (its README uses 200)
    class_inference_steps: int = Field(50, ge=1)  # the pipeline's defaults, as the script generates them
    class_guidance_scale: float = Field(7.5, ge=0)


class DreamBooth(StyleBoost):
    """Same instance prompts, modules and optimiser as StyleBoost; the prior rows are generated class images."""

    name = "dreambooth"
    Options = DreamBoothOptions
    prior_role = "prior"
    missing_prior = ("no class images; the priors stage (style_factory.priors.generate_class_images) "
                     "generates them before training")

    def class_images(self, style: StyleConfig, cfg: TrainConfig) -> list[ClassImages]:
        if cfg.prior_loss_weight == 0:
            return []
        opts = self.options(cfg)
        return [ClassImages(prompt=opts.class_prompt.format(class_word=c.class_word), count=opts.num_class_images,
                            num_inference_steps=opts.class_inference_steps,
                            guidance_scale=opts.class_guidance_scale) for c in style.concepts]

    def prior_prompt(self, data: StyleData, row: int) -> str:
        return data.captions[row]  # the class prompt the image was generated from
