import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron.flexsp.data import indexed
from megatron.flexsp.data.preprocess import preprocess
from megatron.flexsp.data.tokenizer import BYTE_EOD

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _corpus(n=200, seed=0):
    rng = np.random.default_rng(seed)
    alphabet = list('abcdefghij ✓é日\n\t"\\')
    texts = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 300)))) for _ in range(n)]
    texts[3] = ""  # an empty document stays a (skipped-at-read) document: line i is document i
    return texts


def _write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({key: t, "id": i}) + "\n")
            if i == 10:
                f.write("\n")  # blank lines are not documents


def _read_all(prefix):
    ds = indexed.open_indexed(prefix)
    n = len(ds.document_indices) - 1
    return [indexed.read_document(ds, d).tolist() for d in range(n)]


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_round_trip_byte_tokenizer(tmp_path, workers):
    texts = _corpus(n=2500)  # more lines than one in-flight slice of 2 workers (2048)
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, texts)
    out = preprocess([str(src)], str(tmp_path / "out"), append_eod=True, workers=workers, quiet=True)
    prefix = str(tmp_path / "out_text_document")
    assert out["text"]["prefix"] == prefix and out["text"]["documents"] == len(texts)
    expected = [list(t.encode("utf-8")) + [BYTE_EOD] for t in texts]  # reference: raw UTF-8 bytes
    assert _read_all(prefix) == expected
    assert out["text"]["tokens"] == sum(map(len, expected))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # temporaries renamed away


def test_two_keys_two_inputs_no_eod(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"body": "x", "title": "T"}) + "\n" + json.dumps({"body": "yy", "title": ""}) + "\n")
    b.write_text(json.dumps({"body": "zzz", "title": "é"}) + "\n")
    out = preprocess([str(a), str(b)], str(tmp_path / "o"), json_keys=["body", "title"], quiet=True)
    assert _read_all(out["body"]["prefix"]) == [[120], [121, 121], [122, 122, 122]]
    assert _read_all(out["title"]["prefix"]) == [[84], [], [0xC3, 0xA9]]


@pytest.mark.parametrize(
    "content, kwargs, match",
    [
        ('{"text": "a"}\n{"text": ', {}, r"in.jsonl:2: invalid JSON"),
        ('{"text": "a"}\n{"body": "b"}\n', {}, r"in.jsonl:2: no key 'text' \(keys: \['body'\]\)"),
        ('{"text": 5}\n', {}, r"in.jsonl:1: key 'text' is int"),
        ('["text"]\n', {}, r"in.jsonl:1: expected a JSON object"),
        ('{"text": "a"}\n', {"workers": 0}, r"--workers must be >= 1"),
        ('{"text": "a"}\n', {"tokenizer_type": "Foo"}, r"unknown --tokenizer-type 'Foo'"),
    ],
)
def test_bad_input_errors(tmp_path, content, kwargs, match):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    with pytest.raises(ValueError, match=match):
        preprocess([str(src)], str(tmp_path / "o"), quiet=True, **kwargs)
    assert indexed.idx_path(str(tmp_path / "o_text_document")) not in map(str, tmp_path.iterdir())
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "o"), quiet=True)


@pytest.mark.slow  # end to end, >= 9 s on 2 cores: CI's slow step runs it
def test_cli_script(tmp_path):
    texts = ["first document", "second ✓", "x"]
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, texts)
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts", "preprocess_data.py"),
        "--input",
        str(src),
        "--output-prefix",
        str(tmp_path / "cli"),
        "--tokenizer-type",
        "ByteTokenizer",
        "--append-eod",
        "--log-interval",
        "1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "processed 3 documents" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["text"]["documents"] == 3
    assert _read_all(str(tmp_path / "cli_text_document")) == [list(t.encode()) + [BYTE_EOD] for t in texts]


def test_main_reports_errors(tmp_path, capsys):
    from megatron.flexsp.data.preprocess import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n')
    assert (
        main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "HuggingFaceTokenizer"])
        == 2
    )
    assert "needs --tokenizer-model" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert "none.jsonl' does not exist" in capsys.readouterr().err
