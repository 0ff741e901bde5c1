"""grain pipelines over TFDS ArrayRecord data: an infinite training stream and padded eval batches.

How the training stream is laid out (per process p of P, global batch G, local batch b = G / P):

    global stream   x_0 x_1 x_2 ...      = epoch 0 permuted, epoch 1 permuted (new order), ...
    process p reads x_p, x_{p+P}, x_{p+2P}, ...
    local batch s   = x_{sG + p + kP} for k < b   ->  the P local batches of step s together are
                                                      exactly x_{sG} .. x_{sG+G-1}

so every process holds a disjoint slice of every epoch, and the global batch of a step does not
depend on how many processes read it (only which process holds which example does). Augmentation
randomness is drawn from (seed, stream position), so it does not depend on P either.

    it = train_iterator(cfg, global_batch_size=128, seed=0)
    batch = next(it)          # {"image": f32 [b, H, W, C], "label": i32 [b], "id": i32 [b]}
    state = it.get_state()    # JSON-able; it.set_state(state) on a fresh iterator resumes exactly

    for batch in eval_batches(cfg, global_batch_size=128):   # + "mask": bool [b]
        ...

Reading never imports TensorFlow.
"""

from __future__ import annotations

import math

import grain
import jax
import numpy as np

from mmjax.data import registry, transforms
from mmjax.data.config import DataConfig


def _process_slot(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this process; both default to JAX's multi-host view."""
    if (process_index is None) != (process_count is None):
        raise ValueError("pass both process_index and process_count, or neither (then JAX's "
                         f"are used); got process_index={process_index}, process_count={process_count}")
    if process_index is None:
        return jax.process_index(), jax.process_count()
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got process_index="
                         f"{process_index}, process_count={process_count}")
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}: every process reads an equal share")
    return global_batch_size // process_count


def _check_config(cfg: DataConfig) -> None:
    choices = {"value_range": transforms.VALUE_RANGES, "resize_mode": transforms.RESIZE_MODES,
               "on_long_text": transforms.TEXT_POLICIES, "on_bad_example": transforms.BAD_EXAMPLE_POLICIES}
    for field, allowed in choices.items():
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"DataConfig.{field} must be one of {allowed}, got {getattr(cfg, field)!r}")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise ValueError(f"DataConfig.image_size must be positive or None, got {cfg.image_size}")
    for field in ("random_shift", "worker_count", "read_threads", "prefetch_buffer", "multi_crop_grid"):
        if getattr(cfg, field) < 0:
            raise ValueError(f"DataConfig.{field} must be >= 0, got {getattr(cfg, field)}")
    if (cfg.random_resized_crop or cfg.multi_crop_grid) and cfg.image_size is None:
        raise ValueError("random_resized_crop and multi_crop_grid need DataConfig.image_size")
    if cfg.random_resized_crop is not None:
        lo, hi = cfg.random_resized_crop
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"random_resized_crop must be (min, max) with 0 < min <= max <= 1, got {(lo, hi)}")
    if cfg.text_negatives_per_text != 1 and not cfg.text_negatives:
        raise ValueError(f"DataConfig.text_negatives_per_text={cfg.text_negatives_per_text!r} needs text_negatives")
    if cfg.text_negatives:
        if cfg.text_field is None:
            raise ValueError("DataConfig.text_negatives needs text_field")
        transforms.SwapWordNegative(tuple(map(tuple, cfg.text_negatives)), cfg.text_negatives_per_text)  # validates
    for name, weight in cfg.mixture:
        if weight <= 0:
            raise ValueError(f"mixture weight for {name!r} must be positive, got {weight}")


def tokenizer_spec(cfg: DataConfig) -> str:
    """The local spec of `cfg.tokenizer` ("bpe:<dataset>:<vocab>" is trained on first use, see
    `registry.resolve_tokenizer`)."""
    return registry.resolve_tokenizer(cfg.tokenizer, cfg.data_dir, cfg.text_field)


def tokenizer_for(cfg: DataConfig):
    """The tokenizer the pipeline tokenises `cfg.text_field` with (one instance per process)."""
    return transforms._tokenizer(tokenizer_spec(cfg))


def _skips(cfg: DataConfig) -> bool:
    """Whether examples may be dropped (then batches form after the drop, per process)."""
    return cfg.on_bad_example == "skip" or cfg.on_long_text == "skip"


def _decode(cfg: DataConfig, keep_fields: tuple[str, ...] = ()) -> transforms.GuardBad:
    fields = tuple(cfg.extra_fields) + tuple(f for f in keep_fields if f not in cfg.extra_fields)
    # Multi-crop tiles see the image at g·S: decoding at S would throw that detail away first.
    size = cfg.image_size * cfg.multi_crop_grid if cfg.multi_crop_grid and cfg.image_size else cfg.image_size
    return transforms.GuardBad(
        transforms.DecodeImage(size, cfg.resize_mode, cfg.text_field, fields), cfg.on_bad_example)


def _example_transform(ds: grain.MapDataset, transform, seed: int) -> grain.MapDataset:
    """A task's per-example transform (e.g. `mmjax.data.vlm.ShapesToVLM`), as a RandomMap drawing
    from (seed, stream position) when it is one, else a Map."""
    if transform is None:
        return ds
    if isinstance(transform, grain.transforms.RandomMap):
        return ds.seed(seed).random_map(transform)
    return ds.map(transform)


def _finish(cfg: DataConfig, ds: grain.MapDataset) -> grain.MapDataset:
    """The deterministic tail of the per-example chain: multi-crop, normalisation, tokenisation."""
    if cfg.multi_crop_grid:
        ds = ds.map(transforms.MultiCrop(cfg.image_size, cfg.multi_crop_grid))
    ds = ds.map(transforms.ToValueRange(cfg.value_range))
    if cfg.text_field is not None:
        tok = transforms.TokenizeText(tokenizer_spec(cfg), cfg.max_text_len, cfg.text_add_bos, cfg.text_add_eos,
                                      cfg.on_long_text)
        ds = ds.map(transforms.GuardBad(tok, "skip" if cfg.on_long_text == "skip" else "error"))
    return ds


def _source(cfg: DataConfig, spec: str, default_split: str) -> grain.MapDataset:
    name, _, split = spec.partition(":")
    return grain.MapDataset.source(registry.open_split(name, split or default_split, cfg.data_dir))


def _pipeline_seed(seed: int, shuffle_seed: int) -> int:
    """One 32-bit seed from the run seed and DataConfig.shuffle_seed (grain wants [0, 2**32))."""
    entropy = [seed % 2**64, shuffle_seed % 2**64]  # SeedSequence takes non-negative ints only.
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


def _allow_unparsed_absl_flags() -> None:
    """Lets grain start worker processes outside `absl.app.run` (scripts, notebooks, pytest).

    grain 0.2.18 reads the absl flag --grain_enable_multiprocess_worker_profiling when it starts
    workers, and absl refuses to read any flag before the command line was parsed
    (UnparsedFlagAccessError). Marking the flags parsed keeps every flag at its default; a later
    `app.run` still parses the real command line.
    """
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iter(cfg: DataConfig, ds: grain.MapDataset, local_batch: int) -> grain.IterDataset:
    """Batches, then threads (and optional worker processes) run the map stages ahead of the
    consumer. Without skipping, batches form on the MapDataset (each batch is a fixed slice of the
    stream, whatever the worker count); with skipping they must form after the drop."""
    if _skips(cfg):
        read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer * local_batch)
        it_ds = ds.to_iter_dataset(read).batch(local_batch, drop_remainder=True)
    else:
        # Elements here are whole batches, so prefetch_buffer counts batches.
        read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer)
        it_ds = ds.batch(local_batch, drop_remainder=True).to_iter_dataset(read)
    if cfg.worker_count > 0:
        _allow_unparsed_absl_flags()
        # Workers take batches round-robin, so the output order matches worker_count=0.
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=max(cfg.prefetch_buffer, 1)))
    return it_ds


def train_iterator(cfg: DataConfig, *, global_batch_size: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   example_transform=None, keep_fields: tuple[str, ...] = ()) -> grain.DatasetIterator:
    """Infinite iterator of this process's training batches (see the module docstring).

    Args:
      cfg: dataset name, split, preprocessing and augmentation.
      global_batch_size: G, examples per step summed over processes; a multiple of process_count.
      seed: run seed; with cfg.shuffle_seed it fixes the epoch orders and augmentations.
      process_index, process_count: this process's slot; default `jax.process_index()` and
        `jax.process_count()`. Pass both to simulate hosts.
      example_transform: a task's grain Map or RandomMap, applied after augmentation and before
        multi-crop / normalisation / tokenisation (a RandomMap draws from the stream position).
      keep_fields: raw dataset fields the decoder keeps for it (e.g. "questions", "answers").

    Returns:
      A grain `DatasetIterator`; each `next()` is a dict of numpy arrays with b = G / process_count:
        image  float32 [b, H, W, C] in cfg.value_range (H = W = cfg.image_size when set)
        label  int32 [b]
        id     int32 [b]  (only for datasets with an `id` feature, e.g. digits)
      `get_state()` / `set_state()` save and restore the position exactly; see
      `iterator_checkpoint_args` for orbax.
    """
    _check_config(cfg)
    process_index, process_count = _process_slot(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count)
    pipeline_seed = _pipeline_seed(seed, cfg.shuffle_seed)
    if cfg.mixture:
        # Each source shuffled and repeated on its own, then interleaved by weight (grain's mix
        # keeps the proportions exactly over every window of the stream).
        parts = [_source(cfg, name, cfg.train_split).seed(pipeline_seed + i).shuffle().repeat()
                 for i, (name, _) in enumerate(cfg.mixture)]
        ds = grain.MapDataset.mix(parts, [w for _, w in cfg.mixture])
    else:
        ds = _source(cfg, cfg.name, cfg.train_split).seed(pipeline_seed)
        ds = ds.shuffle().repeat()  # repeat() re-seeds the shuffle per epoch: a new order each epoch.
    ds = ds.map(_decode(cfg, keep_fields))
    # Random stages before the per-process slice, so the rng index is the global stream position.
    if cfg.random_resized_crop is not None:
        ds = ds.seed(pipeline_seed + 101).random_map(
            transforms.RandomResizedCrop(cfg.image_size, tuple(cfg.random_resized_crop)))
    ds = ds.seed(pipeline_seed + 202).random_map(transforms.Augment(shift=cfg.random_shift, flip=cfg.random_flip))
    if cfg.text_negatives:
        ds = ds.seed(pipeline_seed + 303).random_map(
            transforms.SwapWordNegative(tuple(map(tuple, cfg.text_negatives)), cfg.text_negatives_per_text))
    ds = _example_transform(ds, example_transform, pipeline_seed + 404)
    ds = _finish(cfg, ds)
    ds = ds[process_index::process_count]
    return iter(_to_iter(cfg, ds, local_batch))


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Batches each process yields in `eval_batches`: ceil(N / G)."""
    return math.ceil(num_examples / global_batch_size)


def eval_batches(cfg: DataConfig, *, split: str | None = None, global_batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 example_transform=None, keep_fields: tuple[str, ...] = (),
                 transform_seed: int = 0) -> grain.IterDataset:
    """This process's share of one pass over an eval split, padded to full static-shape batches.

    The split's N examples, in file order, followed by ceil(N / G) * G - N all-zero padding
    examples, are dealt out like the training stream (process p takes positions p, p + P, ...).
    So every process yields ceil(N / G) batches of b = G / P, and over all processes each real
    example appears exactly once. No augmentation.

    Args:
      cfg: dataset and preprocessing; `split` defaults to cfg.eval_split.
      global_batch_size: G, a multiple of process_count; need not divide N.
      process_index, process_count: as in `train_iterator`.
      example_transform, keep_fields: as in `train_iterator`; a RandomMap draws from
        (transform_seed, example index), so every evaluation sees the same examples.

    Returns:
      A re-iterable grain `IterDataset` (each `iter()` is a fresh pass) of dicts:
        image float32 [b, H, W, C], label int32 [b], id int32 [b] (if the dataset has ids),
        mask bool [b]: True for real examples, False for padding (whose other fields are 0).
      Weight per-example metrics by `mask`.
    """
    _check_config(cfg)
    process_index, process_count = _process_slot(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count)
    split = cfg.eval_split if split is None else split
    source = registry.open_split(cfg.name, split, cfg.data_dir)
    num_examples = len(source)
    if num_examples == 0:
        raise ValueError(f"split '{split}' of dataset '{cfg.name}' is empty")

    # A bad example (skip policy) stays in place as a padding example (mask False), so every
    # process still yields the same static number of batches; it is counted in SKIPPED.
    examples = grain.MapDataset.source(source).map(_decode(cfg, keep_fields))
    examples = _finish(cfg, _example_transform(examples, example_transform, transform_seed))
    template = next((examples[i] for i in range(num_examples) if examples[i] is not None), None)
    if template is None:
        raise ValueError(f"split '{split}' of dataset '{cfg.name}' has no usable example")
    examples = grain.MapDataset.range(num_examples).map(transforms.MaskOrPad(examples, template))
    num_padding = num_eval_batches(num_examples, global_batch_size) * global_batch_size - num_examples
    if num_padding:
        padding = grain.MapDataset.range(num_padding).map(transforms.ZerosLike(template))
        examples = grain.MapDataset.concatenate([examples, padding])
    ds = examples[process_index::process_count]
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer)
    return ds.batch(local_batch, drop_remainder=True).to_iter_dataset(read)


def iterator_checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False):
    """The orbax args that save (or restore in place) a grain iterator's position.

    Put them next to the model state in one composite checkpoint:

        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=iterator_checkpoint_args(it)))
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=iterator_checkpoint_args(it, restore=True)))   # sets `it`'s state in place

    `it` must be built with the same config (worker_count included: the state's format depends on
    it), seed and process slot as the saved one. grain's
    handler writes one JSON file per JAX process (process_{i}-of-{n}.json) and gets the state
    synchronously inside `save`, so advancing the iterator while orbax finishes writing the
    arrays in the background is safe.
    """
    if restore:
        return grain.checkpoint.CheckpointRestore(iterator)
    return grain.checkpoint.CheckpointSave(iterator)
