"""The mixer registry: one line per mixer class (each lives in its own ``mixer_<name>.py``).

Converted models ship this file and every file it imports (``remote_code.py`` follows the imports), so a saved
model can build any mixer its layer program names with ``trust_remote_code=True`` where rnnify is not installed.
"""

from __future__ import annotations

from .mixer_ahn import AhnMixer
from .mixer_base import Mixer
from .mixer_gated_deltanet import GatedDeltaNetMixer
from .mixer_lolcats import LolcatsMixer
from .mixer_mamba2 import Mamba2Mixer
from .mixer_supra import SupraMixer
from .mixer_window import WindowMixer

MIXERS: dict[str, type[Mixer]] = {m.name: m for m in (
    SupraMixer,
    LolcatsMixer,
    Mamba2Mixer,
    WindowMixer,
    AhnMixer,
    GatedDeltaNetMixer,
)}


def get_mixer(name: str) -> type[Mixer]:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; accepted: attention, {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


__all__ = ["MIXERS", "Mixer", "get_mixer"]
