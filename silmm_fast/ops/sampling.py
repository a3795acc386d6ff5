"""Public ``sample_tokens``: one image token per row from guided logits (classifier-free guidance, temperature, top-k,
top-p), as in Janus-style generation where the batch holds prompts × samples and each row has a conditional and an
unconditional logit vector.

Backends (chosen per call by ``silmm_fast._backend.choose``):
- ``triton``: one program per row, no sort (``silmm_fast.kernels.sampling``): max, total mass, bisection for the
  thresholds, inverse-CDF draw; the logits are read in place and the only write is the [B] result.
- ``torch``: vectorized PyTorch over chunks of rows: no sort for plain sampling, ``topk`` for top-k, one sort per row
  only when top-p is on.
- ``reference``: ``silmm_fast.reference.sampling`` (always sorts).

All three return identical tokens for identical inputs and uniforms: the rules and the exact arithmetic that makes
them agree are in ``silmm_fast.reference.sampling``. The uniforms are drawn here, once, before the dispatch, so a
seeded generator reproduces the same tokens on every backend. Sampling is not differentiable: the result is an index
tensor and nothing is recorded for autograd.
"""

from __future__ import annotations

import math
import numbers

import torch

from silmm_fast import _backend
from silmm_fast._validate import check_float, check_ndim, check_same_device, check_same_shape
from silmm_fast.reference import sampling as _reference

# torch backend: rows per chunk = this // V (at least 1). The weight math is ~20 elementwise fp32 / int64 ops per
# logit, so a chunk small enough to stay in cache between them pays off: 2^18 elements (1 MiB of fp32).
TORCH_CHUNK_ELEMENTS = 1 << 18
# triton backend: vocabulary block override (None = the kernel's heuristic); tests shrink it to cover multi-block rows.
_TRITON_BLOCK_V: int | None = None


# --- validation -----------------------------------------------------------------------------------------------------
def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def _validate(
    logits: object,
    uncond_logits: object,
    cfg_scale: object,
    temperature: object,
    top_k: object,
    top_p: object,
    generator: object,
    noise: object,
) -> tuple[float, float | None, int, float]:
    """Check every argument; returns (fp32 cfg_scale, fp32 1/temperature or None for greedy, top_k, fp32 top_p)."""
    check_float("logits", logits)
    assert isinstance(logits, torch.Tensor)
    check_ndim("logits", logits, 2, "[B, V]")
    V = logits.shape[1]
    if V == 0:
        raise ValueError(f"logits: expected a vocabulary of at least 1 (shape [B, V]), got {tuple(logits.shape)}")
    if V > _reference.MAX_VOCAB:
        raise ValueError(f"logits: V = {V} exceeds {_reference.MAX_VOCAB} (the int64 weight sums would overflow)")
    if uncond_logits is not None:
        check_float("uncond_logits", uncond_logits)
        assert isinstance(uncond_logits, torch.Tensor)
        check_same_shape("uncond_logits", uncond_logits, "logits", logits)
        check_same_device(logits=logits, uncond_logits=uncond_logits)
    s = _real("cfg_scale", cfg_scale)
    s32 = _reference.fp32(s)
    if not math.isfinite(s32):
        raise ValueError(f"cfg_scale: {s} overflows float32")
    t = _real("temperature", temperature)
    if t < 0:
        raise ValueError(f"temperature: expected a number >= 0 (0 = greedy), got {t}")
    inv_t = None if t == 0 else _reference.inverse_temperature(t)
    if inv_t == 0:
        raise ValueError(f"temperature: {t} is too large (1/temperature rounds to 0 in float32)")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k: expected an int, got {type(top_k).__name__}")
    if top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 = keep all), got {top_k}")
    p = _real("top_p", top_p)
    if not 0 < p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {p}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if noise is not None:
            # the generator would be silently unused: refuse the ambiguity, as the model adapters do
            raise ValueError("noise, generator: pass one source of randomness (noise or generator), not both")
        if generator.device.type != logits.device.type:
            raise ValueError(f"generator: expected a generator on {logits.device.type} (like logits), got one on "
                             f"{generator.device}")  # fmt: skip
    if noise is not None:
        check_float("noise", noise)
        assert isinstance(noise, torch.Tensor)
        if noise.shape != (logits.shape[0],):
            raise ValueError(f"noise: expected shape [B] = ({logits.shape[0]},), got {tuple(noise.shape)}")
        check_same_device(logits=logits, noise=noise)
        # On CPU the range check is free; on CUDA it would be a host sync, so there an out-of-range or NaN uniform
        # gives -1 for its row instead (every backend does the same).
        if noise.device.type == "cpu" and noise.numel() and not bool(((noise >= 0) & (noise < 1)).all()):
            raise ValueError("noise: expected uniform values in [0, 1) (and no NaN)")
    return s32, inv_t, int(top_k), _reference.fp32(p)


# --- torch backend --------------------------------------------------------------------------------------------------
def _bad_max(m: torch.Tensor) -> torch.Tensor:
    """Row maxima (amax propagates NaN) that mark an unusable row: NaN or +inf anywhere in it."""
    return torch.isnan(m) | (m == float("inf"))


def _torch_mix(
    cond: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.mix`` in fewer passes: the same three fp32 roundings done in place, and the checks read off row
    maxima (one reduction each; the max of z is needed anyway). Also returns the row max [B, 1]."""
    c = cond.to(torch.float32)
    if uncond is None:
        z = c.contiguous()
        bad = torch.zeros(c.shape[0], dtype=torch.bool, device=c.device)
    else:
        u = uncond.to(torch.float32)
        bad = _bad_max(c.amax(-1)) | _bad_max(u.amax(-1))
        z = torch.sub(c, u, out=torch.empty(c.shape, dtype=torch.float32, device=c.device))
        z.mul_(cfg_scale).add_(u)  # u + s·(c − u): addition commutes exactly
        z.masked_fill_(torch.minimum(c, u) == float("-inf"), float("-inf"))
    m = z.amax(-1, keepdim=True)
    return z, bad | _bad_max(m.squeeze(-1)) | (m.squeeze(-1) == float("-inf")), m


def _torch_weights(a: torch.Tensor) -> torch.Tensor:
    """``reference.weights(a)[1]`` bit for bit, in fewer passes: in-place Horner, and instead of masking x > 40, x is
    clamped to 41: every x in (40, 41] has j = 41 and f = 41 − x ≤ 1 − 2^-18 (the fp32 step above 40 is 2^-18), so
    p < 2, P·2^17 < 2^41 and the shift by 41 leaves 0, the reference's weight there."""
    x = (a * _reference.LOG2E).clamp_(max=_reference.WEIGHT_BITS + 1)
    j = torch.ceil(x)
    f = j - x
    c1, c2, c3, c4, c5, c6 = _reference.EXP2_COEFFS
    p = f * c6
    for c in (c5, c4, c3, c2, c1):
        p.add_(c).mul_(f)
    p.add_(1.0).mul_(8388608.0)
    w = p.to(torch.int64).bitwise_left_shift_(_reference.WEIGHT_BITS - 23)
    return w.bitwise_right_shift_(j.to(torch.int64))


def _smallest_gaps(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest gaps per row, ascending, and their indices (a full sort when k is the whole row)."""
    if k >= a.shape[-1]:
        return torch.sort(a, dim=-1)
    return torch.topk(a, k, dim=-1, largest=False, sorted=True)


def _torch_bound(a: torch.Tensor, w: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor | None:
    """Largest kept gap per row ([rows, 1]; keep ``a ≤ bound``), or None when every token is kept."""
    V = a.shape[-1]
    use_k = 0 < top_k < V
    if not use_k and top_p >= 1.0:
        return None
    if use_k:
        # the k smallest gaps; ties of the k-th beyond position k are in the set too, so the mass is over the row
        a_top, order = _smallest_gaps(a, top_k)
        a_k = a_top[:, -1:]
        if top_p >= 1.0:
            return a_k
        mass_k = torch.where(a <= a_k, w, 0).sum(-1)
    else:
        a_k = None
        mass_k = w.sum(-1)
    target = (top_p * mass_k.to(torch.float64)).unsqueeze(-1)
    # Without top-k, the nucleus usually holds few tokens: on CPU, where a data-dependent branch costs no device sync,
    # grow a partial selection (256, 1024, ...) until every row's cumulative mass reaches the target instead of
    # sorting whole rows. On other devices, one sort.
    k = top_k if use_k else (min(V, 256) if a.device.type == "cpu" else V)
    while True:
        if not use_k:
            a_top, order = _smallest_gaps(a, k)
        reached = w.gather(-1, order).cumsum(-1).to(torch.float64) >= target
        if use_k or k >= V or bool(reached[:, -1].all()):
            break
        k = min(V, 4 * k)
    # The first position reaching the target bounds the set; the order among equal gaps does not change which gap
    # that is. With top-k, a row that reaches it nowhere in the list reaches it in the k-th gap's tail of ties.
    first = reached.to(torch.int8).argmax(-1, keepdim=True)
    bound = a_top.gather(-1, first)
    return bound if a_k is None else torch.where(reached.any(-1, keepdim=True), bound, a_k)


def _torch_sample(
    logits: torch.Tensor,
    uncond: torch.Tensor | None,
    u: torch.Tensor | None,
    cfg_scale: float,
    inv_t: float | None,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    rows = max(1, TORCH_CHUNK_ELEMENTS // V)
    for r0 in range(0, B, rows):
        rs = slice(r0, min(B, r0 + rows))
        z, bad, m = _torch_mix(logits[rs], None if uncond is None else uncond[rs], cfg_scale)
        if inv_t is None:
            out[rs] = torch.where(bad, -1, z.argmax(-1))
            continue
        uc = u[rs]
        bad |= ~((uc >= 0) & (uc < 1))
        a = torch.sub(m, z).mul_(inv_t)  # reference.gaps (z may be the caller's logits: never written)
        w = _torch_weights(a)
        bound = _torch_bound(a, w, top_k, top_p)
        token = _reference.draw(a, w, bound, torch.where(bad, 0.0, uc))
        out[rs] = torch.where(bad, -1, token)
    return out


# --- public op ------------------------------------------------------------------------------------------------------
def sample_tokens(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row from classifier-free-guided logits, with temperature, top-k and top-p, in one fused pass.

    Equivalent to (up to the exact tie and rounding rules of ``silmm_fast.reference.sampling``)::

        z = uncond + cfg_scale * (cond - uncond) if uncond is not None else cond
        probs = softmax(z.float() / temperature)      # then keep the top_k largest, then the top_p nucleus
        token = multinomial(probs_kept / probs_kept.sum(), 1)     # temperature == 0: z.argmax(-1)

    Args:
        logits: [B, V] conditional logits, float16 / bfloat16 / float32 / float64, any strides (read in place).
        uncond_logits: [B, V] unconditional logits for the same rows (any float dtype), or None for no guidance.
        cfg_scale: guidance scale s (ignored without ``uncond_logits``); 1 gives the conditional logits back.
        temperature: > 0 divides the mixed logits; 0 is greedy (argmax, ties to the smallest index; no random
            number is drawn).
        top_k: keep the k most probable tokens (ties with the k-th are kept too); 0 keeps all.
        top_p: keep the smallest set of most probable tokens whose probability reaches top_p (ties at the threshold
            kept; never empty); 1 keeps all.
        generator: drives ``torch.rand`` on the logits' device (one float64 uniform per row) when ``noise`` is None.
        noise: [B] uniforms in [0, 1) (any float dtype, read as float64) to use instead of a generator (passing both
            raises): the same logits and noise give the same tokens on every backend.

    Returns:
        LongTensor [B] on the logits' device. A row with a NaN or +inf logit (in either input, or after mixing) or
        without any finite mixed logit gives -1, and so does a uniform outside [0, 1) given on a CUDA device: an
        index that fails loudly at the next embedding lookup rather than a silently wrong token. Logits are not
        searched for NaN on the host (no sync). -inf logits are masked tokens (in either branch).

    Precision: fp32 math whatever the input dtype (fp64 inputs are rounded to fp32 first); probabilities are int64
    weights ≈ 2^40·exp(−gap) with relative error ≤ 1.4e-6, so a token more than 27.7 nats below the row's best has
    probability 0. Memory: O(B) extra on the Triton path; the torch path works on chunks of rows. No host sync on
    CUDA (no ``.item()``, no branch on tensor values); the noise range is only checked for CPU tensors.

    Raises:
        TypeError: non-floating logits / uncond_logits / noise, non-number scalars, a non-int top_k, a generator that
            is not a ``torch.Generator``.
        ValueError: logits not [B, V], V = 0 or V > 2^22, uncond_logits or noise of the wrong shape or device,
            a non-finite cfg_scale or temperature, temperature < 0, top_k < 0, top_p outside (0, 1], CPU noise
            outside [0, 1), ``noise`` together with ``generator``.
    """
    cfg32, inv_t, top_k, top_p32 = _validate(
        logits, uncond_logits, cfg_scale, temperature, top_k, top_p, generator, noise
    )
    backend = _backend.choose("sample_tokens", logits.device)
    logits = logits.detach()
    uncond = None if uncond_logits is None else uncond_logits.detach()
    B = logits.shape[0]
    u = None
    if inv_t is not None:
        if noise is None:
            u = torch.rand(B, generator=generator, device=logits.device, dtype=torch.float64)
        else:
            u = noise.detach().to(torch.float64)
    if backend == "triton":
        from silmm_fast.kernels import sampling as kernels

        return kernels.sample_tokens(
            logits,
            uncond,
            u,
            cfg_scale=cfg32,
            inv_temperature=inv_t,
            top_k=top_k,
            top_p=top_p32,
            block_v=_TRITON_BLOCK_V,
        )
    if backend == "reference":
        return _reference.sample_tokens(
            logits,
            uncond,
            cfg_scale=cfg32,
            temperature=0.0 if inv_t is None else temperature,
            top_k=top_k,
            top_p=top_p32,
            noise=u,
        )
    with torch.no_grad():
        return _torch_sample(logits, uncond, u, cfg32, inv_t, top_k, top_p32)
