"""SUPRA linear attention (Mercat et al. 2024) in every converted layer: ReLU feature maps, RoPE after them, fixed
per-head decay, GroupNorm (``modeling/mixer_supra.py``)."""

from pydantic import Field

from ..modeling.mixer_supra import SupraMixer
from .method import Conversion, MethodOptions, Paper


class SupraOptions(MethodOptions):
    chunk_size: int = Field(SupraMixer.SETTINGS["chunk_size"], ge=1,  # declared once, by the mixer
                            description="chunk length of the parallel (chunked) form")


class Supra(Conversion):
    name = "supra"
    summary = "SUPRA linear attention: ReLU feature maps, RoPE after them, fixed per-head decay, GroupNorm"
    paper = Paper("Linearizing Large Language Models (Mercat et al., 2024)", "https://arxiv.org/abs/2405.06640")
    Options = SupraOptions
    mixers = (SupraMixer,)
    test_options = {"chunk_size": 8}


METHOD = Supra()
