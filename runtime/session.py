"""The orchestration API: one object model whether the server runs here, at an address, or on Ray.

    session = colaflow.Session(model="smollm2-135m")            # in this process
    session = colaflow.Session(address="gpu-box:7000", token=T)  # a running `colaflow serve`
    session = colaflow.Session(model="smollm2-135m", ray=True)   # a server actor + worker actors on Ray
    job = session.submit(examples, adapter=colaflow.LowRank(r=8), optimizer=colaflow.AdamW(lr=3e-4),
                         targets=["q_proj", "v_proj"], batch_size=8, steps=100)
    job.wait()                     # a progress bar in a terminal, a line every 30 s in a log; raises JobFailed
    job.metrics()                  # per step: loss, tokens, staleness, time; .ended / .error say how it ended
    job.export("out/", format="peft")
    session.submit(**colaflow.load_job("job.yaml"))   # a YAML job file (see colaflow.data.jobfile)
    session.submit(examples, steps=50, init="out/native")  # continue from a native export

`examples` is data as people have it (see `colaflow.datasets.rows` and README "Data formats"): a
JSONL/JSON/CSV/Parquet path, a list of {"text"}, {"prompt", "completion"} or chat {"messages"} rows,
a `datasets.Dataset`, or token-id rows (`input_ids`, optional `labels`; -100: no loss). Text is
tokenised here, with the model's tokenizer in process and the server's (fetched once) otherwise;
`Session(tokenizer=...)` overrides both.
In-process, a job trains inside `wait()` (in the calling thread); elsewhere it trains on the
server from `submit()` on, and `wait()` watches it.
"""
from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from .adapters.base import AdapterSpec
from .adapters.lowrank import LowRank
from .control.status import ENDED, LIVE
from .data.batches import to_map
from .data.sources import rows
from .engine.evaluate import Metric, eval_map
from .errors import ColaflowError, InvalidArgument, JobFailed, NotFound, NoWorkers, Unavailable
from .job import JobSpec, check_steps
from .learn.optim import AdamW, OptimizerSpec
from .progress import ProgressReport


class Metrics(list):
    """A job's per-step metrics maps, oldest first; `ended` is None while it runs, else done, cancelled
    or failed, and `error` the reason the server gave ("" when done)."""

    def __init__(self, rows: Iterable[dict] = (), ended: str | None = None, error: str = ""):
        super().__init__(rows)
        self.ended, self.error = ended, error


class Job:
    """A submitted job, wherever it runs."""

    def __init__(self, session: Session, job_id: str, steps: int):
        self.session, self.id, self.steps = session, job_id, steps

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict:
        """{job, state, step, steps, loss, error, max_staleness, workers} (`JobInfo.as_dict`)."""
        return self.session._backend.status(self.id)

    def metrics(self) -> Metrics:
        """One map per step so far: step, loss, tokens, tokens_per_s, staleness, lr, grad_norm, bytes_sent,
        bytes_received, time, and `eval_*` on eval steps (docs/evaluation.md); `.ended` says whether and
        how the job ended (done, cancelled, failed) and `.error` why."""
        status = self.status()  # first: a job that ends meanwhile still has all its rows below
        ended = status["state"] if status["state"] in ENDED else None
        return Metrics(self.session._backend.metrics(self.id), ended, status["error"])

    def wait(self, timeout: float | None = None, progress: bool | None = None) -> dict:
        """Until the job ends; its final status. Raises JobFailed, NoWorkers, TimeoutError.

        `progress`: None (default) a progress bar where stderr is a terminal, else a plain line every
        ~30 s on stdout (a script's log, CI, a notebook's output file); True a bar; False nothing."""
        show = ("bar" if sys.stderr.isatty() else "lines") if progress is None else "bar" if progress else "off"
        try:
            status = self.session._backend.wait(self.id, timeout, show, self.session.connect_timeout)
        except KeyboardInterrupt:  # say what became of the job: Ctrl-C stops the waiting, not always the job
            where = ("it pauses here until the next wait()" if isinstance(self.session._backend, _Local)
                     else "it goes on on the server")
            raise KeyboardInterrupt(f"job {self.id}: {where}; job.cancel() ends it") from None
        if status["state"] != "done":
            raise JobFailed(f"job {self.id} ended {status['state']}: {status['error'] or 'no reason given'}")
        return status

    def cancel(self) -> dict:
        return self.session._backend.cancel(self.id)

    def export(self, path: str | Path, format: str = "peft", which: str = "last") -> Path:
        """Write the adapters: `peft` (a LoRA directory stock PEFT loads) or `native` (any kind).

        `which="last"`: the newest version the server holds (a running job's export is a snapshot of
        its progress); `"best"`: the adapters of its best eval step (needs an eval set).
        """
        if format not in ("peft", "native"):
            raise InvalidArgument(f"`format` must be peft or native, got {format!r}")
        if which not in ("last", "best"):
            raise InvalidArgument(f"`which` must be last or best, got {which!r}")
        return self.session._backend.export(self.id, Path(path), format, which)


class Session:
    """Where jobs run: in this process (`model=`), on a server (`address=`), or on Ray (`ray=`).

    On Ray, `server_args` go to `colaflow serve` (e.g. `("--insecure",)` on a private network, or TLS
    and `--tokens`: a non-loopback server refuses to start without them).
    """

    def __init__(self, model=None, *, address: str | None = None, token: str | None = None,
                 tls_ca: bytes | None = None, ray: bool | str = False, workers: int | str = 2,
                 loss: str = "causal_lm", connect_timeout: float = 30.0, threads: int | None = None,
                 server_args: tuple[str, ...] = (), tokenizer=None, dtype: str | None = None,
                 quantize: str | None = None, device_map=None, checkpointing: bool = False):
        """`dtype`, `quantize`, `device_map` and `checkpointing` say how a model named here is held (in
        process or in a Ray server actor), as `colaflow.models.load` and `colaflow serve` take them."""
        if address is not None and (model is not None or ray):
            raise ValueError("pass `address` (a running server) or `model` (in process / on Ray), not both")
        held = {"dtype": dtype, "quantize": quantize, "device_map": device_map}
        self.connect_timeout, self.tokenizer = connect_timeout, tokenizer
        self.ray = None
        self._closed = False
        if address is not None:
            self._backend = _Remote(address, token, tls_ca)
        elif ray:
            from . import ray as colaflow_ray  # says how to install Ray if it is missing

            self.ray = colaflow_ray.RayDeployment(model or "smollm2-135m", workers=workers, address=ray,
                                                  threads=threads or 1,
                                                  server_args=(*colaflow_ray.held_args(checkpointing=checkpointing,
                                                                                       **held), *server_args))
            self._backend = _Remote(self.ray.address, None, None)
        else:
            self._backend = _Local(model or "smollm2-135m", loss, held, checkpointing)

    def submit(self, examples: Iterable[dict] | str | Path, *, steps: int, adapter: AdapterSpec | None = None,
               optimizer: OptimizerSpec | None = None, targets: list[str] | str | None = None,
               batch_size: int | None = None, seed: int = 0, job_id: str | None = None, staleness: int = 0,
               fit_interval: int = 1, codec_x: str = "raw", codec_g: str = "raw", state_every: int = 1,
               packets: str = "full", init: str | Path | None = None, eval_data: object = None,
               eval_prompts: object = None, eval_every: int = 10, patience: int | None = None,
               metric: Metric | None = None) -> Job:
        """Start fine-tuning on `examples` for `steps` steps; the defaults are the ColA paper's.
        `batch_size` rows make a batch: by default 8, or every example when there are fewer.

        `init`: a native export (`job.export(dir, format="native")`) whose weights the adapters start
        from; `adapter` defaults to the export's. The optimizer and LR schedule start fresh (an export
        carries no optimizer state): continuing N steps equals N more steps from those weights.

        Eval while training (docs/evaluation.md): `eval_data` (any source `examples` takes) gives
        `eval_loss`, `eval_prompts` (prompt/completion rows: exact match on the completion) gives
        `eval_exact_match`, every `eval_every` steps and at the last; after `patience` evals without
        improvement the job stops early, done. `metric(predictions, references) -> dict` (token-id
        lists) runs in process only.

        `packets="projected"` (LowRank or Linear adapters, staleness 0): each step's packets are the
        products the fit needs, not each token's x and g — the same fit, far fewer bytes at scale
        (docs/transport.md). The default "full" serves every adapter kind.
        """
        if self._closed:
            raise ColaflowError("this Session is closed")
        try:
            if init is not None:
                from .export import load

                init_spec = load(_init_dir(init))[0]
                adapter = adapter or init_spec.adapter
            spec = JobSpec(job_id or f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}",
                           adapter or LowRank(), optimizer or AdamW(), targets, fit_interval, staleness, seed=seed,
                           codec_x=codec_x, codec_g=codec_g, state_every=state_every, packets=packets)
            data = to_map(self._rows(examples), batch_size, seed)
            evals = eval_map(None if eval_data is None else self._rows(eval_data),
                             None if eval_prompts is None else self._rows(eval_prompts), eval_every, patience)
            if evals is not None:
                data["eval"] = evals
            if metric is not None and (evals is None or "prompts" not in evals):
                raise ValueError("`metric` needs `eval_prompts`: it scores greedy answers to them")
            check_steps(steps)
        except ValueError as e:
            raise e if isinstance(e, ColaflowError) else InvalidArgument(str(e)) from None
        self._backend.submit(spec, data, steps, init, metric)
        return Job(self, spec.job_id, steps)

    def _rows(self, source) -> list[dict]:
        """Token-id rows from any data source, tokenised here (see colaflow.datasets.rows)."""
        tokenizer = self._backend.tokenizer if self.tokenizer is None else self.tokenizer
        return rows(source, tokenizer, self._backend.max_length())

    def job(self, job_id: str) -> Job:
        status = self._backend.status(job_id)
        return Job(self, job_id, status["steps"])

    def jobs(self) -> list[Job]:
        return [Job(self, s["job"], s["steps"]) for s in self._backend.statuses()]

    def close(self) -> None:
        """Let go of the server (and stop what `ray=` started); a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self._backend.close()
        finally:
            if self.ray is not None:
                self.ray.stop()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _init_dir(init) -> Path:
    path = Path(init)
    if not (path / "adapter.json").exists():
        raise InvalidArgument(f"`init` {str(init)!r} is not a native colaflow export (no adapter.json); "
                              "export one with format=\"native\"")
    return path


class _Local:
    """In this process: the reference Trainer (Host + Scheduler + Worker), driven inside `wait()`."""

    def __init__(self, model, loss: str, held: dict | None = None, checkpointing: bool = False):
        from .control.trainer import Trainer
        from .engine import loss as losses

        self.name, self._tokenizer = model if isinstance(model, str) else type(model).__name__, None
        if isinstance(model, str):
            from .models import load, tiny

            model, self._tokenizer = ((tiny(model[len("tiny-"):]), None) if model.startswith("tiny-")
                                      else load(model, **{k: v for k, v in (held or {}).items() if v is not None}))
        if not hasattr(losses, loss):
            raise ValueError(f"unknown `loss` {loss!r}; known: causal_lm, token_cls, seq_cls")
        self.trainer = Trainer(model, [], getattr(losses, loss), checkpointing=checkpointing)
        self.data: dict[str, object] = {}

    def tokenizer(self):
        if self._tokenizer is None:
            raise InvalidArgument(f"the model {self.name!r} has no tokenizer: pass Session(tokenizer=...)")
        return self._tokenizer

    def max_length(self) -> int | None:
        return self.trainer.host.limits()[1]

    def submit(self, spec: JobSpec, data: dict, steps: int, init: str | Path | None = None,
               metric: Metric | None = None) -> None:
        from .export import init_blob, init_params

        if spec.job_id in self.trainer.specs:
            raise InvalidArgument(f"job {spec.job_id!r} already exists")
        try:  # the server's one submit path (colaflow.control.admission), in this process
            params = init_params(spec, init_blob(init)) if init is not None else None
            self.data[spec.job_id] = self.trainer.add_job(spec, steps, init=params, data=data, metric=metric)
        except (ValueError, TypeError) as e:  # the same refusals a server answers with INVALID_ARGUMENT
            raise InvalidArgument(f"submit {spec.job_id}: {e}") from None

    def _job(self, job_id: str):
        if job_id not in self.trainer.specs:
            raise NotFound(f"unknown job {job_id!r}")
        return self.trainer.scheduler.job(job_id)

    def status(self, job_id: str) -> dict:
        self._job(job_id)
        return self.trainer.scheduler.status(job_id).as_dict()

    def statuses(self) -> list[dict]:
        return [self.status(j) for j in self.trainer.specs]

    def metrics(self, job_id: str) -> list[dict]:
        return [dict(m) for m in self._job(job_id).metrics]

    def wait(self, job_id: str, timeout: float | None, show: str, connect_timeout: float) -> dict:
        job, deadline = self._job(job_id), None if timeout is None else time.monotonic() + timeout
        with ProgressReport(show, job.steps, job_id) as bar:
            bar.update(job.t)
            while job.state in LIVE and job.t < job.steps:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still at step {job.t}/{job.steps} after {timeout} s")
                try:
                    losses = self.trainer.step({job_id: next(self.data[job_id])})
                except Exception as e:  # bad data or a refused packet: the job fails with the reason, as on a server
                    if job.state not in ENDED:
                        self.trainer.scheduler.fail(job_id, f"step {job.t} failed: {type(e).__name__}: {e}")
                    break
                bar.update(job.t, losses[job_id])
        self.trainer.scheduler.ready()  # the last updates are in: the job is done
        return self.status(job_id)

    def cancel(self, job_id: str) -> dict:
        self.trainer.scheduler.cancel(self._job(job_id).job_id)
        return self.status(job_id)

    def export(self, job_id: str, path: Path, format: str, which: str = "last") -> Path:
        from .export import write

        self._job(job_id)
        try:
            weights = self.trainer.scheduler.weights(job_id, which)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        return write(weights, path, format, model=self.trainer.host.model)

    def close(self) -> None:
        pass


class _Remote:
    """A running `colaflow serve`, through its control service."""

    def __init__(self, address: str, token: str | None, tls_ca: bytes | None):
        from .wire.client import Client

        self.client = Client(address, token=token, tls_ca=tls_ca)

    def tokenizer(self):
        return self.client.tokenizer()

    def max_length(self) -> int | None:
        return None  # the server's tokenizer carries the model's context as its model_max_length

    def submit(self, spec: JobSpec, data: dict, steps: int, init: str | Path | None = None,
               metric: Metric | None = None) -> None:
        if metric is not None:
            raise InvalidArgument("`metric` runs in process only: a server computes the built-in eval_loss and "
                                  "eval_exact_match (drop `metric`, or use Session(model=...))")
        self.client.submit_map(spec, data, steps, init)

    def status(self, job_id: str) -> dict:
        return self.client.get(job_id).as_dict()

    def statuses(self) -> list[dict]:
        return [s.as_dict() for s in self.client.list()]

    def metrics(self, job_id: str) -> list[dict]:
        return self.client.metrics_so_far(job_id)

    def wait(self, job_id: str, timeout: float | None, show: str, connect_timeout: float) -> dict:
        start = moved = time.monotonic()
        status = self.status(job_id)
        with ProgressReport(show, status["steps"], job_id) as bar:
            while status["state"] not in ENDED:
                now = time.monotonic()
                if timeout is not None and now - start > timeout:
                    raise TimeoutError(f"job {job_id} still at step {status['step']}/{status['steps']} "
                                       f"after {timeout} s")
                if now - moved > connect_timeout and self.client.health().workers == 0:
                    raise NoWorkers(f"no workers connected for {connect_timeout:.0f} s (job {job_id} at step "
                                    f"{status['step']}/{status['steps']}): start `colaflow edge --server "
                                    f"{self.client.address}` on a device, or a colaflow.ray.RayWorkerPool")
                time.sleep(0.2)
                new = self._status_through_restarts(job_id, connect_timeout)
                if new["step"] != status["step"]:
                    moved = time.monotonic()
                status = new
                bar.update(status["step"], status["loss"])
        return status

    def _status_through_restarts(self, job_id: str, patience: float) -> dict:
        """The job's status; a server that is away (restarting on its state dir) gets `patience` seconds."""
        deadline = time.monotonic() + patience
        while True:
            try:
                return self.status(job_id)
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def cancel(self, job_id: str) -> dict:
        return self.client.cancel(job_id).as_dict()

    def export(self, job_id: str, path: Path, format: str, which: str = "last") -> Path:
        return self.client.export(job_id, path, format=format, which=which)

    def close(self) -> None:
        self.client.close()

