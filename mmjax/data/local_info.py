"""`LocalDatasetInfo` and `LocalBuildMessages`: for mmjax's own TFDS builders (generated locally).

When a builder's data directory has no prepared dataset yet, `tfds.core.DatasetBuilder.__init__`
calls `info.initialize_from_bucket()`, which makes a temporary directory for metadata files to be
copied from TFDS's public GCS bucket, and returns without removing it when the dataset is not
there (always, for ours; GCS access is also disabled by default). Every such builder left an empty
`/tmp/tmp*tfds` directory behind (tensorflow_datasets 4.9). Our builders are generated locally and
have nothing in the bucket, so this subclass skips that lookup.

`download_and_prepare` prints "Downloading and preparing dataset Unknown size (download: Unknown
size, ...)" before a build and "Dataset ... downloaded and prepared to ..." after it, although our
builders download nothing; `LocalBuildMessages` prints what happens instead.
"""

from __future__ import annotations

import tensorflow_datasets as tfds


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """A DatasetInfo that never looks for precomputed metadata in TFDS's GCS bucket."""

    def initialize_from_bucket(self) -> None:
        return None


class LocalBuildMessages:
    """Mixin for a TFDS builder that generates its data locally: replaces TFDS's "Downloading and
    preparing dataset ..." / "... downloaded and prepared to ..." lines (printed to stdout by
    `download_and_prepare`) with ones that say nothing is downloaded."""

    def _local_name(self) -> str:
        config = getattr(self, "builder_config", None)
        return f"{self.name}/{config.name}" if config is not None else self.name

    def _log_download_bytes(self) -> None:
        print(f"mmjax: building the local TFDS dataset {self._local_name()} in {self.data_dir} "
              "(nothing is downloaded)", flush=True)

    def _log_download_done(self) -> None:
        print(f"mmjax: built {self._local_name()} in {self.data_dir}", flush=True)
