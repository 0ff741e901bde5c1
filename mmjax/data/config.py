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
    value_range: str = "unit"  # "unit": [0, 1]; "symmetric": [-1, 1]
    shuffle_seed: int = 0
    worker_count: int = 0  # grain worker processes; 0 = in the main process
    # Threads per process that read and decode examples (grain ReadOptions.num_threads), off the
    # training thread. Added for the grain pipeline. 1 was fastest on a 2-core host (decoding holds
    # the GIL); raise it for slow (remote) storage or many cores. 0 reads in the calling thread.
    read_threads: int = 1
    prefetch_buffer: int = 2
    random_flip: bool = False  # horizontal flip (off for digits: a flipped 2 is not a 2)
    random_shift: int = 0  # pixels of random translation (pad + crop), 0 = none
