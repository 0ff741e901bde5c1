"""Data: built-in TFDS datasets and grain pipelines.

    mmjax.data.config     DataConfig
    mmjax.data.registry   BUILTIN builders, ensure_prepared, open_split, default_data_dir
    mmjax.data.pipeline   train_iterator, eval_batches, iterator_checkpoint_args
    mmjax.data.transforms per-example decode / resize / augment / value-range transforms
    mmjax.data.digits     the `digits` TFDS builder (sklearn's 8x8 handwritten digits)
    mmjax.data.vlm        VLM sequences (image placeholders, answer-only loss weights), the shapes
                          VQA / caption transform and their scores

Nothing is imported here, so `from mmjax.data.config import DataConfig` stays cheap (no TFDS,
grain or JAX).
"""
