"""Base classes shared by all passes: accounting of fires and declined matches for the report."""

from __future__ import annotations

import abc
import dataclasses

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

# Declined matches kept per pass in the report; the rest are counted, not listed.
MAX_DECLINED_LISTED = 50


@dataclasses.dataclass
class Declined:
    rule: str
    node: str
    op: str
    reason: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Decline(Exception):
    """A candidate refused by a precondition; the message is the reason the report gives."""


def need(condition, reason: str) -> None:
    """Raise Decline(reason) unless `condition` holds: the one way a matcher says no."""
    if not condition:
        raise Decline(reason)


class OptPass(ir.passes.InPlacePass):
    """An in-place pass that counts how often it fired and why it declined candidates.

    Subclasses implement `apply(model) -> int` (number of rewrites) and call `decline()` for each
    candidate they refuse (typically from a `Decline` raised by `need()` or a `_lib` reader).
    Passes that need compile options take them in `configure(options)`; what a pass wants in the
    report beyond counts goes in `details` (e.g. int8 scales).
    """

    pass_name = "unnamed"

    def __init__(self) -> None:
        super().__init__()
        self.fired = 0
        self.declined: list[Declined] = []
        self._declined_keys: set[tuple[str, str, str]] = set()
        self.details: dict | None = None
        self.options: dict = {}

    def configure(self, options: dict) -> None:
        """Take the compile options (by default kept whole in `self.options`)."""
        self.options = dict(options)

    def decline(self, rule: str | None, node: ir.Node | None, reason: str) -> None:
        """Record a refused candidate once per (node, reason); `rule` defaults to the pass's name."""
        self.add_declined(Declined(rule=rule or self.pass_name, node=(node.name or "") if node is not None else "",
                                   op=node.op_type if node is not None else "", reason=reason))

    def rewrite_each(self, nodes, match, rewrite) -> int:
        """For each node: `found = match(node)`, then `rewrite(node, found)`; a node whose match raises
        Decline is declined with that reason instead. Returns the number rewritten."""
        fired = 0
        for node in list(nodes):
            try:
                found = match(node)
            except Decline as exc:
                self.decline(None, node, str(exc))
                continue
            rewrite(node, found)
            fired += 1
        return fired

    def add_declined(self, d: Declined) -> None:
        """Keep `d` unless the same node was already declined for the same reason (by any rule or
        round; node names are unique after canonicalize)."""
        key = (d.node, d.op, d.reason)
        if key not in self._declined_keys:
            self._declined_keys.add(key)
            self.declined.append(d)

    @abc.abstractmethod
    def apply(self, model: ir.Model) -> int:
        """Rewrite `model` in place; return how many rewrites were made."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.fired = 0
        self.declined = []
        self._declined_keys = set()
        self.fired = int(self.apply(model))
        return ir.passes.PassResult(model, modified=self.fired > 0)


class _DeclineRecorder(MatchingTracer):
    """Keeps every candidate whose pattern matched but whose check refused it, with the reason."""

    def __init__(self, sink: OptPass) -> None:
        super().__init__()
        self._sink = sink

    def log(self, rule, container, node, match_result, status) -> None:
        if status == MatchStatus.CONDITION_FAILED:
            self._sink.decline(rule.name or "rule", node, match_result.reason or "check failed")


class RewritePass(OptPass):
    """A pass made of onnxscript pattern rules, applied until none fires.

    After rewriting, the rules are matched once more in tracing mode (which changes nothing) so
    that candidates the checks refused are reported with their reasons.
    """

    max_rounds = 8
    report_declines = True

    def __init__(self, rules) -> None:
        super().__init__()
        self.rules = pattern.RewriteRuleSet(list(rules))

    def apply(self, model: ir.Model) -> int:
        total = 0
        for _ in range(self.max_rounds):
            count = self.rules.apply_to_model(model)
            total += count
            if not count:
                break
        if self.report_declines:
            self.rules.apply_to_model(model, tracer=_DeclineRecorder(self))
        return total
