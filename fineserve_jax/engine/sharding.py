"""Tensor parallelism inside a device group: the mesh, every parameter's layout, the KV-head split.

One engine runs on a *device group*: `tp` devices seen as a 1-D `jax.sharding.Mesh` over the
axis "tp". Parameters are placed with `NamedSharding`s chosen here, by parameter path and
shape (never by the layer classes), Megatron-style:

  column-parallel  q/k/v/gate/up: the output dim is split; every parameter indexed by output
                   channel (kernel, packed weight, per-channel and per-group scales, zeros,
                   bias) is split the same way; per-input-channel ones (AWQ `act_scale`) are
                   replicated because the input is.
  row-parallel     o/down: the input dim is split (an int4 weight packs 2 inputs per byte
                   along it, so a shard holds whole bytes; group scales/zeros are split by
                   whole groups when the groups divide evenly, else replicated), AWQ
                   `act_scale` with it; per-output-channel scales and biases are replicated.
                   XLA sums the partial products with one all-reduce per layer (and, for
                   per-token activation quantization, a max all-reduce of the token's amax).
  vocabulary       embedding and LM head split over the vocabulary (`vocab_parallel`), or
                   replicated.
  everything else  (norm weights, RoPE table, unknown parameters) replicated.

The compiled step is partitioned by XLA from these input shardings (the math of a layer
is unchanged, so quantized layers need no TP-specific code); only the paged attention and
the KV write run under `shard_map`, because they index the arena: each device's part of the
arena holds its KV heads of every block (see `kv_split`), and a block id means the same
block on every device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fineserve_jax.formats import KVFormat
from fineserve_jax.formats.kv_split import KVSplit, kv_split  # noqa: F401 (re-exported)
from models.config import ModelConfig

AXIS = "tp"

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")
KV_PROJECTIONS = ("self_attn.k_proj", "self_attn.v_proj")


# --- the device group -------------------------------------------------------------------------

class DeviceGroup:
    """The devices of one engine, as a 1-D mesh over the axis "tp" (tp = len(devices))."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices: Tuple[jax.Device, ...] = tuple(devices)
        self.mesh = Mesh(np.array(self.devices, dtype=object), (AXIS,))

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def key(self) -> tuple:
        """Identity of the group for caches: platform, device ids, axis."""
        return (AXIS, self.devices[0].platform, tuple(d.id for d in self.devices))

    def sharding(self, spec: P = P()) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding(P())

    @property
    def arena_sharding(self) -> NamedSharding:
        """The arena `[tp * num_slabs, slab_words]`: device j holds rows j*num_slabs.. (its
        part of every slab)."""
        return self.sharding(P(AXIS, None))

    def __repr__(self) -> str:
        return f"DeviceGroup(tp={self.tp}, devices={[str(d) for d in self.devices]})"


def device_group(devices) -> Optional[DeviceGroup]:
    """`devices` as a group: None (the default device, no placement), or a non-empty list of
    distinct `jax.Device`s or device indices (into `jax.devices()`) of one platform."""
    if devices is None:
        return None
    if isinstance(devices, (str, bytes)) or not isinstance(devices, (list, tuple)):
        raise ValueError(f"devices must be a list of jax devices or device indices, got "
                         f"{devices!r}")
    if not devices:
        raise ValueError("devices must name at least one device")
    available = jax.devices()
    out = []
    for d in devices:
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
            if not 0 <= d < len(available):
                raise ValueError(f"device index {d} is out of range: this process has "
                                 f"{len(available)} devices ({available[0].platform})")
            d = available[int(d)]
        elif not isinstance(d, jax.Device):
            raise ValueError(f"devices entries must be jax devices or ints, got {d!r}")
        out.append(d)
    if len({d.id for d in out}) != len(out):
        raise ValueError(f"devices must be distinct, got {[str(d) for d in out]}")
    if len({d.platform for d in out}) != 1:
        raise ValueError(f"devices of one group must share a platform, got {[str(d) for d in out]}")
    return DeviceGroup(out)


def first_devices(n: int) -> List[jax.Device]:
    """The first `n` devices of this process (`LLM(tensor_parallel_size=n)`)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {n!r}")
    available = jax.devices()
    if n > len(available):
        raise ValueError(
            f"tensor_parallel_size={n} needs {n} devices but this process has {len(available)} "
            f"({available[0].platform}); on CPU, start the process with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return list(available[:n])


# --- KV heads ---------------------------------------------------------------------------------

def local_kv_format(fmt: KVFormat, split: KVSplit) -> KVFormat:
    """The block layout one device stores: its `local_heads` KV heads of every layer."""
    return dataclasses.replace(fmt, num_kv_heads=split.local_heads)


# --- parameter layouts ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """One parameter's placement on the group: `axis` is the split dim (None: replicated)."""

    path: str
    shape: Tuple[int, ...]
    dtype: str
    axis: Optional[int]
    rule: str

    @property
    def spec(self) -> P:
        if self.axis is None:
            return P()
        return P(*([None] * self.axis + [AXIS]))

    def local_shape(self, tp: int) -> Tuple[int, ...]:
        s = list(self.shape)
        if self.axis is not None:
            s[self.axis] //= tp
        return tuple(s)

    def local_bytes(self, tp: int) -> int:
        return int(np.prod(self.local_shape(tp), dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _site_dims(cfg: ModelConfig, site: str) -> Tuple[int, int]:
    """(in_features, out_features) of a projection site."""
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    return {
        "self_attn.q_proj": (d, cfg.num_heads * hd),
        "self_attn.k_proj": (d, cfg.num_kv_heads * hd),
        "self_attn.v_proj": (d, cfg.num_kv_heads * hd),
        "self_attn.o_proj": (cfg.num_heads * hd, d),
        "mlp.gate_proj": (d, f),
        "mlp.up_proj": (d, f),
        "mlp.down_proj": (f, d),
    }[site]


def _split(axis: int, shape, tp: int, rule: str, whole: int = 1):
    """(axis, rule) when dim `axis` splits into tp shards of a multiple of `whole` elements;
    else replicated with the reason."""
    n = shape[axis]
    if n % (tp * whole) == 0:
        return axis, rule
    return None, f"replicated: dim {axis} ({n}) does not split into {tp} x {whole}"


def param_layout(path: str, shape: Sequence[int], dtype, cfg: ModelConfig, tp: int, *,
                 vocab_parallel: bool = True) -> ParamLayout:
    """The placement of the parameter `path` (dotted NNX state path, e.g.
    "layers.self_attn.q_proj.weight_scale") of `shape` on a group of `tp` devices.

    Stacked layer parameters carry a leading layer axis (`[layers, ...]`); the rules address
    the trailing dims. A parameter a projection may or may not have (AWQ `act_scale`, bias)
    is placed by its name and shape whenever it is there.
    """
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype).name
    parts = path.split(".")
    name = parts[-1]

    def out(axis, rule):
        return ParamLayout(path, shape, dtype, axis, rule)

    if tp == 1:
        return out(None, "one device")
    if path == "embed_tokens":
        if not vocab_parallel:
            return out(None, "replicated embedding")
        return out(*_split(0, shape, tp, "vocabulary-parallel embedding (rows)"))
    if parts[0] == "lm_head":
        if not vocab_parallel or name != "kernel":
            return out(None, "replicated LM head")
        return out(*_split(len(shape) - 1, shape, tp, "vocabulary-parallel LM head (columns)"))
    site = ".".join(parts[1:-1]) if parts[0] == "layers" else ""
    if site not in COLUMN_PARALLEL and site not in ROW_PARALLEL:
        return out(None, "replicated (norms, RoPE table, other parameters)")
    fan_in, fan_out = _site_dims(cfg, site)
    last = len(shape) - 1
    if site in KV_PROJECTIONS and not kv_split(cfg.num_heads, cfg.num_kv_heads, tp).sharded:
        return out(None, "replicated: fewer KV heads than devices (each device keeps its head)")
    if site in COLUMN_PARALLEL:
        if name == "act_scale":
            return out(None, "column-parallel, per input channel: replicated")
        if shape[last] == fan_out:
            whole = cfg.head_dim if site.startswith("self_attn") else 1
            return out(*_split(last, shape, tp, "column-parallel: output channels", whole))
        return out(None, "column-parallel, unknown parameter: replicated")
    # Row-parallel: the input dim is split.
    if name == "act_scale" and shape[last] == fan_in:
        return out(*_split(last, shape, tp, "row-parallel, per input channel"))
    if len(shape) == 3 and shape[last] == fan_out:  # [layers, rows, out]
        rows = shape[1]
        if rows == fan_in:
            return out(*_split(1, shape, tp, "row-parallel: input rows"))
        if name == "weight" and dtype == "uint8" and 2 * rows == fan_in:
            return out(*_split(1, shape, tp, "row-parallel: packed int4 rows (2 inputs per "
                                             "byte, whole bytes per shard)"))
        if fan_in % rows == 0:  # one row per input group: scales, zeros, group scales
            return out(*_split(1, shape, tp, f"row-parallel: whole {fan_in // rows}-input "
                                             f"groups per shard"))
    if shape[last] == fan_out:
        return out(None, "row-parallel, per output channel: replicated")
    return out(None, "row-parallel, unknown parameter: replicated")


def _path_str(path) -> str:
    keys = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                keys.append(k.name)
    return ".".join(keys)


def param_layouts(state, cfg: ModelConfig, tp: int, *, vocab_parallel: bool = True
                  ) -> List[ParamLayout]:
    """The layout of every array of an NNX state (flatten order)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [param_layout(_path_str(p), a.shape, a.dtype, cfg, tp, vocab_parallel=vocab_parallel)
            for p, a in leaves]


def layouts_key(layouts: Iterable[ParamLayout]) -> str:
    """A short hash of the layouts (the step cache's key includes it)."""
    text = "|".join(f"{l.path}:{l.shape}:{l.axis}" for l in layouts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def place_params(state, group: DeviceGroup, layouts: Sequence[ParamLayout]):
    """`state` with every array on the group's devices in its layout (arrays already placed
    so are kept as they are)."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    if len(leaves) != len(layouts):
        raise ValueError(f"{len(leaves)} arrays but {len(layouts)} layouts")
    placed = []
    for a, lay in zip(leaves, layouts):
        target = group.sharding(lay.spec)
        if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(target, a.ndim):
            placed.append(a)
        else:
            placed.append(jax.device_put(a, target))
    return jax.tree_util.tree_unflatten(treedef, placed)


def shardings_of(state):
    return jax.tree.map(lambda a: a.sharding, state)


@dataclasses.dataclass(frozen=True)
class DeviceBytes:
    """What one device of the group holds for a model (from the layouts)."""

    tp: int
    param_bytes_total: int  # the model's parameters, each counted once
    param_bytes_per_device: int  # split parameters / tp + replicated parameters
    replicated_bytes: int  # per device, the part that is replicated


def device_bytes(layouts: Sequence[ParamLayout], tp: int) -> DeviceBytes:
    total = sum(l.local_bytes(1) for l in layouts)
    per = sum(l.local_bytes(tp) for l in layouts)
    rep = sum(l.local_bytes(1) for l in layouts if l.axis is None)
    return DeviceBytes(tp, total, per, rep)


def layout_table(layouts: Sequence[ParamLayout], tp: int) -> str:
    """One line per parameter: path, global and per-device shape, dtype, rule."""
    lines = []
    for l in layouts:
        lines.append(f"{l.path:<40} {str(l.shape):<16} -> {str(l.local_shape(tp)):<16} "
                     f"{l.dtype:<14} {l.rule}")
    return "\n".join(lines)


def summarize_layouts(layouts: Sequence[ParamLayout]) -> Dict[str, str]:
    """path -> rule (for summaries)."""
    return {l.path: l.rule for l in layouts}


# --- inspecting a partitioned program ---------------------------------------------------------

_COLLECTIVE = re.compile(
    r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
    r"(?:.*?op_name=\"([^\"]*)\")?")


def collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
    """Collectives of a compiled (partitioned) program's HLO text, split into those of the
    decoder's layer body (inside the layer scan's while loop: they run once per layer) and
    the others (embedding, LM head, sampling): {"per_layer": {op: n}, "other": {op: n}}."""
    out: Dict[str, Dict[str, int]] = {"per_layer": {}, "other": {}}
    for m in _COLLECTIVE.finditer(hlo_text):
        op, name = m.group(1), m.group(2) or ""
        where = "per_layer" if "/while/body/" in name else "other"
        out[where][op] = out[where].get(op, 0) + 1
    return out
