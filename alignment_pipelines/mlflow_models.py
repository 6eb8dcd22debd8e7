"""Trained model folders as MLflow models, so MLflow's own clients load, serve and describe them.

- A policy with full weights: the transformers flavor, task ``llm/v1/chat`` (chat in, chat completion out).
- A policy trained with LoRA: the transformers flavor's PEFT form. Only the adapter is stored; the base is
  referenced by its local path (``base_model_path``), never copied. MLflow applies one adapter to a plain
  base, so an adapter trained on another adapter (DPO on a LoRA SFT) is flattened first: LoRA updates add
  up, so the chain concatenated along the rank (PEFT's exact ``cat`` combination) is one adapter on the
  chain's first full model.
- A reward or value model: a small pyfunc that scores (prompt, answer) rows with the project's loader,
  because no transformers task scores a pair.

Each MLflow model keeps the project's folder inside it with its card (``alignment_model.json``), which is
what ``models.registry.fetch_model`` returns and the project's ``load_model`` loads.
"""

from __future__ import annotations

import json
from importlib.metadata import version as installed_version
from pathlib import Path

import pandas as pd
from mlflow.pyfunc import PythonModel

from alignment_pipelines.models.loading import (MODEL_CARD, PARENT_SHA256_KEY, WEIGHTS_SHA256_KEY, adapter_parent,
                                                auto_model_class, is_adapter_folder, read_model_card,
                                                safetensors_sha256)
from alignment_pipelines.models.registry import weights_sha256

CHAT_TASK = "llm/v1/chat"
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "How do I reverse a list in Python?"}], "max_tokens": 32}
SCORE_EXAMPLE = pd.DataFrame({"prompt": ["How do I reverse a list in Python?"],
                              "answer": ["Use `items[::-1]`, or `items.reverse()` to reverse in place."]})
# Pinned to what is installed; MLflow's own guess for transformers names torchvision, which is not a dependency.
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "pandas")


def pip_requirements() -> list[str]:
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in REQUIREMENTS]


def adapter_chain(folder: str | Path) -> tuple[Path, list[Path]]:
    """(first full model, adapters from the one on it to ``folder``) for an adapter; (folder, []) for a full model."""
    chain: list[Path] = []
    current = Path(folder)
    while is_adapter_folder(current):
        chain.insert(0, current)
        current = adapter_parent(current)
    return current, chain


def is_scorer(card: dict) -> bool:
    return card.get("role") in ("reward", "value")


def base_of(model_dir: str | Path) -> Path | None:
    """The full model the logged MLflow model will reference instead of copying (None: it holds full weights).

    A policy adapter is flattened onto the first full model of its chain; a scorer keeps its own start model."""
    if not is_adapter_folder(model_dir):
        return None
    return adapter_parent(model_dir) if is_scorer(read_model_card(model_dir)) else adapter_chain(model_dir)[0]


def save_mlflow_model(model_dir: str | Path, path: str | Path, metadata: dict | None = None,
                      parent_uri: str | None = None) -> str:
    """Write ``model_dir`` (a trained folder) as an MLflow model at ``path``; its format, "adapter" or "full".

    ``parent_uri`` is the registered version holding the base an adapter references, recorded in the card so
    that a downloaded copy can fetch its base too. The card records the sha256 of the weights written (and of the
    base an adapter loads onto), which every load checks (``loading.verify_weights``)."""
    model_dir, path = Path(model_dir), Path(path)
    card = {"role": "policy", "format": "full"} | read_model_card(model_dir)
    metadata = {"alignment_pipelines": {**card, **(metadata or {})}}
    if is_scorer(card):
        folder = _save_scorer(model_dir, path, metadata)
    elif is_adapter_folder(model_dir):
        folder = _save_adapter_policy(model_dir, path, card["role"], metadata)
    else:
        folder = _save_full_policy(model_dir, path, card["role"], metadata)
    base = base_of(model_dir)
    card |= {"parent": str(base) if base else None, "parent_uri": parent_uri,
             WEIGHTS_SHA256_KEY: safetensors_sha256(folder), PARENT_SHA256_KEY: weights_sha256(base) if base else None}
    (folder / MODEL_CARD).write_text(json.dumps(card, indent=2))
    return "adapter" if base else "full"


def _save_full_policy(model_dir: Path, path: Path, role: str, metadata: dict) -> Path:
    """Through the loaded model: MLflow's save from a checkpoint folder fails with transformers 5 (MLflow 3.17)."""
    import mlflow.transformers

    from alignment_pipelines.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = auto_model_class(role).from_pretrained(model_dir, dtype="auto", use_safetensors=True)
    mlflow.transformers.save_model({"model": model, "tokenizer": tokenizer}, path=str(path), task=CHAT_TASK,
                                   input_example=CHAT_EXAMPLE, metadata=metadata, pip_requirements=pip_requirements())
    tokenizer.save_pretrained(path / "model")  # the folder loads on its own with the project's loader too
    return path / "model"


def _save_adapter_policy(model_dir: Path, path: Path, role: str, metadata: dict) -> Path:
    import mlflow.transformers

    from alignment_pipelines.models.loading import load_tokenizer

    base, chain = adapter_chain(model_dir)
    mlflow.transformers.save_model({"model": flattened_adapter(base, chain, role),
                                    "tokenizer": load_tokenizer(model_dir)}, path=str(path),
                                   task=CHAT_TASK, input_example=CHAT_EXAMPLE, base_model_path=str(base),
                                   metadata=metadata, pip_requirements=pip_requirements())
    return path / "peft"


def flattened_adapter(base: Path, chain: list[Path], role: str):
    """``chain`` (adapters stacked on ``base``) as one PEFT adapter named ``default`` on ``base``."""
    from peft import PeftModel

    model = auto_model_class(role).from_pretrained(base, dtype="auto", use_safetensors=True)
    if len(chain) == 1:
        return PeftModel.from_pretrained(model, chain[0])
    names = [f"stacked_{i}" for i in range(len(chain))]
    model = PeftModel.from_pretrained(model, chain[0], adapter_name=names[0])
    for name, folder in zip(names[1:], chain[1:]):
        model.load_adapter(folder, adapter_name=name)
    model.add_weighted_adapter(names, [1.0] * len(names), "default", combination_type="cat")
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    return model


class PairScorer(PythonModel):
    """A pyfunc over a reward (or value) model: a frame of ``prompt`` and ``answer`` in, one score per row out."""

    def load_context(self, context):
        from alignment_pipelines.methods.rewards import reward_model_reward
        from alignment_pipelines.models.loading import load_model, model_role

        folder = context.artifacts["model"]
        model, tokenizer = load_model(folder, model_role(folder, "reward"), device="cpu", padding_side="right")
        self.score = reward_model_reward(model, tokenizer)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        scores = self.score(prompts=list(model_input["prompt"]), completions=list(model_input["answer"]))
        return pd.DataFrame({"score": scores})


def _save_scorer(model_dir: Path, path: Path, metadata: dict) -> Path:
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    signature = infer_signature(SCORE_EXAMPLE, pd.DataFrame({"score": [0.0]}))
    mlflow.pyfunc.save_model(str(path), python_model=PairScorer(), artifacts={"model": str(model_dir)},
                             signature=signature, input_example=SCORE_EXAMPLE, metadata=metadata,
                             pip_requirements=pip_requirements())
    from mlflow.models import Model
    from mlflow.pyfunc.model import CONFIG_KEY_ARTIFACT_RELATIVE_PATH, CONFIG_KEY_ARTIFACTS

    artifacts = Model.load(str(path)).flavors["python_function"][CONFIG_KEY_ARTIFACTS]
    return path / artifacts["model"][CONFIG_KEY_ARTIFACT_RELATIVE_PATH]
