"""A checkpoint's training state, checked and put back: its containers and resume fields (said before a resume
uses them, not as a traceback from deep in one), every RNG's state (torch's, CUDA's, the loaders' generators',
random's, numpy's: seeded as a run starts, read, put back) and the weights restored into the built spec."""

from __future__ import annotations

import random
from typing import Any

import torch

from .spec import TrainingSpec

RESUME_FORMAT = 1  # version of the "trainbus" resume state inside a checkpoint


def checkpoint_problem(state: dict[str, Any]) -> str | None:
    """What makes a loaded checkpoint's containers unlike what training_state() writes (a hand-edited or garbled
    file, another tool's): said before anything is built from it, rather than as a traceback from deep in a resume."""
    resume = state.get("trainbus")
    if not isinstance(resume, dict):
        return f"its resume state ('trainbus') is {_kind(resume)}, not a dict"
    if resume.get("format") != RESUME_FORMAT:
        return (f"its resume state is format {resume.get('format')!r}, which this trainbus does not read (it reads "
                f"{RESUME_FORMAT}: one another version wrote resumes with that version)")
    model = state.get("model_state_dict")
    if model is not None and not (isinstance(model, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                                  for k, v in model.items())):
        return f"its model_state_dict is {_kind(model)}, not a dict of tensors"
    for key in ("optimizer_state_dict", "scheduler_state_dict", "metrics", "hyperparameters"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            return f"its {key} is {_kind(state[key])}, not a dict"
    if not all(isinstance(k, str) and _is_number(v) for k, v in (state.get("metrics") or {}).items()):
        return "its metrics are not all names with a number"
    return None


def resume_problem(resume: dict[str, Any]) -> str | None:
    """What in a checkpoint's resume state Loop.resume could not continue from: a field missing or of another type
    (checked once restore_weights took the weights, so a checkpoint of another model is said as that first)."""
    def whole(key: str, least: int) -> str | None:
        value = resume.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            return f"its resume state's {key} is {_kind(value)}, not a whole number >= {least}"
        return None

    problem = whole("epoch", 1) or whole("step", 0)
    if problem:
        return problem
    if not isinstance(resume.get("epoch_complete"), bool):
        return f"its resume state's epoch_complete is {_kind(resume.get('epoch_complete'))}, not true or false"
    states = [("rng", resume.get("rng"))]
    if not resume["epoch_complete"]:  # mid-epoch: the epoch's data order and running totals too
        problem = whole("batches_done", 0)
        if problem:
            return problem
        if not _is_number(resume.get("loss_total")):
            return f"its resume state's loss_total is {_kind(resume.get('loss_total'))}, not a number"
        totals = resume.get("metric_totals")
        if not isinstance(totals, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in totals.items()):
            return f"its resume state's metric_totals is {_kind(totals)}, not names with a number"
        states.append(("epoch_rng_state", resume.get("epoch_rng_state")))
    for key in ("rank_rng", "rank_totals"):
        if resume.get(key) is not None and not (isinstance(resume[key], list)
                                                and all(isinstance(x, dict) for x in resume[key])):
            return f"its resume state's {key} is {_kind(resume[key])}, not a list of dicts"
    states += [(f"rank_rng[{i}]", rng) for i, rng in enumerate(resume.get("rank_rng") or [])]
    if resume.get("loss_scaler") is not None and not isinstance(resume["loss_scaler"], dict):
        return f"its resume state's loss_scaler is {_kind(resume['loss_scaler'])}, not a dict"
    if resume.get("best_validation_loss") is not None and not _is_number(resume["best_validation_loss"]):
        return f"its resume state's best_validation_loss is {_kind(resume['best_validation_loss'])}, not a number"
    problem = whole("best_epoch", 0) if resume.get("best_epoch") is not None else None  # None: an older checkpoint's
    if problem:
        return problem
    before = get_rng(python=True)
    try:
        for key, rng in states:  # what torch, random and numpy take is only known by giving it to them
            if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
                return f"its resume state's {key} is {_kind(rng)}, not the RNG states trainbus saves"
            generators = rng.get("generators", [])  # the loaders' own (loader_generators)
            if not isinstance(generators, list) or not all(isinstance(g, torch.Tensor) for g in generators):
                return f"its resume state's {key} generators are {_kind(generators)}, not a list of generator states"
            try:
                set_rng(rng)
            except Exception as exc:  # a state of another size or shape: torch's RuntimeError, random's ValueError
                return f"its resume state's {key} is no RNG state torch, random and numpy take ({type(exc).__name__})"
    finally:
        set_rng(before)  # the build's seeded state, until Loop.resume sets the checkpoint's
    return None


def _kind(value: Any) -> str:
    """A field's value as an error names it: missing, or its type and (when short) itself."""
    if value is None:
        return "missing"
    shown = repr(value)
    return f"{type(value).__name__} {shown}" if len(shown) <= 40 else f"a {type(value).__name__}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        or isinstance(value, torch.Tensor) and value.numel() == 1


class DamagedCheckpoint(Exception):
    """A checkpoint that lacks what trainbus writes (restore_weights): not one of another model, one not whole."""


def restore_weights(spec: TrainingSpec, state: dict[str, Any]) -> None:
    """Load model, optimizer and scheduler state from a checkpoint; raises ValueError when it does not fit, and
    DamagedCheckpoint when it lacks the optimizer's state (once the model's keys fit)."""
    resume = state["trainbus"]
    if resume.get("format") != RESUME_FORMAT:
        raise ValueError(f"resume format {resume.get('format')} is not {RESUME_FORMAT}")
    wanted, saved = set(spec.model.state_dict()), set(state.get("model_state_dict") or {})
    if wanted != saved:
        raise ValueError(f"missing keys {_first(wanted - saved)}, unexpected keys {_first(saved - wanted)}")
    try:
        spec.model.load_state_dict(state["model_state_dict"])
        # the weights fit: what is missing now is no other model's (torch's KeyError would say only the key)
        if not isinstance(state.get("optimizer_state_dict"), dict):
            raise DamagedCheckpoint("it holds no optimizer_state_dict")
        missing = [key for key in ("state", "param_groups") if key not in state["optimizer_state_dict"]]
        if missing:
            raise DamagedCheckpoint(f"its optimizer_state_dict has no {missing[0]}")
        spec.optimizer.load_state_dict(state["optimizer_state_dict"])
        if spec.scheduler is not None and state.get("scheduler_state_dict") is not None:
            spec.scheduler.load_state_dict(state["scheduler_state_dict"])
    except (KeyError, RuntimeError, ValueError) as exc:
        # torch's first line is a header ("Error(s) in loading state_dict for ...:"); the cause follows it
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(" ".join(lines[:2])[:300]) from None


def _first(keys: set[str], n: int = 4) -> str:
    """A few keys, sorted, and how many more: enough to see which model the checkpoint was made for."""
    shown = sorted(keys)[:n]
    return "[" + ", ".join(shown) + (f", ... {len(keys) - n} more" if len(keys) > n else "") + "]" if keys else "none"


def seed_everything(seed: int) -> None:
    """Seed every RNG a build and the loop draw from: random's, torch's (every CUDA device's too), numpy's."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass


def loader_generators(*loaders: Any) -> list[torch.Generator]:
    """The torch.Generators the loaders draw their order from (DataLoader(generator=...), a sampler's own): apart
    from torch's global RNG, so a checkpoint saves their states too, or a resumed run shuffles from their seeds again
    (the first epoch's order in the epoch it resumes)."""
    found: list[torch.Generator] = []
    for loader in loaders:
        batch_sampler = getattr(loader, "batch_sampler", None)
        sampler = getattr(loader, "sampler", None)
        # a sampler's own sampler too: the user's that ShardedSampler shares out across ranks draws from its generator
        for holder in (loader, sampler, getattr(sampler, "sampler", None), batch_sampler,
                       getattr(batch_sampler, "sampler", None)):
            generator = getattr(holder, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found


def get_rng(python: bool, generators: list[torch.Generator] = ()) -> dict[str, Any]:
    """Every RNG state a resume needs to go on as if uninterrupted (`python`: random's and numpy's too)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if generators:
        states["generators"] = [g.get_state() for g in generators]
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if python:
        states["python"] = random.getstate()
        numpy = _numpy()
        if numpy is not None:
            states["numpy"] = numpy.random.get_state()
    return states


def set_rng(states: dict[str, Any], generators: list[torch.Generator] = ()) -> None:
    """Put back the states get_rng took."""
    torch.set_rng_state(states["torch"])
    saved = states.get("generators") or []
    if len(saved) == len(generators):  # else a spec whose loaders are not those it saved: theirs start as built
        for generator, state in zip(generators, saved):
            generator.set_state(state)
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    numpy = _numpy()
    if "numpy" in states and numpy is not None:
        name, keys, pos, has_gauss, cached = states["numpy"]
        numpy.random.set_state((name, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached))


def _numpy():
    import sys

    return sys.modules.get("numpy")  # only if the user's code uses it: never import it for them
