"""How far into each data source the training of a model already went, so a post-training that starts from it
(``conversion.start_from``) reads on from there instead of reading the same text again.

A model folder that ``rnnify run`` wrote holds the recipe that trained it (``recipe.yaml``), and that recipe fixes the
blocks each stage read: a stage of ``n`` blocks of ``seq_len`` tokens reads the first ``n`` blocks of its source (for
a mixture, each source's share of the first ``n``: ``distill/mixture.py``), and packing cuts one contiguous token
stream, so "the first ``t`` tokens" means the same text at any ``seq_len``. A source is named by its fingerprint (the
token cache's: a file's resolved path, size and modification time; a Hub dataset's name, config and split), so only the
same text continues. The positions chain through the start folder's own ``start_from``.

A start folder without ``recipe.yaml`` (``rnnify convert`` wrote it, or another tool) has read nothing as far as
this knows, and the post-training starts at the first block (said in one line).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import sources
from ..distill.mixture import interleave
from ..distill.token_cache import data_fingerprint
from ..errors import RnnifyError
from ..recipe import Recipe, load_recipe
from .plan import PlannedStage, RunPlan

_MAX_CHAIN = 32  # start_from links followed (a folder that names itself ends the chain)


def source_key(spec) -> str | None:
    """The fingerprint of a data source as a string; None when it cannot be read here (a moved file)."""
    try:
        return json.dumps(data_fingerprint(spec), sort_keys=True, default=str)
    except OSError:
        return None


def stage_reads(stage: PlannedStage) -> dict[str, int]:
    """Tokens read from the start of each source by ``stage`` (source fingerprint -> tokens)."""
    n, names = stage.blocks, list(stage.data)
    if len(names) == 1:
        counts = [n]
    else:
        picked, _ = interleave([w for _, w in stage.data.values()], n)
        counts = torch.bincount(picked, minlength=len(names)).tolist()
    out = {}
    for (spec, _), count in zip(stage.data.values(), counts):
        key = source_key(spec)
        if key is not None:
            out[key] = out.get(key, 0) + count * stage.settings.seq_len
    return out


def continues(recipe: Recipe, stage: PlannedStage) -> bool:
    """Whether ``stage`` reads on past what its start model read (``data_start: continue`` after a start_from)."""
    return recipe.conversion.start_from is not None and stage.settings.data_start == "continue"


def positions(recipe: Recipe, before: dict[str, int]) -> dict[str, int]:
    """Where each source's reading stands after ``recipe`` ran, given the positions ``before`` of its start model:
    a continuing stage reads from there, any other from the first block."""
    out = dict(before)
    for stage in RunPlan.of(recipe).stages:
        start = before if continues(recipe, stage) else {}
        for key, tokens in stage_reads(stage).items():
            out[key] = max(out.get(key, 0), start.get(key, 0) + tokens)
    return out


def tokens_read(model: str, log=print, _chain: tuple[str, ...] = ()) -> dict[str, int]:
    """Source fingerprint -> tokens read from its start by the training that wrote ``model`` (a folder or Hub id)
    and by the models it started from; empty when ``model`` carries no recipe."""
    if model in _chain or len(_chain) >= _MAX_CHAIN:
        return {}
    try:
        folder = Path(sources.local_path(model, progress=lambda *_: None).path)
    except RnnifyError as e:
        if not _chain:
            raise
        # a start model's own start, moved or deleted since
        log(f"{model} (which {_chain[-1]} started from) is not here ({str(e).splitlines()[0]}): the text its training "
            "read is not counted")
        return {}
    path = folder / "recipe.yaml"
    unknown = "what its training read is not counted" if _chain else "the stages read their data from the first block"
    if not path.is_file():
        log(f"{model} holds no recipe.yaml (it was not trained by `rnnify run`): its training data is unknown, so "
            f"{unknown}")
        return {}
    try:
        recipe = load_recipe(str(path))
    except RnnifyError as e:
        log(f"{path} cannot be read as a recipe ({str(e).splitlines()[0]}): {unknown}")
        return {}
    before = tokens_read(recipe.conversion.start_from, log, (*_chain, model)) if recipe.conversion.start_from else {}
    return positions(recipe, before)


def blocks_to_skip(read: dict[str, int], spec, seq_len: int) -> tuple[int, int]:
    """(blocks of ``seq_len`` to skip in ``spec``, tokens the start model read of it): a partly read block counts as
    read."""
    key = source_key(spec)
    tokens = read.get(key, 0) if key is not None else 0
    return math.ceil(tokens / seq_len), tokens


__all__ = ["blocks_to_skip", "continues", "positions", "source_key", "stage_reads", "tokens_read"]
