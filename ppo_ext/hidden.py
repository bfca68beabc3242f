"""policy_loss_from_hidden with its gradients formed in the forward pass (README "From hidden states").

The loss is known in the forward pass, so is its gradient w.r.t. each token's log-prob: each chunk's logits, still in
their buffer, are turned into their gradient there and multiplied out (grad_hidden, and grad_weight for a
float32 / float64 head), instead of being recomputed in the backward pass. A chunk's per-token gradient is the
policy_loss op's own on the chunk (its `token_grad`: the un-normalised sum's, which needs nothing of the other
chunks where the loss reads no row statistic), times the whole batch's 1 / denominator. The backward pass multiplies
the gradients in place by the upstream gradient. GEMMs: 2 a step (3 with a float32 / float64 head's gradient, 4 with
a bfloat16 head's, which backward still computes by one GEMM per block of columns over all tokens, rounded once),
against 3 / 4 / 5 when the backward recomputes the logits.
"""

from typing import Any, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from ppo_ext.distributed import _combine_vocab_shards, _shard_labels
from ppo_ext.functional import _aggregation_weights, _loss_of_log_probs, _policy_loss_op


class Shard(NamedTuple):
    """This rank's part of a head split over the vocabulary (process_group): the labels as rows of its weight
    (outside [0, V_r) where another rank's), where they are in it, the group."""

    local_labels: torch.Tensor
    in_shard: torch.Tensor
    group: Any


Rows = Tuple[int, int, int, int]  # rows [b0, b1) and columns [t0, t1) of the (B, T) tokens
Chunk = Tuple[int, int, Tuple[Rows, ...]]  # tokens [start, start + n) of the flat (B, T) order, as rectangles


def default_chunk_tokens(vocab: Optional[int], dtype: torch.dtype) -> int:
    """The tokens a chunk holds by default (chunk_tokens=None) for this vocabulary size and dtype; vocab None: the
    fewest the default takes (that of a vocabulary too large for the buffer's bytes), which does not depend on a
    rank's shard of a vocabulary-parallel head (whose ranks must cut the same chunks: a collective a chunk)."""
    return torch.ops.ppo_ext.hidden_default_chunk_tokens(vocab or 1 << 40, dtype.itemsize)


def _rectangles(start: int, end: int, T: int) -> Tuple[Rows, ...]:
    """Tokens [start, end) of the flat (B, T) order as at most three rectangles: a row's tail (or a piece of one row),
    whole rows, a row's head."""
    out = []
    b, t = divmod(start, T)
    if t:
        t1 = min(T, t + end - start)
        out.append((b, b + 1, t, t1))
        start = b * T + t1
    rows = (end - start) // T
    if rows:
        b = start // T
        out.append((b, b + rows, 0, T))
        start += rows * T
    if start < end:
        b = start // T
        out.append((b, b + 1, 0, end - start))
    return tuple(out)


def chunk_ranges(B: int, T: int, chunk: int, whole_rows: bool) -> Optional[List[Chunk]]:
    """The (B, T) tokens in chunks of at most `chunk` tokens: `chunk` tokens at a time in the flat order (as
    hidden_log_probs takes them), or with whole_rows as many whole rows as fit (None where a row is longer)."""
    if not whole_rows:
        return [(s, min(chunk, B * T - s), _rectangles(s, min(s + chunk, B * T), T)) for s in range(0, B * T, chunk)]
    if T > chunk:
        return None
    rows = chunk // T
    return [(b * T, (min(B, b + rows) - b) * T, ((b, min(B, b + rows), 0, T),)) for b in range(0, B, rows)]


def _row_statistic(o) -> Optional[str]:
    """What makes a token's gradient read its whole row (the policy_loss kernels' row pre-pass), or None."""
    if o["importance_sampling"] != "token":
        return f'importance_sampling="{o["importance_sampling"]}"'
    if o["loss_type"] in ("geo_mean", "vespo"):
        return f'loss_type="{o["loss_type"]}"'
    if o["rollout_is"] in ("seq", "seq-mean"):
        return f'rollout_is="{o["rollout_is"]}"'
    return None  # (seq-mean-token-mean's 1 / the row's valid tokens is applied per token: _GradInForward)


def _well_formed(hidden, weight, bias, labels, loss_inputs, o) -> bool:
    """Whether the arguments are of the shapes, dtypes and devices the ops take (else the generic path, whose checks
    name what is wrong)."""
    old, adv, mask = loss_inputs
    optional = (bias, old, mask, o["token_weights"], o["rollout_log_probs"], o["ref_log_probs"])
    if not (all(isinstance(t, torch.Tensor) for t in (hidden, weight, labels, adv))
            and all(t is None or isinstance(t, torch.Tensor) for t in optional)):
        return False
    if not (hidden.dim() in (2, 3) and hidden.is_floating_point() and weight.dim() == 2 and labels.dim() == 2
            and labels.dtype == torch.int64 and labels.numel() > 0):
        return False
    B, T = labels.shape
    H, V = hidden.shape[-1], weight.shape[0]
    head_ok = weight.shape[1] == H and weight.dtype == hidden.dtype and (
        bias is None or (bias.shape == (V,) and bias.dtype == hidden.dtype))
    rows_ok = hidden.shape[:-1] == labels.shape if hidden.dim() == 3 else hidden.shape[0] == B * T
    same_device = all(t.device == hidden.device for t in (weight, labels, adv, *optional) if t is not None)
    shapes_ok = all(t is None or t.shape == labels.shape for t in optional[1:]) and adv.shape in ((B, T), (B, 1), (B,))
    return head_ok and rows_ok and same_device and shapes_ok


def plan(hidden, weight, bias, labels, loss_inputs, chunk_tokens, o, vocab_parallel=False) -> Tuple[
        Optional[List[Chunk]], int, Optional[str]]:
    """(chunks, chunk, "") where the gradients can be formed in the forward pass, else (None, chunk, why not), or
    (None, chunk, None) for arguments the generic path is to check. vocab_parallel: weight is a rank's shard (the
    default chunk the same on every rank)."""
    if torch.compiler.is_compiling():
        return None, 0, "under torch.compile, which traces the generic path"
    if not _well_formed(hidden, weight, bias, labels, loss_inputs, o):
        return None, 0, None
    chunk = int(chunk_tokens or default_chunk_tokens(None if vocab_parallel else weight.shape[0], weight.dtype))
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        return None, chunk, "no gradient is asked for"
    if hidden.dtype == torch.float16:
        return None, chunk, ("float16: the upstream gradient, which holds a loss scaler's factor, is known in "
                             "backward only, and the logits' gradient in float16 would under- or overflow without it")
    B, T = labels.shape
    row_statistic = _row_statistic(o)
    chunks = chunk_ranges(B, T, min(chunk, B * T), row_statistic is not None)
    if chunks is None:
        return None, chunk, (f"with {row_statistic} a token's gradient reads its whole row, and a row ({T} tokens) is "
                             f"longer than a chunk ({chunk}): pass chunk_tokens >= {T}")
    return chunks, chunk, ""


def _part(t: Optional[torch.Tensor], r: Rows) -> Optional[torch.Tensor]:
    """The rectangle's part of a (B, T), (B, 1) or (B,) input of the loss."""
    b0, b1, t0, t1 = r
    if t is None:
        return None
    return t[b0:b1] if t.dim() == 1 or t.shape[1] == 1 else t[b0:b1, t0:t1]


def _rows(hidden: torch.Tensor, T: int, c: Chunk) -> torch.Tensor:
    """The chunk's hidden states as a (tokens, H) matrix: a view where the strides allow one, else a copy of these
    rows alone."""
    start, n, rectangles = c
    if hidden.dim() == 2:
        return hidden[start:start + n]
    if hidden.stride(0) == T * hidden.stride(1):
        return hidden.flatten(0, 1)[start:start + n]
    pieces = [hidden[b0:b1, t0:t1].reshape(-1, hidden.shape[-1]) for b0, b1, t0, t1 in rectangles]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _chunk_pass(hidden, weight, bias, labels, temperature, chunks, loss_args, need_entropy, per_token, grads,
                shard: Optional[Shard]):
    """Chunk by chunk: the logits into one reused buffer, their log-probs (logsumexp, entropy), the loss's per-token
    gradient (un-normalised), and where a gradient is asked for, the logits turned into their gradient in place and
    multiplied out into grad_hidden (and grad_weight, grad_bias where given). per_token: the (N,) outputs, the
    entropy's gradient (or None), the tokens' aggregation weights (or None: 1) and 1 / denominator. With a shard:
    its columns of the logits, each chunk's log-probs the full vocabulary's (one all-gather of the chunk's rows),
    grad_hidden this shard's part of the sum."""
    old, adv, mask, o = loss_args
    log_probs, logsumexp, entropy, token_grad, grad_entropy, agg_weights, grad_scale = per_token
    grad_hidden, grad_weight, grad_bias = grads
    T = labels.shape[1]
    # the labels as columns of the buffer: the backward's onehot term is in no rank's but the label's; the forward
    # op's log-prob is read on that rank only, and the op takes labels in range
    flat_labels = (labels if shard is None else shard.local_labels).reshape(-1)
    forward_labels = flat_labels if shard is None else flat_labels.clamp(0, weight.shape[0] - 1)
    # the normalisers are not in token_grad; a row's 1 / valid tokens (seq-mean-token-mean) is agg_weights'
    chunk_options = {**o, "num_tokens": None, "num_seqs": None, "loss_scale_factor": None}
    if agg_weights is not None:
        chunk_options["loss_agg_mode"] = "token-mean"
    multiply_out = any(g is not None for g in grads)
    V = weight.shape[0]
    # rows 16-byte aligned whatever V, as the ops' own buffer's (csrc/checks.h: logits_row_stride)
    buffer = hidden.new_empty(max(n for _, n, _ in chunks),
                              torch.ops.ppo_ext.hidden_logits_row_stride(V, hidden.element_size()))
    for c in chunks:
        start, n, rectangles = c
        tokens = slice(start, start + n)
        rows = _rows(hidden, T, c)
        logits = buffer[:n, :V]
        if bias is None:
            torch.mm(rows, weight.T, out=logits)
        else:
            torch.addmm(bias, rows, weight.T, out=logits)
        lp, lse, h = torch.ops.ppo_ext.token_log_probs(logits, forward_labels[tokens], temperature, need_entropy,
                                                       False)
        if shard is not None:
            lp, lse, h = _combine_vocab_shards(lp, lse, h if need_entropy else None,
                                               shard.in_shard.reshape(-1)[tokens], shard.group)
        log_probs[tokens], logsumexp[tokens] = lp, lse
        if need_entropy:
            entropy[tokens] = h
        for r in rectangles:  # the policy_loss op's own per-token gradient on each rectangle's tokens
            b0, b1, t0, t1 = r
            begin, count = b0 * T + t0 - start, (b1 - b0) * (t1 - t0)
            token_grad[start + begin:start + begin + count] = _policy_loss_op(
                lp[begin:begin + count].view(b1 - b0, t1 - t0), _part(old, r), _part(adv, r), _part(mask, r), True,
                {**chunk_options,
                 **{k: _part(o[k], r) for k in ("token_weights", "rollout_log_probs", "ref_log_probs")}},
            )[3].view(-1)
        if agg_weights is not None:
            token_grad[tokens] *= agg_weights[tokens]
        token_grad[tokens] *= grad_scale
        if not multiply_out:
            continue
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
    forward, handed over (scaled by the upstream gradient, in place) by backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunks, chunk, entropy_coef, return_entropy,
                loss_args, shard, result):
        old, adv, mask, o = loss_args
        B, T = labels.shape
        N, V = B * T, weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        # float32 / float64 heads sum grad_weight chunk after chunk here; bfloat16 heads take it in backward from
        # one GEMM per block of columns over all tokens (hidden_log_probs_backward: rounded once, the upstream
        # gradient in it)
        sum_head = weight.dtype == acc
        need_entropy = return_entropy or entropy_coef != 0
        like = dict(dtype=acc, device=hidden.device)
        log_probs, logsumexp, token_grad = (torch.empty(N, **like) for _ in range(3))
        entropy = torch.empty(N, **like) if need_entropy else None
        # The entropy bonus's gradient is -coef times each token's aggregation weight, as _aggregate_like_the_loss
        # aggregates the entropy; seq-mean-token-mean's weights (1 / the row's valid tokens) go into token_grad too.
        agg_weights = grad_entropy = None
        if entropy_coef != 0 or o["loss_agg_mode"] == "seq-mean-token-mean":
            weights = _aggregation_weights(None if mask is None else mask != 0, (B, T), o["loss_agg_mode"], acc,
                                          hidden.device).reshape(-1)
            if o["loss_agg_mode"] == "seq-mean-token-mean":
                agg_weights = weights
            if entropy_coef != 0:
                grad_entropy = weights * -entropy_coef
        # 1 / denominator in the per-token gradients before their GEMMs, as the generic path has it (the op's
        # grad_scale depends on the mask and the normalisers alone: known before the log-probs), so that grad_hidden
        # is rounded once (bitwise the generic path's under an upstream gradient of 1)
        grad_scale = _policy_loss_op(torch.zeros(B, T, **like), old, adv, mask, False, o)[4]
        if grad_entropy is not None:
            grad_entropy *= grad_scale
        grad_hidden = hidden.new_empty(N, hidden.shape[-1]) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, **{**like, "dtype": weight.dtype}) if want_weight and sum_head else None
        grad_bias = torch.zeros(V, **like) if want_bias and sum_head else None
        _chunk_pass(hidden, weight, bias, labels, temperature, chunks, (old, adv, mask, o), need_entropy,
                    (log_probs, logsumexp, entropy, token_grad, grad_entropy, agg_weights, grad_scale),
                    (grad_hidden, grad_weight, grad_bias), shard)
        if shard is not None and grad_hidden is not None:  # the head's input is replicated over the group
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=shard.group)
        out, _ = _loss_of_log_probs(log_probs.view(B, T), None if entropy is None else entropy.view(B, T), old, adv,
                                    mask, return_entropy, entropy_coef, o)
        # the gradients formed here (before the upstream gradient), handed over by the first
        # backward; the head's of a bfloat16 one are left to it (column_pass); and what a later backward
        # (retain_graph) recomputes from
        ctx.grads = [None if grad_hidden is None else grad_hidden.view(hidden.shape), grad_weight, grad_bias]
        ctx.column_pass = not sum_head and (want_weight or want_bias)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias)
        op_labels = labels if shard is None else shard.local_labels  # the hidden_log_probs ops' labels
        op_labels = op_labels if hidden.dim() == 3 else op_labels.reshape(-1)
        ctx.group = None if shard is None else shard.group
        view = (lambda t: None if t is None else t.view(op_labels.shape))  # noqa: E731
        ctx.per_token = (view(logsumexp), view(entropy), view(token_grad), view(grad_entropy))
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
        logsumexp, entropy, token_grad, loss_grad_entropy = ctx.per_token  # (1 / denominator in them)
        want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grads = [None, None, None]
        recompute = []  # (per-token gradient, entropy's gradient, output_mask) for hidden_log_probs_backward
        if grad_loss is not None:
            def scaled(output_mask):  # a recompute pass of the loss's gradients: the upstream gradient in them
                return (token_grad * grad_loss, None if loss_grad_entropy is None else loss_grad_entropy * grad_loss,
                        output_mask)

            if ctx.grads is not None:  # the first backward: the gradients formed in forward, scaled in place
                grads = [None if g is None else g.mul_(grad_loss) for g in ctx.grads]
                ctx.grads = None
                if ctx.column_pass:
                    recompute.append(scaled([False, want[1], want[2]]))
            else:  # a later backward through the same graph (retain_graph=True): the logits recomputed
                recompute.append(scaled(want))
        if grad_entropy is not None:  # the returned entropy in the caller's own loss
            recompute.append((torch.zeros_like(logsumexp), grad_entropy.reshape(logsumexp.shape), want))
        labels, temperature, chunk = ctx.hidden_args
        for g, g_entropy, mask in recompute:
            extra = torch.ops.ppo_ext.hidden_log_probs_backward(
                g, hidden, weight, labels, logsumexp, bias, temperature, chunk, g_entropy,
                None if g_entropy is None else entropy, mask)
            if mask[0] and ctx.group is not None:
                dist.all_reduce(extra[0], op=dist.ReduceOp.SUM, group=ctx.group)
            for k in range(3):
                if mask[k]:
                    grads[k] = extra[k] if grads[k] is None else grads[k].add_(extra[k])
        if grads[2] is not None:
            grads[2] = grads[2].to(weight.dtype)
        return (*grads, None, None, None, None, None, None, None, None, None)


def policy_loss_grad_in_forward(hidden, weight, bias, labels, old_log_probs, advantages, mask, *, temperature, chunks,
                                chunk, entropy_coef, return_entropy, options, process_group=None, vocab_start=None,
                                check_labels=False):
    """policy_loss_from_hidden's output, the gradients formed in the forward pass (plan() gave the chunks)."""
    shard = None
    if process_group is not None:
        shard = Shard(*_shard_labels(labels, weight.shape[0], vocab_start, process_group, check_labels), process_group)
    result = {}
    loss, entropy = _GradInForward.apply(hidden, weight, bias, labels, temperature, chunks, chunk, entropy_coef,
                                         bool(return_entropy), (old_log_probs, advantages, mask, options), shard,
                                         result)
    return result["out"]._replace(loss=loss, entropy=entropy if return_entropy else None)
