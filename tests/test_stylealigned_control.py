"""StyleAligned with ControlNet on the tiny preset and a tiny ControlNet with random weights (ControlNetModel.from_unet,
its zero convolutions redrawn so that it has a residual): the structure map, the reference's zero residual, that at
a zero conditioning scale the set is plain StyleAligned's, the depth path with a tiny random depth model, and that the
shipped `tiny-controlnet-canny` is found by its name. On `tiny-pretrained` with the shipped ControlNet: the targets
follow the control's edges."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from style_factory.config import ConfigError, TrainConfig, load_run_config, load_styles
from style_factory.control import CONTROL_EDGES, canny_map, depth_map, edge_alignment
from style_factory.families import get_family
from style_factory.hub import MissingModels, resolve_models
from style_factory.methods import get_method
from style_factory.models import TINY_CONTROLNET_CANNY, TINY_PRETRAINED, shipped_model
from style_factory.run import REGISTRY
from style_factory.toyworld import caption, render_plain, scene_from_seed
from tests.helpers import load_sd1_pipeline, make_style
from tests.test_styledrop import CAPTIONS, STYLE
from tests.test_textboost import make_job

PROMPTS = ["a red circle, watercolor painting", "a blue square, watercolor painting"]


def square(size: int = 64) -> Image.Image:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[16:48, 16:48] = 255
    return Image.fromarray(pixels)


def test_canny_map_marks_the_outline_and_nothing_else():
    edges = np.asarray(canny_map(square(), 100, 200))[..., 0] > 0
    outline = np.zeros((64, 64), bool)
    outline[15:49, 15:49] = True
    outline[17:47, 17:47] = False  # a 1-2 px band around the square's border
    assert edges.any() and not (edges & ~outline).any()
    assert edges[16:48, 15:17].any(axis=1).all()  # the left side, whole


@pytest.mark.parametrize("options, expected", [
    ({"control": "depth", "controlnet": "org/cn-depth", "control_image": "house.png"}, "needs depth_model"),
    ({"control": "canny"}, "needs controlnet"),
    ({"controlnet": "org/cn"}, "are for control: canny or depth"),
])
def test_an_incomplete_control_fails_at_config_load(tmp_path, options, expected):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train": {"method_options": {"stylealigned": options}}}))
    with pytest.raises(ConfigError, match=expected) as err:
        load_run_config(config, REGISTRY)
    assert str(config) in str(err.value) and "stylealigned" in str(err.value)


def test_control_image_and_a_local_controlnet_are_read_against_the_config_folder(tmp_path):
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"train": {"method_options": {"stylealigned": {
        "control": "canny", "controlnet": "./models/cn", "control_image": "content/house.png"}}}}))
    options = load_run_config(config, REGISTRY).train.method_options["stylealigned"]
    assert options["controlnet"] == str(config.parent / "models" / "cn")
    assert options["control_image"] == str(config.parent / "content" / "house.png")


@pytest.fixture(scope="module")
def tiny_controlnet(tmp_path_factory, tiny_model) -> str:
    torch.manual_seed(0)
    # the tiny VAE downsamples by 4 (SD's by 8): the map's embedding halves twice, not three times
    controlnet = ControlNetModel.from_unet(load_sd1_pipeline(tiny_model).unet,
                                           conditioning_embedding_out_channels=(16, 32, 64))
    for name, module in controlnet.named_modules():  # from_unet zeroes these: redraw them so the residual is not 0
        zeroed = name.startswith(("controlnet_down_blocks.", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"))
        if zeroed and isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.5)
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    controlnet.save_pretrained(folder)
    return str(folder)


def sampler_for(tmp_path, tiny_model, **options):  # tiny_model: any sd1 base folder
    """StyleAligned's model folder (a generated reference, so no inversion) and its sampler, as evaluation loads it."""
    tmp_path.mkdir()
    train = {"method_options": {"stylealigned": {"reference": "generated", **options}}}
    job = make_job(tmp_path, tiny_model, "stylealigned", STYLE, train, CAPTIONS)
    method, family, out = get_method("stylealigned", STYLE), get_family("sd1"), tmp_path / "model"
    out.mkdir()
    method.prepare_reference(job.load_data(), TrainConfig.model_validate(job.train), family, tiny_model, out, "cpu")
    return method.load_for_sampling(family, tiny_model, str(out), "cpu"), out


def draw(sampler, prompts: list[str] = PROMPTS, steps: int = 2) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed) for seed in range(1, 1 + len(prompts))]
    return sampler(prompts, generator=generators, height=64, width=64, num_inference_steps=steps, guidance_scale=5.0,
                   output_type="np").images


@pytest.mark.slow
def test_zero_scale_is_plain_stylealigned_and_the_reference_gets_no_residual(tmp_path, tiny_model, tiny_controlnet):
    content = tmp_path / "content.png"
    square(96).save(content)  # larger than the run's 64 px: its map is made at the sampling size
    control = {"control": "canny", "controlnet": tiny_controlnet, "control_image": str(content)}
    plain, _ = sampler_for(tmp_path / "plain", tiny_model)
    expected = draw(plain)

    zero, folder = sampler_for(tmp_path / "zero", tiny_model, **control, control_scale=0.0)
    assert isinstance(zero.control[0], StableDiffusionControlNetPipeline)  # the family's ControlNet pipeline
    expected_map = np.asarray(canny_map(square(96).resize((64, 64), Image.Resampling.BICUBIC), 100, 200))
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "control.png")), expected_map)  # offline, stored
    np.testing.assert_array_equal(np.asarray(Image.open(folder / CONTROL_EDGES)), expected_map)  # what is scored
    np.testing.assert_allclose(draw(zero), expected, atol=1e-6)

    full, _ = sampler_for(tmp_path / "full", tiny_model, **control, control_scale=1.0)
    residuals = []
    full.control[0].controlnet.register_forward_hook(lambda _m, _a, out: residuals.append(out[1]))  # after ours
    images = draw(full)
    assert np.abs(images - expected).max() > 1e-3  # the structure map reaches the targets
    group = 1 + len(PROMPTS)
    for mid in residuals:  # every step, both CFG halves: [reference, target, target] x 2
        assert mid.shape[0] == 2 * group
        assert all(mid[row].abs().max() == 0 for row in (0, group))
        assert all(mid[row].abs().max() > 0 for row in range(2 * group) if row % group)


def test_the_controlnet_is_found_offline_before_any_compute_and_handed_over_as_its_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    make_style(tmp_path / "styles", "ink", "zqx")
    staged = tmp_path / "models" / "cn"  # what resolve_models checks a folder for: its config and weights
    staged.mkdir(parents=True)
    (staged / "config.json").write_text("{}")
    (staged / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    for controlnet, missing in (("org/no-such-controlnet", True), ("./models/cn", False)):
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({"styles_dir": "styles", "train": {"method_options": {"stylealigned": {
            "control": "canny", "controlnet": controlnet, "control_image": "content.png"}}}}))
        run = load_run_config(config, REGISTRY)
        styles = load_styles(run, REGISTRY)
        if missing:
            with pytest.raises(MissingModels, match=r"train.method_options.stylealigned.controlnet: "
                                                     r"'org/no-such-controlnet': not found"):
                resolve_models(run, styles, str(config))
        else:
            resolve_models(run, styles, str(config))
            assert run.train.method_options["stylealigned"]["controlnet"] == str(staged)


def tiny_depth_model(folder) -> str:
    """A DPT depth estimator at toy size with random weights, and its image processor, as a local folder."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                       fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_a_depth_model_gives_the_map_a_depth_controlled_set_follows(tmp_path, tiny_model, tiny_controlnet):
    content = tmp_path / "content.png"
    square().save(content)
    depth_model = tiny_depth_model(tmp_path / "dpt")
    sampler, folder = sampler_for(tmp_path / "depth", tiny_model, control="depth", controlnet=tiny_controlnet,
                                  control_image=str(content), depth_model=depth_model, control_scale=1.0)
    stored = np.asarray(Image.open(folder / "control.png"))
    assert stored.shape == (64, 64, 3) and stored.min() == 0 and stored.max() == 255  # normalised to 0-255
    np.testing.assert_array_equal(stored, np.asarray(depth_map(square(), depth_model, "cpu")))
    np.testing.assert_array_equal(np.asarray(Image.open(folder / CONTROL_EDGES)),  # the content's own outlines
                                  np.asarray(canny_map(square(), 100, 200)))
    images = draw(sampler)
    zero, _ = sampler_for(tmp_path / "zero", tiny_model, control="depth", controlnet=tiny_controlnet,
                          control_image=str(content), depth_model=depth_model, control_scale=0.0)
    assert images.shape == (2, 64, 64, 3) and np.abs(images - draw(zero)).max() > 1e-3  # the depth map steers them


def test_edge_alignment_is_high_on_the_edges_and_chance_off_them():
    control = canny_map(square(), 100, 200)
    assert edge_alignment(square(), control) == 1.0
    shifted = np.zeros((64, 64, 3), np.uint8)
    shifted[2:10, 52:62] = 255  # a rectangle away from the square's outline
    assert edge_alignment(Image.fromarray(shifted), control) == 0.0
    assert edge_alignment(Image.new("RGB", (64, 64)), control) == 0.0  # no edges at all


def test_the_shipped_controlnet_is_found_by_its_name(tmp_path):
    make_style(tmp_path / "styles", "ink", "zqx")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"styles_dir": "styles", "train": {"method_options": {"stylealigned": {
        "control": "canny", "controlnet": TINY_CONTROLNET_CANNY, "control_image": "content.png"}}}}))
    run = load_run_config(config, REGISTRY)
    resolve_models(run, load_styles(run, REGISTRY), str(config))
    assert run.train.method_options["stylealigned"]["controlnet"] == str(shipped_model(TINY_CONTROLNET_CANNY))
    assert ControlNetModel.load_config(run.train.method_options["stylealigned"]["controlnet"])["in_channels"] == 4


def as_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


HELD_OUT_SCENES = range(710_000_000, 710_000_008)  # toy scenes no ControlNet or UNet step trained on


@pytest.mark.slow
def test_the_shipped_canny_controlnet_makes_the_targets_follow_the_edges(tmp_path):
    """Each held-out scene's Canny map as the control and its caption as the target's prompt (as the ControlNet was
    trained): the target's own edges lie on the control's edges more often than plain StyleAligned's on the same
    prompt and seed. The reference is generated, so its layout is not the scene's."""
    base, steps = str(shipped_model(TINY_PRETRAINED)), 8
    plain, _ = sampler_for(tmp_path / "plain", base)
    followed, ignored = [], []
    for seed in HELD_OUT_SCENES:
        content = tmp_path / f"scene-{seed}.png"
        render_plain(scene_from_seed(seed), 64).save(content)
        control, prompt = canny_map(Image.open(content), 100, 200), [caption(scene_from_seed(seed))]
        sampler, _ = sampler_for(tmp_path / f"control-{seed}", base, control="canny", control_image=str(content),
                                 controlnet=str(shipped_model(TINY_CONTROLNET_CANNY)), control_scale=1.0)
        followed.append(edge_alignment(as_image(draw(sampler, prompt, steps)[0]), control))
        ignored.append(edge_alignment(as_image(draw(plain, prompt, steps)[0]), control))
    print(f"edge alignment: {np.mean(followed):.3f} with the map, {np.mean(ignored):.3f} without")
    assert np.mean(followed) > np.mean(ignored) + 0.15, (followed, ignored)
    assert sum(f > i for f, i in zip(followed, ignored)) >= 6, (followed, ignored)  # most scenes, not one or two
