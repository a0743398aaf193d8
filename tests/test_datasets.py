"""Datasets as people have them: every format and source becomes token-id rows with exact label masks;
a malformed row of each is refused naming the row and the field, before anything reaches a server;
text trains over a real loopback server with its tokenizer; big data maps travel in bounded chunks."""
from __future__ import annotations

import csv
import json
import sys
import threading
import time

import grpc
import pytest
import torch

from colaflow import LowRank, Session
from colaflow.data.batches import IGNORE, to_map
from colaflow.data.sources import rows
from colaflow.engine.host import Host
from colaflow.errors import InvalidArgument, ResourceExhausted
from colaflow.job import JobSpec
from colaflow.models import load_tokenizer, tiny
from colaflow.server.auth import Tokens
from colaflow.server.coordinator import Coordinator
from colaflow.server.service import make_server
from colaflow.server.uploads import UploadLimits, Uploads
from colaflow.wire.tokenizer import from_files, to_files
from procs import start_edge, stop, wait_workers

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")  # SmolLM2's real tokenizer and chat template, offline


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# formats

def test_text_has_loss_on_every_token_and_ends_with_eos(tok):
    (r,) = rows([{"text": "The capital of France is Paris."}], tok)
    want = tok("The capital of France is Paris.")["input_ids"] + [tok.eos_token_id]
    assert r == {"input_ids": want, "labels": want}
    with pytest.raises(InvalidArgument, match='^row 1: "text" must be a string, got int$'):
        rows([{"text": "fine"}, {"text": 7}], tok)
    with pytest.raises(InvalidArgument, match='^row 0: "text" is empty$'):
        rows([{"text": ""}], tok)


def test_prompt_completion_has_loss_on_the_completion_and_eos_only(tok):
    (r,) = rows([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}], tok)
    p, c = tok("Q: 2+2?\nA:")["input_ids"], enc(tok, " 4") + [tok.eos_token_id]
    assert r["input_ids"] == p + c
    assert r["labels"] == [IGNORE] * len(p) + c
    with pytest.raises(InvalidArgument, match='^row 1: "completion" must be a string, got int$'):
        rows([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 4}], tok)
    with pytest.raises(InvalidArgument, match='^row 0: "completion" is missing$'):
        rows([{"prompt": "a"}], tok)


def test_chat_uses_the_real_template_and_has_loss_on_assistant_turns_only(tok):
    (r,) = rows([{"messages": CHAT}], tok)
    assert r["input_ids"] == list(tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"])
    learnt = [t for t, lab in zip(r["input_ids"], r["labels"]) if lab != IGNORE]
    assert [lab for lab in r["labels"] if lab != IGNORE] == learnt  # labels are the tokens themselves
    assert tok.decode(learnt) == "Hello!<|im_end|>\n4<|im_end|>\n"  # both answers and their end, nothing else
    masked = tok.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab == IGNORE])
    assert masked.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n") and "Hello!" not in masked
    bad = [dict(CHAT[0]), {"role": "assistant", "content": 4}]
    with pytest.raises(InvalidArgument, match=r'^row 1: "messages"\[1\]\["content"\] must be a string, got int$'):
        rows([{"messages": CHAT}, {"messages": bad}], tok)
    with pytest.raises(InvalidArgument, match='^row 0: "messages" has no "assistant" turn'):
        rows([{"messages": CHAT[:1]}], tok)
    with pytest.raises(InvalidArgument, match=r'^row 0: "messages"\[0\] is an assistant turn'):
        rows([{"messages": CHAT[1:]}], tok)
    plain = from_files(to_files(tok))
    plain.chat_template = None
    with pytest.raises(InvalidArgument, match='^row 0: "messages" rows need a tokenizer with a chat template'):
        rows([{"messages": CHAT}], plain)


def test_pre_tokenised_rows_pass_as_today_without_a_tokenizer():
    got = rows([{"input_ids": torch.tensor([5, 6, 7])}, {"input_ids": [1, 2], "labels": [IGNORE, 2]}])
    assert got == [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [1, 2], "labels": [IGNORE, 2]}]
    with pytest.raises(InvalidArgument, match='^row 1: "input_ids" \\(2\\) and "labels" \\(1\\) must be equal-length'):
        rows([{"input_ids": [1]}, {"input_ids": [1, 2], "labels": [2]}])
    with pytest.raises(InvalidArgument, match="^row 0: `input_ids` holds 'x'; token ids are ints$"):
        rows([{"input_ids": [1, "x"]}])
    with pytest.raises(InvalidArgument, match="^row 0: 5 tokens; the model's context is 4"):
        rows([{"input_ids": [1, 2, 3, 4, 5]}], max_length=4)  # never cut: refused
    with pytest.raises(InvalidArgument, match=r"^row 0: text rows need a tokenizer \(pass `tokenizer=`\)"):
        rows([{"text": "no tokenizer here"}])


def test_one_format_per_dataset_no_empty_data_and_a_clear_rule_for_length(tok):
    with pytest.raises(InvalidArgument, match="^row 2: a prompt/completion row in a text dataset"):
        rows([{"text": "a"}, {"text": "b"}, {"prompt": "c", "completion": "d"}], tok)
    with pytest.raises(InvalidArgument, match="holds no rows"):
        rows([], tok)
    with pytest.raises(InvalidArgument, match='^row 0: no data field among \\[\'question\'\\]'):
        rows([{"question": "?"}], tok)
    with pytest.raises(InvalidArgument, match="one map; pass a list of rows"):
        rows({"text": "a"}, tok)
    (r,) = rows([{"text": "one two three four five six seven"}], tok, max_length=4)  # the first 4 tokens
    assert r["input_ids"] == tok("one two three four five six seven")["input_ids"][:4] == r["labels"]
    with pytest.raises(InvalidArgument, match="^row 0: the prompt fills the first 3 tokens"):
        rows([{"prompt": "one two three four", "completion": " five"}], tok, max_length=3)


# sources

def test_jsonl_names_the_row_and_line(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"prompt": "a", "completion": "b"}, {}, {"prompt": "c", "completion": "d"},
             {"prompt": "e", "completion": 5}]
    path.write_text("\n".join("" if not r else json.dumps(r) for r in lines) + "\n")  # line 2 is blank
    with pytest.raises(InvalidArgument,
                       match='^row 2 \\(line 4\\) of data.jsonl: "completion" must be a string, got int$'):
        rows(str(path), tok)
    path.write_text(json.dumps(lines[0]) + "\n{oops\n")
    with pytest.raises(InvalidArgument, match=r"^row 1 \(line 2\) of data.jsonl: not valid JSON"):
        rows(path, tok)
    path.write_text("\n".join(json.dumps(r) for r in lines[:1] + lines[2:3]) + "\n")
    assert rows(path, tok) == rows(lines[:1] + lines[2:3], tok)
    path.write_bytes(b'{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(InvalidArgument, match="^data.jsonl: not UTF-8 text"):
        rows(path, tok)


def test_json_and_csv_files(tok, tmp_path):
    good = [{"text": "first row"}, {"text": "second, with a comma"}]
    (tmp_path / "data.json").write_text(json.dumps(good))
    assert rows(tmp_path / "data.json", tok) == rows(good, tok)
    (tmp_path / "bad.json").write_text(json.dumps(good + [{"text": ["x"]}]))
    with pytest.raises(InvalidArgument, match='^row 2 of bad.json: "text" must be a string, got list$'):
        rows(tmp_path / "bad.json", tok)
    (tmp_path / "map.json").write_text(json.dumps({"text": "x"}))
    with pytest.raises(InvalidArgument, match="holds a list of rows, got a dict"):
        rows(tmp_path / "map.json", tok)
    with open(tmp_path / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["prompt", "completion"], ["Q: hi", " there"], ["Q: lost", ""]])
    with pytest.raises(InvalidArgument, match='^row 1 \\(line 3\\) of data.csv: "completion" is missing$'):
        rows(tmp_path / "data.csv", tok)
    with open(tmp_path / "chat.csv", "w", newline="") as f:  # JSON in a cell: messages, token ids
        csv.writer(f).writerows([["messages"], [json.dumps(CHAT)]])
    assert rows(tmp_path / "chat.csv", tok) == rows([{"messages": CHAT}], tok)
    with pytest.raises(InvalidArgument, match="unknown data file type '.txt'"):
        rows(tmp_path / "data.txt", tok)
    with pytest.raises(InvalidArgument, match="no such data file"):
        rows(tmp_path / "missing.jsonl", tok)


def test_parquet_and_a_clear_error_without_pyarrow(tok, tmp_path, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["c", None]}), tmp_path / "data.parquet")
    with pytest.raises(InvalidArgument, match='^row 1 of data.parquet: "completion" is missing$'):
        rows(tmp_path / "data.parquet", tok)
    pq.write_table(pa.table({"messages": [CHAT]}), tmp_path / "chat.parquet")
    assert rows(tmp_path / "chat.parquet", tok) == rows([{"messages": CHAT}], tok)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InvalidArgument, match=r"reading .parquet needs pyarrow \(pip install pyarrow\)"):
        rows(tmp_path / "chat.parquet", tok)


def test_a_datasets_dataset(tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": "hello"}, {"text": "world"}])
    assert rows(ds, tok) == rows([{"text": "hello"}, {"text": "world"}], tok)
    with pytest.raises(InvalidArgument, match='^row 1 of the dataset: "completion" is missing$'):
        rows(datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]), tok)
    with pytest.raises(InvalidArgument, match=r"has splits \['train'\]: pass one"):
        rows(datasets.DatasetDict({"train": ds}), tok)
    frame = ds.to_pandas()  # a pandas DataFrame: its rows, not its column names
    assert rows(frame, tok) == rows(ds, tok)
    with pytest.raises(InvalidArgument, match='^row 1: "text" must be a string, got int$'):
        rows(type(frame)({"text": ["hello", 5]}), tok)


def test_in_process_sessions_tokenise_with_the_models_tokenizer(tok):
    with Session("tiny-llama") as session:  # a test model without a tokenizer
        with pytest.raises(InvalidArgument, match="^row 0: text rows need a tokenizer, and none is at hand: the "
                                                  "model 'tiny-llama' has no tokenizer: pass Session"):
            session.submit([{"text": "hi"}], steps=1, batch_size=1)
        assert session.jobs() == []
    with Session(tiny("llama", vocab=49152), tokenizer=tok) as session:
        data = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "many " * 200, "completion": " words"}]
        with pytest.raises(InvalidArgument, match="^row 1: the prompt fills the first 128 tokens"):  # the context
            session.submit(data, steps=1, batch_size=1)
        job = session.submit(data[:1], steps=2, batch_size=1, adapter=LowRank(r=2))
        assert job.wait(timeout=60)["state"] == "done"
        assert job.metrics()[0]["tokens"] == len(rows(data[:1], tok)[0]["input_ids"])  # tokenised here, as rows() does


def test_a_tokenizer_from_the_wire_is_checked_before_it_is_loaded(tok):
    files = to_files(tok)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    with pytest.raises(InvalidArgument, match="tokenizer file name '../tokenizer.json' is not a plain file name"):
        from_files({"../tokenizer.json": files["tokenizer.json"]})
    with pytest.raises(InvalidArgument, match="the tokenizer has no files"):
        from_files({})
    with pytest.raises(InvalidArgument, match="cannot load the tokenizer from its files"):
        from_files({"tokenizer.json": b"{not json", "tokenizer_config.json": b"{}"})


# a real loopback server: the tokenizer travels, bad data never does

class Served:
    """A server in this process on a tiny Llama with SmolLM2's vocabulary (context 128)."""

    def __init__(self, tokenizer, limits: UploadLimits | None = None, run: bool = False):
        self.c = Coordinator(Host(tiny("llama", vocab=49152)))
        self.server, port = make_server(self.c, Tokens.load(None), tokenizer=tokenizer, model_name="tiny-smol",
                                        upload_limits=limits)
        self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.loop = threading.Thread(target=self.c.run, daemon=True) if run else None
        if self.loop:
            self.loop.start()

    def close(self) -> None:
        self.c.stop()
        self.server.stop(0)


@pytest.fixture(scope="module")
def served(tok):
    s = Served(tok)
    yield s
    s.close()


@pytest.mark.parametrize("data, error", [
    ([{"text": "ok"}, {"text": 3}], 'row 1: "text" must be a string'),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], 'row 1: "completion" is missing'),
    ([{"messages": CHAT}, {"messages": "hi"}], 'row 1: "messages" must be a non-empty list'),
    ([{"input_ids": [1, 2]}, {"input_ids": "12"}], "row 1: `input_ids` must be a list of token ids"),
    ([{"input_ids": list(range(1, 130))}], "129 tokens; the model's context is 128"),
])
def test_a_malformed_row_submits_nothing(served, data, error):
    with Session(address=served.address) as session:
        with pytest.raises(InvalidArgument, match=error):
            session.submit(data, steps=2, batch_size=1)
        assert session.jobs() == [] and served.c.scheduler.jobs == {}


def test_text_trains_over_grpc_with_the_servers_tokenizer(tok, tmp_path):
    s = Served(tok, run=True)
    edge = start_edge(tmp_path, s.address, "e1")
    try:
        with Session(address=s.address) as session:
            facts = [{"text": f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}."} for i in range(7)]
            facts.append({"text": "long " * 300})  # cut to the server's context (128), not refused
            path = tmp_path / "facts.jsonl"
            path.write_text("".join(json.dumps(f) + "\n" for f in facts))
            wait_workers(session._backend.client, 1)
            submitted, submit = [], s.c.submit  # an ended job lets go of its data: look at what came in
            s.c.submit = lambda spec, data, *a, **k: submitted.append(data) or submit(spec, data, *a, **k)
            job = session.submit(path, steps=2, batch_size=4, adapter=LowRank(r=2), targets=["q_proj", "v_proj"])
            assert job.wait(timeout=120)["state"] == "done" and len(job.metrics()) == 2
            fetched = session._backend.client.tokenizer()
            assert fetched.model_max_length == 128 and fetched("Fact 1")["input_ids"] == tok("Fact 1")["input_ids"]
            data = submitted[0]["examples"]
            assert data[0]["input_ids"] == tok(facts[0]["text"])["input_ids"] + [tok.eos_token_id]
            assert max(len(r["input_ids"]) for r in data) == 128
    finally:
        stop(edge)
        s.close()


def test_a_server_without_tokenizer_says_so_and_still_takes_token_ids():
    s = Served(None)
    try:
        with Session(address=s.address) as session:
            with pytest.raises(InvalidArgument, match="row 0: text rows need a tokenizer, and none is at hand: "
                                                      "tokenizer: the server's model 'tiny-smol' has no tokenizer"):
                session.submit([{"text": "hi"}], steps=1, batch_size=1)
            assert s.c.scheduler.jobs == {}
            job = session.submit([{"input_ids": [1, 2, 3]}], steps=1, batch_size=1)
            assert job.status()["state"] in ("waiting", "running")
    finally:
        s.close()


# big data maps: chunked upload, bounded on the server

def test_a_data_map_bigger_than_one_message_travels_in_chunks(served):
    from colaflow.wire.client import Client

    ex = [{"input_ids": list(range(1, 101)), "labels": [IGNORE] * 50 + list(range(51, 101))} for _ in range(40)]
    served.server.control.uploads.limits.max_chunk = 4096  # the server refuses any bigger message
    client = Client(served.address)
    try:
        client.chunk_bytes = 4096  # ~12 KB of data: several chunks
        client.submit(JobSpec("big", LowRank(r=2)), ex, steps=1, batch_size=4)
        assert served.c.scheduler.job("big").data["examples"] == ex
        assert served.server.control.uploads.reserved() == 0  # claimed, freed
        client.chunk_bytes = 8192  # bigger than the server's chunk cap: refused, nothing kept
        with pytest.raises(InvalidArgument, match="a chunk holds 8192 bytes; the cap is 4096"):
            client.submit(JobSpec("too-big-chunks", LowRank(r=2)), ex, steps=1, batch_size=4)
        assert "too-big-chunks" not in served.c.scheduler.jobs and served.server.control.uploads.reserved() == 0

        def broken():  # a client that dies mid-upload: its bytes are freed
            from colaflow.v1 import control_pb2
            yield control_pb2.UploadDataRequest(total_bytes=100_000, data=b"x" * 1000)
            raise ConnectionError("gone")
        with pytest.raises(grpc.RpcError):
            client.stub.UploadData(broken(), timeout=10)
        end = time.monotonic() + 10
        while served.server.control.uploads.reserved() and time.monotonic() < end:  # the server sees the cancel
            time.sleep(0.05)
        assert served.server.control.uploads.reserved() == 0
    finally:
        served.server.control.uploads.limits.max_chunk = UploadLimits().max_chunk
        client.close()


def test_uploads_are_bounded_before_allocation_and_expire():
    now = [0.0]
    u = Uploads(UploadLimits(max_bytes=100, max_total=150, max_per_tenant=120, max_chunk=40, ttl=10),
                clock=lambda: now[0])
    with pytest.raises(ResourceExhausted, match="exceeds the server's cap on one data map, 100"):
        u.begin("acme", 101)
    a = u.begin("acme", 100)
    with pytest.raises(ResourceExhausted, match="tenant 'acme' would hold 130 bytes; the cap is 120"):
        u.begin("acme", 30)
    b = u.begin("globex", 50)
    with pytest.raises(ResourceExhausted, match="as many uploaded bytes as it may"):
        u.begin("initech", 1)
    with pytest.raises(ValueError, match="a chunk holds 41 bytes; the cap is 40"):
        u.add(a, b"x" * 41)
    u.add(b, b"y" * 40)
    with pytest.raises(ValueError, match="more than the declared `total_bytes` 50"):
        u.add(b, b"y" * 11)
    with pytest.raises(ValueError, match="ended after 40 of its declared 50 bytes"):
        u.finish(b)
    u.add(b, b"y" * 10)
    assert u.finish(b) == 50
    with pytest.raises(KeyError, match="unknown or unfinished upload"):
        u.claim(b, "acme")  # another tenant's reads as unknown
    assert bytes(u.claim(b, "globex")) == b"y" * 50
    with pytest.raises(KeyError):
        u.claim(b, "globex")  # used once
    now[0] = 11.0  # acme's upload was abandoned: freed after ttl
    assert u.reserved() == 0
    with pytest.raises(ValueError, match="expired"):
        u.add(a, b"x")


def test_classification_rows_carry_one_class_id(tok):
    """{"text", "label"} (HF's classification layout) and {"input_ids", "label"}: tokens and a class id."""
    out = rows([{"text": "book a table for two", "label": 3}, {"text": "what's the weather", "label": 0}], tok)
    assert out[0] == {"input_ids": tok("book a table for two")["input_ids"], "label": 3}
    assert rows([{"input_ids": [5, 6, 7], "label": 1}]) == [{"input_ids": [5, 6, 7], "label": 1}]
    m = to_map(out, batch_size=2)
    assert [e["label"] for e in m["examples"]] == [3, 0]
    with pytest.raises(InvalidArgument, match=r'row 1: "label" must be a class id \(an int >= 0\), got -1'):
        rows([{"text": "a", "label": 2}, {"text": "b", "label": -1}], tok)
    with pytest.raises(InvalidArgument, match=r"row 1: a text row in a classification dataset"):
        rows([{"text": "a", "label": 2}, {"text": "b"}], tok)


def test_the_default_batch_is_8_rows_or_all_of_them_when_fewer():
    """The README's two-example snippets run as written; a batch size asked for is kept, and checked."""
    from colaflow.data import batches
    from colaflow.data.batches import from_map, to_map

    two = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}]
    assert to_map(two)["batch_size"] == 2 and next(from_map(to_map(two)))["input_ids"].shape[0] == 2
    assert to_map(two * 10)["batch_size"] == 8
    with pytest.raises(ValueError, match="`batch_size` 8 is larger than the 2 examples"):
        batches(to_map(two, batch_size=8)["examples"], 8)
