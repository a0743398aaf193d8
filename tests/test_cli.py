"""The operator CLI against a real `colaflow serve` (with tokens) and a real edge daemon on loopback:
submit a YAML job, follow it, export it, load the export in PEFT, continue from it; and every
error is one line with its exit code, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from colaflow.models import tiny
from procs import examples, start_edge, start_server, stop

ADMIN, CONTROL, WORKER = "admin-token-0123456789", "acme-token-0123456789ab", "pool-worker-token-0123456789"
ROWS = examples(96, 8, seed=1)


def cli(*args: str, token: str | None = CONTROL, server: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLAFLOW_")}
    if server:
        env["COLAFLOW_SERVER"] = server
    if token:
        env["COLAFLOW_TOKEN"] = token
    out = subprocess.run([sys.executable, "-m", "colaflow.cli.main", *args], capture_output=True, text=True,
                         env=env, timeout=180)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def one_line_error(out: subprocess.CompletedProcess, code: int, text: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("colaflow: error: ") and text in lines[0], lines[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "tokens").write_text(f"{ADMIN} admin\n{CONTROL} control acme\n{WORKER} worker\n")
    (tmp / "worker.token").write_text(WORKER)
    server, address = start_server(tmp, "--tokens", str(tmp / "tokens"))
    edge = start_edge(tmp, address, "e1", "--token-file", str(tmp / "worker.token"))
    yield tmp, address
    stop(edge, server)


def job_file(path, job_id: str, steps: int, **extra) -> str:
    """A job file; its data inline unless `extra` names a `data` file."""
    data = [] if "data" in extra else ["data:", *(f"  - {json.dumps(r)}" for r in ROWS)]
    lines = [f"id: {job_id}", f"steps: {steps}", "batch_size: 4", "targets: [q_proj, v_proj]",
             "adapter: {kind: lowrank, r: 4, alpha: 8}", "optimizer: {kind: adamw, lr: 2.0e-2}",
             *(f"{k}: {v}" for k, v in extra.items()), *data]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_submit_follow_export_load_in_peft_and_continue(served):
    tmp, address = served
    assert cli("submit", job_file(tmp / "job.yaml", "cli-job", 6), server=address).stdout.strip() == "cli-job"

    logs = cli("logs", "cli-job", "--follow", server=address).stdout.splitlines()
    steps = [line for line in logs if line.startswith("step ")]
    assert len(steps) == 6 and steps[0].startswith("step 0  loss ") and "staleness 0" in steps[0], logs
    assert logs[-1] == "job cli-job ended: done"

    status = json.loads(cli("status", "cli-job", "--json", server=address).stdout)
    assert status["state"] == "done" and status["step"] == status["steps"] == 6 and status["error"] == ""
    table = cli("jobs", server=address).stdout.splitlines()
    assert table[0].split()[:3] == ["JOB", "STATE", "STEP"] and table[1].split()[:3] == ["cli-job", "done", "6/6"]

    cli("export", "cli-job", str(tmp / "peft"), "--format", "peft", server=address)
    cli("export", "cli-job", str(tmp / "native"), "--format", "native", server=address)
    from peft import PeftModel

    from colaflow.export import load

    _, trained = load(tmp / "native")
    base = tiny("llama")
    ids = torch.tensor([ROWS[0]["input_ids"]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(base, str(tmp / "peft"))
    inner = peft_model.base_model.model
    for site, adapter in trained.items():
        layer = inner.get_submodule(site)
        assert torch.equal(layer.lora_A["default"].weight, adapter.A)
        assert torch.equal(layer.lora_B["default"].weight, adapter.B)
    # it learned something
    assert len(trained) == 4 and all(float(a.B.detach().abs().max()) > 0 for a in trained.values())
    with torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=ids).logits, before)

    # continue from the native export: a new job starts from those weights
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # the same rows, from a file
    cli("submit", job_file(tmp / "more.yaml", "cli-more", 2, init="native", data="rows.jsonl"), server=address)
    more = cli("logs", "cli-more", "-f", "--json", server=address).stdout.splitlines()
    assert json.loads(more[-1]) == {"ended": "done", "error": ""}
    first_loss = float(steps[0].split()[3])  # the same batch 0, from the seeded start and from the export
    assert json.loads(more[0])["loss"] < first_loss - 0.01, (more[0], steps[0])

    view = json.loads(cli("workers", "--json", token=ADMIN, server=address).stdout)
    assert [w["worker"] for w in view] == ["e1"] and view[0]["state"] == "connected"
    assert view[0]["bytes_in"] > 10_000 and view[0]["bytes_out"] > 10_000 and view[0]["last_seen_s"] < 10
    assert "e1" in cli("workers", token=ADMIN, server=address).stdout


def test_errors_are_one_line_with_an_exit_code(served):
    tmp, address = served
    one_line_error(cli("jobs", token=None, server=address, check=False), 1,
                   "the server requires a token: pass --token or set COLAFLOW_TOKEN")
    one_line_error(cli("jobs", token="not-a-token-0123456789", server=address, check=False), 1,
                   "the server does not know this token")
    one_line_error(cli("jobs", token=WORKER, server=address, check=False), 1,
                   "wrong role: this is a `worker` token; this call needs a `control` token")
    one_line_error(cli("workers", server=address, check=False), 1, "needs an `admin` token")
    one_line_error(cli("status", "nope", server=address, check=False), 1, "unknown job 'nope'")
    one_line_error(cli("jobs", "--server", "127.0.0.1", check=False), 2,
                   "--server '127.0.0.1' has no port: pass HOST:PORT (e.g. 127.0.0.1:7000)")
    (tmp / "bad.yaml").write_text("steps: 2\ndata: []\nepochs: 3\n")
    one_line_error(cli("submit", str(tmp / "bad.yaml"), server=address, check=False), 1,
                   "unknown key 'epochs'; known: ")
    debug = cli("jobs", "--debug", token=None, server=address, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "NoToken" in debug.stderr


def test_operator_commands_load_without_torch():
    """`colaflow jobs` answers in a fraction of a second: the control client and the CLI need no torch."""
    code = "import sys, colaflow, colaflow.cli.main, colaflow.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("argv, says", [
    (["serve", "--model", "./no-such-dir"], "model './no-such-dir': no such directory or GGUF file"),
    (["serve", "--model", "tiny-opt"], "unknown tiny model family 'opt'"),
    (["serve", "--model", "tiny-llama", "--tokens", "/no/such/tokens"], "cannot read --tokens '/no/such/tokens'"),
    (["serve", "--model", "tiny-llama", "--tls-cert", "KEY", "--tls-key", "CERT"],
     "are not a PEM certificate and its private key"),
    (["edge", "--server", "127.0.0.1:1", "--token-file", "/no/such/token"], "cannot read --token-file"),
])
def test_start_up_mistakes_are_one_line_errors(argv, says, tmp_path, capsys):
    """serve and edge as the operator commands: a mistake is one line naming what to fix, exit 1."""
    from colaflow.cli.main import main

    if "KEY" in argv:  # a real pair, given swapped
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem", "-out",
                        "c.pem", "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, cwd=tmp_path)
        argv = [str(tmp_path / "k.pem") if a == "KEY" else str(tmp_path / "c.pem") if a == "CERT" else a for a in argv]
    try:
        rc = main(argv)
        text = capsys.readouterr().err
    except SystemExit as e:
        rc, text = 1, str(e.code)
    assert rc == 1 and says in text and "Traceback" not in text and len(text.strip().splitlines()) == 1
