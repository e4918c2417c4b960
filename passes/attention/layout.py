"""Layouts: which axes of (batch, seq, heads, head size) a tensor holds, in order, with symbolic
sizes; replaying a Reshape/Transpose chain on a layout proves what the chain does to the heads."""

from __future__ import annotations

from onnxopt.passes._lib.symbolic_shapes import Dim
from onnxopt.passes.base import Decline


class Layout:
    """A tensor as row-major groups of named atoms (b, s, n -> h, d); sizes symbolic."""

    def __init__(self, groups: list[tuple[str, ...]], sizes: dict[str, Dim]):
        self.groups = [tuple(g) for g in groups]
        self.sizes = dict(sizes)

    def transpose(self, perm) -> Layout:
        perm = list(range(len(self.groups)))[::-1] if perm is None else list(perm)
        if sorted(perm) != list(range(len(self.groups))):
            raise Decline(f"Transpose perm {perm} does not fit rank {len(self.groups)}")
        return Layout([self.groups[p] for p in perm], self.sizes)

    def reshape(self, target: tuple) -> Layout:
        atoms = [a for g in self.groups for a in g]
        sizes = dict(self.sizes)
        groups, i = [], 0
        for t in target:
            if t is None:
                raise Decline("a reshape target dim is unknown")
            group, prod = [], Dim(1)
            while prod != t:
                if i >= len(atoms):
                    raise Decline(f"reshape to {list(target)} does not regroup {self.describe()}")
                a = atoms[i]
                nxt = prod * sizes[a]
                if t.divide(nxt) is not None:
                    group.append(a)
                    prod = nxt
                    i += 1
                    continue
                # Only the hidden axis may be split, once, into (heads, head size).
                need = t.divide(prod)
                n = sizes[a]
                if a == "n" and need is not None and need.is_int and n.is_int and 1 < need.coef < n.coef and n.coef % need.coef == 0:
                    sizes["h"], sizes["d"] = need, Dim(n.coef // need.coef)
                    atoms[i : i + 1] = ["h", "d"]
                    continue
                raise Decline(f"reshape to {list(target)} does not regroup {self.describe()}")
            groups.append(tuple(group))
        if any(sizes[a] != 1 for a in atoms[i:]):
            raise Decline(f"reshape to {list(target)} does not regroup {self.describe()}")
        if groups and i < len(atoms):
            groups[-1] = groups[-1] + tuple(atoms[i:])
        return Layout(groups, sizes)

    def normalized(self) -> tuple:
        return tuple(tuple(a for a in g if self.sizes.get(a) != 1) for g in self.groups)

    def describe(self) -> str:
        return "[" + ", ".join("*".join(g) or "1" for g in self.groups) + "]"

    def same(self, other_groups: list[tuple[str, ...]]) -> bool:
        sizes = dict(self.sizes)
        if "n" in sizes and "h" not in sizes:
            # The hidden axis was never split: a single head.
            sizes["h"], sizes["d"] = Dim(1), sizes["n"]
            mine = Layout([tuple("d" if a == "n" else a for a in g) for g in self.groups], sizes)
        else:
            mine = self
        return mine.normalized() == Layout(other_groups, mine.sizes).normalized()

    def head_dims(self) -> tuple[Dim, Dim]:
        if "h" in self.sizes:
            return self.sizes["h"], self.sizes["d"]
        return Dim(1), self.sizes["n"]
