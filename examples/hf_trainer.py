"""Distil from a loca-pipe token store with Hugging Face `Trainer`: the store as the train dataset, a
`compute_loss` that uses the project's vocabulary-scale KD loss on LoCa-calibrated soft labels.

`remove_unused_columns=False` keeps the teacher columns the collator adds (Trainer otherwise drops every
column the model's forward does not name). The sampler is overridden with the block-shuffled one, so each
store block is decoded once an epoch (memory: the dataset's `cache_blocks` decoded blocks).

    python examples/hf_trainer.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from loca_pipe.pipeline.lm import models
from loca_pipe.pipeline.lm.dataset import BlockShuffleSampler, Collator, TokenStoreDataset, kd_target
from loca_pipe.pipeline.lm.vocab_losses import chunked_kd_loss

sys.path.insert(0, str(Path(__file__).parent))
from tiny_store import tiny_store  # noqa: E402

TAU, ALPHA = 2.0, 0.9


class DistillTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = chunked_kd_loss(out.logits[inputs["teacher_mask"]], kd_target(inputs, gamma=0.1), TAU)
        return (loss, out) if return_outputs else loss

    def _get_train_sampler(self, *args, **kwargs):
        return BlockShuffleSampler(self.train_dataset, window_blocks=2, seed=self.args.seed)


def main(workdir: Path) -> None:
    store, enc, tok = tiny_store(workdir)
    ds = TokenStoreDataset(store, enc, tau=TAU, alpha=ALPHA)
    student = models.build_lm("llama", ds.num_classes, 32, 1, 2, 64, tok, seed=1)
    args = TrainingArguments(output_dir=str(workdir / "student"), per_device_train_batch_size=8, num_train_epochs=4,
                             learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[],
                             remove_unused_columns=False, use_cpu=True, seed=0, disable_tqdm=True)
    trainer = DistillTrainer(model=student, args=args, train_dataset=ds, data_collator=Collator(tok.pad_token_id))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"steps {len(losses)} loss first {losses[0]:.4f} last {sum(losses[-3:]) / 3:.4f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
