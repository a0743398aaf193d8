"""The main job — invented facts taught to SmolLM2-135M — on a Ray cluster: the server in an actor
on the GPU (or `server`) node, one worker actor per `edge` node.

    python examples/ray_cluster.py                      # a local Ray instance with 2 worker actors
    python examples/ray_cluster.py --address auto       # on the head node of a `ray up` cluster
                                                        # (examples/ray/README.md walks through it)
"""
import argparse

import colaflow
from colaflow.adapters.merge import merged
from colaflow.export import load
from colaflow.models import load as load_model
from colaflow.studies.tasks.knowledge import eval_pairs, exact_match, make_facts, train_examples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="a Ray cluster (`auto` on its head node); default: a local Ray instance")
    p.add_argument("--workers", default="2", help="worker actors: a count, or all-edge-nodes")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--facts", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--insecure", action="store_true",
                   help="a cluster on a private network: let the server listen on the node's address without "
                        "TLS and tokens")
    args = p.parse_args()

    model, tokenizer = load_model(args.model)
    facts = make_facts(args.facts)
    examples = [{k: v.tolist() for k, v in e.items() if k != "attention_mask"}
                for e in train_examples(tokenizer, facts)]
    workers = args.workers if args.workers == "all-edge-nodes" else int(args.workers)
    server_args = ("--insecure",) if args.insecure else ()
    with colaflow.Session(args.model, ray=args.address or True, workers=workers, server_args=server_args) as session:
        print(f"server {session.ray.address}; worker actors: {[w['worker'] for w in session.ray.pool.info()]}")
        job = session.submit(examples, steps=args.steps, batch_size=min(8, len(examples)),
                             adapter=colaflow.LowRank(r=8, alpha=16),
                             optimizer=colaflow.AdamW(lr=3e-3, schedule=colaflow.Schedule("linear", args.steps // 10,
                                                                                          args.steps)))
        status = job.wait()
        print(f"{job.id}: {status['state']} after {status['step']} steps, loss {status['loss']:.3f}")
        peft_dir = job.export("colaflow-out/ray-knowledge-peft")
        _, adapters = load(job.export("colaflow-out/ray-knowledge", format="native"))
    with merged(model, adapters):
        em = exact_match(model, tokenizer, eval_pairs(facts, held_out=True))
    print(f"held-out exact match {em:.1%}; PEFT adapter in {peft_dir}")


if __name__ == "__main__":
    main()
