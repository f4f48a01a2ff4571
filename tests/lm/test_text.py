"""JSONL readers, templates, bad lines, truncation and the tokenizer checks."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from loca_pipe.pipeline.errors import ConfigError, DataError, ModelError
from loca_pipe.pipeline.lm import text, tokenizer


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dolly_and_plain_formats(tmp_path):
    p = _write(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "x"}),
        "",
        json.dumps({"instruction": "Summarise.", "context": "A long text.", "response": "Short."}),
        json.dumps({"prompt": "Hello", "response": " world"}),
    ])
    ex, rep = text.read_jsonl(p)
    assert ex == [text.Example("Name a colour.", "Red."), text.Example("Summarise.", "Short.", "A long text."),
                  text.Example("Hello", " world")]
    assert rep.kept == 3 and rep.bad_lines == [] and rep.lines == 4
    assert text.render_prompt(ex[1], "plain") == "Summarise.\nA long text.\n"
    assert text.render_prompt(ex[1], "chat") == "### Instruction:\nSummarise.\n\n### Input:\nA long text.\n\n### Response:\n"
    assert text.render_prompt(ex[0], "chat") == "### Instruction:\nName a colour.\n\n### Response:\n"
    with pytest.raises(ConfigError, match="unknown prompt template 'alpaca'; valid templates are"):
        text.render_prompt(ex[0], "alpaca")


BAD = [
    ("{not json", "line 2: not valid JSON"),
    (json.dumps({"instruction": "x"}), r"line 2: missing field\(s\) \['response'\] for the dolly format"),
    (json.dumps({"prompt": "x", "answer": "y"}), r"line 2: missing field\(s\) \['response'\] for the plain format"),
    (json.dumps({"instruction": "x", "response": "  "}), "line 2: empty response"),
    (json.dumps({"instruction": "x", "response": 3}), "line 2: field 'response' must be a string"),
    (json.dumps([1, 2]), "line 2: expected a JSON object, got list"),
]


@pytest.mark.parametrize("line,msg", BAD)
def test_bad_lines_error_names_the_line(tmp_path, line, msg):
    good = json.dumps({"instruction": "a", "response": "b"})
    p = _write(tmp_path / "b.jsonl", [good, line, good])
    with pytest.raises(DataError, match=msg + ".*--on-bad-line skip"):
        text.read_jsonl(p, on_bad_line="error")
    ex, rep = text.read_jsonl(p, on_bad_line="skip")
    assert len(ex) == 2 and [n for n, _ in rep.bad_lines] == [2]
    assert rep.to_dict()["bad"] == 1


def test_read_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        text.read_jsonl(tmp_path / "missing.jsonl")
    p = _write(tmp_path / "all_bad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match=r"no usable examples \(2 lines, 2 bad\)"):
        text.read_jsonl(p, on_bad_line="skip")
    with pytest.raises(ConfigError, match="on_bad_line must be one of"):
        text.read_jsonl(p, on_bad_line="ignore")
    with pytest.raises(ConfigError, match="unknown data format"):
        text.read_jsonl(p, fmt="csv")


def test_write_read_roundtrip(tmp_path):
    ex = [text.Example("a \"q\"", "r\nr", "c"), text.Example("b", "s")]
    text.write_jsonl(tmp_path / "x.jsonl", ex)
    assert text.read_jsonl(tmp_path / "x.jsonl", fmt="dolly")[0] == ex


def test_default_text_and_pairs():
    t = text.default_text(5000)
    assert t.startswith("In the beginning God created the heavens and the earth.")
    pairs = text.continuation_pairs(t)
    assert pairs[0] == text.Example("In the beginning God created", "the heavens and the earth.")
    assert all(6 <= len((p.instruction + " " + p.response).split()) <= 24 for p in pairs)
    s = text.split_examples(pairs, {"a": 3, "b": 2}, seed=0)
    assert len(s["a"]) == 3 and len(s["b"]) == 2 and not set(s["a"]) & set(s["b"])
    with pytest.raises(DataError, match="asked for 100000 examples"):
        text.split_examples(pairs, {"a": 100000}, seed=0)


def test_encoding_masks_prompt_and_truncates(tok):
    ex = [text.Example("In the beginning", "God created the heavens and the earth."),
          text.Example("word " * 60, "the heavens and the earth and the sea and all that is in them.")]
    e = tokenizer.encode_examples(tok, ex, "plain", 40)
    s0, p0 = e.ids[0], int(e.prompt_len[0])
    assert s0[0] == tok.bos_token_id and s0[-1] == tok.eos_token_id
    assert tok.decode(s0[1:p0]) == "In the beginning\n"
    assert tok.decode(s0[p0:-1]) == "God created the heavens and the earth."
    # the second one is too long: counted, prompt keeps its last 20 tokens, response cut at 40 total
    assert e.truncated == 1 and e.truncated_ids == [1]
    assert len(e.ids[1]) == 40 and e.prompt_len[1] == 20 and e.ids[1][-1] != tok.eos_token_id
    assert tok.decode(e.ids[1][:20]).endswith("word \n")
    np.testing.assert_array_equal(e.offsets(), [0, len(s0) - p0, len(s0) - p0 + 20])
    with pytest.raises(ConfigError, match="max_length must be at least 4"):
        tokenizer.encode_examples(tok, ex, "plain", 3)


def test_tokenizer_mismatch_names_first_differing_token(tok, lm_text, tmp_path):
    tok.save_pretrained(str(tmp_path / "same"))
    tokenizer.check_same_tokenizer(tok, tokenizer.load_tokenizer(tmp_path / "same"))
    other = tokenizer.train_tokenizer(text.sentences(lm_text[:20000]), 300)
    vocab_a = {i: t for t, i in tok.get_vocab().items()}
    vocab_b = {i: t for t, i in other.get_vocab().items()}
    first = min(i for i in vocab_a if vocab_a[i] != vocab_b.get(i))
    with pytest.raises(ModelError, match=rf"first differing token id {first}: teacher has {re.escape(repr(vocab_a[first]))}"):
        tokenizer.check_same_tokenizer(tok, other)
    with pytest.raises(ModelError, match="no tokenizer folder"):
        tokenizer.load_tokenizer(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="vocab_size >= 259"):
        tokenizer.train_tokenizer(["abc"], 100)
