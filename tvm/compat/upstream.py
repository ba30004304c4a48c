"""Safe reading of the authors' checkpoints (docs/method.md §9) without running anything they contain.

The authors' network pickles (``network-snapshot-*.pkl`` and the released ``im256_w2.pkl``,
``im256_w1p75.pkl``, ``im512_w2p5.pkl``) are written by ``pickle.dump`` with EDM's "persistence"
mechanism: every decorated class pickles as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta['module_src']`` is
Python source that a plain ``pickle.load`` would exec (docs/method.md §9.2). Their training states
(``training-state-*.pt``) are ``torch.save`` archives holding the same network objects.

Loading here never imports or executes anything from the file:

- :class:`RestrictedUnpickler` resolves globals through an explicit allow-list. Tensor-rebuild
  functions, ``Parameter``, ``OrderedDict``, torch dtypes and a few plain builtin types are the
  real objects; ``torch.storage._load_from_bytes`` becomes :func:`load_storage_bytes`, which maps
  every storage (CUDA ones included) to the CPU with ``weights_only=True``; the persistence call
  becomes :func:`persistent_record`, a :class:`PersistentRecord` holding only ``class_name`` and
  ``state`` (``module_src`` is dropped, never exec'd); classes of the authors' project, timm,
  OmegaConf, ``torch.nn.modules`` and the ``torch.compile`` wrapper become inert
  :class:`ForeignObject` holders that keep their constructor arguments and pickled state as data.
  Any other global (``os.system``, ``builtins.exec`` …) raises :class:`UnsafePickleError` naming it
  before anything is called.
- :func:`collect_parameters` walks the held ``_modules`` trees (entering ``_orig_mod`` of a compiled
  wrapper) and returns the authors' ``state_dict`` names (``model.blocks.0.attn.qkv.weight`` …,
  docs/method.md §9.3), which are ours too.
- :func:`load_upstream_network` builds our :class:`~tvm.method.wrapper.TVMWrapper` from the facts
  in the pickle (:func:`read_facts`) and loads the weights after an explicit name and shape check.
- :func:`checkpoint_from_upstream` turns a network pickle into our checkpoint layout
  (``scripts/convert_upstream.py`` writes it); :func:`read_training_state` reads a training state
  into plain state dicts.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import copy
import dataclasses
import functools
import io
import math
import pickle
import re
import types
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

import torch
from omegaconf import DictConfig, OmegaConf

from tvm.config import Config, compose_config, to_container
from tvm.runtime.checkpoint import file_sha256
from tvm.method.wrapper import DATA_TYPES, TVMWrapper
from tvm.models.dit import VARIANT_ALIASES, VARIANTS, Variant, resolve_variant
from tvm.runtime.build import build_network
from tvm.runtime.checkpoint import state_dict_differences

PathLike = str | Path
OPTIMIZED_MODULE = "torch._dynamo.eval_frame.OptimizedModule"
PERSISTENCE_FUNCTION = ("torch_utils.persistence", "_reconstruct_persistent_obj")
DEFAULT_MODEL_TYPE = "DiT_XL_2_18h"
MODEL_PREFIX = "model."  # TVMWrapper holds the DiT as ``model`` (docs/method.md §9.3)


class UpstreamFormatError(ValueError):
    """An upstream file is not laid out as docs/method.md §9 describes, or does not fit our network.

    The message names the file and the offending key, global or shape.
    """


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list; nothing from it was executed."""


# ---------------------------------------------------------------------------------------------
# Inert holders
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PersistentRecord:
    """What an EDM persistence record carries, as data (docs/method.md §9.2 (i)).

    ``state`` is the pickled instance ``__dict__`` (``_modules``, ``_parameters``, attributes,
    ``_init_kwargs`` …). The record's ``module_src`` is not kept and never executed.
    """

    class_name: str
    state: dict[str, Any]
    version: int | None = None

    def __setstate__(self, state: Any) -> None:
        raise UpstreamFormatError(
            f"persistence record of {self.class_name} followed by extra state; EDM records "
            "carry their state inside meta"
        )


class ForeignObject:
    """Inert stand-in for an instance of a class that is never imported (docs/method.md §9.2 (ii)).

    Whatever pickle does to build the object lands here as data: constructor arguments in
    ``args``/``kwargs`` (e.g. ``Format('NCHW')`` or a compiled wrapper's ``(orig_mod, ctx)``), the
    ``__setstate__`` payload in ``state``, dict items in ``items`` and list items in ``elements``.
    Subclasses made by :func:`foreign_class` carry the original ``module.name`` in
    ``qualified_name``.
    """

    qualified_name = "<foreign>"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: dict[Any, Any]
    elements: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> ForeignObject:
        obj = super().__new__(cls)
        obj.args, obj.kwargs = args, kwargs
        obj.state, obj.items, obj.elements = None, {}, []
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    @property
    def attributes(self) -> dict[str, Any]:
        """The pickled instance dict (``state``, or the dict part of a ``(dict, slots)`` pair)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            return merged
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


@functools.lru_cache(maxsize=None)
def foreign_class(qualified_name: str) -> type[ForeignObject]:
    """The inert holder class standing for the global ``qualified_name``."""
    name = qualified_name.rpartition(".")[2] or qualified_name
    return type(name, (ForeignObject,), {"qualified_name": qualified_name, "__module__": __name__})


def persistent_record(meta: Any) -> PersistentRecord:
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: keeps the data only."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise UpstreamFormatError(
            "malformed persistence record: expected a dict with type='class', a str class_name and a state dict, "
            f"got {type(meta).__name__} with keys {sorted(meta) if isinstance(meta, dict) else '-'}"
        )
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise UpstreamFormatError(
            f"persistence record of {meta['class_name']} has a state of type {type(state).__name__}, expected dict"
        )
    version = meta.get("version")
    return PersistentRecord(meta["class_name"], state, version if isinstance(version, int) else None)


def _is_holder(obj: Any) -> bool:
    return isinstance(obj, ForeignObject) or (isinstance(obj, type) and issubclass(obj, ForeignObject))


def foreign_getattr(obj: Any, name: Any) -> type[ForeignObject]:
    """Replacement for ``builtins.getattr``, allowed on inert holders only.

    A pickled ``torch.compile`` context stores bound methods as ``getattr(holder, 'name')``; the
    result is another inert holder. On any real object ``getattr`` could reach arbitrary code
    (``__globals__`` …), so it is refused.
    """
    if not _is_holder(obj) or not isinstance(name, str):
        raise UnsafePickleError(
            f"refusing builtins.getattr({type(obj).__module__}.{type(obj).__qualname__}, "
            f"{name!r}): only allowed on inert stand-ins of foreign classes"
        )
    return foreign_class(f"{obj.qualified_name}.{name}")


# ---------------------------------------------------------------------------------------------
# Storages and the allow-list
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_storage_warnings() -> Iterator[None]:
    """Silence torch's TypedStorage deprecation notice, which every pickled storage triggers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        yield


def load_storage_bytes(data: Any) -> torch.storage.TypedStorage | torch.UntypedStorage:
    """Safe ``torch.storage._load_from_bytes``: the bytes are a ``torch.save`` payload of one
    storage, tagged with the device it was saved from (CUDA for the EMA, docs/method.md §9.2); loaded
    with ``weights_only=True`` and mapped to the CPU."""
    if not isinstance(data, (bytes, bytearray)):
        raise UpstreamFormatError(f"torch.storage._load_from_bytes called with {type(data).__name__}, expected bytes")
    try:
        with _quiet_storage_warnings():
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(
            f"embedded storage payload refused by torch's weights_only loader: {str(exc).splitlines()[0]}"
        ) from exc
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UpstreamFormatError(f"embedded storage payload holds {type(storage).__name__}, expected a storage")
    return storage


def _torch_dtypes() -> dict[str, torch.dtype]:
    names = (
        "float32",
        "float",
        "float64",
        "double",
        "float16",
        "half",
        "bfloat16",
        "int8",
        "uint8",
        "int16",
        "short",
        "int32",
        "int",
        "int64",
        "long",
        "bool",
        "complex64",
        "cfloat",
        "complex128",
        "cdouble",
        "float8_e4m3fn",
        "float8_e5m2",
    )
    return {name: getattr(torch, name) for name in names if isinstance(getattr(torch, name, None), torch.dtype)}


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): torch._utils._rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Tensor"): torch.Tensor,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch.storage", "_load_from_bytes"): load_storage_bytes,
    PERSISTENCE_FUNCTION: persistent_record,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "getattr"): foreign_getattr,
    **{("builtins", t.__name__): t for t in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bool)},
    **{("torch", name): dtype for name, dtype in _torch_dtypes().items()},
}
# Namespaces whose globals become inert holders: the authors' project (incl. modules that EDM's
# persistence exec'd under generated names), its libraries, torch modules and the compile wrapper.
NEUTRAL_NAMESPACES = (
    "training",
    "torch_utils",
    "dnnlib",
    "jvp_utils",
    "timm",
    "omegaconf",
    "typing",
    "torch.nn.modules",
    "torch._dynamo",
    "torch._inductor",
)
NEUTRAL_GLOBALS = frozenset(
    {"torch._TorchCompileInductorWrapper", "torch._TorchCompileWrapper", "contextlib.nullcontext"}
)
# Protocol-2 pickles (torch.save's default) may carry Python 2 names such as ``__builtin__.set``;
# pickle's own find_class renames them, so ours must too.
_COMPAT_NAMES = _compat_pickle.NAME_MAPPING
_COMPAT_MODULES = _compat_pickle.IMPORT_MAPPING
_EXEC_MODULE = re.compile(r"_imported_module_[0-9a-f]+")


def _is_neutral(module: str, qualified_name: str) -> bool:
    if qualified_name in NEUTRAL_GLOBALS or _EXEC_MODULE.fullmatch(module):
        return True
    return any(module == ns or module.startswith(ns + ".") for ns in NEUTRAL_NAMESPACES)


def resolve_global(module: str, name: str, source: str = "<pickle>") -> Any:
    """The object a pickle may use for ``module.name``; :class:`UnsafePickleError` otherwise."""
    module, name = _COMPAT_NAMES.get((module, name), (_COMPAT_MODULES.get(module, module), name))
    if (module, name) in SAFE_GLOBALS:
        return SAFE_GLOBALS[module, name]
    qualified = f"{module}.{name}"
    if _is_neutral(module, qualified):
        return foreign_class(qualified)
    raise UnsafePickleError(
        f"{source}: refusing global {qualified!r}: not on the allow-list of "
        "tvm.compat.upstream (docs/method.md §9.2); nothing from the file was executed"
    )


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only resolves through :func:`resolve_global`.

    It deliberately defines no ``persistent_load`` method: ``torch.load`` installs its own (for
    archive storages) by assigning the attribute, which a method would silently shadow.
    """

    source = "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name, self.source)


def restricted_pickle_module(source: str) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose ``Unpickler`` is restricted."""
    module = types.ModuleType("tvm_restricted_pickle")
    setattr(module, "Unpickler", type("Unpickler", (RestrictedUnpickler,), {"source": source}))
    return module


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _torch_archive(path: Path) -> Any:
    """A ``torch.save`` zip archive (training state) through torch's loader with our unpickler.

    ``weights_only=True`` cannot read these files (they hold persistence records), and torch only
    accepts a ``pickle_module`` with ``weights_only=False``; the restriction is then ours: every
    global goes through :func:`resolve_global`, storages through torch's map to the CPU.
    """
    return torch.load(path, map_location="cpu", pickle_module=restricted_pickle_module(str(path)), weights_only=False)


def _plain_pickle(handle: BinaryIO, source: str) -> Any:
    unpickler = RestrictedUnpickler(handle)
    unpickler.source = source
    return unpickler.load()


def load_pickle(path: PathLike) -> Any:
    """Unpickle an upstream file safely: a ``pickle.dump`` file (network snapshot) or a
    ``torch.save`` zip archive (training state). Tensors end up on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"upstream checkpoint {path} does not exist or is not a file")
    try:
        with _quiet_storage_warnings():
            if zipfile.is_zipfile(path):
                return _torch_archive(path)
            with open(path, "rb") as handle:
                return _plain_pickle(handle, str(path))
    except (UnsafePickleError, UpstreamFormatError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
        raise UpstreamFormatError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def is_upstream_pickle(path: PathLike) -> bool:
    """Whether ``path`` looks like an authors' network pickle (a plain pickle stream, not a zip).

    Our checkpoints and the authors' training states are zip archives; use this to route a path
    given to ``generate.py``/``eval.py`` to :func:`load_upstream_network`.
    """
    path = Path(path)
    if not path.is_file() or zipfile.is_zipfile(path):
        return False
    with open(path, "rb") as handle:
        return handle.read(1) == pickle.PROTO


# ---------------------------------------------------------------------------------------------
# Module trees → parameters
# ---------------------------------------------------------------------------------------------


def _describe(obj: Any) -> str:
    if isinstance(obj, PersistentRecord):
        return f"persistent {obj.class_name}"
    if isinstance(obj, ForeignObject):
        return obj.qualified_name
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def module_dict(node: Any) -> dict[str, Any] | None:
    """The pickled ``__dict__`` of a held module, or None if ``node`` is not one."""
    if isinstance(node, PersistentRecord):
        return node.state
    if isinstance(node, ForeignObject):
        return node.attributes
    return None


def unwrap_compiled(node: Any, source: str = "<pickle>") -> Any:
    """The module inside ``torch.compile``'s ``OptimizedModule`` (docs/method.md §9.1, §11 item 19).

    Handles both pickled forms: ``OptimizedModule(orig_mod, dynamo_ctx)`` (its ``__reduce__``) and
    a plain module state with ``_modules['_orig_mod']``.
    """
    seen: set[int] = set()
    while isinstance(node, ForeignObject) and node.qualified_name == OPTIMIZED_MODULE:
        attrs = node.attributes
        inner = node.args[0] if node.args else (attrs.get("_modules") or {}).get("_orig_mod", attrs.get("_orig_mod"))
        if inner is None or id(node) in seen:
            raise UpstreamFormatError(f"{source}: compiled-module wrapper without an _orig_mod, or a cycle of them")
        seen.add(id(node))
        node = inner
    return node


def _named_tensors(group: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in (group or {}).items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise UpstreamFormatError(f"{where}{name} is {_describe(value)}, expected a tensor")
        yield name, value.detach()


def _collect(node: Any, prefix: str, out: dict[str, torch.Tensor], source: str, ancestors: set[int]) -> None:
    node = unwrap_compiled(node, source)
    state = module_dict(node)
    if state is None:
        raise UpstreamFormatError(f"{source}: {prefix or '<root>'} is {_describe(node)}, not a module")
    if id(node) in ancestors:
        raise UpstreamFormatError(f"{source}: module {prefix or '<root>'} contains itself")
    skipped = state.get("_non_persistent_buffers_set") or ()
    for group in ("_parameters", "_buffers"):
        for name, tensor in _named_tensors(state.get(group), f"{source}: {prefix}"):
            if group == "_buffers" and name in skipped:
                continue
            if prefix + name in out:
                raise UpstreamFormatError(f"{source}: duplicate parameter name {prefix + name!r}")
            out[prefix + name] = tensor
    ancestors.add(id(node))
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect(child, prefix if name == "_orig_mod" else f"{prefix}{name}.", out, source, ancestors)
    ancestors.discard(id(node))


def collect_parameters(obj: Any, source: str = "<pickle>") -> dict[str, torch.Tensor]:
    """Flat ``name → tensor`` of a held module tree, as its ``state_dict`` would name them.

    Parameters and persistent buffers of every module, walking ``_modules`` in registration order
    and entering compiled wrappers without a prefix; so for a ``TVMWrapper`` the names carry the
    ``model.`` prefix and follow upstream's ``named_parameters`` order, which is also the index
    order of its optimizer state (docs/method.md §9.3). Tensors are detached CPU tensors.
    """
    out: dict[str, torch.Tensor] = {}
    _collect(obj, "", out, source, set())
    return out


# ---------------------------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UpstreamFacts:
    """What a network pickle says about the model (docs/method.md §9.3 wrapper attributes and shapes).

    ``model_type`` is a name our configs accept (the authors' class name where it is one);
    ``hidden_size``/``depth``/``num_heads``/``patch_size`` are read from the shapes. Recorded
    wrapper settings are None when the pickle does not hold them.
    """

    img_resolution: int
    img_channels: int
    label_dim: int
    model_type: str
    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int
    class_name: str | None = None
    do_scale_param: bool | None = None
    detach_jvp: bool | None = None
    data_type: str | None = None
    dataset_resolution: int | None = None
    compiled: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_mapping(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, ForeignObject):
        return {**obj.attributes, **obj.items}
    return {}


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise UpstreamFormatError(
            f"parameter {key!r} is missing; cannot infer the architecture "
            f"(found {len(shapes)} tensors, e.g. {sorted(shapes)[:5]})"
        )
    return tuple(shapes[key])


def _is_variant(name: Any) -> TypeGuard[str]:
    return name in VARIANT_ALIASES or name in VARIANTS


def _variant_name(class_name: str | None, sizes: Variant) -> str:
    """A ``network.model_type`` for these sizes: the class name if it is a variant, else the
    variant with exactly these sizes, else the configs' default (sizes then set explicitly)."""
    if _is_variant(class_name):
        return class_name
    authors = {ours: theirs for theirs, ours in VARIANT_ALIASES.items()}
    for name, spec in VARIANTS.items():
        if spec == sizes:
            return authors.get(name, name)
    return DEFAULT_MODEL_TYPE


def infer_architecture(
    shapes: Mapping[str, Sequence[int]], class_name: str | None = None, prefix: str = MODEL_PREFIX
) -> dict[str, Any]:
    """Sizes of a DiT from its parameter shapes (docs/method.md §3.7, §9.3).

    Hidden size from ``pos_embed``, patch and channels from the patch-embed conv, resolution
    from the token count, labels from the class table (minus the null row), depth from the
    block count, heads from the QK-norm width (head dim), or from the class name's variant
    when the model has no QK-norm.
    """
    tokens, hidden = _shape(shapes, prefix + "pos_embed")[1:]
    conv = _shape(shapes, prefix + "x_embedder.proj.weight")
    channels, patch = conv[1], conv[-1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise UpstreamFormatError(f"{prefix}pos_embed has {tokens} tokens, not a square grid")
    label_dim = _shape(shapes, prefix + "y_embedder.embedding_table.weight")[0] - 1
    block = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    depth = len({m.group(1) for key in shapes if (m := block.match(key))})
    q_norm = prefix + "blocks.0.attn.q_norm.weight"
    if q_norm in shapes:
        heads = hidden // _shape(shapes, q_norm)[0]
    elif _is_variant(class_name):
        heads = resolve_variant(class_name).num_heads
    else:
        raise UpstreamFormatError(
            f"cannot infer the number of heads: no {q_norm!r} and class {class_name!r} is not a known variant"
        )
    sizes = Variant(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=patch)
    return dict(
        img_resolution=grid * patch,
        img_channels=channels,
        label_dim=label_dim,
        **dataclasses.asdict(sizes),
        model_type=_variant_name(class_name, sizes),
    )


def _recorded_int(attrs: Mapping[str, Any], name: str, inferred: int, source: str) -> int:
    value = attrs.get(name)
    if value is None:
        return inferred
    if not isinstance(value, int) or isinstance(value, bool) or value != inferred:
        raise UpstreamFormatError(f"{source}: the wrapper records {name}={value!r} but the weights imply {inferred}")
    return value


def _recorded_bool(attrs: Mapping[str, Any], name: str, source: str) -> bool | None:
    value = attrs.get(name)
    if value is not None and not isinstance(value, bool):
        raise UpstreamFormatError(f"{source}: the wrapper records {name}={value!r}, expected a bool")
    return value


def _recorded_data_type(attrs: Mapping[str, Any]) -> str | None:
    names = {dtype: name for name, dtype in DATA_TYPES.items()}
    dtype, data_type = attrs.get("dtype"), attrs.get("data_type")
    if isinstance(dtype, torch.dtype):
        return names.get(dtype)
    return data_type if data_type in DATA_TYPES else None


def _class_name(node: Any) -> str | None:
    if isinstance(node, PersistentRecord):
        return node.class_name
    if isinstance(node, ForeignObject):
        return node.qualified_name.rpartition(".")[2]
    return None


def read_facts(
    net: Any, params: Mapping[str, torch.Tensor], dataset_kwargs: Any = None, source: str = "<pickle>"
) -> UpstreamFacts:
    """Model facts of an upstream network object (docs/method.md §9.3): shapes decide the architecture,
    the wrapper's attributes (or its recorded ``_init_kwargs``) the settings, and they must agree.
    The variant name is the DiT's class name, else the recorded ``model_type``, if either is one."""
    wrapper = unwrap_compiled(net, source)
    own = module_dict(wrapper) or {}
    attrs = {**_as_mapping(own.get("_init_kwargs")), **own}
    class_name = _class_name(unwrap_compiled((own.get("_modules") or {}).get("model"), source))
    variant = class_name if _is_variant(class_name) or not _is_variant(attrs.get("model_type")) else attrs["model_type"]
    arch = infer_architecture({key: tuple(value.shape) for key, value in params.items()}, variant)
    for name in ("img_resolution", "img_channels", "label_dim"):
        arch[name] = _recorded_int(attrs, name, arch[name], source)
    resolution = _as_mapping(dataset_kwargs).get("resolution")
    return UpstreamFacts(
        **arch,
        class_name=class_name,
        do_scale_param=_recorded_bool(attrs, "do_scale_param", source),
        detach_jvp=_recorded_bool(attrs, "detach_jvp", source),
        data_type=_recorded_data_type(attrs),
        dataset_resolution=resolution if isinstance(resolution, int) else None,
        compiled=wrapper is not net,
    )


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class UpstreamNetwork:
    """Parameters and facts of one network object of an upstream file."""

    params: dict[str, torch.Tensor]
    facts: UpstreamFacts
    source: str


def network_object(obj: Any, source: str, key: str = "net") -> Any:
    """``obj[key]`` of a snapshot dict (docs/method.md §9.1), or ``obj`` itself if it is a module."""
    if isinstance(obj, dict):
        if key not in obj:
            raise UpstreamFormatError(f"{source} has no {key!r} entry; its keys are {sorted(map(str, obj))}")
        if obj[key] is None:
            raise UpstreamFormatError(
                f"{source}[{key!r}] is None: upstream stores None when pickling the network "
                "failed (docs/method.md §11 item 19)"
            )
        return obj[key]
    if module_dict(unwrap_compiled(obj, source)) is not None:
        return obj
    raise UpstreamFormatError(f"{source} holds {_describe(obj)}, expected a dict with {key!r} or a network")


def read_upstream_network(path: PathLike, key: str = "net") -> UpstreamNetwork:
    """Parameters (with the ``model.`` prefix) and facts of the network in an upstream file."""
    source = str(path)
    obj = load_pickle(path)
    net = network_object(obj, source, key)
    params = collect_parameters(net, f"{source}[{key!r}]")
    dataset_kwargs = obj.get("dataset_kwargs") if isinstance(obj, dict) else None
    return UpstreamNetwork(params, read_facts(net, params, dataset_kwargs, source), source)


def _base_config(config: DictConfig | str | None) -> DictConfig:
    if config is None:
        return OmegaConf.structured(Config)
    if isinstance(config, str):
        return compose_config(config)
    return copy.deepcopy(config)


def config_with_facts(config: DictConfig | str | None, facts: UpstreamFacts, source: str = "<pickle>") -> DictConfig:
    """A copy of ``config`` (a DictConfig, a config name or None for the schema defaults) with the
    network facts of the pickle filled in: ``network.model_type`` and the size overrides,
    ``network.do_scale_param`` (when recorded), ``dataset.resolution`` (the pickle's dataset
    resolution, else the latent resolution) and ``dataset.use_labels``. The sampling cfg and the
    encoder statistics stay the config's, since the pickle does not hold them."""
    cfg = _base_config(config)
    spec = resolve_variant(facts.model_type)
    if facts.patch_size != spec.patch_size:
        raise UpstreamFormatError(
            f"{source}: patch size {facts.patch_size} differs from {facts.model_type}'s and "
            "the config has no network.patch_size"
        )
    net = cfg.network
    net.model_type = facts.model_type
    net.hidden_size = None if facts.hidden_size == spec.hidden_size else facts.hidden_size
    net.depth = None if facts.depth == spec.depth else facts.depth
    net.num_heads = None if facts.num_heads == spec.num_heads else facts.num_heads
    if facts.do_scale_param is not None:
        if net.do_scale_param != facts.do_scale_param:
            warnings.warn(
                f"{source} was trained with do_scale_param={facts.do_scale_param} but the config says "
                f"{net.do_scale_param}; using the pickle's value (is --config the right one?)",
                UserWarning,
                stacklevel=2,
            )
        net.do_scale_param = facts.do_scale_param
    cfg.dataset.resolution = facts.dataset_resolution or facts.img_resolution
    cfg.dataset.use_labels = facts.label_dim > 0
    return cfg


def _listing(title: str, items: list[str], limit: int = 10) -> str:
    more = f"\n    … and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}):" + "".join(f"\n    {item}" for item in items[:limit]) + more


def check_state_dict(
    expected: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], source: str = "<pickle>"
) -> None:
    """UpstreamFormatError listing missing, unexpected and shape-mismatched keys, if any."""
    missing, unexpected, mismatched = state_dict_differences(expected, params)
    mismatched = [f"{key}: file {list(params[key].shape)} vs ours {list(expected[key].shape)}" for key in mismatched]
    if missing or unexpected or mismatched:
        raise UpstreamFormatError(
            f"{source} does not fit the network built from the config:"
            + (_listing("missing in the file", missing) if missing else "")
            + (_listing("unexpected in the file", unexpected) if unexpected else "")
            + (_listing("shape mismatches", mismatched) if mismatched else "")
        )


def load_params_strict(net: torch.nn.Module, params: Mapping[str, torch.Tensor], source: str = "<pickle>") -> None:
    """Check names and shapes against ``net.state_dict()`` (readable error), then load strictly."""
    check_state_dict(net.state_dict(), params, source)
    net.load_state_dict(params, strict=True)


def build_upstream_network(
    upstream: UpstreamNetwork, config: DictConfig | str | None = None, device: torch.device | str = "cpu"
) -> tuple[TVMWrapper, DictConfig]:
    """Our TVMWrapper with the upstream weights, and the config it was built from (in eval mode)."""
    facts = upstream.facts
    cfg = config_with_facts(config, facts, upstream.source)
    net = build_network(cfg.network, facts.img_resolution, facts.img_channels, facts.label_dim, device, init=False)
    load_params_strict(net, upstream.params, upstream.source)
    return net.eval(), cfg


def load_upstream_network(
    path: PathLike, config: DictConfig | str | None = None, device: torch.device | str = "cpu"
) -> TVMWrapper:
    """Our :class:`TVMWrapper` carrying the weights of an authors' network pickle (eval mode).

    ``config`` supplies what the pickle lacks (attention backends, autocast dtype); the
    architecture, resolution, channels, labels and parametrisation come from the pickle.
    """
    return build_upstream_network(read_upstream_network(path), config, device)[0]


def checkpoint_from_upstream(path: PathLike, config: DictConfig | str | None = None) -> dict[str, Any]:
    """Our checkpoint content for an authors' network pickle (for ``save_checkpoint``).

    The EMA weights go to ``ema``, ``net`` and ``ema_target`` (so ``training.transfer`` and the
    samplers find them), the config with the pickle's facts to ``config`` and the provenance
    (path, SHA-256, facts) to ``source``. The weights are checked against the network that the
    stored config builds before anything is returned.
    """
    upstream = read_upstream_network(path)
    net, cfg = build_upstream_network(upstream, config)
    weights = dict(net.state_dict())
    return {
        "ema": weights,
        "net": weights,
        "ema_target": weights,
        "config": to_container(cfg),
        "progress": {"step": 0, "nimg": 0, "tick": 0},
        "data": {
            "resolution": upstream.facts.img_resolution,
            "channels": upstream.facts.img_channels,
            "label_dim": upstream.facts.label_dim,
        },
        "source": {"upstream_pickle": str(path), "sha256": file_sha256(path), "facts": upstream.facts.as_dict()},
    }


# ---------------------------------------------------------------------------------------------
# Training states
# ---------------------------------------------------------------------------------------------


def plain_data(obj: Any, where: str) -> Any:
    """``obj`` with OrderedDicts as dicts; UpstreamFormatError naming the place of any held object."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, Mapping):
        return {key: plain_data(value, f"{where}[{key!r}]") for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_data(value, f"{where}[{index}]") for index, value in enumerate(obj))
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    raise UpstreamFormatError(f"{where} is {_describe(obj)}, expected plain data")


TRAINING_STATE_NETWORKS = ("net", "ema", "ema_target")


def read_training_state(path: PathLike) -> dict[str, Any]:
    """An authors' ``training-state-*.pt`` (docs/method.md §9.1) as plain data.

    Returns ``{"net", "ema", "ema_target"}`` as state dicts (``model.*`` names, upstream's
    ``named_parameters`` order), ``"optimizer"`` (AdamW state indexed in that order; pos_embed,
    index 0, has no state) and ``"scaler"`` where present.
    """
    source = str(path)
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise UpstreamFormatError(f"{source} holds {_describe(obj)}, expected a training-state dict")
    out: dict[str, Any] = {
        key: collect_parameters(obj[key], f"{source}[{key!r}]")
        for key in TRAINING_STATE_NETWORKS
        if obj.get(key) is not None
    }
    for theirs, ours in (("optimizer_state", "optimizer"), ("scaler_state", "scaler")):
        if obj.get(theirs) is not None:
            out[ours] = plain_data(obj[theirs], f"{source}[{theirs!r}]")
    if not out:
        raise UpstreamFormatError(
            f"{source} has none of {TRAINING_STATE_NETWORKS} or optimizer_state; "
            f"its keys are {sorted(map(str, obj))}"
        )
    return out
