"""The memory-lean causal-LM loss: logits only at labelled tokens, a chunk at a time, and the model hook using it.

Qwen2's 152k vocabulary makes the (tokens x vocab) fp32 logits the largest tensor of a step (10 GB at 4 x 4096
tokens), and the stock loss keeps several of them. `use_lean_causal_lm_loss(model)` makes `model(..., labels=...)`
compute the same loss without ever holding them.
"""

import torch

from collate import IGNORE_INDEX


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), computed `chunk` rows at a time.

    Each chunk's logits live only inside the loop, in fp32
    for an exact log-softmax, and the gradients are computed in the same pass (softmax - one_hot is known once the
    logits are), so backward only scales them: the head costs the same three matmuls as the stock path.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        w = weight.to(hidden.dtype)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits (fp64 stays fp64, for tests)
        # A frozen output layer (LoRA) needs no weight gradient: not its (vocab x hidden) fp32 buffer (2.2 GB at 7B)
        # nor its matmul.
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            logp = torch.log_softmax((h @ w.T).to(acc), dim=-1)  # one fused pass; the logits die here
            loss -= logp.gather(1, t[:, None]).sum()
            if need_h or need_w:
                p = logp.exp_()  # softmax, in place: no second chunk-sized buffer
                p[torch.arange(len(t), device=t.device), t] -= 1
                p = p.to(hidden.dtype)
                if need_h:
                    grad_h[s:s + chunk] = p @ w
                if need_w:
                    grad_w.addmm_(p.T.to(acc), h.to(acc))
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w)) + (None, None)


def chunked_linear_cross_entropy(hidden, weight, targets, chunk=None):
    """Summed cross-entropy of `hidden @ weight.T` against `targets` without ever holding all the logits.

    `chunk` rows at a time (default: about 256 MB of fp32 logits per chunk). Exact to fp32 rounding.
    """
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps every parameter in the graph (DDP needs that)
    chunk = chunk or max(64, (64 << 20) // weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)


def full_weight(module):
    """`module.weight`, whole, although `module`'s own forward does not run.

    Sharded training gathers a layer's weight in hooks around that layer's forward; the lean loss reads the output
    layer's weight directly, so it gathers it itself. FSDP2 (`fully_shard`): `unshard()` (a no-op when the layer's
    group is already gathered, as in accelerate's layout, where it shares a group with the final norm); its
    gradient is reduce-scattered at the end of backward like any other. DeepSpeed ZeRO-3: the weight is registered
    as an external parameter of the model (`use_lean_causal_lm_loss`), so the model's own forward gathers it.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.unshard()
    return module.weight


def use_lean_causal_lm_loss(model, chunk=None):
    """Make `model(..., labels=...)` compute the loss from the hidden states of labelled positions only, in chunks.

    Prompt and padding positions have label -100: their logits would be computed and thrown away, and they are
    most of a chat batch. Without labels (generation, inference) the model's own forward runs unchanged. The loss
    follows transformers' contract: summed over labelled tokens, divided by `num_items_in_batch` when the Trainer
    passes it (gradient accumulation, token averaging across devices), else by this batch's labelled tokens.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original_forward = model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, labels=None, num_items_in_batch=None,
                **kwargs):
        if labels is None:
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    **kwargs)
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **kwargs).last_hidden_state
        targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # position i predicts i+1
        keep = targets != IGNORE_INDEX
        loss = chunked_linear_cross_entropy(hidden[keep], full_weight(model.lm_head), targets[keep], chunk)
        denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        return CausalLMOutputWithPast(loss=loss / denominator)

    model.forward = forward
    return model
