"""When ``TRITON_INTERPRET=1`` is set relative to ``import triton`` (round 50).

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, its own language library included
(``tl.max`` is one). Setting it after ``import triton`` passed moekit's backend check and failed inside the first
forward ("Cannot call @triton.jit'd outside of the scope of a kernel"); now the layer / op refuses at once, saying to
set the variable before importing triton. Each case runs in a fresh process: the import state is the point.
"""

import os
import subprocess
import sys

import pytest

import moekit

pytest.importorskip("triton")

PRELUDE = "import os\nos.environ.pop('TRITON_INTERPRET', None)\n"
FORWARD = (
    "import torch\n"
    "layer = moekit.FusedMoE(4, 2, 32, 16, backend='triton', device='cpu')\n"
    "layer.load_expert_weights(torch.randn(4, 32, 32), torch.randn(4, 32, 16))\n"
    "print('SHAPE', tuple(layer(torch.randn(3, 32), torch.randn(3, 4)).shape))\n"
)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(moekit.__file__), "..")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, env=env, timeout=300)


def test_set_after_import_triton_is_refused_at_construction():
    # edge: import triton, then TRITON_INTERPRET=1, then moekit (its kernels not imported yet): the layer refuses at
    # construction with a RuntimeError saying what to do (was: InterpreterError inside the first forward's kernel)
    run = _run(
        "import triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import moekit\n"
        "try:\n" + "".join("    " + line + "\n" for line in FORWARD.splitlines()) +
        "except RuntimeError as err:\n"
        "    print('REFUSED', err)\n"
    )
    out = run.stdout + run.stderr
    assert "REFUSED backend='triton' cannot run" in run.stdout, out
    assert "TRITON_INTERPRET=1 was set after triton was imported" in run.stdout, out
    assert "set TRITON_INTERPRET=1 before triton is first imported" in run.stdout, out
    assert "SHAPE" not in run.stdout and "InterpreterError" not in out, out


def test_set_after_import_triton_is_refused_by_the_ops():
    # edge: the public functional ops resolve their backend per call: the same refusal, not a kernel failure
    run = _run(
        "import triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import moekit, torch\n"
        "try:\n"
        "    moekit.fused_topk(None, torch.randn(3, 4), 2, True, backend='triton')\n"
        "except RuntimeError as err:\n"
        "    print('REFUSED', err)\n"
    )
    assert "REFUSED" in run.stdout and "set after triton was imported" in run.stdout, run.stdout + run.stderr


def test_set_after_import_moekit_but_before_triton_runs():
    # edge (control): `import moekit` does not import triton, so setting TRITON_INTERPRET=1 after it (and before any
    # kernel) is still in time: the interpreted forward runs
    run = _run("import moekit\nos.environ['TRITON_INTERPRET'] = '1'\n" + FORWARD)
    assert run.returncode == 0 and "SHAPE (3, 32)" in run.stdout, run.stdout + run.stderr


def test_the_probed_modules_are_every_kernel_module():
    # the late-interpreter check looks at a fixed list of modules (cheap per call): every moekit module of @triton.jit
    # functions must be on it, and Triton's library module holding tl.max must exist under that name
    import importlib
    import pkgutil

    import moekit.ops._triton as pkg
    from moekit.ops.kernels import _JIT_MODULES

    listed = {name for name, _ in _JIT_MODULES}
    names = [pkg.__name__] + [f"{pkg.__name__}.{info.name}" for info in pkgutil.iter_modules(pkg.__path__)]
    for name in names:
        module = importlib.import_module(name)
        jitted = [n for n, v in vars(module).items() if type(v).__name__ in ("JITFunction", "InterpretedFunction")
                  and getattr(getattr(v, "fn", None), "__module__", None) == name]  # defined there, not imported
        assert not jitted or name in listed, (name, jitted[:3])
    standard = importlib.import_module("triton.language.standard")
    assert "triton.language.standard" in listed and type(vars(standard)["max"]).__name__ in (
        "JITFunction", "InterpretedFunction")
