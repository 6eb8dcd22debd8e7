"""Online DPO from AI feedback (OAIF, Guo et al. 2024): the policy's own fresh samples, judged while it trains.

One training step, for each of ``gradient_accumulation_steps`` batches of ``per_device_batch_size`` prompts:

1. sample two answers per prompt from the current policy (sample ``i`` and ``i + B`` share prompt ``i``, as in
   TRL's ``OnlineDPOTrainer``), with HF ``generate`` or, with ``use_vllm``, TRL's colocated vLLM engine whose
   weights are synced after every optimizer step;
2. ask the annotator about each pair in both orders in one batch, through the AI-feedback store (a pair judged
   before, by the same judge and instruction, is not judged again; every new judgement is stored);
3. verdicts that agree make a preference; the rest are ties, dropped or down-weighted (``ties``);
4. the DPO loss on the pairs, against the reference (the disabled LoRA adapter, or a frozen start model);

then one optimizer step. Agreement and position-bias rates are logged every step.

Why not TRL's ``OnlineDPOTrainer`` itself: it turns every pair into a preference (``first >= second``, so a tie
trains "sample i is better" at full weight) and has no per-pair weight, so ties can be neither dropped nor
down-weighted; its reward functions return scalars, so the verdicts of both orders could not be kept. This loop
has the same shape; TRL is used here only for its vLLM generation backend, so this module is the one to change
if TRL drops it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from alignment_pipelines.methods.config import ConfigError, MemoryProfile, MethodConfig, option, wiring
from alignment_pipelines.methods.training import TrainResult

JudgeKind = Literal["llm", "openai", "rule", "shorter", "contains_code", "regex", "position"]
TieHandling = Literal["drop", "downweight"]
LossType = Literal["sigmoid", "ipo"]

STORE_IN_MODEL_FOLDER = "ai_feedback"  # where judgements go when no shared store is wired in
POLICY_WEIGHTS_FILE = "policy_trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class OnlineDPOMethodConfig(MethodConfig):
    """Online DPO: the policy samples two answers per prompt, an annotator LLM judges them in both orders."""

    learning_rate: float = option(5e-6, "peak learning rate (constant schedule)", minimum=0, exclusive_minimum=True)
    beta: float = option(0.1, "strength of the KL constraint to the reference (higher: stay closer)",
                         minimum=0, exclusive_minimum=True)
    loss_type: LossType = option("sigmoid", "DPO loss variant (sigmoid is the paper's)")
    judge: JudgeKind = option(
        "llm", "the annotator: 'llm' (a local model folder, judge_model), 'openai' (an OpenAI-compatible endpoint, "
        "judge_base_url + judge_model), or a rule judge ('rule', 'shorter', 'contains_code', 'regex', 'position')")
    instruction: str = option("helpful", "the annotator's criterion, e.g. 'helpful and very short': it steers what "
                                         "the policy learns (LLM judges)")
    judge_model: str | None = option(
        None, "'llm': the annotator's model folder (default: the base model the start model was trained from, e.g. "
              "SmolLM2 from the model store); 'openai': the served model's name")
    judge_base_url: str | None = option(None, "'openai': the endpoint, e.g. http://127.0.0.1:8000/v1")
    judge_api_key_env: str = option("OPENAI_API_KEY", "'openai': the environment variable holding the API key")
    judge_timeout_s: float = option(30.0, "'openai': seconds a request may take before it is retried", minimum=0,
                                    exclusive_minimum=True)
    judge_max_retries: int = option(3, "'openai': retries of a failed request (with exponential backoff)", minimum=0)
    judge_max_concurrency: int = option(4, "'openai': requests in flight at once", minimum=1)
    judge_pattern: str | None = option(None, "'regex': the pattern a preferred answer matches")
    judge_batch_size: int = option(8, "'llm': comparisons per forward pass", minimum=1)
    ties: TieHandling = option(
        "drop", "pairs whose two orders disagree: 'drop' them, or 'downweight' them (trained with tie_weight, in "
                "the direction of the order-averaged preference; an exact 50/50 is still dropped)")
    tie_weight: float = option(0.25, "weight of a tied pair with ties='downweight' (a preference weighs 1)",
                               minimum=0, maximum=1)
    max_new_tokens: int = option(64, "tokens sampled per answer", minimum=1)
    temperature: float = option(0.9, "sampling temperature", minimum=0, exclusive_minimum=True)
    top_p: float = option(1.0, "nucleus sampling: keep the smallest token set with this much probability",
                          minimum=0, maximum=1, exclusive_minimum=True)
    top_k: int = option(0, "sample among the k most likely tokens (0: all)", minimum=0)
    use_vllm: bool = option(False, "sample with vLLM (colocated on the GPU) instead of HF generate")
    vllm_gpu_memory_utilization: float = option(0.3, "share of GPU memory vLLM may take with use_vllm",
                                                minimum=0, maximum=1, exclusive_minimum=True)
    feedback_store: str | None = wiring(
        "folder of the AI-feedback store (Parquet): every judgement is kept there and no pair is judged twice "
        "(default: ai_feedback/ in the output model folder)", kind="store")

    required_columns: ClassVar[tuple[str, ...]] = ("prompt",)
    # Both answers of a prompt go through the model together, every logit at once (this loop has no chunked head).
    memory_profile: ClassVar[MemoryProfile] = MemoryProfile(sequences_per_example=2, reference=True, logits="full",
                                                         frozen_models=("judge_model",))

    def _validate_method(self) -> None:
        if self.max_new_tokens >= self.max_length:
            raise ConfigError("max_new_tokens", self.max_new_tokens,
                              f"must be smaller than max_length ({self.max_length}): the prompt needs room")
        if not self.instruction.strip():
            raise ConfigError("instruction", self.instruction, "must not be empty: it is the annotator's criterion")
        if self.judge == "openai":
            if not self.judge_base_url or not self.judge_base_url.startswith(("http://", "https://")):
                raise ConfigError("judge_base_url", self.judge_base_url, "judge 'openai' needs an http(s) URL")
            if not self.judge_model:
                raise ConfigError("judge_model", self.judge_model, "judge 'openai' needs the served model's name")
        if self.judge == "regex" and not self.judge_pattern:
            raise ConfigError("judge_pattern", self.judge_pattern, "judge 'regex' needs a pattern")
        if self.judge == "llm":
            self._validate_annotator_model()

    def _validate_annotator_model(self) -> None:
        from alignment_pipelines.models.loading import ModelFolderError, validate_model_folder

        annotator = self.annotator_model()
        try:
            validate_model_folder(annotator)
        except ModelFolderError as error:
            raise ConfigError("judge_model", str(annotator), str(error)) from None
        policy = {Path(self.model).resolve(), Path(self.output_dir).resolve()}
        if annotator.resolve() in policy:
            hint = "" if self.judge_model else " (the start model has no base model under it: set judge_model)"
            raise ConfigError("judge_model", str(annotator),
                              f"is the policy being trained: a run may not use its own policy as its annotator{hint}")

    def annotator_model(self) -> Path:
        """The local annotator: ``judge_model``, else the base model under the start model's adapters."""
        from alignment_pipelines.models.loading import adapter_parent, is_adapter_folder

        if self.judge_model:
            return Path(self.judge_model)
        folder = Path(self.model)
        while is_adapter_folder(folder):
            folder = adapter_parent(folder)
        return folder

    def lineage_tags(self) -> dict[str, str]:
        """What the registered model's lineage records about its annotator (``lineage.annotator.*``)."""
        judge = self.judge_model if self.judge != "llm" else str(self.annotator_model())
        return {"annotator.kind": self.judge, "annotator.instruction": self.instruction,
                **({"annotator.model": judge} if judge else {})}

    def judge_spec(self) -> dict[str, Any]:
        """The :func:`~alignment_pipelines.judges.build_judge` config of the annotator."""
        if self.judge == "llm":
            return {"kind": "llm", "model_dir": str(self.annotator_model()), "instruction": self.instruction,
                    "batch_size": self.judge_batch_size, "max_length": self.max_length * 2 + 256}
        if self.judge == "openai":
            return {"kind": "openai", "base_url": self.judge_base_url, "model": self.judge_model,
                    "instruction": self.instruction, "api_key_env": self.judge_api_key_env,
                    "timeout_s": self.judge_timeout_s, "max_retries": self.judge_max_retries,
                    "max_concurrency": self.judge_max_concurrency}
        if self.judge == "regex":
            return {"kind": "regex", "pattern": self.judge_pattern}
        return {"kind": self.judge}


def pair_weights(verdicts, ties: TieHandling, tie_weight: float) -> list[tuple[bool, float]]:
    """(is answer a the chosen one, weight) per verdict: 1 for a preference both orders agree on; a tie weighs
    0 (``drop``) or ``tie_weight`` in the direction of the order-averaged P(a better) (``downweight``)."""
    out = []
    for verdict in verdicts:
        if verdict.preferred != "tie":
            out.append((verdict.preferred == "a", 1.0))
        elif ties == "downweight" and verdict.p_a != 0.5:
            out.append((verdict.p_a > 0.5, tie_weight))
        else:
            out.append((True, 0.0))
    return out


def dpo_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
               loss_type: LossType):
    """Per-pair DPO loss from summed answer log-probs (sigmoid: the paper's; ipo: Azar et al.)."""
    import torch.nn.functional as F

    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits)
    return (logits - 1 / (2 * beta)) ** 2


@dataclass
class Samples:
    """Two answers per prompt: rows ``i`` and ``i + B`` answer prompt ``i``."""

    indices: list[int]
    input_ids: Any  # [2B, prompt + answer] left-padded prompt, then the answer cut after its first EOS
    attention_mask: Any
    prompt_length: int
    answer_mask: Any  # [2B, answer] 1 on answer tokens (EOS included)
    texts: list[str]
    has_eos: Any


class OnlineDPOTrainer:
    """The loop in the module docstring. ``policy`` is a causal LM or a ``PeftModel`` (then the reference is its
    disabled adapter and ``reference`` is None); callbacks are transformers ``TrainerCallback``s."""

    def __init__(self, config: OnlineDPOMethodConfig, policy, tokenizer, reference, judge, store,
                 prompts: list, callbacks: list | None = None):
        import torch
        from transformers import GenerationConfig, TrainerControl, TrainerState

        self.config, self.policy, self.tokenizer, self.reference = config, policy, tokenizer, reference
        self.judge, self.store, self.prompts = judge, store, prompts
        self.callbacks = list(callbacks or [])
        self.device = next(policy.parameters()).device
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = self._eos_token_ids()
        budget = config.max_length - config.max_new_tokens
        self.prompt_token_ids = [self._tokenize(p)[-budget:] for p in prompts]
        self.generation_config = GenerationConfig(
            do_sample=True, max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k, eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)
        self.optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                           lr=config.learning_rate)
        self.state = TrainerState(max_steps=config.max_steps, logging_steps=config.logging_steps)
        self.control = TrainerControl()
        self._prompt_orders: dict[int, list[int]] = {}
        self.vllm = self._vllm_generation() if config.use_vllm else None
        self._vllm_synced_step = -1
        self.totals = {"pairs": 0, "agree": 0, "position_biased": 0, "preferences": 0, "ties": 0, "judged": 0,
                       "cached": 0}

    # ------------------------------------------------------------------ sampling

    def _tokenize(self, prompt) -> list[int]:
        from alignment_pipelines.methods.rewards import prompt_messages

        text = self.tokenizer.apply_chat_template(prompt_messages(prompt), add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        configured = getattr(getattr(self.policy, "generation_config", None), "eos_token_id", None)
        if configured is not None:
            ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return sorted(ids)

    def _vllm_generation(self):
        from accelerate import Accelerator
        from trl.generation.vllm_generation import VLLMGeneration

        c = self.config
        return VLLMGeneration(self.policy, Accelerator(), self.tokenizer, mode="colocate",
                              gpu_memory_utilization=c.vllm_gpu_memory_utilization, max_model_length=c.max_length,
                              max_num_seqs=2 * c.per_device_batch_size, trust_remote_code=c.trust_remote_code,
                              temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                              max_completion_length=c.max_new_tokens)

    def prompt_indices(self, step: int, micro: int = 0) -> list[int]:
        """The prompts of micro-batch ``micro`` of step ``step`` (1-based): slices of a fresh shuffle per pass."""
        import torch

        from alignment_pipelines.methods.ppo_trainer import derived_seed

        batch = self.config.per_device_batch_size
        first = ((step - 1) * self.config.gradient_accumulation_steps + micro) * batch
        indices = []
        for position in range(first, first + batch):
            epoch, offset = divmod(position, len(self.prompts))
            if epoch not in self._prompt_orders:
                generator = torch.Generator().manual_seed(derived_seed(self.config.seed, epoch, "prompt-order"))
                self._prompt_orders[epoch] = torch.randperm(len(self.prompts), generator=generator).tolist()
            indices.append(self._prompt_orders[epoch][offset])
        return indices

    def sample(self, indices: list[int], step: int, micro: int = 0) -> Samples:
        """Two answers per prompt from the policy's weights as they are now, seeded by (seed, step, micro)."""
        import torch

        from alignment_pipelines.methods.ppo_trainer import derived_seed

        prompt_ids = [self.prompt_token_ids[i] for i in indices] * 2
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            prompt_mask[row, width - len(ids):] = 1
        input_ids, prompt_mask = input_ids.to(self.device), prompt_mask.to(self.device)
        if self.vllm is not None:
            answers = self._vllm_answers(prompt_ids, step)
        else:
            torch.manual_seed(derived_seed(self.config.seed, step * 10_000 + micro, "sample"))
            self.policy.eval()
            with torch.no_grad():
                sequences = self.policy.generate(input_ids=input_ids, attention_mask=prompt_mask,
                                                 generation_config=self.generation_config)
            answers = sequences[:, width:]
        is_eos = torch.isin(answers, torch.tensor(self.eos_token_ids, device=answers.device))
        has_eos = is_eos.any(dim=1)
        length = answers.size(1)
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
        answer_mask = (torch.arange(length, device=answers.device)[None, :] <= first_eos[:, None]).long()
        answers = answers.masked_fill(answer_mask == 0, self.pad_token_id)
        texts = [t.strip() for t in self.tokenizer.batch_decode(
            [ids[mask.bool()] for ids, mask in zip(answers, answer_mask)], skip_special_tokens=True)]
        return Samples(indices, torch.cat([input_ids, answers], dim=1), torch.cat([prompt_mask, answer_mask], dim=1),
                       width, answer_mask, texts, has_eos)

    def _vllm_answers(self, prompt_ids: list[list[int]], step: int):
        """Answers from the colocated vLLM engine, its weights synced once per optimizer step."""
        import torch

        if self._vllm_synced_step != step:
            self.vllm.sync_weights()
            self._vllm_synced_step = step
        _, completion_ids, _, _ = self.vllm.generate(prompts=prompt_ids, images=None, num_generations=1)
        width = max(1, max(len(ids) for ids in completion_ids))
        answers = torch.full((len(completion_ids), width), self.pad_token_id, dtype=torch.long)
        for row, ids in enumerate(completion_ids):
            answers[row, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        return answers.to(self.device)

    # ------------------------------------------------------------------ the DPO update

    def answer_logps(self, model, samples: Samples):
        """Summed log-probs of each answer given its prompt (positions count real tokens only)."""
        import torch

        position_ids = (samples.attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=samples.input_ids, attention_mask=samples.attention_mask,
                       position_ids=position_ids, use_cache=False).logits
        logits = logits[:, samples.prompt_length - 1:-1].float()
        answer_ids = samples.input_ids[:, samples.prompt_length:]
        logps = torch.log_softmax(logits, dim=-1).gather(-1, answer_ids[..., None]).squeeze(-1)
        return (logps * samples.answer_mask).sum(1)

    def _reference_logps(self, samples: Samples):
        import torch

        with torch.no_grad():
            if self.reference is None:
                with self.policy.disable_adapter():
                    return self.answer_logps(self.policy, samples)
            return self.answer_logps(self.reference, samples)

    def _micro_step(self, step: int, micro: int) -> dict[str, float]:
        """Sample, judge, and add this micro-batch's DPO gradient; returns its numbers."""
        import torch

        c = self.config
        samples = self.sample(self.prompt_indices(step, micro), step, micro)
        b = len(samples.indices)
        prompts = [self.prompts[i] for i in samples.indices]
        judged = self.store.judge(self.judge, prompts, samples.texts[:b], samples.texts[b:],
                                  policy_version=f"{c.output_dir}@step-{step - 1}")
        weights = pair_weights(judged.verdicts, c.ties, c.tie_weight)
        a_chosen = torch.tensor([a for a, _ in weights], device=self.device)
        weight = torch.tensor([w for _, w in weights], device=self.device)
        kept = int((weight > 0).sum())

        self.policy.train()  # dropout is off (see train); train mode lets gradient checkpointing work
        logps = self.answer_logps(self.policy, samples)
        ref_logps = self._reference_logps(samples)
        rows = torch.arange(b, device=self.device)
        chosen, rejected = torch.where(a_chosen, rows, rows + b), torch.where(a_chosen, rows + b, rows)
        losses = dpo_losses(logps[chosen], logps[rejected], ref_logps[chosen], ref_logps[rejected], c.beta,
                            c.loss_type)
        loss = (weight * losses).sum() / max(kept, 1)
        if kept:
            (loss / c.gradient_accumulation_steps).backward()

        stats = {"agreement_rate": sum(v.agrees for v in judged.verdicts),
                 "position_bias_rate": sum(v.position_biased for v in judged.verdicts)}
        preferences = sum(v.preferred != "tie" for v in judged.verdicts)
        for key, value in (("pairs", b), ("agree", stats["agreement_rate"]),
                           ("position_biased", stats["position_bias_rate"]), ("preferences", preferences),
                           ("ties", b - preferences), ("judged", judged.judged), ("cached", judged.cached)):
            self.totals[key] += value
        margins = (c.beta * ((logps[chosen] - ref_logps[chosen]) - (logps[rejected] - ref_logps[rejected]))).detach()
        kept_rows = weight > 0
        return {
            "loss": float(loss.detach()),
            "judge/agreement_rate": stats["agreement_rate"] / b,
            "judge/position_bias_rate": stats["position_bias_rate"] / b,
            "pairs/preferences": float(preferences),
            "pairs/ties": float(b - preferences),
            "pairs/trained": float(kept),
            "ai_feedback/judged": float(judged.judged),
            "ai_feedback/cached": float(judged.cached),
            "rewards/margins": float(margins[kept_rows].mean()) if kept else math.nan,
            "rewards/accuracies": float((margins[kept_rows] > 0).float().mean()) if kept else math.nan,
            "objective/kl": float((logps - ref_logps).detach().mean()),
            "completions/mean_length": float(samples.answer_mask.sum(1).float().mean()),
            "completions/clipped_ratio": float((~samples.has_eos).float().mean()),
        }

    def training_step(self, step: int) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` freshly sampled and judged micro-batches."""
        parts = [self._micro_step(step, micro) for micro in range(self.config.gradient_accumulation_steps)]
        if any(p["pairs/trained"] for p in parts):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {}
        for key in parts[0]:
            values = [p[key] for p in parts if not math.isnan(p[key])]
            summed = key.startswith(("pairs/", "ai_feedback/"))
            metrics[key] = (sum(values) if summed else sum(values) / len(values)) if values else math.nan
        metrics["learning_rate"] = self.config.learning_rate
        metrics["epoch"] = step * self.config.gradient_accumulation_steps * self.config.per_device_batch_size / len(
            self.prompts)
        return metrics

    # ------------------------------------------------------------------ the loop

    def _callback(self, event: str, **kwargs: Any) -> None:
        for callback in self.callbacks:
            result = getattr(callback, event)(self.config, self.state, self.control, model=self.policy,
                                              processing_class=self.tokenizer, optimizer=self.optimizer, **kwargs)
            if result is not None:
                self.control = result

    def train(self, resume_from: Path | None = None) -> None:
        """Steps ``1..max_steps``, or from the step after the checkpoint ``resume_from``."""
        if resume_from is not None:
            import torch
            from transformers import TrainerState

            from alignment_pipelines.methods.ppo_trainer import load_trainable_state

            load_trainable_state(self.policy, resume_from / POLICY_WEIGHTS_FILE)
            self.optimizer.load_state_dict(torch.load(resume_from / OPTIMIZER_FILE, map_location="cpu",
                                                      weights_only=True))
            self.state = TrainerState.load_from_json(str(resume_from / TRAINER_STATE_FILE))
        self._callback("on_train_begin")
        for step in range(self.state.global_step + 1, self.config.max_steps + 1):
            self._callback("on_step_begin")
            metrics = self.training_step(step)
            self.state.global_step = step
            self.state.epoch = metrics.pop("epoch")
            self._callback("on_step_end")
            if step % self.config.logging_steps == 0:
                self.state.log_history.append({**metrics, "step": step})
                self._callback("on_log", logs=metrics)
            if self.config.checkpoint_dir and self.config.save_steps and step % self.config.save_steps == 0:
                self._save_checkpoint(step)
            if self.control.should_training_stop:
                break
        self._callback("on_train_end")

    def _save_checkpoint(self, step: int) -> None:
        """``checkpoint-<step>``: written hidden, ``trainer_state.json`` last, renamed; the older one removed."""
        import torch
        from safetensors.torch import save_file

        from alignment_pipelines.methods.ppo_trainer import trainable_state

        root = Path(self.config.checkpoint_dir)
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step}.tmp-", dir=root))
        try:
            save_file(trainable_state(self.policy), str(staging / POLICY_WEIGHTS_FILE))
            torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_FILE)
            self.state.save_to_json(str(staging / TRAINER_STATE_FILE))
            os.replace(staging, root / f"{CHECKPOINT_PREFIX}{step}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for older in root.glob(f"{CHECKPOINT_PREFIX}*"):
            if older.name != f"{CHECKPOINT_PREFIX}{step}":
                shutil.rmtree(older, ignore_errors=True)

    def run_metrics(self) -> dict[str, float]:
        """The annotator's numbers over the whole run (since the resume, for a resumed run)."""
        t = self.totals
        pairs = t["pairs"]
        return {
            "ai_feedback/pairs": float(pairs),
            "ai_feedback/preferences": float(t["preferences"]),
            "ai_feedback/ties": float(t["ties"]),
            "ai_feedback/judged_total": float(t["judged"]),
            "ai_feedback/cached_total": float(t["cached"]),
            "ai_feedback/agreement_rate": t["agree"] / pairs if pairs else math.nan,
            "ai_feedback/position_bias_rate": t["position_biased"] / pairs if pairs else math.nan,
        }


def disable_dropout(model) -> None:
    """Dropout off everywhere: the log-probs of the update are those of the distribution that sampled."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def train(config: OnlineDPOMethodConfig, callbacks: list | None = None) -> TrainResult:
    """Load the prompts, the policy (with LoRA or beside a frozen reference) and the annotator; train; save."""
    import torch

    from alignment_pipelines.ai_feedback import AIFeedbackStore
    from alignment_pipelines.judges import build_judge
    from alignment_pipelines.methods.checkpoints import prepare_resume
    from alignment_pipelines.methods.data import load_prompts
    from alignment_pipelines.methods.training import (
        StagingDir, finish, history_and_metrics, load_frozen, load_start_model, lora_config, quiet_progress,
        save_trained)

    config.validate()
    quiet_progress(config)
    prompts = list(load_prompts(config.data)["prompt"])
    judge = build_judge(config.judge_spec())
    torch.manual_seed(config.seed)  # the LoRA initialisation
    policy, tokenizer = load_start_model(config, "policy")
    reference = None
    if config.lora:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(config, "policy"))
    else:
        reference, _ = load_frozen(config.model, "policy", config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy.to(device)
    if reference is not None:
        reference.to(device)
    disable_dropout(policy)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.enable_input_require_grads()
    with StagingDir(config.output_dir) as staging:
        staging.model_dir.mkdir(parents=True)
        store = AIFeedbackStore(config.feedback_store or staging.model_dir / STORE_IN_MODEL_FOLDER)
        trainer = OnlineDPOTrainer(config, policy, tokenizer, reference, judge, store, prompts, callbacks)
        resume, resumed_step = prepare_resume(config)
        started = time.perf_counter()
        trainer.train(resume)
        history, metrics = history_and_metrics(trainer.state.log_history, trainer.state.global_step, resumed_step)
        metrics.update(trainer.run_metrics())
        metrics["prompts"] = float(len(prompts))
        metrics["wall_seconds"] = time.perf_counter() - started
        save_trained(policy, tokenizer, config, staging.model_dir, "policy", "online_dpo")
        (staging.model_dir / "annotator.json").write_text(json.dumps(
            {"judge_id": judge.id, "instruction": config.instruction,
             "feedback_store": str(Path(store.root).resolve()) if config.feedback_store else STORE_IN_MODEL_FOLDER},
            indent=2))
        result = TrainResult(method="online_dpo", output_dir=str(config.output_dir), metrics=metrics, history=history)
        return finish(result, staging, config)
