"""Triton kernels (``@triton.jit`` code only). The Python wrappers that pick grids and configs live in
:mod:`moekit.ops.triton_experts` and :mod:`moekit.ops.triton_routing`.

- :mod:`.align`: token sort by expert into a padded block layout, without host synchronisation
- :mod:`.grouped_gemm`: the w13 GEMM (activation epilogue) and the w2 GEMM (weighted top-k combine), built from
  :mod:`.rows` (row blocks of the sorted layout, the in-register decode layout) and :mod:`.tiles` (operand loads,
  one K step per format)
- :mod:`.combine`: the top-k sum as its own pass after w2
- :mod:`.quant`: fp8 activation quantisation, 4-bit weight decode, the fp8 dot
- :mod:`.topk`: fused scores -> (grouped, biased) top-k -> weights, one program per token
"""


def _interpreter_to_shim(flag: str):
    """Triton's interpreter module when it is enabled and shim ``flag`` is not installed yet, else None."""
    try:
        from triton import knobs
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - other Triton versions
        return None
    if not knobs.runtime.interpret or getattr(interpreter, flag, False):
        return None
    return interpreter


def _interpreter_numpy_shim() -> None:
    """Triton 3.6's interpreter converts its 1-element scalar arrays with ``int(array)``, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so any ``range`` with a
    run-time bound fails under ``TRITON_INTERPRET=1``. Re-install ``__index__`` with ``.item()``.
    Only touches the interpreter, and only when it is enabled."""
    interpreter = _interpreter_to_shim("_moekit_index_shim")
    if interpreter is None:
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


def _interpreter_nested_call_shim() -> None:
    """Triton 3.6's interpreter re-patches ``triton.language`` on every call of a ``@triton.jit`` helper
    from inside a kernel (``inspect.getmembers`` over several modules: ~1 ms per call), although the
    kernel launch has already patched the same modules for its whole run. Skip that redundant patching
    for helper calls made while a launch is running (a launch still patches, and restores, as before).
    Only touches the interpreter, and only when it is enabled."""
    interpreter = _interpreter_to_shim("_moekit_nested_shim")
    if interpreter is None:
        return
    grid_call = getattr(interpreter.GridExecutor, "__call__", None)
    fn_call = getattr(interpreter.InterpretedFunction, "__call__", None)
    if grid_call is None or fn_call is None or not hasattr(interpreter.InterpretedFunction, "rewrite"):
        return  # pragma: no cover
    import triton.language as tl

    state = {"depth": 0, "patched": set()}  # language modules patched during the running launch

    def langs(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)

    def launch(self, *args, **kwargs):
        outer = state["patched"]
        state["depth"] += 1
        state["patched"] = set(langs(self.fn))
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            state["depth"] -= 1
            state["patched"] = outer

    def helper(self, *args, **kwargs):
        mine = self.__dict__.get("_moekit_langs")
        if mine is None:
            mine = self._moekit_langs = langs(self.fn)
        if state["depth"] == 0 or not mine <= state["patched"]:
            state["patched"] |= mine
            return fn_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    interpreter.GridExecutor.__call__ = launch
    interpreter.InterpretedFunction.__call__ = helper
    interpreter._moekit_nested_shim = True


_interpreter_nested_call_shim()


def _interpreter_compare_shim() -> None:
    """The interpreter (3.6 and 3.9 alike) labels a comparison's result with its operands' type (``binary_op``
    keeps ``lhs.dtype``) although it holds booleans; splatting a scalar comparison to a block then makes an integer
    array. Triton 3.6's load took that as a mask; 3.9's refuses it ("mask has unsupported dtype"), so
    ``hmask & (tok < T)`` fails. Label boolean comparison results ``int1``, as compiled code types them, on every
    release (3.6's suite passes with it). Only touches the interpreter, and only when it is enabled."""
    interpreter = _interpreter_to_shim("_moekit_compare_shim")
    if interpreter is None:
        return
    import numpy as np
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    handle = interpreter.TensorHandle

    def as_int1(compare):
        def create(self, lhs, rhs):
            out = compare(self, lhs, rhs)
            return handle(out.data, tl.int1) if out.data.dtype == np.bool_ and out.dtype != tl.int1 else out
        return create

    for name in dir(builder):
        if name.startswith(("create_icmp", "create_fcmp")):
            setattr(builder, name, as_int1(getattr(builder, name)))
    interpreter._moekit_compare_shim = True


_interpreter_compare_shim()
