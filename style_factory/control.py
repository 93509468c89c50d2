"""Structure maps for ControlNet (StyleAligned's `control`), computed offline from a content image, and the hook that
gives a batch's reference rows a zero ControlNet residual.

- canny: OpenCV's Canny edges of the image in grayscale (white edges on black, as the canny ControlNets were trained);
- depth: a transformers depth-estimation model (DPT, Depth Anything...) from a local folder, its depth normalised to
  0-255 (near is bright, as the depth ControlNets were trained).
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

# In a controlled model's folder: the map its targets follow, and the Canny edges of its content image that
# evaluation scores the set against (edge_alignment): for canny the map itself, for depth the content's outlines.
CONTROL_MAP = "control.png"
CONTROL_EDGES = "control_edges.png"


def canny_map(image: Image.Image, low: int, high: int) -> Image.Image:
    """Canny edges of `image` with hysteresis thresholds `low` < `high`, as a 3-channel image."""
    edges = cv2.Canny(np.asarray(image.convert("L")), low, high)
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))


def edge_alignment(image: Image.Image, control: Image.Image, band: int = 2, low: int = 50, high: int = 150) -> float:
    """How closely `image` follows the edge map `control`: the share of the image's own Canny edges (`low`/`high`)
    that lie within `band` pixels of the control's edges (0 when the image has no edges). An image that ignores the
    control scores about the band's share of the image."""
    edges = np.asarray(canny_map(image, low, high))[..., 0] > 0
    control_edges = np.asarray(control.convert("L").resize(image.size, Image.Resampling.NEAREST))
    near = cv2.dilate(control_edges, np.ones((2 * band + 1, 2 * band + 1), np.uint8)) > 0
    return float((edges & near).sum() / edges.sum()) if edges.any() else 0.0


def depth_map(image: Image.Image, model_folder: str, device: str) -> Image.Image:
    """The depth a transformers depth-estimation model (a local folder) sees in `image`, 0-255, as a 3-channel image."""
    from transformers import pipeline  # imported here: only a depth control needs it

    estimate = pipeline("depth-estimation", model=model_folder, device=device)
    depth = np.asarray(estimate(image.convert("RGB"))["depth"], dtype=np.float32)
    span = float(depth.max() - depth.min()) or 1.0
    depth = ((depth - depth.min()) / span * 255).round().astype(np.uint8)
    return Image.fromarray(np.repeat(depth[..., None], 3, axis=-1)).resize(image.size, Image.Resampling.BICUBIC)


def zero_reference_residuals(controlnet, group_size: Callable[[], int]) -> None:
    """Make `controlnet`'s residuals zero on every reference row: the batch is made of groups of `group_size()` rows,
    each led by its reference (under classifier-free guidance, two such groups), so the reference is denoised as by
    the plain model while its targets follow the structure map."""
    import torch  # imported here: the report reads this module's file names without loading torch

    def hook(_module, _args, output):
        down, mid = output
        keep = torch.ones(mid.shape[0], dtype=mid.dtype, device=mid.device)
        keep[::group_size()] = 0
        keep = keep.view(-1, 1, 1, 1)
        return [sample * keep for sample in down], mid * keep

    controlnet.register_forward_hook(hook)
