"""Checkpoints that are either complete or absent.

Layout: <run>/checkpoints/step_000020/ holding the student as an ordinary HF
checkpoint (safetensors + tokenizer), `optimizer.pt`, `scheduler.pt` and
`trainer_state.json`. A checkpoint is written into a hidden temporary
directory and renamed into place in one step, so an interruption (even
kill -9) during a save leaves the previous checkpoints untouched.

`manifest.json` records every file's size, and the SHA-256 of every file up to
HASH_LIMIT bytes (all but the weight shards and optimizer state of a large
model, whose sizes alone are compared: hashing them would cost minutes). A resume
verifies the newest checkpoint against it and falls back to the newest intact
one, so a checkpoint damaged after it was written (a copy cut short, a
disk error) is never loaded. A checkpoint whose weights are not finite is never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from lm.models import save_pretrained
from opd.config import Config, drop_unused, to_dict
from opd.distributed import deepspeed_engine, global_sum
from opd.errors import RunError, cause, first_line
from opd.lock import holder
from opd.tracking import read_metrics, truncate_jsonl

PREFIX = "step_"
MANIFEST = "manifest.json"
HASH_LIMIT = 64 * 2**20  # bytes: files up to this size are hashed at save and verified at resume

# Keys that may change when a run is resumed; anything else must match the run's saved config.
# Where the run lives is not part of its identity: a moved or renamed run directory resumes.
RESUMABLE_CHANGES = ("train.output_dir", "train.run_name", "train.steps", "train.epochs", "train.save_every",
                     "train.keep_last", "train.on_existing", "train.resume", "train.save_final",
                     "train.max_consecutive_skips", "train.max_steps_per_run", "train.num_threads", "train.device",
                     "logging.", "eval.", "tip.dump_tokens", "tip.plots")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries start with '.' and are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = {}
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / "trainer_state.json").is_file():
            found[int(p.name[len(PREFIX):])] = p
    # Re-saving a step moves the old copy aside (.old-step_N-pid) before renaming the new one in; a kill
    # between the two renames leaves the old copy as the only complete checkpoint of that step.
    for p in root.glob(f".old-{PREFIX}*"):
        step = p.name.split("-")[1][len(PREFIX):]
        if step.isdigit() and (p / "trainer_state.json").is_file():
            found.setdefault(int(step), p)
    return [found[s] for s in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def holds_run(run_dir: Path) -> bool:
    """A run directory holds a run once its first step is logged or a checkpoint exists; before that
    (a start that failed while loading) it is the user's to start again into, with any config."""
    return bool(list_checkpoints(run_dir)) or any(r.get("step", 0) >= 1 for r in read_metrics(run_dir))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: Path) -> None:
    """<path>/manifest.json: relative file name -> {size, sha256 (files up to HASH_LIMIT bytes)}."""
    files = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            size = p.stat().st_size
            files[str(p.relative_to(path))] = {"size": size, **({"sha256": _sha256(p)} if size <= HASH_LIMIT else {})}
    (path / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted (one line), or None when it is intact.

    Checked against its manifest; a checkpoint from before manifests only has its trainer state parsed.
    """
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return "trainer_state.json holds no step"
        if not (path / MANIFEST).is_file():
            return None
        files = json.loads((path / MANIFEST).read_text())["files"]
        for name, entry in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != entry["size"]:
                return f"{name} has {file.stat().st_size} bytes, {entry['size']} were written"
            if "sha256" in entry and _sha256(file) != entry["sha256"]:
                return f"{name} differs from what was written (SHA-256)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return first_line(exc)
    return None


def newest_intact(run_dir: Path, warn=None) -> Path | None:
    """The newest checkpoint that verifies; `warn(line)` for each damaged one passed over.

    None when there is no checkpoint; RunError when there are some and none is intact.
    """
    found = list_checkpoints(run_dir)
    reasons = []
    for ckpt in reversed(found):
        why = verify_checkpoint(ckpt)
        if why is None:
            return ckpt
        reasons.append(f"{ckpt.name}: {why}")
        if warn is not None:
            warn(f"warning: checkpoint {ckpt} is damaged ({why}); trying the one before it")
    if found:
        raise RunError(f"train.resume: no intact checkpoint in {checkpoint_dir(run_dir)} ({'; '.join(reasons[:3])}); "
                       "move the damaged checkpoints aside to start afresh, or choose another train.run_name")
    return None


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(run_dir: Path, step: int, write_model, optimizer_state: dict | None, scheduler_state: dict | None,
                    trainer_state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last`.

    `write_model(dir)` writes the model and tokenizer (save_pretrained).
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_model(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if scheduler_state is not None:
            torch.save(scheduler_state, tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        write_manifest(tmp)
        _fsync_tree(tmp)
    except BaseException:  # disk full, Ctrl-C: leave no half checkpoint behind, the previous ones are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving the same step (e.g. final == last periodic): replace whole
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    kept = list_checkpoints(run_dir)
    for stale in kept[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # debris of interrupted saves
        if leftover not in kept[-keep_last:]:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_torch_state(path: Path, name: str):
    file = Path(path) / name
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None


# ----------------------------------------------------------------------------
# a run's checkpoints: save and resume (weights, optimizer, scheduler, sampler, selector state)

# A DeepSpeed run's checkpoint also holds the engine state (every process's shard of the optimizer
# state and fp32 master weights) in this folder, as DeepSpeed's save_checkpoint writes it.
ENGINE_DIR, ENGINE_TAG = "deepspeed", "state"


def save(run) -> None:
    """Checkpoint `run` (an opd.setup.Run) at its current step, on every process; RunError if it cannot be written."""
    acc = run.accelerator
    engine = deepspeed_engine(acc)
    failed = None
    acc.wait_for_everyone()
    # Every process first: ZeRO-3 gathers the full weights onto the main process, and each DeepSpeed
    # process writes its shard of the engine state into a staging folder the main process then moves in.
    weights = acc.get_state_dict(run.student)
    staged = checkpoint_dir(run.run_dir) / f".tmp-engine-{PREFIX}{run.step:06d}"
    if engine is not None:
        if acc.is_main_process and staged.exists():
            shutil.rmtree(staged)
        acc.wait_for_everyone()
        engine.save_checkpoint(str(staged), tag=ENGINE_TAG, save_latest=False)
        acc.wait_for_everyone()
    if acc.is_main_process:
        state = {
            "step": run.step, "sampler": run.sampler.state_dict(),
            "selector_state": run.selector_state.state_dict(), "torch_rng": None,
            "wall_time_s": time.time() - run.started,
            "num_processes": acc.num_processes, "deepspeed": engine is not None,
            "data_hash": run.data_hash,
        }
        lm_weights = {k.removeprefix("lm."): v for k, v in weights.items()}  # PolicyModel keys -> the HF model's

        def write(d: Path) -> None:
            save_pretrained(acc.unwrap_model(run.student).lm, run.tokenizer, d, state_dict=lm_weights)
            if engine is not None:
                staged.rename(d / ENGINE_DIR)

        bad = [k for k, v in lm_weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # a checkpoint is a promise that it can be resumed from: never one of NaN/Inf weights
            failed = f"not written: the student's weights are not finite ({', '.join(bad[:3])}{' ...' * (len(bad) > 3)})"
        else:
            try:
                save_checkpoint(
                    run.run_dir, run.step, write, None if engine is not None else run.optimizer.state_dict(),
                    run.scheduler.state_dict(), state, run.cfg.train.keep_last,
                )
            except Exception as exc:  # disk full, quota, permissions: whatever the writer raised
                failed = f"could not be written ({cause(exc)})"
    acc.wait_for_everyone()
    if global_sum(acc, float(failed is not None)) > 0:
        raise RunError(f"checkpoint at step {run.step} {failed or 'could not be written on the main process'}; "
                       f"last good checkpoint: {latest_checkpoint(run.run_dir) or 'none'}")


def check_same_data(run_dir: Path, data_hash: str, key: str, value: str) -> None:
    """RunError when the run's newest checkpoint was trained on other prompts (`data_hash`, opd.data.prompts_digest)
    than the config's `key` = `value` now gives: a resumed run would continue on other data without a word.
    A checkpoint from before data hashes (or one that cannot be read, resume's to judge) is not compared."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return
    try:
        saved = load_trainer_state(latest).get("data_hash")
    except (OSError, ValueError, AttributeError):
        return
    if saved and saved != data_hash:
        raise RunError(f"{key}: the training prompts of {value} differ from the ones run {run_dir} was trained on "
                       f"(checkpoint {latest}); restore that data to resume, or choose another train.run_name to "
                       "start a new run")


def resume(run) -> None:
    """Continue `run` from its newest complete checkpoint (train.resume=auto), or start its logs afresh."""
    if run.cfg.train.resume != "auto":
        return
    warn = (lambda line: print(line, file=sys.stderr, flush=True)) if run.accelerator.is_main_process else None
    latest = newest_intact(run.run_dir, warn)
    if latest is None:
        run.log.truncate_after(0)
        if run.accelerator.is_main_process:
            truncate_jsonl(run.run_dir / "tokens.jsonl", 0)
        return
    state = load_trainer_state(latest)
    engine = deepspeed_engine(run.accelerator)
    try:
        if engine is not None or (latest / ENGINE_DIR).is_dir():
            resume_engine(run, engine, latest, state)
        else:
            load_weights_and_optimizer(run, latest)
        run.scheduler.load_state_dict(load_torch_state(latest, "scheduler.pt"))
    except RunError:
        raise
    except Exception as exc:  # unpickling, a cut-short file: a checkpoint from before manifests
        raise RunError(f"checkpoint {latest} cannot be loaded ({first_line(exc)}); move it aside to resume from "
                       "the one before it") from None
    run.sampler.load_state_dict(state["sampler"])
    run.selector_state.load_state_dict(state["selector_state"])
    run.step = state["step"]
    run.started = time.time() - state.get("wall_time_s", 0.0)
    run.log.truncate_after(run.step)
    if run.accelerator.is_main_process:
        truncate_jsonl(run.run_dir / "tokens.jsonl", run.step)
    run.accelerator.print(f"resumed from {latest} (step {run.step})")


def load_weights_and_optimizer(run, latest: Path) -> None:
    weights = {}
    for file in sorted(latest.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    missing, unexpected = run.policy.lm.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (run.policy.lm.config.tie_word_embeddings and "lm_head" in m)]
    if missing or unexpected:
        raise RunError(f"checkpoint {latest} does not match the student (missing {missing[:3]}, unexpected {unexpected[:3]})")
    run.optimizer.load_state_dict(load_torch_state(latest, "optimizer.pt"))


def resume_engine(run, engine, latest: Path, state: dict) -> None:
    """Weights, fp32 master weights and optimizer state from a DeepSpeed checkpoint (same process count)."""
    saved_world = state.get("num_processes", 1)
    if engine is None:
        raise RunError(f"checkpoint {latest} was written under DeepSpeed by {saved_world} processes: resume it with the "
                       f"same DeepSpeed accelerate config and process count (its weights alone load with from_pretrained)")
    if not (latest / ENGINE_DIR).is_dir():
        raise RunError(f"checkpoint {latest} was written without DeepSpeed: resume it without DeepSpeed, "
                       f"or choose another train.run_name to start a new run")
    if saved_world != run.accelerator.num_processes:
        raise RunError(f"checkpoint {latest} holds the DeepSpeed state of {saved_world} processes, this run has "
                       f"{run.accelerator.num_processes}: resume with --num_processes {saved_world}")
    path, _ = engine.load_checkpoint(str(latest / ENGINE_DIR), tag=ENGINE_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RunError(f"DeepSpeed found no engine state in {latest / ENGINE_DIR}")


# ----------------------------------------------------------------------------
# the rules of starting into an existing run directory (checked before anything loads, and at start)


def run_directory(cfg: Config, config_paths=()) -> Path:
    """<output_dir>/<run_name>; the run name defaults to the last config file's stem."""
    name = cfg.train.run_name or (Path(config_paths[-1]).stem if config_paths else "run")
    return Path(cfg.train.output_dir).expanduser() / name


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "demo":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(saved: dict, cfg: Config, ignore=()) -> list[str]:
    """Keys (a.b) whose value differs between a run's saved config dict and `cfg`, resumable ones left out."""
    new = _flatten(to_dict(cfg))
    # a key the saved config lacks (added to the schema since) counts as its default
    old = _flatten(drop_unused(saved))
    old.update({k: v for k, v in _flatten(to_dict(Config())).items() if k in new and k not in old})
    return [k for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES) and k not in ignore]


def check_run_dir(cfg: Config, config_paths=(), ignore=()) -> list[str]:
    """Starting into an existing run directory resumes it or refuses; it never writes over something else.

    `ignore`: keys left out of the saved-config comparison (ones already reported as config errors).
    Only the main process of a multi-process launch judges: the others could find the directory
    half-made by it (the trainer tells them when the main process refuses).
    """
    if int(os.environ.get("RANK", "0")) > 0:
        return []
    run_dir = run_directory(cfg, config_paths)
    saved = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        return [f"train.run_name: {run_dir} exists and is not a directory"]
    live = holder(run_dir)  # a run in it now (opd.lock): nothing else about the directory is worth reading
    if live:
        return [live]
    if not saved.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            return [f"train.run_name: run directory {run_dir} is not empty but holds no run config; "
                    "refusing to write into it"]
        return []
    try:
        old = yaml.safe_load(saved.read_text()) or {}
        if not (isinstance(old, dict) and isinstance(old.get("train"), dict)):
            raise ValueError("not a run config written by train.py")
    except (yaml.YAMLError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [f"train.run_name: {saved} cannot be read ({first}); move the run directory aside or choose "
                "another train.run_name"]
    if not holds_run(run_dir):
        return []  # a start that failed before its first step left no run: the user's to start again into
    if cfg.train.on_existing == "refuse":
        return [f"train.on_existing: run directory {run_dir} already holds a run (train.on_existing=refuse); "
                "choose another train.run_name"]
    if cfg.train.resume == "never":
        return [f"train.resume: run directory {run_dir} already holds a run and train.resume=never; "
                "choose another train.run_name"]
    changed = changed_keys(old, cfg, ignore)
    if changed:
        return [f"train.run_name: run directory {run_dir} holds a run with a different config "
                f"({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); "
                "choose another train.run_name to start a new run"]
    return []
