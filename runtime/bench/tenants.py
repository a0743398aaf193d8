"""`colaflow bench tenants`: K tenants, each with its own low-rank adapter, on one server.

colaflow: one mixed batch per step (one 128-token row per tenant, each row through its own
tenant's adapter). PEFT refuses mixed-adapter batches in training, so its side is K sequential
steps with `set_adapter`, each with that tenant's AdamW. Tokens/s, peak memory and the bytes the
server holds per tenant, both sides measured in the same run, alternating; medians.
The frozen model alone, one row at a time against micro-batches of the host's `mix_rows`, gives
the most that batching can give on this hardware ("batching_ceiling").
Last line: {"throughput_ratio", "mem_ratio", "state_per_tenant_ratio"} (colaflow over PEFT), ...
"""
from __future__ import annotations

import argparse
import copy

import torch

from .common import (
    alternate,
    load_model,
    measure_in_subprocess,
    mem_side_main,
    mib,
    peak_during,
    report,
    synced,
    token_batch,
)

MODULE = "colaflow.bench.tenants"
K, TOKENS = 16, 128


def _rows(vocab: int, device: str = "cpu") -> dict:
    return {k: v.to(device) for k, v in token_batch(vocab, K, TOKENS, seed=1).items()}


def _colaflow(model, fits: bool = False, device: str = "cpu", mix_rows: int | None = None):
    from colaflow import JobSpec, LowRank, Trainer

    trainer = Trainer(model, [JobSpec(f"t{k}", LowRank(r=8, alpha=8), seed=k) for k in range(K)])
    if mix_rows is not None:
        trainer.host.mix_rows = mix_rows
    for job in trainer.host.jobs.values():
        for a in job.adapters.values():
            a.B.data.normal_(0, 0.01)
    batch = _rows(model.config.vocab_size, device)
    mixed = batch | {"jobs": [f"t{k}" for k in range(K)]}
    parts = {f"t{k}": {n: v[k:k + 1] for n, v in batch.items()} for k in range(K)}

    def server_step():  # packets go to a sink, as they leave a server once sent
        trainer.host.step(mixed, emit=lambda group: None)

    def with_fits():  # the in-process loop: server step + all 16 x 60 device fits on this machine
        trainer.step(parts)
    held = sum(p.numel() * p.element_size() for j in trainer.host.jobs.values()
               for a in j.adapters.values() for p in a.parameters()) / K
    return synced(with_fits if fits else server_step, device), held


def _peft(model, device: str = "cpu"):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = get_peft_model(model, cfg, adapter_name="t0")
    for k in range(1, K):
        pm.add_adapter(f"t{k}", cfg)
    batch = _rows(model.config.vocab_size, device)
    opts = {}
    for k in range(K):
        pm.set_adapter(f"t{k}")
        opts[k] = torch.optim.AdamW([p for n, p in pm.named_parameters() if f".t{k}." in n], lr=3e-4)

    def sequential():
        for k in range(K):
            pm.set_adapter(f"t{k}")
            row = {n: v[k:k + 1] for n, v in batch.items()}
            pm(**row).loss.backward()  # HF's own causal-LM loss, as a PEFT user trains
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)

    def held() -> float:  # parameters + the gradients each step allocates + AdamW moments
        total = 0
        for k in range(K):
            for p in opts[k].param_groups[0]["params"]:
                total += 2 * p.numel() * p.element_size()
                total += sum(t.numel() * t.element_size() for t in opts[k].state[p].values()
                             if isinstance(t, torch.Tensor))
        return total / K
    return synced(sequential, device), held


def _frozen(model, rows_per_call: int, device: str = "cpu"):
    """The frozen model alone, forward and backward to its input embeddings, `rows_per_call` rows
    at a time: the compute any adapter trainer must do. One row at a time against micro-batches
    is what batching can give on this hardware, adapters aside."""
    for p in model.parameters():
        p.requires_grad_(False)
    batch, emb = _rows(model.config.vocab_size, device), model.get_input_embeddings()

    def run():
        for s in range(0, K, rows_per_call):
            rows = {n: v[s:s + rows_per_call] for n, v in batch.items()}
            e = emb(rows.pop("input_ids")).requires_grad_(True)
            model(inputs_embeds=e, **rows).loss.backward()
    return synced(run, device)


def main(args: argparse.Namespace) -> int:
    from colaflow.engine.host import MIX_ROWS
    from colaflow.wire.channel import tune_allocator

    tune_allocator()  # both sides time under the allocator `colaflow serve` runs with
    torch.manual_seed(0)
    model = load_model(args.model, args.device)
    cola, cola_held = _colaflow(copy.deepcopy(model), device=args.device)
    cola_fits, _ = _colaflow(copy.deepcopy(model), fits=True, device=args.device)
    peft, peft_held = _peft(model, args.device)
    print(f"tenants: {args.model} on {args.device}, K={K} tenants x 1 row x {TOKENS} tokens per step, lowrank r=8 on "
          f"q_proj,v_proj, {torch.get_num_threads()} threads, {args.repeats} alternating rounds", flush=True)
    frozen = copy.deepcopy(model)
    mix_rows = MIX_ROWS
    sides = {"colaflow": cola, "peft": peft, "colaflow+fits": cola_fits,
             "frozen, 1 row": _frozen(frozen, 1, args.device),
             f"frozen, {mix_rows} rows": _frozen(frozen, mix_rows, args.device)}
    t = alternate(sides, args.repeats)
    tps = {k: K * TOKENS / v for k, v in t.items()}
    for k in t:
        print(f"  {k:14s} {t[k] * 1000:8.0f} ms per {K * TOKENS} tokens   {tps[k]:7.0f} tokens/s")
    held = {"colaflow": cola_held, "peft": peft_held()}
    for k, v in held.items():
        print(f"  server-held per tenant  {k:9s} {v / 1024:8.1f} KiB")
    mem = {s: measure_in_subprocess(MODULE, s, ["--model", args.model, "--device", args.device])["peak"]
           for s in ("colaflow", "peft")}
    for k, v in mem.items():
        print(f"  peak  {k:9s} {mib(v)} above the loaded model (fresh process, 2 rounds)")
    report({"throughput_ratio": round(tps["colaflow"] / tps["peft"], 3),
            "mem_ratio": round(mem["colaflow"] / mem["peft"], 3),
            "state_per_tenant_ratio": round(held["colaflow"] / held["peft"], 3),
            "throughput_ratio_with_inprocess_fits": round(tps["colaflow+fits"] / tps["peft"], 3),
            "batching_ceiling": round(t["frozen, 1 row"] / t[f"frozen, {mix_rows} rows"], 3)})
    return 0


def _mem_side(side: str, model_name: str, device: str) -> None:
    model = load_model(model_name, device)
    step = _colaflow(model, device=device)[0] if side == "colaflow" else _peft(model, device)[0]

    def two_rounds():
        step()
        step()
    report({"side": side, "peak": peak_during(two_rounds, device)})


if __name__ == "__main__":
    mem_side_main(_mem_side)
