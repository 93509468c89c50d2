"""Training methods: each module states only what differs from the shared loop in pipeline/train.py."""
from pipeline.config import StyleConfig
from pipeline.methods.base import Batch, ClassImages, Method, StyleData
from pipeline.methods.dreambooth import DreamBooth
from pipeline.methods.styleboost import StyleBoost
from pipeline.methods.stylealigned import StyleAligned
from pipeline.methods.styledrop import StyleDrop
from pipeline.methods.textboost import TextBoost

METHODS: dict[str, type[Method]] = {
    "styleboost": StyleBoost,
    "dreambooth": DreamBooth,
    "stylealigned": StyleAligned,
    "textboost": TextBoost,
    "styledrop": StyleDrop,
}


def get_method(name: str, style: StyleConfig | None = None) -> Method:
    return METHODS[name](style)


__all__ = ["METHODS", "Batch", "ClassImages", "Method", "StyleData", "get_method"]
