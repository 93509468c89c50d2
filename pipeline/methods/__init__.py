"""Training methods: each module states only what differs from the shared loop in pipeline/train.py."""
from pipeline.methods.base import Batch, Method, StyleData
from pipeline.methods.styleboost import StyleBoost

METHODS: dict[str, type[Method]] = {"styleboost": StyleBoost}


def get_method(name: str) -> Method:
    return METHODS[name]()


__all__ = ["METHODS", "Batch", "Method", "StyleData", "get_method"]
