"""Plots of ``moekit bench`` rows (matplotlib, optional: :func:`write_plots` skips with a message without it).

- ``<stem>.png``: achieved TFLOP/s against arithmetic intensity, with the roofline of the run's
  measured bandwidth and bf16 peak (and the fp8 peak, dashed, when measured). Colour = model shape,
  marker = impl + quant (``moekit`` / ``moekit-experts`` / ``baseline`` × ``bf16`` / ``fp8`` / ...).
- ``<stem>-speed.png``: per shape, µs against tokens (log-log), one line per impl + quant, and the
  peer's reference points (``vllm-*`` rows of a baseline file such as
  ``benchmarks/baselines/vllm-h200.json``) drawn as open markers on dashed lines when given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

#: marker per impl (filled for moekit's own rows) and colour per quant for the speed plot
_MARKERS = {"moekit": "o", "moekit-experts": "s", "baseline": "x", "vllm-full": "^", "vllm-gemms": "v",
            "vllm-fp8": "D"}
_QUANT_MARKER_FILL = {"bf16": "full", "fp16": "full", "fp8": "left", "mxfp4": "bottom", "int4": "none"}
_QUANT_COLOURS = {"bf16": "tab:blue", "fp16": "tab:blue", "fp8": "tab:orange", "mxfp4": "tab:green",
                  "int4": "tab:red"}
_REF_COLOURS = {"bf16": "black", "fp16": "black", "fp8": "tab:brown"}


def series_key(row: dict) -> str:
    """``impl`` or ``impl quant`` (the label of one plotted series)."""
    return f"{row['impl']} {row['quant']}" if row.get("quant") else row["impl"]


def load_reference(path) -> list[dict]:
    """The ``rows`` of a baseline file (``{model, tokens, impl, quant, us}``); [] if ``path`` is None. ``ValueError``
    naming the file where it is not JSON or its rows (a list, or an object's ``rows``) lack those keys, and naming the
    row and key where ``tokens`` is no int >= 1 or ``us`` no finite number > 0 (round 67: such a row passed, and the
    speed plot was dropped at the end of the run)."""
    if path is None:
        return []
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    rows = data.get("rows") if isinstance(data, dict) else data
    need = ("model", "tokens", "impl", "us")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in need) for r in rows):
        raise ValueError(f"{path} is not a baseline file: expected a list of rows {{{', '.join(need)}, ...}} "
                         "(or an object holding one as 'rows')")
    for i, r in enumerate(rows):
        tokens, us = r["tokens"], r["us"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"{path}: row {i}: 'tokens' must be an int >= 1, got {tokens!r}")
        if isinstance(us, bool) or not isinstance(us, (int, float)) or not math.isfinite(us) or us <= 0:
            raise ValueError(f"{path}: row {i}: 'us' must be a finite number > 0, got {us!r}")
    return rows


def device_of(rows) -> str:
    """The GPU the rows name (their ``device``), "" where none does (round 69: rows of older result files, e.g.
    round 33's layer profiles, carry it in the file's object, not in each row: the plot raised ``KeyError``)."""
    return next((r["device"] for r in rows if r.get("device")), "")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roofline_rows(rows) -> list[dict]:
    """The rows the roofline PNG draws: those carrying ``flops``, ``bytes`` and ``tflops``."""
    return [r for r in rows if r.get("flops") and r.get("bytes") and r.get("tflops")]


def speed_rows(rows) -> list[dict]:
    """The rows the speed PNG draws: timed layer / experts-step rows (not eager, routing or torch ones)."""
    return [r for r in rows if r.get("us") and r.get("host_us") is None and r["impl"] != "moekit-route"
            and not r["impl"].startswith(("torch-", "eager-"))]


def plot_roofline(rows, bw: float, peak: float, path: Path, fp8_peak: float | None = None) -> None:
    """The roofline PNG of the rows that carry ``flops`` and ``bytes``."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    rows = roofline_rows(rows)
    fig, ax = plt.subplots(figsize=(10, 6.5))
    ai = [10 ** (x / 10) for x in range(-5, 45)]
    ax.loglog(ai, [min(peak, bw * a) / 1e12 for a in ai], "k-", lw=1.5, label="roofline bf16 (max measured BW)")
    if fp8_peak:
        ax.loglog(ai, [min(fp8_peak, bw * a) / 1e12 for a in ai], "k--", lw=1.0, label="roofline fp8 peak")
    models = sorted({r["model"] for r in rows})
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    series = sorted({(r["impl"], r.get("quant") or "") for r in rows})
    for impl, quant in series:
        for model in models:
            pts = [r for r in rows if r["impl"] == impl and (r.get("quant") or "") == quant and r["model"] == model]
            if pts:
                ax.loglog([r["flops"] / r["bytes"] for r in pts], [r["tflops"] for r in pts], ls="none",
                          marker=_MARKERS.get(impl, "*"), fillstyle=_QUANT_MARKER_FILL.get(quant, "full"),
                          color=colours[model], alpha=0.8, ms=6)
    handles = [Line2D([], [], color="k", ls="-", label="roofline bf16")]
    if fp8_peak:
        handles.append(Line2D([], [], color="k", ls="--", label="roofline fp8"))
    handles += [Line2D([], [], color=colours[m], ls="none", marker="o", label=m) for m in models]
    handles += [Line2D([], [], color="gray", ls="none", marker=_MARKERS.get(i, "*"),
                       fillstyle=_QUANT_MARKER_FILL.get(q, "full"), label=f"{i} {q}".strip()) for i, q in series]
    ax.legend(handles=handles, fontsize=7, ncol=2)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"MoE layer forward and experts step, {device_of(rows)}")
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_speed(rows, path: Path, reference=()) -> None:
    """The speed PNG: per shape, µs against T for each impl + quant; ``reference`` rows as open markers."""
    plt = _pyplot()

    rows = speed_rows(rows)
    models = sorted({r["model"] for r in rows})
    # a reference measured with another activation (``activation``) goes to the ``<model>-<activation>`` panel
    reference = [dict(r, model=f"{r['model']}-{r['activation']}")
                 if r.get("activation") and f"{r['model']}-{r['activation']}" in models else r for r in reference]
    cols = min(3, max(1, len(models)))
    nrows = max(1, -(-len(models) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for group, style in ((rows, "-"), (reference, "--")):
            pts_model = [r for r in group if r["model"] == model]
            colours = _QUANT_COLOURS if style == "-" else _REF_COLOURS
            for key in sorted({series_key(r) for r in pts_model}):
                pts = sorted((r for r in pts_model if series_key(r) == key), key=lambda r: r["tokens"])
                impl, quant = pts[0]["impl"], pts[0].get("quant") or ""
                ax.loglog([r["tokens"] for r in pts], [r["us"] for r in pts], ls=style, lw=1.0,
                          marker=_MARKERS.get(impl, "*"), color=colours.get(quant, "gray"),
                          fillstyle="none" if style == "--" or impl == "moekit-experts" else "full", ms=5,
                          label=key)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("µs per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    fig.suptitle(f"µs per call against tokens, {device_of(rows)} (dashed: reference)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_plots(rows, stem: Path, bw: float, peak: float, fp8_peak: float | None = None, reference=(),
                log=print) -> list[Path]:
    """Both PNGs next to ``stem`` (``<stem>.png``, ``<stem>-speed.png``); without matplotlib: a message, []. A plot
    none of whose rows it draws is skipped with a message (round 67: ``--eager-only`` wrote two empty PNGs)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("plots skipped: matplotlib is not installed (pip install matplotlib); the JSON is the result")
        return []
    stem = Path(stem)
    done = []
    for path, draw, drawn in (
            (stem.with_name(stem.name + ".png"), lambda p: plot_roofline(rows, bw, peak, p, fp8_peak),
             roofline_rows(rows)),
            (stem.with_name(stem.name + "-speed.png"), lambda p: plot_speed(rows, p, reference), speed_rows(rows))):
        if not drawn:
            log(f"plot {path.name} skipped: no rows for it (the JSON holds every row)")
            continue
        try:
            draw(path)
            done.append(path)
        except Exception as exc:  # a plot is a convenience: the JSON is the result
            log(f"plot {path.name} skipped: {exc!r}")
    return done
