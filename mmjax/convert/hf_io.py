"""Reading and writing Hugging Face model directories: config.json + safetensors, never pickle.

    dir/config.json                              the architecture (model_type, sizes, activation, ...)
    dir/model.safetensors                        one file of tensors, or
    dir/model.safetensors.index.json             {"weight_map": {key: shard file}} + the shards

A `pytorch_model.bin` (or any other pickled weights file) is refused with an error that says how to
convert it: unpickling runs arbitrary code from the file. A weights file that is not valid
safetensors (random bytes, cut short) is a ConversionError that names the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mmjax.convert.rules import ConversionError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# numpy has no bfloat16/float8; safetensors' numpy reader rejects them, so those are read here
# from the (simple, documented) file layout and typed with ml_dtypes.
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
               "F8_E5M2": ml_dtypes.float8_e5m2}


def read_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of an HF model directory (FileNotFoundError naming what is there)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; load_pretrained expects an HF model "
                                f"directory with {CONFIG} and {WEIGHTS}")
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"no {CONFIG} in {path} (found: {_listing(path)}); the config says which architecture "
            "the weights belong to, and mmjax does not guess it from the tensors")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_file} is not valid JSON: {e}") from None


def weight_files(path: str | os.PathLike, weights: str = WEIGHTS, index: str = INDEX) -> list[Path]:
    """The safetensors files of a directory (one file, or the shards named by the index). `weights` /
    `index` name them (diffusers: diffusion_pytorch_model.safetensors[.index.json])."""
    path = Path(path)
    if (path / index).is_file():
        weight_map = json.loads((path / index).read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            raise FileNotFoundError(f"{path / index} names shard(s) that are not there: {absent}")
        return [path / s for s in shards]
    if (path / weights).is_file():
        return [path / weights]
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise ConversionError(
            f"{path} has only pickled weights ({', '.join(pickled)}) and no {weights}. mmjax refuses "
            "pickled weights: unpickling a file can run arbitrary code. Convert them to safetensors "
            "once, where you trust the file, e.g. `transformers` "
            "AutoModel.from_pretrained(dir).save_pretrained(dir) (writes model.safetensors), or "
            f"safetensors.torch.save_file(torch.load(f, weights_only=True), '{weights}').")
    others = sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors")
    hint = f" (other safetensors files here: {others}; rename or add {index})" if others else ""
    raise FileNotFoundError(f"no {weights} or {index} in {path} (found: {_listing(path)}){hint}")


def read_tensors(path: str | os.PathLike, weights: str = WEIGHTS, index: str = INDEX) -> dict[str, np.ndarray]:
    """All tensors of an HF model directory as numpy arrays {key: array}, in their stored dtype.
    A file that is not valid safetensors raises a ConversionError naming it."""
    tensors: dict[str, np.ndarray] = {}
    for file in weight_files(path, weights, index):
        try:
            _read_file(file, tensors)
        except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, struct.error) as e:
            raise ConversionError(f"{file} is not a valid safetensors file ({type(e).__name__}: {e}); "
                                  "it may be damaged, cut short by an interrupted download, or another "
                                  "format saved under this name") from None
    return tensors


def _read_file(file: Path, tensors: dict[str, np.ndarray]) -> None:
    raw_header = None
    with safe_open(file, framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if key in tensors:
                raise ConversionError(f"tensor {key!r} appears in two shards (second: {file.name})")
            try:
                tensors[key] = f.get_tensor(key)
            except TypeError:  # a dtype numpy cannot name (bf16, fp8)
                raw_header = raw_header or _header(file)
                tensors[key] = _read_raw(file, raw_header, key)


def _header(file: Path) -> tuple[int, dict]:
    """safetensors layout: u64 little-endian header size N, N bytes of JSON, then the data."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _read_raw(file: Path, header: tuple[int, dict], key: str) -> np.ndarray:
    data_start, meta = header
    info = meta[key]
    if info["dtype"] not in _RAW_DTYPES:
        raise ConversionError(f"{file.name}: tensor {key!r} has dtype {info['dtype']}, "
                              "which mmjax cannot read")
    start, end = info["data_offsets"]
    with open(file, "rb") as f:
        f.seek(data_start + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=_RAW_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_dir(path: str | os.PathLike, config: dict, tensors: dict[str, np.ndarray],
              weights: str = WEIGHTS) -> Path:
    """Writes config.json and model.safetensors (or `weights`; metadata format "pt", as transformers
    and diffusers expect)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}, str(path / weights),
              metadata={"format": "pt"})
    return path


def _listing(path: Path, limit: int = 12) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "nothing"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
