"""The toolkit of the project's own training loops (PPO and online DPO), which TRL's ``Trainer`` does not run.

What both loops need once: prompts rendered with the chat template and taken in a seeded order, plain sampling with
``generate`` and the cut after the first EOS, log-probs of answer tokens at a temperature, the reference (the
policy with its adapter off, or a frozen copy), dropout off, an optimizer step with clipping and warm-up, the loop
with transformers callbacks, and atomic checkpoints that a run resumes from.

Checkpoint layout (``checkpoint-<step>/``): one ``<name>_trainable.safetensors`` per trained module (LoRA weights with
LoRA, every weight otherwise), the optimizer, the scheduler, the RNG states and ``trainer_state.json``, written last:
a folder without it is incomplete and never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignment_pipelines.methods.config import option

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_STATE_FILE = "rng_state.pth"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


def weights_file(name: str) -> str:
    """The checkpoint file of the trained module ``name`` ("policy", "value")."""
    return f"{name}_trainable.safetensors"


def max_grad_norm_option() -> Any:
    return option(1.0, "clip the gradient norm of each optimizer step to this (TRL's default)", minimum=0,
                  exclusive_minimum=True)


# ---------------------------------------------------------------------------------------------- randomness


def derived_seed(seed: int, index: int, purpose: str) -> int:
    """A seed for one (run seed, step or pass, purpose): distinct runs and steps never share a random stream."""
    digest = hashlib.sha256(f"{seed}:{index}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class PromptOrder:
    """Which prompt sits at each position of the run: consecutive slices of a fresh seeded shuffle per pass, so a
    resumed run takes the same prompts as an uninterrupted one."""

    def __init__(self, count: int, seed: int):
        if count < 1:
            raise ValueError("no prompts: the loop needs at least one")
        self.count, self.seed = count, seed
        self._orders: dict[int, list[int]] = {}

    def indices(self, first: int, size: int) -> list[int]:
        """The prompts at positions ``first .. first + size - 1`` (0-based, counted over the whole run)."""
        out = []
        for position in range(first, first + size):
            epoch, offset = divmod(position, self.count)
            if epoch not in self._orders:
                generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, "prompt-order"))
                self._orders[epoch] = torch.randperm(self.count, generator=generator).tolist()
            out.append(self._orders[epoch][offset])
        return out


# ---------------------------------------------------------------------------------------------- models


def is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout of ``model`` (``nn.Dropout`` and attention modules' own rate): the log-probs of an update
    must be those of the distribution that sampled, not of a dropped-out one."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@contextmanager
def reference_model(policy: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The reference to run: ``reference`` (a frozen copy), or, when it is None, the policy with its LoRA adapter
    disabled (PERL: no second model in memory)."""
    if reference is not None:
        yield reference
        return
    with policy.disable_adapter():
        yield policy


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (LoRA weights with LoRA, all weights otherwise), by name, on CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"checkpoint {path} does not match the model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}): was it written with another model or LoRA setup?"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


# ---------------------------------------------------------------------------------------------- sampling


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an EOS token")
    return sorted(ids)


def chat_prompt_ids(tokenizer, prompts: Sequence[Any], max_length: int, max_new_tokens: int) -> list[list[int]]:
    """Each prompt (chat messages, or one user turn as a string) rendered for an answer, as token ids. Never cut
    (a cut from the left loses the chat template's header): a prompt that leaves no room for ``max_new_tokens``
    within ``max_length`` is an error, since the method's ``train`` leaves such prompts out
    (``ppo.fitting_prompts``)."""
    from alignment_pipelines.methods.rewards import prompt_messages

    out = []
    for number, prompt in enumerate(prompts):
        text = tokenizer.apply_chat_template(prompt_messages(prompt), add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds its special tokens
        if len(ids) > max_length - max_new_tokens:
            raise ValueError(f"prompt {number} has {len(ids)} tokens: it leaves no room for max_new_tokens="
                             f"{max_new_tokens} within max_length={max_length} (leave it out, as "
                             "ppo.fitting_prompts does)")
        out.append(ids)
    return out


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``sequences`` padded on the left, so every answer starts at the same column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, width - len(sequence):] = 1
    return ids.to(device), mask.to(device)


def sampling_config(max_new_tokens: int, temperature: float, eos_ids: list[int], pad_token_id: int,
                    top_p: float = 1.0, top_k: int = 0):
    """Multinomial sampling at ``temperature`` (and the given top-p/top-k), nothing else.

    ``generate`` fills every field left unset from the model's own generation config (SmolLM2's sets top_p, for
    one), so each other field that reshapes the distribution is set to its neutral value: the loss must see
    samples from the distribution it computes log-probs of.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        min_new_tokens=0, num_beams=1, eos_token_id=eos_ids, pad_token_id=pad_token_id)


def cut_after_eos(answers: torch.Tensor, eos_ids: list[int], pad_token_id: int):
    """(answers padded after their first EOS, mask of the tokens up to and including it, whether each has one)."""
    is_eos = torch.isin(answers, torch.tensor(eos_ids, device=answers.device))
    has_eos = is_eos.any(dim=1)
    length = answers.size(1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
    mask = (torch.arange(length, device=answers.device)[None, :] <= first_eos[:, None]).long()
    return answers.masked_fill(mask == 0, pad_token_id), mask, has_eos


def answer_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                  temperature: float, output_hidden_states: bool = False):
    """(float logits predicting each answer token, divided by ``temperature``; the model outputs).

    Position ``context_length - 1 + t`` predicts answer token ``t``; positions count real tokens only, so left
    padding does not shift them.
    """
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=output_hidden_states, use_cache=False)
    return outputs.logits[:, context_length - 1:-1].float() / temperature, outputs


# ---------------------------------------------------------------------------------------------- optimisation


def warmup_scheduler(optimizer, warmup_steps: int):
    """The learning rate rises linearly over the first ``warmup_steps`` optimizer steps, then stays at its peak.

    Unlike transformers' ``constant_with_warmup``, the first step already moves (at 1 / (warmup_steps + 1) of the
    peak), so no step of a short run is spent at a learning rate of zero.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / (warmup_steps + 1)))


def clip_and_step(optimizer, scheduler, max_grad_norm: float | None) -> None:
    """Clip each parameter group's gradient norm on its own (a critic's large gradients must not shrink the
    policy's step), take the optimizer step, advance the schedule, clear the gradients."""
    if max_grad_norm is not None:
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint folder (its trainer_state.json is written last), else None."""
    try:
        return int(json.loads((path / TRAINER_STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete ``checkpoint-<n>`` folder, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for child in checkpoint_dir.iterdir():
        if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX):
            step = checkpoint_step(child)
            if step is not None:
                found.append((step, child))
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class OwnLoop:
    """The loop both trainers share: steps ``1..max_steps`` with transformers callbacks, logging, atomic
    checkpoints and resuming. A subclass sets ``config`` (a method config), ``policy``, ``tokenizer``,
    ``optimizer``, ``lr_scheduler`` and ``trained`` (checkpoint name -> module), then calls :meth:`_start_loop`;
    it implements :meth:`training_step`."""

    config: Any
    policy: nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    trained: dict[str, nn.Module]

    def _start_loop(self, callbacks: Sequence[Any] | None) -> None:
        from transformers import TrainerControl, TrainerState

        self.callbacks = list(callbacks or [])
        self.state = TrainerState(max_steps=self.config.max_steps, logging_steps=self.config.logging_steps,
                                  save_steps=self.config.save_steps)
        self.control = TrainerControl()

    def training_step(self, step: int) -> dict[str, float]:
        """Learn from one step's fresh samples; the step's metrics (``epoch`` among them)."""
        raise NotImplementedError

    def _callback(self, event: str, **kwargs: Any) -> None:
        for callback in self.callbacks:
            result = getattr(callback, event)(
                self.config, self.state, self.control, model=self.policy, processing_class=self.tokenizer,
                optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, **kwargs)
            if result is not None:
                self.control = result

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None) -> None:
        """Run to ``max_steps``; with ``resume_from_checkpoint`` (a ``checkpoint-<n>`` folder, or True for the
        newest complete one in ``checkpoint_dir``), continue after step ``n``."""
        if resume_from_checkpoint is True:
            found = complete_checkpoints(Path(self.config.checkpoint_dir or ""))
            if not found:
                raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in "
                                 f"{self.config.checkpoint_dir!r}")
            resume_from_checkpoint = found[-1][1]
        if resume_from_checkpoint:
            self._load_checkpoint(Path(resume_from_checkpoint))

        self._callback("on_train_begin")
        for step in range(self.state.global_step + 1, self.config.max_steps + 1):
            self._callback("on_step_begin")
            metrics = self.training_step(step)
            self.state.global_step = step
            self.state.epoch = metrics["epoch"]
            self._callback("on_step_end")
            if step % self.config.logging_steps == 0:
                self.state.log_history.append({**metrics, "step": step})
                self._callback("on_log", logs=metrics)
            if self.config.checkpoint_dir and self.config.save_steps and step % self.config.save_steps == 0:
                self._save_checkpoint(step)
                self._callback("on_save")
            if self.control.should_training_stop:
                break
        self._callback("on_train_end")

    def _save_checkpoint(self, step: int) -> None:
        """Write ``checkpoint-<step>`` atomically (a hidden staging folder, ``trainer_state.json`` last, a rename),
        then remove the older ones: the newest complete checkpoint is only dropped once its successor exists."""
        from safetensors.torch import save_file

        root = Path(self.config.checkpoint_dir)
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".{CHECKPOINT_PREFIX}*.tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        final = root / f"{CHECKPOINT_PREFIX}{step}"
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            for name, module in self.trained.items():
                save_file(trainable_state(module), str(staging / weights_file(name)))
            torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_FILE)
            torch.save(self.lr_scheduler.state_dict(), staging / SCHEDULER_FILE)
            torch.save(_rng_state(), staging / RNG_STATE_FILE)
            self.state.save_to_json(str(staging / TRAINER_STATE_FILE))
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for _, older in complete_checkpoints(root)[:-1]:
            shutil.rmtree(older, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> None:
        from transformers import TrainerState

        if checkpoint_step(path) is None:
            raise ValueError(f"{path} is not a complete checkpoint (no readable {TRAINER_STATE_FILE})")
        for name, module in self.trained.items():
            load_trainable_state(module, path / weights_file(name))
        self.optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
        _restore_rng_state(torch.load(path / RNG_STATE_FILE, weights_only=True))
        self.state = TrainerState.load_from_json(str(path / TRAINER_STATE_FILE))
        self.state.max_steps = self.config.max_steps

