"""`colaflow bench link`: the main job over shaped links, for every codec and staleness.

A server and 2 edge daemons on loopback; the daemons reach the server through `Shaper` (1 Gbit/s
and 100 Mbit/s, 20 ms round trip). On the 1 Gbit/s link every codec trains the main job
(invented facts into SmolLM2-135M) to the end and is scored by held-out exact match; S = 1 and
S = 2 too (the quality cost of staleness); and S = 0 / S = 1 once more on a server started with
`--no-layered` (each step waits for every site: the old schedule). On 100 Mbit/s each codec runs
a short job for its time per step. Bytes per step are the server's packet bytes sent, over a
naive fp32 wire (every site's x and g, all tokens, no sharing) for the same batches.
Projected packets (`packets="projected"`: each site's low-rank statistics instead of x and g) train
the main job raw on 1 Gbit/s and time short runs beside raw full packets on 100 Mbit/s and 10 Mbit/s
(each daemon has a link of its own, and packets stream during the backward: a link costs time only
where sending a step's packets takes longer than the server's step — on 2 CPU cores SmolLM2's step
takes about as long as its full packets at 100 Mbit/s; on a GPU server, or at 10 Mbit/s, the link
sets the pace). Last line: {"default_codec", "bytes_vs_fp32", "em_gap_vs_raw", "s0_vs_s1_time",
"projected_bytes_vs_fp32", "projected_em_gap_vs_raw", "projected_vs_full_time_100mbit",
"projected_vs_full_time_10mbit", ...}; the default is the codec with the
fewest bytes whose exact match is within 1 point of raw. `--quick`: raw and projected only (~15 min
on 2 cores); `--shape NAME|config.json`: the byte model at a model's true widths (bench/bytemodel.py).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .common import report
from .e2e import BATCH, FACTS, STEPS, _exact_match, _settle, _spec
from .shaper import Shaper

LINKS = {"1gbit": (1000, 20), "100mbit": (100, 20), "10mbit": (10, 20)}
CODECS = {"raw": ("raw", "raw"), "bf16": ("bf16", "bf16"), "fp16": ("fp16", "fp16"), "int8": ("int8", "int8"),
          "int8x-int4g": ("int8", "int4"), "int4": ("int4", "int4")}
SHORT = 12  # steps of the timing-only runs (at most --steps)
SLOW = 8  # steps of the 10 Mbit/s runs (full packets take seconds a step there)


def _naive_fp32_bytes(model, examples, steps: int) -> float:
    """Bytes per step of a wire that sends every site's x and g in fp32, all tokens, no sharing."""
    from colaflow.data.batches import from_map, to_map
    from colaflow.sites import find_sites

    width = sum(s.in_features + s.out_features for s in find_sites(model, _spec()["targets"]))
    batches = from_map(to_map(examples, BATCH, 0))
    total = 0
    for _ in range(steps):
        ids = next(batches)["input_ids"]
        total += ids.shape[0] * ids.shape[1] * width * 4
    return total / steps


def _job(session, examples, name: str, steps: int, codec: str, staleness: int = 0, packets: str = "full") -> dict:
    kw = _spec() | {"steps": steps, "packets": packets}
    if steps != kw["optimizer"].schedule.total:  # a short run keeps the full run's schedule shape
        from colaflow import AdamW, Schedule
        kw["optimizer"] = AdamW(lr=kw["optimizer"].lr,
                                schedule=Schedule("linear", warmup=max(1, steps // 10), total=steps))
    cx, cg = CODECS[codec]
    job = session.submit(examples, job_id=name, codec_x=cx, codec_g=cg, staleness=staleness, **kw)
    job.wait(timeout=7200, progress=False)
    m = job.metrics()
    per_step = (m[-1]["time"] - m[1]["time"]) / (len(m) - 2)  # step 0 includes the assignment
    return {"job": job, "s_per_step": per_step, "bytes_per_step": m[-1]["bytes_sent"] / len(m)}


def main(args: argparse.Namespace) -> int:
    if args.shape:
        from .bytemodel import main as bytes_main

        return bytes_main(args)
    from colaflow import Session
    from colaflow.local import LocalCluster
    from colaflow.models import load
    from colaflow.studies.tasks.knowledge import eval_pairs, make_facts, train_examples

    model, tokenizer = load(args.model)
    facts = make_facts(FACTS, seed=0)
    examples = [{k: v.tolist() for k, v in e.items() if k != "attention_mask"}
                for e in train_examples(tokenizer, facts)]
    held_out = eval_pairs(facts, held_out=True)
    steps = args.steps or STEPS
    short = min(SHORT, steps)
    naive = _naive_fp32_bytes(model, examples, steps)
    work = Path(tempfile.mkdtemp(prefix="colaflow-link-"))
    quick = getattr(args, "quick", False)
    codecs = args.codecs or (["raw"] if quick else list(CODECS))
    print(f"link: {args.model} (server on {args.device}), 2 edge daemons behind a shaped link, "
          f"{steps} steps of {BATCH} (timing runs: "
          f"{short}); naive fp32 wire {naive / 2**20:.1f} MiB/step; {work}", flush=True)
    rows: dict[str, dict] = {}

    def cluster(mbit: float, rtt: float, *server_args: str):
        shapers = []

        def via(address: str) -> str:
            shapers.append(Shaper(address, mbit, rtt))
            return shapers[-1].address
        return LocalCluster(args.model, workers=2, server_threads=args.server_threads, edge_threads=1,
                            server_args=("--device", args.device, *server_args), edge_via=via,
                            workdir=work / f"{mbit}-{len(rows)}")

    def show(key: str, r: dict, em: float | None) -> None:
        rows[key] = {"s_per_step": round(r["s_per_step"], 3), "mib_per_step": round(r["bytes_per_step"] / 2**20, 2),
                     "bytes_vs_fp32": round(r["bytes_per_step"] / naive, 3),
                     "exact_match": None if em is None else round(100 * em, 1)}
        em_s = "" if em is None else f"   exact match {100 * em:5.1f}%"
        print(f"  {key:28s} {r['s_per_step'] * 1000:7.0f} ms/step  {r['bytes_per_step'] / 2**20:7.2f} MiB/step "
              f"({rows[key]['bytes_vs_fp32']:.3f} of fp32){em_s}", flush=True)

    def score(r: dict, name: str) -> float:
        return _exact_match(model, tokenizer, r["job"].export(work / name, format="native"), held_out)

    with cluster(*LINKS["1gbit"]) as c:
        _settle()
        with Session(address=c.address) as s:
            for codec in codecs:
                r = _job(s, examples, f"1g-{codec}", steps, codec)
                show(f"1gbit {codec} S=0", r, score(r, f"1g-{codec}"))
            r = _job(s, examples, "1g-projected", steps, "raw", packets="projected")
            show("1gbit raw S=0 projected", r, score(r, "1g-projected"))
            best = _default(rows, codecs)
            for S in () if quick else (1, 2):
                r = _job(s, examples, f"1g-{best}-s{S}", steps, best, staleness=S)
                show(f"1gbit {best} S={S}", r, score(r, f"1g-{best}-s{S}"))
    if not quick:
        with cluster(*LINKS["1gbit"], "--no-layered") as c:
            _settle()
            with Session(address=c.address) as s:
                for S in (0, 1):
                    show(f"1gbit {best} S={S} no-layered", _job(s, examples, f"nl-{best}-s{S}", short, best, S), None)
    with cluster(*LINKS["100mbit"]) as c:
        _settle()
        with Session(address=c.address) as s:
            for codec in codecs:
                show(f"100mbit {codec} S=0", _job(s, examples, f"100m-{codec}", short, codec), None)
            show("100mbit raw S=0 projected", _job(s, examples, "100m-projected", short, "raw", packets="projected"),
                 None)
            if not quick:
                show(f"100mbit {best} S=1", _job(s, examples, f"100m-{best}-s1", short, best, 1), None)
    with cluster(*LINKS["10mbit"]) as c:  # where the link, not the server's step, sets the pace
        _settle()
        with Session(address=c.address) as s:
            slow = min(SLOW, short)
            show("10mbit raw S=0", _job(s, examples, "10m-raw", slow, "raw"), None)
            show("10mbit raw S=0 projected", _job(s, examples, "10m-projected", slow, "raw", packets="projected"), None)
    d, proj = rows[f"1gbit {best} S=0"], rows["1gbit raw S=0 projected"]

    def ratio(a: str, b: str, key: str = "s_per_step") -> float | None:
        return round(rows[a][key] / rows[b][key], 3) if a in rows and b in rows else None
    raw_em = rows["1gbit raw S=0"]["exact_match"] if "raw" in codecs else None
    report({"default_codec": best, "bytes_vs_fp32": d["bytes_vs_fp32"],
            "em_gap_vs_raw": round(raw_em - d["exact_match"], 1) if raw_em is not None else None,
            "s0_vs_s1_time": ratio(f"1gbit {best} S=0", f"1gbit {best} S=1"),
            "s0_vs_s1_time_no_layered": ratio(f"1gbit {best} S=0 no-layered", f"1gbit {best} S=1 no-layered"),
            "s0_vs_s1_time_100mbit": ratio(f"100mbit {best} S=0", f"100mbit {best} S=1"),
            "em_s1_gap": round(d["exact_match"] - rows[f"1gbit {best} S=1"]["exact_match"], 1) if not quick else None,
            "em_s2_gap": round(d["exact_match"] - rows[f"1gbit {best} S=2"]["exact_match"], 1) if not quick else None,
            "projected_bytes_vs_fp32": proj["bytes_vs_fp32"],
            "projected_em_gap_vs_raw": round(raw_em - proj["exact_match"], 1) if raw_em is not None else None,
            "projected_vs_full_time_100mbit": ratio("100mbit raw S=0 projected", "100mbit raw S=0"),
            "projected_vs_full_time_10mbit": ratio("10mbit raw S=0 projected", "10mbit raw S=0"),
            "runs": rows})
    return 0


def _default(rows: dict, codecs: list[str]) -> str:
    """The codec with the fewest bytes whose exact match is within 1 point of raw's."""
    raw = rows.get("1gbit raw S=0", {}).get("exact_match")
    ok = [c for c in codecs if raw is None or rows[f"1gbit {c} S=0"]["exact_match"] >= raw - 1.0]
    return min(ok, key=lambda c: rows[f"1gbit {c} S=0"]["bytes_vs_fp32"])
