"""``FusedDPOTrainer``: TRL's ``DPOTrainer`` with its loss computed by silmm_fast's fused head.

Same constructor and ``trl.DPOConfig`` as ``trl.DPOTrainer``, plus ``head=`` for models whose generation head is not
``get_output_embeddings()`` (``head="janus"`` for ``JanusForConditionalGeneration``'s image head). The trainer
overrides ``compute_loss`` and ``compute_ref_log_probs``: the policy and the reference model run their backbone
through the model's own forward with ``logits_to_keep`` selecting no position (so ``torch.nn.parallel`` wrappers see
the forward and DDP synchronizes gradients), and the activations entering the head's last Linear go to
``FusedLinearDPOLoss`` (one loss type: gradients formed in the forward) or to ``fused_linear_logprobs`` and
``dpo_loss`` (several weighted loss types); the ``[tokens, vocab]`` logits are never formed. It logs
the metrics ``DPOTrainer`` logs, under the same names and with the same values (entropy, token accuracy and mean
logits come from a no-grad pass over vocabulary slabs).

Supported: loss types ``sigmoid``, ``hinge``, ``ipo`` (TRL's length-normalized form) and ``robust``, alone or
weighted (``loss_weights``); ``precompute_ref_log_probs`` on and off; an explicit ``ref_model`` or none;
``sync_ref_model``; gradient accumulation; DDP (``torchrun``). Refused when the trainer is built, with a message that
names them: other loss types, ``ld_alpha``, ``f_divergence_type`` other than ``reverse_kl``, ``use_weighting``,
``use_liger_kernel``, PEFT, quantization, DeepSpeed, FSDP, vision datasets, MoE router losses, models whose logits
are scaled or soft-capped after the head, and ``head="janus"`` under DDP.

Pre-tokenized datasets (columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids``) are used as they are: that is how
image-token completions reach the trainer (their ids index the image codebook, not the text vocabulary).
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import warnings
from typing import Any

from silmm_fast._extras import TRL_MODULES, require

require("trl", TRL_MODULES, "silmm_fast.integrations.trl")

import torch  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from trl import DPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402

from silmm_fast.losses.dpo import dpo_loss  # noqa: E402
from silmm_fast.losses.fused_linear_dpo import FusedLinearDPOLoss  # noqa: E402
from silmm_fast.ops.fused_linear_logprobs import fused_linear_logprobs  # noqa: E402

__all__ = ["FusedDPOTrainer", "FusedHead", "LMHead", "JanusImageHead", "HEADS", "SUPPORTED_LOSS_TYPES"]

SUPPORTED_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})
# config attributes that rescale or cap the logits after the head (TRL's own fused head reads the same ones)
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
# token-statistics pass: rows per vocabulary slab = STATS_SLAB_BYTES / (8·V) (two fp32 [rows, V] buffers: the logits
# and their exponentials), clamped to [16, 4096]: 128 MiB in flight instead of the [tokens, V] logits. Tall slabs
# because at a small H the products need many rows to run at speed (512 rows at bench/bench_trl.py's V = 32,768 ran
# the pass about twice as fast as 128).
STATS_SLAB_BYTES = 128 * 2**20


class FusedHead(abc.ABC):
    """How ``FusedDPOTrainer`` reaches a model's generation head.

    A head says which ``nn.Linear`` is the last layer of the generation head (``linear``), and computes the
    activations entering it at every position of a batch (``hidden_states``), running the model's backbone through
    ``model``'s forward (``model`` may be wrapped, e.g. by DDP; ``unwrapped`` is the model itself). Position t's
    activations score the token at t + 1 (the trainer shifts). ``check`` refuses a model the head cannot serve.
    """

    name = "head"

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming what is unsupported about ``model``; the default serves every model."""
        return None

    @abc.abstractmethod
    def linear(self, model: nn.Module) -> nn.Linear:
        """The last ``nn.Linear`` of ``model``'s generation head (its weight and bias are fused)."""

    @abc.abstractmethod
    def hidden_states(
        self, model: nn.Module, unwrapped: nn.Module, model_kwargs: dict[str, Any], completion_mask: torch.Tensor
    ) -> torch.Tensor:
        """[B, T, H] activations entering ``linear`` at every position of the batch."""


def _no_logits(device: torch.device) -> torch.Tensor:
    """``logits_to_keep`` that selects no position: the model's head runs on a [B, 0, H] slice."""
    return torch.empty(0, dtype=torch.long, device=device)


def _check_forward(model: nn.Module, *names: str) -> None:
    params = inspect.signature(type(model).forward).parameters
    for name in names:
        if name not in params:
            raise ValueError(
                f"model: {type(model).__name__}.forward takes no {name!r} argument, which FusedDPOTrainer needs to "
                "run the backbone without forming logits; pass head= a FusedHead for this model"
            )


class LMHead(FusedHead):
    """The model's ``get_output_embeddings()`` (a causal LM's ``lm_head``): activations = the last hidden state."""

    name = "lm_head"

    def check(self, model: nn.Module) -> None:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"model: get_output_embeddings() is {type(head).__name__}, not an nn.Linear; pass head= a FusedHead"
            )
        _check_forward(model, "logits_to_keep")
        config = model.config.get_text_config()
        for attr in _LOGIT_TRANSFORMS:
            value = getattr(config, attr, None)
            if value is not None and value != 1.0:
                raise ValueError(
                    f"model: config.{attr}={value!r} transforms the logits after the head, which FusedDPOTrainer "
                    "does not implement"
                )

    def linear(self, model: nn.Module) -> nn.Linear:
        return model.get_output_embeddings()

    def hidden_states(self, model, unwrapped, model_kwargs, completion_mask):
        device = completion_mask.device
        out = model(**model_kwargs, logits_to_keep=_no_logits(device), output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1]


class JanusImageHead(FusedHead):
    """``JanusForConditionalGeneration``'s image head ``model.model.generation_head`` (Linear → GELU → Linear).

    Prompt positions are embedded by the text embedding, completion positions (image-codebook ids) by
    ``prepare_embeddings_for_image_generation``; the language model runs through the model's forward; the head's
    first Linear and activation run here and its last Linear (``vision_head``, with bias) is the fused one.
    One process only: under DDP the first Linear would run outside the wrapped forward (refused).
    """

    name = "janus"

    def check(self, model: nn.Module) -> None:
        inner = getattr(model, "model", None)
        head = getattr(getattr(inner, "generation_head", None), "vision_head", None)
        if not isinstance(head, nn.Linear) or not hasattr(model, "prepare_embeddings_for_image_generation"):
            raise ValueError(
                f"model: head='janus' needs a JanusForConditionalGeneration (model.model.generation_head.vision_head "
                f"and prepare_embeddings_for_image_generation), got {type(model).__name__}"
            )
        _check_forward(model, "logits_to_keep", "inputs_embeds")

    def linear(self, model: nn.Module) -> nn.Linear:
        return model.model.generation_head.vision_head

    def hidden_states(self, model, unwrapped, model_kwargs, completion_mask):
        input_ids = model_kwargs["input_ids"]
        image = completion_mask.bool()
        pad = unwrapped.config.get_text_config().pad_token_id or 0
        text_embeds = unwrapped.get_input_embeddings()(input_ids.masked_fill(image, pad))
        image_embeds = unwrapped.prepare_embeddings_for_image_generation(input_ids.masked_fill(~image, 0))
        embeds = torch.where(image.unsqueeze(-1), image_embeds.to(text_embeds.dtype), text_embeds)
        kwargs = {k: v for k, v in model_kwargs.items() if k != "input_ids"}
        out = model(
            **kwargs,
            inputs_embeds=embeds,
            logits_to_keep=_no_logits(input_ids.device),
            output_hidden_states=True,
            use_cache=False,
        )
        head = unwrapped.model.generation_head
        return head.activation_fn(head.proj_out(out.hidden_states[-1]))


HEADS: dict[str, type[FusedHead]] = {"lm_head": LMHead, "janus": JanusImageHead}


def _resolve_head(head: str | FusedHead | None) -> FusedHead:
    if head is None:
        return LMHead()
    if isinstance(head, FusedHead):
        return head
    if isinstance(head, str) and head in HEADS:
        return HEADS[head]()
    raise ValueError(f"head: expected None, one of {tuple(HEADS)} or a FusedHead instance, got {head!r}")


def _refuse_unsupported(args: Any, model: Any, train_dataset: Any, peft_config: Any, quantization_config: Any) -> None:
    """Every DPOConfig option and setup FusedDPOTrainer does not implement, refused by name before any work."""
    problems = []
    if args is not None:
        loss_types = list(args.loss_type)
        unknown = [t for t in loss_types if t not in SUPPORTED_LOSS_TYPES]
        if unknown:
            problems.append(f"loss_type {unknown} (supported: {list(SUPPORTED_LOSS_TYPES)})")
        if "robust" in loss_types and not 0.0 <= args.label_smoothing < 0.5:
            problems.append(f"label_smoothing={args.label_smoothing} with loss_type 'robust' (expected [0, 0.5))")
        if args.ld_alpha is not None:
            problems.append(f"ld_alpha={args.ld_alpha}")
        if args.f_divergence_type != "reverse_kl":
            problems.append(f"f_divergence_type={args.f_divergence_type!r} (only 'reverse_kl')")
        if args.use_weighting:
            problems.append("use_weighting=True")
        if args.use_liger_kernel:
            problems.append("use_liger_kernel=True")
        if args.deepspeed:
            problems.append("deepspeed")
        if args.fsdp:
            problems.append(f"fsdp={args.fsdp!r}")
    if peft_config is not None or (not isinstance(model, str) and is_peft_model(model)):
        problems.append("PEFT (peft_config or a PeftModel)")
    if quantization_config is not None:
        problems.append("quantization_config")
    if train_dataset is not None:
        with contextlib.suppress(Exception):
            sample = next(iter(train_dataset))
            if "image" in sample or "images" in sample:
                problems.append("vision datasets ('image' / 'images' columns)")
    if problems:
        raise ValueError("FusedDPOTrainer does not support: " + "; ".join(problems))


@torch.no_grad()
def token_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    slab_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token entropy, mean logit and "label is the (first) argmax" of ``hidden @ weight.T + bias``, no grad.

    Equivalent to::

        z = (hidden @ weight.T + bias).float()
        (-(z.softmax(-1) * z.log_softmax(-1)).sum(-1), z.mean(-1), z.argmax(-1) == labels)

    hidden [n, H], weight [V, H], bias [V] or None, labels [n] in [0, V). Returns float32 [n], float32 [n], bool [n].
    fp32 math over [rows, V] slabs of at most ``slab_bytes`` (default ``STATS_SLAB_BYTES``; at least 16 rows), so
    memory is O(rows·V), never O(n·V).
    """
    n, V = hidden.shape[0], weight.shape[0]
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
    top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
    w = weight.float()
    b = None if bias is None else bias.float()
    # the mean logit is linear in h: h · mean_v(W_v) + mean_v(b_v), no pass over the vocabulary
    mean = hidden.float() @ w.mean(0)
    if b is not None:
        mean += b.mean()
    if n == 0:
        return entropy, mean, top1
    rows = max(16, min(4096, (slab_bytes or STATS_SLAB_BYTES) // (8 * V), n))  # two slabs: logits and exp
    slab = torch.empty(rows, V, dtype=torch.float32, device=hidden.device)
    exp = torch.empty_like(slab)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        h = hidden[s:e].float()
        z = torch.mm(h, w.t(), out=slab[: e - s]) if b is None else torch.addmm(b, h, w.t(), out=slab[: e - s])
        m, idx = z.max(1)  # first maximal index, as argmax
        torch.eq(idx, labels[s:e], out=top1[s:e])
        z.sub_(m.unsqueeze(1))  # d = z − m
        p = torch.exp(z, out=exp[: e - s])
        total = p.sum(1)
        # entropy = log Σe^d − Σ e^d·d / Σe^d (the row dot products as one batched product)
        entropy[s:e] = torch.log(total) - torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1) / total
    return entropy, mean, top1


class FusedDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose log-probs and loss run through silmm_fast's fused head (logits never materialized).

    Equivalent to ``trl.DPOTrainer(model, ref_model, args, ...)``: the same constructor, ``DPOConfig``, data handling,
    logged metrics and values (to float tolerance, step by step). ``head``: ``None`` (the model's
    ``get_output_embeddings()``), ``"janus"`` (``JanusForConditionalGeneration``'s image head) or a ``FusedHead``.
    ``chunk_bytes``: the most bytes of [rows, V] logits the head may hold at once (``FusedLinearDPOLoss``'s budget,
    and the metrics pass's); None: silmm_fast's defaults. ``token_metrics=False`` skips the metrics that need every
    logit (``entropy``, ``mean_token_accuracy``, ``logits/chosen``, ``logits/rejected``): one no-grad pass over the
    head per step less; the other metrics are unchanged. Options silmm_fast does not implement raise ``ValueError``
    here, naming them (see the module docstring).
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        head: str | FusedHead | None = None,
        chunk_bytes: int | None = None,
        token_metrics: bool = True,
    ) -> None:
        self.fused_head = _resolve_head(head)
        if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                        or chunk_bytes <= 0):  # fmt: skip
            raise ValueError(f"chunk_bytes: expected a positive int (bytes) or None, got {chunk_bytes!r}")
        self.chunk_bytes = chunk_bytes
        if not isinstance(token_metrics, bool):
            raise TypeError(f"token_metrics: expected a bool, got {type(token_metrics).__name__}")
        self.token_metrics = token_metrics
        _refuse_unsupported(args, model, train_dataset, peft_config, quantization_config)
        if not isinstance(model, str):
            self.fused_head.check(model)
        if ref_model is not None:
            self.fused_head.check(ref_model)
        # the reference path (beta plays no part in it); DPOTrainer's constructor may precompute with it
        self._sum_loss = FusedLinearDPOLoss(chunk_bytes=chunk_bytes)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if isinstance(model, str):
            self.fused_head.check(self.model)
        self._fused = self._fused_losses()
        if isinstance(self.fused_head, JanusImageHead) and self.args.world_size > 1:
            # the image head's first Linear runs after the wrapped forward, where DDP's unused-parameter search
            # (which Janus's unused vision tower needs) cannot see it
            raise ValueError("FusedDPOTrainer does not support: head='janus' with several processes (DDP)")
        if self.aux_loss_enabled:
            raise ValueError(
                "FusedDPOTrainer does not support: the MoE router auxiliary loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef}); set router_aux_loss_coef=0.0"
            )

    # --- data -----------------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Pre-tokenized datasets (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) are used as they are (after
        ``DPOTrainer``'s keep_start filter); text datasets go through ``DPOTrainer``'s own preparation."""
        first = next(iter(dataset))
        if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(first):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
        return dataset

    # --- log-probs ------------------------------------------------------------------------------------------------
    def _head_inputs(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
        """``(hidden [2B, T−1, H'], labels [2B, T−1], linear)``: activations entering the head's last Linear at the
        positions that score tokens 1..T−1, labels −100 outside the completions."""
        unwrapped = self.accelerator.unwrap_model(model)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        completion_mask = inputs["completion_mask"]
        hidden = self.fused_head.hidden_states(model, unwrapped, model_kwargs, completion_mask)[:, :-1]
        labels = inputs["input_ids"][:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
        return hidden, labels, self.fused_head.linear(unwrapped)

    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple:
        """Reference ``(chosen [B], rejected [B])`` sequence log-probs of one padded batch, without grad."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.accelerator.autocast(),
        ):
            hidden, labels, linear = self._head_inputs(model, inputs)
            return self._sum_loss.reference_logps(hidden, linear.weight, labels, bias=linear.bias)

    # --- loss -----------------------------------------------------------------------------------------------------
    def _fused_losses(self) -> dict[str, FusedLinearDPOLoss]:
        """One ``FusedLinearDPOLoss`` per configured loss type (sums; IPO on per-token means, as TRL's IPO)."""
        out = {}
        for loss_type in self.loss_types:
            smoothing = self.label_smoothing if loss_type == "robust" else 0.0  # TRL's sigmoid ignores it
            reduction = "mean" if loss_type == "ipo" else "sum"
            out[loss_type] = FusedLinearDPOLoss(
                beta=self.beta,
                loss_type=loss_type,
                label_smoothing=smoothing,
                reduction=reduction,
                chunk_bytes=self.chunk_bytes,
            )
        return out

    def _policy_loss(self, hidden, labels, linear, ref_chosen, ref_rejected, completion_mask):
        """``(chosen_logps [B], rejected_logps [B], loss)``: the policy's sequence log-probs and the weighted loss.

        One loss type: ``FusedLinearDPOLoss`` (gradients formed in the forward). Several: the sequence log-probs from
        ``fused_linear_logprobs`` once, each loss from ``dpo_loss``."""
        beta = self.beta
        lengths = completion_mask.sum(dim=1).clamp(min=1.0)
        if len(self.loss_types) == 1:
            loss_type, weight = self.loss_types[0], self.loss_weights[0]
            # TRL's IPO divides by the completion length; the fused "mean" divides by the scored tokens after the
            # shift: the same count unless a completion starts at position 0 (no prompt token)
            if loss_type != "ipo" or not bool(completion_mask[:, 0].any()):
                fn = self._fused[loss_type]
                if loss_type == "ipo":
                    c_len, r_len = lengths.chunk(2, dim=0)
                    out = fn(hidden, linear.weight, labels, ref_chosen / c_len, ref_rejected / r_len, bias=linear.bias)
                    chosen = (out.chosen_rewards / beta + ref_chosen / c_len) * c_len
                    rejected = (out.rejected_rewards / beta + ref_rejected / r_len) * r_len
                else:
                    out = fn(hidden, linear.weight, labels, ref_chosen, ref_rejected, bias=linear.bias)
                    chosen = out.chosen_rewards / beta + ref_chosen
                    rejected = out.rejected_rewards / beta + ref_rejected
                return chosen, rejected, out.loss * weight
        logps = fused_linear_logprobs(hidden, linear.weight, labels, bias=linear.bias, reduction="sum")
        chosen, rejected = logps.chunk(2, dim=0)
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            fn = self._fused[loss_type]
            if loss_type == "ipo":  # TRL's IPO: log-ratios per completion token
                c_len, r_len = lengths.chunk(2, dim=0)
                args = (chosen / c_len, rejected / r_len, ref_chosen / c_len, ref_rejected / r_len)
            else:
                args = (chosen, rejected, ref_chosen, ref_rejected)
            out = dpo_loss(*args, beta=beta, loss_type=loss_type, label_smoothing=fn.label_smoothing)
            loss = loss + out.loss * weight
        return chosen.detach(), rejected.detach(), loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """DPO loss of one padded batch ([chosen rows, rejected rows]) through the fused head; logs TRL's metrics."""
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        hidden, labels, linear = self._head_inputs(model, inputs)
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        ref_chosen_logps = ref_chosen_logps.to(device=hidden.device, dtype=torch.float32)
        ref_rejected_logps = ref_rejected_logps.to(device=hidden.device, dtype=torch.float32)
        chosen_logps, rejected_logps, loss = self._policy_loss(
            hidden, labels, linear, ref_chosen_logps, ref_rejected_logps, completion_mask
        )

        entropy = mean_logits = is_top1 = None
        if self.token_metrics:  # per-token statistics of the policy (no grad), zero outside the completions
            keep = labels != -100
            entropy_kept, mean_kept, top1_kept = token_statistics(
                hidden.detach()[keep], linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                labels[keep], self.chunk_bytes,
            )  # fmt: skip
            zeros = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
            entropy = zeros.masked_scatter(keep, entropy_kept)
            mean_logits = zeros.masked_scatter(keep, mean_kept)
            is_top1 = torch.zeros_like(keep).masked_scatter(keep, top1_kept)
        self._log_metrics(
            mode, inputs, shift_mask, entropy, mean_logits, is_top1, chosen_logps, rejected_logps,
            ref_chosen_logps, ref_rejected_logps,
        )  # fmt: skip

        if return_outputs:
            warnings.warn(
                "return_outputs=True recomputes the logits with an extra forward pass (as DPOTrainer does).",
                FutureWarning,
                stacklevel=2,
            )
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            with torch.no_grad():
                outputs = model(**model_kwargs, use_cache=False)
            return loss, outputs
        return loss

    def _log_metrics(
        self, mode, inputs, shift_mask, entropy, mean_logits, is_top1, chosen_logps, rejected_logps, ref_chosen,
        ref_rejected,
    ) -> None:  # fmt: skip
        """The metrics ``DPOTrainer`` logs, with its names, reductions and cross-process gathers."""
        gather, gather_m = self.accelerator.gather, self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        if entropy is not None:
            entropy_sum = gather_m((entropy * shift_mask).sum()).sum()
            total_tokens = gather_m(shift_mask.sum()).sum()
            metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)
        if mode == "train":
            num_tokens = gather_m(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        if mean_logits is not None:
            chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
            chosen_mean, rejected_mean = mean_logits.chunk(2, dim=0)
            sides = (("chosen", chosen_mean, chosen_mask), ("rejected", rejected_mean, rejected_mask))
            for name, values, mask in sides:
                total = gather_m(values[mask.bool()].sum()).sum().item()
                count = gather_m(mask.sum()).sum().item()
                metrics[f"logits/{name}"].append(total / count if count > 0 else 0.0)
            chosen_top1, _ = is_top1.chunk(2, dim=0)
            correct = gather_m((chosen_top1 & chosen_mask.bool()).sum())
            counted = gather_m(chosen_mask.sum()).sum()
            metrics["mean_token_accuracy"].append((correct.sum() / counted).item() if counted > 0 else 0.0)

        chosen_rewards = self.beta * (chosen_logps - ref_chosen).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected).detach()
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
