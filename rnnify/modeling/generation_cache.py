"""The cache a converted model decodes with: transformers' ``DynamicCache`` (which builds each layer's cache from
the config's layer types) plus the token count of models whose every layer is recurrent.

``DynamicCache.get_seq_length()`` reads the first attention layer's length. A model with no attention layer has
none, and it raises there (transformers 5.17's ``generate`` asked it at every prefill; 5.24's skips the question
for all-recurrent caches, but other callers still ask). The model records the positions it has consumed in
``rnnify_seen_tokens``; this class answers with it.
"""

from __future__ import annotations

import inspect

import transformers
from packaging.version import Version
from transformers.cache_utils import CacheLayerMixin, DynamicCache

# The oldest transformers this code runs on (pyproject.toml pins the same floor). 5.24 renamed ``past_key_values``
# to ``cache`` in the mask functions and the layers' forwards; on 5.17, 13 of the test suite's checks fail.
MIN_TRANSFORMERS = "5.24"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(f"rnnify models need transformers >= {MIN_TRANSFORMERS}; this environment has "
                      f"{transformers.__version__}: pip install -U 'transformers>={MIN_TRANSFORMERS},<6'")


def cache_keyword(fn) -> str:
    """The name under which ``fn`` takes the cache: ``cache`` in transformers' own forwards and masks, and in a
    model's remote code that may follow an older convention, ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


class RnnifyCache(DynamicCache):
    rnnify_seen_tokens: int = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx == 0 and not any(isinstance(layer, CacheLayerMixin) for layer in self.layers):
            return self.rnnify_seen_tokens
        return super().get_seq_length(layer_idx)

    def reset(self) -> None:
        super().reset()
        self.rnnify_seen_tokens = 0


def as_rnnify_cache(cache):
    """A plain ``DynamicCache`` (built by ``generate`` or by a user) as an ``RnnifyCache``: the subclass adds
    no state but the count, so the object is re-classed in place and keeps its layers."""
    if type(cache) is DynamicCache:
        cache.__class__ = RnnifyCache
    return cache


__all__ = ["MIN_TRANSFORMERS", "RnnifyCache", "as_rnnify_cache", "cache_keyword"]
