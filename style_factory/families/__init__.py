"""Model families: one module each (see README.md here); a family is registered by one line below."""
from style_factory.families.base import Family
from style_factory.families.sd1 import SD1
from style_factory.families.sd2 import SD2
from style_factory.families.sdxl import SDXL

FAMILIES: dict[str, type[Family]] = {
    "sd1": SD1,
    "sd2": SD2,
    "sdxl": SDXL,
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]()
