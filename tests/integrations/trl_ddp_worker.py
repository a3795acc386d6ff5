"""What tests/integrations/test_trl.py launches under torchrun: FusedDPOTrainer on the tiny fixtures, the global
batch split over the processes; rank r writes its final weights and the logged metrics to OUT/rank{r}.pt.

    python -m torch.distributed.run --nproc_per_node N tests/integrations/trl_ddp_worker.py OUT PER_DEVICE_BATCH
"""

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_preference

from tiny_preference import dpo_config, preference_dataset, tiny_llama, word_tokenizer  # noqa: E402

from silmm_fast.integrations.trl import FusedDPOTrainer  # noqa: E402


def train(out: str, per_device: int) -> None:
    """Train and write ``OUT/rank{RANK}.pt`` (also called in-process by the test, for the one-process run)."""
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer))
    args = dpo_config(
        Path(out) / "trainer",
        per_device_train_batch_size=per_device,
        max_steps=3,
        optim="sgd",
        learning_rate=0.5,
        gradient_checkpointing=False,
    )
    # an explicit reference model (precomputing would share a datasets cache file between the processes, which an
    # in-memory dataset keeps in a per-process temporary folder)
    trainer = FusedDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=preference_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    rows = [row for row in trainer.state.log_history if "loss" in row]
    torch.save({"weights": model.state_dict(), "rows": rows}, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(sys.argv[1], int(sys.argv[2]))
