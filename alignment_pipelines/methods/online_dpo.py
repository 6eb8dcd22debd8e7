"""Online DPO from AI feedback (OAIF, Guo et al. 2024): the policy's own fresh samples, judged while it trains.

One training step, for each of ``gradient_accumulation_steps`` batches of ``per_device_batch_size`` prompts:

1. sample two answers per prompt from the current policy (sample ``i`` and ``i + B`` share prompt ``i``, as in
   TRL's ``OnlineDPOTrainer``), with HF ``generate`` or, with ``use_vllm``, TRL's colocated vLLM engine whose
   weights are synced after every optimizer step;
2. ask the annotator about each pair in both orders in one batch, through the AI-feedback store (a pair judged
   before, by the same judge and instruction, is not judged again; every new judgement is stored);
3. verdicts that agree make a preference; the rest are ties: dropped, down-weighted, or trained on the
   order-averaged probability as a soft label (``ties='average'``, OAIF's rule). An answer cut at
   ``max_new_tokens`` without EOS loses ``missing_eos_penalty`` of that probability, so against a finished answer
   it loses outright at the default;
4. the DPO loss on the pairs, against the reference (the disabled LoRA adapter, or a frozen start model),
   divided by the number of pairs that carry weight in the whole step: the step's size does not shrink as ties
   grow more frequent;

then one optimizer step, its gradient clipped to ``max_grad_norm``, its learning rate warming up over the first
``warmup_ratio`` of the steps (TRL's guard rails). Agreement and position-bias rates are logged every step.
Prompts that leave no room for ``max_new_tokens`` within ``max_length`` are left out and counted
(``prompts_too_long``), as PPO and RLOO do, never cut. Sampling, log-probs, the loop and checkpoints come from
``own_loop.py``, shared with PPO.

Why not TRL's ``OnlineDPOTrainer`` itself: it turns every pair into a preference (``first >= second``, so a tie
trains "sample i is better" at full weight) and has no per-pair weight, so ties can be neither dropped nor
down-weighted; its reward functions return scalars, so the verdicts of both orders could not be kept. This loop
has the same shape; TRL is used here only for its vLLM generation backend, so this module is the one to change
if TRL drops it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from alignment_pipelines.methods.config import ConfigError, MemoryProfile, MethodConfig, option, wiring
from alignment_pipelines.methods.own_loop import OwnLoop, max_grad_norm_option
from alignment_pipelines.methods.training import TrainResult

JudgeKind = Literal["llm", "openai", "reward_model", "rule", "shorter", "contains_code", "regex", "position"]
TieHandling = Literal["drop", "downweight", "average"]
LossType = Literal["sigmoid", "ipo"]

STORE_IN_MODEL_FOLDER = "ai_feedback"  # where judgements go when no shared store is wired in


@dataclass
class OnlineDPOMethodConfig(MethodConfig):
    """Online DPO: the policy samples two answers per prompt, an annotator LLM judges them in both orders."""

    learning_rate: float = option(5e-6, "peak learning rate (constant after the warm-up)", minimum=0,
                                  exclusive_minimum=True)
    beta: float = option(0.1, "strength of the KL constraint to the reference (higher: stay closer)",
                         minimum=0, exclusive_minimum=True)
    loss_type: LossType = option("sigmoid", "DPO loss variant (sigmoid is the paper's)")
    judge: JudgeKind = option(
        "llm", "the annotator: 'llm' (a local model folder, judge_model), 'openai' (an OpenAI-compatible endpoint, "
        "judge_base_url + judge_model), 'reward_model' (a reward-model folder, judge_model: the higher score wins), "
        "or a rule judge ('rule', 'shorter', 'contains_code', 'regex', 'position')")
    instruction: str = option("helpful", "the annotator's criterion, e.g. 'helpful and very short': it steers what "
                                         "the policy learns (LLM judges)")
    judge_model: str | None = option(
        None, "'llm': the annotator's model folder (default: the base model the start model was trained from, e.g. "
              "SmolLM2 from the model store); 'openai': the served model's name")
    judge_base_url: str | None = option(
        None, "'openai': the endpoint, e.g. http://127.0.0.1:8000/v1: loopback, or https on a host in "
        "ALIGNMENT_PIPELINES_JUDGE_ALLOWED_HOSTS; the key comes only from ALIGNMENT_PIPELINES_JUDGE_API_KEY")
    judge_timeout_s: float = option(30.0, "'openai': seconds a request may take before it is retried", minimum=0,
                                    exclusive_minimum=True)
    judge_max_retries: int = option(3, "'openai': retries of a failed request (with exponential backoff)", minimum=0)
    judge_max_concurrency: int = option(4, "'openai': requests in flight at once", minimum=1)
    judge_pattern: str | None = option(None, "'regex': the pattern a preferred answer matches")
    judge_batch_size: int = option(8, "'llm': comparisons per forward pass", minimum=1)
    ties: TieHandling = option(
        "drop", "pairs whose two orders disagree: 'drop' them, 'downweight' them (trained with tie_weight, in "
                "the direction of the order-averaged preference; an exact 50/50 is still dropped), or 'average': "
                "train on the order-averaged P(a better) as a soft label (OAIF's rule)")
    tie_weight: float = option(0.25, "weight of a tied pair with ties='downweight' (a preference weighs 1)",
                               minimum=0, maximum=1)
    missing_eos_penalty: float | None = option(
        1.0, "taken from the order-averaged P(better) of an answer cut at max_new_tokens without EOS when the other "
             "answer finished (1.0: the finished one always wins; a truncated answer must not win on being longer "
             "or shorter); unset: no penalty", minimum=0, maximum=1)
    max_grad_norm: float = max_grad_norm_option()
    warmup_ratio: float = option(0.1, "share of the steps over which the learning rate rises linearly to its peak",
                                 minimum=0, maximum=1, exclusive_maximum=True)
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
    steps_only: ClassVar[bool] = True  # its own loop counts steps: no epochs over the prompts
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
            from alignment_pipelines.judges.endpoints import EndpointNotAllowed, check_endpoint

            try:
                check_endpoint(self.judge_base_url or "")
            except EndpointNotAllowed as error:
                raise ConfigError("judge_base_url", self.judge_base_url, str(error)) from None
            if not self.judge_model:
                raise ConfigError("judge_model", self.judge_model, "judge 'openai' needs the served model's name")
        if self.judge == "regex" and not self.judge_pattern:
            raise ConfigError("judge_pattern", self.judge_pattern, "judge 'regex' needs a pattern")
        if self.judge == "llm":
            self._validate_annotator_model()
        if self.judge == "reward_model" and not self.judge_model:
            raise ConfigError("judge_model", self.judge_model, "judge 'reward_model' needs the reward model's folder")

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
                    "instruction": self.instruction,
                    "timeout_s": self.judge_timeout_s, "max_retries": self.judge_max_retries,
                    "max_concurrency": self.judge_max_concurrency}
        if self.judge == "regex":
            return {"kind": "regex", "pattern": self.judge_pattern}
        if self.judge == "reward_model":
            return {"kind": "reward_model", "model_dir": self.judge_model, "batch_size": self.judge_batch_size}
        return {"kind": self.judge}


def pair_labels(verdicts, ties: TieHandling, tie_weight: float, finished_a=None, finished_b=None,
                missing_eos_penalty: float | None = None) -> list[tuple[float, float]]:
    """(label, weight) per verdict; the label is the target P(answer a is better).

    A preference both orders agree on: label 1 or 0, weight 1. A tie: weight 0 (``drop``); ``tie_weight`` with the
    label of the order-averaged direction (``downweight``, an exact 50/50 dropped); or label = the order-averaged
    P(a better) at weight 1 (``average``). Where exactly one answer finished (``finished_a``/``finished_b``), the
    truncated one loses ``missing_eos_penalty`` of that probability and the pair is decided by what is left.
    """
    out = []
    for i, verdict in enumerate(verdicts):
        p_a, preferred = verdict.p_a, verdict.preferred
        if missing_eos_penalty is not None and finished_a is not None and finished_a[i] != finished_b[i]:
            p_a = min(1.0, max(0.0, p_a + (missing_eos_penalty if finished_a[i] else -missing_eos_penalty)))
            preferred = "a" if p_a > 0.5 else "b" if p_a < 0.5 else "tie"
        if preferred != "tie":
            out.append((1.0 if preferred == "a" else 0.0, 1.0))
        elif ties == "average":
            out.append((p_a, 1.0))
        elif ties == "downweight" and p_a != 0.5:
            out.append((1.0 if p_a > 0.5 else 0.0, tie_weight))
        else:
            out.append((1.0, 0.0))
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


@dataclass
class JudgedBatch:
    """One micro-batch's samples with the annotator's labels: target P(a better) and weight per pair."""

    samples: Samples
    labels: Any  # [B] float
    weights: Any  # [B] float
    stats: dict[str, float]

    @property
    def weighted_pairs(self) -> int:
        return int((self.weights > 0).sum())


class OnlineDPOTrainer(OwnLoop):
    """The loop in the module docstring. ``policy`` is a causal LM or a ``PeftModel`` (then the reference is its
    disabled adapter and ``reference`` is None); ``prompts`` each leave ``max_new_tokens`` of room within
    ``max_length`` (``ppo.fitting_prompts``); callbacks are transformers ``TrainerCallback``s."""

    def __init__(self, config: OnlineDPOMethodConfig, policy, tokenizer, reference, judge, store,
                 prompts: list, callbacks: list | None = None):
        import torch

        from alignment_pipelines.methods.own_loop import (
            PromptOrder, chat_prompt_ids, disable_dropout, eos_token_ids, sampling_config, warmup_scheduler)

        self.config, self.policy, self.tokenizer, self.reference = config, policy, tokenizer, reference
        self.judge, self.store, self.prompts = judge, store, prompts
        self.device = next(policy.parameters()).device
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = eos_token_ids(tokenizer, policy)
        self.prompt_order = PromptOrder(len(prompts), config.seed)
        self.prompt_token_ids = chat_prompt_ids(tokenizer, prompts, config.max_length, config.max_new_tokens)
        self.generation_config = sampling_config(config.max_new_tokens, config.temperature, self.eos_token_ids,
                                                 self.pad_token_id, top_p=config.top_p, top_k=config.top_k)
        disable_dropout(policy)
        self.optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                           lr=config.learning_rate)
        self.lr_scheduler = warmup_scheduler(self.optimizer, int(config.warmup_ratio * config.max_steps))
        self.trained = {"policy": policy}
        self._start_loop(callbacks)
        self.vllm = self._vllm_generation() if config.use_vllm else None
        self._vllm_synced_step = -1
        self.totals = {"pairs": 0, "agree": 0, "position_biased": 0, "preferences": 0, "ties": 0, "judged": 0,
                       "cached": 0}

    # ------------------------------------------------------------------ sampling

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
        batch = self.config.per_device_batch_size
        return self.prompt_order.indices(((step - 1) * self.config.gradient_accumulation_steps + micro) * batch,
                                         batch)

    def sample(self, indices: list[int], step: int, micro: int = 0) -> Samples:
        """Two answers per prompt from the policy's weights as they are now, seeded by (seed, step, micro)."""
        import torch

        from alignment_pipelines.methods.own_loop import cut_after_eos, derived_seed, left_pad

        prompt_ids = [self.prompt_token_ids[i] for i in indices] * 2
        input_ids, prompt_mask = left_pad(prompt_ids, self.pad_token_id, self.device)
        width = input_ids.size(1)
        if self.vllm is not None:
            answers = self._vllm_answers(prompt_ids, step)
        else:
            torch.manual_seed(derived_seed(self.config.seed, step * 10_000 + micro, "sample"))
            self.policy.eval()
            with torch.no_grad():
                sequences = self.policy.generate(input_ids=input_ids, attention_mask=prompt_mask,
                                                 generation_config=self.generation_config)
            answers = sequences[:, width:]
        answers, answer_mask, has_eos = cut_after_eos(answers, self.eos_token_ids, self.pad_token_id)
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

    # ------------------------------------------------------------------ judging and the DPO update

    def answer_logps(self, model, samples: Samples):
        """Summed log-probs of each answer given its prompt: the policy's own distribution (temperature 1), which
        DPO's implicit reward is defined on."""
        from alignment_pipelines.methods.own_loop import answer_logits
        from alignment_pipelines.methods.rl_math import logprobs_from_logits

        logits = answer_logits(model, samples.input_ids, samples.attention_mask, samples.prompt_length, 1.0)[0]
        answer_ids = samples.input_ids[:, samples.prompt_length:]
        return (logprobs_from_logits(logits, answer_ids) * samples.answer_mask).sum(1)

    def judged_batch(self, step: int, micro: int) -> JudgedBatch:
        """Sample micro-batch ``micro`` of ``step`` and have the annotator label its pairs."""
        import torch

        c = self.config
        samples = self.sample(self.prompt_indices(step, micro), step, micro)
        b = len(samples.indices)
        prompts = [self.prompts[i] for i in samples.indices]
        judged = self.store.judge(self.judge, prompts, samples.texts[:b], samples.texts[b:],
                                  policy_version=f"{c.output_dir}@step-{step - 1}")
        finished = samples.has_eos.tolist()
        labelled = pair_labels(judged.verdicts, c.ties, c.tie_weight, finished[:b], finished[b:],
                               c.missing_eos_penalty)
        preferences = sum(v.preferred != "tie" for v in judged.verdicts)
        stats = {"pairs": b, "agree": sum(v.agrees for v in judged.verdicts),
                 "position_biased": sum(v.position_biased for v in judged.verdicts), "preferences": preferences,
                 "ties": b - preferences, "judged": judged.judged, "cached": judged.cached}
        for key, value in stats.items():
            self.totals[key] += value
        return JudgedBatch(samples, torch.tensor([label for label, _ in labelled], device=self.device),
                           torch.tensor([weight for _, weight in labelled], device=self.device), stats)

    def backward(self, batch: JudgedBatch, weighted_pairs: int) -> dict[str, float]:
        """Add ``batch``'s share of the step's DPO gradient: its weighted soft-label losses over ``weighted_pairs``,
        the pairs that carry weight in the whole step (so the step's size does not depend on the tie rate)."""
        import torch

        from alignment_pipelines.methods.own_loop import reference_model

        c, samples = self.config, batch.samples
        b = len(samples.indices)
        self.policy.train()  # dropout is off; train mode lets gradient checkpointing work
        logps = self.answer_logps(self.policy, samples)
        with torch.no_grad(), reference_model(self.policy, self.reference) as reference:
            ref_logps = self.answer_logps(reference, samples)
        a, b_rows = slice(0, b), slice(b, 2 * b)
        a_wins = dpo_losses(logps[a], logps[b_rows], ref_logps[a], ref_logps[b_rows], c.beta, c.loss_type)
        b_wins = dpo_losses(logps[b_rows], logps[a], ref_logps[b_rows], ref_logps[a], c.beta, c.loss_type)
        losses = batch.labels * a_wins + (1 - batch.labels) * b_wins
        loss = (batch.weights * losses).sum() / max(weighted_pairs, 1)
        kept = batch.weighted_pairs
        if kept:
            loss.backward()
        margin_a = (c.beta * ((logps[a] - ref_logps[a]) - (logps[b_rows] - ref_logps[b_rows]))).detach()
        margins = torch.where(batch.labels >= 0.5, margin_a, -margin_a)[batch.weights > 0]
        return {
            "loss": float((batch.weights * losses).sum().detach()) / max(kept, 1),
            "judge/agreement_rate": batch.stats["agree"] / b,
            "judge/position_bias_rate": batch.stats["position_biased"] / b,
            "pairs/preferences": float(batch.stats["preferences"]),
            "pairs/ties": float(batch.stats["ties"]),
            "pairs/trained": float(kept),
            "ai_feedback/judged": float(batch.stats["judged"]),
            "ai_feedback/cached": float(batch.stats["cached"]),
            "rewards/margins": float(margins.mean()) if kept else math.nan,
            "rewards/accuracies": float((margins > 0).float().mean()) if kept else math.nan,
            "objective/kl": float((logps - ref_logps).detach().mean()),
            "completions/mean_length": float(samples.answer_mask.sum(1).float().mean()),
            "completions/clipped_ratio": float((~samples.has_eos).float().mean()),
        }

    def training_step(self, step: int) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches, all sampled and judged first
        (the weights do not move in between) so that the loss is divided by the step's weighted pairs."""
        from alignment_pipelines.methods.own_loop import clip_and_step

        batches = [self.judged_batch(step, micro) for micro in range(self.config.gradient_accumulation_steps)]
        weighted = sum(batch.weighted_pairs for batch in batches)
        parts = [self.backward(batch, weighted) for batch in batches]
        learning_rate = self.lr_scheduler.get_last_lr()[0]
        if weighted:
            clip_and_step(self.optimizer, self.lr_scheduler, self.config.max_grad_norm)
        metrics = {}
        for key in parts[0]:
            values = [p[key] for p in parts if not math.isnan(p[key])]
            summed = key.startswith(("pairs/", "ai_feedback/"))
            metrics[key] = (sum(values) if summed else sum(values) / len(values)) if values else math.nan
        metrics["learning_rate"] = learning_rate
        metrics["epoch"] = step * self.config.gradient_accumulation_steps * self.config.per_device_batch_size / len(
            self.prompts)
        return metrics

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


def train(config: OnlineDPOMethodConfig, callbacks: list | None = None) -> TrainResult:
    """Load the prompts, the policy (with LoRA or beside a frozen reference) and the annotator; train; save."""
    import torch

    from alignment_pipelines.ai_feedback import AIFeedbackStore
    from alignment_pipelines.judges import build_judge
    from alignment_pipelines.methods.checkpoints import prepare_resume
    from alignment_pipelines.methods.ppo import fitting_prompts
    from alignment_pipelines.methods.training import (
        StagingDir, finish, history_and_metrics, load_frozen, load_start_model, lora_config, quiet_progress,
        save_trained)

    config.validate()
    quiet_progress(config)
    judge = build_judge(config.judge_spec())
    torch.manual_seed(config.seed)  # the LoRA initialisation
    policy, tokenizer = load_start_model(config, "policy")
    prompts, prompt_metrics = fitting_prompts(config, tokenizer)
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
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.enable_input_require_grads()
    with StagingDir(config.output_dir) as staging:
        staging.model_dir.mkdir(parents=True)
        store = AIFeedbackStore(config.feedback_store or staging.model_dir / STORE_IN_MODEL_FOLDER)
        trainer = OnlineDPOTrainer(config, policy, tokenizer, reference, judge, store, list(prompts["prompt"]),
                                   callbacks)
        resume, resumed_step = prepare_resume(config)
        started = time.perf_counter()
        trainer.train(resume)
        history, metrics = history_and_metrics(trainer.state.log_history, trainer.state.global_step, resumed_step)
        metrics.update(trainer.run_metrics())
        metrics.update(prompt_metrics)
        metrics["wall_seconds"] = time.perf_counter() - started
        save_trained(policy, tokenizer, config, staging.model_dir, "policy", "online_dpo")
        (staging.model_dir / "annotator.json").write_text(json.dumps(
            {"judge_id": judge.id, "instruction": config.instruction,
             "feedback_store": str(Path(store.root).resolve()) if config.feedback_store else STORE_IN_MODEL_FOLDER},
            indent=2))
        result = TrainResult(method="online_dpo", output_dir=str(config.output_dir), metrics=metrics, history=history)
        return finish(result, staging, config)
