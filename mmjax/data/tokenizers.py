"""Tokenizers: text ↔ int ids behind one interface.

Every tokenizer is a `Tokenizer`:

    tok = load_tokenizer("bytes")                    # or a tokenizer.json / directory / .model path
    image_id, = tok.add_special_tokens(["<image>"])  # VLM placeholder: always one id
    ids = tok.encode("a red circle <image>", add_eos=True)        # list[int]
    batch, lengths = tok.encode_batch(texts, max_len=64)          # int32 [B, 64], int32 [B]
    text = tok.decode(ids)                                        # specials skipped
    check_vocab(tok, model_vocab_size)                            # before building an embedding

Implementations
    ByteTokenizer           UTF-8 bytes; needs no files (the default, spec "bytes")
    HFTokenizer             any `tokenizer.json` of the `tokenizers` library (CLIP, Llama, GPT-2, ...)
    SentencePieceTokenizer  a sentencepiece `.model` file
    train_bpe               trains a byte-level BPE on a dataset's captions, saves `tokenizer.json`

Conventions shared by all of them
- `encode` never adds BOS/EOS by itself (not even where a tokenizer.json has a post-processor that
  would): the `add_bos` / `add_eos` flags are the only way, so every tokenizer behaves the same.
- Added special tokens (`add_special_tokens`, e.g. "<image>" or image-code tokens) are matched
  verbatim in the text and always encode to their single id. The ByteTokenizer matches only such
  *added* tokens: its own <pad>/<bos>/<eos> are never produced from text (a caption containing
  "<eos>" cannot end a sequence), they come only from the flags and from padding.
- `encode` takes `str`, or `bytes` that are decoded as UTF-8 first: `errors="strict"` (default)
  raises a ValueError for bytes that are not UTF-8, `errors="replace"` substitutes U+FFFD. Any other
  type is a TypeError naming the type. The empty string encodes to [] (plus BOS/EOS if asked).
- `encode_batch` pads with `pad_id` and returns the lengths: find padding from the lengths, never
  by comparing with `pad_id` (it may equal `eos_id` where a tokenizer has no pad token).
- `vocab_size` counts every id the tokenizer can emit, added special tokens included; all ids lie
  in [0, vocab_size).
- Nothing here downloads: `load_tokenizer` only reads local files.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SPEC_FILE",
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "check_vocab",
    "load_tokenizer",
    "train_bpe",
]

# Written by `Tokenizer.save` next to the tokenizer's own files: which class, which special-token
# names and which added special tokens, so `load_tokenizer(directory)` rebuilds the same tokenizer.
SPEC_FILE = "mmjax_tokenizer.json"
TRUNCATIONS = ("right", "left", "error")


def _as_text(text: Any, errors: str) -> str:
    """`text` as a str: str as is; bytes decoded as UTF-8 (errors="strict" raises, "replace" puts
    U+FFFD for invalid bytes); anything else is a TypeError."""
    if isinstance(text, str):
        return str(text)  # np.str_ and other subclasses become plain str
    if isinstance(text, (bytes, bytearray, memoryview)):
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        try:
            return bytes(text).decode("utf-8", errors=errors)
        except UnicodeDecodeError as e:
            raise ValueError(f"text given as bytes is not valid UTF-8 ({e}); pass errors='replace' to "
                             "substitute U+FFFD for the invalid bytes") from None
    raise TypeError(f"text must be str (or UTF-8 bytes), got {type(text).__name__}")


def _check_token_names(tokens: Sequence[str]) -> list[str]:
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"add_special_tokens takes a sequence of str, got a single {type(tokens).__name__} "
                        f"{tokens!r}: wrap it in a list")
    out = []
    for t in tokens:
        if not isinstance(t, str):
            raise TypeError(f"special tokens must be str, got {type(t).__name__} {t!r}")
        if not t:
            raise ValueError("a special token cannot be the empty string")
        out.append(t)
    return out


def _as_id_list(ids: Sequence[int], vocab_size: int) -> list[int]:
    """ids (list, numpy or JAX array, 1-D) as Python ints, each checked to lie in [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"decode takes a 1-D sequence of ids, got shape {arr.shape}; decode rows one by one")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
    out = [int(i) for i in arr]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"ids {bad[:5]} are outside this tokenizer's vocabulary [0, {vocab_size})")
    return out


def _split_on_specials(text: str, pattern: re.Pattern | None, lookup: dict[str, int]) -> list[str | int]:
    """text cut at every occurrence of an added special token: a list of text pieces (str) and
    special ids (int). The pattern tries longer tokens first, so "<image_start>" wins over "<image>"."""
    if pattern is None:
        return [text] if text else []
    out: list[str | int] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(lookup[m.group(0)])
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def _specials_pattern(tokens: Iterable[str]) -> re.Pattern | None:
    tokens = sorted(tokens, key=lambda t: (-len(t), t))
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


class Tokenizer(abc.ABC):
    """text ↔ ids. Subclasses implement `_encode_text` (a str, no BOS/EOS) and the abstract members;
    the flags, type checks, batching and truncation live here once."""

    pad_id: int
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None

    # -- per implementation -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Every id this tokenizer can emit is < vocab_size (added special tokens included)."""

    @abc.abstractmethod
    def _encode_text(self, text: str) -> list[int]:
        """ids of `text` without BOS/EOS; added special tokens in the text become their single id."""

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """_encode_text over a batch (an implementation may do it faster at once)."""
        return [self._encode_text(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """ids → text. skip_special drops pad/bos/eos and added special tokens; otherwise they are
        written out as their token text (e.g. "<image>")."""

    @abc.abstractmethod
    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Adds tokens that always encode to one id each and returns their ids. Idempotent: a token
        that already exists keeps (and returns) its id. Grows vocab_size by the new ones."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one token (a vocabulary entry or special token), None if there is none."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (a byte-level piece, a sentencepiece piece, "<eos>", ...)."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Every special token (pad/bos/eos/unk where they exist, then added ones) → its id."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the tokenizer's files and SPEC_FILE into `directory` (created if missing);
        `load_tokenizer(directory)` gives the same tokenizer back. Returns the directory."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable record of exactly which tokenizer this is (type, file hash, vocab
        size, special ids), for a run's config / results."""

    # -- shared -------------------------------------------------------------------------------
    def encode(self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False,
               errors: str = "strict") -> list[int]:
        """text → ids, with BOS first / EOS last when asked. `text` is str, or bytes decoded as
        UTF-8 per `errors` ("strict": ValueError on invalid bytes; "replace": U+FFFD)."""
        ids = self._encode_text(_as_text(text, errors))
        if add_bos:
            ids = [self._require("bos")] + ids
        if add_eos:
            ids = ids + [self._require("eos")]
        return ids

    def encode_batch(self, texts: Sequence[str | bytes], *, max_len: int, add_bos: bool = False,
                     add_eos: bool = True, truncation: str = "right",
                     errors: str = "strict") -> tuple[np.ndarray, np.ndarray]:
        """B texts → (ids int32 [B, max_len] padded with pad_id, lengths int32 [B]).

        Longer texts are cut to max_len keeping BOS first and EOS last when they are added:
        truncation="right" keeps the start of the text, "left" keeps its end, "error" raises.
        mask = np.arange(max_len) < lengths[:, None] marks the real tokens.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode_batch takes a sequence of texts, got a single "
                            f"{type(texts).__name__}: wrap it in a list (or use encode)")
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)):
            raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
        n_special = int(add_bos) + int(add_eos)
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        if max_len < n_special:
            raise ValueError(f"max_len={max_len} leaves no room for the {n_special} BOS/EOS tokens asked for")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        if add_bos:
            self._require("bos")
        if add_eos:
            self._require("eos")
        texts = [_as_text(t, errors) for t in texts]
        out = np.full((len(texts), max_len), self.pad_id, np.int32)
        lengths = np.zeros((len(texts),), np.int32)
        budget = max_len - n_special  # room for the text's own ids
        for row, (text, body) in enumerate(zip(texts, self._encode_texts(texts))):
            if len(body) > budget:
                if truncation == "error":
                    raise ValueError(f"text {row} has {len(body) + n_special} tokens, more than "
                                     f"max_len={max_len}: {text[:60]!r}...")
                body = body[:budget] if truncation == "right" else body[len(body) - budget:]
            ids = ([self.bos_id] if add_bos else []) + body + ([self.eos_id] if add_eos else [])
            out[row, : len(ids)] = ids
            lengths[row] = len(ids)
        return out, lengths

    def _require(self, which: str) -> int:
        value = getattr(self, f"{which}_id")
        if value is None:
            raise ValueError(f"{type(self).__name__} has no {which.upper()} token, so add_{which}=True cannot "
                             f"be honoured (where a tokenizer.json has one under another name, pass {which}_token=... "
                             "to HFTokenizer / load_tokenizer)")
        return value

    def _base_description(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "unk_id": self.unk_id, "special_tokens": self.special_tokens}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id})")


# --------------------------------------------------------------------------------------------
# Bytes


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids; needs no files.

    Id layout (fixed; models trained on it stay valid):
        0 .. 255     the byte values, so encode(s) == list(s.encode("utf-8"))
        256          <pad>
        257          <bos>
        258          <eos>
        259 ..       added special tokens, in the order they were added
    vocab_size = 259 + number of added tokens. There is no unknown token: every string is bytes.

    Added special tokens are matched verbatim in the text (longest first) and encode to their one
    id; <pad>/<bos>/<eos> are never matched in text. decode(encode(s)) == s exactly for every
    string s without an added token in it (and for all strings with skip_special=False).
    A string with lone surrogates (e.g. "\\ud800") is not UTF-8 and raises a ValueError.

    decode's `errors` handles byte sequences that are not UTF-8, as a model may sample:
    "replace" (default) writes U+FFFD for them, "strict" raises a ValueError.
    """

    NUM_BYTES = 256
    PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

    def __init__(self, added_special_tokens: Sequence[str] = ()):
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 256, 257, 258, None
        self._builtin = {self.PAD: self.pad_id, self.BOS: self.bos_id, self.EOS: self.eos_id}
        self._added: dict[str, int] = {}
        self._pattern: re.Pattern | None = None
        self.add_special_tokens(added_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + len(self._builtin) + len(self._added)

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _split_on_specials(text, self._pattern, self._added):
            if isinstance(piece, int):
                ids.append(piece)
                continue
            try:
                ids.extend(piece.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise ValueError(f"text cannot be encoded as UTF-8 ({e}); it holds a lone surrogate") from None
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True, errors: str = "replace") -> str:
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        names = {i: t for t, i in self.special_tokens.items()}
        parts: list[str] = []
        run = bytearray()  # consecutive byte ids decode together: one character spans several bytes

        def flush():
            if run:
                try:
                    parts.append(run.decode("utf-8", errors=errors))
                except UnicodeDecodeError as e:
                    raise ValueError(f"ids are not a valid UTF-8 byte sequence ({e}); "
                                     "decode with errors='replace'") from None
                run.clear()

        for i in _as_id_list(ids, self.vocab_size):
            if i < self.NUM_BYTES:
                run.append(i)
                continue
            flush()
            if not skip_special:
                parts.append(names[i])
        flush()
        return "".join(parts)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        out = []
        for t in _check_token_names(tokens):
            if t in self._builtin:
                out.append(self._builtin[t])
                continue
            if t not in self._added:
                self._added[t] = self.NUM_BYTES + len(self._builtin) + len(self._added)
            out.append(self._added[t])
        self._pattern = _specials_pattern(self._added)
        return out

    def token_to_id(self, token: str) -> int | None:
        if token in self._builtin:
            return self._builtin[token]
        if token in self._added:
            return self._added[token]
        if len(token) == 1 and ord(token) < 128:  # an ASCII character is its byte
            return ord(token)
        m = re.fullmatch(r"<0x([0-9A-F]{2})>", token)  # any byte, as id_to_token writes it
        return int(m.group(1), 16) if m else None

    def id_to_token(self, token_id: int) -> str | None:
        """ASCII bytes as their character, bytes 128..255 as "<0xNN>" (sentencepiece's spelling of
        byte pieces), special ids as their token."""
        token_id = int(token_id)
        if 0 <= token_id < 128:
            return chr(token_id)
        if 128 <= token_id < self.NUM_BYTES:
            return f"<0x{token_id:02X}>"
        return {i: t for t, i in self.special_tokens.items()}.get(token_id)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {**self._builtin, **self._added}

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = {"type": "bytes", "added_special_tokens": list(self._added)}
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        return directory

    def describe(self) -> dict[str, Any]:
        return {"type": "bytes", **self._base_description(), "added_special_tokens": list(self._added)}

    def __getstate__(self):
        return {"added": list(self._added)}

    def __setstate__(self, state):
        self.__init__(state["added"])


# --------------------------------------------------------------------------------------------
# tokenizers (Hugging Face) tokenizer.json

# Names tried, in order, when a special token is not named explicitly: the conventions of our own
# train_bpe, Llama/T5 (sentencepiece), CLIP/GPT-2, Llama 3 and BERT. Only the file's added tokens
# are searched. No pad token found: padding uses EOS (as HF does for CLIP and GPT-2).
_CANDIDATES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>"),
    "bos": ("<bos>", "<s>", "<|startoftext|>", "<|begin_of_text|>", "[CLS]"),
    "eos": ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]"),
    "unk": ("<unk>", "[UNK]"),
}


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from any tokenizer.json on disk, or built in memory).

    pad/bos/eos/unk: `pad_token="..."` etc. name them (a ValueError lists the file's special
    tokens when a named one does not exist); left None they are looked up among the file's added
    tokens by the usual names (_CANDIDATES), and the pad token falls back to EOS. A tokenizer
    with neither a pad nor an EOS token needs `pad_token=`.

    The file's own truncation, padding and post-processor (which may add BOS/EOS) are not used:
    encode_batch pads and truncates, and the add_bos/add_eos flags add BOS/EOS.
    """

    def __init__(self, tokenizer: Any, *, pad_token: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, unk_token: str | None = None,
                 added_special_tokens: Sequence[str] = ()):
        import tokenizers

        self.path: Path | None = None
        if isinstance(tokenizer, tokenizers.Tokenizer):
            tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())  # our own copy: we add tokens to it
        elif isinstance(tokenizer, (str, os.PathLike)):
            self.path = Path(tokenizer).expanduser()
            if self.path.is_dir():
                self.path = self.path / "tokenizer.json"
            if not self.path.is_file():
                raise FileNotFoundError(f"no tokenizer.json at {self.path}")
            try:
                tok = tokenizers.Tokenizer.from_file(str(self.path))
            except Exception as e:  # the library raises bare Exceptions for malformed files
                raise ValueError(f"{self.path} is not a tokenizers tokenizer.json: {e}") from e
        else:
            raise TypeError("HFTokenizer takes a tokenizers.Tokenizer or a path to a tokenizer.json, got "
                            f"{type(tokenizer).__name__}")
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self._names: dict[str, str | None] = {}
        for which, given in (("pad", pad_token), ("bos", bos_token), ("eos", eos_token), ("unk", unk_token)):
            self._names[which] = self._find(which, given)
        if self._names["pad"] is None:
            self._names["pad"] = self._names["eos"]
        if self._names["pad"] is None:
            raise ValueError("this tokenizer.json has neither a pad nor an EOS token among its special tokens "
                             f"{sorted(self._added_tokens())}; name one with pad_token=... (it may be added "
                             "first with add_special_tokens on a tokenizers.Tokenizer)")
        self.pad_id = self._tok.token_to_id(self._names["pad"])
        self.bos_id, self.eos_id, self.unk_id = (
            None if self._names[w] is None else self._tok.token_to_id(self._names[w]) for w in ("bos", "eos", "unk"))
        self._extra: list[str] = []
        self.add_special_tokens(added_special_tokens)

    def _added_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

    def _find(self, which: str, given: str | None) -> str | None:
        if given is not None:
            if self._tok.token_to_id(given) is None:
                raise ValueError(f"{which}_token={given!r} is not in this tokenizer's vocabulary; its special "
                                 f"tokens are {sorted(self._added_tokens())}")
            return given
        added = self._added_tokens()
        return next((name for name in _CANDIDATES[which] if name in added), None)

    @property
    def tokenizer(self):
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _count_vocab(self) -> int:
        # Ids need not be contiguous in a hand-edited file: the bound is the largest id + 1.
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)

    def _encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        ids = _as_id_list(ids, self.vocab_size)
        if skip_special:  # pad/bos/eos may be ordinary (non-special) tokens in some files
            drop = {i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None}
            ids = [i for i in ids if i not in drop]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        from tokenizers import AddedToken

        tokens = _check_token_names(tokens)
        new = [t for t in tokens if t not in self._added_tokens()]
        if new:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        self._vocab_size = self._count_vocab()
        for t in tokens:
            if t not in self._extra and t not in self._names.values():
                self._extra.append(t)
        return [self._tok.token_to_id(t) for t in tokens]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @property
    def special_tokens(self) -> dict[str, int]:
        out = {name: self._tok.token_to_id(name) for name in self._names.values() if name is not None}
        out.update({t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items()) if t.special})
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        spec = {"type": "hf", "file": "tokenizer.json", **{f"{w}_token": n for w, n in self._names.items()},
                "added_special_tokens": self._extra}
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        return directory

    def describe(self) -> dict[str, Any]:
        return {"type": "hf", "path": None if self.path is None else str(self.path),
                # The hash covers the whole tokenizer as used, added tokens included.
                "sha256": hashlib.sha256(self._tok.to_str().encode()).hexdigest(),
                **self._base_description(), **{f"{w}_token": n for w, n in self._names.items()},
                "added_special_tokens": list(self._extra)}


def train_bpe(texts: Iterable[str], vocab_size: int, directory: str | os.PathLike, *,
              special_tokens: Sequence[str] = ("<pad>", "<bos>", "<eos>", "<unk>"),
              lowercase: bool = False) -> HFTokenizer:
    """Trains a byte-level BPE (GPT-2 style: every byte is in the alphabet, so no text is unknown)
    on `texts`, saves `directory/tokenizer.json` (+ SPEC_FILE) and returns it loaded.

    `vocab_size` counts the 256 bytes, the special tokens (which take ids 0.. in the given order)
    and the merges; a small corpus may run out of merges first, giving a smaller vocabulary.
    No Unicode normalisation (decode(encode(s)) == s); `lowercase=True` lowercases first.
    The same texts give the same tokenizer.json (the library's trainer is deterministic).
    """
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    special_tokens = _check_token_names(special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} cannot hold the {len(alphabet)} bytes and "
                         f"{len(special_tokens)} special tokens")

    def checked(it):
        n = 0
        for i, t in enumerate(it):
            if not isinstance(t, str):
                raise TypeError(f"train_bpe texts must be str, text {i} is {type(t).__name__}")
            n += 1
            yield t
        if n == 0:
            raise ValueError("train_bpe got no texts")

    tok = _HFTok(models.BPE(unk_token="<unk>" if "<unk>" in special_tokens else None))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(checked(texts), trainer)
    names = {f"{w}_token": n for w, n in (("pad", "<pad>"), ("bos", "<bos>"), ("eos", "<eos>"), ("unk", "<unk>"))
             if n in special_tokens}
    out = HFTokenizer(tok, **names)
    out.save(directory)
    out.path = Path(directory) / "tokenizer.json"
    return out


# --------------------------------------------------------------------------------------------
# sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` (Llama 1/2, T5, Gemma style).

    pad/bos/eos/unk ids are the model's own (`pad_id()` etc.); a model without a pad token pads
    with EOS. Special tokens added here (sentencepiece cannot extend a trained model) take ids
    from the model's vocabulary size on and are cut out of the text before sentencepiece sees the
    rest; pieces around them are encoded separately, so sentencepiece's whitespace normalisation
    applies to each piece. Prefer training-time `user_defined_symbols` where you can train.
    """

    def __init__(self, model_file: str | os.PathLike, *, added_special_tokens: Sequence[str] = ()):
        import sentencepiece as spm

        self.path = Path(model_file).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {self.path}")
        self._proto = self.path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except Exception as e:
            raise ValueError(f"{self.path} is not a sentencepiece model: {e}") from e
        sp = self._sp
        as_id = lambda i: None if i < 0 else int(i)
        self.bos_id, self.eos_id, self.unk_id = as_id(sp.bos_id()), as_id(sp.eos_id()), as_id(sp.unk_id())
        pad = as_id(sp.pad_id())
        if pad is None:
            pad = self.eos_id
        if pad is None:
            raise ValueError(f"{self.path} has neither a pad nor an EOS id; train it with pad_id or eos_id set")
        self.pad_id = pad
        self._added: dict[str, int] = {}
        self._pattern: re.Pattern | None = None
        self.add_special_tokens(added_special_tokens)

    @property
    def processor(self):
        """The wrapped `sentencepiece.SentencePieceProcessor`."""
        return self._sp

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size() + len(self._added)

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _split_on_specials(text, self._pattern, self._added):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(self._sp.encode(piece, out_type=int))
        return ids

    def _is_special(self, i: int) -> bool:
        return i >= self._sp.vocab_size() or self._sp.is_control(i)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        names = {i: t for t, i in self._added.items()}
        parts: list[str] = []
        run: list[int] = []
        for i in _as_id_list(ids, self.vocab_size):
            if not self._is_special(i) and i != self.pad_id:
                run.append(i)
                continue
            if run:
                parts.append(self._sp.decode(run))
                run = []
            if not skip_special:
                parts.append(names[i] if i in names else self._sp.id_to_piece(i))
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        out = []
        for t in _check_token_names(tokens):
            existing = self.token_to_id(t)
            if existing is None:
                existing = self._added[t] = self._sp.vocab_size() + len(self._added)
            out.append(existing)
        self._pattern = _specials_pattern(self._added)
        return out

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        i = self._sp.piece_to_id(token)  # unknown pieces map to unk_id: tell them apart
        return None if self._sp.id_to_piece(i) != token else int(i)

    def id_to_token(self, token_id: int) -> str | None:
        token_id = int(token_id)
        if 0 <= token_id < self._sp.vocab_size():
            return self._sp.id_to_piece(token_id)
        return {i: t for t, i in self._added.items()}.get(token_id)

    @property
    def special_tokens(self) -> dict[str, int]:
        out = {self._sp.id_to_piece(i): i for i in (self.pad_id, self.bos_id, self.eos_id, self.unk_id)
               if i is not None}
        return {**out, **self._added}

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "tokenizer.model"
        if not (target.exists() and target.samefile(self.path)):
            shutil.copyfile(self.path, target)
        spec = {"type": "sentencepiece", "file": "tokenizer.model", "added_special_tokens": list(self._added)}
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        return directory

    def describe(self) -> dict[str, Any]:
        return {"type": "sentencepiece", "path": str(self.path), "sha256": hashlib.sha256(self._proto).hexdigest(),
                **self._base_description(), "added_special_tokens": list(self._added)}

    def __getstate__(self):
        return {"path": str(self.path), "added": list(self._added)}

    def __setstate__(self, state):
        self.__init__(state["path"], added_special_tokens=state["added"])


# --------------------------------------------------------------------------------------------
# Loading and checks

_ACCEPTED = ('"bytes"; a tokenizer.json file (tokenizers library); a sentencepiece .model file; or a '
             f"directory holding {SPEC_FILE} (from Tokenizer.save), tokenizer.json or tokenizer.model")


def _from_spec_file(path: Path, **kw) -> Tokenizer:
    spec = json.loads(path.read_text())
    kind = spec.get("type")
    added = list(spec.get("added_special_tokens", ()))
    kw = {**kw, "added_special_tokens": added + [t for t in kw.get("added_special_tokens", ()) if t not in added]}
    if kind == "bytes":
        return ByteTokenizer(**kw)
    if kind == "hf":
        names = {k: spec.get(k) for k in ("pad_token", "bos_token", "eos_token", "unk_token")}
        return HFTokenizer(path.parent / spec.get("file", "tokenizer.json"), **{**names, **kw})
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path.parent / spec.get("file", "tokenizer.model"), **kw)
    raise ValueError(f"{path}: unknown tokenizer type {kind!r} (expected 'bytes', 'hf' or 'sentencepiece')")


def load_tokenizer(spec: str | os.PathLike, **kw) -> Tokenizer:
    """A tokenizer from a spec string; keyword arguments go to the tokenizer's constructor
    (e.g. eos_token="</s>", added_special_tokens=["<image>"]). Only local files: never downloads.

        "bytes"                       ByteTokenizer
        path/to/tokenizer.json        HFTokenizer  (any *.json the tokenizers library reads)
        path/to/name.model            SentencePieceTokenizer
        path/to/directory             its SPEC_FILE if present, else tokenizer.json, else tokenizer.model
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer spec must be a str or path, got {type(spec).__name__}")
    if spec == "bytes":
        return ByteTokenizer(**kw)
    path = Path(spec).expanduser()
    if path.is_dir():
        for name, build in ((SPEC_FILE, _from_spec_file), ("tokenizer.json", HFTokenizer),
                            ("tokenizer.model", SentencePieceTokenizer)):
            if (path / name).is_file():
                return build(path / name, **kw)
        raise ValueError(f"tokenizer spec {str(spec)!r} is a directory without {SPEC_FILE}, tokenizer.json or "
                         f"tokenizer.model; accepted: {_ACCEPTED}")
    if path.suffix in (".json", ".model"):
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer spec {str(spec)!r}: no such file")
        if path.name == SPEC_FILE:
            return _from_spec_file(path, **kw)
        return HFTokenizer(path, **kw) if path.suffix == ".json" else SentencePieceTokenizer(path, **kw)
    hint = (" (load_tokenizer never downloads: save the tokenizer's tokenizer.json or .model locally and "
            "pass its path)") if not path.exists() else ""
    raise ValueError(f"unknown tokenizer spec {str(spec)!r}{hint}; accepted: {_ACCEPTED}")


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises a ValueError if `tokenizer` can emit an id >= model_vocab_size (the size of the
    model's embedding table / output layer). A larger model vocabulary (e.g. padded up to a
    multiple of 128) is fine."""
    if isinstance(model_vocab_size, bool) or not isinstance(model_vocab_size, (int, np.integer)):
        raise TypeError(f"model_vocab_size must be an int, got {type(model_vocab_size).__name__}")
    if model_vocab_size <= 0:
        raise ValueError(f"model_vocab_size must be positive, got {model_vocab_size}")
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"{type(tokenizer).__name__} emits ids up to {tokenizer.vocab_size - 1} (vocab_size="
                         f"{tokenizer.vocab_size}, added special tokens included) but the model's vocabulary has "
                         f"only {model_vocab_size} entries; set the model's vocab_size >= {tokenizer.vocab_size}")
