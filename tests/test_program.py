"""The layer program: dropped layers, blocks run several times, their cache slots, transforms, 0.1-format models."""

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import DynamicCache

from rnnify.convert import METHODS, build_student, convert
from rnnify.convert.method import MethodOptions, Paper, Plan, Transform
from rnnify.errors import RnnifyError
from rnnify.modeling import RnnifyConfig
from rnnify.modeling.layer_program import describe, parse

from .conftest import tiny_model

FORMAT_01 = str(Path(__file__).parent / "data" / "format-0.1")


def program_model(teacher, program, method="test", mixer_config=None):
    return build_student(teacher, Plan(program, mixer_config or {}), method)


def truncated_source(teacher, layers):
    """The source model with only ``layers`` (in order): the independent reference for dropped layers."""
    cfg = teacher.config.to_dict()
    cfg["num_hidden_layers"] = len(layers)
    cfg.pop("layer_types", None)
    small = transformers.AutoModelForCausalLM.from_config(
        type(teacher.config).from_dict(cfg), attn_implementation=teacher.config._attn_implementation).eval()
    sd = {}
    for k, v in teacher.state_dict().items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i in layers:
                sd[k.replace(f"model.layers.{i}.", f"model.layers.{layers.index(i)}.", 1)] = v
        else:
            sd[k] = v
    small.load_state_dict(sd, strict=False)
    return small


@pytest.mark.parametrize("bad,needle", [
    ([{"layer": 0}, {"layer": 0}], "appears twice"),
    ([{"layer": 9}], "not a source layer"),
    ([{"block": [{"layer": 1}, {"layer": 3}]}], "contiguous"),
    ([{"block": [{"layer": 1}], "loops": 0}], "loops must be >= 1"),
    ([{"layer": 1, "mixr": "x"}], "unknown step keys"),
    ([{"block": [{"layer": 1}], "adapter": "magic"}], "accepted: concat_linear, none"),
    ([], "non-empty"),
])
def test_bad_programs_are_refused(bad, needle):
    with pytest.raises(ValueError, match=needle):
        parse(bad, 4)


def test_dropped_layers_equal_the_source_without_them():
    teacher = tiny_model("llama")
    student = program_model(teacher, [{"layer": 0}, {"layer": 3, "mixer": "attention"}])
    assert student.config.layer_mixers == ["attention", "dropped", "dropped", "attention"]
    assert student.config.layer_types == ["full_attention", "dummy", "dummy", "full_attention"]
    assert not any(".layers.1." in n or ".layers.2." in n for n, _ in student.named_parameters())
    ref = truncated_source(teacher, [0, 3])
    x = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        assert torch.equal(student(x).logits, ref(x).logits)
        # decoding through the cache (dummy slots for the dropped layers)
        out = student.generate(x[:, :5], attention_mask=torch.ones_like(x[:, :5]), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
        ref_out = ref.generate(x[:, :5], attention_mask=torch.ones_like(x[:, :5]), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref_out)


def looped(teacher, loops=1, adapter_init="passthrough", state_init="zeros", mixer="attention"):
    block = {"block": [{"layer": 2, "mixer": mixer}, {"layer": 3, "mixer": mixer}], "loops": loops,
             "adapter_init": adapter_init, "state_init": state_init}
    return program_model(teacher, [{"layer": 0}, block], mixer_config={"chunk_size": 8})


def test_one_loop_with_the_passthrough_adapter_is_the_source_without_the_dropped_layers():
    teacher = tiny_model("llama")
    student = looped(teacher)
    assert student.config.layer_mixers == ["attention", "dropped", "attention", "attention"]
    assert "blocks.0.adapter.weight" in student.new_parameter_names()
    ref = truncated_source(teacher, [0, 2, 3])
    x = torch.randint(0, 128, (2, 15))
    with torch.no_grad():
        assert torch.equal(student(x).logits, ref(x).logits)
    lines = describe(student.config.parsed_program(), student.config.layer_types)
    assert lines[1].startswith("block    layers 2-3 x 1 loops") and lines[-1] == "dropped  1"


@pytest.mark.parametrize("mixer", ["attention", "supra"])
def test_loops_decode_through_their_own_cache_slots(mixer):
    teacher = tiny_model("llama")
    student = looped(teacher, loops=3, adapter_init="random", mixer=mixer)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = student(x).logits
        cache = DynamicCache(config=student.config)
        outs = [student(x[:, :5], cache=cache, use_cache=True).logits]
        for t in range(5, 12):
            outs.append(student(x[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)
    assert len(cache.layers) == 4 + 2 * 2  # 4 source slots + 2 further loops x 2 block layers
    with torch.no_grad():  # a different loop count per call changes the output
        assert not torch.allclose(student(x, recurrence=1).logits, full)


def test_more_loops_later_take_the_missing_tokens_from_the_deepest_loop():
    teacher = tiny_model("llama")
    student = looped(teacher, loops=2, adapter_init="random")
    x = torch.randint(0, 128, (1, 9))
    cache = DynamicCache(config=student.config)
    with torch.no_grad():
        student(x[:, :6], cache=cache, use_cache=True, recurrence=2)
        slots = cache.rnnify_slots
        deepest = {layer: cache.layers[slots.slot(layer, 1)].keys.clone() for layer in (2, 3)}
        student(x[:, 6:7], cache=cache, use_cache=True, recurrence=4)
    for layer in (2, 3):
        for loop in (2, 3):  # new loops: the 6 earlier tokens come from loop 1 (the deepest that had them)
            keys = cache.layers[slots.slot(layer, loop)].keys
            assert keys.shape[-2] == 7
            assert torch.equal(keys[..., :6, :], deepest[layer])
    with torch.no_grad():  # back to fewer loops, then more again: the skipped token is filled in too
        student(x[:, 7:8], cache=cache, use_cache=True, recurrence=1)
        student(x[:, 8:9], cache=cache, use_cache=True, recurrence=4)
    assert all(cache.layers[slots.slot(layer, 3)].keys.shape[-2] == 9 for layer in (2, 3))
    assert torch.equal(cache.layers[slots.slot(2, 3)].keys[..., 7, :], cache.layers[2].keys[..., 7, :])


def test_truncated_backprop_leaves_the_early_loops_without_gradient():
    teacher = tiny_model("llama")
    student = looped(teacher, loops=3, adapter_init="random").train()
    x = torch.randint(0, 128, (2, 10))
    student(x, labels=x, backprop_loops=0).loss.backward()
    assert student.blocks[0].adapter.weight.grad is None  # no loop kept its graph
    assert student.model.norm.weight.grad is not None  # what follows the block still trains
    student.zero_grad(set_to_none=True)
    student(x, labels=x, backprop_loops=1).loss.backward()
    one = student.blocks[0].adapter.weight.grad.clone()
    student.zero_grad(set_to_none=True)
    student(x, labels=x).loss.backward()
    assert not torch.allclose(one, student.blocks[0].adapter.weight.grad)


def test_models_saved_by_version_0_1_load_with_the_same_logits():
    ref = load_file(f"{FORMAT_01}/logits.safetensors")
    for method, mixer in (("supra", "supra"), ("lolcats", "lolcats"), ("mamba_in_llama", "mamba2")):
        # 0.1 saved the eager attention of the tiny source; the logits were computed with it
        model = transformers.AutoModelForCausalLM.from_pretrained(f"{FORMAT_01}/{method}", attn_implementation="eager")
        assert mixer in model.config.layer_mixers and model.config.program[0]["layer"] == 0
        with torch.no_grad():
            # Stored by another run on another processor: the same sums in float32 may round differently there
            # (vector width, FMA, reassociation), by ~1e-7 on logits of size ~0.3 (seen: 1.6e-7). A format change
            # (a weight read into the wrong place, a lost setting) moves them by far more than 1e-5.
            torch.testing.assert_close(model(ref["input_ids"]).logits, ref[method], atol=1e-5, rtol=1e-5,
                                       msg=method)


def test_a_0_1_config_becomes_a_program_with_per_layer_settings():
    base = tiny_model("llama").config
    cfg = RnnifyConfig(base_config=base.to_dict(), layer_types=["hybrid_sliding_sink"] * 4,
                       layer_mixers=["lolcats", "attention", "lolcats", "lolcats"],
                       mixer_config={"window": 8, "per_layer": {"2": {"window": 16}}, "linear_branch": True})
    assert cfg.program[1] == {"layer": 1, "mixer": "attention"}
    assert cfg.program[2] == {"layer": 2, "mixer": "lolcats", "settings": {"window": 16}}
    assert "per_layer" not in cfg.mixer_config
    assert cfg.layer_types == ["hybrid_sliding_sink", "full_attention", "hybrid_sliding_sink", "hybrid_sliding_sink"]
    baseline = RnnifyConfig(base_config=base.to_dict(), layer_mixers=["lolcats"] * 4,
                            mixer_config={"linear_branch": False})
    assert baseline.layer_mixers == ["window"] * 4


# ------------------------------------------------------------------------------------------------ transforms
class WindowEveryAttention(Transform):
    """A test transform: every layer an rnnify model kept as attention becomes a sliding window."""

    name = "window_kept"
    summary = "test transform"
    paper = Paper("none", "https://example.org")

    class Options(MethodOptions):
        window: int = 4

    def apply(self, model, options):
        program = [{**s, "mixer": "window", "settings": {"window": options["window"], "sinks": 1}}
                   if s["mixer"] == "attention" else s for s in model.config.program]
        cfg = model.config.to_dict()
        cfg["program"] = program
        new = type(model)(RnnifyConfig.from_dict(cfg))
        new.load_state_dict(model.state_dict())
        return new.eval()


@pytest.fixture
def with_transform(monkeypatch):
    monkeypatch.setitem(METHODS, "window_kept", WindowEveryAttention())


def test_transforms_take_an_rnnify_model_and_record_themselves(with_transform):
    teacher = tiny_model("llama")
    student = convert(teacher, "supra", keep_attention="0,2")
    out = convert(student, "window_kept", options={"window": 3})
    assert out.config.layer_mixers == ["window", "supra", "window", "supra"]
    assert out.config.transforms == [{"method": "window_kept", "options": {"window": 3}}]
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.isfinite(out(x).logits).all()
    with pytest.raises(RnnifyError, match="transforms an rnnify model; convert the source first"):
        convert(teacher, "window_kept")
    with pytest.raises(RnnifyError, match="already an rnnify model.*transforms: .*window_kept"):
        convert(student, "lolcats")
    with pytest.raises(RnnifyError, match="is a transform: it keeps the model's attention layers"):
        convert(student, "window_kept", keep_attention="1")


def test_cli_and_recipe_run_a_transform(with_transform, tiny_llama_dir, tmp_path, capsys):
    from rnnify.cli import main
    from rnnify.recipe import recipe_from_dict

    assert main(["convert", str(tiny_llama_dir), "--method", "supra", "--keep-attention", "1",
                 "--out", str(tmp_path / "s")]) == 0
    assert main(["convert", str(tmp_path / "s"), "--method", "window_kept", "--window", "5",
                 "--out", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "transformed" in out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    assert loaded.config.layer_mixers[1] == "window" and loaded.config.transforms[0]["method"] == "window_kept"
    assert main(["convert", str(tmp_path / "s"), "--method", "lolcats", "--out", str(tmp_path / "x")]) == 2
    assert "already an rnnify model" in capsys.readouterr().err
    r = recipe_from_dict({"model": {"source": "x"}, "output": {"dir": "o"},
                          "conversion": {"method": "supra", "transforms": [{"method": "window_kept"}]}})
    assert r.conversion.transforms[0].method == "window_kept"
    with pytest.raises(RnnifyError, match="is a conversion, not a transform"):
        recipe_from_dict({"model": {"source": "x"}, "output": {"dir": "o"},
                          "conversion": {"method": "supra", "transforms": [{"method": "lolcats"}]}})
