"""Input checks shared by the public ops: each raises a TypeError / ValueError that names the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: object) -> torch.Tensor:
    x = check_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    return x


def check_integer(name: str, x: object) -> torch.Tensor:
    x = check_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (e.g. torch.long), got {x.dtype}")
    return x


def check_ndim(name: str, x: torch.Tensor, ndims: int | Iterable[int], shape_doc: str) -> None:
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if x.dim() not in allowed:
        raise ValueError(f"{name}: expected shape {shape_doc}, got {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(f"{k}: expected a tensor on {first} (like {first_name}), got one on {d}")
    return first


def check_same_shape(name: str, x: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} (same as {like_name}), got {tuple(x.shape)}")


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_number(name: str, value: object, expected: str = "a finite number") -> float:
    """A real, finite number (int, float or a numpy scalar; not bool) as float. NaN and ±inf are refused: a loss
    scaled by an infinite or NaN setting gives NaN everywhere downstream instead of an error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return out


def check_positive(name: str, value: object) -> float:
    """A finite number > 0, as float."""
    out = check_number(name, value, "a finite positive number")
    if not out > 0:
        raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    return out


def has_data(t: torch.Tensor) -> bool:
    """False for meta tensors (shape and dtype only): value checks are skipped for them, never ``.item()``-ed."""
    return not t.is_meta


def check_finite(name: str, x: torch.Tensor) -> None:
    """NaN / Inf check. On CUDA this costs one host sync; callers use it only where a non-finite value would
    otherwise corrupt a result silently (e.g. a similarity matrix feeding a greedy selection). Skipped for meta
    tensors (no values)."""
    if has_data(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf")


# --- arguments of the log-prob ops and the fused heads ---------------------------------------------------------------
def check_ignore_index(ignore_index: object) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    return ignore_index


def _untraceable(labels: torch.Tensor) -> bool:
    """Inside torch.compile tracing or CUDA graph capture a data-dependent check cannot run."""
    if torch.compiler.is_compiling():
        return True
    return labels.is_cuda and torch.cuda.is_current_stream_capturing()


def check_label_range(
    labels: torch.Tensor, V: int, ignore_index: int, vocab_doc: str, *, skip_when_traced: bool = False
) -> None:
    """Every label in [0, V) or ``ignore_index``: one fused reduction over the labels, on CUDA one host sync of a
    single bool (labels are O(N), tiny next to the [N, V] logits); a clear ValueError beats a NaN that surfaces many
    steps later. ``vocab_doc`` says where V comes from. Skipped for meta tensors (no values), and with
    ``skip_when_traced`` under torch.compile tracing / CUDA graph capture (for ops whose kernels turn such a label into
    NaN, never an out-of-bounds read)."""
    if labels.numel() == 0 or not has_data(labels) or (skip_when_traced and _untraceable(labels)):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels: expected values in [0, {V}) ({vocab_doc}) or ignore_index={ignore_index}, got {first}"
        )


def check_logits_and_labels(logits: object, labels: object, ignore_index: object, *, sequence: bool) -> None:
    """The inputs of ``gather_logprobs`` (logits [..., V], labels [...]) or, with ``sequence``, of
    ``sequence_logprobs`` (logits [B, T, V], labels [B, T])."""
    logits = check_float("logits", logits)
    labels = check_integer("labels", labels)
    check_ignore_index(ignore_index)
    if sequence:
        check_ndim("logits", logits, 3, "[B, T, V]")
        check_ndim("labels", labels, 2, "[B, T]")
    elif logits.dim() == 0:
        raise ValueError("logits: expected shape [..., V] with at least one dimension, got a 0-d tensor")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), got {tuple(labels.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"logits: expected a vocabulary of at least 1 (shape [..., V]), got {tuple(logits.shape)}")
    check_same_device(logits=logits, labels=labels)
    vocab_doc = "the vocabulary size, logits.shape[-1]"
    check_label_range(labels, logits.shape[-1], ignore_index, vocab_doc, skip_when_traced=True)


def check_linear_head(
    hidden: object, weight: object, labels: object, bias: object, ignore_index: object, *, hidden_doc: str = "[B, T, H]"
) -> None:
    """The inputs of a fused linear head: hidden [B, T, H], weight [V, H], labels [B, T], bias [V] or None, in one
    dtype (labels: any integer dtype) on one device, labels in [0, V) or ``ignore_index``."""
    hidden = check_float("hidden", hidden)
    weight = check_float("weight", weight)
    labels = check_integer("labels", labels)
    if bias is not None:
        check_float("bias", bias)
    check_ignore_index(ignore_index)
    check_ndim("hidden", hidden, 3, hidden_doc)
    check_ndim("weight", weight, 2, "[V, H]")
    B, T, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected shape [V, {H}] (H = hidden.shape[-1]), got {tuple(weight.shape)}")
    if V == 0:
        raise ValueError(f"weight: expected a vocabulary of at least 1 row (shape [V, H]), got {tuple(weight.shape)}")
    if labels.shape != (B, T):
        raise ValueError(f"labels: expected shape [{B}, {T}] (hidden.shape[:2]), got {tuple(labels.shape)}")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias: expected shape [{V}] (V = weight.shape[0]), got {tuple(bias.shape)}")
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise TypeError(f"{name}: expected dtype {hidden.dtype} (same as hidden), got {x.dtype}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    check_label_range(labels, V, ignore_index, "V = weight.shape[0]")


def check_preference_pairs(hidden: object) -> int:
    """hidden [2B, T, H] with B ≥ 1 (B chosen rows, then B rejected rows); returns B."""
    hidden = check_float("hidden", hidden)
    check_ndim("hidden", hidden, 3, "[2B, T, H] (chosen rows, then rejected rows)")
    rows = hidden.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"hidden: expected an even, non-zero number of rows [2B, T, H] (B chosen then B rejected), got "
            f"{tuple(hidden.shape)}"
        )
    return rows // 2


def check_reference_logps(pairs: int, hidden: torch.Tensor, ref_chosen: object, ref_rejected: object) -> None:
    """Reference log-probs [B] (one per pair), floating, on the device of ``hidden``."""
    for name, ref in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)):
        ref = check_float(name, ref)
        if ref.shape != (pairs,):
            raise ValueError(
                f"{name}: expected shape [{pairs}] (one per pair, hidden.shape[0] // 2), got {tuple(ref.shape)}"
            )
    check_same_device(hidden=hidden, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)


def check_nll_weight(nll_weight: object) -> float:
    if isinstance(nll_weight, bool) or not isinstance(nll_weight, (int, float)) or not 0 <= nll_weight < float("inf"):
        raise ValueError(f"nll_weight: expected a finite number >= 0, got {nll_weight!r}")
    return float(nll_weight)


def check_chunk_bytes(chunk_bytes: object) -> int | None:
    if chunk_bytes is not None and (
        isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0
    ):
        raise ValueError(f"chunk_bytes: expected a positive int (bytes) or None, got {chunk_bytes!r}")
    return chunk_bytes


# --- arguments of the model adapters (ShapesLMM, JanusAdapter) -----------------------------------------------------
def check_prompts(prompts: object, name: str = "prompts", *, allow_blank: bool = True) -> list[str]:
    """A non-empty list of str (a bare str is refused: it would iterate as characters)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name}: expected a list of str, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}]: expected a str, got {type(p).__name__}")
        if not allow_blank and not p.strip():
            raise ValueError(f"{name}[{i}]: empty prompt")
    if not prompts:
        raise ValueError(f"{name}: expected at least one prompt")
    return list(prompts)


def check_image_tokens(
    image_tokens: object, seq_len: int, codebook_size: int, name: str = "image_tokens"
) -> torch.Tensor:
    """Image-token indices [..., seq_len] in [0, codebook_size), as a LongTensor (on their own device)."""
    if not isinstance(image_tokens, torch.Tensor):
        raise TypeError(f"{name}: expected a LongTensor, got {type(image_tokens).__name__}")
    if image_tokens.dtype.is_floating_point or image_tokens.dtype.is_complex or image_tokens.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {image_tokens.dtype}")
    if image_tokens.shape[-1:] != (seq_len,):
        raise ValueError(f"{name}: expected shape [..., {seq_len}], got {tuple(image_tokens.shape)}")
    if image_tokens.numel() and (image_tokens.min() < 0 or image_tokens.max() >= codebook_size):
        raise ValueError(f"{name}: image tokens must lie in [0, {codebook_size})")
    return image_tokens.long()


def images_per_prompt(
    prompts: list[str], tokens: torch.Tensor, seq_len: int, name: str = "image_tokens"
) -> tuple[list[str], torch.Tensor]:
    """One (prompt, image) row per image: ``tokens`` [B, seq_len] (image i of prompt i) or [P, n, seq_len] (n images
    of each of the P prompts) as the prompts repeated to match and the tokens [B', seq_len], B' = B or P·n."""
    if tokens.dim() == 3:
        if tokens.shape[0] != len(prompts):
            raise ValueError(f"{name}: expected {len(prompts)} prompts in dim 0, got {tokens.shape[0]}")
        return [p for p in prompts for _ in range(tokens.shape[1])], tokens.reshape(-1, seq_len)
    if tokens.dim() != 2 or tokens.shape[0] != len(prompts):
        raise ValueError(
            f"{name}: expected shape [{len(prompts)}, {seq_len}] or [P, n, {seq_len}], got {tuple(tokens.shape)}"
        )
    return prompts, tokens


def check_count(name: str, n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name}: expected a positive int, got {n!r}")
    return n


def check_sampling(temperature: object, top_p: object) -> None:
    if check_number("temperature", temperature, "a finite number >= 0 (0 = greedy)") < 0:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < check_number("top_p", top_p, "a number in (0, 1]") <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")


def check_noise(noise: object, shape: tuple[int, ...], generator: object = None) -> torch.Tensor:
    """Per-draw uniform numbers of ``shape``, and not together with a ``generator``."""
    if generator is not None:
        raise ValueError("noise, generator: pass one source of randomness, not both")
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape or not noise.is_floating_point():
        got = f"{tuple(noise.shape)} {noise.dtype}" if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise: expected a float tensor of uniform numbers with shape {list(shape)}, got {got}")
    return noise
