"""Ray: worker actors on a real local Ray instance and on a multi-node `ray.cluster_utils.Cluster`
(fake nodes, each its own raylet, on this machine); the `ray up` files checked by Ray's own
validator. Ray stays optional: without it everything else imports and `colaflow.ray` says how to
install it."""
from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_session import adapters_of, in_process, train

from colaflow import Session

ray = pytest.importorskip("ray", reason="the `ray` extra (installed by `make test`)")
ROOT = Path(__file__).resolve().parents[1]


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for site in want:
        for name in want[site]:
            assert torch.equal(got[site][name], want[site][name]), (site, name)


@pytest.mark.parametrize("name", ["onprem.yaml", "aws.yaml"])
def test_cluster_files_pass_rays_validator_and_a_broken_one_fails(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (ROOT / "examples" / "ray" / name).read_text()
    config = yaml.safe_load(text)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert any("colaflow-src[ray]" in c for c in config["setup_commands"])  # every node installs colaflow
    assert '"edge\\": 1' in text or '"edge": 1' in text  # worker nodes offer the edge resource
    typo = copy.deepcopy(config)
    typo["setup_comands"] = typo.pop("setup_commands")
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(prepare_config(typo))
    # what tests/test_ray_up.py found running onprem.yaml for real, for both files
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert not any("ray stop" in c for c in starts)  # it would stop every Ray of the user on that box
    assert all("RAY_AUTH_MODE=token" in c for c in starts) and "~/.ray/auth_token" in config["file_mounts"]
    assert config["rsync_filter"] == [".gitignore"] and config["rsync_exclude"] == [".git"]
    assert any("colaflow-venv/bin:$PATH" in c and "~/.bashrc" in c for c in config["setup_commands"])
    assert any("torch==2.13.0" in c for c in config["setup_commands"]) and "--index-url" not in text
    if name == "onprem.yaml":
        assert any("--system-site-packages" in c for c in config["setup_commands"])  # a Jetson keeps JetPack's torch
        # the classic slip: an unquoted JSON resource map is a YAML mapping
        folded = text[text.index("worker_start_ray_commands:"):]
        unquoted = text.replace(folded, "worker_start_ray_commands:\n  - ulimit -n 65536; ~/colaflow-venv/bin/ray "
                                        "start --address=$RAY_HEAD_IP:6379 --resources='{\"edge\": 1}'\n")
        with pytest.raises(Exception, match="is not of type 'string'"):
            validate_config(prepare_config(yaml.safe_load(unquoted)))


def test_without_ray_everything_else_imports_and_colaflow_ray_says_how_to_install():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import colaflow, colaflow.session, colaflow.client, colaflow.control.trainer\n"
            "try:\n    import colaflow.ray\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'colaflow[ray]'" in out.stdout


def test_a_session_on_ray_trains_the_in_process_adapters(tmp_path):
    """A local Ray instance: the server in an actor, two worker actors; bit-identical adapters."""
    with Session("tiny-llama", ray=True, workers=2, threads=1) as session:
        assert [w["connected"] for w in session.ray.pool.info()] == [True, True]
        job, status = train(session)
        assert status["state"] == "done"
        got = adapters_of(job, tmp_path)
        assert sum(w["fits"] for w in session.ray.pool.info()) > 0
    assert not ray.is_initialized()  # the session started Ray, so it stopped it
    _assert_same(got, in_process(tmp_path / "local"))


def _add_edge_node(c):
    """A fake node with the `edge` resource. Ray gives a raylet a fixed 30 s to register, which a loaded
    2-core machine can miss once: then once more, as an operator would."""
    try:
        return c.add_node(num_cpus=1, resources={"edge": 1})
    except Exception as e:
        if "timed out during startup" not in str(e):
            raise
        return c.add_node(num_cpus=1, resources={"edge": 1})


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"server": 1}})
    edges = [_add_edge_node(c) for _ in range(2)]
    ray.init(address=c.address, namespace="colaflow")
    yield c, edges
    ray.shutdown()
    c.shutdown()


def _examples():
    from procs import examples

    return examples(96, 16, seed=3)


def test_losing_a_node_mid_run_loses_nothing_and_the_pool_scales(cluster, tmp_path):
    from colaflow.ray import RayServer, RayWorkerPool

    c, edges = cluster
    server = RayServer("tiny-llama", args=("--threads", "1", "--reassign-after", "1"), host="127.0.0.1")
    pool = RayWorkerPool(server, "all-edge-nodes", threads=1)
    assert pool.size == 2 and len({w["node"] for w in pool.info()}) == 2  # one actor per edge node
    with Session(address=server.address) as session:
        job = session.submit(_examples(), job_id="lost", steps=10, batch_size=4, **_train_kw())
        while job.status()["step"] < 3:
            time.sleep(0.05)
        c.remove_node(edges[0])  # the node, and the worker actor on it, are gone
        assert job.wait(timeout=180)["state"] == "done"
        _assert_same(adapters_of(job, tmp_path / "lost"), _reference(tmp_path, 10))
        log = server.logs(500)
        assert "lost (no word for" in log and "moving its 2 sites" in log, log[-3000:]  # its sites did move
        # grow from one live worker to three while a job runs: new workers join, no step is lost
        pool.scale(1)
        for _ in range(2):
            _add_edge_node(c)
        job2 = session.submit(_examples(), job_id="scaled", steps=600, batch_size=4, **_train_kw())
        while job2.status()["step"] < 2:
            time.sleep(0.05)
        pool.scale(3)
        assert job2.status()["state"] == "running"  # the pool grew mid-run
        assert pool.size == 3 and all(w["connected"] for w in pool.info())
        assert job2.wait(timeout=300)["state"] == "done"
        _assert_same(adapters_of(job2, tmp_path / "scaled"), _reference(tmp_path, 600))
        pool.scale(2)  # a retired actor says goodbye for good: the server need not wait for it
        end = time.time() + 20
        while "left for good" not in server.logs(500):
            assert time.time() < end, server.logs(50)
            time.sleep(0.2)
    pool.stop()
    server.stop()


def _reference(tmp_path, steps: int) -> dict:
    """The in-process run of the same job, on one thread as the server and actors run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Session("tiny-llama") as s:
            job = s.submit(_examples(), job_id=f"ref-{steps}", steps=steps, batch_size=4, **_train_kw())
            job.wait(timeout=300)
            return adapters_of(job, tmp_path / f"ref-{steps}")
    finally:
        torch.set_num_threads(threads)


def _train_kw() -> dict:
    from colaflow import AdamW, LowRank

    return dict(adapter=LowRank(r=4), optimizer=AdamW(lr=1e-2), targets=["q_proj", "v_proj"], staleness=1,
                fit_interval=2)


@pytest.mark.slow
def test_the_ray_example_runs(tmp_path):
    """examples/ray_cluster.py as documented, on a local Ray instance (a few steps of the main job)."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "ray_cluster.py"), "--steps", "4", "--facts", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done after 4 steps" in out.stdout and "held-out exact match" in out.stdout, out.stdout
    assert (tmp_path / "colaflow-out/ray-knowledge-peft/adapter_config.json").exists()
