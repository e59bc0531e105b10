"""The converted-model format: config, layer program, causal LM, mixers and their cache layers.

The files here (plus ``rnnify/kernels/reference.py``, shipped as ``kernels_reference.py``) are copied next
to every converted model so it loads with ``trust_remote_code=True`` where rnnify is not installed
(``remote_code.py`` derives the list from the imports).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_rnnify import RnnifyConfig
from .mixer_base import Mixer
from .mixers import MIXERS, get_mixer
from .modeling_rnnify import RnnifyForCausalLM

AutoConfig.register("rnnify", RnnifyConfig, exist_ok=True)
AutoModelForCausalLM.register(RnnifyConfig, RnnifyForCausalLM, exist_ok=True)

__all__ = ["MIXERS", "Mixer", "RnnifyConfig", "RnnifyForCausalLM", "get_mixer"]
