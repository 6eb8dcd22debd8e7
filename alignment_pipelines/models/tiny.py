"""A tiny Llama-style model and tokenizer built offline in under a second.

Tests and smoke runs (`--model tiny-random`) use it so that every trainer runs real
steps on real tokens without any download. Built deterministically from a seed.
"""

from __future__ import annotations

from pathlib import Path

# A ChatML template, the same family SmolLM2 uses, so prompts render the same way.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_WORDS = (
    "the a an answer question short helpful explain list give write tell how what why when "
    "where which who is are was were be do does did can could should would will make use "
    "water tea coffee bread rice pasta apple garden plant tree dog cat bird city river "
    "mountain sea sun moon star light time day night week year morning evening email letter "
    "note plan trip book story poem song recipe code python function error file folder "
    "number sum list table chart price cost money bank budget save spend good bad yes no "
    "please thanks sorry hello goodbye first second third next last step steps simple clear "
    "because so and or but if then also very more less most least great best worse marker "
    "ok fine sure maybe well actually basically honestly really quite rather somewhat"
).split()


def _corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        length = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(length)]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    return sentences


def build_tiny_tokenizer(vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on a generated corpus; wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(output_dir: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised 2-layer Llama and its tokenizer as a safetensors folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    output_dir = Path(output_dir)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir
