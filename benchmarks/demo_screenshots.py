"""The README's screenshots of a finished demo: its evaluation page and promotion in Dagster, its registry in MLflow.

Serves the instance a finished `alignment-pipelines demo` left (``DIR/dagster_home`` or ``DIR/home`` as DAGSTER_HOME,
``DIR/data`` as its data root, the layout benchmarks/demo.py writes) with the Dagster webserver and the MLflow UI on
free loopback ports, photographs both in headless Chromium at 1600x1000, and stops the servers again:

    python benchmarks/demo.py --workdir /tmp/demo-bench                  # the demo, as a user runs it
    python benchmarks/demo_screenshots.py --instance /tmp/demo-bench     # then docs/screenshots/demo-*.png

Needs chromium and chromedriver (apt-get install chromium chromium-driver) and selenium (pip install selenium).
Run it with the code that wrote the instance (PYTHONPATH), so the webserver reads the instance as it was written.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WINDOW = (1600, 1000)
ALIGNED_MODEL = "aligned_policy"
CHAMPION = "champion"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 1.0,
               detail: Callable[[], str] = lambda: ""):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail()}")
        time.sleep(interval)
    return value


def http_get(url: str, data: bytes | None = None, timeout: float = 5.0) -> bytes | None:
    """The body of a 2xx answer, or None while the server is not (yet) answering."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.read() if 200 <= reply.status < 300 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


@contextmanager
def server(name: str, argv: list[str], env: dict, logs: Path):
    """One server in its own process group, logging to ``logs/<name>.log``; the whole group is stopped on exit."""
    log_path = logs / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield lambda: f"--- {log_path} (tail) ---\n" + log_path.read_text(errors="replace")[-3000:]
    finally:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            if process.poll() is not None:
                break
            try:
                os.killpg(process.pid, sig)
                process.wait(grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def instance_layout(folder: Path) -> tuple[Path, Path]:
    """(DAGSTER_HOME, data root) of a demo's folder, or a clear error naming what is missing."""
    homes = [folder / name for name in ("dagster_home", "home") if (folder / name).is_dir()]
    if not homes:
        raise SystemExit(f"{folder}: no dagster_home/ or home/ (the DAGSTER_HOME of a finished demo)")
    if not (folder / "data").is_dir():
        raise SystemExit(f"{folder}/data: missing (the demo's data root, ALIGNMENT_PIPELINES_HOME)")
    return homes[0], folder / "data"


def dagster_loaded(url: str) -> bool:
    """The webserver answers and has loaded the code location (not a load error)."""
    query = "{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError { __typename } } } } }"
    body = http_get(f"{url}/graphql", json.dumps({"query": query}).encode())
    if body is None:
        return False
    entries = (json.loads(body).get("data") or {}).get("workspaceOrError", {}).get("locationEntries") or []
    return any((e["locationOrLoadError"] or {}).get("__typename") == "RepositoryLocation" for e in entries)


def browser(stack: ExitStack):
    """Headless Chromium at the screenshots' size, with a throwaway profile (no first-run or sync noise)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    chromium = os.environ.get("CHROMIUM_BINARY") or shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not (chromium and chromedriver):
        raise SystemExit("no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)")
    profile = stack.enter_context(tempfile.TemporaryDirectory(prefix="demo-screenshots-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = ChromeService(executable_path=chromedriver)  # paths given: Selenium Manager is not consulted
    driver = webdriver.Chrome(service=service, options=options)
    stack.callback(service.stop)
    stack.callback(driver.quit)
    driver.set_page_load_timeout(60)
    set_scale(driver, 1.0)
    return driver


def page_text(driver) -> str:
    return driver.find_element("tag name", "body").text


def wait_for_text(driver, *texts: str, timeout: float = 90) -> str:
    def shown() -> str | None:
        body = page_text(driver)
        return body if all(text in body for text in texts) else None

    return wait_until(shown, timeout, f"{driver.current_url} to show {texts}", interval=0.5,
                      detail=lambda: page_text(driver)[:3000])


def element_with_text(driver, text: str):
    """The first element whose own text is ``text``."""
    return wait_until(lambda: driver.find_elements("xpath", f"//*[normalize-space(text())='{text}']"), 30,
                      f"{text!r} on {driver.current_url}")[0]


def scroll_to(driver, element, block: str = "start") -> None:
    driver.execute_script(f"arguments[0].scrollIntoView({{block: '{block}'}})", element)


def close_dialogs(driver) -> None:
    """Both UIs greet a new browser: Dagster with a community sign-up (Skip), MLflow with an announcement and an
    assistant panel (Close). Close them for the picture."""
    for _ in range(3):
        for button in driver.find_elements("xpath", "//button[@aria-label='Close'] | "
                                                    "//*[@role='dialog']//button[normalize-space(.)='Skip']"):
            try:
                button.click()
            except Exception:  # hidden or covered: the next round gets it
                pass
        time.sleep(0.5)


def set_scale(driver, scale: float) -> None:
    """Pictures of WINDOW's size in pixels, showing a page laid out for a window ``1 / scale`` times as large (the
    viewport itself is set: a headless window's size would include its absent browser chrome)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": round(WINDOW[0] / scale), "height": round(WINDOW[1] / scale), "deviceScaleFactor": scale,
        "mobile": False})


def zoom_to_fit(driver, top: str, bottom: str) -> None:
    """Scroll the row named ``top`` to the top of the view and zoom out (to 70% at most) until the row named
    ``bottom`` ends inside it: a gate's verdicts on many methods are taller than the window."""
    for scale in (1.0, 0.9, 0.8, 0.7):
        set_scale(driver, scale)
        time.sleep(0.5)
        scroll_to(driver, element_with_text(driver, top))
        time.sleep(0.5)
        if driver.execute_script("return arguments[0].getBoundingClientRect().bottom <= window.innerHeight",
                                 element_with_text(driver, bottom)):
            return


def save(driver, path: Path, settle: float = 1.5) -> Path:
    """After the page's transitions (layout, fonts, dialogs closing) have finished."""
    time.sleep(settle)
    driver.save_screenshot(str(path))
    return path


def dagster_pages(driver, url: str, out: Path) -> list[Path]:
    # The evaluation's asset page with its report (markdown in the latest materialization's metadata) open: which
    # judge judged, then the comparison table (win-rate vs. sft_model with its interval, per method), then the plots.
    driver.get(f"{url}/assets/evaluation_report")
    wait_for_text(driver, "comparison", "win-rate", "sft_model", "[Show Markdown]")
    close_dialogs(driver)
    driver.find_element("xpath", "//button[normalize-space(.)='Hide navigation']").click()  # wider metadata
    show = element_with_text(driver, "[Show Markdown]")
    scroll_to(driver, show, "center")
    show.click()
    table = wait_until(lambda: driver.find_elements("css selector", "[role=dialog] table"), 30, "the report's table")
    scroll_to(driver, table[0], "center")  # the judge's line above it stays in view
    evaluation = save(driver, out / "demo-evaluation-report.png")

    # The promotion's asset page: the gate's action, its verdict on each candidate, and the champion it seated.
    # Long values (reasons, paths) wrap inside their cells instead of running past the table's edge.
    driver.get(f"{url}/assets/model_promotion")
    wait_for_text(driver, "action", "verdicts", "champion_source_uri")
    close_dialogs(driver)
    driver.execute_script("const style = document.createElement('style');"
                          "style.textContent = 'td, td * { overflow-wrap: anywhere; }';"
                          "document.head.appendChild(style);")
    zoom_to_fit(driver, "Metadata", "champion_source_uri")
    promotion = save(driver, out / "demo-promotion.png")
    set_scale(driver, 1.0)
    return [evaluation, promotion]


def mlflow_pages(driver, url: str, out: Path) -> list[Path]:
    # Every registered model with its aliased versions: aligned_policy@champion and the per-method models.
    driver.get(f"{url}/#/models")
    wait_for_text(driver, "Registered Models", ALIGNED_MODEL, f"@ {CHAMPION}")
    close_dialogs(driver)
    registry = save(driver, out / "demo-mlflow-registry.png")

    # aligned_policy's page: the version holding the champion alias, its tags naming the source (source.uri).
    driver.get(f"{url}/#/models/{ALIGNED_MODEL}")
    wait_for_text(driver, ALIGNED_MODEL, f"@ {CHAMPION}", "source.uri")
    close_dialogs(driver)
    return [registry, save(driver, out / "demo-mlflow-champion.png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instance", type=Path, required=True,
                        help="a finished demo's folder: dagster_home/ (or home/) and data/")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="where the PNGs go")
    args = parser.parse_args()
    home, data = instance_layout(args.instance.resolve())
    env = os.environ | {"DAGSTER_HOME": str(home), "ALIGNMENT_PIPELINES_HOME": str(data), "HF_HUB_OFFLINE": "1",
                        "MLFLOW_ENABLE_TELEMETRY": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_store = subprocess.run([str(BIN / "alignment-pipelines"), "where", "mlflow-uri"], env=env, check=True,
                                  capture_output=True, text=True).stdout.strip()
    dagster_url, mlflow_url = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    args.out.mkdir(parents=True, exist_ok=True)

    with ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="demo-screenshots-logs-")))
        dagster_log = stack.enter_context(server("dagster-webserver", [
            str(BIN / "dagster-webserver"), "-m", "alignment_pipelines.definitions",
            "-h", "127.0.0.1", "-p", dagster_url.rsplit(":", 1)[1]], env, logs))
        mlflow_log = stack.enter_context(server("mlflow", [
            str(BIN / "mlflow"), "ui", "--backend-store-uri", mlflow_store,
            "--host", "127.0.0.1", "--port", mlflow_url.rsplit(":", 1)[1]], env, logs))
        wait_until(lambda: dagster_loaded(dagster_url), 300, "the Dagster webserver to load the code", 2, dagster_log)
        wait_until(lambda: http_get(f"{mlflow_url}/health"), 120, "the MLflow UI to answer", 1, mlflow_log)
        driver = browser(stack)
        paths = dagster_pages(driver, dagster_url, args.out) + mlflow_pages(driver, mlflow_url, args.out)
    print("\n".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
