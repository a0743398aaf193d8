"""The CUDA path (skipped without a GPU; `benchmarks/gpu.sh` runs it): packets leave the device through
pinned host buffers while the backward runs, and a CUDA server trains as PEFT does on the same GPU."""
from __future__ import annotations

import pytest
import torch
from conftest import PeftReference, batch_stream, random_batch, rel_err

from colaflow import AdamW, JobSpec, LowRank, Trainer
from colaflow.engine.host import Host
from colaflow.models import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _host(device: str) -> Host:
    host = Host(tiny("llama").to(device))
    host.add_job(JobSpec("a", LowRank(r=4)))
    for a in host.jobs["a"].adapters.values():
        g = torch.Generator().manual_seed(1)
        a.B.data.copy_(torch.randn(a.B.shape, generator=g) * 0.1)
    return host


def test_cuda_packets_stream_through_pinned_memory_and_match_the_cpu():
    batch = random_batch(96, 3, 10, 0) | {"jobs": ["a"] * 3}
    gpu, cpu = _host("cuda"), _host("cpu")
    collected = {p.site: p for p in gpu.step(batch).packets}
    streamed = []
    gpu.step(batch, emit=streamed.extend)
    on_cpu = {p.site: p for p in cpu.step(batch).packets}
    assert len(streamed) == len(collected) == len(on_cpu) > 0
    for p in streamed:
        assert p.x.device.type == "cpu" and p.g.device.type == "cpu"
        assert torch.equal(p.g, collected[p.site].g) and torch.equal(p.x, collected[p.site].x)
        assert p.g.shape == on_cpu[p.site].g.shape  # the same tokens cut
        assert rel_err(p.g, on_cpu[p.site].g) < 1e-4 and rel_err(p.x, on_cpu[p.site].x) < 1e-4


def test_a_cuda_server_trains_as_peft_does_on_the_same_gpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny("llama").cuda()
    spec = JobSpec("j", LowRank(r=8, alpha=16), AdamW(lr=1e-2))
    trainer = Trainer(model, [spec])
    ref = PeftReference(model, trainer, "j", spec.adapter, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0))
    for b in batch_stream(96, 4, 12, seed=1, steps=10):
        trainer.step({"j": b})
        ref.step([{k: v.cuda() for k, v in b.items()}])
    for site, adapter in trainer.adapters("j").items():
        want = ref.params(site)
        assert want["B"].abs().max() > 0
        assert rel_err(adapter.B.detach(), want["B"].cpu()) < 1e-4
