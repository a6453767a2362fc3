"""State dicts of :class:`~moekit.RoutedExperts` saved before round 62 (torch ``_metadata`` version 1).

Until round 62 a quantised layer's never-written scales held 0, and a state dict marked the experts it never loaded
by all-zero scale shards; since then they hold NaN (e8m0: 255), and an all-zero scale is a value (a padding expert's).
Which rule a dict follows is read from its torch ``_metadata`` (``state_dict()`` writes it; ``torch.load`` keeps it):

- with metadata (``layer.load_state_dict(sd)``, ``layer.load_weights(sd)`` or ``layer.load_weights(sd.items())`` of
  the dict ``torch.load`` returned): version 1 reads all-zero scale shards as never written (the forward refuses those
  experts), version 2 reads them as values;
- without (``dict(sd)``, a re-keyed copy, ``(name, tensor)`` pairs from a generator or a file): all-zero scale shards
  are read as values, with a ``UserWarning`` naming them (round 69: such a pre-62 dict loaded silently and computed
  zeros for the experts the old layer never loaded).
"""

from __future__ import annotations

import gc
import warnings
from collections import OrderedDict
from collections.abc import ItemsView, Mapping

#: the module name of a layer's experts in a state dict (``….routed_experts.w13_scale``)
_EXPERTS = "routed_experts"


def saved_version(weights) -> int | None:
    """The version the experts' entries of ``weights`` were saved with: read from the torch ``_metadata`` of a
    ``state_dict()`` mapping given as it is or through its ``.items()`` view (the dict behind a view is found through
    the garbage collector's referents, CPython's; anything else: None). The lowest over the dict's
    ``…routed_experts`` modules; None where it holds none."""
    owner = weights
    if isinstance(weights, ItemsView) and not isinstance(weights, Mapping):
        owner = getattr(weights, "_mapping", None)  # (collections.abc's views; dict views keep it in C)
        if owner is None:
            owner = next((r for r in gc.get_referents(weights) if isinstance(r, Mapping)), None)
    metadata = getattr(owner, "_metadata", None)
    if not isinstance(metadata, Mapping):
        return None
    versions = [m.get("version") for k, m in metadata.items() if isinstance(k, str) and isinstance(m, Mapping)
                and (k == _EXPERTS or k.endswith("." + _EXPERTS))]
    versions = [v for v in versions if isinstance(v, int) and not isinstance(v, bool)]
    return min(versions) if versions else None


def load_slots(experts, slots: dict, version: int | None) -> dict:
    """Load the per-slot tensors ``slots`` (``{"w13_scale": t, ...}``) into ``experts`` as one state dict carrying
    ``version`` as its metadata where known (else none: :func:`warn_zero_scales` may warn); nothing if empty.
    Returns a new empty dict for the next ones."""
    if slots:
        given = OrderedDict(slots)
        if version is not None:
            given._metadata = {"": {"version": version}}
        experts.load_state_dict(given, strict=False)
    return {}


def warn_zero_scales(layer_name: str, shards: list[str]) -> None:
    """A ``UserWarning``: a state dict without version metadata gave ``shards`` (``"expert 6 w1 scale"``, ...)
    all-zero scales, loaded as values."""
    more = f" and {len(shards) - 6} more" if len(shards) > 6 else ""
    warnings.warn(
        f"layer {layer_name!r}: a state dict without version metadata (torch's _metadata) gave all-zero scales for "
        f"{', '.join(shards[:6])}{more}; loaded as values (valid since round 62, e.g. an all-zero padding expert). "
        "Before round 62 all-zero scales marked experts never loaded: if this dict was saved before round 62, load it "
        "with its metadata (torch.load's OrderedDict as is: layer.load_state_dict(sd), layer.load_weights(sd) or "
        "layer.load_weights(sd.items())), so that those experts are refused as not loaded instead of computing zeros",
        UserWarning, stacklevel=2)
