"""QA readers for jsonl and both parquet layouts, and the resumable question stream."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zsjax.data.qa import QARow, QuestionStream, read_qa
from zsjax.search.prompts import policy_prompt


def test_jsonl(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"id": "1", "question": " who? ", "golden_answers": ["Al", "B"]})
                 + "\n\n" + json.dumps({"question": "what", "golden_answers": "C"}) + "\n")
    assert read_qa(str(p)) == [QARow("who?", ("Al", "B")), QARow("what", ("C",))]


def test_zerosearch_parquet(tmp_path):
    rows = [{"data_source": "nq", "prompt": [{"role": "user", "content": policy_prompt("who is x")}],
             "ability": "fact-reasoning",
             "reward_model": {"style": "rule", "ground_truth": {"target": ["X", "Ex"]}},
             "extra_info": {"split": "train", "index": 0}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "z.parquet")
    assert read_qa(str(tmp_path / "z.parquet")) == [QARow("who is x?", ("X", "Ex"))]


def test_verl_parquet_with_string_ground_truth(tmp_path):
    rows = [{"data_source": "nq", "prompt": [{"role": "user", "content": "when was it"}],
             "reward_model": {"style": "rule", "ground_truth": "1972"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "v.parquet")
    assert read_qa(str(tmp_path / "v.parquet")) == [QARow("when was it", ("1972",))]


def test_unreadable_rows_name_the_columns(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"text": "hi", "label": 1}]), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"row 0 has no question.*columns \['label', 'text'\]"):
        read_qa(str(tmp_path / "b.parquet"))
    with pytest.raises(FileNotFoundError):
        read_qa(str(tmp_path / "missing.jsonl"))


def test_json_lists_and_malformed_lines_name_the_file_and_line(tmp_path):
    rows = [{"question": "Who?", "golden_answers": ["x"]}, {"question": "Where?",
                                                             "golden_answers": ["y", "z"]}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))  # a list over many lines
    assert read_qa(str(tmp_path / "a.json")) == [QARow("Who?", ("x",)),
                                                 QARow("Where?", ("y", "z"))]
    (tmp_path / "b.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"b.jsonl:2: not valid JSON"):
        read_qa(str(tmp_path / "b.jsonl"))
    (tmp_path / "c.jsonl").write_text(json.dumps(rows) + "\n")  # a JSON list in a .jsonl
    with pytest.raises(ValueError, match=r"c.jsonl: row 0 \(line 1\) is a list, not an object"):
        read_qa(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.json").write_text(json.dumps(rows[0]))
    with pytest.raises(ValueError, match=r"d.json: a .json QA file holds a list of rows"):
        read_qa(str(tmp_path / "d.json"))


def test_question_stream_resumes_and_splits_over_processes():
    rows = [QARow(f"q{i}", ("a",)) for i in range(10)]
    s = QuestionStream(rows, 4, seed=1)
    seen = [s.next() for _ in range(5)]
    resumed = QuestionStream(rows, 4, seed=1, start=3)
    assert [resumed.next() for _ in range(2)] == seen[3:]
    halves = [QuestionStream(rows, 4, seed=1, process_index=i, process_count=2) for i in (0, 1)]
    first = [h.next() for h in halves]
    assert first[0] + first[1] == seen[0]  # contiguous blocks, in process order


def test_dataset_names_tell_same_named_files_apart(tmp_path):
    """Eval sets laid out as nq/test.jsonl, bamboogle/test.jsonl: both evaluated, named by
    folder (the trainer once kept only the last one, under the name `test`)."""
    from zsjax.data.qa import dataset_names
    from zsjax.evaluate import read_datasets
    paths = []
    for folder, n in (("nq", 3), ("bamboogle", 2)):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "test.jsonl"
        path.write_text("".join(json.dumps({"question": f"{folder} {i}?", "golden_answers":
                                            ["x"]}) + "\n" for i in range(n)))
        paths.append(str(path))
    assert dataset_names(paths + ["/d/hotpotqa.dev.jsonl", "tfds:zsjax_qa/nq@1.0.0"]) == [
        "nq.test", "bamboogle.test", "hotpotqa.dev", "zsjax_qa_nq"]
    assert {k: len(v) for k, v in read_datasets(paths).items()} == {"nq.test": 3,
                                                                  "bamboogle.test": 2}
    with pytest.raises(ValueError, match="would both be named 'nq.test'"):
        dataset_names([paths[0], paths[0]])


def test_answer_values(tmp_path, capsys):
    """Numbers are answers (as text); null, nested lists and booleans are errors naming the row
    and its line; answers that normalise to nothing are dropped (they would match any
    prediction), and a row with nothing else is skipped with a warning (NQ's test set has
    one, "---"); no answers or an empty question are errors."""
    def read(*rows):
        p = tmp_path / "q.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return read_qa(str(p))
    assert read({"question": "When?", "golden_answers": 2019.0}) == [QARow("When?", ("2019",))]
    assert read({"question": "When?", "golden_answers": 1972},
                {"question": "How many?", "golden_answers": [3, "three", "", "the"]}) == [
        QARow("When?", ("1972",)), QARow("How many?", ("3", "three"))]
    for bad, match in (([None], "row 0 \\(line 1\\): a golden answer is None"),
                       ([["x", "y"]], "a golden answer is \\['x', 'y'\\]"),
                       (True, "a golden answer is True"),
                       (float("nan"), "a golden answer is nan"),
                       ([], "row 0 \\(line 1\\) has no golden answers")):
        with pytest.raises(ValueError, match=match):
            read({"question": "Q?", "golden_answers": bad})
    with pytest.raises(ValueError, match="has no question"):
        read({"question": "  ", "golden_answers": ["x"]})
    capsys.readouterr()
    assert read({"question": "How many breeds?", "golden_answers": ["---"]},
                {"question": "Who?", "golden_answers": ["Al"]}) == [QARow("Who?", ("Al",))]
    assert "skipped 1 row(s)" in capsys.readouterr().err
