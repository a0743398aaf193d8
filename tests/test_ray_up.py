"""The `ray up` walkthrough of examples/ray/README.md, for real: `ray up -y` on a copy of
examples/ray/onprem.yaml whose head is 127.0.0.2 and whose one worker (an `edge` node) is 127.0.0.3,
both this machine (not 127.0.0.1: Ray swaps that for the machine's own interface address, and this
test's traffic stays on loopback), reached over an sshd this test starts on a loopback port, as a throwaway user
with a throwaway key. The cluster's own setup commands build its venv (torch and colaflow from the
synced checkout), `ray exec ... 'ray status'` sees both nodes, the example job runs a few steps,
`ray down -y` stops it, and no Ray process of that user is left.

Needs root (a user and an sshd of its own), sshd, rsync and useradd: `.ci/run` installs
openssh-server and rsync; elsewhere the test skips, saying which is missing. Takes a few minutes
(the venv's installs and SmolLM2's conversion).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray", reason="the `ray` extra (installed by `make test`)")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
HEAD, WORKER = "127.0.0.2", "127.0.0.3"
SETUP_TIMEOUT_S = 1500  # a fresh venv: torch, Ray, transformers; a loaded 2-core machine takes minutes


def _missing() -> str:
    """Why this machine cannot run the test ("" when it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root: the test adds a throwaway user and runs its own sshd (CI runs as root)"
    for tool, path in (("sshd", SSHD), ("rsync", shutil.which("rsync")), ("ssh", shutil.which("ssh")),
                       ("ssh-keygen", shutil.which("ssh-keygen")), ("useradd", shutil.which("useradd"))):
        if not path or not os.path.exists(path):
            return f"no `{tool}` here: apt-get install openssh-server rsync (.ci/run does)"
    if not RAY.exists():
        return f"no Ray CLI at {RAY}"
    try:
        for ip in (HEAD, WORKER):
            socket.create_connection((ip, 9), timeout=1).close()
    except ConnectionRefusedError:
        pass  # it answers (nothing listens there): loopback covers 127.0.0.0/8
    except OSError as e:
        return f"{HEAD} or {WORKER} is not reachable here ({e})"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60, **kw)


def _user_pids(user: str) -> list[int]:
    out = subprocess.run(["ps", "-u", user, "-o", "pid="], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Machine:
    """A throwaway user reachable as HEAD and WORKER over an sshd on a loopback port."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="colaflow-rayup-"))
        self.dir.chmod(0o755)  # the user's home lies under it
        self.user = f"cfray{secrets.token_hex(3)}"
        self.home = self.dir / "home"
        self.port = _free_port()
        self.key = self.dir / "key"
        self.tmp = Path("/tmp") / self.user
        self.token = self.dir / "auth_token"  # the laptop's `ray get-auth-token --generate`
        self.sshd: subprocess.Popen | None = None
        # "*": no password, yet not locked (sshd refuses a locked account even with a key)
        _run(["useradd", "-m", "-d", str(self.home), "-s", "/bin/bash", "-p", "*", self.user])
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        ssh = self.home / ".ssh"
        ssh.mkdir(parents=True, exist_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "host_key")])
        # each machine has a /tmp of its own: Ray's session dirs and the autoscaler's lock go there, not into
        # this machine's /tmp/ray, and the head and the worker do not share one (two Ray nodes sharing a
        # session dir each print every actor's log line). Which machine a login is on: the address it
        # came in on ($SSH_CONNECTION's third field). Short paths: Ray's sockets must stay under 107 chars
        for node in ("head", "worker"):
            (self.tmp / node).mkdir(parents=True)
        bashrc = self.home / ".bashrc"
        pick = (f'case " $SSH_CONNECTION " in *" {WORKER} "*) export TMPDIR={self.tmp}/worker;; '
                f'*) export TMPDIR={self.tmp}/head;; esac\n')
        bashrc.write_text(pick + (bashrc.read_text() if bashrc.exists() else ""))
        (ssh / "authorized_keys").write_text((self.dir / "key.pub").read_text())
        # the head's autoscaler reaches the worker node with this user's ssh: our port
        (ssh / "config").write_text(f"Host 127.0.0.*\n  Port {self.port}\n")
        _run(["chown", "-R", f"{self.user}:", str(self.home), str(self.tmp)])
        ssh.chmod(0o700)
        self.token.write_text(secrets.token_hex(32))
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", f"ListenAddress {HEAD}", f"ListenAddress {WORKER}",
            f"HostKey {self.dir / 'host_key'}", f"PidFile {self.dir / 'sshd.pid'}",
            "AuthorizedKeysFile .ssh/authorized_keys", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", f"AllowUsers {self.user}",
            "PermitRootLogin no", "MaxStartups 100", "MaxSessions 100", ""]))
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        self.sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "sshd.log", "w"))
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((HEAD, self.port), timeout=1).close()
                break
            except OSError:
                if self.sshd.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {(self.dir / 'sshd.log').read_text()}") from None
                time.sleep(0.2)
        # the laptop side (this process) reaches the same port: Ray's ssh and rsync find `ssh` on PATH
        bin_dir = self.dir / "bin"
        bin_dir.mkdir()
        (bin_dir / "ssh").write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -p {self.port} \"$@\"\n")
        (bin_dir / "ssh").chmod(0o755)

    def cluster(self) -> Path:
        """examples/ray/onprem.yaml pointed at this machine, as a user edits it."""
        config = yaml.safe_load((ROOT / "examples" / "ray" / "onprem.yaml").read_text())
        config["cluster_name"] = f"colaflow-test-{self.user}"
        config["provider"].update(head_ip=HEAD, worker_ips=[WORKER])
        config["auth"] = {"ssh_user": self.user, "ssh_private_key": str(self.key)}
        config["max_workers"] = 1
        mounts = config["file_mounts"]
        assert mounts.pop("~/.ray/auth_token") == "~/.ray/auth_token"
        mounts["~/.ray/auth_token"] = str(self.token)
        path = self.dir / "onprem.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def env(self) -> dict:
        """The laptop's: its own Ray temp dir (the cluster's state file and lock live there, as on a laptop
        they would; the head's autoscaler, another user here, keeps its own in /tmp/ray)."""
        return {**os.environ, "PATH": f"{self.dir / 'bin'}:{RAY.parent}:{os.environ.get('PATH', '')}",
                "RAY_TMPDIR": str(self.dir / "laptop-tmp")}

    def close(self) -> None:
        for pid in _user_pids(self.user):  # whatever the test left (a failed `ray down`): a throwaway user
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.sshd is not None:
            self.sshd.terminate()
            self.sshd.wait(30)
        time.sleep(0.5)
        subprocess.run(["userdel", "-f", self.user], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _ray(m: Machine, *args: str, timeout: float = 600) -> str:
    """A `ray` command as the walkthrough runs it, from the repository root; its output."""
    p = subprocess.run([str(RAY), *args], cwd=ROOT, env=m.env(), capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise AssertionError(f"`ray {' '.join(args)}` exited {p.returncode}:\n{out[-8000:]}")
    return out


@pytest.fixture
def machine():
    why = _missing()
    if why:
        pytest.skip(why)
    m = Machine()
    try:
        yield m
    finally:
        m.close()


def test_ray_up_runs_the_example_job_and_ray_down_leaves_no_ray_process(machine):
    cluster = str(machine.cluster())
    _ray(machine, "up", "-y", cluster, timeout=SETUP_TIMEOUT_S)
    src = machine.home / "colaflow-src"
    synced = {p.name for p in src.iterdir()}
    assert {"runtime", "examples", "pyproject.toml"} <= synced
    assert not synced & {".venv", ".git", "colaflow-out"}, synced  # rsync_filter / rsync_exclude
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and "build" not in p.parts)
    assert size < 50 << 20, f"{size >> 20} MiB synced"  # (build/ is pip's, made there by the install)

    # the walkthrough's first check, in a non-interactive shell: the head and the edge node that joined
    deadline, status = time.monotonic() + SETUP_TIMEOUT_S, ""
    while time.monotonic() < deadline:
        status = _ray(machine, "exec", cluster, "ray status", timeout=300)
        if "1.0 edge" in status and "1.0 server" in status:
            break
        time.sleep(10)
    assert "1.0 edge" in status and "1.0 server" in status, status

    job = _ray(machine, "exec", cluster,
               "cd ~/colaflow-src && ~/colaflow-venv/bin/python examples/ray_cluster.py --address auto "
               "--workers all-edge-nodes --insecure --facts 2 --steps 4", timeout=900)
    assert "done after 4 steps" in job, job[-6000:]
    assert "held-out exact match" in job, job[-6000:]
    actor_lines = [line for line in job.splitlines() if "pid=" in line and " INFO " in line]
    assert actor_lines, job[-6000:]
    doubled = [line for line in set(actor_lines) if actor_lines.count(line) > 1]
    assert not doubled, "\n".join(actor_lines)  # each actor log line once

    _ray(machine, "down", "-y", cluster, timeout=600)
    deadline = time.monotonic() + 60
    while _user_pids(machine.user) and time.monotonic() < deadline:
        time.sleep(1)
    left = subprocess.run(["ps", "-u", machine.user, "-o", "pid=,args="], capture_output=True, text=True).stdout
    assert not left.strip(), f"`ray down` left processes behind:\n{left}"
