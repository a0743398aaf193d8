"""A server and two edge daemons on loopback; a job submitted, watched and exported over gRPC.

The rows count up by one from different starts; the tiny random model's loss on them falls a little
over 20 steps — this example shows the plumbing (processes, streams, export), not a useful model.

    python examples/service.py               # tiny random Llama
"""
from colaflow import JobSpec, LowRank
from colaflow.local import LocalCluster


def main() -> None:
    examples = [{"input_ids": [(7 * i + j) % 90 + 1 for j in range(12)]} for i in range(32)]
    with LocalCluster("tiny-llama", workers=2) as cluster:
        c = cluster.client
        c.submit(JobSpec("demo", LowRank(r=4), codec_g="bf16"), examples, steps=20, batch_size=8)
        for m in c.metrics("demo"):
            print(f"step {m['step']:3d}  loss {m['loss']:.4f}  staleness {m['staleness']}")
        print(c.get("demo").state, "->", c.export("demo", "colaflow-out/service-demo"))


if __name__ == "__main__":
    main()
