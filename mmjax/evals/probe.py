"""A probe classifier for `shapes`: reads every object's attributes back from an image.

Tokenizers and generators of `shapes` images are judged by whether a classifier trained on real
images still reads the scene from their outputs, and FD-probe / KID-probe are computed in its
features. The probe predicts, for each of the 9 grid cells (index 3·row + column):

    cell_shape  7 classes  0 = empty, 1 + s = an object of shape SHAPES[s]
    cell_color  8 classes  COLORS        (scored only where an object is)
    cell_size   2 classes  SIZES         (scored only where an object is)
and
    background  3 classes  BACKGROUNDS

    probe = load_or_train_probe(DataConfig(name="shapes", value_range="symmetric"))
    probe.test_accuracy                       # its own accuracy on the real test split
    probe.attribute_accuracy(images, labels)  # images [B, R, R, 3] in [−1, 1]; labels: the dataset's fields
    probe.features(images)                    # [B, 9·32] penultimate features, for FD-probe / KID-probe

Attribute accuracies (`accuracy_from_predictions`); an "object" is a real object of the scene
(num_objects of them), scored at its true cell:

    shape       fraction of objects whose cell is predicted as that shape (predicted empty = wrong)
    color       fraction of objects whose cell's predicted color is right
    size        fraction of objects whose cell's predicted size is right
    position    fraction of images whose set of occupied cells is exactly right (all 9 cells)
    count       fraction of images with as many predicted occupied cells as num_objects
    background  fraction of images whose background is right
    all         fraction of images with position right and every object's shape, color and size
                right (the background is not part of it)

The network: each cell's window (a square around the cell's centre pixel that holds its whole
object) goes through one shared small CNN (3×3 convs, the later ones stride 2, then a dense layer
of `cell_features`); per-cell heads read shape / color / size from it, and the background is read
from all 9 cells' features, whose concatenation [B, 9·cell_features] is the probe's `features`.

It is trained once per (resolution, dataset version, probe config, split sizes) on the train
split, seeded and deterministic, and cached as
`<data_dir>/probes/shapes-<R>-v<VERSION>-<hash>.safetensors` with its test accuracy in the file's
metadata, so every later evaluation loads the same probe.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from mmjax.config import config, to_dict
from mmjax.data import pipeline, registry
from mmjax.data import shapes as S
from mmjax.data.config import DataConfig

NUM_CELLS = 9
EMPTY = 0  # cell_shape class of an empty cell; shape s is class 1 + s
NUM_CELL_SHAPES = 1 + len(S.SHAPES)
LABEL_FIELDS = ("num_objects", "shape", "color", "size", "position", "background")
ATTRIBUTES = ("shape", "color", "size", "position", "count", "background", "all")
FORMAT = "mmjax-shapes-probe-2"


@config
class ProbeConfig:
    """The probe's network and training recipe (its hash names the cached file)."""

    channels: tuple[int, ...] = (16, 32)  # 3×3 conv widths of the per-cell network; later convs stride 2
    cell_features: int = 32  # features per cell; the image's features are the 9 cells' concatenated
    steps: int = 800
    batch_size: int = 64  # images; each gives the shared cell network 9 windows
    learning_rate: float = 2e-3  # Adam, linear warmup then cosine decay to 1%
    warmup_steps: int = 50
    # Gaussian pixel noise (std, in [−1, 1] units) added to training images: a probe robust to
    # small pixel errors reads imperfect reconstructions by their content, not their noise.
    noise_std: float = 0.05
    seed: int = 0


def cell_windows(images):
    """[B, R, R, C] → [B, 9, w, w, C]: the square window of side w = 2⌈R/6⌉ + 1 around each cell's
    centre pixel (S.center_pixel), which holds that cell's whole object; the image is extended by
    edge replication where a window passes its border (the background is flat)."""
    r = images.shape[1]
    half = -(-r // 6)
    padded = jnp.pad(images, ((0, 0), (half, half), (half, half), (0, 0)), mode="edge")
    windows = []
    for position in range(NUM_CELLS):
        cy, cx = S.center_pixel(position, r)  # padded[cy + half] is image row cy
        windows.append(padded[:, cy:cy + 2 * half + 1, cx:cx + 2 * half + 1])
    return jnp.stack(windows, axis=1)


class ProbeNet(nn.Module):
    """images [B, R, R, 3] in [−1, 1] → (logits, features [B, 9·cell_features]); logits: cell_shape
    [B, 9, 7], cell_color [B, 9, 8], cell_size [B, 9, 2], background [B, 3].

    One small CNN, shared by the 9 cells, reads each cell's window (objects sit at fixed cells, so
    every image gives 9 training examples of it); the background is read from all cells' features.
    """

    channels: tuple[int, ...]
    cell_features: int

    @nn.compact
    def __call__(self, images):
        b, r = images.shape[0], images.shape[1]
        x = cell_windows(images)
        x = x.reshape(b * NUM_CELLS, *x.shape[2:])
        first_stride = max(r // 32, 1)  # 64 px: the first conv strides 2, so it costs about what 32 px does
        for i, c in enumerate(self.channels):
            stride = first_stride if i == 0 else 2
            x = nn.relu(nn.Conv(c, (3, 3), strides=(stride, stride), padding="SAME", name=f"conv{i}")(x))
        cells = nn.relu(nn.Dense(self.cell_features, name="cell_features")(x.reshape(b * NUM_CELLS, -1)))
        cells = cells.reshape(b, NUM_CELLS, self.cell_features)
        features = cells.reshape(b, NUM_CELLS * self.cell_features)
        logits = {"cell_shape": nn.Dense(NUM_CELL_SHAPES, name="cell_shape")(cells),
                  "cell_color": nn.Dense(len(S.COLORS), name="cell_color")(cells),
                  "cell_size": nn.Dense(len(S.SIZES), name="cell_size")(cells),
                  "background": nn.Dense(len(S.BACKGROUNDS), name="background")(features)}
        return logits, features


# --- targets and scores --------------------------------------------------------------------------


def cell_targets(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The dataset's per-object labels → per-cell targets.

    labels: num_objects [B], shape / color / size / position [B, 3] (−1 padded), background [B].
    Returns cell_shape [B, 9] (0 empty, 1 + shape), cell_color / cell_size [B, 9] (−1 where empty),
    occupied bool [B, 9], background [B] (all int32 but `occupied`).
    """
    n = np.asarray(labels["num_objects"], np.int64)
    fields = {k: np.asarray(labels[k], np.int64) for k in ("shape", "color", "size", "position")}
    b, slots = fields["position"].shape
    real = np.arange(slots)[None, :] < n[:, None]  # [B, 3]
    for k, v in fields.items():
        if np.any(v[real] < 0) or np.any(v[~real] != -1):
            raise ValueError(f"labels['{k}'] must hold num_objects class ids followed by -1 padding")
    rows, slot = np.nonzero(real)
    cells = fields["position"][rows, slot]
    if np.any(cells >= NUM_CELLS):
        raise ValueError(f"positions must be cells 0..{NUM_CELLS - 1}")
    occupied = np.zeros((b, NUM_CELLS), bool)
    occupied[rows, cells] = True
    if occupied.sum() != len(rows):
        raise ValueError("two objects of one image share a cell")
    out = {"cell_shape": np.zeros((b, NUM_CELLS), np.int32),
           "cell_color": np.full((b, NUM_CELLS), -1, np.int32),
           "cell_size": np.full((b, NUM_CELLS), -1, np.int32)}
    out["cell_shape"][rows, cells] = 1 + fields["shape"][rows, slot]
    out["cell_color"][rows, cells] = fields["color"][rows, slot]
    out["cell_size"][rows, cells] = fields["size"][rows, slot]
    out["occupied"] = occupied
    out["background"] = np.asarray(labels["background"], np.int32)
    return out


def accuracy_from_predictions(pred: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """The attribute accuracies (module docstring) of per-cell predictions (cell_shape, cell_color,
    cell_size [B, 9], background [B]: class ids) against the dataset's labels."""
    t = cell_targets(labels)
    occ = t["occupied"]
    shape_ok = (np.asarray(pred["cell_shape"]) == t["cell_shape"]) & occ
    color_ok = (np.asarray(pred["cell_color"]) == t["cell_color"]) & occ
    size_ok = (np.asarray(pred["cell_size"]) == t["cell_size"]) & occ
    pred_occ = np.asarray(pred["cell_shape"]) != EMPTY
    objects = occ.sum()
    position_ok = np.all(pred_occ == occ, axis=1)
    objects_ok = np.all((shape_ok & color_ok & size_ok) | ~occ, axis=1)
    return {
        "shape": float(shape_ok.sum() / objects),
        "color": float(color_ok.sum() / objects),
        "size": float(size_ok.sum() / objects),
        "position": float(position_ok.mean()),
        "count": float(np.mean(pred_occ.sum(axis=1) == np.asarray(labels["num_objects"]))),
        "background": float(np.mean(np.asarray(pred["background"]) == t["background"])),
        "all": float(np.mean(position_ok & objects_ok)),
    }


def probe_loss(logits: dict[str, jax.Array], targets: dict[str, jax.Array]) -> jax.Array:
    """Cross-entropy: cell_shape over all 9 cells, color and size over occupied cells only, plus
    the background's; each a mean over what it scores."""
    ce = optax.softmax_cross_entropy_with_integer_labels
    occ = targets["occupied"].astype(jnp.float32)
    shape = jnp.mean(ce(logits["cell_shape"], targets["cell_shape"]))
    per_object = (ce(logits["cell_color"], jnp.maximum(targets["cell_color"], 0))
                  + ce(logits["cell_size"], jnp.maximum(targets["cell_size"], 0)))
    attributes = jnp.sum(per_object * occ) / jnp.maximum(jnp.sum(occ), 1.0)
    return shape + attributes + jnp.mean(ce(logits["background"], targets["background"]))


# --- the probe -----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _apply(net: ProbeNet, params, images):
    logits, features = net.apply({"params": params}, images)
    return {k: jnp.argmax(v, axis=-1) for k, v in logits.items()}, features


@dataclasses.dataclass(frozen=True)
class Probe:
    """A trained probe for `shapes` images of `resolution`² in [−1, 1] (see the module docstring)."""

    config: ProbeConfig
    resolution: int
    params: Any
    test_accuracy: dict[str, float]  # the probe's own accuracy on the real test split
    # Multiplies the raw features so that their mean square over the real test images is 1: KID's
    # kernel (x·y/F + 1)³ then sees x·y/F of order 1, as with Inception features (raw ReLU features
    # of this net gave KIDs in the thousands).
    feature_scale: float = 1.0
    path: str | None = None  # the cache file it was loaded from / saved to
    label_fields = LABEL_FIELDS  # the dataset fields attribute_accuracy reads

    @property
    def net(self) -> ProbeNet:
        return ProbeNet(self.config.channels, self.config.cell_features)

    def _run(self, images, batch_size: int = 256):
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (self.resolution, self.resolution, 3):
            raise ValueError(f"the probe reads images [B, {self.resolution}, {self.resolution}, 3] in [-1, 1], "
                             f"got shape {images.shape}")
        preds, feats = [], []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            n = len(chunk)
            if n < batch_size and len(images) > batch_size:  # pad: one compiled shape for every chunk
                chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.float32)])
            p, f = jax.device_get(_apply(self.net, self.params, chunk))
            preds.append({k: np.asarray(v[:n], np.int32) for k, v in p.items()})
            feats.append(np.asarray(f[:n]))
        if not preds:
            raise ValueError("no images given")
        return {k: np.concatenate([p[k] for p in preds]) for k in preds[0]}, np.concatenate(feats)

    def predict(self, images) -> dict[str, np.ndarray]:
        """Class ids: cell_shape / cell_color / cell_size [B, 9] (cell_shape 0 = empty), background [B]."""
        return self._run(images)[0]

    def features(self, images) -> np.ndarray:
        """The penultimate layer's activations [B, 9·cell_features] times `feature_scale` (for
        FD-probe and KID-probe)."""
        return self._run(images)[1] * np.float32(self.feature_scale)

    def attribute_accuracy(self, images, labels: dict[str, np.ndarray]) -> dict[str, float]:
        """Attribute accuracies (module docstring) of the probe's reading of `images` against
        `labels` (the dataset's LABEL_FIELDS as numpy arrays, one row per image)."""
        return accuracy_from_predictions(self.predict(images), labels)


# --- training and the cache ----------------------------------------------------------------------


def probe_data_config(data: DataConfig | int, data_dir: str | None = None) -> DataConfig:
    """The DataConfig the probe is trained and tested with: shapes at the caller's resolution and
    resize mode, in [−1, 1], with the label fields, no augmentation and no text."""
    if isinstance(data, int):
        data = DataConfig(name="shapes", image_size=data, value_range="symmetric")
    if data.name != "shapes" or data.mixture:
        raise ValueError(f"the probe is trained on the 'shapes' dataset only, not {data.name!r}"
                         + (f" with mixture {data.mixture}" if data.mixture else ""))
    if data.value_range != "symmetric":
        raise ValueError(f"the probe reads images in [-1, 1] (value_range='symmetric'), got value_range="
                         f"{data.value_range!r}")
    return DataConfig(name="shapes", data_dir=data_dir or data.data_dir, train_split="train", eval_split="test",
                      image_size=data.image_size, resize_mode=data.resize_mode, value_range="symmetric",
                      extra_fields=LABEL_FIELDS)


def _load_split(cfg: DataConfig, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """All of a split through the data pipeline: images float32 [N, R, R, 3] and the label fields."""
    images, labels = [], {k: [] for k in LABEL_FIELDS}
    for batch in pipeline.eval_batches(cfg, split=split, global_batch_size=500, process_index=0, process_count=1):
        keep = np.asarray(batch["mask"], bool)
        images.append(np.asarray(batch["image"], np.float32)[keep])
        for k in LABEL_FIELDS:
            labels[k].append(np.asarray(batch[k])[keep])
    return np.concatenate(images), {k: np.concatenate(v) for k, v in labels.items()}


def train_probe(cfg: ProbeConfig, data_cfg: DataConfig, *, log=print) -> tuple[Any, dict[str, Any]]:
    """Trains the probe on the train split and measures it on the test split.

    Deterministic: the init, the epoch orders and the noise come from cfg.seed. Returns (params,
    info) with info["test_accuracy"] and timings."""
    t0 = time.perf_counter()
    images, labels = _load_split(data_cfg, data_cfg.train_split)
    targets = cell_targets(labels)
    load_s = time.perf_counter() - t0
    net = ProbeNet(cfg.channels, cfg.cell_features)
    # "rbg" keys (XLA's RngBitGenerator) compile ~3× faster on a CPU than threefry's unrolled hash,
    # which dominated a short run; they are deterministic for a given JAX version.
    init_key, noise_key = jax.random.split(jax.random.key(cfg.seed, impl="rbg"))
    x0 = jnp.zeros((1, *images.shape[1:]), jnp.float32)
    params = jax.jit(net.init)(init_key, x0)["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.steps, 1),
                                                  end_value=cfg.learning_rate * 0.01)
    tx = optax.adam(schedule)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, target, key):
        x = x + cfg.noise_std * jax.random.normal(key, x.shape, x.dtype)

        def loss_fn(p):
            logits, _ = net.apply({"params": p}, x)
            return probe_loss(logits, target)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    n = len(images)
    order, pos = np.empty(0, np.int64), n  # pos = n: the first step draws the first epoch order
    batch = min(cfg.batch_size, n)
    t1 = time.perf_counter()
    for i in range(cfg.steps):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = np.sort(order[pos:pos + batch])
        pos += batch
        params, opt_state, loss = step(params, opt_state, images[idx], {k: v[idx] for k, v in targets.items()},
                                       jax.random.fold_in(noise_key, i))
        if log and (i + 1) % max(cfg.steps // 5, 1) == 0:
            log(f"probe: step {i + 1}/{cfg.steps} loss {float(loss):.4f}")
    train_s = time.perf_counter() - t1
    test_images, test_labels = _load_split(data_cfg, data_cfg.eval_split)
    probe = Probe(cfg, images.shape[1], params, {})
    accuracy = probe.attribute_accuracy(test_images, test_labels)
    feature_scale = float(1.0 / np.sqrt(np.mean(np.square(probe.features(test_images), dtype=np.float64)) + 1e-12))
    info = {"test_accuracy": accuracy, "feature_scale": feature_scale, "resolution": int(images.shape[1]),
            "train_seconds": round(train_s, 1),
            "load_seconds": round(load_s, 1), "train_examples": n, "test_examples": len(test_images)}
    if log:
        log(f"probe: trained {cfg.steps} steps in {train_s:.0f} s (data {load_s:.0f} s); test accuracy "
            + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
    return params, info


def _native_resolution(data_cfg: DataConfig) -> tuple[int, dict[str, int]]:
    """The stored images' side and the split sizes (builds the dataset on first use)."""
    source = registry.open_split("shapes", data_cfg.train_split, data_cfg.data_dir)
    sizes = {s: len(registry.open_split("shapes", s, data_cfg.data_dir))
             for s in (data_cfg.train_split, data_cfg.eval_split)}
    return int(np.asarray(source[0]["image"]).shape[0]), sizes


def probe_path(cfg: ProbeConfig, data_cfg: DataConfig) -> str:
    """`<data_dir>/probes/shapes-<R>-v<VERSION>-<hash>.safetensors`; the hash covers the probe
    config, the resolution and resize mode, and the split sizes."""
    native, sizes = _native_resolution(data_cfg)
    resolution = data_cfg.image_size or native
    key = {"probe": to_dict(cfg), "resolution": resolution, "native": native, "splits": sizes,
           "resize_mode": data_cfg.resize_mode if resolution != native else None, "format": FORMAT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    directory = os.path.join(registry.resolve_data_dir(data_cfg.data_dir), "probes")
    return os.path.join(directory, f"shapes-{resolution}-v{S.ShapesBuilder.VERSION}-{digest}.safetensors")


def _save(path: str, params, cfg: ProbeConfig, resolution: int, info: dict) -> None:
    from safetensors.numpy import save_file

    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in traverse_util.flatten_dict(
        jax.device_get(params), sep="/").items()}
    metadata = {"format": FORMAT, "probe_config": json.dumps(to_dict(cfg)), "resolution": str(resolution),
                "info": json.dumps(info)}
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(flat, tmp, metadata=metadata)
    os.replace(tmp, path)  # atomic: readers never see a half-written file


def _load(path: str, cfg: ProbeConfig) -> Probe:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
        flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if metadata.get("format") != FORMAT or json.loads(metadata["probe_config"]) != json.loads(
            json.dumps(to_dict(cfg))):
        raise ValueError(f"{path} is not a probe of this config (metadata {metadata}); delete it to retrain")
    params = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat, sep="/"))
    info = json.loads(metadata["info"])
    return Probe(cfg, int(metadata["resolution"]), params, dict(info["test_accuracy"]), float(info["feature_scale"]),
                 path)


def load_or_train_probe(data: DataConfig | int = 32, data_dir: str | None = None, *,
                        config: ProbeConfig | None = None, log=print) -> Probe:
    """The probe for `shapes` images as `data` delivers them (a DataConfig with value_range
    "symmetric", or a resolution R: shapes resized to R×R), from the cache under the data
    directory, trained there first if missing (about a minute or two on a CPU at 32 px).
    `config` defaults to ProbeConfig(); `log` (None: quiet) gets the training progress."""
    config = ProbeConfig() if config is None else config
    data_cfg = probe_data_config(data, data_dir)
    path = probe_path(config, data_cfg)
    if os.path.exists(path):
        return _load(path, config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with registry.file_lock(os.path.join(os.path.dirname(path), ".train.lock")):
        if not os.path.exists(path):  # another process may have finished it meanwhile
            if log:
                log(f"probe: training the shapes probe into {path}")
            params, info = train_probe(config, data_cfg, log=log)
            _save(path, params, config, info["resolution"], info)
    return _load(path, config)
