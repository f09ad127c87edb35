"""Needle in a haystack on the local sample corpus: the grid, every trial's answer, and the heatmap."""

import json

import pytest


def test_niah_writes_its_grid_and_heatmap(tiny_export, tmp_path):
    pytest.importorskip("matplotlib")
    from transxssm_megatron.hf.loading import load_causal_lm
    from transxssm_megatron.hf.niah import run_niah

    model, tokenizer, _ = load_causal_lm(tiny_export, device="cpu")
    result = run_niah(model, tokenizer, lengths=[96, 160], depths=[0.0, 0.5, 1.0], trials=2, out=tmp_path,
                      progress=False)
    saved = json.loads((tmp_path / "niah.json").read_text())
    assert saved["lengths"] == [96, 160] and saved["depths"] == [0.0, 0.5, 1.0]
    assert len(saved["accuracy"]) == 2 and all(len(row) == 3 for row in saved["accuracy"])
    assert all(0.0 <= v <= 1.0 for row in saved["accuracy"] for v in row)
    assert len(saved["details"]) == 12 and all(len(d["number"]) == 7 for d in saved["details"])
    assert (tmp_path / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result["heatmap"]


def test_needle_sits_at_its_depth_and_prompts_have_the_requested_length():
    from transxssm_megatron.hf.niah import NiahError, build_prompt

    haystack = list(range(100, 400))
    needle, question = [1, 2, 3], [7, 8]
    for depth, where in ((0.0, 0), (1.0, 45), (0.5, 22)):
        prompt = build_prompt(haystack, needle, question, 50, depth, 0, sentence_ends=set())
        assert len(prompt) == 50 and prompt[where:where + 3] == needle and prompt[-2:] == question
    # moved forward to just after a sentence end
    prompt = build_prompt(haystack, needle, question, 50, 0.5, 0, sentence_ends={125})
    assert prompt[26:29] == needle
    with pytest.raises(NiahError, match="haystack has only"):
        build_prompt(haystack, needle, question, 1000, 0.5, 0, set())
