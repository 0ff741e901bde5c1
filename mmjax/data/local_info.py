"""`LocalDatasetInfo`: the DatasetInfo of mmjax's own TFDS builders.

When a builder's data directory has no prepared dataset yet, `tfds.core.DatasetBuilder.__init__`
calls `info.initialize_from_bucket()`, which makes a temporary directory for metadata files to be
copied from TFDS's public GCS bucket, and returns without removing it when the dataset is not
there (always, for ours; GCS access is also disabled by default). Every such builder left an empty
`/tmp/tmp*tfds` directory behind (tensorflow_datasets 4.9). Our builders are generated locally and
have nothing in the bucket, so this subclass skips that lookup.
"""

from __future__ import annotations

import tensorflow_datasets as tfds


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """A DatasetInfo that never looks for precomputed metadata in TFDS's GCS bucket."""

    def initialize_from_bucket(self) -> None:
        return None
