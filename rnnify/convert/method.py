"""The method descriptor: everything rnnify knows about a conversion method, in one place.

A method module ``rnnify/convert/<name>.py`` defines ``METHOD``, an instance of a ``Method`` subclass with:

* ``name`` and ``summary`` (one line, for ``rnnify ls`` and ``--help``), ``paper`` (title and link, for the model
  card);
* ``Options``: a pydantic model of its settings (types, bounds and a ``description`` each). The CLI flags of
  ``rnnify convert`` / ``inspect``, recipe ``conversion.options`` validation and ``rnnify ls`` are derived from it;
* ``mixers``: the mixer classes it installs (their cache layer types and the files shipped with saved models
  follow from them);
* ``test_options``: small settings for the test matrix (``tests/test_methods.py`` runs every registered method);
  ``test_variants``: named option sets on top of them that the matrix also runs (each kind of memory, each init);
and is one of two kinds: a ``Conversion`` turns a source model into a student (``plan()``: source config -> layer
program); a ``Transform`` rewrites an rnnify model (``apply()``; ``accepts()`` says which models).

``convert/registry.py`` registers the method with one line.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import RnnifyError
from ..modeling.layer_program import ATTENTION


@dataclass(frozen=True)
class Paper:
    title: str
    url: str


class MethodOptions(BaseModel):
    """Base of every method's options: unknown settings are errors."""

    model_config = ConfigDict(extra="forbid")


class CalibratedOptions(MethodOptions):
    """Options of a conversion that fits each layer's output scale to its attention's at conversion
    (``Conversion.calibrate``, ``teacher_attention.fit_output_scales``)."""

    calibrate_tokens: int = Field(1024, ge=0, le=65536,
                                  description="tokens of the selection text on which each layer's output scale is "
                                              "fitted to its attention's at conversion (0: none, else >= 64; "
                                              "gated_deltanet: needs --output-gate; mamba_in_llama: with --init "
                                              "attention)")

    @field_validator("calibrate_tokens")
    @classmethod
    def _enough(cls, v):
        if 0 < v < 64:
            raise ValueError("accepted: 0 (no calibration) or at least 64 tokens")
        return v


@dataclass
class Plan:
    """What a conversion builds: the layer program and the settings shared by its mixers."""

    program: list[dict]
    mixer_config: dict = field(default_factory=dict)


class Method:
    """What every method has: a name, a paper, its options and the mixers it installs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    mixers: ClassVar[tuple] = ()
    test_options: ClassVar[dict] = {}
    test_variants: ClassVar[dict[str, dict]] = {}  # name -> options over test_options, run by the matrix too
    keeps_attention: ClassVar[bool] = True  # takes --keep-attention / --attention-fraction / --attention-every

    # ---- options ---------------------------------------------------------------------------------------------
    def resolve_options(self, options: dict | None) -> dict:
        """Defaults filled in, types checked; an error names the bad setting and what is accepted."""
        options = {k: v for k, v in (options or {}).items() if v is not None}
        known = self.Options.model_fields
        unknown = sorted(set(options) - set(known))
        if unknown:
            accepted = ", ".join(sorted(known)) or "none"
            raise RnnifyError(f"method {self.name!r} has no setting {', '.join(unknown)}; its settings: {accepted}")
        try:
            return self.Options(**options).model_dump()
        except ValidationError as e:
            err = e.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else "?"
            value = options.get(name, err.get("input"))
            why = err["msg"].removeprefix("Value error, ") if err["type"] == "value_error" or name not in known \
                else accepted_values(known[name])  # a validator's own words, else the field's type and bounds
            raise RnnifyError(f"method {self.name!r}: {name}={value!r} is not accepted; {why}") from None

    @property
    def layer_types(self) -> list[str]:
        return sorted({m.layer_type for m in self.mixers})

    def check_source(self, source_config) -> None:
        """Refuse a source this method cannot take (beyond the families rnnify supports); default: accept."""


class Conversion(Method):
    """A method that turns a source model into a student."""

    def plan(self, source_config, keep_attention: list[int], options: dict) -> Plan:
        """Default plan: every layer not kept as attention gets the method's (first) mixer with its options."""
        n = _num_layers(source_config)
        mixer = self.mixers[0].name
        program = [{"layer": i, "mixer": ATTENTION if i in keep_attention else mixer} for i in range(n)]
        return Plan(program, dict(options))

    def check_training(self, options: dict, seq_len: int, stage: str) -> None:
        """Refuse a training stage this conversion cannot learn from; by default, sinks that fill the sequence."""
        sinks = options.get("sinks")
        if sinks is not None and sinks >= seq_len:
            raise RnnifyError(f"stage {stage}: sinks {sinks} fill the whole seq_len {seq_len}; accepted: sinks < "
                              "seq_len (lower the sinks or raise seq_len)")

    def finish(self, student, options: dict) -> None:
        """Last touches on the built student (e.g. untie embeddings); default: none."""

    def calibrate(self, student, teacher, ids, options: dict, log) -> None:
        """Fit, on the source's own activations for the token ids ``ids`` ([1, T]), what the conversion sets from data
        (``convert()`` calls it when it has a tokenizer and text); default: nothing."""


class Transform(Method):
    """A method that rewrites an rnnify model (it runs after a conversion, e.g. StateX)."""

    keeps_attention: ClassVar[bool] = False
    test_source: ClassVar[str | None] = None  # the conversion its tests start from

    def accepts(self, source_config) -> bool:
        """Whether this model is one it rewrites (default: an rnnify model)."""
        return getattr(source_config, "model_type", None) == "rnnify"

    def apply(self, model, options: dict):
        raise NotImplementedError


def _num_layers(config) -> int:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return cfg.num_hidden_layers


def accepted_values(info) -> str:
    """'accepted: ...' for a pydantic field, from its type and bounds."""
    ann, choices = option_type(info)
    if choices is not None:
        return "accepted: " + ", ".join(str(a) for a in choices)
    bounds = []
    for m in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sym} {getattr(m, attr)}")
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(ann, str(ann))
    return "accepted: " + kind + (" " + " and ".join(bounds) if bounds else "")


def option_type(info) -> tuple[type, list | None]:
    """(python type, choices) of an option field, for building CLI flags."""
    ann = info.annotation
    if typing.get_origin(ann) is typing.Union or type(ann).__name__ == "UnionType":
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if typing.get_origin(ann) is typing.Literal:
        choices = list(typing.get_args(ann))
        return type(choices[0]), choices
    return ann, None


def describe_options(method: Method) -> list[tuple[str, str, Any]]:
    """(name, help, default) of each option, for ``rnnify ls``."""
    return [(name, info.description or "", info.default) for name, info in method.Options.model_fields.items()]


__all__ = ["Conversion", "Method", "MethodOptions", "Paper", "Plan", "Transform", "accepted_values", "describe_options",
           "option_type"]
