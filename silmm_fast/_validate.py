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
