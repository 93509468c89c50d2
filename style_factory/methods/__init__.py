"""Training methods: each module states only what differs from the shared loop (style_factory/loop.py); a method is
registered by one line below."""
from style_factory.config import StyleConfig
from style_factory.methods.base import Method
from style_factory.methods.content import Content
from style_factory.methods.dreambooth import DreamBooth
from style_factory.methods.styleboost import StyleBoost
from style_factory.methods.stylealigned import StyleAligned
from style_factory.methods.styledrop import StyleDrop
from style_factory.methods.textboost import TextBoost

METHODS: dict[str, type[Method]] = {
    "styleboost": StyleBoost,
    "dreambooth": DreamBooth,
    "stylealigned": StyleAligned,
    "textboost": TextBoost,
    "styledrop": StyleDrop,
    "content": Content,
}


def get_method(name: str, style: StyleConfig | None = None) -> Method:
    return METHODS[name](style)
