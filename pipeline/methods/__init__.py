"""Training methods: each module states only what differs from the shared loop (pipeline/loop.py); a method is
registered by one line below."""
from pipeline.config import StyleConfig
from pipeline.methods.base import Method
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
