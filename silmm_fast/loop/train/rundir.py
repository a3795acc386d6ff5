"""The run directory as the loop sees it: opened once (checked, resumed), then one helper, ``RunDir.step``, through
which every step of the loop runs.

``step`` does three things, so the loop's phases need not: it skips a step that ``state.json`` marks done by loading
the step's saved result; it saves a new result atomically and only then marks the step done (a crash loses at most the
step that was running; the files' checksums go into ``state.json``); and it shares results across processes. A step's
``compute`` is collective (every rank runs it and gets the whole result, see ``distributed.map_units``), so the value
computed in this process is the one used, never written and read back; only rank 0 touches the directory, and a
loaded result reaches the other ranks by broadcast.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from silmm_fast.loop.train import distributed, store
from silmm_fast.loop.train.config import TrainConfig, identity
from silmm_fast.loop.world import CATEGORIES

T = TypeVar("T")


def log(msg: str) -> None:
    tqdm.write(msg)


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_setup(cfg: TrainConfig, dist: distributed.Dist, n_heldout: int) -> None:
    """Before any work: the same configuration on every rank, enough prompts for every rank, a usable strategy."""
    world = dist.world_size
    dist.check_same_config(cfg.to_dict())
    n_prompts = len(CATEGORIES) * cfg.sample.prompts_per_category
    for what, n in (
        (f"prompts per iteration ({len(CATEGORIES)} categories x sample.prompts_per_category)", n_prompts),
        (f"held-out prompts ({len(CATEGORIES)} categories x eval.heldout_per_category)", n_heldout),
    ):
        if world > n:
            raise ValueError(
                f"world size {world} is larger than the number of {what} = {n}: start fewer processes "
                "or ask for more prompts"
            )
    distributed.check_strategy(cfg.dist.strategy, dist)
    n_units = -(-n_prompts // cfg.sample.chunk)
    if n_units < world and dist.is_main:
        log(
            f"note: {n_prompts} prompts make only {n_units} units of sample.chunk={cfg.sample.chunk} for "
            f"{world} processes; some will idle (a smaller sample.chunk spreads the work)"
        )


class RunDir:
    """One run directory, on one process of the run: rank 0 reads and writes it, the others hear from rank 0."""

    def __init__(self, cfg: TrainConfig, dist: distributed.Dist) -> None:
        self.cfg = cfg
        self.dist = dist
        self.main = dist.is_main
        self.path = cfg.run_dir()
        self.state: store.RunState | None = None

    def log(self, msg: str) -> None:
        if self.main:
            log(msg)

    def iter_dir(self, it: int) -> Path:
        return self.path / f"iter{it}"

    # --- opening -------------------------------------------------------------------------------------------------
    def open(self, n_heldout: int) -> RunDir:
        """Create (or resume) the run directory: writable, a setup that can run (``check_setup``), the run's
        configuration, the done steps whose files are intact. Every rank calls it; every rank ends with the same
        list of done steps."""
        self._prepare()
        check_setup(self.cfg, self.dist, n_heldout)
        self._check_config()
        self._check_files()
        return self

    def _check_on_main(self, check: Callable[[], str | None]) -> None:
        """``check()`` on rank 0: the message it returns (None: no error) is raised as a ValueError on every rank, and
        whatever it raises stops every rank too (``Dist.from_main``)."""
        error = self.dist.from_main(check)
        if error:
            raise ValueError(error)

    def _prepare(self) -> None:
        """Create the run directory (rank 0), or refuse by name an ``--out`` that cannot hold one: a file, or a
        directory this process cannot write."""

        def writable() -> str | None:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-check.", suffix=store.TMP_SUFFIX)
                os.close(fd)
                os.unlink(probe)
                orphans = store.remove_orphans(self.path)
                if orphans:
                    self.log(f"removed {len(orphans)} temporary files that an interrupted run left in {self.path}")
            except OSError as err:
                return f"out: expected a writable directory, got {str(self.path)!r} ({err.strerror or err})"
            return None

        def read_state() -> list[str]:
            self.state = store.RunState(self.path)
            return self.state.done

        self._check_on_main(writable)
        done = self.dist.from_main(read_state)
        if not self.main:
            self.state = store.RunState(self.path, done=done, persist=False)

    def _check_config(self) -> None:
        """A resumed run must use the configuration it started with (the run identity: ``dist`` may change), except
        where no completed step used what changed: anything before the first step is done (a start that failed, say
        on a wrong model path), and the optimizer settings before any train step is done (a run whose training
        diverged). Then the new configuration replaces the saved one."""
        path = self.path / "config.json"
        current = self.cfg.run_identity()

        def check() -> str | None:
            import yaml

            error = None
            # a config written before the runtime fields were left out of the identity compares without them
            saved = identity(store.read_json(path)) if path.exists() else None
            restore = saved is None and bool(self.state.done)
            if restore:  # the run's settings must not be lost with config.json: its copy in config.yaml stands in
                copy = self.path / "config.yaml"
                try:
                    data = yaml.safe_load(copy.read_text()) if copy.is_file() else None
                except (yaml.YAMLError, UnicodeDecodeError):
                    data = None
                if isinstance(data, dict):
                    saved = identity(data)
                else:
                    error = (
                        f"out: {self.path} holds completed steps but no config.json and no readable config.yaml: "
                        "its settings are unknown; restore one of them, or use another --out"
                    )
            if error is None and saved is not None and saved != current:
                old, new = _flatten(saved), _flatten(current)
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                done = self.state.done
                unused = not done or (
                    all(k.startswith("optim.") for k in diff) and not any(s.endswith("/train") for s in done)
                )
                if unused:
                    self.log(f"note: no completed step of {self.path} used {', '.join(diff)}; the new settings apply")
                    saved = None
                else:
                    changes = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
                    error = (
                        f"out: {self.path} holds a run with another configuration ({changes}); "
                        "use another --out, or the same settings to resume it"
                    )
            if error is None and (saved is None or restore):
                store.write_json(path, current)
                store.write_text(self.path / "config.yaml", yaml.safe_dump(current, sort_keys=False))
            return error

        self._check_on_main(check)

    def _check_files(self) -> None:
        """Each done step's files must be the ones it wrote (checksums in ``state.json``): the first step with a
        missing or changed file is redone, with every step done after it (the run is deterministic, so they give the
        same results as before)."""

        def repair() -> list[str]:
            damaged = self.state.damaged()
            if damaged:
                step, name = damaged
                later = self.state.done[self.state.done.index(step) + 1 :]
                self.log(
                    f"{self.path / name} is missing or changed since step {step} wrote it: redoing {step}"
                    + (f" and the {len(later)} steps done after it" if later else "")
                )
                self.state.undo_from(step)
            return self.state.done

        done = self.dist.from_main(repair)
        if not self.main:
            self.state.done = list(done)

    # --- steps ---------------------------------------------------------------------------------------------------
    def is_done(self, it: int, phase: str) -> bool:
        return self.state.is_done(f"iter{it}/{phase}")

    def step(
        self,
        it: int,
        phase: str,
        compute: Callable[[], T],
        save: Callable[[T], None],
        load: Callable[[], T],
        broadcast: bool = True,
    ) -> T:
        """The result of step ``iter{it}/{phase}``.

        Done: ``load()`` on rank 0, its value broadcast to the others (``broadcast=False``: ``load()`` on every rank,
        for a loader that shares by itself). Not done: ``compute()`` on every rank (collective; every rank gets the
        result), ``save(result)`` on rank 0, the time taken recorded in ``timings.json``, the step marked done in
        ``state.json`` with its files' checksums; every rank waits for that, then uses the computed value. A load or
        save that fails on rank 0 stops every rank (``Dist.from_main``).
        """
        key = f"iter{it}/{phase}"
        if self.state.is_done(key):
            return self.dist.from_main(load) if broadcast else load()
        t0 = time.perf_counter()
        with store.recording() as written:
            value = compute()
            self.dist.from_main(lambda: save(value))  # a failed save stops every rank, none waits at the barrier
        self._timed(it, phase, time.perf_counter() - t0)
        self.state.record(key, written)
        self.state.mark(key)
        self.dist.barrier()
        return value

    def _timed(self, it: int, phase: str, seconds: float) -> None:
        if not self.main:
            return
        path = self.iter_dir(it) / "timings.json"
        timings = store.read_json(path) if path.exists() else {}
        timings[phase] = round(seconds, 3)
        store.write_json(path, timings)

    def timings(self, it: int) -> dict:
        """Seconds per phase of iteration ``it`` (rank 0)."""
        path = self.iter_dir(it) / "timings.json"
        return store.read_json(path) if path.exists() else {}
