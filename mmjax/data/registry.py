"""Which datasets mmjax can build itself, and opening any prepared TFDS dataset for reading.

A *built-in* dataset is generated locally from data that ship with an installed package (no
network), the first time it is asked for. Any other name must already be prepared (ArrayRecord
files) in the data directory: mmjax never downloads.

    data_dir = ensure_prepared("digits")            # builds once, then returns at once
    source = open_split("digits", "train", data_dir)  # random-access Sequence of example dicts

Later datasets extend `BUILTIN` (e.g. `BUILTIN["shapes"] = ShapesBuilder`), nothing else changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from mmjax.data.digits import DigitsBuilder
from mmjax.data.shapes import ShapesBuilder

# name -> builder class: the datasets mmjax may *build*; every other name is read-only.
BUILTIN: dict[str, type[tfds.core.DatasetBuilder]] = {
    "digits": DigitsBuilder,
    "shapes": ShapesBuilder,
}


def default_data_dir() -> str:
    """`$MMJAX_DATA_DIR` if set, else `~/.cache/mmjax/tensorflow_datasets`."""
    return (os.environ.get("MMJAX_DATA_DIR")
            or os.path.expanduser("~/.cache/mmjax/tensorflow_datasets"))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """The directory to use: `data_dir` itself, or `default_data_dir()` when None."""
    return os.fspath(os.path.expanduser(data_dir)) if data_dir else default_data_dir()


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive advisory lock (flock) held for the body: serialises builds on one machine."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _not_found(name: str, data_dir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset '{name}' is not built into mmjax (built-ins: {', '.join(sorted(BUILTIN))}) and no "
        f"prepared TFDS files for it were found in data_dir '{data_dir}'. mmjax never downloads "
        f"data: prepare it there first, e.g. `tfds build {name} --data_dir={data_dir} "
        f"--file_format=array_record`, or set DataConfig.data_dir / $MMJAX_DATA_DIR.")


def get_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `name` in `data_dir`, or FileNotFoundError naming both.

    Built-ins (bare names, e.g. "digits") and TFDS-registered names always give a builder, prepared
    or not; any other name (it may carry a config and version, "name/config:1.2.0") gives one only
    when its files exist in `data_dir`, read back from their dataset_info.json.
    """
    if name in BUILTIN:
        return BUILTIN[name](data_dir=data_dir)
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise _not_found(name, data_dir) from None


def ensure_prepared(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Makes sure dataset `name` is ready to read in `data_dir`; returns the resolved data_dir.

    - Prepared already: returns at once (reads dataset_info.json; TensorFlow is not imported).
    - Built-in and missing: builds it (seconds; TFDS imports TensorFlow only for builders whose
      features need it, e.g. PNG-encoded images; digits does not). A file lock serialises builds
      of the same dataset on one machine, and the second caller finds the finished files. TFDS
      itself writes into a randomly named `incomplete.*` directory and renames it into place, so
      readers never see half-written files; if a writer on another machine (shared filesystem,
      where flock may not reach) wins that rename, our build fails and we accept its result.
    - Not built-in and missing: FileNotFoundError naming the dataset and the directory; nothing
      is downloaded.
    """
    data_dir = resolve_data_dir(data_dir)
    builder = get_builder(name, data_dir)
    if builder.is_prepared():
        return data_dir
    if name not in BUILTIN:
        raise _not_found(name, data_dir)
    os.makedirs(data_dir, exist_ok=True)
    with file_lock(os.path.join(data_dir, f".{name}.lock")):
        builder = get_builder(name, data_dir)  # Re-read: another process may have finished.
        if not builder.is_prepared():
            try:
                builder.download_and_prepare(file_format="array_record")
            except Exception:
                if not get_builder(name, data_dir).is_prepared():
                    raise
    return data_dir


def open_split(name: str, split: str,
               data_dir: str | os.PathLike | None = None) -> Sequence[dict[str, Any]]:
    """A random-access source over one split: `len(src)` examples, `src[i]` a dict of numpy values.

    Builds a built-in dataset on first use. `split` may be a TFDS slice ("train[:90%]"). Raises
    ValueError listing the available splits when the split does not exist. Reading does not import
    TensorFlow (TFDS decodes with numpy / PIL).
    """
    data_dir = ensure_prepared(name, data_dir)
    builder = get_builder(name, data_dir)
    available = sorted(builder.info.splits.keys())
    base_split = split.partition("[")[0]
    if base_split not in available:
        asked = f"'{base_split}'" + (f" (in split='{split}')" if split != base_split else "")
        raise ValueError(f"dataset '{name}' has no split {asked}; available splits: "
                         f"{', '.join(available)}")
    # TFDS raises a clear error itself when the files are not in a random-access format.
    return builder.as_data_source(split=split)


# --------------------------------------------------------------------------------------------
# Tokenizers trained on a dataset's own text

BPE_SPEC = "bpe:<dataset>:<vocab_size>"


def _parse_bpe_spec(spec: str) -> tuple[str, int]:
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "bpe" or not parts[1] or not parts[2].isdigit():
        raise ValueError(f"tokenizer spec {spec!r} is not of the form {BPE_SPEC} (e.g. 'bpe:shapes:512')")
    return parts[1], int(parts[2])


def resolve_tokenizer(spec: str, data_dir: str | os.PathLike | None = None,
                      text_field: str | None = None) -> str:
    """A tokenizer spec that `load_tokenizer` reads: `spec` itself, except for dataset BPE specs.

    "bpe:<dataset>:<vocab_size>" means a byte-level BPE (`train_bpe`) trained on the `text_field`
    of the dataset's train split. It is trained once, under a file lock, into
    `<data_dir>/tokenizers/<dataset>-<field>-bpe<vocab_size>/` and returned as that directory, so
    every later run (and every data worker) reads the same files. Special tokens: <pad>=0, <bos>=1,
    <eos>=2, <unk>=3. Training is deterministic: the same data give the same tokenizer.
    """
    if not isinstance(spec, str) or not spec.startswith("bpe:"):
        return spec
    name, vocab_size = _parse_bpe_spec(spec)
    if not text_field:
        raise ValueError(f"tokenizer spec {spec!r} trains on a text field: set DataConfig.text_field")
    data_dir = ensure_prepared(name, data_dir)
    out = os.path.join(data_dir, "tokenizers", f"{name.replace('/', '_')}-{text_field}-bpe{vocab_size}")
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with file_lock(out + ".lock"):
        if not os.path.isfile(os.path.join(out, "tokenizer.json")):
            from mmjax.data.tokenizers import train_bpe
            source = open_split(name, "train", data_dir)
            if text_field not in source[0]:
                raise ValueError(f"dataset '{name}' has no text field {text_field!r} to train {spec!r} on; "
                                 f"fields: {sorted(source[0])}")

            def texts():
                for i in range(len(source)):
                    t = source[i][text_field]
                    yield t.decode("utf-8") if isinstance(t, bytes) else str(t)

            tmp = f"{out}.tmp{os.getpid()}"
            train_bpe(texts(), vocab_size, tmp)
            os.replace(tmp, out)  # readers never see a half-written tokenizer
    return out
