"""The UI only its users drive: real dagster-webservers (one full, one --read-only) behind the real Caddy proxy that
compose runs (deploy/proxy/Caddyfile, started by deploy/proxy/start.sh), all on 127.0.0.1.

The attacks are the ones a page in the operator's browser can make (the browser adds the cached login to them):
a GraphQL mutation as a bodyless GET, as a text/plain POST with the query in the URL, a form POST, a JSON POST from
a foreign Origin or marked cross-site, and a DNS-rebound Host. Each is refused and the mutation did not run (the
dynamic partition it adds is absent), while the same GET sent to the webserver directly does add one: the proxy is
what stops them. The viewer's read-only webserver refuses the mutation even from its own user. And the guard lets
the real UI through: headless Chromium, logged in, loads it with no request refused.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time

import dagster as dg
import pytest
import requests

from tests.production_services import BIN, DEPLOY, Service, free_port, http_ok, require, wait_until

LOCATION = "ui_proxy_test"
OPERATOR = ("operator", "operator-password-1")
VIEWER = ("viewer", "viewer-password-2")


def add_partition(key: str) -> str:
    return ('mutation { addDynamicPartition(repositorySelector: {repositoryLocationName: "%s", repositoryName: '
            '"__repository__"}, partitionsDefName: "batches", partitionKey: "%s") { __typename } }' % (LOCATION, key))


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(proxy ports, direct webserver URL, the instance) with both webservers and the proxy running."""
    require(shutil.which("caddy") is not None, "caddy is not installed (apt-get install caddy)")
    work = tmp_path_factory.mktemp("ui_proxy")
    home = work / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (work / "defs.py").write_text(textwrap.dedent("""
        import dagster as dg

        @dg.asset(partitions_def=dg.DynamicPartitionsDefinition(name="batches"))
        def batch() -> None: ...

        defs = dg.Definitions(assets=[batch])
    """))
    (work / "workspace.yaml").write_text(
        f"load_from:\n  - python_file:\n      relative_path: defs.py\n      location_name: {LOCATION}\n")
    instance = dg.DagsterInstance.from_config(str(home))  # its tables, before two webservers race to create them
    ports = {name: free_port() for name in ("full", "read_only", "operator", "viewer")}
    env = {"DAGSTER_HOME": str(home), "PATH": f"{BIN}:/usr/bin:/bin", "DAGSTER_DISABLE_TELEMETRY": "1",
           "XDG_DATA_HOME": str(work / "caddy"), "XDG_CONFIG_HOME": str(work / "caddy"), "HOME": str(work)}
    logs = work / "logs"
    services = [
        Service("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(ports["full"]),
                              "-w", str(work / "workspace.yaml")], logs, env, cwd=work),
        Service("webserver-readonly", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p",
                                       str(ports["read_only"]), "-w", str(work / "workspace.yaml"), "--read-only"],
                logs, env, cwd=work),
        Service("proxy", ["sh", str(DEPLOY / "proxy" / "start.sh")], logs, env | {
            "DAGSTER_UI_USER": OPERATOR[0], "DAGSTER_UI_PASSWORD": OPERATOR[1],
            "DAGSTER_VIEWER_USER": VIEWER[0], "DAGSTER_VIEWER_PASSWORD": VIEWER[1],
            "UI_OPERATOR_PORT": str(ports["operator"]), "UI_VIEWER_PORT": str(ports["viewer"]),
            "UI_OPERATOR_UPSTREAM": f"127.0.0.1:{ports['full']}",
            "UI_VIEWER_UPSTREAM": f"127.0.0.1:{ports['read_only']}"}, cwd=work),
    ]
    try:
        for service in services:
            service.start()
        for service, port in zip(services, (ports["full"], ports["read_only"])):
            service.wait_ready(lambda port=port: http_ok(f"http://127.0.0.1:{port}/server_info"), timeout=180)
        services[2].wait_ready(lambda: _answers(ports["operator"]), timeout=60)
        yield {"operator": f"http://127.0.0.1:{ports['operator']}", "viewer": f"http://127.0.0.1:{ports['viewer']}",
               "direct": f"http://127.0.0.1:{ports['full']}", "instance": instance}
    finally:
        for service in reversed(services):
            service.stop()


def _answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/", timeout=3).status_code == 401
    except requests.ConnectionError:
        return False


def partitions(ui) -> list[str]:
    return ui["instance"].get_dynamic_partitions("batches")


def same_origin(url: str) -> dict[str, str]:
    """The headers the UI's own JSON POSTs carry."""
    return {"Origin": url, "Content-Type": "application/json"}


def test_a_login_is_required(ui):
    for url in (ui["operator"], ui["viewer"]):
        assert requests.get(f"{url}/", timeout=10).status_code == 401
        assert requests.post(f"{url}/graphql", json={"query": "{ version }"}, timeout=10).status_code == 401
    assert requests.get(f"{ui['operator']}/", auth=(OPERATOR[0], "wrong"), timeout=10).status_code == 401
    assert requests.get(f"{ui['operator']}/", auth=VIEWER, timeout=10).status_code == 401  # viewers: their port


def test_the_operator_drives_the_ui_with_json_posts(ui):
    reply = requests.post(f"{ui['operator']}/graphql", json={"query": "{ version }"}, auth=OPERATOR,
                          headers=same_origin(ui["operator"]), timeout=30)
    assert reply.status_code == 200 and reply.json()["data"]["version"]
    assert requests.get(f"{ui['operator']}/server_info", auth=OPERATOR, timeout=30).status_code == 200


def test_cross_site_requests_are_refused_and_the_mutation_does_not_run(ui):
    url, graphql = ui["operator"], f"{ui['operator']}/graphql"
    host = url.removeprefix("http://")
    attacks = {
        "bodyless GET": lambda: requests.get(graphql, params={"query": add_partition("via-get")}, auth=OPERATOR),
        "text/plain POST, query in the URL": lambda: requests.post(
            graphql, params={"query": add_partition("via-text-plain")}, data="", auth=OPERATOR,
            headers={"Content-Type": "text/plain"}),
        "text/plain POST, query in the body": lambda: requests.post(
            graphql, data=add_partition("via-text-body"), auth=OPERATOR, headers={"Content-Type": "text/plain"}),
        "JSON hidden in a text/plain type": lambda: requests.post(
            graphql, data=json.dumps({"query": add_partition("via-text-json")}), auth=OPERATOR,
            headers={"Content-Type": "text/plain; x=application/json"}),
        "GET with the UI's ?op=": lambda: requests.get(
            graphql, params={"op": "Add", "query": add_partition("via-get-op")}, auth=OPERATOR),
        "form POST to a report endpoint": lambda: requests.post(
            f"{url}/report_asset_materialization/batch", data={"partition": "via-form"}, auth=OPERATOR),
        "foreign Origin": lambda: requests.post(
            graphql, json={"query": add_partition("via-origin")}, auth=OPERATOR,
            headers={"Origin": "http://attacker.example"}),
        "marked cross-site": lambda: requests.post(
            graphql, json={"query": add_partition("via-sec-fetch")}, auth=OPERATOR,
            headers=same_origin(url) | {"Sec-Fetch-Site": "cross-site"}),
        "rebound Host": lambda: requests.post(
            graphql, json={"query": add_partition("via-rebinding")}, auth=OPERATOR,
            headers={"Host": f"attacker.example:{host.split(':')[1]}",
                     "Origin": f"http://attacker.example:{host.split(':')[1]}"}),
    }
    statuses = {name: attack().status_code for name, attack in attacks.items()}
    assert statuses == {"bodyless GET": 403, "text/plain POST, query in the URL": 403,
                        "text/plain POST, query in the body": 415, "JSON hidden in a text/plain type": 415,
                        "GET with the UI's ?op=": 403, "form POST to a report endpoint": 415,
                        "foreign Origin": 403, "marked cross-site": 403, "rebound Host": 421}
    # The same bodyless GET straight to the webserver runs: the proxy is what refused them.
    direct = requests.get(f"{ui['direct']}/graphql", params={"query": add_partition("direct-get")}, timeout=30)
    assert direct.json()["data"]["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess"
    added = partitions(ui)
    assert "direct-get" in added and not [key for key in added if key.startswith("via-")], added


def test_viewers_get_a_read_only_webserver(ui):
    reply = requests.post(f"{ui['viewer']}/graphql", json={"query": add_partition("by-viewer")}, auth=VIEWER,
                          headers=same_origin(ui["viewer"]), timeout=30)
    assert reply.status_code == 200
    assert reply.json()["data"]["addDynamicPartition"]["__typename"] == "UnauthorizedError"
    query = requests.post(f"{ui['viewer']}/graphql", json={"query": "{ version }"}, auth=VIEWER,
                          headers=same_origin(ui["viewer"]), timeout=30)
    assert query.json()["data"]["version"]
    assert "by-viewer" not in partitions(ui)


def test_the_operator_can_mutate_from_the_ui_itself(ui):
    reply = requests.post(f"{ui['operator']}/graphql", params={"op": "AddDynamicPartition"}, auth=OPERATOR,
                          json={"query": add_partition("by-operator")}, headers=same_origin(ui["operator"]),
                          timeout=30)
    assert reply.json()["data"]["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess"
    assert "by-operator" in partitions(ui)


def test_the_dagster_ui_works_through_the_proxy_in_a_browser(ui, tmp_path):
    """The guard lets the real UI through: headless Chromium logs in and the UI lists the asset and its partition
    (its GraphQL POSTs and subscriptions pass the Host, Origin and content-type rules)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    require(bool(chromium and chromedriver), "no chromium / chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService(executable_path=chromedriver), options=options)
    try:
        driver.set_page_load_timeout(60)
        # Log in once, as a person does: the browser caches the login for the origin (a page URL that keeps the
        # credentials would break the UI's fetch calls), then open the UI's own address.
        driver.get(ui["operator"].replace("http://", "http://%s:%s@" % OPERATOR) + "/server_info")
        driver.get(f"{ui['operator']}/assets/batch")
        def page() -> str:
            return driver.find_element("tag name", "body").text

        wait_until(lambda: LOCATION in page(), 90, "the asset page to show its code location through the proxy",
                   on_timeout=lambda: f"{page()[:1000]}\n{driver.get_log('browser')}")
        time.sleep(3)  # the subscriptions' WebSocket and the polling queries
        errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
