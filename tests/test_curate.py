"""Curation: every input file gets one verdict; what can serve is kept as an RGB square, the rest has one reason."""
from __future__ import annotations

import io
import os
import shutil
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from style_factory import caption
from style_factory.config import CurateConfig, RunConfig, StyleConfig, load_style, load_styles
from style_factory.curate import curate_styles, list_candidates, style_fingerprint
from style_factory.decode import _to_rgb, decode_image
from style_factory.data import StyleData
from style_factory.run import REGISTRY, Run
from tests.helpers import make_style, noise_image

CFG = CurateConfig()
RES = 64  # the default run resolution
WHITE, RED, GREEN, BLUE = (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)
LATIN1_NAME = os.fsdecode(b"caf\xe9.png")  # "café.png" written by a latin-1 system: not UTF-8


@pytest.fixture
def deadline():
    """Fail instead of hanging: opening a FIFO for reading blocks until a writer comes, which never happens."""
    def fail(signum, frame):
        raise TimeoutError("blocked for 120 s: was a FIFO opened?")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---- inputs, built in memory ---------------------------------------------------------------------------------


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def halves(left: tuple, right: tuple, mode: str, size: tuple[int, int] = (80, 80)) -> Image.Image:
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def palette_png() -> bytes:
    """Left half palette index 0 (transparent), right half index 1 (blue)."""
    image = halves(0, 1, "P")
    image.putpalette([0, 0, 0, 0, 0, 255])
    return encode(image, transparency=0)


def rgba_png() -> bytes:
    return encode(halves((255, 0, 0, 0), (0, 255, 0, 255), "RGBA"))  # transparent red | opaque green


def la_png() -> bytes:
    image = Image.new("LA", (80, 80), (0, 0))  # transparent black on top
    image.paste((100, 255), (0, 40, 80, 80))  # opaque grey below
    return encode(image)


def grey16_png(values: np.ndarray) -> bytes:
    image = Image.fromarray(values.astype(np.uint16))
    assert image.mode == "I;16"
    return encode(image)


def gradient16() -> np.ndarray:
    return np.tile(np.linspace(0, 65535, 80), (80, 1))


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (80, 80), RED), Image.new("RGB", (80, 80), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def rotated_jpeg() -> bytes:
    """Stored 80x60 with a red marker top-left; EXIF orientation 6 shows it rotated 90 degrees clockwise."""
    image = Image.new("RGB", (80, 60), (128, 128, 128))
    image.paste(RED, (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def cmyk_image() -> Image.Image:
    return noise_image(7).convert("CMYK")


def png_header_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small, well-formed PNG whose header declares `width` x `height` RGB pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def kept(data: bytes, cfg: CurateConfig = CFG) -> np.ndarray:
    """Decode what must be kept; the output is always an RGB square at the run resolution."""
    image, reason, _ = decode_image(data, cfg, RES)
    assert reason == "" and image is not None
    assert image.mode == "RGB" and image.size == (RES, RES)
    return np.asarray(image, dtype=np.int16)


def rejected(data: bytes, cfg: CurateConfig = CFG) -> str:
    image, reason, _ = decode_image(data, cfg, RES)
    assert image is None and reason
    return reason


def near(pixel: np.ndarray, colour: tuple, tolerance: int = 12) -> bool:
    return bool(np.abs(pixel - np.array(colour)).max() <= tolerance)


# ---- decode_image / _to_rgb ----------------------------------------------------------------------------------


NOISE_PNG, NOISE_JPEG = encode(noise_image(1)), encode(noise_image(1), "JPEG")


@pytest.mark.parametrize("data, reason", [
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "cannot decode image"),
    (half(NOISE_PNG), "truncated"),
    (half(NOISE_JPEG), "truncated"),
    (b"", "not an image PIL can read"),
    (b"a caption, not an image\n", "not an image PIL can read"),
    (encode(Image.new("RGB", (80, 80)), "EPS"), "not an image PIL can read"),  # never handed to Ghostscript
], ids=["corrupt", "truncated-png", "truncated-jpeg", "zero-byte", "text-renamed-png", "eps-renamed-png"])
def test_undecodable_bytes_are_rejected_with_the_reason(data: bytes, reason: str):
    found = rejected(data)
    assert found.startswith("cannot decode image: ") and reason in found and "object at 0x" not in found


def test_cmyk_jpeg_kept_with_sensible_colours():
    rgb = np.asarray(noise_image(7).resize((RES, RES), Image.Resampling.LANCZOS), dtype=np.int16)
    out = kept(encode(cmyk_image(), "JPEG", quality=95))
    assert np.abs(out - rgb).mean() < 12  # not inverted, not channel-swapped


def test_palette_with_transparency_is_white_where_transparent():
    out = kept(palette_png())
    assert near(out[32, 8], WHITE) and near(out[32, 56], BLUE)


def test_alpha_is_composited_on_white():
    rgba = kept(rgba_png())
    assert near(rgba[32, 8], WHITE) and near(rgba[32, 56], GREEN)  # the hidden red does not show
    la = kept(la_png())
    assert near(la[8, 32], WHITE) and near(la[56, 32], (100, 100, 100))


def test_16_bit_greyscale_is_scaled_to_8_bit():
    out = kept(grey16_png(gradient16()))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out[32, 0, 0] < 16 and out[32, -1, 0] > 239 and 96 < out[32, 32, 0] < 160  # dark to light
    assert near(kept(grey16_png(np.full((80, 80), 32768)))[32, 32], (128, 128, 128), 1)  # no stretch to white
    assert near(np.asarray(_to_rgb(Image.fromarray(np.full((8, 8), 65535, np.int32))))[0, 0], WHITE, 0)  # "I"


def test_animated_gif_keeps_the_first_frame():
    assert near(kept(animated_gif())[32, 32], RED)


def test_exif_orientation_is_applied():
    out = kept(rotated_jpeg())  # shown 60x80 with the marker top-right, then centre-cropped
    assert near(out[4, 56], RED, 40) and near(out[4, 8], (128, 128, 128), 40)


@pytest.mark.parametrize("size, reason", [((20, 20), "too small: 20x20"), ((400, 40), "aspect")])
def test_tiny_and_extreme_aspect_are_rejected(size: tuple[int, int], reason: str):
    assert reason in rejected(encode(noise_image(2, size)))


@pytest.mark.parametrize("data, max_pixels", [
    (png_header_bomb(), CFG.max_pixels),
    (encode(noise_image(3, (100, 100))), 6_000),  # above max_pixels but within Pillow's own 2x warning band
    (encode(noise_image(3, (100, 100))), 1_000),
], ids=["100000x100000-header", "just-above", "far-above"])
def test_decompression_bomb_rejected_from_the_header(data: bytes, max_pixels: int):
    start = time.perf_counter()
    reason = rejected(data, CurateConfig(max_pixels=max_pixels))
    assert time.perf_counter() - start < 1.0  # the 30 GB of declared pixels are never allocated
    assert "decompression bomb" in reason and f"max_pixels={max_pixels}" in reason
    assert Image.MAX_IMAGE_PIXELS != max_pixels  # Pillow's process-wide limit is left alone


# ---- listing -------------------------------------------------------------------------------------------------


def add_odd_entries(ref: Path, outside: Path) -> dict[str, str]:
    """Odd entries in a StyleRef folder; returns the expected listing verdict per name ('' = goes on to decoding)."""
    for seed, name in enumerate(["été 1.png", "a#b?.png", "with spaces.png", "UPPER.PNG"], start=100):
        noise_image(seed).save(ref / name, format="PNG")
    noise_image(110).save(ref / ".hidden.png")
    (ref / "x.png").mkdir()
    (ref / "notes.pdf").write_bytes(b"%PDF-1.4\n")
    (ref / "README").write_text("no extension")
    (ref / "empty.png").touch()
    noise_image(111).save(outside)
    (ref / "outside.png").symlink_to(outside)
    (ref / "zz_link.png").symlink_to("ref_00.png")  # inside the style folder
    (ref / "gone.png").symlink_to("missing.png")
    (ref / "loop.png").symlink_to("loop.png")
    os.mkfifo(ref / "pipe.png")
    noise_image(112).save(ref / LATIN1_NAME, format="PNG")
    return {"été 1.png": "", "a#b?.png": "", "with spaces.png": "", "UPPER.PNG": "", "zz_link.png": "",
            ".hidden.png": "hidden file", "x.png": "directory", "notes.pdf": "not an image file type (.pdf)",
            "README": "not an image file type (no extension)", "empty.png": "empty file",
            "outside.png": "symbolic link pointing outside the style folder", "gone.png": "broken symbolic link",
            "loop.png": "broken symbolic link", "pipe.png": "not a regular file",
            LATIN1_NAME: "file name is not valid UTF-8"}


def test_listing_prerejects_what_cannot_be_an_image(tmp_path: Path, deadline):
    style_dir = make_style(tmp_path, "odd", "<odd>", n_ref=2, n_aux=1)
    expected = add_odd_entries(style_dir / "ref", tmp_path / "outside.png")
    style = load_style(style_dir, REGISTRY)
    verdicts = {c.path.name: c.rejected for c in list_candidates(style)}
    assert set(verdicts) == set(expected) | {"ref_00.png", "ref_01.png", "aux_00.png"}  # no .txt sidecars
    for name, reason in expected.items():
        assert verdicts[name].startswith(reason) if reason else verdicts[name] == "", name
    assert verdicts["ref_00.png"] == verdicts["aux_00.png"] == ""
    before = style_fingerprint(style)  # metadata only: neither blocks on the FIFO nor chokes on the name
    os.utime(style_dir / "ref" / "ref_01.png", ns=(1, 1))
    assert style_fingerprint(style) != before


# ---- captions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, text", [
    ("A café\n  in   Paris\t\r\n".encode(), "A café in Paris"),
    (b"\xef\xbb\xbf" + "A café".encode(), "A café"),
    ("A café\r\nat night".encode("utf-16"), "A café at night"),  # with its byte-order mark
    ("A café".encode("latin-1"), "A café"),
    (b"", ""),
    (b" \n\t ", ""),
], ids=["utf-8", "utf-8-bom", "utf-16-bom", "latin-1", "empty", "blank"])
def test_sidecar_read_in_any_encoding_with_whitespace_collapsed(tmp_path: Path, data: bytes, text: str):
    (tmp_path / "a.txt").write_bytes(data)
    assert caption.read_sidecar(tmp_path / "a.png") == text


def test_caption_sources(tmp_path: Path):
    (tmp_path / "a.txt").write_text("from the sidecar")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "secret.txt").write_text("a file next door")
    (tmp_path / "linked.txt").symlink_to(tmp_path / "secret.txt")  # could lead anywhere: not followed

    style = StyleConfig(display_name="Ink", descriptor="ink wash painting", concepts=[{"token": "qxp", "class_word": "style"}],
                        caption_template="a {class_word} picture")

    def caption_of(name: str, captioned: str | None = None) -> tuple[str, str, str]:
        return caption.caption_for(tmp_path / name, captioned, style, "cat", ["ink", "wash", "painting"])

    assert caption_of("a.png") == ("from the sidecar", "sidecar", "")
    for no_caption in ("none.png", "empty.png", "linked.png"):
        assert caption_of(no_caption) == ("a cat picture", "template", "")
    assert caption_of("none.png", "seen") == ("seen", "captioner", "")
    assert caption_of("a.png", "seen") == ("from the sidecar", "sidecar", "")  # the sidecar wins
    assert caption_of("none.png", "") == ("a cat picture", "template", "")
    assert caption_of("none.png", "an ink painting of a cat") == (
        "a cat", "captioner", "style words removed from the captioner's caption: ink, painting")
    text, source, note = caption_of("none.png", "Ink wash painting")  # nothing left: the template
    assert (text, source) == ("a cat picture", "template") and "all style words" in note


# ---- the stage, with Ray -------------------------------------------------------------------------------------


def mixed_style(styles_dir: Path, outside: Path) -> dict[str, tuple[str, str]]:
    """A style holding every kind of input; returns {report file: (status, reason prefix)}."""
    style_dir = make_style(styles_dir, "mixed", "<mixed>", n_ref=4, n_aux=2, seed=1)
    ref = style_dir / "ref"
    listed = add_odd_entries(ref, outside)
    (ref / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (ref / "truncated.png").write_bytes(half(NOISE_PNG))
    (ref / "truncated.jpg").write_bytes(half(NOISE_JPEG))
    (ref / "text.png").write_text("not an image")
    cmyk_image().save(ref / "cmyk.jpg", quality=95)
    (ref / "palette.png").write_bytes(palette_png())
    (ref / "rgba.png").write_bytes(rgba_png())
    (ref / "la.png").write_bytes(la_png())
    (ref / "grey16.png").write_bytes(grey16_png(gradient16()))
    (ref / "animated.gif").write_bytes(animated_gif())
    (ref / "rotated.jpg").write_bytes(rotated_jpeg())
    noise_image(120, (20, 20)).save(ref / "tiny.png")
    noise_image(121, (400, 40)).save(ref / "wide.png")
    (ref / "bomb.png").write_bytes(png_header_bomb())
    shutil.copy(ref / "ref_02.png", ref / "ref_02_copy.png")  # the same bytes
    Image.open(ref / "ref_03.png").save(ref / "ref_03_copy.bmp")  # the same pixels, another format
    Image.open(ref / "ref_01.png").resize((76, 76), Image.Resampling.BICUBIC).save(ref / "ref_01_copy.jpg", quality=80)
    (ref / "rotated.txt").write_bytes("tourné à droite".encode("utf-16"))
    (style_dir / "aux" / "aux_broken.png").write_bytes(half(NOISE_PNG))
    config = yaml.safe_load((style_dir / "style.yaml").read_text())
    config["concepts"][0]["heldout"] = "heldout"
    (style_dir / "style.yaml").write_text(yaml.safe_dump(config))
    (style_dir / "heldout").mkdir()
    noise_image(130).save(style_dir / "heldout" / "held_00.png")
    shutil.copy(ref / "ref_00.png", style_dir / "heldout" / "held_leak.png")  # a StyleRef image: must not count
    expected = {f"ref/{name}": ("kept", "") if not reason else ("rejected", reason) for name, reason in listed.items()}
    expected["ref/caf\\xe9.png"] = expected.pop(f"ref/{LATIN1_NAME}")  # the report shows the byte escaped
    expected.update({f"ref/ref_{i:02d}.png": ("kept", "") for i in range(4)})
    expected.update({f"aux/aux_{i:02d}.png": ("kept", "") for i in range(2)})
    expected.update({f"ref/{name}": ("kept", "") for name in ["cmyk.jpg", "palette.png", "rgba.png", "la.png",
                                                                "grey16.png", "animated.gif", "rotated.jpg"]})
    expected.update({
        "ref/corrupt.png": ("rejected", "cannot decode image"),
        "ref/truncated.png": ("rejected", "cannot decode image: damaged or cut short (image file is truncated"),
        "ref/truncated.jpg": ("rejected", "cannot decode image: damaged or cut short (image file is truncated"),
        "ref/text.png": ("rejected", "cannot decode image: not an image PIL can read"),
        "ref/tiny.png": ("rejected", "too small: 20x20"),
        "ref/wide.png": ("rejected", "extreme aspect ratio 400x40"),
        "ref/bomb.png": ("rejected", "decompression bomb guard: "),
        "ref/zz_link.png": ("rejected", "exact duplicate of ref/ref_00.png"),
        "ref/ref_02_copy.png": ("rejected", "exact duplicate of ref/ref_02.png"),
        "ref/ref_03_copy.bmp": ("rejected", "exact duplicate of ref/ref_03.png"),
        "ref/ref_01_copy.jpg": ("rejected", "near duplicate of ref/ref_01.png"),
        "aux/aux_broken.png": ("rejected", "cannot decode image: damaged or cut short (image file is truncated"),
        "heldout/held_00.png": ("kept", ""),
        "heldout/held_leak.png": ("rejected", "exact duplicate of ref/ref_00.png"),
    })
    return expected


def test_curate_styles_end_to_end(tmp_path: Path, ray_session, deadline):
    styles_dir = tmp_path / "styles"
    expected = mixed_style(styles_dir, tmp_path / "outside.png")
    few = make_style(styles_dir, "few", "<few>", n_ref=3, n_aux=1, seed=2)
    (few / "ref" / "ref_02.png").write_bytes(half((few / "ref" / "ref_02.png").read_bytes()))
    config = RunConfig(styles_dir=str(styles_dir), results_dir=str(tmp_path / "results"), name="t")
    run = Run(config=config, styles=load_styles(config, REGISTRY))

    curate_styles(run)

    assert run.outcomes["mixed"] == {"curate": "ok"}  # curated although "few" failed in the same call
    message = run.outcomes["few"]["curate"]
    assert str(few / "ref") in message and "only 2 usable StyleRef image(s) of 3 file(s)" in message
    assert "min_ref_images is 4" in message and not run.curated("few").exists()

    report = pd.read_csv(run.dir / "curated" / "mixed.report.csv", keep_default_na=False)
    assert len(report) == report.file.nunique() == len(expected)  # one row per entry, sidecars excluded
    for row in report.itertuples():
        status, reason = expected[row.file]
        assert (row.status, row.reason[: len(reason)]) == (status, reason), row.file
        assert bool(row.reason) == (row.status == "rejected")
        assert row.role == row.file.split("/")[0] and row.concept == 0
    assert not report.reason.str.contains("object at 0x").any()  # a person's words, no Python reprs

    table = pq.read_table(run.curated("mixed")).to_pandas()
    assert sorted(table.source_path) == sorted(report.file[report.status == "kept"])
    assert (table.role == table.source_path.str.split("/").str[0]).all()
    assert set(table.role) == {"ref", "aux", "heldout"}
    training_data = StyleData.load(run.curated("mixed"))  # held-out images are scored, never trained on
    assert set(training_data.roles) == {"ref", "aux"} and len(training_data.roles) == (table.role != "heldout").sum()
    assert set(table.concept) == {0} and set(table.token) == {"<mixed>"} and set(table.class_word) == {"style"}
    assert table.content_hash.nunique() == len(table)
    captions = dict(zip(table.source_path, zip(table.caption, table.caption_source)))
    assert captions["ref/ref_00.png"] == ("a ref picture number 0", "sidecar")
    assert captions["ref/rotated.jpg"] == ("tourné à droite", "sidecar")
    assert captions["ref/été 1.png"] == ("an image", "template")
    for png in table.image:
        image = Image.open(io.BytesIO(png))
        assert image.mode == "RGB" and image.size == (run.resolution, run.resolution)

    written = run.curated("mixed").stat().st_mtime_ns
    again = Run(config=config, styles=load_styles(config, REGISTRY, ["mixed"]))
    curate_styles(again)
    assert again.outcomes == {"mixed": {"curate": "reused"}}
    assert run.curated("mixed").stat().st_mtime_ns == written

    os.utime(styles_dir / "mixed" / "ref" / "ref_03.png")  # touched: now
    touched = Run(config=config, styles=load_styles(config, REGISTRY, ["mixed"]))
    curate_styles(touched)
    assert touched.outcomes == {"mixed": {"curate": "ok"}}
    assert run.curated("mixed").stat().st_mtime_ns != written
