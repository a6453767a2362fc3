"""Triton kernels (``@triton.jit`` code only). The Python wrappers that pick grids and configs live in
:mod:`moekit.ops.triton_experts` and :mod:`moekit.ops.triton_routing`.

- :mod:`.align`: token sort by expert into a padded block layout, without host synchronisation
- :mod:`.grouped_gemm`: the w13 GEMM (activation epilogue) and the w2 GEMM (weighted top-k combine)
- :mod:`.topk`: fused scores -> (grouped, biased) top-k -> weights, one program per token
"""


def _interpreter_numpy_shim() -> None:
    """Triton 3.6's interpreter converts its 1-element scalar arrays with ``int(array)``, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so any ``range`` with a
    run-time bound fails under ``TRITON_INTERPRET=1``. Re-install ``__index__`` with ``.item()``.
    Only touches the interpreter, and only when it is enabled."""
    try:
        from triton import knobs
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - other Triton versions
        return
    if not knobs.runtime.interpret or getattr(interpreter, "_moekit_index_shim", False):
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # pragma: no cover
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._moekit_index_shim = True


_interpreter_numpy_shim()
