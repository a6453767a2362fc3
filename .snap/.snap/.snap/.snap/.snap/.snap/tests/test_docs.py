"""The documentation is part of the product:

- every public symbol of ``moekit`` has a docstring of its own that mentions every parameter, and
  ``FusedMoE``'s describes each keyword on its own ``name: ...`` line (the ones that only raise say so);
- docs/api.md is what ``tools/gen_api.py`` generates from those docstrings (not stale);
- every ```` ```python ```` block of README.md and docs/*.md runs as written on CPU, small and fast.
  Blocks tagged after the language say what they need on their first line (``# needs: ...``):
  ``checkpoint`` blocks run with ``path`` bound to a tiny Qwen3-MoE checkpoint written here; ``gpu``
  blocks run on a CUDA machine only; ``torchrun`` blocks (several processes) are only compiled.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
import textwrap

import pytest
import torch

import moekit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAGS = {"": "cpu", "checkpoint": "checkpoint", "gpu": "gpu", "torchrun": "torchrun"}
_BLOCK_RE = re.compile(r"^```python([^\n`]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def _gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", os.path.join(ROOT, "tools", "gen_api.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blocks():
    docs = sorted(f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md") and f != "api.md")
    files = ["README.md"] + [os.path.join("docs", f) for f in docs]  # api.md: generated signatures, not snippets
    out = []
    for rel in files:
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        for m in _BLOCK_RE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append(pytest.param(rel, line, m.group(1).strip(), m.group(2), id=f"{rel}:{line}"))
    return out


BLOCKS = _blocks()


# -- API reference ---------------------------------------------------------------------------------
def test_every_public_symbol_has_its_own_docstring_describing_its_parameters():
    assert _gen_api().problems() == []


def test_problems_are_found():
    gen = _gen_api()

    def undocumented(a, b=1):
        pass

    def half(a, bee=1):
        """Uses a."""

    assert gen.own_doc(undocumented) is None
    assert gen.own_doc(moekit.RoutedExperts) and gen.own_doc(moekit.CustomRoutingRouter)  # not the base's
    doc = gen.full_doc(half)
    assert [p for p in gen.parameters(half) if not re.search(rf"(?<![\w.]){p}(?!\w)", doc)] == ["bee"]


def _fused_moe_entries() -> dict[str, str]:
    """keyword -> its entry (the ``name: ...`` line and its continuation lines) in FusedMoE's Args."""
    doc = inspect.getdoc(moekit.FusedMoE)
    args = doc.split("\nArgs:\n", 1)[1].split("\n\n", 1)[0]
    entries, name = {}, None
    for line in args.splitlines():
        m = re.match(r"^    (\w+): (.+)$", line)
        if m:
            name = m.group(1)
            entries[name] = m.group(2)
        elif name and line.startswith("        "):
            entries[name] += " " + line.strip()
    return entries


def test_fused_moe_describes_every_keyword():
    params = list(inspect.signature(moekit.FusedMoE).parameters)
    assert len(params) >= 46, params  # the seed's keywords and moekit's own
    entries = _fused_moe_entries()
    assert [p for p in params if p not in entries] == []
    assert [p for p in entries if p not in params] == []
    assert all(len(entries[p].split()) >= 4 for p in params), "an entry says what the keyword means"
    for only_raises in ("dp_size", "pcp_size", "is_sequence_parallel"):
        assert "NotImplementedError" in entries[only_raises], only_raises
    q = entries["quant_config"]
    for fmt in ("None", "quantization_config", "fp8 block", "fp8 per channel", "mxfp4", "int4"):
        assert fmt in q, fmt


def test_api_md_is_generated_from_the_docstrings():
    gen = _gen_api()
    current = open(gen.API_MD, encoding="utf-8").read()
    assert current == gen.render(), "docs/api.md is stale: run PYTHONPATH=src python tools/gen_api.py"
    for name in moekit.__all__:
        assert f"\n## {name}\n" in current


# -- snippets -------------------------------------------------------------------------------------
def test_every_doc_has_blocks_and_tags_are_known():
    files = {p.values[0] for p in BLOCKS}
    assert {"README.md", "docs/checkpoints.md", "docs/parallel.md"} <= files
    for p in BLOCKS:
        rel, line, tag, code = p.values
        assert tag in TAGS, f"{rel}:{line}: unknown tag {tag!r} (known: {sorted(TAGS)})"
        if tag:
            assert code.startswith("# needs:"), f"{rel}:{line}: a ```python {tag} block says what it needs first"
        else:
            assert "# needs:" not in code.splitlines()[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(ROOT, "tests", "integrations"))
    import hf_tiny

    path = tmp_path_factory.mktemp("qwen3_moe_ckpt")
    hf_tiny.build("qwen3_moe", seed=7).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("rel,line,tag,code", BLOCKS)
def test_snippet_runs_as_written(rel, line, tag, code, request, tmp_path, monkeypatch):
    compiled = compile(code, f"{rel}:{line}", "exec")  # every block at least compiles
    namespace = {"__name__": "__doc_snippet__"}
    if tag == "torchrun":
        pytest.skip("needs several processes (torchrun); compiled only")
    if tag == "gpu" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if tag == "checkpoint":
        namespace["path"] = request.getfixturevalue("tiny_checkpoint")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compiled, namespace)


def test_package_docstring_example_runs():
    lines = [line for line in moekit.__doc__.splitlines() if line.startswith("    ")]
    code = textwrap.dedent("\n".join(lines))
    namespace: dict = {}
    exec(compile(code, "moekit.__doc__", "exec"), namespace)
    assert namespace["out"].shape == (5, namespace["H"])
