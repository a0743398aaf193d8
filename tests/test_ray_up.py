"""The `ray up` walkthrough of examples/ray/README.md, for real: `ray up -y` on a copy of
examples/ray/onprem.yaml whose head is 127.0.0.2 and whose one worker (an `edge` node) is 127.0.0.3,
both this machine (not 127.0.0.1: Ray swaps that for the machine's own interface address, and this
test's traffic stays on loopback), reached over an sshd this test starts on a loopback port, as a throwaway user
with a throwaway key. The cluster's own setup commands build its venv (torch and colaflow from the
synced checkout), `ray exec ... 'ray status'` sees both nodes, the example job runs a few steps,
`ray down -y` stops it, and no Ray process of that user is left.

Needs root (a user, an sshd per node, the worker's in a mount namespace of its own), sshd, rsync,
useradd and unshare: `.ci/run` installs
openssh-server and rsync; elsewhere the test skips, saying which is missing. Takes a few minutes
(the venv's installs and SmolLM2's conversion).
"""
from __future__ import annotations

import os
import pwd
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
    if subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode != 0:
        return "no mount namespace here (unshare -m): the worker node needs a /tmp of its own"
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
        self.tmp = Path("/tmp") / self.user  # each node's TMPDIR; the worker's is another dir under this name
        self.worker_tmp = Path("/tmp") / f"{self.user}-w"
        self.token = self.dir / "auth_token"  # the laptop's `ray get-auth-token --generate`
        self.sshds: list[subprocess.Popen] = []
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
        # this machine's /tmp/ray. A worker node takes the head's temp dir by name: the worker's sshd (and
        # all it starts) lives in a mount namespace where that name is another directory, as on another
        # machine (nodes sharing one session dir each print every actor's log line). Short: Ray's sockets
        # must stay under 107 characters
        for d in (self.tmp, self.worker_tmp):
            d.mkdir()
        bashrc = self.home / ".bashrc"
        bashrc.write_text(f"export TMPDIR={self.tmp}\n" + (bashrc.read_text() if bashrc.exists() else ""))
        (ssh / "authorized_keys").write_text((self.dir / "key.pub").read_text())
        # the head's autoscaler reaches the worker node with this user's ssh: our port
        (ssh / "config").write_text(f"Host 127.0.0.*\n  Port {self.port}\n")
        _run(["chown", "-R", f"{self.user}:", str(self.home), str(self.tmp), str(self.worker_tmp)])
        ssh.chmod(0o700)
        self.token.write_text(secrets.token_hex(32))
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        for node, ip in (("head", HEAD), ("worker", WORKER)):
            config = self.dir / f"sshd_config-{node}"
            config.write_text("\n".join([
                f"Port {self.port}", f"ListenAddress {ip}", f"HostKey {self.dir / 'host_key'}",
                f"PidFile {self.dir / f'sshd-{node}.pid'}", "AuthorizedKeysFile .ssh/authorized_keys",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
                f"AllowUsers {self.user}", "PermitRootLogin no", "MaxStartups 100", "MaxSessions 100", ""]))
            cmd = [SSHD, "-D", "-e", "-f", str(config)]
            if node == "worker":
                cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                       f"mount --bind {self.worker_tmp} {self.tmp} && exec {' '.join(cmd)}"]
            log = self.dir / f"sshd-{node}.log"
            self.sshds.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w")))
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection((ip, self.port), timeout=1).close()
                    break
                except OSError:
                    if self.sshds[-1].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"sshd for {ip} did not start: {log.read_text()}") from None
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
        for sshd in self.sshds:
            sshd.terminate()
            sshd.wait(30)
        time.sleep(0.5)
        try:  # the head's ssh control sockets (/tmp/ray_ssh_*): Ray puts them there whatever TMPDIR says
            uid = pwd.getpwnam(self.user).pw_uid
            for p in Path("/tmp").glob("ray_ssh_*"):
                if p.lstat().st_uid == uid:
                    shutil.rmtree(p, ignore_errors=True)
        except KeyError:
            pass
        subprocess.run(["userdel", "-f", self.user], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.worker_tmp, ignore_errors=True)


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
        time.sleep(3)
    assert "1.0 edge" in status and "1.0 server" in status, status
    assert "2.0 edge" not in status, status  # one raylet on the worker node, not a second start of it

    job = _ray(machine, "exec", cluster,
               "cd ~/colaflow-src && ~/colaflow-venv/bin/python examples/ray_cluster.py --address auto "
               "--workers all-edge-nodes --insecure --facts 2 --steps 4", timeout=900)
    assert "done after 4 steps" in job, job[-6000:]
    assert "held-out exact match" in job, job[-6000:]
    actor_lines = [line for line in job.splitlines() if "pid=" in line and " INFO " in line]
    assert actor_lines, job[-6000:]
    doubled = [line for line in set(actor_lines) if actor_lines.count(line) > 1]
    ray_procs = subprocess.run(["ps", "-u", machine.user, "-o", "pid=,args="], capture_output=True,
                               text=True).stdout
    ray_procs = "\n".join(p[:300] for p in ray_procs.splitlines() if "raylet" in p or "log_monitor" in p)
    status = _ray(machine, "exec", cluster, "ray status", timeout=300)
    assert not doubled, "\n".join(actor_lines) + "\n\nthe cluster's raylets and log monitors:\n" + ray_procs + status

    _ray(machine, "down", "-y", cluster, timeout=600)
    deadline = time.monotonic() + 60
    while _user_pids(machine.user) and time.monotonic() < deadline:
        time.sleep(1)
    left = subprocess.run(["ps", "-u", machine.user, "-o", "pid=,args="], capture_output=True, text=True).stdout
    assert not left.strip(), f"`ray down` left processes behind:\n{left}"
