"""policy_loss_from_hidden with its gradients formed in the forward pass (README "From hidden states").

The loss is known in the forward pass, so is its gradient w.r.t. each token's log-prob: each chunk's logits, still in
their buffer, are turned into their gradient there and multiplied out (grad_hidden, and grad_weight for a
float32 / float64 head), instead of being recomputed in the backward pass. A chunk's per-token gradient is the
policy_loss op's own on the chunk (its `token_grad`: the un-normalised sum's, which needs nothing of the other
chunks where the loss reads no row statistic), scaled by the whole batch's 1 / denominator once that is known. The
backward pass then multiplies the gradients by the upstream gradient, in place. GEMMs: 2 a step (3 with a float32 /
float64 head's gradient, 4 with a 16-bit head's, whose gradient is still one GEMM per block of columns over all
tokens, rounded once), against 3 / 4 / 5 when the backward recomputes the logits.
"""

from typing import List, Optional, Tuple

import torch

from ppo_ext.functional import _loss_of_log_probs, _policy_loss_op

Chunk = Tuple[int, int, int, int]  # rows [b0, b1) and columns [t0, t1) of the (B, T) tokens


def default_chunk_tokens(vocab: int, dtype: torch.dtype) -> int:
    """The tokens a chunk holds by default (chunk_tokens=None) for this vocabulary size and dtype."""
    return torch.ops.ppo_ext.hidden_default_chunk_tokens(vocab, dtype.itemsize)


def chunk_ranges(B: int, T: int, chunk: int, whole_rows: bool) -> Optional[List[Chunk]]:
    """The (B, T) tokens in chunks of at most `chunk` tokens, each a rectangle (b0, b1, t0, t1), that is a range of
    the flat tokens: as many whole rows as fit (at least one), or, for rows longer than `chunk`, near-equal pieces
    of one row. None where rows are longer than `chunk` and whole_rows are needed."""
    if T <= chunk:
        rows = chunk // T
        return [(b, min(B, b + rows), 0, T) for b in range(0, B, rows)]
    if whole_rows:
        return None
    pieces = -(-T // chunk)
    width = -(-T // pieces)
    return [(b, b + 1, t0, min(T, t0 + width)) for b in range(B) for t0 in range(0, T, width)]


def _row_statistic(o) -> Optional[str]:
    """What makes a token's gradient read its whole row (the policy_loss kernels' row pre-pass), or None."""
    if o["importance_sampling"] != "token":
        return f'importance_sampling="{o["importance_sampling"]}"'
    if o["loss_type"] in ("geo_mean", "vespo"):
        return f'loss_type="{o["loss_type"]}"'
    if o["rollout_is"] in ("seq", "seq-mean"):
        return f'rollout_is="{o["rollout_is"]}"'
    return None  # (seq-mean-token-mean's 1 / the row's valid tokens is applied per token: _GradInForward)


def plan(hidden, weight, bias, labels, loss_inputs, chunk_tokens, o) -> Tuple[Optional[List[Chunk]], int, str]:
    """(chunks, chunk, "") where the gradients can be formed in the forward pass, else (None, chunk, why not)."""
    if torch.compiler.is_compiling():
        return None, 0, "under torch.compile, which traces the generic path"
    chunk = int(chunk_tokens or default_chunk_tokens(weight.shape[0], weight.dtype))
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        return None, chunk, "no gradient is asked for"
    if labels.dim() != 2 or not labels.numel():
        return None, chunk, "labels must be a non-empty (B, T) tensor"
    B, T = labels.shape
    old, adv, mask = loss_inputs
    per_token = (old, mask, o["token_weights"], o["rollout_log_probs"], o["ref_log_probs"])
    if any(t is not None and t.shape != labels.shape for t in per_token) or adv.shape not in ((B, T), (B, 1), (B,)):
        return None, chunk, "the loss's inputs must have the labels' shape (B, T) (advantages: or (B, 1), (B,))"
    row_statistic = _row_statistic(o)
    chunks = chunk_ranges(B, T, min(chunk, B * T), row_statistic is not None)
    if chunks is None:
        return None, chunk, (f"with {row_statistic} a token's gradient reads its whole row, and a row ({T} tokens) is "
                             f"longer than a chunk ({chunk}): pass chunk_tokens >= {T}")
    return chunks, chunk, ""


def _part(t: Optional[torch.Tensor], c: Chunk) -> Optional[torch.Tensor]:
    """The chunk's part of a (B, T), (B, 1) or (B,) input of the loss."""
    b0, b1, t0, t1 = c
    if t is None:
        return None
    return t[b0:b1] if t.dim() == 1 or t.shape[1] == 1 else t[b0:b1, t0:t1]


def _rows(hidden: torch.Tensor, T: int, c: Chunk) -> torch.Tensor:
    """The chunk's hidden states as a (tokens, H) matrix: a view where the strides allow one, else a copy of these
    rows alone."""
    b0, b1, t0, t1 = c
    if hidden.dim() == 3:
        return hidden[b0:b1, t0:t1].reshape(-1, hidden.shape[-1])
    return hidden[b0 * T + t0:(b1 - 1) * T + t1]


def _chunk_pass(hidden, weight, bias, labels, temperature, chunks, loss_args, need_entropy, per_token, grads):
    """Chunk by chunk: the logits into one reused buffer, their log-probs (logsumexp, entropy), the loss's per-token
    gradient (un-normalised), the logits turned into their gradient in place and multiplied out into grad_hidden
    (and grad_weight, grad_bias where given). per_token: the (N,) outputs, the entropy's gradient (or None) and the
    tokens' aggregation weights (or None: 1)."""
    old, adv, mask, o = loss_args
    log_probs, logsumexp, entropy, token_grad, grad_entropy, agg_weights = per_token
    grad_hidden, grad_weight, grad_bias = grads
    T = labels.shape[1]
    flat_labels = labels.reshape(-1)
    # the normalisers are not in token_grad; a row's 1 / valid tokens (seq-mean-token-mean) is agg_weights'
    chunk_options = {**o, "num_tokens": None, "num_seqs": None, "loss_scale_factor": None}
    if agg_weights is not None:
        chunk_options["loss_agg_mode"] = "token-mean"
    buffer = hidden.new_empty(max((b1 - b0) * (t1 - t0) for b0, b1, t0, t1 in chunks), weight.shape[0])
    for c in chunks:
        b0, b1, t0, t1 = c
        start, n = b0 * T + t0, (b1 - b0) * (t1 - t0)
        tokens = slice(start, start + n)
        rows = _rows(hidden, T, c)
        logits = buffer[:n]
        if bias is None:
            torch.mm(rows, weight.T, out=logits)
        else:
            torch.addmm(bias, rows, weight.T, out=logits)
        lp, lse, h = torch.ops.ppo_ext.token_log_probs(logits, flat_labels[tokens], temperature, need_entropy, False)
        log_probs[tokens], logsumexp[tokens] = lp, lse
        if need_entropy:
            entropy[tokens] = h
        token_grad[tokens] = _policy_loss_op(
            lp.view(b1 - b0, t1 - t0), _part(old, c), _part(adv, c), _part(mask, c), True,
            {**chunk_options, **{k: _part(o[k], c) for k in ("token_weights", "rollout_log_probs", "ref_log_probs")}},
        )[3].view(-1)
        if agg_weights is not None:
            token_grad[tokens] *= agg_weights[tokens]
        with_entropy = grad_entropy is not None
        torch.ops.ppo_ext.token_log_probs_backward_inplace(
            token_grad[tokens], logits, flat_labels[tokens], lse, temperature,
            grad_entropy[tokens] if with_entropy else None, h if with_entropy else None)
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[tokens])
        if grad_weight is not None:
            grad_weight.addmm_(logits.T, rows)
        if grad_bias is not None:
            grad_bias += logits.sum(0, dtype=grad_bias.dtype)


class _GradInForward(torch.autograd.Function):
    """The loss (and with return_entropy the entropy) of hidden, weight and bias; the loss's gradients computed in
    forward, handed over (scaled by the upstream gradient, in place) by backward, once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunks, chunk, entropy_coef, return_entropy,
                loss_args, result):
        old, adv, mask, o = loss_args
        B, T = labels.shape
        N, V = B * T, weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        # float32 / float64 heads sum grad_weight chunk after chunk; 16-bit heads take it from one GEMM per block
        # of columns over all tokens, after this pass (hidden_log_probs_backward: rounded once).
        sum_head = weight.dtype == acc
        need_entropy = return_entropy or entropy_coef != 0
        like = dict(dtype=acc, device=hidden.device)
        log_probs, logsumexp, token_grad = (torch.empty(N, **like) for _ in range(3))
        entropy = torch.empty(N, **like) if need_entropy else None
        # The aggregation's weight of each token before the 1 / denominator (docs/SPEC.md "Aggregation"): 1 where
        # valid, over the row's valid tokens for seq-mean-token-mean (there: agg_weights); the entropy bonus's
        # gradient is -coef times it, as _aggregate_like_the_loss aggregates the entropy.
        agg_weights = grad_entropy = None
        if entropy_coef != 0 or o["loss_agg_mode"] == "seq-mean-token-mean":
            weights = torch.ones(B, T, **like) if mask is None else (mask != 0).to(acc)
            if o["loss_agg_mode"] == "seq-mean-token-mean":
                weights = weights / weights.sum(1, keepdim=True).clamp(min=1)
                agg_weights = weights.reshape(-1)
            if entropy_coef != 0:
                grad_entropy = (weights * -entropy_coef).reshape(-1)
        grad_hidden = hidden.new_empty(N, hidden.shape[-1]) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) \
            if want_weight and sum_head else None
        grad_bias = torch.zeros(V, **like) if want_bias and sum_head else None
        _chunk_pass(hidden, weight, bias, labels, temperature, chunks, (old, adv, mask, o), need_entropy,
                    (log_probs, logsumexp, entropy, token_grad, grad_entropy, agg_weights),
                    (grad_hidden, grad_weight, grad_bias))
        out, grad_scale = _loss_of_log_probs(log_probs.view(B, T), None if entropy is None else entropy.view(B, T),
                                             old, adv, mask, return_entropy, entropy_coef, o)
        op_labels = labels if hidden.dim() == 3 else labels.reshape(-1)  # the hidden_log_probs ops' labels
        if (want_weight or want_bias) and not sum_head:
            with_entropy = grad_entropy is not None
            _, grad_weight, grad_bias = torch.ops.ppo_ext.hidden_log_probs_backward(
                (token_grad * grad_scale).view(op_labels.shape), hidden, weight, op_labels,
                logsumexp.view(op_labels.shape), bias, temperature, chunk,
                (grad_entropy * grad_scale).view(op_labels.shape) if with_entropy else None,
                entropy.view(op_labels.shape) if with_entropy else None, [False, want_weight, want_bias])
        # (gradient, whether 1 / denominator is in it yet); and what a later backward (retain_graph) recomputes from
        ctx.grads = [(None if grad_hidden is None else grad_hidden.view(hidden.shape), False),
                     (grad_weight if want_weight else None, not sum_head),
                     (grad_bias.to(weight.dtype) if want_bias else None, not sum_head)]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias)
        view = (lambda t: None if t is None else t.view(op_labels.shape))  # noqa: E731
        ctx.per_token = (view(logsumexp), view(entropy), view(token_grad), view(grad_entropy), grad_scale)
        ctx.hidden_args = (op_labels, temperature, chunk)
        result["out"] = out
        if return_entropy:
            return out.loss, entropy.view(B, T)
        no_entropy = out.loss.new_empty(0)
        ctx.mark_non_differentiable(no_entropy)
        return out.loss, no_entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy):
        if torch.is_grad_enabled():
            raise RuntimeError("ppo_ext.policy_loss_from_hidden is differentiable once: backward with "
                               "create_graph=True (double backward) is not supported")
        hidden, weight, bias = ctx.saved_tensors
        logsumexp, entropy, token_grad, loss_grad_entropy, grad_scale = ctx.per_token
        want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grads = [None, None, None]
        g = g_entropy = None  # what the hidden_log_probs_backward op is left to compute
        if grad_loss is not None:
            scale = grad_loss * grad_scale
            if ctx.grads is not None:  # the gradients formed in forward, scaled in place: handed over once
                for k, (grad, scaled) in enumerate(ctx.grads):
                    if grad is not None:
                        grads[k] = grad.mul_(grad_loss if scaled else scale)
                ctx.grads = None
            else:  # a later backward through the same graph (retain_graph=True): the logits recomputed
                g = token_grad * scale
                g_entropy = None if loss_grad_entropy is None else loss_grad_entropy * scale
        if grad_entropy is not None:  # the returned entropy in the caller's own loss
            g_entropy = grad_entropy.view(logsumexp.shape) if g_entropy is None else g_entropy + grad_entropy.view(
                logsumexp.shape)
        if g is not None or g_entropy is not None:
            labels, temperature, chunk = ctx.hidden_args
            extra = torch.ops.ppo_ext.hidden_log_probs_backward(
                torch.zeros_like(logsumexp) if g is None else g, hidden, weight, labels, logsumexp, bias, temperature,
                chunk, g_entropy, None if g_entropy is None else entropy, want)
            for k in range(3):
                if want[k]:
                    grads[k] = extra[k] if grads[k] is None else grads[k].add_(extra[k])
        return (*grads, None, None, None, None, None, None, None, None)


def policy_loss_grad_in_forward(hidden, weight, bias, labels, old_log_probs, advantages, mask, *, temperature, chunks,
                                chunk, entropy_coef, return_entropy, options):
    """policy_loss_from_hidden's output, the gradients formed in the forward pass (plan() gave the chunks)."""
    result = {}
    loss, entropy = _GradInForward.apply(hidden, weight, bias, labels, temperature, chunks, chunk, entropy_coef,
                                         bool(return_entropy), (old_log_probs, advantages, mask, options), result)
    return result["out"]._replace(loss=loss, entropy=entropy if return_entropy else None)
