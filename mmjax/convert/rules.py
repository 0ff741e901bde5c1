"""The rule engine: named rules map checkpoint keys onto our param paths, in both directions.

A family's converter is a list of `Rule`s. A rule names one kind of tensor, the checkpoint key it
lives under, the path of our param, and the transform between the two layouts:

    Rule("attn.query.kernel",
         source="encoder.layer.{i}.attention.attention.query.weight",   # torch Linear [H·Dh, D]
         target="encoder/block_{i}/attn/query/kernel",                   # ours [D, H, Dh]
         transform=Linear(in_rank=1))

`{i}` (any `{name}`) stands for a layer index and matches digits; the same index is written into
the other side. `import_tensors` runs the rules from checkpoint to params and `export_tensors` back.
Import never guesses: after mapping it compares against the tree our model expects (from
`jax.eval_shape` of its init) and raises one `KeyDiffError` listing every missing, unexpected and
shape-mismatched key with paths and shapes, instead of failing on the first one (or not at all).

Our paths are "/"-joined param-tree keys; checkpoint keys keep their own "." spelling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping

import jax
import numpy as np

# Buffers that reference implementations save next to the weights but that are not weights.
DEFAULT_IGNORE = (r"(^|\.)position_ids$",)
_MAX_LISTED = 40  # per section of a diff; a wrong family would otherwise print thousands of lines


class ConversionError(ValueError):
    """A checkpoint that cannot become (or come from) an mmjax model, with the reason in words."""


class KeyDiffError(ConversionError):
    """The checkpoint's tensors and our model's params disagree. The message lists every problem;
    the same facts are on the exception as `missing`, `unexpected` and `mismatched` (lists of
    human-readable lines, one per key). `source` names the other side in the section headers."""

    def __init__(self, title: str, missing=(), unexpected=(), mismatched=(), *, source="the checkpoint"):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        counts = f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, " \
                 f"{len(self.mismatched)} shape-mismatched"
        lines = [f"{title}: {counts}"]
        for header, items in (
                (f"missing (our model needs them; not in {source})", self.missing),
                (f"unexpected (in {source}; no place in our model)", self.unexpected),
                ("shape-mismatched", self.mismatched)):
            if items:
                lines.append(f"  {header}:")
                lines.extend(f"    {s}" for s in items[:_MAX_LISTED])
                if len(items) > _MAX_LISTED:
                    lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
        super().__init__("\n".join(lines))


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# ----------------------------------------------------------------------------------- transforms
class Transform:
    """How one tensor changes layout. `shape` is always the shape of *our* param.

    source_shape(shape): the checkpoint shape that maps onto our `shape` (used to report mismatches
      before anything is reshaped: a reshape alone could silently scramble a transposed matrix).
    to_ours(x, shape): checkpoint array → our array of `shape`.
    to_source(y): our array → checkpoint array.
    """

    def source_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return x

    def to_source(self, y: np.ndarray) -> np.ndarray:
        return y

    def __repr__(self):
        return type(self).__name__


class Identity(Transform):
    """Same array both sides (norm scales, biases of plain Dense layers, embedding tables)."""


@dataclasses.dataclass(frozen=True, repr=False)
class Reshape(Transform):
    """A flat checkpoint vector ↔ our multi-axis param, e.g. a q bias [H·Dh] ↔ [H, Dh]."""

    def source_shape(self, shape):
        return (math.prod(shape),)

    def to_ours(self, x, shape):
        return x.reshape(shape)

    def to_source(self, y):
        return y.reshape(-1)


@dataclasses.dataclass(frozen=True, repr=False)
class Linear(Transform):
    """torch `nn.Linear.weight` [out, in] (y = x Wᵀ) ↔ our DenseGeneral kernel [*in_axes, *out_axes]
    (y = x·W). Transpose, then split the axes: in_rank=1 gives e.g. q [D, H, Dh] from [H·Dh, D];
    in_rank=2 gives the attention output kernel [H, Dh, D] from [D, H·Dh]."""

    in_rank: int = 1

    def source_shape(self, shape):
        return (math.prod(shape[self.in_rank:]), math.prod(shape[:self.in_rank]))

    def to_ours(self, x, shape):
        return x.T.reshape(shape)

    def to_source(self, y):
        return y.reshape(math.prod(y.shape[:self.in_rank]), -1).T

    def __repr__(self):
        return f"Linear(in_rank={self.in_rank})"


class ConvOIHW(Transform):
    """torch Conv2d weight [O, I, kh, kw] ↔ our conv kernel [kh, kw, I, O] (HWIO)."""

    def source_shape(self, shape):
        kh, kw, i, o = shape
        return (o, i, kh, kw)

    def to_ours(self, x, shape):
        return x.transpose(2, 3, 1, 0)

    def to_source(self, y):
        return y.transpose(3, 2, 0, 1)


IDENTITY, RESHAPE, CONV_OIHW = Identity(), Reshape(), ConvOIHW()


# ---------------------------------------------------------------------------------------- rules
@dataclasses.dataclass(frozen=True)
class Rule:
    """One named mapping between a checkpoint key template and our param path template.

    source: checkpoint key with `{i}`-style placeholders, or None when the checkpoint has no such
      tensor although our model has the param (e.g. HF ViT with qkv_bias=False: our attention
      always has q/k/v biases). Such a param is filled with zeros on import, which computes the
      same function, and must still be zero on export (otherwise the checkpoint cannot hold it).
    target: our param path, "/"-joined, with the same placeholders.
    """

    name: str
    source: str | None
    target: str
    transform: Transform = IDENTITY

    def __post_init__(self):
        if self.source is not None and _placeholders(self.source) != _placeholders(self.target):
            raise ValueError(f"rule {self.name!r}: placeholders differ between {self.source!r} and "
                             f"{self.target!r}")


def _placeholders(template: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", template))


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    """'a.{i}.b' → ^a\\.(?P<i>\\d+)\\.b$ (placeholders match layer indices)."""
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{body}$")


def _fill(template: str, groups: Mapping[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: groups[m[1]], template)


def _match(rules: Iterable[Rule], key: str, side: str):
    """First rule whose `side` ("source" or "target") template matches `key`, with its groups."""
    for rule in rules:
        template = getattr(rule, side)
        if template is None:
            continue
        m = _template_regex(template).match(key)
        if m:
            return rule, m.groupdict()
    return None, None


# ---------------------------------------------------------------------------- the two directions
def import_tensors(rules: list[Rule], tensors: Mapping[str, np.ndarray],
                   expected: Mapping[str, jax.ShapeDtypeStruct], *, title: str,
                   ignore: Iterable[str] = DEFAULT_IGNORE) -> dict[str, np.ndarray]:
    """Checkpoint tensors {key: array} → our flat params {path: array}, checked against `expected`
    ({path: ShapeDtypeStruct}, the unscanned tree of the model). Raises one KeyDiffError (headed by
    `title`) listing every problem; keys matching an `ignore` regex are skipped."""
    ignore_res = [re.compile(p) for p in ignore]
    out: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}  # our path → the checkpoint key that filled it
    missing, unexpected, mismatched = [], [], []
    mismatched_paths = set()
    for key in sorted(tensors):
        if any(r.search(key) for r in ignore_res):
            continue
        x = tensors[key]
        rule, groups = _match(rules, key, "source")
        if rule is None:
            unexpected.append(f"{key} {fmt_shape(x.shape)}  (no rule matches this key)")
            continue
        path = _fill(rule.target, groups)
        if path not in expected:
            unexpected.append(f"{key} {fmt_shape(x.shape)}  (rule {rule.name!r} maps it to {path}, "
                              "which our model does not have: check the config's sizes and layer count)")
            continue
        if path in owner:
            unexpected.append(f"{key} {fmt_shape(x.shape)}  (maps to {path}, already filled from "
                              f"{owner[path]!r}: two layouts mixed in one checkpoint?)")
            continue
        want = expected[path]
        src_shape = rule.transform.source_shape(tuple(want.shape))
        if tuple(x.shape) != src_shape:
            mismatched.append(f"{key} {fmt_shape(x.shape)}: expected {fmt_shape(src_shape)} for our "
                              f"{path} {fmt_shape(want.shape)} (rule {rule.name!r})")
            mismatched_paths.add(path)
            continue
        y = rule.transform.to_ours(np.asarray(x), tuple(want.shape))
        out[path] = np.asarray(y, dtype=want.dtype)
        owner[path] = key
    for path in sorted(expected):
        if path in out or path in mismatched_paths:
            continue
        want = expected[path]
        rule, groups = _match(rules, path, "target")
        if rule is not None and rule.source is None:
            # A param the checkpoint format has no tensor for (see Rule.source): zeros are exact.
            out[path] = np.zeros(want.shape, want.dtype)
        elif rule is None:
            missing.append(f"{path} {fmt_shape(want.shape)}  (no rule maps any checkpoint key to it)")
        else:
            src, src_shape = _fill(rule.source, groups), rule.transform.source_shape(tuple(want.shape))
            missing.append(f"{path} {fmt_shape(want.shape)}  <- expected checkpoint key {src!r} "
                           f"{fmt_shape(src_shape)} (rule {rule.name!r})")
    if missing or unexpected or mismatched:
        raise KeyDiffError(title, missing, unexpected, mismatched)
    return out


def export_tensors(rules: list[Rule], params: Mapping[str, np.ndarray], *,
                   title: str) -> dict[str, np.ndarray]:
    """Our flat params {path: array} (unscanned) → checkpoint tensors {key: array}. Every param must
    be claimed by a rule; a param whose rule has no source must be all zeros."""
    out: dict[str, np.ndarray] = {}
    unexpected = []
    for path in sorted(params):
        y = np.asarray(params[path])
        rule, groups = _match(rules, path, "target")
        if rule is None:
            unexpected.append(f"{path} {fmt_shape(y.shape)}  (no rule maps it to a checkpoint key)")
        elif rule.source is None:
            if np.any(y != 0):
                unexpected.append(f"{path} {fmt_shape(y.shape)}  (rule {rule.name!r}: the checkpoint "
                                  "format has no tensor for it, so it must be zero, but it is not)")
        else:
            x = rule.transform.to_source(y)
            # np.ascontiguousarray makes a 0-d array 1-d; keep scalars (CLIP's logit_scale) scalar.
            out[_fill(rule.source, groups)] = np.ascontiguousarray(x).reshape(np.shape(x))
    if unexpected:
        raise KeyDiffError(title, unexpected=unexpected)
    return out
