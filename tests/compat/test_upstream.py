"""Safe loading of the authors' checkpoints: docs/method.md §9, §11 items 18–19 (tvm.compat.upstream).

The fixtures are built here. Stand-in classes registered in fake modules named like the authors'
(``training.wrapper``, ``training.dit``, ``torch_utils.persistence``, ``timm.layers.*``) pickle a
small DiT as docs/method.md §9.2 describes: persistence records ``_reconstruct_persistent_obj(meta)``
with class name, state and module source (which would create a sentinel file if exec'd), plain
class references, a timm enum, an OmegaConf DictConfig in ``_init_kwargs``, a real
``torch.compile`` wrapper, and storages tagged as CUDA. The fake modules are removed from
``sys.modules`` before anything is loaded, so nothing upstream is importable.
"""

from __future__ import annotations

import contextlib
import copyreg
import enum
import importlib.util
import io
import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from helpers import one_hot, perturb_
from tvm.compat.upstream import (
    ForeignObject,
    PersistentRecord,
    UnsafePickleError,
    UpstreamFormatError,
    collect_parameters,
    infer_architecture,
    is_upstream_pickle,
    load_params_strict,
    load_pickle,
    load_upstream_network,
    module_dict,
    read_training_state,
    read_upstream_network,
)
from tvm.config import compose_config, from_container
from tvm.method.wrapper import TVMWrapper
from tvm.models.dit import DiT, FlowMapInput
from tvm.runtime.build import build_network
from tvm.runtime.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
RES, CHANNELS, LABELS, HIDDEN, DEPTH, HEADS = 8, 4, 10, 64, 2, 4
FAKE_MODULES = (
    "torch_utils",
    "torch_utils.persistence",
    "training",
    "training.dit",
    "training.wrapper",
    "timm",
    "timm.layers",
    "timm.layers.patch_embed",
    "timm.layers.mlp",
    "timm.layers.format",
)
PERSISTENT = ("TVMWrapper", "DiT_S_2", "TimestepEmbedder", "LabelEmbedder", "DiTBlock", "FinalLayer")


# ---------------------------------------------------------------------------------------------
# Fixture builders
# ---------------------------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta: dict) -> Any:
    raise AssertionError("the authors' persistence function must never be called")


class Persistent(nn.Module):
    """Pickles like an EDM persistence-decorated class (docs/method.md §9.2)."""

    module_src = ""

    def __reduce__(self) -> tuple:
        meta = {
            "type": "class",
            "version": 6,
            "module_src": self.module_src,
            "class_name": type(self).__name__,
            "state": dict(self.__dict__),
        }
        return _reconstruct_persistent_obj, (meta,)


class Evil:
    """``__reduce__`` returning ``(func, args)``: what a malicious pickle runs on load."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


@contextlib.contextmanager
def upstream_modules(module_src: str) -> Iterator[types.SimpleNamespace]:
    """Fake authors' modules in ``sys.modules`` while pickling; removed (and checked gone) after."""
    saved = {name: sys.modules.get(name) for name in FAKE_MODULES}
    for name in FAKE_MODULES:
        sys.modules[name] = types.ModuleType(name)
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj

    def make(module: str, name: str, base: type) -> type:
        cls = type(name, (base,), {"__module__": module, "__qualname__": name, "module_src": module_src})
        setattr(sys.modules[module], name, cls)
        return cls

    ns = types.SimpleNamespace(
        **{
            name: make("training.wrapper" if name == "TVMWrapper" else "training.dit", name, Persistent)
            for name in PERSISTENT
        }
    )
    ns.Attention = make("training.dit", "Attention", nn.Module)
    ns.PatchEmbed = make("timm.layers.patch_embed", "PatchEmbed", nn.Module)
    ns.Mlp = make("timm.layers.mlp", "Mlp", nn.Module)
    ns.Format = enum.Enum(
        "Format", {"NCHW": "NCHW", "NHWC": "NHWC"}, module="timm.layers.format", qualname="Format", type=str
    )
    sys.modules["timm.layers.format"].Format = ns.Format
    try:
        yield ns
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    assert importlib.util.find_spec("training") is None and importlib.util.find_spec("torch_utils") is None


def build(cls: type, **members: Any) -> nn.Module:
    """An instance with attributes/submodules assigned in this (registration) order."""
    obj = cls()
    if isinstance(obj, Persistent):
        obj._init_args, obj._init_kwargs = (), {}
    for name, value in members.items():
        setattr(obj, name, value)
    return obj


def rms_norm(dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)


def timestep_embedder(ns: types.SimpleNamespace, embedder: nn.Module) -> nn.Module:
    return build(ns.TimestepEmbedder, mlp=embedder.mlp, frequency_embedding_size=256)


def upstream_block(ns: types.SimpleNamespace, block: nn.Module, dim: int, heads: int) -> nn.Module:
    attn = build(
        ns.Attention,
        num_heads=heads,
        head_dim=dim // heads,
        scale=(dim // heads) ** -0.5,
        fused_attn=True,
        qkv=block.attn.qkv,
        q_norm=block.attn.q_norm,
        k_norm=block.attn.k_norm,
        attn_drop=nn.Dropout(0.0),
        proj=block.attn.proj,
        proj_drop=nn.Dropout(0.0),
    )
    mlp = build(
        ns.Mlp,
        fc1=block.mlp.fc1,
        act=nn.GELU(approximate="tanh"),
        drop1=nn.Dropout(0.0),
        norm=nn.Identity(),
        fc2=block.mlp.fc2,
        drop2=nn.Dropout(0.0),
    )
    return build(
        ns.DiTBlock,
        norm1=rms_norm(dim),
        attn=attn,
        norm2=rms_norm(dim),
        mlp=mlp,
        adaLN_modulation=block.adaLN_modulation,
    )


def upstream_wrapper(ns: types.SimpleNamespace, dit: DiT) -> nn.Module:
    """The authors' object tree (docs/method.md §9.2–9.3) around the weights of our ``dit``."""
    D = dit.hidden_size
    grid = RES // 2
    patch = build(
        ns.PatchEmbed,
        img_size=(RES, RES),
        patch_size=(2, 2),
        grid_size=(grid, grid),
        num_patches=grid * grid,
        flatten=True,
        output_fmt=ns.Format.NCHW,
        strict_img_size=True,
        proj=dit.x_embedder.proj,
        norm=nn.Identity(),
    )
    final = build(
        ns.FinalLayer,
        norm_final=rms_norm(D),
        linear=dit.final_layer.linear,
        adaLN_modulation=dit.final_layer.adaLN_modulation,
    )
    model = build(
        ns.DiT_S_2,
        s_embedder=timestep_embedder(ns, dit.s_embedder),
        guidance_embedder=timestep_embedder(ns, dit.guidance_embedder),
        x_embedder=patch,
        t_embedder=timestep_embedder(ns, dit.t_embedder),
        y_embedder=build(
            ns.LabelEmbedder, embedding_table=dit.y_embedder.embedding_table, num_classes=LABELS, dropout_prob=0.0
        ),
        pos_embed=dit.pos_embed,
        blocks=nn.ModuleList([upstream_block(ns, b, D, dit.num_heads) for b in dit.blocks]),
        final_layer=final,
    )
    model_kwargs = OmegaConf.create(
        {
            "do_mod_norm": True,
            "learn_guidance": True,
            "dropout": 0.0,
            "init_type": "spectral",
            "time_specinit": True,
            "qk_norm": True,
        }
    )
    wrapper = build(
        ns.TVMWrapper,
        img_resolution=RES,
        img_channels=CHANNELS,
        label_dim=LABELS,
        do_scale_param=True,
        detach_jvp=False,
        dtype=torch.bfloat16,
        model=model,
    )
    wrapper._init_kwargs = {
        "model_type": "DiT_S_2",
        "model_kwargs": model_kwargs,
        "data_type": "bf16",
        "detach_jvp": False,
        "do_scale_param": True,
        "compile": False,
    }
    return wrapper


def tiny(seed: int = 0, mlp_hidden: int | None = None) -> DiT:
    """Our DiT at test size with random weights (the spectral init is not needed and slower)."""
    torch.manual_seed(seed)
    dit = DiT(
        "DiT-S/2",
        input_size=RES,
        in_channels=CHANNELS,
        num_classes=LABELS,
        hidden_size=HIDDEN,
        depth=DEPTH,
        num_heads=HEADS,
        init=False,
    )
    if mlp_hidden is not None:  # a model of another size: block 1's MLP is narrower
        dit.blocks[1].mlp.fc1 = nn.Linear(HIDDEN, mlp_hidden)
        dit.blocks[1].mlp.fc2 = nn.Linear(mlp_hidden, HIDDEN)
    return perturb_(dit, seed=seed)


CUDA_PAYLOADS: list[bytes] = []


def _cuda_storage(storage: torch.storage.TypedStorage) -> tuple:
    """Pickle a storage as ``_load_from_bytes`` of a payload whose device tag is ``cuda:0``."""
    func, (payload,) = storage.__reduce__()
    tagged = payload.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0", 1)
    assert func is torch.storage._load_from_bytes and tagged != payload
    CUDA_PAYLOADS.append(tagged)
    return func, (tagged,)


class CudaPickler(pickle.Pickler):
    """``pickle.dump`` as upstream ran it with the EMA on a GPU."""

    dispatch_table = {**copyreg.dispatch_table, torch.storage.TypedStorage: _cuda_storage}


def write_snapshot(path: Path, net: Any) -> Path:
    with open(path, "wb") as handle:
        CudaPickler(handle).dump(
            {
                "net": net,
                "dataset_kwargs": {
                    "class_name": "training.dataset.ImageFolderDataset",
                    "path": "in256-latents.zip",
                    "use_labels": True,
                    "xflip": False,
                    "cache": True,
                    "resolution": RES,
                    "max_size": 1281167,
                },
            }
        )
    return path


class CompiledStandIn:
    """Pickles as ``torch.compile``'s wrapper in its state form (``_modules['_orig_mod']``)."""

    def __init__(self, inner: nn.Module) -> None:
        self.inner = inner

    def __reduce__(self) -> tuple:
        from torch._dynamo.eval_frame import OptimizedModule

        state = {
            "_parameters": OrderedDict(),
            "_buffers": OrderedDict(),
            "_modules": OrderedDict(_orig_mod=self.inner),
            "training": False,
        }
        return OptimizedModule, (), state


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """A snapshot, its compiled twin and the original weights; the sentinel shows no exec."""
    tmp = tmp_path_factory.mktemp("upstream")
    sentinel = tmp / "EXECUTED"
    dit = tiny()
    with upstream_modules(f"open({str(sentinel)!r}, 'w').close()\n") as ns:
        plain = write_snapshot(tmp / "network-snapshot-000010.pkl", upstream_wrapper(ns, dit))
        compiled = write_snapshot(tmp / "network-snapshot-compiled.pkl", torch.compile(upstream_wrapper(ns, dit)))
    reference = TVMWrapper(dit, data_type="fp32", do_scale_param=True).eval()
    return types.SimpleNamespace(tmp=tmp, sentinel=sentinel, plain=plain, compiled=compiled, reference=reference)


def inputs(batch: int = 3) -> FlowMapInput:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CHANNELS, RES, RES, generator=gen)
    t = torch.rand(batch, generator=gen)
    return FlowMapInput(x, t, t * 0.5, one_hot([1, 4, 9], LABELS).float(), torch.full((batch,), 0.5))


def outputs(net: TVMWrapper) -> torch.Tensor:
    with torch.no_grad():
        return net.velocity(inputs())


# ---------------------------------------------------------------------------------------------
# Network pickles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["plain", "compiled"])
def test_parameters_equal_the_originals_exactly(upstream, which):
    loaded = read_upstream_network(getattr(upstream, which))
    expected = upstream.reference.state_dict()
    assert list(loaded.params) == list(expected)  # names and upstream's named_parameters order
    for key, value in expected.items():
        assert loaded.params[key].device.type == "cpu"
        assert loaded.params[key].dtype == value.dtype and torch.equal(loaded.params[key], value), key
    assert not upstream.sentinel.exists()


@pytest.mark.parametrize("which", ["plain", "compiled"])
def test_facts(upstream, which):
    facts = read_upstream_network(getattr(upstream, which)).facts
    assert (facts.img_resolution, facts.img_channels, facts.label_dim) == (RES, CHANNELS, LABELS)
    assert (facts.model_type, facts.class_name) == ("DiT_S_2", "DiT_S_2")
    assert (facts.hidden_size, facts.depth, facts.num_heads, facts.patch_size) == (HIDDEN, DEPTH, HEADS, 2)
    assert (facts.do_scale_param, facts.detach_jvp, facts.data_type) == (True, False, "bf16")
    assert facts.dataset_resolution == RES and facts.compiled == (which == "compiled")


def test_loaded_network_outputs_equal_the_original(upstream):
    net = load_upstream_network(upstream.plain, compose_config("im256_w2"))
    assert isinstance(net, TVMWrapper) and net.do_scale_param and not net.training
    assert (net.model.hidden_size, net.model.depth, net.model.num_heads) == (HIDDEN, DEPTH, HEADS)
    assert torch.equal(outputs(net), outputs(upstream.reference))
    assert outputs(net).abs().max() > 0
    assert not upstream.sentinel.exists()


def test_pickle_is_held_as_data(upstream):
    """Persistence records and foreign classes become inert holders; the storages claimed CUDA."""
    snapshot = load_pickle(upstream.plain)
    wrapper = snapshot["net"]
    assert isinstance(wrapper, PersistentRecord) and wrapper.class_name == "TVMWrapper"
    assert not hasattr(wrapper, "module_src")
    model_kwargs = wrapper.state["_init_kwargs"]["model_kwargs"]
    assert isinstance(model_kwargs, ForeignObject)
    assert model_kwargs.qualified_name == "omegaconf.dictconfig.DictConfig"

    def child(node: Any, name: str) -> Any:
        return module_dict(node)["_modules"][name]

    model = child(wrapper, "model")
    assert isinstance(model, PersistentRecord) and model.class_name == "DiT_S_2"
    patch = child(model, "x_embedder")
    assert patch.qualified_name == "timm.layers.patch_embed.PatchEmbed"
    assert patch.attributes["output_fmt"].args == ("NCHW",)
    assert child(child(model, "blocks"), "0").class_name == "DiTBlock"
    assert child(child(child(model, "blocks"), "0"), "attn").qualified_name == "training.dit.Attention"
    assert child(model, "t_embedder").state["_modules"]["mlp"].qualified_name == "torch.nn.modules.container.Sequential"
    assert is_upstream_pickle(upstream.plain) and not is_upstream_pickle(upstream.tmp / "missing.pkl")
    assert CUDA_PAYLOADS
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(io.BytesIO(CUDA_PAYLOADS[0]), weights_only=True)


def test_collect_parameters_enters_the_compiled_wrapper(upstream):
    net = load_pickle(upstream.compiled)["net"]
    assert net.qualified_name == "torch._dynamo.eval_frame.OptimizedModule"
    assert list(collect_parameters(net)) == list(upstream.reference.state_dict())


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def _convert_main() -> Any:
    spec = importlib.util.spec_from_file_location("convert_upstream", REPO / "scripts" / "convert_upstream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_convert_round_trip(upstream, tmp_path, capsys):
    dst = tmp_path / "converted.pt"
    assert _convert_main()([str(upstream.compiled), str(dst), "--config", "im256_w2", "eval.batch_size=64"]) == 0
    assert "DiT_S_2" in capsys.readouterr().out
    ckpt = load_checkpoint(dst, require=("ema", "net", "ema_target", "config", "progress", "source"))
    assert ckpt["progress"] == {"step": 0, "nimg": 0, "tick": 0}
    assert ckpt["source"]["upstream_pickle"] == str(upstream.compiled) and len(ckpt["source"]["sha256"]) == 64
    cfg = from_container(ckpt["config"])
    assert (cfg.network.model_type, cfg.network.hidden_size, cfg.network.depth, cfg.network.num_heads) == (
        "DiT_S_2",
        HIDDEN,
        DEPTH,
        HEADS,
    )
    assert cfg.network.do_scale_param and cfg.dataset.resolution == RES and cfg.dataset.use_labels
    assert cfg.sampling["1_step"].cfg_scale == 2.0 and cfg.eval.batch_size == 64  # from the named config
    facts = ckpt["source"]["facts"]
    net = build_network(cfg.network, facts["img_resolution"], facts["img_channels"], facts["label_dim"], init=False)
    net.load_state_dict(ckpt["ema"])
    for key in ("net", "ema_target"):
        assert all(torch.equal(ckpt[key][name], value) for name, value in ckpt["ema"].items())
    assert torch.equal(outputs(net.eval()), outputs(upstream.reference))
    assert _convert_main()([str(upstream.compiled), str(dst), "--config", "im256_w2"]) == 2  # no silent overwrite


def test_do_scale_param_comes_from_the_pickle(upstream):
    with pytest.warns(UserWarning, match="do_scale_param=True"):
        net = load_upstream_network(upstream.plain, compose_config("im512_w2p5"))
    assert net.do_scale_param


# ---------------------------------------------------------------------------------------------
# Mismatches and architecture inference
# ---------------------------------------------------------------------------------------------


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    with upstream_modules("") as ns:
        path = write_snapshot(tmp_path / "other.pkl", upstream_wrapper(ns, tiny(mlp_hidden=128)))
    with pytest.raises(UpstreamFormatError) as err:
        load_upstream_network(path)
    message = str(err.value)
    assert str(path) in message
    assert "model.blocks.1.mlp.fc1.weight: file [128, 64] vs ours [256, 64]" in message
    assert "model.blocks.1.mlp.fc2.weight: file [64, 128] vs ours [64, 256]" in message


def test_strict_check_lists_missing_and_unexpected_keys():
    net = TVMWrapper(tiny())
    params = dict(net.state_dict())
    params["model.extra.weight"] = params.pop("model.final_layer.linear.bias")
    with pytest.raises(
        UpstreamFormatError,
        match=r"missing in the file \(1\):\n    model.final_layer.linear.bias"
        r"(.|\n)*unexpected in the file \(1\):\n    model.extra.weight",
    ):
        load_params_strict(net, params, "x.pkl")


def test_wrapper_attributes_must_agree_with_the_weights(tmp_path):
    with upstream_modules("") as ns:
        wrapper = upstream_wrapper(ns, tiny())
        wrapper.img_resolution = 16
        path = write_snapshot(tmp_path / "inconsistent.pkl", wrapper)
    with pytest.raises(UpstreamFormatError, match="img_resolution=16 but the weights imply 8"):
        read_upstream_network(path)


@pytest.mark.parametrize(
    "variant, class_name, expected",
    [
        ("DiT-XL/2-18h", None, "DiT_XL_2_18h"),
        ("DiT-XL/2", None, "DiT_XL_2"),
        ("DiT-XL/2-18h", "DiT_XL_2_18h", "DiT_XL_2_18h"),
        ("DiT-B/2", "DiT", "DiT_B_2"),
    ],
)
def test_infer_architecture_of_the_released_sizes(variant, class_name, expected):
    with torch.device("meta"):
        dit = DiT(variant, input_size=64, init=False)
    shapes = {key: tuple(value.shape) for key, value in TVMWrapper(dit).state_dict().items()}
    arch = infer_architecture(shapes, class_name)
    assert arch["model_type"] == expected
    assert (arch["hidden_size"], arch["depth"], arch["num_heads"]) == (dit.hidden_size, dit.depth, dit.num_heads)
    assert (arch["img_resolution"], arch["img_channels"], arch["label_dim"], arch["patch_size"]) == (64, 4, 1000, 2)


# ---------------------------------------------------------------------------------------------
# Training states
# ---------------------------------------------------------------------------------------------


def _retag_cuda(path: Path) -> None:
    """Rewrite the storage locations in a torch.save archive's pickle to ``cuda:0``."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            if name.endswith("/data.pkl"):
                tagged = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                assert tagged != data
                data = tagged
            archive.writestr(name, data)


def test_training_state(tmp_path):
    dits = [tiny(seed) for seed in (1, 2, 3)]
    ours = [TVMWrapper(d) for d in dits]
    optimizer = torch.optim.AdamW(ours[0].parameters(), lr=1e-4, betas=(0.9, 0.95))
    ours[0].model.final_layer.linear.bias.grad = torch.ones(CHANNELS * 4)
    optimizer.step()
    path = tmp_path / "training-state-000010.pt"
    with upstream_modules("") as ns:
        state = {
            "net": upstream_wrapper(ns, dits[0]),
            "ema": CompiledStandIn(upstream_wrapper(ns, dits[1])),
            "ema_target": upstream_wrapper(ns, dits[2]),
            "optimizer_state": optimizer.state_dict(),
            "scaler_state": {"scale": 65536.0, "growth_factor": 2.0},
        }
        torch.save(state, path)
    _retag_cuda(path)
    loaded = read_training_state(path)
    for key, net in zip(("net", "ema", "ema_target"), ours):
        expected = net.state_dict()
        assert list(loaded[key]) == list(expected)
        assert all(torch.equal(loaded[key][name], value) for name, value in expected.items())
    saved = optimizer.state_dict()
    assert loaded["optimizer"]["param_groups"] == saved["param_groups"]
    assert set(loaded["optimizer"]["state"]) == set(saved["state"])
    for index, entry in saved["state"].items():
        assert all(torch.equal(loaded["optimizer"]["state"][index][k], v) for k, v in entry.items())
    assert loaded["scaler"] == {"scale": 65536.0, "growth_factor": 2.0}


# ---------------------------------------------------------------------------------------------
# Malicious pickles: refused, naming the global, before anything runs
# ---------------------------------------------------------------------------------------------


def _touch(sentinel: Path) -> str:
    return f"touch {sentinel}"


def _malicious_payloads(sentinel: Path) -> dict[str, tuple[Any, str]]:
    system = f"{os.system.__module__}.system"
    exec_code = f"open({str(sentinel)!r}, 'w').close()"
    return {
        "os.system": (Evil(os.system, _touch(sentinel)), system),
        "builtins.exec": (Evil(exec, exec_code), "builtins.exec"),
        "builtins.eval": ({"net": [Evil(eval, exec_code)]}, "builtins.eval"),
        "subprocess": (Evil(__import__("subprocess").Popen, ["touch", str(sentinel)]), "subprocess.Popen"),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.exec", "builtins.eval", "subprocess"])
def test_malicious_pickle_is_refused(tmp_path, name):
    sentinel = tmp_path / "SENTINEL"
    payload, global_name = _malicious_payloads(sentinel)[name]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafePickleError, match=f"refusing global '{global_name}'") as err:
        load_pickle(path)
    assert str(path) in str(err.value)
    assert not sentinel.exists()


def test_protocol0_os_system_is_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil0.pkl"
    path.write_bytes(b"cos\nsystem\n(V" + _touch(sentinel).encode() + b"\ntR.")
    with pytest.raises(UnsafePickleError, match="'os.system'"):
        load_upstream_network(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("container", ["snapshot", "training_state"])
def test_malicious_global_inside_a_persistence_record(tmp_path, container):
    sentinel = tmp_path / "SENTINEL"
    with upstream_modules(f"open({str(sentinel)!r}, 'w').close()\n") as ns:
        wrapper = upstream_wrapper(ns, tiny())
        wrapper.model.blocks[1].hook = Evil(os.system, _touch(sentinel))  # deep inside a record's state
        if container == "snapshot":
            path = write_snapshot(tmp_path / "evil.pkl", wrapper)
        else:
            path = tmp_path / "training-state-evil.pt"
            torch.save({"net": wrapper, "ema": wrapper, "ema_target": wrapper}, path)
    with pytest.raises(UnsafePickleError, match=f"refusing global '{os.system.__module__}.system'"):
        read_training_state(path) if container == "training_state" else read_upstream_network(path)
    assert not sentinel.exists()


def test_getattr_only_on_inert_holders(tmp_path):
    path = tmp_path / "getattr.pkl"
    path.write_bytes(pickle.dumps({"net": Evil(getattr, torch.Size([1]), "__class__")}))
    with pytest.raises(UnsafePickleError, match=r"refusing builtins.getattr\(torch.Size"):
        load_pickle(path)


def test_malicious_storage_payload_is_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    inner = pickle.dumps(Evil(os.system, _touch(sentinel)), protocol=2)
    path = tmp_path / "storage.pkl"
    path.write_bytes(pickle.dumps({"net": Evil(torch.storage._load_from_bytes, inner)}))
    with pytest.raises(UnsafePickleError, match="embedded storage payload refused"):
        load_pickle(path)
    assert not sentinel.exists()
