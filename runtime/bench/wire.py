"""`colaflow bench wire`: packets of SmolLM2's shape through the real gRPC server/worker path.

One step's packets for one worker (q_proj and v_proj of 30 layers, 8 x 128 tokens, the shared
input sent once) go out through `WorkerService.Work` exactly as in a run — serde, codec, 4 MiB
chunks, credits — to a client that reassembles and decodes them as the edge daemon does. The
same bytes also cross a raw TCP socket on loopback in the same run (the physical limit here),
bare sync gRPC (one prebuilt message sent again and again), and, for raw, a bare `grpc.aio`
server building each message anew (what colaflow's path could reach at most).
Last line: {"raw_vs_socket", "int8_bytes_per_elem", "int8_rel_err", ..., "raw_vs_bare_grpc",
"raw_vs_bare_aio_fresh"}.
"""
from __future__ import annotations

import argparse
import queue
import socket
import statistics
import threading
import time

import grpc
import torch

from .common import report

LAYERS, TOKENS, HIDDEN, KV = 30, 8 * 128, 576, 192
CODECS = ("raw", "bf16", "fp16", "int8", "int4")


def step_packets(step: int = 0):
    from colaflow.gl import Packet

    g = torch.Generator().manual_seed(step)
    packets = []
    for layer in range(LAYERS):
        x = torch.randn(TOKENS, HIDDEN, generator=g)  # (N, 576): shared by q_proj and v_proj
        pre = f"model.layers.{layer}.self_attn."
        packets.append(Packet("bench", pre + "q_proj", step, 0, x, torch.randn(TOKENS, HIDDEN, generator=g) * 1e-4))
        packets.append(Packet("bench", pre + "v_proj", step, 0, x, torch.randn(TOKENS, KV, generator=g) * 1e-4))
    return packets


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
    coord.scheduler.add_job(JobSpec("bench", codec_x=codec, codec_g=codec, staleness=1 << 20, state_every=0), sites)
    server, port = make_server(coord, Tokens(None))
    server.start()
    return coord, server, f"127.0.0.1:{port}"


def grpc_round(codec: str, steps: int) -> tuple[float, int, list]:
    """Seconds to move `steps` frames through Work; wire bytes; the decoded packets of the last."""
    from colaflow import serde
    from colaflow.framing import parse_message
    from colaflow.protocol import Hello, Packets
    from colaflow.v1 import worker_pb2, worker_pb2_grpc
    from colaflow.wire import CHANNEL_OPTIONS, work_call

    coord, server, address = _server(codec)
    frames = [step_packets(s) for s in range(steps)]
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    stub = worker_pb2_grpc.WorkerStub(channel)
    md = [("x-worker-id", "bench")]
    session = stub.Register(worker_pb2.RegisterRequest(worker_id="bench"), metadata=md).session
    out: queue.Queue = queue.Queue()
    out.put(serde.opening(session, Hello()))
    responses = work_call(channel)(iter(out.get, None), metadata=md)
    while not coord.health().workers:
        time.sleep(0.01)
    with coord.lock:  # the steps' packets, as the step loop would leave them
        for packets in frames:
            plan = coord.scheduler.begin("bench")
            coord.scheduler.finish(plan, packets, 0.0, TOKENS)
    inbox, got, wire, last = serde.Inbox("worker"), 0, 0, None
    t = time.perf_counter()
    out.put(serde.credit(2))
    for raw in responses:
        wire += len(parse_message(raw, worker_pb2.ServerMessage)[1])
        msg = inbox.feed(raw)
        if isinstance(msg, Packets):
            last = msg.packets
            got += 1
            out.put(serde.credit(1))
            if got == steps:
                break
    elapsed = time.perf_counter() - t
    out.put(None)
    responses.cancel()
    channel.close()
    server.stop(0)
    return elapsed, wire, last


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


def grpc_bytes_round(nbytes: int) -> float:
    """Seconds for plain gRPC (no colaflow code) to stream `nbytes` as 4 MiB raw-bytes messages."""
    from concurrent import futures

    from colaflow.wire import CHANNEL_OPTIONS

    payload = bytes(4 << 20)
    n = -(-nbytes // len(payload))

    def stream(request, context):
        for _ in range(n):
            yield payload
    server = grpc.server(futures.ThreadPoolExecutor(2), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bytes", {
        "S": grpc.unary_stream_rpc_method_handler(stream)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    elapsed = _drain(port)
    server.stop(0)
    return elapsed


def _drain(port: int) -> float:
    """Seconds for a plain client to read the whole `bench.Bytes/S` stream on `port`."""
    from colaflow.wire import CHANNEL_OPTIONS

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

    import numpy as np

    from colaflow.wire import CHANNEL_OPTIONS

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


def step_bytes(codec: str, dedup: bool) -> int:
    """Encoded tensor bytes of one SmolLM2 step (q_proj, v_proj, 8 x 128 tokens)."""
    from colaflow.codec import encode

    x, gq, gv = torch.randn(TOKENS, HIDDEN), torch.randn(TOKENS, HIDDEN), torch.randn(TOKENS, KV)
    per_layer = encode(x, codec).nbytes * (1 if dedup else 2) + encode(gq, codec).nbytes + encode(gv, codec).nbytes
    return LAYERS * per_layer


def main(args: argparse.Namespace) -> int:
    from colaflow.wire import tune_allocator

    tune_allocator()  # as `colaflow serve` and `colaflow edge` do
    steps = 5
    elems = LAYERS * TOKENS * (HIDDEN + HIDDEN + KV)  # tensor elements per step, x sent once
    print(f"wire: one worker's SmolLM2 step = {LAYERS} layers x (x, g_q, g_v), {TOKENS} tokens, "
          f"{elems / 1e6:.1f} M elements; {steps} steps per round, {args.repeats} rounds, loopback", flush=True)
    ref = step_packets(steps - 1)
    res = {}
    for codec in CODECS:
        g_t, s_t, b_t, a_t = [], [], [], []
        grpc_round(codec, 1)  # warm-up: first-touch of buffers, codec kernels
        for _ in range(args.repeats):  # alternate the sides round by round
            t, wire, last = grpc_round(codec, steps)
            g_t.append(t)
            s_t.append(socket_round(wire))
            b_t.append(grpc_bytes_round(wire))
            if codec == "raw":
                a_t.append(grpc_aio_round(wire))
        num = sum(float((b.g - a.g).pow(2).sum()) for a, b in zip(ref, last))
        den = sum(float(a.g.pow(2).sum()) for a in ref)
        gt, st, bt = statistics.median(g_t), statistics.median(s_t), statistics.median(b_t)
        res[codec] = {"GBps": wire / gt / 1e9, "socket_GBps": wire / st / 1e9, "grpc_bytes_GBps": wire / bt / 1e9,
                      "frames_per_s": steps / gt,
                      "site_packets_per_s": steps * 2 * LAYERS / gt, "bytes_per_elem": wire / steps / elems,
                      "rel_err": (num / den) ** 0.5,
                      "aio_fresh_GBps": wire / statistics.median(a_t) / 1e9 if a_t else None}
        r = res[codec]
        print(f"  {codec:5s} {r['GBps']:6.2f} GB/s (socket {r['socket_GBps']:5.2f}, bare gRPC {r['grpc_bytes_GBps']:5.2f})  "
              f"{r['frames_per_s']:6.2f} steps/s  "
              f"{r['site_packets_per_s']:7.1f} site packets/s  {r['bytes_per_elem']:.4f} B/elem  "
              f"rel err {r['rel_err']:.2e}", flush=True)
        if r["aio_fresh_GBps"]:
            print(f"        bare grpc.aio, each message built anew: {r['aio_fresh_GBps']:5.2f} GB/s", flush=True)
    print("  bytes per training step (SmolLM2 q_proj+v_proj, 8 x 128 tokens):")
    for codec in CODECS:
        print(f"    {codec:5s} {step_bytes(codec, True) / 2**20:7.1f} MiB with shared-input dedup, "
              f"{step_bytes(codec, False) / 2**20:7.1f} MiB without")
    report({"raw_vs_socket": round(res["raw"]["GBps"] / res["raw"]["socket_GBps"], 3),
            "int8_bytes_per_elem": round(res["int8"]["bytes_per_elem"], 4),
            "int8_rel_err": float(f"{res['int8']['rel_err']:.3g}"),
            "raw_GBps": round(res["raw"]["GBps"], 3), "socket_GBps": round(res["raw"]["socket_GBps"], 3),
            "bare_grpc_GBps": round(res["raw"]["grpc_bytes_GBps"], 3),
            "raw_vs_bare_grpc": round(res["raw"]["GBps"] / res["raw"]["grpc_bytes_GBps"], 3),
            "bare_aio_fresh_GBps": round(res["raw"]["aio_fresh_GBps"], 3),
            "raw_vs_bare_aio_fresh": round(res["raw"]["GBps"] / res["raw"]["aio_fresh_GBps"], 3)})
    return 0
