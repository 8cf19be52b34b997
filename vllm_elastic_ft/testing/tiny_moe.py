"""A tiny random-weight MoE checkpoint and tokenizer, built locally (no hub).

Tests, benchmarks and the failure drill serve this model: vLLM loads it on CPU
in seconds, and its MoE layers exercise the real expert-parallel path. The
weights are drawn from a fixed seed and the BPE tokenizer is trained on a fixed
built-in corpus, so the same spec always gives the same checkpoint; it is cached
under a directory named after the spec's hash.

Example::

    path = build_tiny_moe(TinyMoESpec(architecture="qwen3_moe", num_experts=8))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Architectures that vLLM 0.32 loads on CPU with unquantized fused-MoE experts.
ARCHITECTURES = ("qwen3_moe", "mixtral", "phimoe")

_BUILDER_VERSION = 2  # bump when the checkpoint layout changes (invalidates caches)

#: "role: content" lines, then the assistant's turn (the tiny model has no chat format).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Wide expert parallel serving spreads
the experts of a mixture of experts model over many ranks. Every token is sent to
the ranks that hold its experts and the results are combined back. When one rank
dies or hangs the whole group stalls, so a watchdog must notice it, fence the
group, rebuild the communicators and report that the group is ready again.
Attention runs data parallel: each rank keeps its own key value cache. Numbers:
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024.
Questions and answers, lists, code: def f(x): return x * 2; for i in range(10).
"""


@dataclass(frozen=True)
class TinyMoESpec:
    """Shape of the tiny checkpoint. Every field is part of the cache key."""

    architecture: str = "qwen3_moe"
    num_layers: int = 2
    hidden_size: int = 128
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    seed: int = 0
    # Larger than HF's 0.02 so that logits are well separated: greedy outputs
    # must not flip on float rounding differences between DP/EP layouts.
    init_std: float = 0.1

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {list(ARCHITECTURES)}, "
                f"got {self.architecture!r}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")

    def digest(self) -> str:
        blob = json.dumps(
            {**dataclasses.asdict(self), "builder": _BUILDER_VERSION}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    root = os.environ.get("VLLM_ELASTIC_FT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm-elastic-ft"
    )
    return Path(root) / "models"


def build_tiny_moe(
    spec: TinyMoESpec | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Write (or reuse) the checkpoint for ``spec`` and return its directory."""
    spec = spec or TinyMoESpec()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{spec.architecture}-{spec.digest()}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build into a temp dir and rename: a half-written checkpoint never looks cached,
    # and concurrent builders (test workers) cannot see each other's partial files.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        _write_tokenizer(spec, staging)
        _write_model(spec, staging)
        try:
            staging.rename(target)
        except OSError:  # another builder won the race; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("built tiny MoE checkpoint %s at %s", spec, target)
    return target


def _hf_config(spec: TinyMoESpec):
    import transformers

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.init_std,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if spec.architecture == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            head_dim=spec.hidden_size // spec.num_heads,
            intermediate_size=spec.moe_intermediate_size * 2,
            moe_intermediate_size=spec.moe_intermediate_size,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    if spec.architecture == "mixtral":
        return transformers.MixtralConfig(
            **common,
            intermediate_size=spec.moe_intermediate_size,
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
        )
    return transformers.PhimoeConfig(
        **common,
        intermediate_size=spec.moe_intermediate_size,
        num_local_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
    )


def _write_model(spec: TinyMoESpec, out: Path) -> None:
    import torch
    import transformers

    config = _hf_config(spec)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # HF init leaves norms at 1 and some projections at 0; draw every tensor so the
    # checkpoint is the same whatever the transformers version's init scheme is.
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:  # RMSNorm / LayerNorm: unit scale, zero shift
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.copy_(
                    torch.randn(param.shape, generator=generator) * spec.init_std
                )
    model.save_pretrained(out, safe_serialization=True)


def _write_tokenizer(spec: TinyMoESpec, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    # A plain chat template, so that chat completions work on the tiny model too.
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
