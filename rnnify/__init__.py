"""rnnify: convert pretrained transformers into recurrent and hybrid models."""

__version__ = "0.1.0"

from .modeling import RnnifyConfig, RnnifyForCausalLM  # noqa: E402  (registers the Auto classes)

__all__ = ["RnnifyConfig", "RnnifyForCausalLM", "__version__"]
