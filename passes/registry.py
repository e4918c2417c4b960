"""The pass registry: every pass declares its name, lowest level, targets and stage.

A pipeline is then data: `select(level, target, ...)` returns the passes to run, in stage order.
Stages exist because order matters for soundness of pattern matching: transformer fusions must see
the exporter's graph before generic simplifications rewrite the shapes they match on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import onnx_ir as ir

# Stage order of a compile. Within a stage, passes run in registration order.
STAGES = (
    "canonicalize",  # -O0: topological order, unique names
    "cleanup",  # -O1: exact cleanups
    "fusion",  # -O2/-O3: transformer and CNN fusions (run before generic simplifications)
    "lossy",  # opt-in: int8, fp16, pruning
    "finalize",  # dead code after everything else, then canonical order again
)

from onnxopt.kernels.catalogue import ORT_TARGETS, TARGETS  # noqa: E402,F401 - stated once, there


@dataclasses.dataclass(frozen=True)
class PassInfo:
    name: str
    level: int
    stage: str
    factory: Callable[[], ir.passes.PassBase]
    targets: frozenset[str] = frozenset(TARGETS)
    # A lossy pass runs only when its flag is given (e.g. "int8"), whatever the level.
    flag: str | None = None
    # A pass that must not run when this flag is given (attention_qkv with "int8").
    unless: str | None = None
    # Position within the stage (lower runs first).
    order: int = 50
    doc: str = ""


_REGISTRY: dict[str, PassInfo] = {}


def register(
    name: str,
    *,
    level: int,
    stage: str,
    targets: Iterable[str] = TARGETS,
    flag: str | None = None,
    order: int = 50,
    unless: str | None = None,
):
    """Class decorator registering a pass (the class is its own factory)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")

    def decorate(cls):
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} registered twice")
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = PassInfo(
            name=name,
            level=level,
            stage=stage,
            factory=cls,
            targets=frozenset(targets),
            flag=flag,
            order=order,
            unless=unless,
            doc=doc[0] if doc else "",
        )
        cls.pass_name = name
        return cls

    return decorate


def all_passes() -> list[PassInfo]:
    return sorted(_REGISTRY.values(), key=lambda p: (STAGES.index(p.stage), p.order))


def get(name: str) -> PassInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown pass {name!r} (known: {known})") from None


def select(
    level: int,
    target: str = "cpu",
    *,
    enable: Iterable[str] = (),
    disable: Iterable[str] = (),
    flags: Iterable[str] = (),
) -> list[PassInfo]:
    """The passes a compile at (level, target, flags) runs, in order.

    `enable` adds passes above the level (an error for a pass that does not run for `target`);
    `disable` removes passes.
    """
    enable, disable, flags = set(enable), set(disable), set(flags)
    for name in enable | disable:
        get(name)  # unknown names are an error, not silently ignored
    known_flags = {p.flag for p in _REGISTRY.values() if p.flag}
    for flag in sorted(flags - known_flags):
        raise KeyError(f"no pass implements --{flag}")
    for name in sorted(enable - disable):
        if target not in _REGISTRY[name].targets:
            runs_for = ", ".join(sorted(_REGISTRY[name].targets))
            raise KeyError(f"pass {name!r} does not run for target {target!r} (it runs for: {runs_for})")
    chosen = []
    for info in all_passes():
        if info.name in disable or target not in info.targets or (info.unless and info.unless in flags):
            continue
        wanted = info.flag in flags if info.flag else info.level <= level
        if wanted or info.name in enable:
            chosen.append(info)
    return chosen
