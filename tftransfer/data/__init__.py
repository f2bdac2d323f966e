"""Data: sources (digits, TFDS, image folders, CSV/JSONL) and tf.data pipelines."""

from tftransfer.data.pipeline import (
    augment_batches,
    augmentation_layers,
    batches_per_pass,
    drop_final_batch,
    eval_batch_size,
    make_pipeline,
)
from tftransfer.data.sources import (
    LabelledData,
    Split,
    decode_image,
    load_digits,
    load_image_folder,
    load_text_file,
    load_text_tasks,
    load_tfds,
)
