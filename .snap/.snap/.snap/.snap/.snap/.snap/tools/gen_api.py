"""Generate docs/api.md, the API reference, from the docstrings of ``moekit.__all__``.

    PYTHONPATH=src python tools/gen_api.py            # rewrite docs/api.md
    PYTHONPATH=src python tools/gen_api.py --check    # exit 1 if docs/api.md is out of date

``tests/test_docs.py`` runs the check, and fails when a public symbol has no docstring of its own or a
parameter of a public callable is not described in it.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_MD = os.path.join(ROOT, "docs", "api.md")
SRC = os.path.join(ROOT, "src", "moekit")

HEADER = """# API reference

Generated from the docstrings by `tools/gen_api.py` (do not edit by hand: run
`PYTHONPATH=src python tools/gen_api.py`; `tests/test_docs.py` fails when this file is out of date).
Every name below is importable from `moekit`. Shape legend: `T` tokens, `H` hidden size, `I` expert
intermediate size, `E` routed experts, `Z` zero experts, `K` top-k, `G` expert groups. Also public:
`moekit.integrations.transformers` (`patch`, `unpatch`, `register`, `check_registered`; see
[checkpoints.md](checkpoints.md)).
"""


def own_doc(obj) -> str | None:
    """The docstring written for ``obj`` itself (not inherited from a base class or a builtin type)."""
    if isinstance(obj, type):
        doc = obj.__dict__.get("__doc__")
    elif callable(obj):
        doc = getattr(obj, "__doc__", None)
    else:
        doc = None  # data: the ``#:`` comment above its definition
    return inspect.cleandoc(doc) if doc else None


def data_doc(name: str) -> str | None:
    """The ``#:`` comment lines right above ``NAME = ...`` in moekit's sources."""
    for dirpath, _, files in sorted(os.walk(SRC)):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            lines = open(os.path.join(dirpath, f), encoding="utf-8").read().splitlines()
            for i, line in enumerate(lines):
                if re.match(rf"^{re.escape(name)}\s*(:[^=]*)?=", line):
                    j, doc = i - 1, []
                    while j >= 0 and lines[j].startswith("#:"):
                        doc.insert(0, lines[j][2:].strip())
                        j -= 1
                    if doc:
                        return " ".join(doc)
    return None


def parameters(obj) -> list[str]:
    """Parameter names of a public callable (a class: its constructor), without self/*args/**kwargs."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind not in skip and p.name != "self"]


def full_doc(obj) -> str:
    """What documents a callable's parameters: its docstring (a class: plus its ``__init__``'s)."""
    doc = own_doc(obj) or ""
    if isinstance(obj, type) and "__init__" in obj.__dict__ and obj.__init__.__doc__:
        doc += "\n" + inspect.cleandoc(obj.__init__.__doc__)
    return doc


def problems() -> list[str]:
    """Public symbols without a docstring, and parameters their docstrings do not mention."""
    import moekit

    out = []
    for name in moekit.__all__:
        obj = getattr(moekit, name)
        if not callable(obj):
            if data_doc(name) is None:
                out.append(f"moekit.{name}: no '#:' comment above its definition")
            continue
        if own_doc(obj) is None:
            out.append(f"moekit.{name}: no docstring of its own")
            continue
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            continue
        doc = full_doc(obj)
        for p in parameters(obj):
            if not re.search(rf"(?<![\w.]){re.escape(p)}(?!\w)", doc):
                out.append(f"moekit.{name}: parameter {p!r} is not described in its docstring")
    return out


def _signature(name: str, obj) -> str:
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return f"class {name}({', '.join(b.__name__ for b in obj.__bases__)})"
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = "(...)"
    sig = re.sub(r" at 0x[0-9a-f]+", "", sig)
    sig = re.sub(r"(: |-> )'([^']*)'", r"\1\2", sig)  # string annotations (from __future__ import annotations)
    sig = re.sub(r'(-> )"([^"]*)"', lambda m: m.group(1) + m.group(2).replace("'", ""), sig)
    return f"{'class ' if isinstance(obj, type) else ''}{name}{sig}"


def _methods(obj) -> list[str]:
    out = []
    for attr, member in sorted(vars(obj).items()):
        if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
            continue
        doc = inspect.getdoc(member)
        first = doc.split("\n\n")[0].replace("\n", " ") if doc else ""
        kind = "property" if isinstance(member, property) else "method"
        out.append(f"- `{attr}` ({kind}){': ' + first if first else ''}")
    return out


def render() -> str:
    import moekit

    parts = [HEADER, "## Contents\n", ", ".join(f"[`{n}`](#{n.lower()})" for n in sorted(moekit.__all__)) + "\n"]
    for name in sorted(moekit.__all__):
        obj = getattr(moekit, name)
        parts.append(f"## {name}\n")
        if not callable(obj):
            parts.append(f"```python\n{name} = {obj!r}\n```\n\n{data_doc(name) or ''}\n")
            continue
        parts.append(f"```python\n{_signature(name, obj)}\n```\n")
        parts.append(f"```text\n{own_doc(obj) or ''}\n```\n")
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            parts.append("Members: " + ", ".join(f"`{m.name}` = {m.value}" for m in obj) + "\n")
        elif isinstance(obj, type):
            methods = _methods(obj)
            if methods:
                parts.append("Public methods and properties defined here:\n\n" + "\n".join(methods) + "\n")
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="generate docs/api.md from moekit's docstrings")
    p.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date or a docstring is missing")
    a = p.parse_args(argv)
    bad = problems()
    for line in bad:
        print(line, file=sys.stderr)
    text = render()
    if a.check:
        current = open(API_MD, encoding="utf-8").read() if os.path.exists(API_MD) else ""
        if current != text:
            print(f"{API_MD} is out of date: run PYTHONPATH=src python tools/gen_api.py", file=sys.stderr)
            return 1
        return 1 if bad else 0
    with open(API_MD, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {API_MD} ({len(text.splitlines())} lines)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
