"""StateX: merged heads and multiplied Mamba2 state, on rnnify models and on transformers' own Mamba2."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache

from rnnify.cache_size import cache_bytes, measured_cache_bytes
from rnnify.cli import main
from rnnify.convert import convert
from rnnify.errors import RnnifyError

from .conftest import tiny_model
from .test_methods import perturb, stepwise_logits

SOURCES = {
    "supra": {"chunk_size": 8},
    "lolcats": {"chunk_size": 8, "window": 4, "sinks": 2, "init_linear_mix_logit": 0.0},
    "ahn": {"chunk_size": 8, "window": 4, "sinks": 2},
    "mamba_in_llama": {"chunk_size": 8},
}


def source(method, keep="0", fam="llama"):
    return perturb(convert(tiny_model(fam), method, keep_attention=keep, options=SOURCES[method]))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ["supra", "lolcats", "ahn"])
@pytest.mark.parametrize("init", ["keep", "paper"])
def test_merged_heads_add_no_parameters_and_decode_as_they_run(method, init):
    before = source(method)
    after = perturb(convert(before, "statex", options={"layers": "all", "init": init}), seed=3)
    assert n_params(after) == n_params(before)
    mixers = dict(after.mixers())
    assert all(m.merged for m in mixers.values())
    # the state grew by the head count (H = 4 here)
    grow = cache_bytes(after, 64, kv_bytes=4) - cache_bytes(before, 64, kv_bytes=4)
    H, D = mixers[1].num_heads, mixers[1].head_dim
    per_layer = {"supra": (H * D) ** 2 - H * D * D, "ahn": (H * D) ** 2 - H * D * D,
                 "lolcats": 2 * H * D * (H * D + 1) - H * 2 * D * (D + 1)}[method]
    assert grow == len(mixers) * per_layer * 4
    x = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        full = after(x).logits
        torch.testing.assert_close(stepwise_logits(after, x, 7), full, atol=1e-4, rtol=1e-4)
        cache = DynamicCache(config=after.config)
        after(x, cache=cache, use_cache=True)
    assert measured_cache_bytes(cache) == cache_bytes(after, 19, batch=2, kv_bytes=4)
    if init == "keep" and method == "supra":  # the merged head is the old heads' concatenation: same q/k/v/o
        assert torch.equal(after.model.layers[1].self_attn.q_proj.weight, before.model.layers[1].self_attn.q_proj.weight)
    if init == "paper" and method == "supra":  # re-initialised mixer and input norm
        assert not torch.equal(after.model.layers[1].self_attn.q_proj.weight,
                               before.model.layers[1].self_attn.q_proj.weight)
        assert torch.equal(after.model.layers[1].input_layernorm.weight, torch.ones(64))
    if init == "paper" and method != "supra":  # the window's attention stays, the memory starts afresh
        assert torch.equal(after.model.layers[1].self_attn.q_proj.weight, before.model.layers[1].self_attn.q_proj.weight)


@pytest.mark.parametrize("init", ["paper", "merge_copy", "merge_zero", "preserve"])
def test_mamba2_state_multiplied(init):
    before = source("mamba_in_llama", keep="1")
    after = convert(before, "statex", options={"layers": "all", "init": init, "state_multiplier": 3})
    m0, m1 = before.model.layers[0].self_attn, after.model.layers[0].self_attn
    assert m1.d_state == 3 * m0.d_state
    # only B/C rows (in_proj) and their conv channels are added
    rows = (m0.num_kv_heads + m0.num_heads) * 2 * m0.d_state
    per_layer = rows * m0.in_proj.in_features + rows * m0.conv_kernel + rows  # weights, conv weights, conv bias
    assert n_params(after) - n_params(before) == 3 * per_layer
    x = torch.randint(0, 128, (2, 21))
    with torch.no_grad():
        full = after(x).logits
        torch.testing.assert_close(stepwise_logits(after, x, 9), full, atol=1e-4, rtol=1e-4)
        if init == "preserve":  # function-preserving: the expanded model computes what it did
            assert torch.equal(full, before(x).logits)
        if init == "merge_zero":
            assert torch.equal(full, before(x).logits)
    if init == "paper":
        assert torch.equal(m1.A_log, torch.log(torch.arange(1, m1.num_heads + 1, dtype=torch.float32)))
    # expanding again multiplies again
    again = convert(after, "statex", options={"layers": "0", "init": "preserve", "state_multiplier": 2})
    assert again.model.layers[0].self_attn.d_state == 6 * m0.d_state
    assert again.config.transforms[-1]["method"] == "statex" and len(again.config.transforms) == 2


def merged_mamba2_reference(m, h, mult):
    """A Mamba2 mixer whose head h scores by the sum of ``mult`` heads' scores, C_{h + j H/G} . B_{g(h) + j}, in plain
    PyTorch from the unexpanded mixer ``m``'s weights (quadratic form of the SSD recurrence; Dao & Gu 2024, eq. 1)."""
    T = h.shape[1]
    H, G, D, N = m.num_heads, m.num_kv_heads, m.head_dim, m.d_state
    z, xbc, dt = torch.split(m.in_proj(h), [m.d_inner, m.d_xb + m.d_b + m.d_c, H], -1)
    xbc = F.silu(F.conv1d(xbc.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.conv_kernel - 1,
                          groups=xbc.shape[-1])[..., :T]).transpose(1, 2)
    x, b, c = torch.split(xbc, [m.d_xb, m.d_b, m.d_c], -1)
    x, b, c = x.unflatten(-1, (G, D)), b.unflatten(-1, (G, N)), c.unflatten(-1, (H, N))
    dt = F.softplus(dt + m.dt_bias)                      # [B, T, H]
    cum = torch.cumsum(dt * -torch.exp(m.A_log), 1)      # log decay from the start
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    ys = []
    for head in range(H):
        g = head // (H // G)
        score = sum(c[:, :, (head + j * (H // G)) % H] @ b[:, :, (g + j) % G].transpose(1, 2) for j in range(mult))
        decay = torch.exp(cum[:, :, None, head] - cum[:, None, :, head]).masked_fill(~causal, 0.0)
        v = x[:, :, g] * dt[..., head, None]
        ys.append((score * decay) @ v + m.D[head] * x[:, :, g])
    return m.out_proj(m.norm(torch.stack(ys, 2).flatten(2), z))


def test_merge_heads_reads_the_summed_scores_of_the_merged_heads():
    """init merge_heads: each head's larger state is keyed by the next KV groups' B and read by their heads' C, so the
    expanded mixer computes the merged-score recurrence (against a plain-PyTorch quadratic reference)."""
    before = source("mamba_in_llama", keep="1")
    after = convert(before, "statex", options={"layers": "all", "init": "merge_heads", "state_multiplier": 2})
    m0, m1 = before.model.layers[0].self_attn, after.model.layers[0].self_attn
    assert m1.d_state == 2 * m0.d_state
    h = torch.randn(2, 13, m0.in_proj.in_features)
    with torch.no_grad():
        torch.testing.assert_close(m1(h)[0], merged_mamba2_reference(m0, h, 2), atol=1e-4, rtol=1e-4)
        # the first block of each state is the old one: not the same function as before (the scores were summed)
        assert not torch.allclose(m1(h)[0], m0(h)[0], atol=1e-3)
        torch.testing.assert_close(m0(h)[0], merged_mamba2_reference(m0, h, 1), atol=1e-4, rtol=1e-4)
    with pytest.raises(RnnifyError, match="--state-multiplier 3 is more than the 2 B/KV groups it merges; accepted: 2..2"):
        convert(before, "statex", options={"layers": "all", "init": "merge_heads", "state_multiplier": 3})


def test_preserve_leaves_the_new_state_trainable():
    """preserve starts the new C rows at zero: they must still take a gradient on the first step (a zero conv channel
    after them would pass none, and the new state would never be read)."""
    before = source("mamba_in_llama", keep="1")
    after = convert(before, "statex", options={"layers": "all", "init": "preserve", "state_multiplier": 2}).train()
    x = torch.randint(0, 128, (2, 21))
    after(x, labels=x).loss.backward()
    m = after.model.layers[0].self_attn
    n0 = m.d_state // 2
    start = m.d_inner + m.d_xb + m.d_b
    c_rows = m.in_proj.weight.grad[start : start + m.d_c].view(m.num_heads, m.d_state, -1)
    assert torch.equal(m.in_proj.weight[start : start + m.d_c].view(m.num_heads, m.d_state, -1)[:, n0:],
                       torch.zeros_like(c_rows[:, n0:]))
    assert c_rows[:, n0:].abs().amax() > 1e-3 * c_rows[:, :n0].abs().amax()


def test_layer_choice_and_bad_inputs(tiny_llama_dir, tmp_path, capsys):
    model = source("supra", keep="")
    picked = convert(model, "statex", options={"layers": "every:2", "init": "keep"})
    assert [m.merged for _, m in picked.mixers()] == [False, True, False, True]
    with pytest.raises(RnnifyError, match="already merged"):
        convert(picked, "statex", options={"layers": "1", "init": "keep"})
    with pytest.raises(RnnifyError, match="layers \\[0\\] have no recurrent state to expand"):
        convert(source("supra", keep="0"), "statex", options={"layers": "0,1"})
    with pytest.raises(RnnifyError, match="nothing to expand"):
        convert(convert(tiny_model("llama"), "window"), "statex")
    with pytest.raises(RnnifyError, match="--init merge_zero: layer 1 \\(supra\\) accepts: paper, keep"):
        convert(model, "statex", options={"layers": "1", "init": "merge_zero"})
    assert main(["convert", str(tiny_llama_dir), "--method", "mamba_in_llama", "--out", str(tmp_path / "m")]) == 0
    for flags, needle in ((["--state-multiplier", "1"], "state_multiplier=1 is not accepted; accepted: an integer >= 2"),
                          (["--layers", "9"], "layer 9 is out of range; this model has layers 0..3"),
                          (["--layers", "every:0"], "accepted: every:K with K >= 1")):
        capsys.readouterr()
        assert main(["convert", str(tmp_path / "m"), "--method", "statex", *flags, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1] and sum(line.startswith("rnnify ") for line in err) == 1


def tiny_mamba2():
    cfg = transformers.Mamba2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                                    expand=2, n_groups=2, state_size=16, conv_kernel=4, chunk_size=8)
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():  # make the conv biases and D matter
        for layer in model.backbone.layers:
            layer.mixer.conv1d.bias.normal_(0, 0.1)
            layer.mixer.D.normal_(1, 0.2)
    return model


def test_native_mamba2_expands_preserving_its_function_and_loads_without_rnnify(tmp_path):
    native = tiny_mamba2()
    native.save_pretrained(tmp_path / "m2")
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ref = native(x).logits
    out = convert(native, "statex", options={"init": "preserve", "state_multiplier": 2})
    assert type(out).__name__ == "Mamba2ForCausalLM" and out.config.state_size == 32
    assert n_params(out) - n_params(native) == 2 * (2 * 2 * 16) * (64 + 4 + 1)  # B/C rows: in_proj, conv, bias
    with torch.no_grad():
        torch.testing.assert_close(out(x).logits, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RnnifyError, match="one state size for every layer"):
        convert(native, "statex", options={"layers": "0"})
    out.save_pretrained(tmp_path / "m2x")
    code = ("import sys, torch, transformers; sys.modules['rnnify'] = None; "  # rnnify not importable
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm2x')!r}); "
            "print(type(m).__name__, m.config.state_size)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["Mamba2ForCausalLM", "32"], r.stderr[-2000:]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m2x")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, out(x).logits, atol=1e-6, rtol=1e-6)


def test_cli_statex_on_a_native_mamba2_folder(tmp_path, capsys):
    tiny_mamba2().save_pretrained(tmp_path / "m2")
    from .conftest import make_tokenizer

    make_tokenizer(128).save_pretrained(tmp_path / "m2")
    assert main(["convert", str(tmp_path / "m2"), "--method", "statex", "--state-multiplier", "4",
                 "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "transformed" in out and "cache per sequence" in out
    assert transformers.AutoConfig.from_pretrained(tmp_path / "x").state_size == 64
