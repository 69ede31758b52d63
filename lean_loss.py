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
        # Every matmul runs in the compute dtype: autocast's when it is on (an in-place or explicit op inside an
        # autograd.Function is not autocast for us), else the hidden states' (bf16 under FSDP2, fp32 in fp32 runs).
        # The weight gradient is summed over chunks into an fp32 buffer, as the stock path's bf16 matmul output is
        # added into an fp32 .grad: at 7B an fp32 matmul here was a third of the output layer's FLOPs at fp32 speed.
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = weight.to(compute)
        acc = torch.promote_types(compute, torch.float32)  # fp32 logits and weight gradient (fp64 stays, for tests)
        # A frozen output layer (LoRA) needs no weight gradient: not its (vocab x hidden) fp32 buffer (2.2 GB at 7B)
        # nor its matmul.
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk].to(compute), targets[s:s + chunk]
            logp = torch.log_softmax((h @ w.T).to(acc), dim=-1)  # one fused pass; the logits die here
            loss -= logp.gather(1, t[:, None]).sum()
            if need_h or need_w:
                p = logp.exp_()  # softmax, in place: no second chunk-sized buffer
                p[torch.arange(len(t), device=t.device), t] -= 1
                p = p.to(compute)
                if need_h:
                    grad_h[s:s + chunk] = p @ w
                if need_w:
                    grad_w += p.T @ h
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w)) + (None, None)


def default_chunk(vocab):
    """Rows per chunk: about 256 MB of fp32 logits (64M of them)."""
    return max(64, (64 << 20) // vocab)


def chunked_linear_cross_entropy(hidden, weight, targets, chunk=None):
    """Summed cross-entropy of `hidden @ weight.T` against `targets` without ever holding all the logits.

    `chunk` rows at a time (default: `default_chunk`). Exact to the rounding of the compute dtype.
    """
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps every parameter in the graph (DDP needs that)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk or default_chunk(weight.shape[0]))


def buffer_bytes(vocab, hidden, weight_dtype, compute_dtype, trains_weight, chunk=None):
    """The most memory the loss holds at once besides the model's own tensors, for an output layer of (`vocab` x
    `hidden`) seen in `weight_dtype` (a sharded run's gathered weight: the compute dtype), computing in
    `compute_dtype`: a chunk's fp32 logits and their fp32 log-softmax, the weight's compute-dtype copy (when the
    dtypes differ) and, when the weight trains, its fp32 gradient plus that gradient cast back to `weight_dtype`
    (both alive at the end of the forward). At Qwen2-7B under FSDP2: 0.5 + 2.2 + 1.1 GB."""
    layer = vocab * hidden
    logits = 2 * 4 * (chunk or default_chunk(vocab)) * vocab
    copy = layer * compute_dtype.itemsize if weight_dtype != compute_dtype else 0
    gradient = layer * (4 + (weight_dtype.itemsize if weight_dtype != torch.float32 else 0)) if trains_weight else 0
    return logits + copy + gradient


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

    # `logits_to_keep` named (generate passes it only to a forward whose signature has it): a generation step then
    # computes the logits of the last position, not of every prompt position (8 prompts of 4k tokens: 5e9 logits)
    def forward(input_ids=None, attention_mask=None, position_ids=None, labels=None, num_items_in_batch=None,
                logits_to_keep=0, **kwargs):
        if labels is None:
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    logits_to_keep=logits_to_keep, **kwargs)
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **kwargs).last_hidden_state
        targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # position i predicts i+1
        keep = targets != IGNORE_INDEX
        loss = chunked_linear_cross_entropy(hidden[keep], full_weight(model.lm_head), targets[keep], chunk)
        denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        return CausalLMOutputWithPast(loss=loss / denominator)

    model.forward = forward
    return model
