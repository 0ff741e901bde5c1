"""Data configuration shared by every pipeline."""

from __future__ import annotations

from mmjax.config import config


@config
class DataConfig:
    """Where examples come from and how they become batches.

    `name` is a built-in dataset ("digits") prepared locally through its TFDS builder, or any
    registered TFDS dataset whose files already sit in `data_dir`.
    """

    name: str = "digits"
    data_dir: str | None = None  # None: $MMJAX_DATA_DIR, else ~/.cache/mmjax/tensorflow_datasets
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int | None = None  # square resize target; None keeps the native size
    # How a non-square image becomes image_size²: "squash" (resize, aspect not kept),
    # "center_crop" (resize the short side, crop the centre), "pad" (resize the long side, pad).
    resize_mode: str = "squash"
    # Normalisation preset (transforms.NORMALIZATIONS): "unit" [0, 1], "symmetric" [-1, 1],
    # "clip" (OpenAI CLIP mean/std), "imagenet" (ImageNet mean/std).
    value_range: str = "unit"
    shuffle_seed: int = 0
    worker_count: int = 0  # grain worker processes; 0 = in the main process
    # Threads per process that read and decode examples (grain ReadOptions.num_threads), off the
    # training thread. Added for the grain pipeline. 1 was fastest on a 2-core host (decoding holds
    # the GIL); raise it for slow (remote) storage or many cores. 0 reads in the calling thread.
    read_threads: int = 1
    prefetch_buffer: int = 2
    random_flip: bool = False  # horizontal flip (off for digits: a flipped 2 is not a 2)
    random_shift: int = 0  # pixels of random translation (pad + crop), 0 = none
    # Inception-style random resized crop for training: (min, max) area fraction; None = off.
    random_resized_crop: tuple[float, float] | None = None
    # Multi-crop tiling (Molmo-style): 0 = off; g > 0 adds "crops" [1 + g², S, S, C]: the whole
    # image resized to S = image_size, then a g×g grid of tiles of the image at g·S resolution.
    multi_crop_grid: int = 0
    # Text: which example field to tokenise (None: no text), with which tokenizer ("bytes", a
    # tokenizer.json path, a sentencepiece .model path, or "bpe:<dataset>:<vocab_size>": a BPE
    # trained once on that dataset's train text and cached in data_dir), to how many ids.
    text_field: str | None = None
    # Numeric features passed through as they are (e.g. shapes' "color", "num_objects" labels).
    extra_fields: tuple[str, ...] = ()
    tokenizer: str = "bytes"
    max_text_len: int = 64
    text_add_bos: bool = False
    text_add_eos: bool = True
    # Text longer than max_text_len: "truncate" (keeps EOS), "error" or "skip".
    on_long_text: str = "truncate"
    # An example whose text is empty or not UTF-8, or whose image cannot be decoded:
    # "error" (stop, naming the example) or "skip" (dropped, counted, warned).
    on_bad_example: str = "error"
    # Hard negative captions for contrastive training (NegCLIP-style word replacement; train only):
    # groups of interchangeable words, e.g. (("circle", "square", "star"),). Each training text gets
    # `neg_text_ids` / `neg_text_len`: the text with one whole-word occurrence of a group word,
    # chosen uniformly, replaced by another word of its group; `neg_valid` is 0 where the text has
    # no group word (that row has no negative). Empty: off.
    text_negatives: tuple[tuple[str, ...], ...] = ()
    # K > 1: K negatives per text, distinct (occurrence, replacement) swaps drawn without replacement
    # (`transforms.SwapWordNegative`): `neg_text_ids` [K, L], `neg_text_len` [K], `neg_valid` [K].
    text_negatives_per_text: int = 1
    # Several training sources mixed with weights: (("shapes", 0.7), ("digits", 0.3)); empty: only
    # `name`. Each entry may name a split as "name:split" (default: train_split).
    mixture: tuple[tuple[str, float], ...] = ()
