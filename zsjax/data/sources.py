"""QA rows from wherever a config points: a jsonl / parquet file, or a tensorflow-datasets set.

`zsjax.data.qa` reads files and `zsjax.data.tfds_qa` (which builds on it) reads tfds sets; this
module chooses between them, so that neither imports the other's reader back.
"""

from __future__ import annotations

from zsjax.data.qa import QARow, read_qa


def load_qa(spec: str) -> list[QARow]:
    """Rows of a QA file (`read_qa`) or of a tensorflow-datasets set given as
    `tfds:NAME[:VERSION]/SPLIT@DATA_DIR` (`zsjax.data.tfds_qa`)."""
    if spec.startswith("tfds:"):
        # tensorflow-datasets is a heavy import: only for the specs that need it
        from zsjax.data import tfds_qa
        return tfds_qa.load_qa(spec)
    return read_qa(spec)
