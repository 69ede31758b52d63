"""lean_loss.py: the chunked, labelled-positions-only causal-LM loss equals the stock loss, values and gradients."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import demo
from collate import encode_sft_batch, sft_collator
from lean_loss import chunked_linear_cross_entropy, use_lean_causal_lm_loss


def test_chunked_cross_entropy_matches_torch():
    torch.manual_seed(0)
    h = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1000, 32, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 1000, (300,))
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    gh, gw = torch.autograd.grad(ref * 3, (h, w))
    out = chunked_linear_cross_entropy(h, w, t, chunk=64)  # 64 does not divide 300: a ragged last chunk
    ch, cw = torch.autograd.grad(out * 3, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ch, gh, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cw, gw, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # evaluation path: no gradient buffers
        torch.testing.assert_close(chunked_linear_cross_entropy(h, w, t, chunk=64), ref, rtol=1e-12, atol=1e-9)
    # a frozen output layer (LoRA): the hidden states' gradient only, the weight's is never computed
    frozen = w.detach()
    (fh,) = torch.autograd.grad(chunked_linear_cross_entropy(h, frozen, t, chunk=64) * 3, (h,))
    torch.testing.assert_close(fh, gh, rtol=1e-10, atol=1e-10)
    out = chunked_linear_cross_entropy(h.detach(), w, t, chunk=64)  # and the reverse
    torch.testing.assert_close(torch.autograd.grad(out * 3, (w,))[0], gw, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"num_items_in_batch": torch.tensor(1000)}])  # gradient accumulation
def test_lean_model_loss_and_grads_equal_stock(sft_demo, qwen2_tokenizer, padding_free, kwargs):
    stock = AutoModelForCausalLM.from_pretrained(sft_demo[0], dtype=torch.float32)
    lean = use_lean_causal_lm_loss(copy.deepcopy(stock), chunk=16)
    feats = [e for e, _ in encode_sft_batch(demo.make_sft_records(4, seed=2), qwen2_tokenizer, 512)]
    batch = sft_collator(qwen2_tokenizer, padding_free=padding_free)(feats)
    a = stock(**batch, use_cache=False, **kwargs).loss
    b = lean(**batch, use_cache=False, **kwargs).loss
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a, list(stock.parameters()))
    gb = torch.autograd.grad(b, list(lean.parameters()))
    for (name, _), x, y in zip(stock.named_parameters(), ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=name)
    # without labels the model is untouched: logits for generation
    ids = batch["input_ids"][:1, :8]
    torch.testing.assert_close(lean(ids).logits, stock(ids).logits)


def test_no_labelled_token_still_reaches_every_parameter():
    """A batch whose labels are all -100 gives a zero loss that keeps the weights in the graph (DDP waits for them)."""
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    loss = chunked_linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(w.grad, torch.zeros_like(w))


class MatmulDtypes(torch.overrides.TorchFunctionMode):
    """Records the dtypes of the operands of every matrix multiply run inside it."""

    NAMES = ("matmul", "mm", "addmm", "bmm", "baddbmm")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "").strip("_").rstrip("_")
        if name in self.NAMES:
            self.seen.append((name, tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("setting", ["autocast_fp32_masters", "bf16_weights"])
def test_every_matmul_runs_in_the_compute_dtype(setting):
    """Under bf16 autocast with fp32 master weights (DDP) and with bf16 weights and hidden states (what FSDP2 gathers),
    the three matmuls of each chunk (logits, hidden gradient, weight gradient) run in bf16, the weight gradient is
    summed in fp32 and comes back in the weight's dtype, and the result is as close to the fp32 one as the stock
    bf16 path's (logits under autocast, torch's cross-entropy)."""
    torch.manual_seed(0)
    h32 = torch.randn(300, 32, dtype=torch.float32, requires_grad=True)
    w32 = torch.randn(1000, 32, dtype=torch.float32, requires_grad=True)
    t = torch.randint(0, 1000, (300,))
    ref = chunked_linear_cross_entropy(h32, w32, t, chunk=64)
    ref_grads = torch.autograd.grad(ref, (h32, w32))
    dtype = torch.float32 if setting == "autocast_fp32_masters" else torch.bfloat16
    h = h32.detach().to(dtype).requires_grad_()
    w = w32.detach().to(dtype).requires_grad_()
    mode = MatmulDtypes()
    with mode, torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_linear_cross_entropy(h, w, t, chunk=64)
    grads = torch.autograd.grad(out, (h, w))
    assert len(mode.seen) == 3 * 5  # 5 chunks of 64 rows
    assert {dtypes for _, dtypes in mode.seen} == {("torch.bfloat16", "torch.bfloat16")}, mode.seen
    assert [g.dtype for g in grads] == [h.dtype, w.dtype]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = torch.nn.functional.cross_entropy((h @ w.T).float(), t, reduction="sum")
    stock_grads = torch.autograd.grad(stock, (h, w))

    def error(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert error(out, ref) <= 1e-3
    for ours, theirs, exact in zip(grads, stock_grads, ref_grads):
        assert error(ours, exact) <= 1.5 * error(theirs, exact) + 1e-4, (error(ours, exact), error(theirs, exact))


def test_generation_computes_the_logits_of_the_last_position_only(sft_demo):
    """generate passes `logits_to_keep=1` only to a forward that names it: the lean forward does, so a prompt's
    prefill computes one position's logits, not every prompt position's (at 7B: batch x prompt x 152k)."""
    lean = use_lean_causal_lm_loss(AutoModelForCausalLM.from_pretrained(sft_demo[0], dtype=torch.float32))
    shapes = []
    lean.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    ids = torch.arange(5, 17).reshape(2, 6)
    lean.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert shapes == [(2, 1, lean.config.vocab_size)] * 3
