"""StyleDrop's style + content composition (style_factory/methods/content.py) and the config that asks for it:
gamma 0 and 1 are the style and content adapters alone, bit for bit; a gamma between them is neither; a composition
naming an unknown style or subject fails at load, before any compute. A compose entry in a real run:
tests/test_methods_e2e.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from style_factory.config import ConfigError, Concept, StyleConfig, TrainConfig, load_run_config, load_styles, load_subjects
from style_factory.families import get_family
from style_factory.lora import save_lora
from style_factory.methods import get_method
from style_factory.methods.content import load_composition
from style_factory.models import resolve_base_model
from style_factory.run import REGISTRY
from style_factory.sampling import sample
from tests.helpers import make_style

STYLE = StyleConfig(display_name="Ink", descriptor="ink wash painting", concepts=[Concept(token="zwx", class_word="style")])


def random_adapter(method: str, base: str, folder, seed: int) -> str:
    """A method's exported UNet adapter with random up matrices (a fresh one is zero and changes nothing)."""
    family = get_family("sd1")
    models = family.load_components(base)
    get_method(method, STYLE).prepare(models, TrainConfig())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, param in models.unet.named_parameters():
            if "lora_B" in path:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    folder.mkdir()
    save_lora(folder, family, unet=models.unet)
    return str(folder)


def draw(pipe) -> np.ndarray:
    """Two images at 2 DDIM steps with CFG, as evaluation draws them, as floats (no rounding to 8 bits)."""
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    return pipe(["a red circle", "a blue square"], generator=generators, height=32, width=32, num_inference_steps=2,
                guidance_scale=5.0, output_type="np").images


@pytest.mark.slow
def test_gamma_ends_are_each_adapter_alone_and_between_is_neither(tmp_path):
    base = resolve_base_model("tiny", tmp_path / "base-models")
    family = get_family("sd1")
    style = random_adapter("styledrop", base, tmp_path / "style", seed=0)
    content = random_adapter("content", base, tmp_path / "content", seed=1)
    alone = {name: draw(get_method(name).load_for_sampling(family, base, folder, "cpu"))
             for name, folder in (("styledrop", style), ("content", content))}
    assert not np.array_equal(alone["styledrop"], alone["content"])
    composed = {gamma: draw(load_composition(family, base, style, content, gamma, "cpu")) for gamma in (0.0, 0.5, 1.0)}
    assert np.array_equal(composed[0.0], alone["styledrop"])
    assert np.array_equal(composed[1.0], alone["content"])
    assert not np.array_equal(composed[0.5], alone["styledrop"])
    assert not np.array_equal(composed[0.5], alone["content"])
    # the sampler is called as every pipeline is, and leaves its UNet as it found it
    sampler = load_composition(family, base, style, content, 0.5, "cpu")
    assert len(sample(sampler, ["a red circle"], [0], 32, 2, 5.0)) == 1
    assert "forward" not in vars(sampler.pipe.unet)


def compose_run(tmp_path, compose: list[dict], method: str = "styledrop", subject: str = "robot") -> tuple:
    make_style(tmp_path / "styles", "ink", "zwx", method=method)
    make_style(tmp_path / "subjects", subject, "sks", n_aux=0, seed=7)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"styles_dir": "styles", "subjects_dir": "subjects", "evaluate": {"compose": compose}}))
    config = load_run_config(path, REGISTRY)
    styles = load_styles(config, REGISTRY)
    return config, styles, str(path)


def test_compose_config_loads_its_subject_and_names_what_is_wrong(tmp_path):
    config, styles, path = compose_run(tmp_path, [{"style": "ink", "content": "robot", "gamma": 0.6}])
    [subject] = load_subjects(config, REGISTRY, styles, path)
    assert subject.subject and subject.name == "robot" and subject.methods(config) == ["content"]
    for entry, named in (({"style": "oil", "content": "robot"}, "evaluate.compose.0.style: unknown style 'oil'"),
                         ({"style": "ink", "content": "dog"}, "evaluate.compose.0.content: unknown subject 'dog'")):
        config.evaluate.compose[0] = type(config.evaluate.compose[0]).model_validate(entry)
        with pytest.raises(ConfigError, match=named):
            load_subjects(config, REGISTRY, styles, path)


def test_compose_config_refuses_a_style_without_styledrop_and_a_bad_gamma(tmp_path):
    config, styles, path = compose_run(tmp_path / "a", [{"style": "ink", "content": "robot"}], method="styleboost")
    with pytest.raises(ConfigError, match="compose.0.style: style 'ink' does not train styledrop"):
        load_subjects(config, REGISTRY, styles, path)
    with pytest.raises(ConfigError, match="evaluate.compose.0.gamma"):
        compose_run(tmp_path / "b", [{"style": "ink", "content": "robot", "gamma": 1.5}])
