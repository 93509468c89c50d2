"""CSD (style similarity) on random checkpoints of its released layout: found, loaded, scored with its style head."""
import argparse
import hashlib
import warnings

import numpy as np
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import save_file
from torch.nn import functional as F
from torchvision import transforms

from style_factory import backbones
from style_factory.config import ConfigError, load_run_config
from style_factory.run import REGISTRY

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def openai_vit_l14_image_tower() -> dict[str, tuple[int, ...]]:
    """OpenAI CLIP ViT-L/14's image tower as learn2phoenix/CSD's checkpoint names it (`proj` removed): width 1024,
    24 blocks, 16 x 16 patches of 14 px at 224 px plus the class token."""
    w = 1024
    shapes = {"conv1.weight": (w, 3, 14, 14), "class_embedding": (w,), "positional_embedding": (257, w),
              "ln_pre.weight": (w,), "ln_pre.bias": (w,), "ln_post.weight": (w,), "ln_post.bias": (w,)}
    for i in range(24):
        block = f"transformer.resblocks.{i}."
        shapes |= {block + "ln_1.weight": (w,), block + "ln_1.bias": (w,), block + "ln_2.weight": (w,),
                   block + "ln_2.bias": (w,), block + "attn.in_proj_weight": (3 * w, w),
                   block + "attn.in_proj_bias": (3 * w,), block + "attn.out_proj.weight": (w, w),
                   block + "attn.out_proj.bias": (w,), block + "mlp.c_fc.weight": (4 * w, w),
                   block + "mlp.c_fc.bias": (4 * w,), block + "mlp.c_proj.weight": (w, 4 * w),
                   block + "mlp.c_proj.bias": (w,)}
    return shapes


def training_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """A checkpoint as CSD's training script saves it: DistributedDataParallel's names, optimiser state, options."""
    return {"model_state_dict": {f"module.{name}": weight for name, weight in state.items()},
            "opt_bb": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]},
            "iter": 1000, "args": argparse.Namespace(arch="vit_large", lr=np.float64(0.003))}


def test_at_real_size_csd_loads_the_released_checkpoint_layout():
    """On the meta device: the real ViT-L/14 shapes, no 300M parameters allocated."""
    released = {f"backbone.{name}": shape for name, shape in openai_vit_l14_image_tower().items()}
    released |= {"last_layer_style": (1024, 768), "last_layer_content": (1024, 768)}
    checkpoint = training_checkpoint({name: torch.empty(shape, device="meta") for name, shape in released.items()})

    model = backbones.Csd.from_state_dict(backbones.csd_state_dict(checkpoint))
    assert {name: tuple(weight.shape) for name, weight in model.state_dict().items()} == released
    assert model.backbone.proj is None and isinstance(model.backbone.transformer.resblocks[0].mlp.gelu, QuickGELU)

    wrong = dict(checkpoint["model_state_dict"], **{"module.last_layer_content": torch.empty(1024, 512,
                                                                                              device="meta")})
    with pytest.raises(RuntimeError, match="last_layer_content"):
        backbones.Csd.from_state_dict(backbones.csd_state_dict({"model_state_dict": wrong}))
    del wrong["module.last_layer_content"]
    with pytest.raises(RuntimeError, match="Missing key.*last_layer_content"):
        backbones.Csd.from_state_dict(backbones.csd_state_dict({"model_state_dict": wrong}))


def small_csd(seed: int = 0) -> backbones.Csd:
    """CSD's layout, width-reduced: the same names, smaller shapes."""
    torch.manual_seed(seed)
    return backbones.Csd(width=64, layers=2, embed_dim=32).eval()


def sample_images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(224, 224), (300, 180), (120, 200)]  # non-square too: resized on the short side, centre-cropped
    return [Image.fromarray(rng.integers(0, 256, size=(*sizes[i % 3], 3), dtype=np.uint8)) for i in range(count)]


def test_a_random_checkpoint_of_the_layout_is_found_loaded_and_scores_with_its_style_head(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "STYLE_FACTORY_CACHE_DIR", tmp_path / "style-factory")
    model = small_csd()
    weight_file = tmp_path / backbones.CSD_FILE_NAME
    save_file(backbones.csd_state_dict(training_checkpoint(model.state_dict())), str(weight_file))

    csd = backbones.load_csd("auto", models_dir=str(tmp_path))
    assert csd.info.real and csd.info.sha256 == hashlib.sha256(weight_file.read_bytes()).hexdigest()
    assert "CSD" in csd.info.name
    images = sample_images(4)
    # CSD's own preprocessing, written out: bicubic short side to 224, centre crop, CLIP's mean and std
    reference_transform = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224),
        transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    with torch.no_grad():
        feature = model.backbone(torch.stack([reference_transform(image) for image in images]))
        style = F.normalize(feature @ model.last_layer_style, dim=1).numpy()
        content = F.normalize(feature @ model.last_layer_content, dim=1).numpy()
    embedded = csd.embed_images(images)
    np.testing.assert_allclose(embedded, style, atol=1e-5)
    assert not np.allclose(embedded, content, atol=1e-2)  # the style head, not the content head


def test_without_csd_weights_nothing_stands_in_for_it(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "STYLE_FACTORY_CACHE_DIR", tmp_path / "style-factory")
    with pytest.warns(UserWarning, match="NO CSD WEIGHTS.*style_sim_csd is NaN"):
        assert backbones.load_csd("auto", models_dir=str(tmp_path)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backbones.load_csd("off") is None
    pickle_file = tmp_path / backbones.CSD_HF_FILE_NAME
    pickle_file.write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors file `make fetch-weights` converts"):
        backbones.load_csd(str(pickle_file))
    config = tmp_path / "run.yaml"
    config.write_text("evaluate: {csd: toy}\n")
    with pytest.raises(ConfigError, match="evaluate.csd.*no toy stand-in"):
        load_run_config(config, REGISTRY)
