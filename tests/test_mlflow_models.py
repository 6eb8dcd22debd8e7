"""Registered versions are MLflow models: MLflow's own clients load them by alias, serve them and score with them."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
import urllib.error
import urllib.request

import mlflow
import pandas as pd
import pytest
import torch

from alignment_pipelines.layout import DataRoot
from alignment_pipelines.methods import run_training
from alignment_pipelines.methods.dpo import DPOMethodConfig
from alignment_pipelines.methods.sft import SFTMethodConfig
from alignment_pipelines.models.loading import WeightsMismatchError, load_model, read_model_card, safetensors_sha256
from alignment_pipelines.models.registry import export_model, fetch_model, weights_sha256
from alignment_pipelines.tracking import Lineage, Tracker

CHAT = {"messages": [{"role": "user", "content": "Tell me about tea."}], "max_tokens": 8}
TOPICS = "tea coffee water bread rice apple garden city river book".split()


def synthetic_pairs(n: int = 24, seed: int = 0) -> pd.DataFrame:
    """A clear preference: chosen answers say "marker", rejected ones do not."""
    rng = random.Random(seed)
    return pd.DataFrame([{"prompt": [{"role": "user", "content": f"Tell me about {a} and {b}."}],
                          "chosen": f"marker {a} is good marker.", "rejected": f"{b} is bad."}
                         for a, b in (rng.sample(TOPICS, 2) for _ in range(n))])


def lineage(method: str, parent: str | None = None) -> Lineage:
    return Lineage(method=method, base_model="tiny:tiny-random", dataset_version="d1", batches=("b1",),
                   parent_model=parent)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    """SFT (LoRA on the tiny base) and DPO (LoRA on SFT's registered adapter), both registered as candidates."""
    root = tmp_path_factory.mktemp("registry")
    pairs = root / "pairs.parquet"
    synthetic_pairs().to_parquet(pairs)
    tracker = Tracker(DataRoot(root).ensure().local_tracking_uri, artifact_root=root / "artifacts")
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    saved_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracker.tracking_uri)
    mlflow.set_registry_uri(tracker.tracking_uri)
    common = {"data": str(pairs), "max_steps": 2, "learning_rate": 1e-2, "max_length": 64, "disable_tqdm": True}
    run_training("sft", SFTMethodConfig(model=str(tiny_model_dir), output_dir=str(root / "sft"), **common))
    sft = tracker.register_model(tracker.start_run("sft"), root / "sft", "sft_model", lineage("sft"))
    run_training("dpo", DPOMethodConfig(model=sft.path, output_dir=str(root / "dpo"), **common))
    dpo = tracker.register_model(tracker.start_run("dpo"), root / "dpo", "policy_dpo",
                                 lineage("dpo", f"models:/sft_model/{sft.version}"),
                                 start_uri=f"models:/sft_model/{sft.version}")
    yield {"tracker": tracker, "sft": sft, "dpo": dpo, "root": root, "base": tiny_model_dir}
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])
    for name, value in saved_env.items():  # set_tracking_uri also exports the URI: later tests must not inherit it
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _answer(prediction) -> str:
    choice = (prediction[0] if isinstance(prediction, list) else prediction)["choices"][0]
    return choice["message"]["content"]


def test_policies_load_by_alias_with_pyfunc_and_answer_a_chat(registry):
    for name in ("sft_model", "policy_dpo"):
        model = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
        assert isinstance(_answer(model.predict(CHAT)), str)
        assert model.metadata.signature is not None and model.metadata.saved_input_example_info is not None


def test_an_adapter_version_stores_the_adapter_and_references_the_base(registry):
    tracker, dpo, base = registry["tracker"], registry["dpo"], registry["base"]
    version = tracker.client.get_model_version("policy_dpo", dpo.version)
    assert version.description == "dpo (LoRA adapter) on tiny:tiny-random, dataset d1"
    assert version.tags["lineage.base_model_path"] == str(base)
    assert version.tags["lineage.base_model_sha256"] == weights_sha256(base)
    assert version.tags["lineage.parent_model"] == "models:/sft_model/1"
    assert "storage.depends_on" not in version.tags  # flattened onto the base: SFT's artifacts are not needed
    mlflow_dir = fetch_model("models:/policy_dpo@candidate", tracker.tracking_uri).parent
    weights = sorted(p.relative_to(mlflow_dir).as_posix() for p in mlflow_dir.rglob("*.safetensors"))
    assert weights == ["peft/adapter_model.safetensors"]
    flavor = mlflow.models.Model.load(str(mlflow_dir)).flavors["transformers"]
    assert flavor["local_base_model_path"] == str(base)
    tokenizer_config = json.loads((mlflow_dir / "components/tokenizer/tokenizer_config.json").read_text())
    assert tokenizer_config.get("chat_template") or (mlflow_dir / "components/tokenizer/chat_template.jinja").is_file()
    assert dpo.bytes < sum(p.stat().st_size for p in base.glob("*.safetensors"))


def test_flattened_adapter_and_merged_export_give_the_trained_chain_logits(registry, tmp_path):
    """The registered DPO adapter is SFT's and DPO's LoRA concatenated: the same function as DPO on merged SFT."""
    tokens = torch.tensor([[1, 5, 9, 14, 3, 7]])
    trained, _ = load_model(registry["root"] / "dpo", device="cpu")  # the run folder: DPO onto merged SFT
    registered, _ = load_model(fetch_model("models:/policy_dpo@candidate", registry["tracker"].tracking_uri),
                               device="cpu")
    exported, _ = load_model(export_model("models:/policy_dpo@candidate", tmp_path / "export",
                                          registry["tracker"].tracking_uri), device="cpu")
    assert read_model_card(tmp_path / "export")["format"] == "full"
    with torch.no_grad():
        reference = trained(tokens).logits
        assert reference.abs().max() > 0
        torch.testing.assert_close(registered(tokens).logits, reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(exported(tokens).logits, reference, rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_mlflow_models_serve_answers_a_chat_request(registry):
    port = _free_port()
    # The server starts `uvicorn` by name: the interpreter's bin folder goes first on PATH, as in an active venv.
    env = os.environ | {"MLFLOW_TRACKING_URI": registry["tracker"].tracking_uri,
                        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/policy_dpo@candidate",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "mlflow models serve did not come up in 120 s"
                time.sleep(1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(CHAT).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert isinstance(_answer(json.loads(response.read())), str)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def train_tiny_reward_model(base, target, pairs: pd.DataFrame, steps: int = 40):
    """A one-label scorer on the tiny model, trained on the pairs with the Bradley-Terry loss."""
    model, tokenizer = load_model(base, "reward", device="cpu", padding_side="right", dtype="float32")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(steps):
        batch = pairs.iloc[[(step * 4 + i) % len(pairs) for i in range(4)]]
        texts = [tokenizer.apply_chat_template(list(p) + [{"role": "assistant", "content": a}], tokenize=False)
                 for column in ("chosen", "rejected") for p, a in zip(batch["prompt"], batch[column])]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        chosen, rejected = model(**encoded).logits[:, 0].chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / "alignment_model.json").write_text(json.dumps({"role": "reward", "format": "full", "method": "reward"}))


def test_reward_model_scores_chosen_above_rejected_through_pyfunc(registry, tmp_path):
    tracker = registry["tracker"]
    train, held_out = synthetic_pairs(32, seed=1), synthetic_pairs(8, seed=2)
    train_tiny_reward_model(registry["base"], tmp_path / "reward", train)
    tracker.register_model(tracker.start_run("reward"), tmp_path / "reward", "reward_model", lineage("reward"))
    scorer = mlflow.pyfunc.load_model("models:/reward_model@candidate")
    prompts = [p[0]["content"] for p in held_out["prompt"]]  # the signature's prompt: one user turn
    chosen = scorer.predict(pd.DataFrame({"prompt": prompts, "answer": held_out["chosen"]}))["score"]
    rejected = scorer.predict(pd.DataFrame({"prompt": prompts, "answer": held_out["rejected"]}))["score"]
    wins = (chosen.to_numpy() > rejected.to_numpy()).mean()
    print(f"reward model: chosen above rejected on {wins:.0%} of held-out pairs")
    assert wins >= 0.875


def test_export_and_load_refuse_weights_that_changed_after_registration(registry, tmp_path):
    tracker = registry["tracker"]
    copy = tracker.register_model(tracker.start_run("copy"), registry["root"] / "sft", "sft_copy", lineage("sft"))
    uri, folder = f"models:/sft_copy/{copy.version}", Path(copy.path)
    recorded = tracker.client.get_model_version("sft_copy", copy.version).tags["storage.weights_sha256"]
    assert recorded == safetensors_sha256(folder) == read_model_card(folder)["weights_sha256"]
    assert read_model_card(folder)["parent_sha256"] == weights_sha256(registry["base"])
    load_model(fetch_model(uri, tracker.tracking_uri), device="cpu")  # as registered, it loads

    weights = folder / "adapter_model.safetensors"
    flipped = bytearray(weights.read_bytes())
    flipped[-1] ^= 0x01  # one bit of the last tensor: still a valid safetensors file
    weights.write_bytes(bytes(flipped))
    with pytest.raises(WeightsMismatchError, match=f"recorded {recorded}"):
        load_model(folder, device="cpu")
    with pytest.raises(WeightsMismatchError, match=f"recorded {recorded}"):
        export_model(uri, tmp_path / "export", tracker.tracking_uri)
    assert not (tmp_path / "export" / "model.safetensors").exists()

    card = read_model_card(folder) | {"weights_sha256": safetensors_sha256(folder)}  # the card rewritten to match
    (folder / "alignment_model.json").write_text(json.dumps(card))
    load_model(folder, device="cpu")  # the folder agrees with itself now, but not with the registry
    with pytest.raises(WeightsMismatchError, match=f"registry recorded weights sha256 {recorded}"):
        fetch_model(uri, tracker.tracking_uri)
    with pytest.raises(WeightsMismatchError):
        export_model(uri, tmp_path / "export", tracker.tracking_uri)


def test_an_export_records_the_hash_of_its_own_weights(registry, tmp_path):
    exported = export_model("models:/policy_dpo@candidate", tmp_path / "export", registry["tracker"].tracking_uri)
    card = read_model_card(exported)
    assert card["weights_sha256"] == safetensors_sha256(exported) and "parent_sha256" not in card
    load_model(exported, device="cpu")
