"""Public ``sample_tokens``: one image token per row from guided logits (classifier-free guidance, temperature, top-k,
top-p), as in Janus-style generation where the batch holds prompts × samples and each row has a conditional and an
unconditional logit vector.

Backends (chosen per call by ``silmm_fast._backend.choose``):
- ``triton``: one program per row, no sort (``silmm_fast.kernels.sampling``): max, total mass, bisection for the
  thresholds, inverse-CDF draw; the logits are read in place and the only write is the [B] result.
- ``torch``: ``silmm_fast.ops.torch_backend.sampling``, vectorized PyTorch over chunks of rows: no sort for plain
  sampling, ``topk`` for top-k, one sort per row only when top-p is on.
- ``reference``: ``silmm_fast.reference.sampling`` (always sorts).

All three return identical tokens for identical inputs and uniforms: the rules and the exact arithmetic that makes
them agree are in ``silmm_fast.reference.sampling``. The uniforms are drawn here, once, before the dispatch, so a
seeded generator reproduces the same tokens on every backend. Sampling is not differentiable: the result is an index
tensor and nothing is recorded for autograd. ``sample_tokens_on`` runs one backend on checked inputs, with its block
size as an argument (the tests pass small ones).
"""

from __future__ import annotations

import math
import numbers

import torch

from silmm_fast import _backend
from silmm_fast._validate import check_float, check_ndim, check_same_device, check_same_shape
from silmm_fast.ops.torch_backend import sampling as torch_backend
from silmm_fast.reference import sampling as _reference


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
) -> tuple[float, float, int, float]:
    """Check every argument; returns (fp32 cfg_scale, temperature (0: greedy), top_k, fp32 top_p)."""
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
    if t != 0 and _reference.inverse_temperature(t) == 0:
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
            expected = f"expected a generator on {logits.device.type} (like logits)"
            raise ValueError(f"generator: {expected}, got one on {generator.device}")
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
    return s32, t, int(top_k), _reference.fp32(p)


# --- dispatch -------------------------------------------------------------------------------------------------------
def _checked_inputs(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> dict:
    """``sample_tokens``' arguments checked and made ready for ``sample_tokens_on``: the logits detached, the
    settings as fp32 values, and the [B] float64 uniforms drawn here, once, whatever the backend (None for greedy)."""
    cfg32, t, top_k, top_p32 = _validate(logits, uncond_logits, cfg_scale, temperature, top_k, top_p, generator, noise)
    u = None
    if t != 0:
        if noise is None:
            u = torch.rand(logits.shape[0], generator=generator, device=logits.device, dtype=torch.float64)
        else:
            u = noise.detach().to(torch.float64)
    uncond = None if uncond_logits is None else uncond_logits.detach()
    settings = dict(cfg_scale=cfg32, temperature=t, top_k=top_k, top_p=top_p32)
    return dict(logits=logits.detach(), uncond=uncond, noise=u, **settings)


def sample_tokens_on(
    backend: str,
    logits: torch.Tensor,
    uncond: torch.Tensor | None,
    noise: torch.Tensor | None,
    *,
    cfg_scale: float,
    temperature: float,
    top_k: int,
    top_p: float,
    block_v: int | None = None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """``sample_tokens`` on ``backend`` for checked inputs: fp32 values of ``cfg_scale`` and ``top_p``, ``temperature``
    0 for greedy, ``noise`` the [B] float64 uniforms (None for greedy). ``block_v``: the Triton vocabulary block;
    ``chunk_elements``: logits per torch chunk (None: the backend's rule)."""
    if backend == "reference":
        return _reference.sample_tokens(
            logits, uncond, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, noise=noise
        )
    inv_t = None if temperature == 0 else _reference.inverse_temperature(temperature)
    settings = dict(cfg_scale=cfg_scale, inv_temperature=inv_t, top_k=top_k, top_p=top_p)
    if backend == "triton":
        from silmm_fast.kernels import sampling as kernels

        return kernels.sample_tokens_fwd(logits, uncond, noise, **settings, block_v=block_v)
    return torch_backend.sample_tokens_fwd(logits, uncond, noise, **settings, chunk_elements=chunk_elements)


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
    inputs = _checked_inputs(
        logits,
        uncond_logits,
        cfg_scale=cfg_scale,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        noise=noise,
    )
    return sample_tokens_on(_backend.choose("sample_tokens", logits.device), **inputs)
