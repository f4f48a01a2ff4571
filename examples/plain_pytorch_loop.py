"""Distil from a loca-pipe token store in a plain PyTorch loop: the store as a Dataset, LoCa-calibrated
soft labels at τ = 2, the project's chunked KD loss (+ 0.1 · CE).

    python examples/plain_pytorch_loop.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from loca_pipe.pipeline.lm import models
from loca_pipe.pipeline.lm.dataset import BlockShuffleSampler, Collator, TokenStoreDataset, kd_target
from loca_pipe.pipeline.lm.vocab_losses import chunked_kd_loss

sys.path.insert(0, str(Path(__file__).parent))
from tiny_store import tiny_store  # noqa: E402

TAU, ALPHA = 2.0, 0.9


def main(workdir: Path) -> None:
    torch.manual_seed(0)
    store, enc, tok = tiny_store(workdir)
    ds = TokenStoreDataset(store, enc, tau=TAU, alpha=ALPHA)       # one item = one sequence
    sampler = BlockShuffleSampler(ds, window_blocks=2, seed=0)     # each store block decoded once an epoch
    loader = DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=Collator(tok.pad_token_id))
    student = models.build_lm("llama", ds.num_classes, 32, 1, 2, 64, tok, seed=1)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-3)
    losses = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for batch in loader:
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = chunked_kd_loss(logits[batch["teacher_mask"]], kd_target(batch, gamma=0.1), TAU)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    print(f"steps {len(losses)} loss first {losses[0]:.4f} last {sum(losses[-3:]) / 3:.4f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
