"""The Triton kernels against the PyTorch references: outputs, final states and gradients.

Without a GPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes are small.
Tolerances: fp32 within 1e-4 of the reference's scale (observed ~1e-6); bf16 inputs within 3% of the output's
scale (the bf16 rounding of the result; the fp32 reference runs on the same bf16-rounded inputs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnify import kernels
from rnnify.kernels import reference as R
from rnnify.kernels.ops import OPS

fused = pytest.importorskip("rnnify.kernels.fused.linear_attention", reason="triton is not installed")
from rnnify.kernels.fused import conv as fconv  # noqa: E402
from rnnify.kernels.fused import delta_rule as fdelta  # noqa: E402
from rnnify.kernels.fused import linear_attention as fla_ours  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def close(ours, ref, dtype, what):
    scale = ref.float().abs().max().clamp_min(1.0)
    err = (ours.float() - ref.float()).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def _decay(kind, B, T, H, gen):
    if kind is None:
        return None
    if kind == "head":
        return -torch.rand(H, generator=gen) * 0.5
    return F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2)


def _make(B, T, H, K, V, decay, dtype, with_state, N=None, delta=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if delta:  # DeltaNet keys are L2-normalised (the recurrence is stable for ||k|| <= 1, beta in [0, 1])
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    q, k, v = (x.to(dtype).to(DEVICE).requires_grad_() for x in (q, k, v))
    g = _decay(decay, B, T, H, gen)
    g = None if g is None else g.to(DEVICE).requires_grad_()
    s0 = torch.randn(N or B, H, K, V, generator=gen).to(DEVICE).requires_grad_() if with_state else None
    beta = torch.rand(B, T, H, generator=gen).to(dtype).to(DEVICE).requires_grad_() if delta else None
    return q, k, v, g, s0, beta


def _compare(run_ours, run_ref, inputs, dtype):
    o1, s1 = run_ours()
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o1.shape, generator=gen).to(DEVICE)
    ds = torch.randn(s1.shape, generator=gen).to(DEVICE)
    live = [x for x in inputs if x is not None]
    g1 = torch.autograd.grad((o1.float() * do).sum() + (s1 * ds).sum(), live)
    o2, s2 = run_ref()
    g2 = torch.autograd.grad((o2.float() * do).sum() + (s2 * ds).sum(), live)
    close(o1, o2, dtype, "output")
    close(s1, s2, dtype, "final state")
    for i, (a, b) in enumerate(zip(g1, g2)):
        close(a, b, dtype, f"gradient of input {i}")


CASES = [  # (T, decay, with_state, chunk)
    (40, None, False, 16), (40, "head", True, 16), (40, "data", True, 16), (33, "data", False, 32),
    (16, "data", True, 16), (5, "head", True, 16), (70, "data", True, 64), (150, "data", True, 128),
]


@pytest.mark.parametrize("T,decay,with_state,chunk", CASES)
def test_linear_attention_matches_reference(T, decay, with_state, chunk):
    B, H, K, V = 2, 2, 16, 24
    q, k, v, g, s0, _ = _make(B, T, H, K, V, decay, torch.float32, with_state)
    _compare(
        lambda: fla_ours.chunk_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=chunk),
        lambda: R.chunk_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=chunk),
        (q, k, v, g, s0), torch.float32)


@pytest.mark.parametrize("T,decay,with_state,chunk", CASES)
def test_delta_rule_matches_the_token_loop(T, decay, with_state, chunk):
    B, H, K, V = 2, 2, 16, 24
    q, k, v, g, s0, beta = _make(B, T, H, K, V, decay, torch.float32, with_state, delta=True)
    _compare(
        lambda: fdelta.chunk_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, chunk_size=chunk),
        lambda: R.recurrent_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True),
        (q, k, v, beta, g, s0), torch.float32)


def test_delta_rule_with_repeated_keys():
    """The worst case for the blocked (I + A)^{-1}: one key repeated with beta = 1 makes A all ones below the
    diagonal (powers of A grow like binomials). The inverse is still exact: (I + A)^{-1} is bidiagonal."""
    B, T, H, K, V = 1, 128, 1, 16, 8
    gen = torch.Generator().manual_seed(0)
    k = F.normalize(torch.randn(1, 1, 1, K, generator=gen), dim=-1).expand(B, T, H, K).contiguous().to(DEVICE)
    q = torch.randn(B, T, H, K, generator=gen).to(DEVICE)
    v = torch.randn(B, T, H, V, generator=gen).to(DEVICE)
    beta = torch.ones(B, T, H, device=DEVICE)
    with torch.no_grad():
        o, s = fdelta.chunk_delta_rule(q, k, v, beta, None, output_final_state=True, chunk_size=128)
        o_ref, s_ref = R.recurrent_delta_rule(q, k, v, beta, None, output_final_state=True)
    close(o, o_ref, torch.float32, "output")
    close(s, s_ref, torch.float32, "final state")


@pytest.mark.parametrize("op", ["linear_attention", "delta_rule"])
def test_packed_variable_length_batches(op):
    cu = torch.tensor([0, 7, 23, 23, 50], device=DEVICE)  # includes an empty sequence
    H, K, V = 2, 32, 20
    q, k, v, g, s0, beta = _make(1, 50, H, K, V, "data", torch.float32, True, N=4, delta=op == "delta_rule")
    if op == "linear_attention":
        ours = lambda: fla_ours.chunk_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True,  # noqa: E731
                                                       chunk_size=16, cu_seqlens=cu)
        ref = lambda: R.recurrent_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True,  # noqa: E731
                                                   cu_seqlens=cu)
        ins = (q, k, v, g, s0)
    else:
        ours = lambda: fdelta.chunk_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True,  # noqa: E731
                                               chunk_size=16, cu_seqlens=cu)
        ref = lambda: R.recurrent_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True,  # noqa: E731
                                             cu_seqlens=cu)
        ins = (q, k, v, beta, g, s0)
    _compare(ours, ref, ins, torch.float32)


def test_packed_sequences_do_not_see_each_other():
    q, k, v, g, _, _ = _make(1, 30, 2, 16, 16, "data", torch.float32, False)
    cu = torch.tensor([0, 12, 30], device=DEVICE)
    o, _ = fla_ours.chunk_linear_attention(q, k, v, g, chunk_size=16, cu_seqlens=cu)
    alone, _ = fla_ours.chunk_linear_attention(q[:, 12:], k[:, 12:], v[:, 12:], g[:, 12:], chunk_size=16)
    close(o[:, 12:], alone, torch.float32, "second sequence")


@pytest.mark.parametrize("op", ["linear_attention", "delta_rule"])
def test_bf16_inputs(op):
    B, T, H, K, V = 2, 40, 2, 16, 16
    q, k, v, g, s0, beta = _make(B, T, H, K, V, "data", torch.bfloat16, True, delta=op == "delta_rule")
    if op == "linear_attention":
        ours = lambda: fla_ours.chunk_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True,  # noqa: E731
                                                       chunk_size=16)
        ref = lambda: R.chunk_linear_attention(q.float(), k.float(), v.float(), g, initial_state=s0,  # noqa: E731
                                               output_final_state=True)
        ins = (q, k, v, g, s0)
    else:
        ours = lambda: fdelta.chunk_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True,  # noqa: E731
                                               chunk_size=16)
        ref = lambda: R.recurrent_delta_rule(q.float(), k.float(), v.float(), beta.float(), g, initial_state=s0,  # noqa: E731
                                             output_final_state=True)
        ins = (q, k, v, beta, g, s0)
    o, _ = ours()
    assert o.dtype == torch.bfloat16
    _compare(ours, ref, ins, torch.bfloat16)


@pytest.mark.parametrize("decay", [None, "head", "data"])
@pytest.mark.parametrize("op", ["linear_attention", "delta_rule"])
def test_decode_steps_update_the_state_in_place(op, decay):
    B, H, K, V = 3, 2, 20, 65  # non-power-of-two dims, as LoLCATs' K = 2D, V = D + 1
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, H, K, generator=gen), torch.randn(B, H, K, generator=gen), torch.randn(B, H, V, generator=gen)
    k = F.normalize(k, dim=-1)
    g = None if decay is None else (-torch.rand(H, generator=gen) if decay == "head" else -torch.rand(B, H, generator=gen))
    beta = torch.rand(B, H, generator=gen)
    state = torch.randn(B, H, K, V, generator=gen)
    args = [x.to(DEVICE) if x is not None else None for x in (q, k, v)]
    gd = None if g is None else g.to(DEVICE)
    s = state.to(DEVICE)
    if op == "linear_attention":
        o_ref, s_ref = R.linear_attention_step(*args, gd, s.clone())
        o, s_new = fla_ours.linear_attention_step(*args, gd, s)
    else:
        o_ref, s_ref = R.delta_rule_step(*args, beta.to(DEVICE), gd, s.clone())
        o, s_new = fdelta.delta_rule_step(*args, beta.to(DEVICE), gd, s)
    assert s_new.data_ptr() == s.data_ptr(), "the fused step must update the state in place"
    close(o, o_ref, torch.float32, "step output")
    close(s_new, s_ref, torch.float32, "step state")


def test_steps_chain_to_the_chunked_form():
    """Prefill with the chunked kernel, then fused steps: equals one chunked pass over everything."""
    q, k, v, g, _, _ = _make(1, 24, 2, 16, 16, "data", torch.float32, False)
    with torch.no_grad():
        full, _ = fla_ours.chunk_linear_attention(q, k, v, g, chunk_size=16)
        o, state = fla_ours.chunk_linear_attention(q[:, :20], k[:, :20], v[:, :20], g[:, :20], chunk_size=16,
                                                   output_final_state=True)
        outs = [o]
        for t in range(20, 24):
            o_t, state = fla_ours.linear_attention_step(q[:, t], k[:, t], v[:, t], g[:, t], state)
            outs.append(o_t[:, None])
    close(torch.cat(outs, 1), full, torch.float32, "prefill + steps")


@pytest.mark.parametrize("with_state,bias,act,cu", [
    (True, True, "silu", None), (False, False, None, None), (True, True, "silu", [0, 2, 40, 70]),
    (False, True, "silu", [0, 1, 1, 70]),
])
def test_short_convolution(with_state, bias, act, cu):
    gen = torch.Generator().manual_seed(0)
    B = 2 if cu is None else 1
    N = B if cu is None else len(cu) - 1
    C, W = 20, 4
    x = torch.randn(B, 70, C, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(C, W, generator=gen).to(DEVICE).requires_grad_()
    b = torch.randn(C, generator=gen).to(DEVICE).requires_grad_() if bias else None
    s0 = torch.randn(N, C, W - 1, generator=gen).to(DEVICE).requires_grad_() if with_state else None
    cu = None if cu is None else torch.tensor(cu, device=DEVICE)
    y1, f1 = fconv.causal_conv1d(x, w, b, s0, act, cu_seqlens=cu)
    y2, f2 = R.causal_conv1d(x, w, b, s0, act, cu_seqlens=cu)
    live = [t for t in (x, w, b, s0) if t is not None]
    dy = torch.randn(y1.shape, generator=gen).to(DEVICE)
    for a, r, what in zip(torch.autograd.grad((y1 * dy).sum(), live), torch.autograd.grad((y2 * dy).sum(), live),
                          ["x", "weight", "bias", "state"][:len(live)]):
        close(a, r, torch.float32, f"d{what}")
    close(y1, y2, torch.float32, "conv output")
    close(f1, f2, torch.float32, "conv final state")

    xs = torch.randn(N, C, generator=gen).to(DEVICE)
    state = torch.randn(N, C, W - 1, generator=gen).to(DEVICE)
    y_ref, s_ref = R.causal_conv1d_step(xs, w.detach(), None if b is None else b.detach(), state.clone(), act)
    y_new, s_new = fconv.causal_conv1d_step(xs, w.detach(), None if b is None else b.detach(), state, act)
    assert s_new.data_ptr() == state.data_ptr()
    close(y_new, y_ref, torch.float32, "conv step")
    close(s_new, s_ref, torch.float32, "conv step state")


# ---- every op of the table ------------------------------------------------------------------------------

def _outputs(out):
    return [o for o in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(o)]


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_in_the_table_matches_its_reference_on_its_examples(name):
    """Each op of ``ops.OPS`` on its Triton backend against its reference, on the op's own example arguments
    (the ones the ahead-of-time compile uses): outputs, final states and, for the chunked forms, every gradient."""
    op = OPS[name]
    fused, ref = op.function("triton"), op.function("reference")
    for args, kwargs in op.examples(2, 20, 2, 16, torch.float32, torch.Generator().manual_seed(0)):
        args = [a.to(DEVICE) if torch.is_tensor(a) else a for a in args]
        kwargs = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        if op.step:
            with torch.no_grad():
                expected = _outputs(ref(*[a.clone() if torch.is_tensor(a) else a for a in args], **kwargs))
                got = _outputs(fused(*args, **kwargs))
            for a, b in zip(got, expected, strict=True):
                close(a, b, torch.float32, f"{name} output")
            continue
        leaves = [a.requires_grad_() for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()]
        grads = []
        for fn in (fused, ref):
            outs = _outputs(fn(*args, **kwargs))
            weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE)
                       for i, o in enumerate(outs)]
            loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
            grads.append((outs, torch.autograd.grad(loss, leaves)))
        (got, g_got), (expected, g_expected) = grads
        for a, b in zip(got, expected, strict=True):
            close(a, b, torch.float32, f"{name} output")
        for i, (a, b) in enumerate(zip(g_got, g_expected, strict=True)):
            close(a, b, torch.float32, f"{name} gradient of input {i}")


# ---- dispatch -------------------------------------------------------------------------------------------

def test_cpu_tensors_default_to_the_reference(monkeypatch):
    monkeypatch.delenv("RNNIFY_KERNELS", raising=False)
    assert kernels.backend_for(torch.device("cpu")) == "reference"
    assert kernels.implementation("chunk_delta_rule", "cpu") is R.chunk_delta_rule


def test_forced_backends_that_cannot_run_say_why(monkeypatch):
    monkeypatch.setenv("RNNIFY_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.backend_for(torch.device("cpu"))
    monkeypatch.setenv("RNNIFY_KERNELS", "fla")
    with pytest.raises(RuntimeError, match="RNNIFY_KERNELS=fla cannot run here"):
        kernels.backend_for(torch.device("cpu"))


def test_forced_triton_runs_the_fused_kernels(monkeypatch):
    monkeypatch.setenv("RNNIFY_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.implementation("chunk_linear_attention", DEVICE) is fla_ours.chunk_linear_attention
    q, k, v, g, s0, _ = _make(1, 20, 2, 16, 16, "data", torch.float32, True)
    o, s = kernels.chunk_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True)
    o_ref, s_ref = R.chunk_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True)
    close(o, o_ref, torch.float32, "dispatched output")
    # steps that autograd must see fall back to the reference (the fused step writes in place)
    state = torch.randn(1, 2, 16, 16, device=DEVICE, requires_grad=True)
    o_t, new = kernels.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state)
    assert new.requires_grad and new.data_ptr() != state.data_ptr()


@pytest.mark.parametrize("method", ["supra", "mamba_in_llama"])
def test_converted_model_on_the_triton_path(method, monkeypatch):
    """A converted tiny model gives the same logits and greedy generation on the Triton kernels."""
    from rnnify.convert import convert
    from tests.conftest import tiny_model

    torch.manual_seed(0)
    student = convert(tiny_model("llama"), method=method).eval()
    ids = torch.randint(0, 128, (2, 21))
    monkeypatch.setenv("RNNIFY_KERNELS", "reference")
    with torch.no_grad():
        ref = student(ids).logits
        gen_ref = student.generate(ids[:, :9], max_new_tokens=4, do_sample=False)
    monkeypatch.setenv("RNNIFY_KERNELS", "triton")
    with torch.no_grad():
        out = student(ids).logits
        gen = student.generate(ids[:, :9], max_new_tokens=4, do_sample=False)
    close(out, ref, torch.float32, "logits")
    assert torch.equal(gen, gen_ref)


def test_mixed_input_dtypes_follow_the_values():
    """Mamba2 feeds bf16 C/B with fp32 dt*x: the kernels promote, and return v's dtype like the reference."""
    q, k, v, g, _, _ = _make(1, 20, 2, 16, 16, "data", torch.float32, False)
    with torch.no_grad():
        o, _ = fla_ours.chunk_linear_attention(q.bfloat16(), k.bfloat16(), v, g, chunk_size=16)
        ref, _ = R.chunk_linear_attention(q.bfloat16(), k.bfloat16(), v, g)
    assert o.dtype == ref.dtype == torch.float32
    close(o, ref, torch.float32, "mixed-dtype output")


@pytest.mark.parametrize("dtype,D", [("bfloat16", 128), ("float32", 32)])
def test_every_kernel_compiles_for_hopper(dtype, D):
    """The interpreter runs what the GPU compiler may reject (it never builds bf16 tensor-core dots): compile
    every launch the host code makes, with its real argument types and constexprs, to sm_90a PTX + cubin."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, torch; from rnnify.kernels.fused import aot; "
            f"rows = aot.report(D={D}, H=16, dtype=torch.{dtype}, ptxas=False); "
            "print(json.dumps([sorted({r['kernel'] for r in rows}), sorted(aot.fused_kernels())]))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="0"),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    compiled, every_kernel = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(every_kernel) >= 15 and compiled == every_kernel  # every kernel of every op in ops.OPS was built
