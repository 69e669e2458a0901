import json
import sys

import pytest

from ratiorl.tasks import load_hf_dataset, load_jsonl


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_jsonl_with_field_map(tmp_path):
    p = _write_lines(tmp_path / "d.jsonl", [
        json.dumps({"question": "1+1=", "solution": 2, "tests": ["assert 1"]}),
        "",
        json.dumps({"question": "2+2=", "solution": "4", "tests": []}),
    ])
    rows = load_jsonl(p, prompt_field="question", answer_field="solution", test_list="tests")
    assert rows == [
        {"prompt": "1+1=", "answer": "2", "test_list": ["assert 1"]},
        {"prompt": "2+2=", "answer": "4", "test_list": []},
    ]


def test_load_jsonl_missing_field_names_file_line_field(tmp_path):
    p = _write_lines(tmp_path / "bad.jsonl", [
        json.dumps({"prompt": "a", "answer": "b"}),
        json.dumps({"prompt": "c"}),
    ])
    with pytest.raises(ValueError) as err:
        load_jsonl(p)
    msg = str(err.value)
    assert str(p) in msg and "line 2" in msg and "'answer'" in msg


def test_load_jsonl_invalid_json_line(tmp_path):
    p = _write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "a", "answer": "b"}), "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: invalid JSON"):
        load_jsonl(p)


def test_load_jsonl_empty_and_non_object(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_jsonl(empty)
    p = _write_lines(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        load_jsonl(p)
    with pytest.raises(ValueError, match="line 1: missing field 'q'"):
        load_jsonl(_write_lines(tmp_path / "x.jsonl", ['{"prompt": "a", "answer": "b"}']), q="q")
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "nope.jsonl")


def test_load_hf_dataset_from_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"q": ["1+2=", "3+4="], "a": [3, 7], "extra": ["x", "y"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = load_hf_dataset(tmp_path / "ds", prompt_field="q", answer_field="a", meta="extra")
    assert rows == [{"prompt": "1+2=", "answer": "3", "meta": "x"},
                    {"prompt": "3+4=", "answer": "7", "meta": "y"}]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    rows = load_hf_dataset(tmp_path / "dd", split="test", prompt_field="q", answer_field="a")
    assert rows == [{"prompt": "3+4=", "answer": "7"}]
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_hf_dataset(tmp_path / "dd", split="validation", prompt_field="q", answer_field="a")
    with pytest.raises(ValueError, match="missing field 'prompt'.*columns: q, a, extra"):
        load_hf_dataset(tmp_path / "ds")


def test_load_hf_dataset_from_jsonl_file(tmp_path):
    pytest.importorskip("datasets")
    p = _write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": f"{i}+0=", "answer": str(i)}) for i in range(3)])
    rows = load_hf_dataset(p)
    assert [r["answer"] for r in rows] == ["0", "1", "2"]
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_hf_dataset(empty)


def test_load_hf_dataset_without_datasets(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'ratiorl\[datasets\]'"):
        load_hf_dataset(tmp_path)
