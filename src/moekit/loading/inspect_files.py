"""What ``moekit inspect`` (:mod:`.inspect`) reads of a checkpoint's ``.safetensors`` files: the keys of each MoE block
(refused where :func:`moekit.load_moe_layers` refuses them: one tensor under two names), the dtype the routed experts
are stored in (headers only), and the shard files ``model.safetensors.index.json`` names that are not on disk (round 69:
skipped silently, the rest reported as if complete)."""

from __future__ import annotations

import os

from .architectures import plan_layers
from .archs.common import ArchSpec
from .duplicates import check_duplicate_experts, check_duplicate_own
from .files import checkpoint_files, read_header
from .keys import assign_keys
from .plan import LayerPlan
from .quant import quantization_dict
from .reader import Reader

#: the safetensors dtypes full-precision experts load from (others need config.json's quantization_config)
_FLOAT_ST = ("BF16", "F16", "F32", "F64")
#: the index's name, and the one file transformers reads in its place where both are there (:func:`checkpoint_files`)
_INDEX, _SINGLE = "model.safetensors.index.json", "model.safetensors"


class BlockKeys:
    """The checkpoint's key -> file map (``files``) and each planned block's ``{moekit-relative name: key}``
    (``assigned``), of the ``.safetensors`` files :func:`~.files.checkpoint_files` reads."""

    def __init__(self, spec: ArchSpec, plans: list[LayerPlan], files: dict[str, str]):
        self.spec, self.files = spec, files
        self.assigned = assign_keys(spec, plans, files)
        self._reader = Reader(files)

    def of(self, plan: LayerPlan) -> dict[str, str]:
        return self.assigned.get(plan.name, {})

    def read(self, key: str):
        """The tensor of ``key``, or None where its file is not on disk (:func:`missing_shards` tells of it)."""
        return self._reader.read(key) if os.path.isfile(self.files[key]) else None

    def check_own_copies(self, plan: LayerPlan, layer) -> None:
        """:func:`~.duplicates.check_duplicate_own` for ``plan``'s block (``layer``: a layer built from a plan of
        its kind, on the meta device): the keys of a pair naming one tensor are read to compare them."""
        try:
            check_duplicate_own(self.spec, plan, self.of(plan), layer, self.read)
        finally:
            self._reader.close()


def block_keys(path: str, spec: ArchSpec, plans: list[LayerPlan]) -> BlockKeys | None:
    """The :class:`BlockKeys` of ``path`` with each block's routed-expert tensors checked for two names
    (:func:`~.duplicates.check_duplicate_experts`: ``ValueError``, as load_moe_layers refuses them, round 68); None
    where the directory has no ``.safetensors`` file nor index (config.json alone). An unreadable index raises the
    ``ValueError`` naming it; two keys of a block with one name, :func:`~.keys.assign_keys`' error."""
    if not os.path.isfile(os.path.join(path, _INDEX)) and not any(n.endswith(".safetensors") for n in os.listdir(path)):
        return None  # inspect shows the layout without them (round 68: not for a broken symlink, which is refused)
    keys = BlockKeys(spec, plans, checkpoint_files(path))
    for p in plans:
        check_duplicate_experts(spec, p, keys.of(p))
    return keys


def stored_dtypes(keys: BlockKeys, plans: list[LayerPlan]) -> dict[str, dict[str, str]]:
    """Returns block name -> {safetensors dtype (``"BF16"``, ``"F8_E4M3"``...): the first expert key stored in it}
    for the routed expert weights of ``plans`` (only the headers of the shards holding them are read, no tensor); a
    block whose expert tensors are in no present shard is left out. An unreadable shard raises the ``ValueError`` /
    ``OSError`` naming it (round 67: it was taken for "no header", and the sizes shown at config.json's dtype); so
    does a broken symlink not named by an index (an index's missing shards: :func:`missing_shards`)."""
    headers: dict[str, dict] = {}
    out = {}
    for p in plans:
        found: dict[str, str] = {}
        for rel, key in sorted(keys.of(p).items()):
            file = keys.files[key]
            if not rel.startswith("experts.") or "bias" in rel or "scale" in rel or not os.path.isfile(file):
                continue
            if file not in headers:
                headers[file] = read_header(file)
            if key in headers[file]:
                found.setdefault(headers[file][key][0], key)
        if found:
            out[p.name] = found
    return out


def check_float_experts(stored: dict[str, dict[str, str]], config: dict) -> None:
    """Refuses full-precision experts stored in no float dtype (fp8, packed 4-bit: ``F8_E4M3``, ``U8``, ``I32``)
    where config.json has no ``quantization_config``: :func:`moekit.load_moe_layers` refuses them (round 67: shown
    as a full-precision dtype ``f8_e4m3``, exit 0). ``ValueError`` naming the block, the key and its dtype."""
    if quantization_dict(config) is not None:
        return
    for block, found in stored.items():
        bad = next((st for st in sorted(found) if st not in _FLOAT_ST), None)
        if bad is not None:
            raise ValueError(f"{block}: routed expert weights stored as {bad} ({found[bad]!r}), no float dtype, "
                             "and config.json has no quantization_config (a quantised checkpoint needs the one it "
                             "shipped with; load_moe_layers would refuse this checkpoint)")


def missing_shards(path: str, config: dict) -> tuple[str, bool] | None:
    """(a line for inspect's stderr, whether :func:`moekit.load_moe_layers` would refuse the checkpoint for it) where
    the index names shard files that are not on disk (missing, or broken symlinks), else None. Where none of them is
    there (config.json and the index downloaded alone: inspect shows the layout before the weights, round 56) it is
    a note, nothing refused; where some are (an interrupted download), a warning naming the missing ones, and refused
    where one of them holds a tensor of an MoE block, which load_moe_layers reads (it raises naming the file)."""
    if not os.path.isfile(os.path.join(path, _INDEX)) or os.path.isfile(os.path.join(path, _SINGLE)):
        return None
    files = checkpoint_files(path)
    named = sorted(set(files.values()))
    gone = [f for f in named if not os.path.isfile(f)]
    if not gone:
        return None
    if len(gone) == len(named):
        return (f"note: none of the {len(named)} shard files {_INDEX} names is in {path} (config.json and the index "
                "alone?): the layout is config.json's; load_moe_layers needs the files"), False
    listed = ", ".join(os.path.basename(f) + (" (a broken symlink)" if os.path.islink(f) else "") for f in gone[:4])
    listed += f" and {len(gone) - 4} more" if len(gone) > 4 else ""
    spec, plans = plan_layers(config)
    moe = next((k for block in assign_keys(spec, plans, files).values() for k in block.values() if files[k] in gone),
               None)
    one = len(gone) == 1
    why = (f"{'it holds' if one else 'they hold'} MoE block tensors (e.g. {moe!r}): load_moe_layers would refuse this "
           "checkpoint" if moe else f"{'it holds' if one else 'they hold'} no MoE block tensor (load_moe_layers reads "
           "none), but the checkpoint is incomplete")
    return (f"warning: {len(gone)} of the {len(named)} shard files {_INDEX} names {'is' if one else 'are'} not in "
            f"{path}: {listed}; the table reads the others' headers only, and {why} (an interrupted download? "
            "download them again)"), moe is not None
