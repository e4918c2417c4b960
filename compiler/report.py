"""The compile report: a JSON-serializable dict answering "what did onnxopt do, and why not more?".

Schema (version 1):
  onnxopt_version, schema_version, input, options
  passes: [{name, level, stage, fired, modified, time_s, declined_count, matched,
            declined: [{rule, node, op, reason}]}]
          fired = rewrites made; declined = candidates refused, each with a reason (at most 50 listed,
          declined_count counts all); matched = fired + declined_count. Exact cleanups (-O1) count
          changes but list no declines: every Cast or Reshape would be a candidate.
  ops_before / ops_after: {op_type: count} (domain-qualified when not ai.onnx), nodes_before/after
  signature: graph inputs and outputs (names, types, shapes), which a compile never changes
  verification: {enabled, tolerance, input_shapes, outputs: [{name, max_abs, rel, ok, note}], max_rel, ok}
  time_s: {load, passes, verify, total}
"""

from __future__ import annotations

import collections

import onnx_ir as ir

SCHEMA_VERSION = 1


def op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def op_counts(model: ir.Model) -> dict[str, int]:
    """Node counts by op, subgraphs included, sorted by op name for stable output."""
    counts = collections.Counter(op_key(n) for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return dict(sorted(counts.items()))


def diff_ops(before: dict[str, int], after: dict[str, int]) -> list[tuple[str, int, int]]:
    keys = sorted(set(before) | set(after))
    return [(k, before.get(k, 0), after.get(k, 0)) for k in keys if before.get(k, 0) != after.get(k, 0)]
