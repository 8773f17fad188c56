"""tfds QA sets in array_record: built from jsonl and ZeroSearch parquet without TensorFlow, read
back row for row equal to `read_qa` (the reference), and the `tfds:` specs of `load_qa`."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from zsjax.data.qa import QARow, QuestionStream, read_qa
from zsjax.data.tfds_qa import build_qa_dataset, load_qa, read_tfds_qa

JSONL_ROWS = [
    {"question": "  Who wrote Faust? ", "golden_answers": ["Goethe", "Johann Wolfgang von Goethe"]},
    {"question": "Où se trouve Zürich ?", "golden_answers": ["Suisse", "Schweiz", "スイス"]},
    {"question": "what is 2+2", "golden_answers": "4"},
    {"question": "Who wrote Faust? ", "golden_answers": ["Goethe"]},  # a repeated question
]
PARQUET_QA = [("who founded the city of Vex", ["Mira Tal"]),
              ("which river runs through Oskel", ["Dunra", "the Dunra river"]),
              ("когда построили мост", ["1902"])]


def _zerosearch_row(i, question, answers):
    prompt = ("Answer the given question. You can search as many times as you want. "
              f"Question: {question}?")
    return {"data_source": "nq", "prompt": [{"role": "user", "content": prompt}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
            "extra_info": {"split": "test", "index": i}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("qa")
    jsonl = d / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in JSONL_ROWS))
    table = pa.Table.from_pylist([_zerosearch_row(i, q, a) for i, (q, a) in enumerate(PARQUET_QA)])
    pq.write_table(table, d / "test.parquet")
    return {"train": str(jsonl), "test": str(d / "test.parquet")}


@pytest.fixture(scope="module")
def built(files, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return build_qa_dataset("toy_qa", files, data_dir), data_dir


def test_read_back_equals_read_qa(files, built):
    _, data_dir = built
    for split, path in files.items():
        assert read_tfds_qa(data_dir, "toy_qa", split) == read_qa(path)
    # The fixtures really hold what the test claims: unicode, several answers, the parquet layout.
    assert read_qa(files["train"])[1] == QARow("Où se trouve Zürich ?",
                                               ("Suisse", "Schweiz", "スイス"))
    assert read_qa(files["test"])[1] == QARow("which river runs through Oskel?",
                                              ("Dunra", "the Dunra river"))


def test_files_on_disk_are_array_record(files, built):
    builder, _ = built
    names = sorted(p.name for p in builder.data_path.iterdir())
    assert names == ["dataset_info.json", "features.json", "metadata.json",
                     "toy_qa-test.array_record-00000-of-00001",
                     "toy_qa-train.array_record-00000-of-00001"]
    assert json.loads((builder.data_path / "dataset_info.json").read_text())["fileFormat"] == \
        "array_record"
    for split, path in files.items():
        shard = builder.data_path / f"toy_qa-{split}.array_record-00000-of-00001"
        reader = ArrayRecordReader(str(shard))
        assert reader.num_records() == len(read_qa(path))
        reader.close()


def test_build_and_read_do_not_import_tensorflow(files, tmp_path):
    script = (
        "import sys\n"
        "from zsjax.data.tfds_qa import build_qa_dataset, load_qa\n"
        f"build_qa_dataset('toy_qa', {files!r}, {str(tmp_path)!r})\n"
        f"rows = load_qa('tfds:toy_qa/test@{tmp_path}')\n"
        "assert 'tensorflow_datasets' in sys.modules\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('rows', len(rows))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"rows {len(PARQUET_QA)}" in out.stdout


def test_rebuild_reuses_and_is_deterministic(files, built, tmp_path):
    builder, data_dir = built
    train = builder.data_path / "toy_qa-train.array_record-00000-of-00001"
    before = (os.stat(train).st_mtime_ns, train.read_bytes())
    again = build_qa_dataset("toy_qa", files, data_dir)
    assert again.data_path == builder.data_path
    assert (os.stat(train).st_mtime_ns, train.read_bytes()) == before  # reused, not rewritten
    fresh = build_qa_dataset("toy_qa", files, str(tmp_path))  # same files elsewhere: same bytes
    for split in files:
        name = f"toy_qa-{split}.array_record-00000-of-00001"
        assert (fresh.data_path / name).read_bytes() == (builder.data_path / name).read_bytes()


def test_rebuilding_a_version_from_other_rows_is_an_error(files, built, tmp_path):
    _, data_dir = built
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "new?", "golden_answers": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=r"built from other rows \(splits \['train'\] differ\); "
                                         "pass a new version"):
        build_qa_dataset("toy_qa", {**files, "train": str(other)}, data_dir)
    v2 = build_qa_dataset("toy_qa", {**files, "train": str(other)}, data_dir, version="1.1.0")
    assert str(v2.version) == "1.1.0"
    assert read_tfds_qa(data_dir, "toy_qa", "train") == [QARow("new?", ("x",))]  # newest
    assert read_tfds_qa(data_dir, "toy_qa", "train", version="1.0.0") == read_qa(files["train"])


def test_load_qa_dispatches_on_the_spec(files, built):
    _, data_dir = built
    assert load_qa(files["train"]) == read_qa(files["train"])
    assert load_qa(files["test"]) == read_qa(files["test"])
    assert load_qa(f"tfds:toy_qa:1.0.0/train@{data_dir}") == read_qa(files["train"])
    assert load_qa(f"tfds:toy_qa:1.0.0/test[1:]@{data_dir}") == read_qa(files["test"])[1:]


@pytest.mark.parametrize("spec, message", [
    ("tfds:toy_qa@{d}", r"malformed tfds QA spec .*expected tfds:NAME\[:VERSION\]/SPLIT@DATA_DIR"),
    ("tfds:toy_qa/train", "malformed tfds QA spec"),
    ("tfds:nope/train@{d}", r"no tfds dataset 'nope' in .*; it holds \['toy_qa'\]"),
    ("tfds:toy_qa:9.9.9/train@{d}", r"has no version 9.9.9; it has \['1.0.0'"),
    ("tfds:toy_qa:1.0.0/dev@{d}", r"toy_qa 1.0.0 in .*Unknown split 'dev'.*'train', 'test'"),
    ("tfds:toy_qa/train@{d}/missing", r"no tfds dataset 'toy_qa' in .*missing; it holds none"),
])
def test_bad_specs_say_what_exists(built, spec, message):
    _, data_dir = built
    with pytest.raises(ValueError, match=message):
        load_qa(spec.format(d=data_dir))


def test_question_stream_over_tfds_rows_matches_read_qa(files, built):
    _, data_dir = built
    rows, reference = load_qa(f"tfds:toy_qa:1.0.0/train@{data_dir}"), read_qa(files["train"])
    for process_index in (0, 1):
        a = QuestionStream(rows, 2, seed=3, process_index=process_index, process_count=2)
        b = QuestionStream(reference, 2, seed=3, process_index=process_index, process_count=2)
        assert [a.next() for _ in range(5)] == [b.next() for _ in range(5)]


def test_cli_builds_and_prints_row_counts(files, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "zsjax.data.tfds_qa", *args],
                                       capture_output=True, text=True, timeout=300)
    assert run("--help").returncode == 0
    out = run("--name", "cli_qa", "--data-dir", str(tmp_path), "--split", f"train={files['train']}",
              "--split", f"test={files['test']}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"train: {len(JSONL_ROWS)} rows" in out.stdout
    assert f"test: {len(PARQUET_QA)} rows" in out.stdout
    assert os.path.isdir(tmp_path / "cli_qa" / "1.0.0")
    bad = run("--name", "cli_qa", "--data-dir", str(tmp_path), "--split", files["train"])
    assert bad.returncode == 2 and "expected SPLIT=FILE" in bad.stderr
