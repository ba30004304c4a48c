"""DiT architecture and initialisation: docs/method.md §3 and the checklist §12 items 1–12."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import one_hot, perturb_, tiny_dit
from tvm.models.dit import (
    DiT,
    VARIANTS,
    count_parameters,
    label_indices,
    rms_normalize,
    sincos_pos_embed_2d,
    timestep_features,
)

# --- §12 item 1: parameter counts (built on the meta device: no init, no memory) -----------------

PARAM_COUNTS = {  # docs/method.md §3.7: (R=32 total, trainable), (R=64 total)
    "DiT-XL/2-18h": (678_363_408, 678_068_496, 679_248_144),
    "DiT-XL/2": (678_363_856, 678_068_944, 679_248_592),
    "DiT-L/2": (460_715_024, 460_452_880, 461_501_456),
    "DiT-B/2": (132_077_584, 131_880_976, 132_667_408),
    "DiT-S/2": (33_451_792, 33_353_488, 33_746_704),
}


@pytest.mark.parametrize("variant", sorted(PARAM_COUNTS))
def test_parameter_counts(variant):
    total32, trainable32, total64 = PARAM_COUNTS[variant]
    with torch.device("meta"):
        assert count_parameters(DiT(variant, input_size=32)) == (total32, trainable32)
        assert count_parameters(DiT(variant, input_size=64))[0] == total64


def test_authors_class_names_resolve_to_the_same_variants():
    with torch.device("meta"):
        assert count_parameters(DiT("DiT_XL_2_18h")) == count_parameters(DiT("DiT-XL/2-18h"))
    assert set(VARIANTS) >= {"DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2", "DiT-XL/2-18h"}


def test_unknown_variant_is_a_value_error_listing_the_allowed_names():
    with pytest.raises(ValueError, match="unknown model variant 'DiT-XXL/2'.*DiT-XL/2-18h"):
        DiT("DiT-XXL/2")


# --- §12 item 2: the state dict has the authors' names and shapes (docs/method.md §9.3) ----------------


def authors_state_dict_shapes(depth=28, D=1152, heads=18, R=32, C=4, classes=1000):
    """The table of docs/method.md §9.3, written out (prefix ``model.`` omitted)."""
    T = (R // 2) ** 2
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, 2, 2),
        "x_embedder.proj.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
        "final_layer.linear.weight": (4 * C, D),
        "final_layer.linear.bias": (4 * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for emb in ("s_embedder", "guidance_embedder", "t_embedder"):
        shapes |= {
            f"{emb}.mlp.0.weight": (D, 256),
            f"{emb}.mlp.0.bias": (D,),
            f"{emb}.mlp.2.weight": (D, D),
            f"{emb}.mlp.2.bias": (D,),
        }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "attn.qkv.weight": (3 * D, D),
            b + "attn.qkv.bias": (3 * D,),
            b + "attn.q_norm.weight": (D // heads,),
            b + "attn.k_norm.weight": (D // heads,),
            b + "attn.proj.weight": (D, D),
            b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D),
            b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D),
            b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D),
            b + "adaLN_modulation.1.bias": (6 * D,),
        }
    return shapes


def test_state_dict_names_and_shapes_equal_the_authors():
    with torch.device("meta"):
        model = DiT("DiT_XL_2_18h", input_size=32)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == authors_state_dict_shapes()
    assert list(dict(model.named_buffers())) == []
    assert not model.pos_embed.requires_grad
    # Upstream's named_parameters order (= optimizer-state and EMA pairing order) starts with pos_embed,
    # then s_embedder, guidance_embedder, x_embedder, t_embedder, y_embedder, blocks, final_layer.
    order = [n.split(".")[0] for n, _ in model.named_parameters()]
    firsts = list(dict.fromkeys(order))
    assert firsts == [
        "pos_embed",
        "s_embedder",
        "guidance_embedder",
        "x_embedder",
        "t_embedder",
        "y_embedder",
        "blocks",
        "final_layer",
    ]


def test_state_dict_round_trip_with_authors_names_is_strict_and_exact():
    src = perturb_(tiny_dit(), seed=3)
    prefixed = {f"model.{k}": v.clone() for k, v in src.state_dict().items()}  # the wrapper's keys
    dst = tiny_dit()
    dst.load_state_dict({k.removeprefix("model."): v for k, v in prefixed.items()}, strict=True)
    x = torch.randn(3, 2, 8, 8)
    args = (x, torch.rand(3), torch.rand(3), one_hot([1, 2, 3]).float(), torch.rand(3))
    assert torch.equal(src(*args), dst(*args))


# --- §12 items 3–5: initialisation --------------------------------------------------------------


def test_init_output_is_exactly_zero_and_blocks_are_identity():
    model = tiny_dit()
    x = torch.randn(4, 2, 8, 8)
    t, gap, beta = torch.rand(4), torch.rand(4), torch.rand(4)
    labels = one_hot([0, 1, 2, 3]).float()
    assert torch.equal(model(x, t, gap, labels, beta), torch.zeros_like(x))
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.s_embedder(gap) + model.guidance_embedder(beta) + model.y_embedder(labels)
    for block in model.blocks:
        assert torch.equal(block(h, c, "math"), h)


def test_init_statistics():
    torch.manual_seed(0)
    model = DiT("DiT-S/2", input_size=32, depth=2)  # D = 384 keeps the SVDs quick
    D = model.hidden_size
    zeroed = {"final_layer.linear", "final_layer.adaLN_modulation.1"} | {
        f"blocks.{i}.adaLN_modulation.1" for i in range(2)
    }
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.count_nonzero(module.bias) == 0, name
            if name in zeroed:
                assert torch.count_nonzero(module.weight) == 0, name
            elif "embedder" in name:
                assert abs(module.weight.std().item() - 0.02) < 0.002, name
            else:
                assert abs(torch.linalg.matrix_norm(module.weight, ord=2).item() - 1) < 1e-5, name
    conv = model.x_embedder.proj.weight.view(D, -1)
    assert abs(conv.std().item() - math.sqrt(2 / (16 + D))) < 0.004
    assert abs(torch.linalg.matrix_norm(conv, ord=2).item() - 1) > 0.2  # upstream keeps it unnormalised
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.001
    for block in model.blocks:
        assert torch.equal(block.attn.q_norm.weight, torch.ones(D // model.num_heads))
    assert count_parameters(model)[0] > 0


def test_paper_variant_flags_change_the_init():
    torch.manual_seed(0)
    model = DiT("DiT-S/2", input_size=8, depth=1, time_specinit=True, patch_spectral=True)
    for emb in (model.t_embedder, model.s_embedder, model.guidance_embedder):
        for i in (0, 2):
            assert abs(torch.linalg.matrix_norm(emb.mlp[i].weight, ord=2).item() - 1) < 1e-5
    conv = model.x_embedder.proj.weight.view(model.hidden_size, -1)
    assert abs(torch.linalg.matrix_norm(conv, ord=2).item() - 1) < 1e-5


def test_spectral_init_with_the_xl_shapes_is_a_spectral_norm_of_one():
    torch.manual_seed(0)
    layer = torch.nn.Linear(1152, 3456)
    from tvm.models.init import init_linear_

    init_linear_(layer, "spectral")
    assert abs(torch.linalg.matrix_norm(layer.weight, ord=2).item() - 1) < 1e-5
    with pytest.raises(ValueError, match="unknown init_type"):
        init_linear_(layer, "orthogonal")


# --- §12 items 6–9, 12: embeddings and layout ------------------------------------------------------


def test_pos_embed_halves_encode_column_then_row():
    D, G = 16, 4
    pos = sincos_pos_embed_2d(D, G)
    omega = 10000.0 ** (-np.arange(D // 4) / (D // 4))
    for i in range(G):
        for j in range(G):
            row = pos[i * G + j]
            np.testing.assert_allclose(row[: D // 2], np.concatenate([np.sin(j * omega), np.cos(j * omega)]))
            np.testing.assert_allclose(row[D // 2 :], np.concatenate([np.sin(i * omega), np.cos(i * omega)]))


def test_timestep_features_are_cos_first_float64_and_unscaled():
    tau = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float32)
    feats = timestep_features(tau)
    f = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    expected = np.concatenate([np.cos(0.37 * f), np.sin(0.37 * f)])
    np.testing.assert_allclose(feats[1].numpy(), expected.astype(np.float32), rtol=0, atol=1e-7)
    assert feats.dtype == torch.float32 and feats.shape == (3, 256)


def test_label_indices_map_zero_rows_to_the_null_class():
    labels = torch.tensor([[0.0, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert label_indices(labels).tolist() == [1, 3, 0]


def test_mod_norm_gives_unit_rms_chunks_and_maps_zero_to_zero():
    v = torch.randn(5, 6, 32, dtype=torch.float64) * 3
    rms = rms_normalize(v).pow(2).mean(-1).sqrt()
    ms = v.pow(2).mean(-1)
    torch.testing.assert_close(rms, 1 / torch.sqrt(1 + 1e-6 / ms))
    assert torch.equal(rms_normalize(torch.zeros(2, 8)), torch.zeros(2, 8))


def test_scaling_the_adaln_layers_leaves_the_output_unchanged():
    model = perturb_(tiny_dit().double(), scale=1.0)  # modulation chunks of mean square ≫ eps = 1e-6
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    args = (
        x,
        torch.rand(3, dtype=torch.float64),
        torch.rand(3, dtype=torch.float64),
        one_hot([4, 5, 6]),
        torch.rand(3, dtype=torch.float64),
    )
    before = model(*args, attn_backend="math")
    with torch.no_grad():
        for layer in [b.adaLN_modulation[1] for b in model.blocks] + [model.final_layer.adaLN_modulation[1]]:
            layer.weight.mul_(3.7)
            layer.bias.mul_(3.7)
    after = model(*args, attn_backend="math")
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


def test_unpatchify_inverts_the_patch_flattening():
    model = tiny_dit(input_size=8, in_channels=4)
    x = torch.randn(2, 4, 8, 8)
    p, G = 2, 4
    # Flatten patches with last-dim order (p_row, p_col, C), tokens row-major.
    tokens = x.reshape(2, 4, G, p, G, p).permute(0, 2, 4, 3, 5, 1).reshape(2, G * G, p * p * 4)
    assert torch.equal(model.unpatchify(tokens), x)


# --- §12 item 11: the first optimizer step moves only the final linear -----------------------------


def test_first_adam_step_changes_only_the_final_linear():
    from tvm.method.times import Guidance, TimeSampling, draw_step
    from tvm.method.wrapper import TVMWrapper
    import copy

    torch.manual_seed(0)
    net = TVMWrapper(tiny_dit(), data_type="fp32", do_scale_param=True)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0)
    draws = draw_step(torch.Generator().manual_seed(1), 8, (2, 8, 8), TimeSampling(), Guidance(cfg=2.0))
    out = net(torch.randn(8, 2, 8, 8), one_hot(range(8)).float(), draws, teacher)
    assert torch.count_nonzero(out["terminal"]) == 0  # terminal loss is exactly 0 at init
    out["loss"].mean().backward()
    for name, p in net.named_parameters():
        if p.grad is not None and name not in ("model.final_layer.linear.weight", "model.final_layer.linear.bias"):
            assert torch.count_nonzero(p.grad) == 0, name
    opt.step()
    for name, p in net.named_parameters():
        moved = (p.detach() - before[name]).abs()
        if name.startswith("model.final_layer.linear."):
            assert moved.max() <= 1e-4 * 1.001 and moved.min() >= 1e-4 * 0.99, name
        else:
            assert torch.count_nonzero(moved) == 0, name


# --- forward semantics and bad input ----------------------------------------------------------------


def test_broadcast_of_leading_one_times_and_labels():
    model = perturb_(tiny_dit())
    x = torch.randn(3, 2, 8, 8)
    lab = one_hot([2]).float()
    full = model(x, torch.full((3,), 0.3), torch.full((3,), 0.1), lab.expand(3, -1), torch.full((3,), 0.5))
    short = model(x, torch.tensor([0.3]), torch.tensor([0.1]), lab, torch.tensor([0.5]))
    torch.testing.assert_close(full, short)


def test_unconditional_model_and_null_labels():
    model = perturb_(tiny_dit(num_classes=0))
    x = torch.randn(2, 2, 8, 8)
    out = model(x, torch.rand(2), torch.rand(2))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert model.y_embedder.embedding_table.weight.shape[0] == 1
    cond = perturb_(tiny_dit())
    torch.testing.assert_close(
        cond(x, torch.tensor([0.5]), torch.tensor([0.0])),
        cond(x, torch.tensor([0.5]), torch.tensor([0.0]), torch.zeros(2, 10)),
    )


def test_attention_backends_agree():
    model = perturb_(tiny_dit()).double()
    args = (
        torch.randn(2, 2, 8, 8, dtype=torch.float64),
        torch.rand(2, dtype=torch.float64),
        torch.rand(2, dtype=torch.float64),
        one_hot([1, 7]),
        torch.rand(2, dtype=torch.float64),
    )
    torch.testing.assert_close(model(*args, attn_backend="math"), model(*args, attn_backend="sdpa"))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*math, sdpa, triton"):
        model(*args, attn_backend="flash")


@pytest.mark.parametrize(
    "x_shape, labels, match",
    [
        ((2, 3, 8, 8), one_hot([1, 2]).float(), r"x has shape \(2, 3, 8, 8\); expected \[B, 2, 8, 8\]"),
        ((2, 2, 8, 8), torch.zeros(2, 7), r"labels have shape \(2, 7\); expected \[B or 1, 10\]"),
        ((2, 2, 8, 8), torch.zeros(3, 10), "labels have 3 rows for a batch of 2"),
    ],
)
def test_bad_inputs_name_the_problem(x_shape, labels, match):
    model = tiny_dit()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(x_shape), torch.rand(2), torch.rand(2), labels)


def test_integer_input_and_bad_time_length_are_rejected():
    model = tiny_dit()
    with pytest.raises(ValueError, match="dtype torch.int64"):
        model(torch.zeros(2, 2, 8, 8, dtype=torch.long), torch.rand(2), torch.rand(2))
    with pytest.raises(ValueError, match="t has 3 entries; expected 1 or the batch size 2"):
        model(torch.randn(2, 2, 8, 8), torch.rand(3), torch.rand(2))


def test_forward_flops_counts_token_wise_layers_and_attention():
    # hidden 32, depth 2, patch 2, 8x8x2 input: T = 16 tokens; token-wise weights: patch conv 32·2·2·2,
    # final linear 8·32, per block qkv 96·32 + proj 32·32 + fc1 128·32 + fc2 32·128 = 12,288.
    model = tiny_dit()
    weights = 256 + 256 + 2 * 12_288
    assert model.forward_flops() == 2 * weights * 16 + 4 * 16 * 16 * 32 * 2
    with torch.device("meta"):
        xl = DiT("DiT-XL/2-18h", input_size=32, in_channels=4, num_classes=1000, init=False)
    assert xl.forward_flops() / 1e9 == pytest.approx(236.78, abs=0.01)  # "237 GFLOP" at 256 px (docs/benchmarks.md)


def test_compiled_blocks_have_eager_gradients():
    """Blocks compiled by Inductor (here its CPU backend) give the eager gradients, for the plain forward and the
    explicit-tangent forward. The tokens enter the blocks contiguous: with the patch embedding's transposed layout the
    first block got a graph of its own, and with torch 2.13's CPU Inductor the gradients through the two graphs did
    not match eager mode's (this test, without the contiguous tokens: 95% of the elements of a gradient mismatched)."""
    from tvm.method.wrapper import FlowMapInput

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 8, 8, generator=gen)
    t = 0.5 + 0.5 * torch.rand(4, generator=gen)
    inputs = FlowMapInput(x, t, t * torch.rand(4, generator=gen), one_hot([0, 1, 2, 3], 10), torch.full((4,), 0.4))
    grads = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(1)
        model = perturb_(tiny_dit(hidden=64, heads=4))
        if compiled:
            model.compile_blocks()
        out, dout = model.forward_with_tangent(inputs, -torch.ones_like(inputs.gap), attn_backend="math")
        (out.square().sum() + dout.square().sum() + model(*inputs, attn_backend="math").square().sum()).backward()
        grads[compiled] = [p.grad for p in model.parameters() if p.grad is not None]
    torch._dynamo.reset()
    assert len(grads[True]) == len(grads[False]) > 20
    for eager, compiled in zip(grads[False], grads[True]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())
