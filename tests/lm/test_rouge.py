"""Rouge-L against hand-computed examples."""

import math

import pytest

from loca_pipe.pipeline.lm.rouge import lcs_length, rouge_l, rouge_l_corpus, rouge_tokens


def test_lcs_hand_examples():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS: BCBA
    assert lcs_length([], ["a"]) == 0
    assert lcs_length("abc", "abc") == 3
    assert lcs_length("abc", "def") == 0


def test_rouge_l_hand_examples():
    # Lin (2004): reference "police killed the gunman"; S2 "police kill the gunman" → LCS 3 (police, the, gunman)
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    # S3 "the gunman kill police": LCS 2 ("the gunman") → P = R = 2/4
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    # unequal lengths: cand 3 tokens, ref 6, LCS 3 → P=1, R=0.5, F=2/3
    assert rouge_l("The earth, was", "and THE earth was formless, empty") == pytest.approx(2 / 3)
    assert rouge_l("", "x") == 0.0 and rouge_l("a b", "c d") == 0.0
    assert rouge_tokens("God`s Spirit, v2!") == ["god", "s", "spirit", "v2"]
    assert rouge_l_corpus(["a b", "c"], ["a b", "d"]) == pytest.approx(50.0)
    assert math.isnan(rouge_l_corpus([], []))
    with pytest.raises(ValueError, match="2 candidates but 1 references"):
        rouge_l_corpus(["a", "b"], ["a"])
