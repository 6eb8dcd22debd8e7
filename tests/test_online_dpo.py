"""Online DPO with AI feedback on the tiny model: rule judges, the judgement store, and an HTTP annotator."""

from __future__ import annotations

import json
import threading

import pytest

from alignment_pipelines.ai_feedback import AIFeedbackStore, preference_pairs, summary
from alignment_pipelines.judges import JudgeError, ShorterJudge, Verdict
from alignment_pipelines.judges.rule import PositionJudge
from alignment_pipelines.methods import ConfigError, config_from_dict, run_training
from alignment_pipelines.methods.online_dpo import OnlineDPOMethodConfig, OnlineDPOTrainer, dpo_losses, pair_labels
from tests.chat_completions import ChatCompletionsHandler, ChatCompletionsServer

QUESTIONS = ["How do I boil an egg?", "What is a prime number?", "Name a colour.", "Why is the sky blue?",
             "How far is the moon?", "What do cats eat?", "Say hello.", "What is rain?"]
TEA = [{"role": "user", "content": "How do I make green tea?"}]


@pytest.fixture
def prompts_path(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return path


def online_config(tmp_path, model, data, **overrides) -> dict:
    values = dict(model=str(model), data=str(data), output_dir=str(tmp_path / "out"), judge="shorter",
                  max_steps=2, per_device_batch_size=4, max_new_tokens=12, max_length=128, learning_rate=5e-3,
                  gradient_checkpointing=False, memory_budget_gb=0, feedback_store=str(tmp_path / "store"))
    return values | overrides


class CountingJudge(ShorterJudge):
    """The shorter answer wins; remembers every batch it was asked about."""

    def __init__(self):
        self.calls: list[tuple[list, list[str], list[str]]] = []

    def judge(self, prompts, answers_a, answers_b):
        self.calls.append((list(prompts), list(answers_a), list(answers_b)))
        return super().judge(prompts, answers_a, answers_b)


# ---------------------------------------------------------------- ties and the store, no model


def test_ties_are_dropped_downweighted_or_averaged_and_a_truncated_answer_loses():
    agree_b = Verdict.from_orders((0.2, "B"), (0.9, "A"))  # both orders: b is better, P(a better) = 0.15
    leaning_a = Verdict.from_orders((0.9, "A"), (0.7, "A"))  # both orders chose A: a tie, P(a better) = 0.6
    exact = Verdict.from_orders((1.0, "A"), (1.0, "A"))  # pure position bias: P(a better) = 0.5
    verdicts = [agree_b, leaning_a, exact]
    assert [v.preferred for v in verdicts] == ["b", "tie", "tie"]
    # (target P(a better), weight)
    assert pair_labels(verdicts, "drop", 0.25) == [(0.0, 1.0), (1.0, 0.0), (1.0, 0.0)]
    assert pair_labels(verdicts, "downweight", 0.25) == [(0.0, 1.0), (1.0, 0.25), (1.0, 0.0)]
    assert pair_labels(verdicts, "average", 0.25) == [(0.0, 1.0), (pytest.approx(0.6), 1.0), (0.5, 1.0)]
    # b was cut at max_new_tokens, a finished: the penalty decides for a, even against the annotator ...
    finished_a, finished_b = [True, True, True], [False, False, True]
    assert pair_labels(verdicts, "drop", 0.25, finished_a, finished_b, 1.0) == [(1.0, 1.0), (1.0, 1.0), (1.0, 0.0)]
    # ... a small penalty only shifts the probability; both cut or both finished: the annotator alone decides
    assert pair_labels(verdicts, "average", 0.25, finished_a, finished_b, 0.3) == [
        (0.0, 1.0), (1.0, 1.0), (0.5, 1.0)]
    assert pair_labels(verdicts, "drop", 0.25, [False] * 3, [False] * 3, 1.0) == pair_labels(verdicts, "drop", 0.25)


def test_store_judges_each_pair_once_in_either_order(tmp_path):
    judge = CountingJudge()
    store = AIFeedbackStore(tmp_path / "store")
    first = store.judge(judge, [TEA, TEA, TEA], ["short", "a longer answer", "x"], ["a long answer", "tiny", "yy"],
                        policy_version="run@step-0")
    assert (first.judged, first.cached) == (3, 0)
    assert [v.preferred for v in first.verdicts] == ["a", "b", "a"]

    # the first pair asked again with its answers swapped, one repeat inside the batch, one new pair
    again = store.judge(judge, [TEA, TEA, TEA], ["a long answer", "z", "z"], ["short", "zzz", "zzz"],
                        policy_version="run@step-1")
    assert (again.judged, again.cached) == (1, 2)
    assert [v.preferred for v in again.verdicts] == ["b", "a", "a"]
    assert again.verdicts[0].first_order == first.verdicts[0].second_order  # the stored verdict, flipped
    assert len(judge.calls) == 2 and judge.calls[1][1:] == (["z"], ["zzz"])

    reopened = AIFeedbackStore(tmp_path / "store")
    rows = reopened.read()
    assert len(reopened) == len(rows) == 4
    assert set(rows["policy_version"]) == {"run@step-0", "run@step-1"}
    assert set(rows["judge_id"]) == {"shorter"}
    assert reopened.judge(judge, [TEA], ["tiny"], ["a longer answer"], policy_version="x").judged == 0
    pairs = preference_pairs(rows)
    assert list(pairs["chosen"]) == ["short", "tiny", "x", "z"]
    assert summary(rows)["agreement_rate"] == 1.0


def test_a_failed_batch_stores_nothing(tmp_path):
    class FailsOnSecond(ShorterJudge):
        def compare_batch(self, prompts, firsts, seconds):
            raise JudgeError("annotator went away", request_index=1)

    store = AIFeedbackStore(tmp_path / "store")
    with pytest.raises(JudgeError, match="pair 1"):
        store.judge(FailsOnSecond(), [TEA, TEA], ["a", "b"], ["cc", "dd"], policy_version="v")
    assert len(store) == 0 and not list((tmp_path / "store").glob("*"))


# ---------------------------------------------------------------- config


def test_the_policy_may_not_be_its_own_annotator(tmp_path, tiny_model_dir, prompts_path):
    base = online_config(tmp_path, tiny_model_dir, prompts_path, judge="llm")
    with pytest.raises(ConfigError, match="own policy as its annotator"):  # default: the base under the start model
        config_from_dict("online_dpo", base)
    with pytest.raises(ConfigError, match="own policy as its annotator"):
        config_from_dict("online_dpo", base | {"judge_model": str(tiny_model_dir)})
    with pytest.raises(ConfigError, match="judge_base_url"):
        config_from_dict("online_dpo", base | {"judge": "openai", "judge_model": "m"})
    for foreign in ("http://attacker.example/v1", "https://attacker.example/v1"):  # not on the allow-list
        with pytest.raises(ConfigError, match="judge_base_url"):
            config_from_dict("online_dpo", base | {"judge": "openai", "judge_model": "m", "judge_base_url": foreign})
    with pytest.raises(ConfigError, match="judge_api_key_env"):  # the key's variable is the deployment's, not config's
        config_from_dict("online_dpo", base | {"judge": "openai", "judge_model": "m",
                                                "judge_base_url": "http://127.0.0.1:9/v1",
                                                "judge_api_key_env": "DAGSTER_PG_PASSWORD"})
    with pytest.raises(ConfigError, match="instruction"):
        config_from_dict("online_dpo", base | {"judge": "shorter", "instruction": "  "})
    config = config_from_dict("online_dpo", base | {"judge": "openai", "judge_model": "m",
                                                     "judge_base_url": "http://127.0.0.1:9/v1",
                                                     "instruction": "helpful and very short"})
    assert config.judge_spec()["instruction"] == "helpful and very short"
    assert config.to_dict()["instruction"] == "helpful and very short"  # what the asset logs as MLflow params
    assert config.lineage_tags() == {"annotator.kind": "openai", "annotator.instruction": "helpful and very short",
                                     "annotator.model": "m"}


# ---------------------------------------------------------------- training on the tiny model


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_position_biased_judge_yields_only_ties_and_no_update(tmp_path, tiny_model_dir, prompts_path):
    config = config_from_dict("online_dpo", online_config(tmp_path, tiny_model_dir, prompts_path, judge="position",
                                                          ties="downweight"))
    result = run_training("online_dpo", config)
    m = result.metrics
    assert m["ai_feedback/pairs"] == 8 and m["ai_feedback/preferences"] == 0 and m["ai_feedback/ties"] == 8
    assert m["ai_feedback/position_bias_rate"] == 1.0 and m["ai_feedback/agreement_rate"] == 0.0
    assert all(entry["pairs/trained"] == 0 for entry in result.history)
    lora_b = [t for name, t in adapter_tensors(tmp_path / "out").items() if "lora_B" in name]
    assert lora_b and all(float(t.abs().max()) == 0.0 for t in lora_b)  # LoRA B starts at zero: nothing moved
    assert set(AIFeedbackStore(tmp_path / "store").read()["preferred"]) == {"tie"}


def test_samples_of_every_step_come_from_the_weights_after_the_previous_update(tmp_path, tiny_model_dir,
                                                                              prompts_path):
    from peft import get_peft_model
    from transformers import TrainerCallback

    from alignment_pipelines.methods.own_loop import trainable_state
    from alignment_pipelines.methods.training import load_start_model, lora_config

    config = OnlineDPOMethodConfig(**online_config(tmp_path, tiny_model_dir, prompts_path, max_steps=3)).validate()
    policy, tokenizer = load_start_model(config, "policy")
    policy = get_peft_model(policy, lora_config(config, "policy"))
    snapshots: list[dict] = []

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            snapshots.append({name: t.clone() for name, t in trainable_state(model).items()})

    judge = CountingJudge()
    trainer = OnlineDPOTrainer(config, policy, tokenizer, None, judge, AIFeedbackStore(tmp_path / "store"),
                               QUESTIONS, [Snapshot()])
    trainer.train()
    assert len(snapshots) == len(judge.calls) == 3
    for earlier, later in zip(snapshots, snapshots[1:]):  # every step changed the weights
        assert any(not earlier[name].equal(later[name]) for name in earlier)

    def resample(weights, step):
        with __import__("torch").no_grad():
            for name, param in policy.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
        return trainer.sample(trainer.prompt_indices(step), step).texts

    for step, (weights, (_, answers_a, answers_b)) in enumerate(zip(snapshots, judge.calls), start=1):
        assert resample(weights, step) == answers_a + answers_b  # sampled from the weights of that moment
    assert resample(snapshots[0], 3) != judge.calls[2][1] + judge.calls[2][2]  # not from the start weights


def mean_answer_length(rows, step: int) -> float:
    """Mean characters of the answers sampled at ``step`` (1-based), from the judgement store."""
    sampled = rows[rows["policy_version"].str.endswith(f"@step-{step - 1}")]
    return float((sampled["answer_a"].str.len().mean() + sampled["answer_b"].str.len().mean()) / 2)


@pytest.mark.timeout(120)
def test_the_shorter_judge_shortens_the_answers(tmp_path, tiny_model_dir, prompts_path):
    """The policy moves towards what the annotator prefers (training on chosen and rejected swapped makes the
    answers longer instead). Seen: ~29 characters in the first steps, ~20 in the last."""
    config = config_from_dict("online_dpo", online_config(tmp_path, tiny_model_dir, prompts_path, lora=False,
                                                          learning_rate=1e-2, per_device_batch_size=8, max_steps=10))
    run_training("online_dpo", config)
    rows = AIFeedbackStore(tmp_path / "store").read()
    lengths = [mean_answer_length(rows, step) for step in range(1, 11)]
    print("mean answer characters per step", [round(n, 1) for n in lengths])
    assert sum(lengths[-3:]) / 3 < sum(lengths[:3]) / 3 - 4


class TiesFirst(ShorterJudge):
    """A pure position bias (only ties) for its first batch, then the shorter answer wins."""

    def __init__(self):
        self.batches = 0

    def judge(self, prompts, answers_a, answers_b):
        self.batches += 1
        if self.batches == 1:
            return PositionJudge().judge(prompts, answers_a, answers_b)
        return super().judge(prompts, answers_a, answers_b)


def test_the_step_size_does_not_shrink_as_ties_grow(tmp_path, tiny_model_dir, prompts_path):
    """A step whose first micro-batch is all ties (dropped) sums the same gradient as the second micro-batch
    alone: the loss is divided by the pairs that carry weight in the whole step, not by the micro-batches."""
    import torch
    from peft import get_peft_model

    from alignment_pipelines.methods.training import load_start_model, lora_config

    config = OnlineDPOMethodConfig(**online_config(tmp_path, tiny_model_dir, prompts_path, gradient_accumulation_steps=2,
                                                   max_grad_norm=1e9)).validate()

    def trainer(judge, store):
        torch.manual_seed(0)
        policy, tokenizer = load_start_model(config, "policy")
        return OnlineDPOTrainer(config, get_peft_model(policy, lora_config(config, "policy")), tokenizer, None, judge,
                                AIFeedbackStore(tmp_path / store), QUESTIONS)

    stepped = trainer(TiesFirst(), "store-a")
    summed = {}
    stepped.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: summed.update(
        {id(p): p.grad.clone() for group in optimizer.param_groups for p in group["params"]}))
    metrics = stepped.training_step(1)
    assert metrics["pairs/ties"] == 4 and metrics["pairs/trained"] > 0

    # expected: the gradient of the mean DPO loss over the decided pairs of the second micro-batch
    alone = trainer(ShorterJudge(), "store-b")
    batch = alone.judged_batch(1, micro=1)  # the same samples as the step's second micro-batch
    logps = alone.answer_logps(alone.policy, batch.samples)
    with torch.no_grad(), alone.policy.disable_adapter():
        ref_logps = alone.answer_logps(alone.policy, batch.samples)
    rows = torch.arange(len(batch.labels))
    chosen = torch.where(batch.labels > 0.5, rows, rows + len(rows))
    rejected = torch.where(batch.labels > 0.5, rows + len(rows), rows)
    losses = dpo_losses(logps[chosen], logps[rejected], ref_logps[chosen], ref_logps[rejected], config.beta,
                        "sigmoid")
    losses[batch.weights > 0].mean().backward()
    grads = [p.grad for group in alone.optimizer.param_groups for p in group["params"]]
    ours = [summed[id(p)] for group in stepped.optimizer.param_groups for p in group["params"]]
    assert any(float(g.abs().max()) > 0 for g in grads)
    for mine, expected in zip(ours, grads):
        torch.testing.assert_close(mine, expected)


def test_long_prompts_are_left_out_and_counted_and_the_learning_rate_warms_up(tmp_path, tiny_model_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in [*QUESTIONS, "why " * 200]))
    config = config_from_dict("online_dpo", online_config(tmp_path, tiny_model_dir, data, max_steps=2,
                                                          warmup_ratio=0.5))
    result = run_training("online_dpo", config)
    assert result.metrics["prompts"] == 8 and result.metrics["prompts_too_long"] == 1
    assert not AIFeedbackStore(tmp_path / "store").read()["prompt"].astype(str).str.contains("why why").any()
    # one warm-up step: half the peak, then the peak
    assert [h["learning_rate"] for h in result.history] == pytest.approx([2.5e-3, 5e-3])


def test_a_killed_run_resumes_where_it_stopped(tmp_path, tiny_model_dir, prompts_path):
    """The shared checkpoints (adapter, optimizer, warm-up schedule, RNG): killed after step 3 of 4 with a
    checkpoint at step 2, the rerun repeats steps 3 and 4 of an uninterrupted run and ends with its adapter."""
    from tests.test_ppo_trainer import Crash, crash_after_step

    def config(name):
        return config_from_dict("online_dpo", online_config(
            tmp_path, tiny_model_dir, prompts_path, output_dir=str(tmp_path / name), max_steps=4, save_steps=2,
            checkpoint_dir=str(tmp_path / f"{name}-ckpt"), feedback_store=str(tmp_path / f"{name}-store"),
            warmup_ratio=0.5))

    straight = run_training("online_dpo", config("straight"))
    with pytest.raises(Crash):
        run_training("online_dpo", config("resumed"), callbacks=[crash_after_step(3)])
    assert [p.name for p in (tmp_path / "resumed-ckpt").glob("checkpoint-*")] == ["checkpoint-2"]
    resumed = run_training("online_dpo", config("resumed"))
    assert resumed.metrics["resumed_from_step"] == 2 and [h["step"] for h in resumed.history] == [3, 4]
    for ours, theirs in zip(resumed.history, straight.history[2:]):
        # step 3's pairs were judged (and stored) before the kill: the rerun finds them in the store
        counts = ("ai_feedback/judged", "ai_feedback/cached")
        assert {k: v for k, v in ours.items() if k not in counts} == pytest.approx(
            {k: v for k, v in theirs.items() if k not in counts}, rel=1e-5, abs=1e-6)
    assert resumed.history[0]["ai_feedback/cached"] == 4
    ours, theirs = adapter_tensors(tmp_path / "resumed"), adapter_tensors(tmp_path / "straight")
    assert all(ours[name].equal(theirs[name]) for name in theirs)


def test_judgements_are_stored_and_a_rerun_judges_nothing_twice(tmp_path, tiny_model_dir, prompts_path):
    values = online_config(tmp_path, tiny_model_dir, prompts_path, instruction="helpful and very short")
    first = run_training("online_dpo", config_from_dict("online_dpo", values))
    rows = AIFeedbackStore(tmp_path / "store").read()
    assert first.metrics["ai_feedback/judged_total"] == len(rows) == 8
    assert set(rows["instruction"]) == {""}  # a rule judge has no instruction; its id says what it does
    assert set(rows["policy_version"]) == {f"{tmp_path / 'out'}@step-0", f"{tmp_path / 'out'}@step-1"}
    assert {"prompt", "answer_a", "answer_b", "first_order", "second_order", "raw_first", "raw_second",
            "judge_id"} <= set(rows.columns)
    assert first.metrics["ai_feedback/agreement_rate"] == 1.0  # a score judge never depends on the order
    assert first.metrics["steps"] == 2 and 0 < first.metrics["ai_feedback/preferences"] <= 8

    again = run_training("online_dpo", config_from_dict("online_dpo", values | {"output_dir": str(tmp_path / "out2")}))
    assert again.metrics["ai_feedback/judged_total"] == 0 and again.metrics["ai_feedback/cached_total"] == 8
    assert len(AIFeedbackStore(tmp_path / "store").read()) == 8


def test_default_annotator_is_the_base_model_under_the_sft_adapter(tmp_path, tiny_model_dir, prompts_path):
    from peft import get_peft_model

    from alignment_pipelines.methods.training import load_start_model, lora_config, save_trained

    base = OnlineDPOMethodConfig(**online_config(tmp_path, tiny_model_dir, prompts_path))
    policy, tokenizer = load_start_model(base, "policy")
    save_trained(get_peft_model(policy, lora_config(base, "policy")), tokenizer, base, tmp_path / "sft", "policy",
                 "sft")
    config = config_from_dict("online_dpo", online_config(tmp_path, tmp_path / "sft", prompts_path, judge="llm",
                                                          instruction="helpful and very short", max_steps=1))
    assert config.annotator_model().resolve() == tiny_model_dir.resolve()
    result = run_training("online_dpo", config)
    rows = AIFeedbackStore(tmp_path / "store").read()
    assert len(rows) == 4 and set(rows["instruction"]) == {"helpful and very short"}
    assert str(tiny_model_dir) in rows["judge_id"].iloc[0] and rows["raw_first"].iloc[0].startswith("logp(A)=")
    assert json.loads((tmp_path / "out" / "annotator.json").read_text())["instruction"] == "helpful and very short"
    assert 0 <= result.metrics["ai_feedback/position_bias_rate"] <= 1


# ---------------------------------------------------------------- an OpenAI-compatible annotator over HTTP


class ShorterAnswerServer(ChatCompletionsServer):
    """Chat completions on 127.0.0.1 that answer "A" when Answer A is shorter, else "B";
    ``faults`` scripts the next replies: "500", "malformed" or "timeout"."""

    def __init__(self):
        super().__init__()
        self.faults: list[str] = []
        self.always: str | None = None
        self.bodies: list[dict] = []

    def answer(self, handler: ChatCompletionsHandler, body: dict) -> None:
        with self.lock:
            self.bodies.append(body)
            fault = self.always or (self.faults.pop(0) if self.faults else None)
        if fault == "timeout":
            threading.Event().wait(1.0)
        if fault == "500":
            return handler.send(500, b'{"error": "scripted"}')
        text = body["messages"][0]["content"]
        answer_a, answer_b = text.split("[Answer A]\n")[1].split("\n\n[Answer B]\n")
        answer_b = answer_b.split("\n\nJudged by this criterion")[0]
        letter = "I cannot say" if fault == "malformed" else "A" if len(answer_a) < len(answer_b) else "B"
        handler.send(200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": letter}}]})
                     .encode())


@pytest.fixture
def annotator_server():
    with ShorterAnswerServer() as server:
        yield server


def http_config(tmp_path, tiny_model_dir, prompts_path, server, **overrides) -> dict:
    return online_config(tmp_path, tiny_model_dir, prompts_path, judge="openai", judge_base_url=server.base_url,
                         judge_model="annotator", instruction="helpful and very short", judge_timeout_s=0.3,
                         judge_max_retries=2, max_steps=1, **overrides)


def test_http_annotator_end_to_end_with_retried_faults(tmp_path, tiny_model_dir, prompts_path, annotator_server):
    annotator_server.faults = ["500", "malformed", "timeout"]
    result = run_training("online_dpo", config_from_dict(
        "online_dpo", http_config(tmp_path, tiny_model_dir, prompts_path, annotator_server)))
    assert len(annotator_server.bodies) == 2 * 4 + 3  # both orders of 4 pairs, and the 3 retried requests
    assert all("helpful and very short" in b["messages"][0]["content"] for b in annotator_server.bodies)
    assert all(b["model"] == "annotator" for b in annotator_server.bodies)
    rows = AIFeedbackStore(tmp_path / "store").read()
    assert len(rows) == 4 and set(rows["instruction"]) == {"helpful and very short"}
    assert rows["judge_id"].iloc[0].startswith("openai") and "annotator" in rows["judge_id"].iloc[0]
    decided = rows[rows["preferred"] != "tie"]
    assert all((a if p == "a" else b) == min(a, b, key=len)
               for a, b, p in zip(decided["answer_a"], decided["answer_b"], decided["preferred"]))
    assert result.metrics["ai_feedback/position_bias_rate"] == (rows["answer_a"].str.len()
                                                                == rows["answer_b"].str.len()).mean()


def test_http_annotator_that_keeps_failing_stops_training_and_stores_nothing(tmp_path, tiny_model_dir, prompts_path,
                                                                            annotator_server):
    annotator_server.always = "500"
    config = config_from_dict("online_dpo", http_config(tmp_path, tiny_model_dir, prompts_path, annotator_server,
                                                        judge_max_concurrency=1))
    with pytest.raises(JudgeError, match=r"pair \d+ in order .*chat/completions failed after 3 attempts.*HTTP 500"):
        run_training("online_dpo", config)
    assert AIFeedbackStore(tmp_path / "store").read().empty
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the ai_feedback asset


def test_ai_feedback_asset_publishes_judgements_and_agreed_pairs(tmp_path, tiny_model_dir):
    import dagster as dg

    from alignment_pipelines.assets.ai_feedback import ai_feedback
    from alignment_pipelines.layout import DataRoot
    from alignment_pipelines.methods.data import load_pairs
    from alignment_pipelines.resources.storage import StorageResource

    store = AIFeedbackStore(DataRoot(tmp_path).ai_feedback)
    questions = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    store.judge(ShorterJudge(), questions, ["ok", "a long one", "same", "x"], ["a long one", "ok", "four", "yy"],
                policy_version="run@step-0")
    built = dg.materialize([ai_feedback], resources={"storage": StorageResource(root=str(tmp_path))})
    ref = built.output_for_node("ai_feedback")
    metadata = built.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["dagster/row_count"].value == 4 and metadata["ties"].value == 1  # "same" vs "four": a tie
    assert ref.train_rows + ref.eval_rows == metadata["preference_pairs"].value == 3
    pairs = load_pairs(ref.train_path)
    assert all(len(c) < len(r) for c, r in zip(pairs["chosen"], pairs["rejected"]))
    # an offline method trains on AI feedback only when a run is pointed at it
    assert config_from_dict("dpo", {"model": str(tiny_model_dir), "data": ref.train_path, "memory_budget_gb": 0,
                                    "output_dir": str(tmp_path / "dpo")}).data == ref.train_path
