"""StyleAligned on the tiny preset: shared self-attention with AdaIN, DDIM inversion, the exported reference folder.

Inversion tolerance: DDIM inversion is exact only when the noise prediction does not change between the latent
it is evaluated at and the next one. The tiny preset's UNet has random weights, so its prediction is no denoiser
(inverting with it drifts by ~40x the latent's norm at any step count); the reconstruction test therefore zeroes
its output convolution's weights, making the prediction independent of the latent. Then inversion and sampling
are exact inverses, and any mismatch of timesteps, alphas or trajectory order shows: the relative L2 error of the
reconstructed reference latent must stay below 1e-5, ten times float32 round-off at this size.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from style_factory.config import TrainConfig
from style_factory.data import StyleData
from style_factory.families import get_family
from style_factory.methods.stylealigned import (
    StyleAligned,
    StyleAlignedOptions,
    StyleAlignedSampler,
    adain,
    ddim_invert,
)
from tests.helpers import load_sd1_pipeline, noise_image

STEPS = 8
PROMPTS = ["a red circle on a blue background", "a house by a lake"]
REFERENCE = noise_image(7, (64, 64))
CAPTION = "a ref picture number 0"
RECONSTRUCTION_TOLERANCE = 1e-5  # relative L2 error of the clean latent, with a latent-independent prediction


@pytest.fixture(autouse=True)
def one_thread():
    """Bitwise comparisons across batch sizes need one thread: how CPU kernels split a batch across threads
    changes their round-off (~1e-6 here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in range(len(PROMPTS))]


def make_sampler(tiny_model: str) -> StyleAlignedSampler:
    pipe = load_sd1_pipeline(tiny_model)
    opts = StyleAlignedOptions(inversion_steps=STEPS)
    trajectory = ddim_invert(pipe, REFERENCE, CAPTION, STEPS, opts.inversion_guidance_scale)
    return StyleAlignedSampler(pipe, REFERENCE, CAPTION, opts, trajectory)


def sample(pipe, output_type: str = "np"):
    return pipe(PROMPTS, generator=generators(), height=64, width=64, num_inference_steps=STEPS,
                guidance_scale=5.0, output_type=output_type).images


@pytest.mark.slow
def test_without_sharing_the_targets_equal_the_plain_pipeline(tiny_model):
    expected = sample(load_sd1_pipeline(tiny_model))
    sampler = make_sampler(tiny_model)
    sampler.pipe.unet.set_attn_processor(AttnProcessor2_0())  # sharing off: the reference only rides along
    np.testing.assert_array_equal(sample(sampler), expected)
    assert not np.array_equal(sample(make_sampler(tiny_model)), expected)  # and sharing does change them


def statistics_gaps(sampler: StyleAlignedSampler, modules: tuple[str, ...]) -> dict[str, np.ndarray]:
    """For each kind of module (name suffix), per layer: the mean over steps and channels of
    |mu_t - mu_r| + |sigma_t - sigma_r|, mu and sigma over the tokens of the module's output, between each
    target and its group's reference; one generation."""
    gaps: dict[str, dict[str, list[float]]] = {kind: {} for kind in modules}
    group = 1 + len(PROMPTS)

    def record(kind, name):
        def hook(_module, _inputs, output):
            rows = output.unflatten(0, (-1, group))  # (groups, 1 + targets, tokens, channels)
            mu, sigma = rows.mean(2), rows.std(2)
            gap = (mu[:, 1:] - mu[:, :1]).abs() + (sigma[:, 1:] - sigma[:, :1]).abs()
            gaps[kind].setdefault(name, []).append(float(gap.mean()))
        return hook

    handles = [layer.register_forward_hook(record(kind, name)) for name, layer in sampler.pipe.unet.named_modules()
               for kind in modules if name.endswith(kind)]
    sample(sampler)
    for handle in handles:
        handle.remove()
    return {kind: np.array([np.mean(v) for v in layers.values()]) for kind, layers in gaps.items()}


def test_adain_gives_the_reference_statistics_per_head_and_channel():
    x, y = torch.randn(2, 3, 4, 64, 8), 3 * torch.randn(2, 1, 4, 64, 8) + 1  # (groups, images, heads, tokens, d)
    out = adain(x, y)
    torch.testing.assert_close(out.mean(-2), y.mean(-2).expand_as(out.mean(-2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(-2), y.std(-2).expand_as(out.std(-2)), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_sharing_moves_the_targets_attention_statistics_toward_the_reference(tiny_model):
    """The shared attention's queries are AdaIN'd to the reference's statistics (above); in the generation, the
    targets' self-attention outputs and the queries computed from them next (attn2.to_q) move toward the
    reference's in every layer, while the reference's trajectory is the same replayed inversion in both runs."""
    plain = make_sampler(tiny_model)
    plain.pipe.unet.set_attn_processor(AttnProcessor2_0())
    kinds = ("attn1", "attn2.to_q")
    (attention, queries), (attention_plain, queries_plain) = (
        statistics_gaps(sampler, kinds).values() for sampler in (make_sampler(tiny_model), plain))
    assert len(attention) == 7  # the tiny UNet's self-attention layers: 2 down, 1 mid, 4 up
    assert (attention < 0.7 * attention_plain).all(), (attention, attention_plain)  # AdaIN pulls each query's statistics towards the reference's
    assert (queries < queries_plain).all(), (queries, queries_plain)


def test_ddim_inversion_then_sampling_reconstructs_the_reference_latent(tiny_model):
    pipe = load_sd1_pipeline(tiny_model)
    with torch.no_grad():
        pipe.unet.conv_out.weight.zero_()  # a latent-independent prediction: see the module docstring
        trajectory = ddim_invert(pipe, REFERENCE, CAPTION, STEPS, guidance_scale=1.0)
        rebuilt = pipe(CAPTION, latents=trajectory[:1], num_inference_steps=STEPS, guidance_scale=1.0,
                       output_type="latent").images
    assert trajectory.shape == (STEPS + 1, 4, 16, 16)
    clean = trajectory[-1:]
    assert ((rebuilt - clean).norm() / clean.norm()).item() < RECONSTRUCTION_TOLERANCE
    assert ((trajectory[0] - clean).norm() > clean.norm()).item()  # the inversion did travel away from the image


def test_exported_reference_folder_loads_and_samples_the_requested_size(tiny_model, tmp_path):
    images = [noise_image(i, (64, 64)) for i in range(3)]
    data = StyleData(images=[np.asarray(im) for im in images], roles=np.array(["ref", "ref", "aux"]), concepts=np.zeros(3, int),
                     captions=["a first picture", "a second picture", "an aux picture"], tokens=["zwx"] * 3,
                     class_words=["style"] * 3)
    cfg = TrainConfig(method_options={"stylealigned": {"inversion_steps": STEPS, "reference_index": 1,
                                                       "shared_score_shift": float(np.log(2))}})
    method = StyleAligned()
    method.check_data(data, cfg)
    with pytest.raises(ValueError, match="reference_index"):
        method.check_data(data, TrainConfig(method_options={"stylealigned": {"reference_index": 2}}))
    method.prepare_reference(data, cfg, get_family("sd1"), tiny_model, tmp_path, "cpu")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "reference.png")), np.asarray(images[1]))

    sampler = method.load_for_sampling(get_family("sd1"), tiny_model, str(tmp_path), "cpu")
    assert sampler.caption == "a second picture" and sampler.opts.shared_score_shift == pytest.approx(np.log(2))
    out = sampler(PROMPTS, generator=generators(), height=64, width=64, num_inference_steps=STEPS,
                  guidance_scale=5.0).images
    assert [im.size for im in out] == [(64, 64)] * len(PROMPTS)
    # other steps and size than the stored inversion: the reference is inverted again for them
    out = sampler(PROMPTS[:1], generator=generators()[:1], height=48, width=32, num_inference_steps=3,
                  guidance_scale=1.0).images
    assert [im.size for im in out] == [(32, 48)]
    assert sorted(sampler.trajectories) == [(3, 32, 48), (STEPS, 64, 64)]
