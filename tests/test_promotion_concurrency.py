"""Nothing decided is lost, against a real `mlflow server` on 127.0.0.1: two promotions at once end with one champion
and the right history; the server dying (SIGKILL) at the alias move leaves the rollback bar in place; the command
line waits for a promotion another process is making."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading

import pytest

from alignment_pipelines import promotion
from alignment_pipelines.cli import main
from alignment_pipelines.promotion import (ALIGNED_MODEL, StaleEvaluation, current_champion, promote_from_report,
                                           rollback_champion)
from alignment_pipelines.tracking import Tracker
from mlflow_server import FAIL_FAST_ENV, MlflowServer
from test_cli_errors import one_line_error
from test_promotion import FIRST, candidate, register, report

DPO_FIRST = FIRST | {"policy_orpo": candidate(vs_champion=None, vs_sft=(0.6, 0.45, 0.7))}
# Measured against champion 1 (dpo): kto beats it in one evaluation, orpo in another.
KTO_WINS = {"policy_kto": candidate(vs_champion=(0.80, 0.62, 0.90)),
            "policy_orpo": candidate(vs_champion=(0.50, 0.40, 0.60))}
ORPO_WINS = {"policy_kto": candidate(vs_champion=(0.50, 0.40, 0.60)),
             "policy_orpo": candidate(vs_champion=(0.85, 0.70, 0.93))}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FAIL_FAST_ENV.items():
            patch.setenv(name, value)
        server = MlflowServer(tmp_path_factory.mktemp("promotion-server")).start()
        yield server
        server.stop()


@pytest.fixture
def registry(server, request, tmp_path):
    """Four registered policies (one folder each) and dpo as the first champion, under model names of this test."""
    tracker = Tracker(server.uri, experiment=request.node.name)
    refs = {}
    for name in ("sft_model", "policy_dpo", "policy_kto", "policy_orpo"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "weights.txt").write_text(name)
        refs[name] = register(tracker, name, folder)
    first = promote_from_report(tracker.client, report(refs, DPO_FIRST), actor="alice")
    assert first["champion"]["source_uri"] == "models:/policy_dpo/1"
    return tracker, refs, first["champion"]["version"]


@pytest.fixture(autouse=True)
def fresh_aligned_model(server):
    """Each test starts without an `aligned_policy` (the registered model every promotion writes to)."""
    client = Tracker(server.uri).client
    if client.search_registered_models(f"name='{ALIGNED_MODEL}'"):
        client.delete_registered_model(ALIGNED_MODEL)
    for name in ("sft_model", "policy_dpo", "policy_kto", "policy_orpo"):
        if client.search_registered_models(f"name='{name}'"):
            client.delete_registered_model(name)


def test_two_promotions_at_once_end_with_one_champion_and_the_right_history(registry):
    tracker, refs, champion = registry
    meeting = threading.Barrier(2, timeout=5)  # holds each alias move until the other promotion gets there too
    outcomes: dict[str, object] = {}

    def promote_in_thread(actor: str, metrics: dict):
        client = Tracker(tracker.tracking_uri).client  # a client of its own, as another process would have
        move = client.set_registered_model_alias

        def move_when_both_are_ready(*args):
            try:
                meeting.wait()
            except threading.BrokenBarrierError:  # the other one never got here: it waited for this one
                pass
            return move(*args)

        client.set_registered_model_alias = move_when_both_are_ready
        try:
            outcomes[actor] = promote_from_report(client, report(refs, metrics, "policy_dpo", champion), actor)
        except StaleEvaluation as error:
            outcomes[actor] = error

    threads = [threading.Thread(target=promote_in_thread, args=(actor, metrics))
               for actor, metrics in (("bob", KTO_WINS), ("carol", ORPO_WINS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    promoted = {actor: o for actor, o in outcomes.items() if isinstance(o, dict)}
    refused = {actor: o for actor, o in outcomes.items() if isinstance(o, StaleEvaluation)}
    assert len(promoted) == 1 and len(refused) == 1, outcomes  # one moved; the other was measured against 1
    [(winner, outcome)] = promoted.items()
    assert "re-run the evaluation" in str(next(iter(refused.values())))
    client = tracker.client
    now = current_champion(client)
    assert now == outcome["champion"] and now["source_uri"] == f"models:/{outcome['chosen']}/1"
    versions = {str(v.version): v.tags for v in client.search_model_versions(f"name='{ALIGNED_MODEL}'")}
    assert sorted(versions) == [champion, now["version"]]  # the refused one created nothing
    assert versions[now["version"]]["promotion.previous_champion"] == champion
    assert versions[now["version"]]["promotion.actor"] == winner and "promotion.pending" not in versions[now["version"]]
    assert rollback_champion(client, "dave")["restored"]["version"] == champion


def test_the_registry_dying_at_the_alias_move_keeps_the_rollback_bar(registry, server):
    tracker, refs, champion = registry
    client = tracker.client
    kto_wins = report(refs, KTO_WINS, "policy_dpo", champion)
    kto = promote_from_report(client, kto_wins, actor="bob")["champion"]["version"]
    rollback_champion(client, "carol", "complaints")  # kto is barred: the same evidence must not bring it back
    barred = {k: v for k, v in client.get_model_version(ALIGNED_MODEL, kto).tags.items() if k.startswith("rollback.")}
    assert barred["rollback.reason"] == "complaints"

    def die_at_the_move(*args):
        server.kill()
        return move(*args)

    move = client.set_registered_model_alias
    client.set_registered_model_alias = die_at_the_move
    with pytest.raises(Exception, match="API request"):
        promote_from_report(client, kto_wins, actor="erin", readmit_rolled_back=True)
    server.start()
    client = Tracker(server.uri).client
    assert current_champion(client)["version"] == champion
    tags = client.get_model_version(ALIGNED_MODEL, kto).tags
    assert {k: v for k, v in tags.items() if k.startswith("rollback.")} == barred
    again = promote_from_report(client, kto_wins, actor="frank")  # no readmission: the bar holds
    assert again["chosen"] is None and current_champion(client)["version"] == champion
    assert again["verdicts"]["policy_kto"]["reason"].startswith("refused: rolled back by carol (complaints)")


HOLD_THE_LOCK = textwrap.dedent("""
    import sys
    from mlflow import MlflowClient
    from alignment_pipelines.promotion import registry_lock

    with registry_lock(MlflowClient(tracking_uri=sys.argv[1])):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


def test_the_command_line_waits_for_a_promotion_another_process_is_making(registry, monkeypatch, capsys):
    tracker, refs, champion = registry
    promote_from_report(tracker.client, report(refs, KTO_WINS, "policy_dpo", champion), actor="bob")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, tracker.tracking_uri], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(promotion, "LOCK_TIMEOUT_SECONDS", 1.0)
        capsys.readouterr()  # MLflow's own log lines from the promotion above
        assert main(["rollback", "--tracking-uri", tracker.tracking_uri, "--actor", "dave"]) == 1
        assert re.search("another promotion or rollback .* has held", one_line_error(capsys, "rollback"))
        assert current_champion(tracker.client)["version"] != champion  # nothing moved
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert main(["rollback", "--tracking-uri", tracker.tracking_uri, "--actor", "dave"]) == 0
    assert current_champion(tracker.client)["version"] == champion
