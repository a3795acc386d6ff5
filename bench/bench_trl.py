"""Benchmark ``FusedDPOTrainer`` against stock ``trl.DPOTrainer``: time per optimizer step and peak memory.

The model is a small random Llama whose head dominates the step (default V = 32,768, H = 256, 2 layers) trained on
random preference rows with 512-token completions (a word-level tokenizer and a ``datasets.Dataset`` built in
code), fp32, a separate reference model (``precompute_ref_log_probs`` off). Each provider runs in its own process:
one warm-up step, then ``--steps`` timed steps (a ``TrainerCallback`` times step begin → step end: forward,
backward and the optimizer). Memory is the process's resident-set peak over the timed steps above its resident set
after the warm-up (glibc heap trimmed, peak reset through ``/proc/self/clear_refs``), i.e. what a step adds on top
of the model, optimizer state and data.

Providers: ``stock`` (``trl.DPOTrainer``: TRL's chunked log-prob head), ``fused`` (``FusedDPOTrainer``, every metric
``DPOTrainer`` logs), ``fused-lean`` (``FusedDPOTrainer(token_metrics=False)``: no entropy / token accuracy / mean
logits, one head pass less), and
``liger`` (``DPOConfig(use_liger_kernel=True)``; TRL 1.x applies only Liger's layer kernels there, Triton: CUDA only).
Providers run interleaved for ``--rounds`` rounds; the summary compares the medians over every timed step (wall clock
and process CPU time: on a shared machine the CPU time is the steadier figure), and rows record every step.

    python bench/bench_trl.py [--steps 4] [--vocab 32768] [--hidden 256] [--completion 512] [--providers stock fused]

Rows are appended to ``bench/results/trl-<device>.jsonl``; the summary prints the fused/stock ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROVIDERS = ("stock", "fused", "fused-lean", "liger")


def _tokenizer(vocab: int):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(("<pad>", "<unk>", "<bos>", "<eos>"))}
    for i in range(len(words), vocab):
        words[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+"), behavior="removed")
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _dataset(rows: int, vocab: int, prompt: int, completion: int, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(n))

    # completions one token short of the target: the trainer appends EOS
    return Dataset.from_dict(
        {
            "prompt": [text(prompt) for _ in range(rows)],
            "chosen": [" " + text(completion - 1) for _ in range(rows)],
            "rejected": [" " + text(completion - 1) for _ in range(rows)],
        }
    )


def worker(args: argparse.Namespace) -> dict:
    """Train ``args.worker`` for 1 + ``args.steps`` optimizer steps in this process; return the measurements."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bench.common import _reset_peak_rss, _rss_bytes, environment, trim_heap

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * (args.prompt + args.completion),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model, ref_model = LlamaForCausalLM(config), LlamaForCausalLM(config)
    ref_model.load_state_dict(model.state_dict())
    tokenizer = _tokenizer(args.vocab)
    steps = 1 + args.steps
    data = _dataset(steps * args.batch, args.vocab, args.prompt, args.completion)
    dpo_args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        per_device_train_batch_size=args.batch,
        max_steps=steps,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        use_liger_kernel=args.worker == "liger",
        seed=0,
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.cpu_times, self.start, self.cpu_start, self.base_rss = [], [], 0.0, 0.0, 0

        def on_step_begin(self, *_, **__):
            if len(self.times) == 1:  # after the warm-up step: measure from the resident state it left
                trim_heap()
                self.base_rss = _rss_bytes("VmRSS")
                _reset_peak_rss()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            self.cpu_times.append(time.process_time() - self.cpu_start)

    cls, extra = DPOTrainer, {}
    if args.worker.startswith("fused"):
        from silmm_fast.integrations.trl import FusedDPOTrainer as cls

        extra = {"token_metrics": args.worker == "fused"}
    clock = Clock()
    trainer = cls(
        model,
        ref_model=ref_model,
        args=dpo_args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[clock],
        **extra,
    )
    trainer.train()
    peak = _rss_bytes("VmHWM")
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    timed, cpu = clock.times[1:], clock.cpu_times[1:]
    return {
        **environment(torch.device(args.device)),
        "op": "dpo_trainer_step",
        "provider": args.worker,
        "shape": {
            "V": args.vocab,
            "H": args.hidden,
            "layers": args.layers,
            "pairs": args.batch,
            "prompt": args.prompt,
            "completion": args.completion,
        },
        "dtype": "float32",
        "steps": len(timed),
        "step_ms_median": round(1000 * statistics.median(timed), 1),
        "step_ms_min": round(1000 * min(timed), 1),
        "step_ms_all": [round(1000 * t, 1) for t in timed],
        "step_cpu_ms_median": round(1000 * statistics.median(cpu), 1),
        "step_cpu_ms_all": [round(1000 * t, 1) for t in cpu],
        "peak_step_mem_bytes": max(0, peak - clock.base_rss),
        "peak_rss_bytes": peak,
        "losses": losses,
        "trl": __import__("trl").__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--providers", nargs="+", default=["stock", "fused", "fused-lean", "liger"], choices=PROVIDERS, help="what runs"
    )
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps after one warm-up (default 4)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size V (default 32768)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H (default 256)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--batch", type=int, default=2, help="preference pairs per step (default 2)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--completion", type=int, default=512, help="completion tokens, EOS included (default 512)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per provider, interleaved (default 2)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the JSON lines go")
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    rows = []
    skip = {"providers", "worker", "results", "rounds"}
    for round_ in range(args.rounds):
        for provider in args.providers:
            if provider == "liger" and args.device != "cuda":
                if round_ == 0:
                    print("liger: skipped (Liger's DPO path runs Triton kernels: CUDA only)")
                continue
            cmd = [sys.executable, __file__, "--worker", provider]
            cmd += [f"--{k}={v}" for k, v in vars(args).items() if k not in skip]
            env = dict(os.environ, TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{provider}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            row = json.loads(lines[-1][len("RESULT ") :])
            row["round"] = round_
            rows.append(row)
            ms, cpu, load = row["step_ms_median"], row["step_cpu_ms_median"], row["load_average_1min"]
            mib = row["peak_step_mem_bytes"] / 2**20
            print(f"{provider:6s} step {ms:9.1f} ms (CPU {cpu:9.1f} ms)  step peak {mib:8.1f} MiB  (load {load})")
    if not rows:
        return 1
    from bench.common import write_rows

    path = write_rows(rows, f"trl-{args.device}", Path(args.results))

    def median(provider: str, key: str) -> float | None:
        values = [v for r in rows if r["provider"] == provider for v in r[key]]
        return statistics.median(values) if values else None

    stock_ms, stock_cpu = median("stock", "step_ms_all"), median("stock", "step_cpu_ms_all")
    stock_mem = max((r["peak_step_mem_bytes"] for r in rows if r["provider"] == "stock"), default=0)
    for provider in ("fused", "fused-lean"):
        ms, cpu = median(provider, "step_ms_all"), median(provider, "step_cpu_ms_all")
        if stock_ms and ms:
            mem = max(r["peak_step_mem_bytes"] for r in rows if r["provider"] == provider) / max(1, stock_mem)
            print(
                f"{provider} vs stock (median of all timed steps): {stock_ms / ms:.2f}x faster per optimizer step "
                f"(CPU time {stock_cpu / cpu:.2f}x), {mem:.2f}x the step's peak memory"
            )
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
