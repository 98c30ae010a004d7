"""The training path computes the plain LoRA formulation exactly.

peftlite's layers train through custom autograd Functions (functional.LoraLinearFunction) and
in-place adds. These tests hold loss and every trainable gradient to
    h = base(x) + B(A(dropout(x))) · s
written out here with plain torch ops (`PlainLora`), with the same dropout mask for the same seed,
and to the real `peft` with dropout 0; each Function also passes `gradcheck` in float64. Linear
layers take one of two routes (ΔW folded into W or not, by `folding_pays`); the model-level tests
run each case both ways.

    .venv/bin/pytest -q tests/test_training_exact.py
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from tiny_models import LLAMA_TARGETS, ConvNet, copy_lora_to_peft, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from torch import nn

from peftlite import LoraConfig, fast, get_lora_model
from peftlite.fast import linear as fast_linear
from peftlite.fast import masks
from peftlite.layers import AdapterState, Conv2d, Embedding, Linear, LoraAdapter, LoraLayer, MergedLinear
from peftlite.variants.lora import PLAIN_LORA

TOL = 1e-5
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


# ---- the reference: the plain formulation, written out ----------------------------------------

class PlainLora(nn.Module):
    """Stands in for a LoRA layer: same base and parameters (so the same names), plain torch ops only."""

    def __init__(self, layer: LoraLayer) -> None:
        super().__init__()
        self.base_layer = layer.base_layer
        for name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            setattr(self, name, getattr(layer, name))
        self.layer = [layer]  # kept out of the module tree: only its kind and shapes are read
        self.train(layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer[0]
        (A, B), s = layer.factors("default"), layer.scaling["default"]
        dropout = layer.lora_dropout["default"]
        p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
        base = self.base_layer(x)
        if isinstance(layer, Embedding):  # PEFT applies no dropout to embeddings
            return base + F.embedding(x, A.T, padding_idx=self.base_layer.padding_idx) @ B.T * s
        if p > 0 and layer.state.fast:  # the fused path draws its masks from peftlite.fast.masks
            dropped = x * masks.draw_dropout_mask(x, p) / (1 - p)
        else:  # the reference path is torch's own dropout
            dropped = F.dropout(x, p, training=p > 0)
        if isinstance(layer, Conv2d):
            conv = self.base_layer
            after_A = F.conv2d(dropped, A, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
            return base + F.conv2d(after_A, B) * s
        if isinstance(layer, MergedLinear):  # each enabled slice k: B_k(A_k(x)) into its own columns
            r, parts = layer.r["default"], []
            width = layer.out_features // len(layer.enable_lora)
            k = 0
            for on in layer.enable_lora:
                if on:
                    A_k, B_k = A[k * r:(k + 1) * r], B[k * width:(k + 1) * width]
                    parts.append(F.linear(F.linear(dropped, A_k), B_k) * s)
                    k += 1
                else:
                    parts.append(torch.zeros(*x.shape[:-1], width))
            return base + torch.cat(parts, dim=-1)
        return base + F.linear(F.linear(dropped, A), B) * s


def plain_copy(lite) -> nn.Module:
    """A deep copy of a peftlite model's base model with every LoRA layer replaced by PlainLora."""
    model = copy.deepcopy(lite.get_base_model())
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, PlainLora(module))
    return model


def loss_and_grads(model: nn.Module, loss_fn, seed: int = 7) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(model)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(a: tuple, b: tuple) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=TOL)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert grads_a[name] is not None, name
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=TOL, msg=name)


# ---- the cases: every layer kind, with and without dropout and modules_to_save ---------------

def lm_loss(model):
    ids = token_batch(batch=3, length=12)
    return model(input_ids=ids, labels=ids).loss


def cls_loss(model):
    return model(input_ids=token_batch(batch=3, length=12), labels=torch.tensor([0, 2, 1])).loss


def convnet_loss(model):
    image = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 16, (3, 5), generator=torch.Generator().manual_seed(2))
    return model(image, ids).square().mean()


CASES = {  # name: (model factory, loss, config kwargs)
    "Linear": (tiny_llama, lm_loss, dict(target_modules=LLAMA_TARGETS)),
    "Conv1D": (tiny_gpt2, lm_loss, dict(target_modules=GPT2_TARGETS)),
    "MergedLinear": (tiny_gpt2, lm_loss, dict(target_modules=["c_attn"], enable_lora=[True, False, True])),
    "Embedding+Conv2d": (ConvNet, convnet_loss, dict(target_modules=["emb", "conv"])),
    "modules_to_save": (ConvNet, convnet_loss, dict(target_modules=["emb", "conv"], modules_to_save=["head"])),
    "seq-cls": (tiny_bert, cls_loss, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
}


def make_lite(case: str, dropout: float):
    factory, loss_fn, kwargs = CASES[case]
    base = factory()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, **kwargs)
    return base, get_lora_model(copy.deepcopy(base), config).train(), loss_fn, kwargs


@pytest.fixture(params=["folded", "unfolded"])
def route(request, monkeypatch):
    """Every Linear takes the one route: ΔW folded into W, or the six low-rank products.

    Dropout never folds; the unfolded route also cuts the masked products into blocks of a few
    rows (one block holds these tiny batches otherwise), so both ways of running them are held
    to the reference.
    """
    monkeypatch.setattr(fast_linear, "folding_pays", lambda *sizes: request.param == "folded")
    if request.param == "unfolded":
        monkeypatch.setattr(fast_linear, "MASKED_BLOCK_BYTES", 200)
    return request.param


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_grads_equal_the_plain_formulation(case, dropout, route):
    _, lite, loss_fn, _ = make_lite(case, dropout)
    assert_same(loss_and_grads(lite.get_base_model(), loss_fn), loss_and_grads(plain_copy(lite).train(), loss_fn))


@pytest.mark.parametrize("case", [c for c in CASES if c != "MergedLinear"])  # PEFT has no enable_lora
def test_loss_and_grads_equal_peft(case, route):
    base, lite, loss_fn, kwargs = make_lite(case, 0.0)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **kwargs)).train()
    copy_lora_to_peft(lite, reference)
    loss, grads = loss_and_grads(lite.get_base_model(), loss_fn)
    peft_loss, peft_grads = loss_and_grads(reference.base_model.model, loss_fn)
    torch.testing.assert_close(loss, peft_loss, rtol=0, atol=TOL)
    for path, layer in lite.lora_layers():
        peft_layer = reference.base_model.model.get_submodule(path)
        pairs = ((peft_layer.lora_embedding_A["default"], peft_layer.lora_embedding_B["default"])
                 if isinstance(layer, Embedding)
                 else (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight))
        for mine, theirs in zip((layer.factors("default")[0], layer.factors("default")[1]), pairs):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=TOL, msg=path)
    saved = {n: g for n, g in grads.items() if "modules_to_save" in n}
    assert bool(saved) == ("modules_to_save" in kwargs or "task_type" in kwargs)
    for name, grad in saved.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=0, atol=TOL, msg=name)


def test_merged_linear_grads_equal_loralib():
    import loralib
    torch.manual_seed(0)
    base = nn.Linear(6, 9)
    reference = loralib.MergedLinear(6, 9, r=2, lora_alpha=4, enable_lora=[True, False, True], merge_weights=False)
    reference.weight.data.copy_(base.weight)
    reference.bias.data.copy_(base.bias)
    wrapper = nn.Sequential(base)
    lite = get_lora_model(wrapper, LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                              enable_lora=[True, False, True], init_lora_weights=False))
    layer = lite.get_base_model()[0]
    reference.lora_A.data.copy_(layer.factors("default")[0])
    reference.lora_B.data.copy_(layer.factors("default")[1])
    x = torch.randn(4, 3, 6)
    lite(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(layer.factors("default")[0].grad, reference.lora_A.grad, rtol=0, atol=TOL)
    torch.testing.assert_close(layer.factors("default")[1].grad, reference.lora_B.grad, rtol=0, atol=TOL)


# ---- the Functions themselves ---------------------------------------------------------------

@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("slices", [None, ((0, 3), (6, 3))])
@pytest.mark.parametrize("dropout, fold, block_rows", [(0.0, False, None), (0.0, True, None), (0.3, False, None),
                                                      (0.3, False, 3)])
def test_lora_linear_function_gradcheck(fan_in_fan_out, slices, dropout, fold, block_rows, monkeypatch):
    if block_rows:  # the masked products in blocks of 3, 3 and 2 of the 8 rows
        monkeypatch.setattr(fast_linear, "MASKED_BLOCK_BYTES", block_rows * 5 * 8)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    out, groups = 9, (1 if slices is None else 2)
    x = rand(2, 4, 5)
    weight = rand(5, out) if fan_in_fan_out else rand(out, 5)
    A, B = rand(2 * groups, 5), rand(out if slices is None else 6, 2)

    def f(x, weight, bias, A, B):
        torch.manual_seed(5)  # the same dropout mask on every call gradcheck makes
        return fast.lora_linear(x, weight, bias, A, B, 0.7, fan_in_fan_out, slices, dropout, fold)

    assert torch.autograd.gradcheck(f, (x, weight, rand(out), A, B))
    assert torch.autograd.gradcheck(f, (x, weight.detach(), None, A, B))  # frozen base, no bias
    assert torch.autograd.gradcheck(f, (x, weight.detach(), None, A.detach(), B))  # and A frozen: x not saved


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("stride, padding, dilation", [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 2), (1, 2))])
def test_lora_conv2d_function_gradcheck(dropout, stride, padding, dilation):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    x, weight, A, B = rand(2, 3, 6, 5), rand(4, 3, 3, 3), rand(2, 3, 3, 3), rand(4, 2, 1, 1)

    def f(x, weight, bias, A, B):
        torch.manual_seed(5)
        return fast.lora_conv2d(x, weight, bias, A, B, 0.7, stride, padding, dilation, dropout)

    assert torch.autograd.gradcheck(f, (x, weight, rand(4), A, B))
    assert torch.autograd.gradcheck(f, (x, weight.detach(), None, A, B))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("device_path", [False, True], ids=["cpu-sfc64", "torch-generator"])
def test_dropout_mask_keeps_each_element_with_probability_1_minus_p(p, device_path):
    """Both ways of drawing: numpy's SFC64 on CPU, and the device generator (run here on CPU)."""
    draw = masks.mask_from_device_generator if device_path else masks.draw_dropout_mask
    x = torch.empty(401, 1001)  # a count that is not a multiple of 4: the last 64-bit draw is used in part
    torch.manual_seed(3)
    mask = draw(x, p)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    n = mask.numel()
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # 5 standard errors
    for axis in (0, 1):  # no row or column is favoured: each one's keep rate is near 1 - p
        rates = mask.float().mean(axis)
        assert (rates - (1 - p)).abs().max() < 6 * (p * (1 - p) / mask.shape[axis]) ** 0.5
    torch.manual_seed(3)
    assert torch.equal(draw(x, p), mask)  # the seed fixes the mask
    assert not torch.equal(draw(x, p), mask)  # and the next draw is a new one
    torch.testing.assert_close(masks.apply_dropout_mask(x.normal_(), mask, p), x * mask / (1 - p))


@pytest.mark.parametrize("block_rows", [1, 3, 7, 401])
def test_mask_drawn_in_blocks_of_rows_is_the_whole_mask(block_rows):
    """The Function draws its mask a block of rows at a time; the bits must not depend on the blocks
    (1001 columns: blocks end inside a 64-bit draw, whose rest starts the next block)."""
    x = torch.empty(401, 1001)
    torch.manual_seed(4)
    whole = masks.draw_dropout_mask(x, 0.3)
    torch.manual_seed(4)
    blocks = [slice(start, min(start + block_rows, 401)) for start in range(0, 401, block_rows)]
    pieces = [keep.clone() for keep in masks.keep_mask_blocks(x, 0.3, blocks)]
    assert [piece.shape[0] for piece in pieces] == [rows.stop - rows.start for rows in blocks]
    assert torch.equal(torch.cat(pieces), whole)


@pytest.mark.parametrize("dropout, fold", [(0.0, True), (0.0, False), (0.3, False)])
def test_function_takes_an_empty_batch(dropout, fold):
    x = torch.randn(0, 3, 8, requires_grad=True)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    out = fast.lora_linear(x, torch.randn(6, 8), torch.randn(6), A, B, 0.5, dropout=dropout, fold=fold)
    assert out.shape == (0, 3, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape and not A.grad.any() and not B.grad.any()


def test_folded_and_unfolded_routes_choose_by_cost_and_agree():
    assert fast_linear.folding_pays(8192, 512, 1376) and not fast_linear.folding_pays(2048, 512, 1376)
    assert fast_linear.folding_pays(4097, 512, 512) and not fast_linear.folding_pays(4096, 512, 512)
    x, weight, bias = torch.randn(3, 40, 8), torch.randn(6, 8), torch.randn(6)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    results = []
    for fold in (True, False):
        out = fast.lora_linear(x, weight, bias, A, B, 0.5, fold=fold)
        out.square().sum().backward()
        results.append((out, A.grad, B.grad))
        A.grad = B.grad = None
    expected = F.linear(x, weight, bias) + x @ A.T @ B.T * 0.5
    for out, _, _ in results:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=TOL)
    torch.testing.assert_close(results[0][1:], results[1][1:], rtol=1e-5, atol=1e-4)


def test_function_saves_shared_input_once():
    """q, k and v receive one tensor: the graph holds one copy of it, and the mask as bits."""
    x = torch.randn(4, 16, requires_grad=True)
    weight, A = torch.randn(8, 16), torch.randn(2, 16, requires_grad=True)
    outs = [fast.lora_linear(x, weight, None, A, torch.randn(8, 2, requires_grad=True), 1.0, dropout=0.5)
            for _ in range(3)]
    for out in outs:
        saved = [t for t in out.grad_fn.saved_tensors if t is not None]
        assert any(t.data_ptr() == x.data_ptr() for t in saved)
        assert not any(t.shape == x.shape and t.dtype == x.dtype and t.data_ptr() != x.data_ptr() for t in saved)
        assert any(t.dtype == torch.uint8 and t.shape == (4, 2) for t in saved)  # 16 bits a row in 2 bytes


# ---- it keeps working: checkpointing, no_grad, merged, half precision ------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_grads(dropout):
    _, lite, loss_fn, _ = make_lite("Linear", dropout)
    expected = loss_and_grads(lite.get_base_model(), loss_fn)
    lite.gradient_checkpointing_enable()
    assert lite.base_model.is_gradient_checkpointing
    assert_same(loss_and_grads(lite.get_base_model(), loss_fn), expected)


@pytest.mark.parametrize("case", ["Linear", "Conv1D", "MergedLinear", "Embedding+Conv2d"])
def test_no_grad_inference_and_merged_weights_give_the_training_output(case, route):
    factory, loss_fn, _ = CASES[case]
    _, lite, _, _ = make_lite(case, 0.1)
    lite.eval()
    with torch.no_grad():
        torch.manual_seed(7)
        plain = loss_fn(plain_copy(lite).eval())
        torch.manual_seed(7)
        inferred = loss_fn(lite.get_base_model())
        lite.merge_adapter()
        torch.manual_seed(7)
        merged = loss_fn(lite.get_base_model())
    torch.testing.assert_close(inferred, plain, rtol=0, atol=TOL)
    torch.testing.assert_close(merged, plain, rtol=1e-4, atol=TOL)


def test_half_precision_never_folds_a_small_update_into_the_weight():
    """In bf16, W + ΔW would drop a ΔW below half a unit of W; the low-rank products keep it."""
    signs = torch.tensor([1.0, -1.0] * 4, dtype=torch.bfloat16)
    weight = torch.ones(8, 8, dtype=torch.bfloat16)  # a unit of 1.0 in bf16 is 2⁻⁷
    A, B = (0.05 * signs).view(1, 8), torch.full((8, 1), 0.05, dtype=torch.bfloat16)  # ΔW = ±0.0025 < 2⁻⁸
    x = signs.expand(4, 64, 8)  # 256 rows, so folding_pays; x Wᵀ = 0 exactly, the update adds 8 · 0.0025
    assert fast_linear.folding_pays(256, 8, 8)
    with torch.no_grad():
        out = fast.lora_linear(x, weight, None, A, B, 1.0)
    torch.testing.assert_close(out, torch.full_like(out, 0.02), rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_trains_through_the_fused_path(dtype):
    _, lite, loss_fn, _ = make_lite("Linear", 0.1)
    lite.to(dtype)
    loss, grads = loss_and_grads(lite.get_base_model(), loss_fn)
    plain_loss, plain_grads = loss_and_grads(plain_copy(lite).train(), loss_fn)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, plain_loss, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), plain_grads[name].float(), rtol=5e-2, atol=5e-2, msg=name)


def test_half_precision_base_with_fp32_adapters_casts():
    """Adapters kept in fp32 on a bf16 base (a common recipe): the plain path casts, output stays bf16."""
    _, lite, loss_fn, _ = make_lite("Linear", 0.0)
    lite.base_model.to(torch.bfloat16)
    for _, layer in lite.lora_layers():
        layer.lora_A.float()
        layer.lora_B.float()
    loss, grads = loss_and_grads(lite.get_base_model(), loss_fn)
    assert torch.isfinite(loss)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    with torch.no_grad():
        out = lite.get_base_model()(input_ids=token_batch()).logits
    assert out.dtype == torch.bfloat16


def test_dropout_compiles_into_one_graph():
    """Under torch.compile the mask comes from torch's generator: no graph break, training works."""
    layer = Linear(nn.Linear(16, 8), AdapterState())
    layer.add_adapter("default", LoraAdapter(4, 8.0, 2.0, PLAIN_LORA), 0.5, False)
    layer.state.active = ("default",)
    layer.train()
    x = torch.randn(6, 16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # a graph break would raise
    out = compiled(x)
    out.square().sum().backward()
    lora_A, lora_B = layer.factors("default")
    without_dropout = layer.base_layer(x) + x @ lora_A.T @ lora_B.T * 2.0
    assert not torch.allclose(out, without_dropout)  # dropout did drop
    assert torch.isfinite(lora_A.grad).all() and lora_A.grad.abs().sum() > 0


@pytest.mark.parametrize("fast_on", [True, False])
def test_the_switch_decides_between_the_fused_node_and_the_reference_forward(fast_on):
    """One switch per model: on, a Linear's output comes from the fused Function; off, from the textbook ops."""
    lite = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).train()
    lite.use_fast_path(fast_on)
    layer = lite.get_base_model().model.layers[0].self_attn.q_proj
    out = layer(torch.randn(2, 5, layer.in_features))
    assert ("LoraLinearFunction" in type(out.grad_fn).__name__) == fast_on
    lite.use_fast_path(not fast_on)
    lite.eval()
    x = torch.randn(2, 5, layer.in_features)
    other = layer(x)
    lite.use_fast_path(fast_on)
    torch.testing.assert_close(layer(x), other, rtol=1e-5, atol=TOL)  # the two paths agree without dropout
