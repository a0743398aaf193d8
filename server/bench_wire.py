"""`colaflow bench wire`: packets of SmolLM2's shape through the real gRPC server/worker path (it
lives with the service it measures; `colaflow.cli.bench` names it).

One step's packets for one worker (q_proj and v_proj of 30 layers, 8 x 128 tokens, the shared
input sent once) go out through `WorkerService.Work` exactly as in a run — serde, codec, 4 MiB
chunks, credits — to a client that reassembles and decodes them as the edge daemon does. The
same bytes also cross a raw TCP socket on loopback in the same run (the physical limit here),
bare sync gRPC (one prebuilt message sent again and again), and, for raw, a bare `grpc.aio`
server building each message anew (what colaflow's path could reach at most) and bare sync gRPC
copying each message anew from memory as large as the frames (a bare sender of the same new bytes).
Each gRPC pair runs twice: with the client in the server's process (where its decoding takes the
server's GIL) and with the client apart in a process of its own, as every edge daemon is.
Last line: {"raw_vs_socket", "int8_bytes_per_elem", "int8_rel_err", ..., "raw_vs_bare_grpc",
"raw_vs_bare_aio_fresh", "raw_vs_bare_grpc_apart", "raw_vs_bare_grpc_fresh_apart"}.
"""
from __future__ import annotations

import argparse
import json
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time

import grpc
import numpy as np

from colaflow.bench.common import HIDDEN, KV, LAYERS, TOKENS, report, step_bytes, step_packets
from colaflow.bench.shaper import Shaper

MODULE = "colaflow.server.bench_wire"
CODECS = ("raw", "bf16", "fp16", "int8", "int4")


def _server(codec: str):
    from colaflow import JobSpec
    from colaflow.server.auth import Tokens
    from colaflow.server.coordinator import Coordinator
    from colaflow.server.service import make_server
    from colaflow.sites import Site

    coord = Coordinator(host=None)  # no model: the bench hands the scheduler ready-made packets
    sites = [Site(f"model.layers.{layer}.self_attn.{name}", "linear", HIDDEN, out)
             for layer in range(LAYERS) for name, out in (("q_proj", HIDDEN), ("v_proj", KV))]
    # a staleness bound past the bench's steps: every step is ready without any update
    coord.scheduler.add_job(JobSpec("bench", codec_x=codec, codec_g=codec, staleness=256, state_every=0), sites)
    server, port = make_server(coord, Tokens(None))
    server.start()
    return coord, server, f"127.0.0.1:{port}"


def grpc_round(codec: str, steps: int, apart: Apart | None = None, mbit: float = 0.0) -> tuple[float, int, list]:
    """Seconds to move `steps` frames through Work; wire bytes; the decoded packets of the last
    (none when the client ran `apart`, in its own process); through a shaped link if `mbit`."""
    coord, server, address = _server(codec)
    shaper = Shaper(address, mbit=mbit, rtt_ms=20) if mbit else None
    address = shaper.address if shaper else address
    frames = [step_packets(s) for s in range(steps)]
    client = _Client(address) if apart is None else apart.open(address)
    while not coord.health().workers:
        time.sleep(0.01)
    with coord.lock:  # the steps' packets, as the step loop would leave them
        for packets in frames:
            plan = coord.scheduler.begin("bench")
            coord.scheduler.finish(plan, packets, 0.0, TOKENS)
    elapsed, wire, last = client.read(steps)
    server.stop(0)
    if shaper:
        shaper.close()
    return elapsed, wire, last


class _Client:
    """A worker's side of Work as the edge daemon has it: credits out, frames reassembled and decoded."""

    def __init__(self, address: str):
        from colaflow.control.protocol import Hello
        from colaflow.v1 import worker_pb2, worker_pb2_grpc
        from colaflow.wire import serde
        from colaflow.wire.channel import CHANNEL_OPTIONS, work_call

        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        md = [("x-worker-id", "bench")]
        stub = worker_pb2_grpc.WorkerStub(self.channel)
        session = stub.Register(worker_pb2.RegisterRequest(worker_id="bench"), metadata=md).session
        self.out: queue.Queue = queue.Queue()
        self.out.put(serde.opening(session, Hello()))
        self.responses = work_call(self.channel)(iter(self.out.get, None), metadata=md)

    def read(self, steps: int) -> tuple[float, int, list | None]:
        from colaflow.control.protocol import Packets
        from colaflow.v1 import worker_pb2
        from colaflow.wire import serde
        from colaflow.wire.framing import parse_message

        inbox, got, wire, last = serde.Inbox("worker"), 0, 0, None
        t = time.perf_counter()
        self.out.put(serde.credit(2))
        for raw in self.responses:
            wire += len(parse_message(raw, worker_pb2.ServerMessage)[1])
            msg = inbox.feed(raw)
            if isinstance(msg, Packets):
                last = msg.packets
                got += 1
                self.out.put(serde.credit(1))
                if got == steps:
                    break
        elapsed = time.perf_counter() - t
        self.out.put(None)
        self.responses.cancel()
        self.channel.close()
        return elapsed, wire, last


class Apart:
    """The clients of a round in one process of their own, as an edge daemon is: in one process the
    client's decoding holds the server's GIL, which no deployment does. JSON lines over a pipe."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", MODULE, "--client"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def _ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the bench's client process ended (exit {self.proc.wait()})")
        return json.loads(line)

    def open(self, address: str) -> Apart:
        self._ask(op="open", address=address)
        return self

    def read(self, steps: int) -> tuple[float, int, None]:
        r = self._ask(op="read", steps=steps)
        return r["seconds"], r["wire"], None

    def drain(self, port: int) -> float:
        return self._ask(op="drain", port=port)["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _client_main() -> None:
    """`python -m colaflow.server.bench_wire --client`: the `Apart` side, one JSON line per request."""
    from colaflow.wire.channel import tune_allocator

    tune_allocator()
    client = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "open":
            client, reply = _Client(cmd["address"]), {}
        elif cmd["op"] == "read":
            seconds, wire, _ = client.read(cmd["steps"])
            reply = {"seconds": seconds, "wire": wire}
        else:
            reply = {"seconds": _drain(cmd["port"])}
        print(json.dumps(reply), flush=True)


def socket_round(nbytes: int) -> float:
    """Seconds to move `nbytes` over a loopback TCP socket in 4 MiB sends, received into a buffer."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    payload = bytes(4 << 20)

    def send():
        c = socket.create_connection(srv.getsockname())
        left = nbytes
        while left > 0:
            n = min(left, len(payload))
            c.sendall(payload[:n])
            left -= n
        c.close()
    conn_thread = threading.Thread(target=send)
    t = time.perf_counter()
    conn_thread.start()
    conn, _ = srv.accept()
    buf = bytearray(4 << 20)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = conn.recv_into(view)
        if n == 0:
            break
        got += n
    elapsed = time.perf_counter() - t
    conn_thread.join()
    conn.close()
    srv.close()
    return elapsed


def grpc_bytes_round(nbytes: int, apart: Apart | None = None, source=None) -> float:
    """Seconds for plain gRPC (no colaflow code) to stream `nbytes` as 4 MiB raw-bytes messages: one
    prebuilt message sent again and again, or, given `source` (a buffer of `nbytes`, touched once
    before), each message copied anew from it, as any sender of new data must."""
    from concurrent import futures

    from colaflow.wire.channel import CHANNEL_OPTIONS

    payload = bytes(4 << 20)
    n = -(-nbytes // len(payload))

    def stream(request, context):
        for i in range(n):
            yield payload if source is None else bytes(source[i * len(payload):(i + 1) * len(payload)])
    server = grpc.server(futures.ThreadPoolExecutor(2), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bytes", {
        "S": grpc.unary_stream_rpc_method_handler(stream)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    elapsed = _drain(port) if apart is None else apart.drain(port)
    server.stop(0)
    return elapsed


def _drain(port: int) -> float:
    """Seconds for a plain client to read the whole `bench.Bytes/S` stream on `port`."""
    from colaflow.wire.channel import CHANNEL_OPTIONS

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    call = channel.unary_stream("/bench.Bytes/S")
    t = time.perf_counter()
    for _ in call(b""):
        pass
    elapsed = time.perf_counter() - t
    channel.close()
    return elapsed


def grpc_aio_round(nbytes: int) -> float:
    """The same for a bare `grpc.aio` server (the API `colaflow serve` runs) that builds each
    4 MiB message anew with one copy, as any sender of new data must: the ceiling of colaflow's path."""
    import asyncio

    from colaflow.wire.channel import CHANNEL_OPTIONS

    source = np.ones(4 << 20, np.uint8)
    n = -(-nbytes // len(source))

    async def stream(request, context):
        for _ in range(n):
            yield b"".join([source])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bytes", {
            "S": grpc.unary_stream_rpc_method_handler(stream)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port
    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    elapsed = _drain(port)
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    return elapsed


def main(args: argparse.Namespace) -> int:
    from colaflow.wire.channel import tune_allocator

    tune_allocator()  # as `colaflow serve` and `colaflow edge` do
    steps = 5
    elems = LAYERS * TOKENS * (HIDDEN + HIDDEN + KV)  # tensor elements per step, x sent once
    print(f"wire: one worker's SmolLM2 step = {LAYERS} layers x (x, g_q, g_v), {TOKENS} tokens, "
          f"{elems / 1e6:.1f} M elements; {steps} steps per round, {args.repeats} rounds, loopback; "
          "each gRPC pair twice: client in the server's process, and apart in its own", flush=True)
    ref = step_packets(steps - 1)
    apart = Apart()
    res = {}
    for codec in CODECS:
        t, link = {k: [] for k in ("grpc", "socket", "bare", "aio", "grpc_apart", "bare_apart", "fresh_apart")}, []
        grpc_round(codec, 1)  # warm-up: first-touch of buffers, codec kernels
        grpc_round(codec, 1, apart)
        for _ in range(args.repeats):  # alternate the sides round by round
            elapsed, wire, last = grpc_round(codec, steps)
            t["grpc"].append(elapsed)
            t["socket"].append(socket_round(wire))
            t["bare"].append(grpc_bytes_round(wire))
            t["grpc_apart"].append(grpc_round(codec, steps, apart)[0])
            t["bare_apart"].append(grpc_bytes_round(wire, apart))
            if codec == "raw":
                t["aio"].append(grpc_aio_round(wire))
                source = memoryview(np.ones(wire, np.uint8))  # as big as the frames: as cold in the cache
                t["fresh_apart"].append(grpc_bytes_round(wire, apart, source))
                del source
            if args.mbit:  # a real link's rate: does encoding keep up with it? (raw: 2 steps, ~1 s each at 1 Gbit/s)
                el, link_bytes, _ = grpc_round(codec, 2 if codec == "raw" else steps, apart, args.mbit)
                link.append(link_bytes / el / 1e9)
        num = sum(float((b.g - a.g).pow(2).sum()) for a, b in zip(ref, last))
        den = sum(float(a.g.pow(2).sum()) for a in ref)
        r = {k: wire / statistics.median(v) / 1e9 if v else None for k, v in t.items()}  # GB/s
        r |= {"steps_per_s": steps / statistics.median(t["grpc"]), "bytes_per_elem": wire / steps / elems,
              "rel_err": (num / den) ** 0.5, "link": statistics.median(link) if link else None}
        res[codec] = r
        print(f"  {codec:5s} {r['grpc']:6.2f} GB/s (socket {r['socket']:5.2f}, bare gRPC {r['bare']:5.2f})  "
              f"{r['steps_per_s']:6.2f} steps/s  {r['bytes_per_elem']:.4f} B/elem  rel err {r['rel_err']:.2e}\n"
              f"        client apart: {r['grpc_apart']:6.2f} GB/s (bare gRPC {r['bare_apart']:5.2f})  "
              f"{r['grpc_apart'] / r['bytes_per_elem'] / elems * 1e9:6.2f} steps/s", flush=True)
        if r["aio"]:
            print(f"        bare grpc.aio, each message built anew: {r['aio']:5.2f} GB/s; bare sync gRPC, each "
                  f"message copied anew from memory as large as the frames, client apart: {r['fresh_apart']:5.2f} GB/s",
                  flush=True)
        if r["link"]:
            share = r["link"] * 8e3 / args.mbit
            print(f"        through a {args.mbit:g} Mbit/s link, 20 ms RTT: {share:5.3f} of its rate, "
                  f"{r['link'] / r['bytes_per_elem'] / elems * 1e9:5.2f} steps/s", flush=True)
    apart.close()
    print("  bytes per training step (SmolLM2 q_proj+v_proj, 8 x 128 tokens):")
    for codec in CODECS:
        print(f"    {codec:5s} {step_bytes(codec, True) / 2**20:7.1f} MiB with shared-input dedup, "
              f"{step_bytes(codec, False) / 2**20:7.1f} MiB without")
    raw = res["raw"]
    report({"raw_vs_socket": round(raw["grpc"] / raw["socket"], 3),
            "int8_bytes_per_elem": round(res["int8"]["bytes_per_elem"], 4),
            "int8_rel_err": float(f"{res['int8']['rel_err']:.3g}"),
            "raw_GBps": round(raw["grpc"], 3), "socket_GBps": round(raw["socket"], 3),
            "bare_grpc_GBps": round(raw["bare"], 3),
            "raw_vs_bare_grpc": round(raw["grpc"] / raw["bare"], 3),
            "bare_aio_fresh_GBps": round(raw["aio"], 3),
            "raw_vs_bare_aio_fresh": round(raw["grpc"] / raw["aio"], 3),
            "raw_apart_GBps": round(raw["grpc_apart"], 3), "bare_grpc_apart_GBps": round(raw["bare_apart"], 3),
            "raw_vs_bare_grpc_apart": round(raw["grpc_apart"] / raw["bare_apart"], 3),
            "bare_grpc_fresh_apart_GBps": round(raw["fresh_apart"], 3),
            "raw_vs_bare_grpc_fresh_apart": round(raw["grpc_apart"] / raw["fresh_apart"], 3)}
           | ({f"{c}_link_use": round(res[c]["link"] * 8e3 / args.mbit, 3) for c in CODECS} if args.mbit else {}))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--client"]:
        raise SystemExit("usage: python -m colaflow.server.bench_wire --client "
                         "(the bench starts it; run `colaflow bench wire`)")
    _client_main()
