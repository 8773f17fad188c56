"""QA sets as tensorflow-datasets (tfds) datasets in array_record files, written and read without
TensorFlow, and `load_qa`, which takes either a QA file path or a `tfds:` spec.

    python -m zsjax.data.tfds_qa --name nq_hotpotqa --data-dir DIR \
        --split train=train.parquet --split test=test.parquet
    load_qa("tfds:nq_hotpotqa/train@DIR")            # -> list[QARow], rows in file order
    load_qa("tfds:nq_hotpotqa:1.0.0/test[:500]@DIR")  # a version and a tfds split slice

What TF-free use needs: `file_format="array_record"` and one workaround. tfds 4.9.10 imports
TensorFlow lazily; the generate-and-write path (feature encoding, example serialization, the
shuffler, the array_record writer) and the `as_data_source` read path (array_record reader, numpy
example parser) never touch it, so TensorFlow stays out of `sys.modules` (a test checks this).
The workaround: the builder sets `code_path = None` (see the comment there); without it
`download_and_prepare` fails with `No module named 'importlib_resources'`. To avoid: the tfrecord
format (written with `tf.io.TFRecordWriter`), and `tfds.dataset_builders.store_as_tfds_dataset` /
`AdhocBuilder`, whose `_split_generators` imports TensorFlow for an `isinstance(x,
tf.data.Dataset)` check; hence the small builder below.

Records keep the source files' row order (`disable_shuffling`), so the tfds set and `read_qa`
agree row for row, and `QuestionStream` over either gives the same batches. Each version stores a
hash of its rows; rebuilding the same version from the same rows reuses the files, and rebuilding
it from different rows is an error rather than a silent reuse of stale data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from zsjax.data.qa import QARow, read_qa

# tfds:NAME[:VERSION]/SPLIT@DATA_DIR; SPLIT may be a tfds split expression such as train[:1000].
_SPEC = re.compile(r"tfds:(?P<name>[^/:@]+)(?::(?P<version>[^/@]+))?/(?P<split>[^@]+)@(?P<dir>.+)")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _rows_sha256(rows: list[QARow]) -> str:
    text = json.dumps([[r.question, list(r.golden_answers)] for r in rows], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class QADatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tfds builder over local QA files: one split per file, records in file order.

    Not registered with tfds: the dataset name is chosen per instance, so QA sets named like tfds
    catalog datasets (`trivia_qa`, `natural_questions`) cannot collide with them.
    """

    # tfds looks next to the builder's source file for a download-checksums file; for a class in
    # a package (not `__main__`) that lookup imports `importlib_resources`, which tfds 4.9.10
    # needs but declares only for Python < 3.9. There is nothing to download, so there is no file.
    code_path = None

    def __init__(self, *, name: str, splits: dict[str, str], data_dir: str,
                 version: str = "1.0.0"):
        if not _NAME.fullmatch(name):
            raise ValueError(f"dataset name {name!r} must be snake_case (a-z, 0-9, _)")
        if not splits:
            raise ValueError("no splits given; pass {split name: QA file path}")
        self.name = name
        self.VERSION = tfds.core.Version(version)  # tfds reads it from the instance
        self._rows = {split: read_qa(path) for split, path in splits.items()}
        self._sources = {split: {"path": str(path), "rows_sha256": _rows_sha256(self._rows[split])}
                         for split, path in splits.items()}
        super().__init__(data_dir=data_dir, version=version, file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"QA set {self.name} built by zsjax.data.tfds_qa from local files.",
            features=tfds.features.FeaturesDict({
                "index": tfds.features.Scalar(dtype=np.int64, doc="row number in the source"),
                "question": tfds.features.Text(),
                "golden_answers": tfds.features.Sequence(tfds.features.Text()),
            }),
            metadata=tfds.core.MetadataDict(sources=self._sources),
            disable_shuffling=True,  # keep file order; shuffling is QuestionStream's job
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the files are local
        return {split: self._generate_examples(rows) for split, rows in self._rows.items()}

    def _generate_examples(self, rows: list[QARow]):
        for i, row in enumerate(rows):
            yield i, {"index": i, "question": row.question,
                      "golden_answers": list(row.golden_answers)}


def build_qa_dataset(name: str, splits: dict[str, str], data_dir: str, *,
                     version: str = "1.0.0") -> QADatasetBuilder:
    """Writes QA files ({split: jsonl or parquet path}) as tfds dataset `name` under `data_dir`
    in array_record; reuses an existing build of `version` made from the same rows."""
    builder = QADatasetBuilder(name=name, splits=splits, data_dir=data_dir, version=version)
    if builder.data_path.exists():  # the test download_and_prepare uses to reuse a build
        built = tfds.builder_from_directory(builder.data_path).info.metadata or {}
        stored = {s: v.get("rows_sha256") for s, v in built.get("sources", {}).items()}
        wanted = {s: v["rows_sha256"] for s, v in builder._sources.items()}
        if stored != wanted:
            changed = sorted(s for s in stored.keys() | wanted.keys()
                             if stored.get(s) != wanted.get(s))
            raise ValueError(
                f"{builder.data_path} holds {name} {version} built from other rows (splits "
                f"{changed} differ); pass a new version or delete that folder to rebuild")
    builder.download_and_prepare()  # a no-op when the version is already prepared
    return builder


def _datasets_in(data_dir: epath.Path) -> list[str]:
    if not data_dir.is_dir():
        return []
    return sorted(d.name for d in data_dir.iterdir() if d.is_dir() and _versions_of(d))


def _versions_of(dataset_dir: epath.Path) -> list[str]:
    found = [v.name for v in dataset_dir.iterdir()
             if tfds.core.Version.is_valid(v.name) and (v / "dataset_info.json").exists()]
    return sorted(found, key=tfds.core.Version)


def read_tfds_qa(data_dir: str, name: str, split: str, *,
                 version: str | None = None) -> list[QARow]:
    """Rows of one split (or tfds split expression) of a dataset written by `build_qa_dataset`,
    read through tfds's array_record data source; `version` defaults to the newest."""
    root = epath.Path(data_dir)
    if not (root / name).is_dir() or not _versions_of(root / name):
        raise ValueError(f"no tfds dataset {name!r} in {data_dir}; it holds "
                         f"{_datasets_in(root) or 'none'}; build one with "
                         "`python -m zsjax.data.tfds_qa`")
    versions = _versions_of(root / name)
    version = version or versions[-1]
    if version not in versions:
        raise ValueError(f"tfds dataset {name!r} in {data_dir} has no version {version}; it has "
                         f"{versions}")
    builder = tfds.builder_from_directory(root / name / version)
    try:
        source = builder.as_data_source(split)
    except ValueError as e:  # tfds names the splits it has
        raise ValueError(f"tfds dataset {name} {version} in {data_dir}: {e}") from None
    examples = source.__getitems__(list(range(len(source))))
    return [QARow(ex["question"].decode("utf-8"),
                  tuple(a.decode("utf-8") for a in ex["golden_answers"])) for ex in examples]


def load_qa(spec: str) -> list[QARow]:
    """QA rows from a jsonl / parquet path (`read_qa`) or a `tfds:NAME[:VERSION]/SPLIT@DATA_DIR`
    spec (`read_tfds_qa`)."""
    if not spec.startswith("tfds:"):
        return read_qa(spec)
    m = _SPEC.fullmatch(spec)
    if not m:
        raise ValueError(f"malformed tfds QA spec {spec!r}; expected tfds:NAME[:VERSION]/SPLIT"
                         "@DATA_DIR, e.g. tfds:nq_hotpotqa/train@/data/tfds")
    return read_tfds_qa(m["dir"], m["name"], m["split"], version=m["version"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m zsjax.data.tfds_qa",
        description="Build a tfds QA dataset (array_record, no TensorFlow) from local jsonl or "
                    "parquet QA files; read it back with load_qa('tfds:NAME/SPLIT@DATA_DIR').")
    parser.add_argument("--name", required=True, help="dataset name, snake_case")
    parser.add_argument("--data-dir", required=True, help="tfds data dir to write under")
    parser.add_argument("--split", action="append", required=True, metavar="SPLIT=FILE",
                        help="a split and its QA file; repeat for each split")
    parser.add_argument("--version", default="1.0.0")
    args = parser.parse_args(argv)
    splits = {}
    for item in args.split:
        split, sep, path = item.partition("=")
        if not sep or not split or not path:
            parser.error(f"--split {item!r}: expected SPLIT=FILE, e.g. train=train.parquet")
        splits[split] = path
    try:
        builder = build_qa_dataset(args.name, splits, args.data_dir, version=args.version)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"{args.name} {args.version} in {builder.data_path}")
    for split, info in sorted(builder.info.splits.items()):
        print(f"{split}: {info.num_examples} rows")


if __name__ == "__main__":
    main()
