"""Sharded, atomic checkpoints with ``torch.distributed.checkpoint`` (DCP), resume, and a safetensors export.

Layout under ``<out>/checkpoints/``::

    step_00001000/            a complete checkpoint (only complete ones carry this name)
        .metadata, __0_0.distcp, __1_0.distcp …   DCP shards of the models and the optimizer
        rng_rank0.pt, rng_rank1.pt …              per-rank RNG states (torch CPU/CUDA, python, numpy)
        meta.json                                  step, epoch, data position, config (written last)
    .tmp-step_00002000/       a checkpoint being written (ignored by resume, removed by the next save)
    .tmp-deleted-step_…/      an old checkpoint being deleted (renamed first, so never half a step_*)

Atomicity: every rank writes into the ``.tmp-`` folder; once every rank's writes succeeded (the ranks
agree on each stage's outcome, so a failure on one rank raises on all) rank 0 writes ``meta.json``,
fsyncs, and renames the folder to its final name (``os.rename`` of a directory is atomic on POSIX
filesystems), then fsyncs the parent. A job killed at any point therefore leaves either the old set
of complete checkpoints or the old set plus the new one, never a half-written ``step_*``. Old
checkpoints beyond ``keep`` are deleted only after the new one is complete. A run starting from step 0
first moves an earlier run's complete checkpoints aside (:meth:`Checkpointer.set_aside_previous_run`).

What is saved: one DCP state dict ``{"model": …, "optim": …}`` from
``get_state_dict(container, optimizer)`` where the container holds ``encoder``, ``predictor`` and
``target_encoder`` (sharded DTensors stay sharded; names are free of wrapper prefixes, so a run may
resume with a different ``--ac`` / ``--compile`` / world size), plus the per-rank RNG files and
``meta.json``. The schedules are pure functions of the step and need no state.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .._checks import write_atomic, write_json_atomic
from .distributed import DistInfo, agree, broadcast_object

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8,})(\.old)?$")  # ".old": a step being saved again (see _finalize)
_TMP_PREFIX = ".tmp-"


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _delete(path: str) -> None:
    """Delete the checkpoint folder ``path``: renamed to a ``.tmp-`` name first (one atomic rename), then removed.
    ``shutil.rmtree`` removes file by file: a job killed during it would otherwise leave a ``step_*`` folder that
    still holds ``meta.json`` and ``.metadata`` but not all its shards, which :func:`list_checkpoints` takes for
    complete; what a killed deletion leaves is now a ``.tmp-`` folder, removed by the next :meth:`Checkpointer.prune`."""
    doomed = os.path.join(os.path.dirname(path), _TMP_PREFIX + "deleted-" + os.path.basename(path))
    try:
        if os.path.exists(doomed):
            shutil.rmtree(doomed)
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(folder: str) -> List[Tuple[int, str]]:
    """Complete checkpoints ``(step, path)`` in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found: Dict[int, str] = {}
    for name in sorted(os.listdir(folder)):  # "step_N" sorts before "step_N.old": the plain name wins
        m = _NAME.match(name)
        path = os.path.join(folder, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(path, ".metadata")):
            found.setdefault(int(m.group(1)), path)
    return sorted(found.items())


def latest_checkpoint(folder: str) -> Optional[str]:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def _dcp_state(container: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    if optimizer is None:
        return {"model": get_model_state_dict(container)}
    msd, osd = get_state_dict(container, optimizer)
    return {"model": msd, "optim": osd}


def _dcp_errors() -> Tuple[type, ...]:
    """What a DCP save or load raises: its ``CheckpointException`` (one rank's failure, reported on every rank)
    derives from ``BaseException``, so ``except Exception`` alone lets it through as a raw traceback."""
    from torch.distributed.checkpoint.api import CheckpointException
    return (Exception, CheckpointException)


def _dcp_cause(e: BaseException) -> Tuple[str, BaseException]:
    """``(where, error)`` for a message: the first rank's own error inside DCP's ``CheckpointException`` (whose
    text is every rank's whole traceback), ``("", e)`` for any other error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        cause = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        ranks = ", ".join(str(r) for r in sorted(failures))
        return f"rank{'s' if len(failures) > 1 else ''} {ranks}: ", cause
    return "", e


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes a single process' when no process group exists: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def set_aside(path: str, info: DistInfo, only_if: Optional[Callable[[], bool]] = None) -> Optional[str]:
    """Rename an earlier run's ``path`` (a folder or file) to ``<path>.replaced-<UTC time>[-n]`` on the
    main rank, when it exists (and ``only_if()`` holds); return the new name on every rank (None when
    nothing was moved). Nothing is deleted. A move that fails (a permission) is a :class:`ConfigError`
    on every rank (the main rank's alone would leave the others waiting for it in the broadcast)."""
    from .config import ConfigError
    moved, problem = None, None
    if info.is_main:
        try:
            if os.path.exists(path) and (only_if is None or only_if()):
                base = f"{path.rstrip(os.sep)}.replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
                n = 1
                while os.path.exists(base + (f"-{n}" if n > 1 else "")):
                    n += 1
                moved = base + (f"-{n}" if n > 1 else "")
                os.rename(path, moved)
                _fsync_dir(os.path.dirname(os.path.abspath(path)))
        except OSError as e:
            moved, problem = None, (f"out: cannot move the earlier run's {path} aside (to {moved}): "
                                    f"{type(e).__name__}: {e}")
    moved, problem = broadcast_object((moved, problem), info)
    if problem:
        raise ConfigError(problem)
    return moved


@contextlib.contextmanager
def out_lock(out: str, info: DistInfo):
    """Hold ``<out>/.lock`` (an exclusive ``flock`` of the main rank) while a run trains in ``out``; a second run
    started in the same ``out`` meanwhile stops with a :class:`ConfigError` naming ``out`` before it moves, prunes
    or writes anything. Two runs in one folder would otherwise set each other's checkpoints and log aside, prune
    each other's checkpoints and in-progress ``.tmp-`` folders, and append to each other's ``log.jsonl``. The
    lock goes with the process (a killed run leaves none). On a filesystem without ``flock`` there is no check."""
    import fcntl
    import socket
    from .config import ConfigError
    fh, problem = None, None
    if info.is_main:
        lock = os.path.join(out, ".lock")
        try:
            os.makedirs(out, exist_ok=True)
            fh = open(lock, "a+")
        except OSError as e:  # (not raised here: the other ranks would wait in agree for this one)
            problem = f"out: cannot create {lock}: {type(e).__name__}: {e}"
    if fh is not None:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            problem = (f"out: {out} is in use by another run ({fh.read().strip() or 'unknown process'}); wait for "
                       f"it to end, or give this run another --out")
            fh.close()
            fh = None
        except OSError:  # no flock on this filesystem
            pass
        else:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            fh.flush()
    problem = agree(problem, info)  # every rank stops, none waits in a collective
    if problem:
        raise ConfigError(problem)
    try:
        yield
    finally:
        if fh is not None:
            fh.close()


class CheckpointReadError(ValueError):
    """A checkpoint's file (meta.json, ``.metadata``, a shard) is missing, damaged or truncated: the message names
    the checkpoint and the file or rank."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; raised on every rank alike, the message names what failed and where."""


class Checkpointer:
    """Save / find / load checkpoints of one run (see the module docstring)."""

    def __init__(self, folder: str, info: DistInfo, keep: int = 2):
        self.folder, self.info, self.keep = folder, info, max(1, int(keep))

    # ---- save ------------------------------------------------------------------------------
    def save(self, step: int, container: nn.Module, optimizer: torch.optim.Optimizer, meta: Dict[str, Any]) -> str:
        import torch.distributed.checkpoint as dcp
        info = self.info
        final = os.path.join(self.folder, step_dirname(step))
        tmp = os.path.join(self.folder, _TMP_PREFIX + step_dirname(step))
        # Each stage may fail on some ranks only (a full disk or a permission on one node, the main rank's own
        # files): the ranks agree on its outcome (distributed.agree, in place of a barrier) and all raise the
        # same CheckpointError, instead of the others waiting for a stopped rank in the next collective
        # (what failed, its exception) of this rank's current stage, None while all went well
        failed: Optional[Tuple[str, BaseException]] = None
        if info.is_main:
            try:
                os.makedirs(self.folder, exist_ok=True)
                if os.path.exists(tmp):
                    shutil.rmtree(tmp)
                os.makedirs(tmp)
            except OSError as e:
                failed = (f"creating {tmp}: ", e)
        self._agree_or_raise(step, tmp, failed)
        rng_file = os.path.join(tmp, f"rng_rank{info.rank}.pt")
        try:
            with _quiet_single_process():  # collective: DCP raises a failure of any rank on every rank
                dcp.save(_dcp_state(container, optimizer), checkpoint_id=tmp)
        except _dcp_errors() as e:  # e.g. a full disk: DCP reports it as "unexpected pos …", naming no cause
            failed = _dcp_cause(e)
        else:
            try:
                with open(rng_file, "wb") as fh:  # synced like the shards
                    torch.save(rng_state(), fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            except Exception as e:  # this rank's alone, named: a failed write names no file
                failed = (f"writing {rng_file}: ", e)
        self._agree_or_raise(step, tmp, failed)
        if info.is_main:
            try:
                self._finalize(tmp, final, dict(meta, step=step, world_size=info.world_size))
            except OSError as e:
                failed = (f"publishing {final}: ", e)
            else:
                try:
                    self.prune()
                except OSError as e:  # the new checkpoint is complete: older ones merely stay
                    log.warning("checkpoint: pruning %s failed (older checkpoints kept): %s", self.folder, e)
        self._agree_or_raise(step, tmp, failed)
        return final

    def _agree_or_raise(self, step: int, tmp: str, failed: Optional[Tuple[str, BaseException]]) -> None:
        """Every rank calls it (one collective): when a stage failed on any rank (``failed``: this rank's
        ``(what, exception)``, None where it went well), every rank raises :meth:`_save_failed`'s error."""
        problem = agree(None if failed is None else f"{failed[0]}{type(failed[1]).__name__}: {failed[1]}", self.info)
        if problem:
            raise self._save_failed(step, tmp, problem) from (failed[1] if failed else None)

    def _save_failed(self, step: int, tmp: str, problem: str) -> CheckpointError:
        """The error of a save that failed while writing (``problem``: what failed, on which ranks): the partial
        ``.tmp-`` folder is removed (by the main rank; on a full disk it holds the space the next try needs) and
        the message names the folder and the space left on its filesystem. The previous checkpoint is
        untouched: nothing was published."""
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"{shutil.disk_usage(self.folder).free / 2**30:.2f} GiB free there now"
        except OSError:
            free = "free space unknown"
        return CheckpointError(f"checkpoint: saving step {step} into {self.folder} failed ({free}; the previous "
                               f"checkpoint is intact, --resume continues from it): {problem}")

    def _finalize(self, tmp: str, final: str, meta: Dict[str, Any]) -> None:
        """Write meta.json last, then publish the folder by one atomic rename."""
        write_json_atomic(os.path.join(tmp, "meta.json"), meta)
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. a re-run): replace it; a crash
            # between the two renames leaves step_N.old, which list_checkpoints still finds
            old = final + ".old"
            if os.path.exists(old):
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(tmp, final)
            _delete(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.folder)

    def prune(self) -> None:
        """Delete complete checkpoints beyond the newest ``keep``, stale temporary folders, and ``step_N.old``
        folders that are no checkpoint (:meth:`_finalize` killed between its renames, over a ``step_N`` that was
        incomplete, or shadowed by a complete ``step_N``): a whole checkpoint's worth of disk each."""
        found = list_checkpoints(self.folder)
        for _, path in found[:-self.keep]:
            _delete(path)
        live = {os.path.basename(path) for _, path in found}
        for name in os.listdir(self.folder):
            if name.startswith(_TMP_PREFIX) or (name.endswith(".old") and _NAME.match(name) and name not in live):
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    def set_aside_previous_run(self) -> Optional[str]:
        """Called by a run that starts from step 0: move the complete checkpoints of an earlier run in
        this folder (one that was not resumed) to ``<folder>.replaced-<UTC time>`` and return that path
        (None when there were none). Otherwise :meth:`prune` would keep the earlier run's higher step
        numbers and delete each checkpoint of this run right after writing it, and a later ``--resume``
        would continue the earlier run. Nothing is deleted."""
        return set_aside(self.folder, self.info, only_if=lambda: bool(list_checkpoints(self.folder)))

    # ---- load ------------------------------------------------------------------------------
    def latest(self) -> Optional[str]:
        path = latest_checkpoint(self.folder) if self.info.is_main else None
        return broadcast_object(path, self.info)

    def load(self, path: str, container: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
        """Load models, optimizer and this rank's RNG state from ``path``; return its meta.json, with
        ``rng_restored``: False where the checkpoint was written by another world size (the caller re-seeds).

        Written by this world size, the resume is bit-exact (docs/training.md), which needs every rank's own
        ``rng_rank<N>.pt``: one that is missing or unreadable on any rank is a :class:`ConfigError` on every rank
        (agreed before the collective load, so none waits in it for a rank that stopped), nothing loaded."""
        from .config import ConfigError
        state, problem, same_world = None, None, False
        try:
            same_world = read_meta(path).get("world_size") == self.info.world_size
        except CheckpointReadError as e:
            problem = f"resume: {e}; move {path} aside to resume from the checkpoint before it"
        rng_file = os.path.join(path, f"rng_rank{self.info.rank}.pt")
        if same_world:
            try:
                state = torch.load(rng_file, weights_only=False)  # our own file: python/numpy states are tuples
            except Exception as e:  # missing (deleted, or a copy that missed it) or damaged
                why = "it is missing" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
                problem = (f"resume: cannot read {rng_file}, the RNG states of rank {self.info.rank} ({why}): without "
                           f"them the resumed run would not be bit-exact. Restore the file, or move {path} aside "
                           f"to resume from the checkpoint before it")
        problem = agree(problem, self.info)
        if problem:
            raise ConfigError(problem)
        try:  # (DCP reports a damaged shard on every rank: no agreement needed)
            meta = load_state(path, container, optimizer)
        except CheckpointReadError as e:
            raise ConfigError(f"resume: {e}; move {path} aside to resume from the checkpoint before it") from e
        if state is not None:
            set_rng_state(state)
        meta["rng_restored"] = state is not None
        return meta


def read_meta(path: str) -> Dict[str, Any]:
    """The checkpoint's ``meta.json`` as a dict; one that is missing, unreadable or not a JSON object is a
    :class:`CheckpointReadError` naming it."""
    file = os.path.join(path, "meta.json")
    try:
        with open(file) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise CheckpointReadError(f"checkpoint: cannot read {file} ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise CheckpointReadError(f"checkpoint: {file} holds {type(meta).__name__}, not the checkpoint's JSON object")
    return meta


# param-group keys that choose how an optimizer computes, not what it has learned
OPTIMIZER_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def load_state(path: str, container: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Load the models (and the optimizer, when given) of the checkpoint ``path`` into ``container``;
    return its meta.json. Every tensor of ``container`` must be in the checkpoint. A damaged or truncated
    file of the checkpoint (meta.json, ``.metadata``, a shard) is a :class:`CheckpointReadError` naming it, not
    DCP's raw traceback."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
    meta = read_meta(path)
    state = _dcp_state(container, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=path)
    except _dcp_errors() as e:
        where, cause = _dcp_cause(e)
        first = str(cause).splitlines()[0] if str(cause) else "no message"
        raise CheckpointReadError(f"checkpoint: cannot read {path} ({where}{type(cause).__name__}: {first}); a file "
                                  f"of it is damaged, truncated or missing, or it holds other tensors than these "
                                  f"models") from e
    if optimizer is None:
        set_model_state_dict(container, state["model"])
    else:
        # the groups' kernel choice is this run's, not the checkpoint's: a CPU run saved with the foreach AdamW and
        # resumed with skip_nonfinite_grads needs the fused one (the only one that takes found_inf)
        kernels = [{k: g[k] for k in OPTIMIZER_IMPLEMENTATION if k in g} for g in optimizer.param_groups]
        set_state_dict(container, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for group, kept in zip(optimizer.param_groups, kernels):
            group.update(kept)
    return meta


def find_checkpoint(path: str, step: Optional[int] = None) -> str:
    """The checkpoint folder meant by ``path``: a ``step_*`` folder itself, or the newest complete one
    (the one of ``step``, when given) in ``<path>/checkpoints`` or in ``path``."""
    if os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(path, ".metadata")):
        m = _NAME.match(os.path.basename(os.path.normpath(path)))
        if step is not None and (m is None or int(m.group(1)) != step):
            raise ValueError(f"step: {path} is not the checkpoint of step {step}")
        return path
    for folder in (os.path.join(path, "checkpoints"), path):
        found = dict(list_checkpoints(folder))
        if found:
            if step is None:
                return found[max(found)]
            if step not in found:
                raise ValueError(f"step: no complete checkpoint of step {step} in {folder} (found {sorted(found)})")
            return found[step]
    raise FileNotFoundError(f"run: no complete checkpoint in {path} (looked for {path}/checkpoints/step_*, "
                            f"{path}/step_* and {path} itself)")


def load_run_models(path: str, step: Optional[int] = None):
    """The encoder, predictor and target encoder of a training checkpoint (found by :func:`find_checkpoint`),
    whole and float32 on the CPU, built from the run's own config; returns ``(JEPAModels, meta)``. Any world
    size, sharding, AC or compile setting of the run: the checkpoint's names are free of wrappers. The models
    compute as the official ones do: the run's numerics levers (``bf16_residual``, ``fused_target_gelu``) were
    settings of its steps, not of its weights, and stay behind."""
    from .config import config_from_dict
    from .loop import JEPAContainer, build_models
    ckpt = find_checkpoint(path, step)
    saved = read_meta(ckpt).get("config") or {}
    # init_from only seeded the run's first step (its weights are in the checkpoint now): validating it would
    # refuse a run whose source file has since moved, or was named relative to another working directory
    cfg = config_from_dict(dict(saved, init_from="", bf16_residual=False, fused_target_gelu=False))
    with torch.device("meta"):  # no random initialisation: every tensor is read from the checkpoint
        models = build_models(cfg)
    container = JEPAContainer(models).to_empty(device="cpu")  # (moves the modules that models holds)
    meta = load_state(ckpt, container)
    meta["path"] = ckpt
    return models, meta


def to_official(path: str, out: str, step: Optional[int] = None) -> Dict[str, Any]:
    """Convert a training checkpoint to the official I-JEPA / StoP layout at ``out`` (a ``.pth.tar`` that the
    official code and :func:`stop_kernels.load_official_checkpoint` read); returns the checkpoint's meta.json."""
    from ..models.official import check_output_file, save_official_checkpoint
    check_output_file(out, "out")  # before the run's three models are read
    models, meta = load_run_models(path, step)
    save_official_checkpoint(out, models.encoder, models.predictor, models.target_encoder, epoch=int(meta["epoch"]))
    return meta


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m stop_kernels.training.checkpoint",
                                description="Tools for the checkpoints of a training run.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("to-official", help="write a checkpoint's encoder, predictor and target encoder in the "
                       "official I-JEPA / StoP layout (.pth.tar)")
    c.add_argument("run", help="the run's --out folder, its checkpoints/ folder, or one step_* folder")
    c.add_argument("out", help="the file to write, e.g. vith14_official.pth.tar")
    c.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    args = p.parse_args(argv)
    try:
        meta = to_official(args.run, args.out, args.step)
    except (OSError, ValueError) as e:  # (OSError: also a folder that cannot be written)
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"{args.out}: encoder, predictor and target encoder of {meta['path']} (step {meta['step']}, epoch "
          f"{meta['epoch']}) in the official layout")
    return 0


def export_safetensors(module: nn.Module, path: str, info: DistInfo, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``module``'s full (unsharded, fp32, CPU) state dict to one safetensors file on rank 0.

    Every rank must call this (the shards are gathered); only rank 0 writes, atomically
    (temporary file + rename). Keys are the plain module names (``blocks.0.attn.qkv.weight`` …),
    loadable with ``vit_encoder(...).load_state_dict(safetensors.torch.load_file(path))``. A failed
    write (a full disk) raises :class:`CheckpointError` naming ``path`` on every rank: the ranks agree
    on it, so none goes on into the next export's gather while rank 0 has stopped.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    distributed = info.distributed and any(hasattr(p, "device_mesh") for p in module.parameters())
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if distributed else StateDictOptions()
    sd = get_model_state_dict(module, options=opts)
    problem = None
    if info.is_main:
        try:
            from safetensors.torch import save
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            blob = save(tensors, metadata=metadata or {})
            write_atomic(path, lambda fh: fh.write(blob))
        except OSError as e:
            problem = f"export: writing {path} failed: {type(e).__name__}: {e}"
    problem = agree(problem, info)
    if problem:
        raise CheckpointError(problem)


__all__ = ["Checkpointer", "CheckpointError", "out_lock", "list_checkpoints", "latest_checkpoint", "export_safetensors", "rng_state",
           "set_rng_state", "step_dirname", "load_state", "find_checkpoint", "load_run_models", "to_official"]


if __name__ == "__main__":
    raise SystemExit(main())
