"""The two UIs in a real browser (Selenium, headless Chromium), on the production stack the e2e test drove.

- Dagster: the asset graph shows the retrain loop's assets materialized, and the data-quality check passed;
- Dagster: the evaluation's comparison table and plots render on its asset page;
- MLflow: the registered models with their aliases.

Screenshots go to ``<artifacts>/screenshots`` (``ALIGNMENT_PIPELINES_TEST_ARTIFACTS``); with
``ALIGNMENT_PIPELINES_UPDATE_SCREENSHOTS=1`` they also replace docs/screenshots/ (the README shows those).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from production_services import (MALFORMED, ROOT, Stack, artifacts_dir, batch_key, demo_rows, drop,
                                 latest_materialization, production_stack_fixture, require, wait_until)

pytestmark = pytest.mark.integration
production_stack = pytest.fixture(scope="session")(production_stack_fixture)

CHROMIUM = os.environ.get("CHROMIUM_BINARY") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
UPDATE_ENV = "ALIGNMENT_PIPELINES_UPDATE_SCREENSHOTS"
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
# What the retrain loop materializes in the test deployment (registry scoped to SFT and DPO). ai_feedback
# (online DPO's judgements) and storage_retention (a daily schedule) are not part of it.
WINDOW = (1600, 1000)
ALL_ASSETS = {"raw_feedback", "validated_feedback", "quarantine", "preference_pairs", "binary_feedback", "prompts",
              "sft_model", "policy_dpo", "evaluation_report", "model_promotion", "ai_feedback", "storage_retention",
              "champion_watch"}
LOOP_ASSETS = ["raw_feedback", "validated_feedback", "quarantine", "preference_pairs", "binary_feedback", "prompts",
               "sft_model", "policy_dpo", "evaluation_report", "model_promotion"]


@pytest.fixture(scope="module")
def trained(production_stack: Stack) -> Stack:
    """The stack after one pass of the loop: a promotion decided. Run alone, this module drives the loop itself."""
    stack = production_stack
    if not any(stack.inbox.iterdir()):
        drop(stack.inbox, "feedback.jsonl", demo_rows(40) + MALFORMED)
    stack.wait_ready()
    instance = stack.instance()
    if not latest_materialization(instance, "model_promotion") and not stack.services["daemon"].running:
        stack.start_daemon()
    wait_until(lambda: latest_materialization(instance, "model_promotion"), 600,
               "the automation to train, evaluate and promote", on_timeout=stack.log_tails)
    return stack


@pytest.fixture(scope="module")
def browser():
    require(bool(CHROMIUM and CHROMEDRIVER), "no chromium / chromedriver (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
    except ImportError:
        require(False, "selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service as ChromeService

    profile = tempfile.mkdtemp(prefix="alignment-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    logs = artifacts_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    service = ChromeService(executable_path=CHROMEDRIVER, log_output=str(logs / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)  # Selenium Manager is not consulted: paths given
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            service.stop()
            shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name: str) -> Path:
    folder = artifacts_dir() / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get(UPDATE_ENV):
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOTS / path.name)
    return path


def page_text(driver) -> str:
    return driver.find_element("tag name", "body").text


def wait_for_text(driver, *texts: str, timeout: float = 60) -> str:
    def shown():
        body = page_text(driver)
        return body if all(t in body for t in texts) else None

    return wait_until(shown, timeout, f"the page to show {texts}", interval=0.5,
                      on_timeout=lambda: page_text(driver)[:3000])


def click_text(driver, text: str) -> None:
    element = wait_until(lambda: driver.find_elements("xpath", f"//*[normalize-space(text())='{text}']"), 30,
                         f"{text!r} on the page")[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def close_dialogs(driver) -> None:
    """MLflow greets a new browser with an announcement and an assistant panel: close them for the picture."""
    for _ in range(3):
        for button in driver.find_elements("css selector", "button[aria-label='Close']"):
            try:
                button.click()
            except Exception:  # hidden or covered: the next round gets it
                pass
        time.sleep(0.5)


def settle(seconds: float = 1.0) -> None:
    """Let the page finish its transitions (graph layout, dialogs, fonts) before a screenshot."""
    time.sleep(seconds)


def test_dagster_shows_every_loop_asset_materialized_and_the_check_passed(trained: Stack, browser):
    import dagster as dg

    stack = trained
    instance = stack.instance()
    good = batch_key(instance, "feedback.jsonl-")

    # The catalog: every asset of the loop materialized (the partitioned ones in all their partitions). The
    # table renders only the rows in view: a tall window holds them all.
    browser.set_window_size(1600, 1400)
    browser.get(f"{stack.dagster_url}/assets")

    def statuses() -> dict[str, str] | None:
        """Each loop asset's catalog row (the lines from its name to the next asset's), once all have loaded."""
        lines = page_text(browser).splitlines()
        starts = {line.strip(): i for i, line in enumerate(lines) if line.strip() in ALL_ASSETS}
        if not set(LOOP_ASSETS) <= set(starts):
            return None
        bounds = sorted(starts.values()) + [len(lines)]
        rows = {name: "\n".join(lines[at:next(b for b in bounds if b > at)]) for name, at in starts.items()}
        loaded = all("materialized" in row.lower() or "partition" in row for row in rows.values())
        return rows if loaded else None

    rows = wait_until(statuses, 60, "the catalog's statuses", on_timeout=lambda: page_text(browser)[:3000])
    for name in LOOP_ASSETS:
        assert "Never materialized" not in rows[name], rows[name]
        assert "Materialized" in rows[name] or "All" in rows[name], rows[name]
    settle()
    screenshot(browser, "dagster-asset-catalog")
    browser.set_window_size(*WINDOW)

    # The loop as a graph: everything upstream of the promotion.
    browser.get(f"{stack.dagster_url}/assets/model_promotion?view=lineage&lineageScope=upstream&lineageDepth=10")
    wait_for_text(browser, "raw_feedback", "preference_pairs", "sft_model", "policy_dpo", "evaluation_report")
    settle(2)
    screenshot(browser, "dagster-asset-lineage")

    # The data-quality check: passed on the good batch (failed on the junk one, when the e2e test dropped it).
    browser.get(f"{stack.dagster_url}/assets/validated_feedback?view=checks")
    wait_for_text(browser, "validated_feedback_expectations", "blocking")
    click_text(browser, "Execution history")
    lines = wait_for_text(browser, good).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(good))
    assert lines[at - 3] == "Passed", lines[max(0, at - 12):at + 2]  # result, timestamp, target, partition
    assert instance.event_log_storage.get_asset_check_partition_info(
        [dg.AssetCheckKey(dg.AssetKey("validated_feedback"), "validated_feedback_expectations")],
        partition_keys=[good])[0].latest_execution_status.value == "SUCCEEDED"
    settle()
    screenshot(browser, "dagster-data-quality-check")


def test_dagster_evaluation_page_renders_the_comparison_and_plots(trained: Stack, browser):
    stack = trained
    browser.get(f"{stack.dagster_url}/assets/evaluation_report")
    wait_for_text(browser, "comparison", "policy_dpo", "preference accuracy")
    tables = browser.find_elements("css selector", "table")
    assert any("policy_dpo" in t.text and "sft_model" in t.text and "win-rate" in t.text for t in tables), \
        [t.text[:200] for t in tables]
    comparison = browser.find_element("xpath", "//*[normalize-space(text())='comparison']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", comparison)
    settle()
    screenshot(browser, "dagster-evaluation-comparison")

    # The report (markdown with the plots embedded as PNGs) opens from its metadata row.
    click_text(browser, "[Show Markdown]")
    dialog = wait_until(lambda: browser.find_elements("css selector", "[role=dialog]"), 30, "the report dialog")[0]
    plots = wait_until(lambda: [img for img in dialog.find_elements("css selector", "img")
                                if (img.get_attribute("src") or "").startswith("data:image/png") and
                                browser.execute_script("return arguments[0].complete && "
                                                       "arguments[0].naturalWidth > 0", img)],
                       30, "the report's plots to render")
    assert len(plots) >= 2, len(plots)
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", plots[0])
    settle()
    screenshot(browser, "dagster-evaluation-report")


def test_mlflow_shows_registered_models_and_aliases(trained: Stack, browser):
    stack = trained
    client = stack.mlflow_client()
    aliases = {m.name: m.aliases for m in client.search_registered_models()}
    assert {"sft_model", "policy_dpo"} <= set(aliases) and all("candidate" in a for a in aliases.values()), aliases

    browser.get(f"{stack.mlflow_uri}/#/models")
    wait_for_text(browser, "Registered Models", *aliases)
    close_dialogs(browser)
    body = wait_for_text(browser, "Aliased versions", "candidate")
    for alias in {a for model_aliases in aliases.values() for a in model_aliases}:
        assert alias in body, alias
    settle()
    screenshot(browser, "mlflow-registered-models")

    browser.get(f"{stack.mlflow_uri}/#/models/policy_dpo")
    wait_for_text(browser, "policy_dpo", "Version 1", "candidate", "lineage.method")
    close_dialogs(browser)
    settle()
    screenshot(browser, "mlflow-model-aliases")
