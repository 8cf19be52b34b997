"""The tiny MoE checkpoint builder: every architecture, fixed seed, cached by spec."""

import json

import pytest
from safetensors.torch import load_file

from vllm_elastic_ft.testing.tiny_moe import ARCHITECTURES, TinyMoESpec, build_tiny_moe

HF_NAMES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
            "phimoe": "PhimoeForCausalLM"}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_builds_with_its_tokenizer(architecture, tmp_path):
    spec = TinyMoESpec(architecture=architecture, num_layers=1, hidden_size=64, num_experts=4,
                       top_k=2, moe_intermediate_size=32)
    path = build_tiny_moe(spec, tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [HF_NAMES[architecture]]
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 64
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The quick brown fox")["input_ids"]
    assert ids and max(ids) < spec.vocab_size


def test_same_spec_same_weights_and_cache_hit(tmp_path):
    spec = TinyMoESpec(num_layers=1, hidden_size=64, num_experts=4, moe_intermediate_size=32)
    first = build_tiny_moe(spec, tmp_path / "a")
    second = build_tiny_moe(spec, tmp_path / "b")
    assert first.name == second.name  # the directory is named after the spec's digest
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    mtime = (first / "config.json").stat().st_mtime
    assert build_tiny_moe(spec, tmp_path / "a") == first  # reused, not rewritten
    assert (first / "config.json").stat().st_mtime == mtime
    other = build_tiny_moe(TinyMoESpec(num_layers=1, hidden_size=64, num_experts=4,
                                       moe_intermediate_size=32, seed=1), tmp_path / "a")
    assert other != first


def test_bad_spec_is_rejected_with_the_accepted_values():
    with pytest.raises(ValueError, match=r"architecture must be one of \['qwen3_moe', 'mixtral', 'phimoe'\]"):
        TinyMoESpec(architecture="llama")
    with pytest.raises(ValueError, match="top_k must be in"):
        TinyMoESpec(num_experts=4, top_k=5)
