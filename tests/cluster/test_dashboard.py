"""The dashboard on a real cluster: headless Chromium (Debian's chromium + chromedriver, driven by
Selenium) loads the page, sees every node, and sees a server turn dead after it is SIGKILLed (a
screenshot goes to benchmarks/results/dashboard.png); a secure cluster's data needs the token."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import pserver
from pserver.bearer import cluster_token
from pserver.launch import LocalCluster, free_port

pytestmark = pytest.mark.slow

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               "--window-size=1400,1000")


def start_dashboard(cluster: LocalCluster) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pserver", "dashboard", "--dashboard-port",
                             str(port), "--interval", "0.5"], env=cluster.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return proc, url
        except httpx.TransportError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the dashboard did not start")


def _traffic(cluster: LocalCluster, stop: threading.Event) -> None:
    with pserver.KVWorker(cluster.config(0)) as kv:
        keys = np.arange(0, 30_000, 7, dtype=np.uint64)
        while not stop.is_set():
            kv.wait(kv.push(keys, np.ones(len(keys), np.float32)))
            kv.pull(keys)
            time.sleep(0.05)


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_page_shows_the_nodes_and_a_killed_server_turning_dead(cluster_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    cluster = cluster_factory(3, 1, heartbeat_timeout=1.5)
    stop = threading.Event()
    worker = threading.Thread(target=_traffic, args=(cluster, stop), daemon=True)
    worker.start()
    proc, url = start_dashboard(cluster)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60, poll_frequency=0.3)

        def rows(role: str, state: str) -> int:  # read in the page: it redraws every second
            return browser.execute_script(
                f'return document.querySelectorAll(\'tr[data-role="{role}"][data-state="{state}"]\').length')

        def owners() -> int:  # servers owning arcs of the drawn ring
            return browser.execute_script(
                "return new Set([...document.querySelectorAll('#ring path[data-owner]')]"
                ".map(p => p.dataset.owner)).size")

        wait.until(lambda _: rows("server", "up") == 3 and rows("worker", "up") == 1)
        assert owners() == 3
        cluster.kill("server 0")
        wait.until(lambda _: rows("server", "dead") == 1 and rows("server", "up") == 2)
        wait.until(lambda _: owners() == 2)  # failover: the ring redrawn without the dead server
        events = browser.execute_script("return document.getElementById('events').innerText")
        assert "-> dead" in events and "key ring" in events
        time.sleep(1.5)  # a few more points on the traffic chart for the screenshot
        RESULTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(RESULTS / "dashboard.png"))
    finally:
        browser.quit()
        stop.set()
        worker.join(timeout=30)
        proc.terminate()
        proc.wait(timeout=30)


def test_a_secure_clusters_dashboard_refuses_requests_without_the_token(cluster_factory):
    cluster = cluster_factory(1, 0, insecure=False)
    proc, url = start_dashboard(cluster)
    try:
        assert httpx.get(url, timeout=10).status_code == 200  # the page: code, no data
        r = httpx.get(url + "api/state", timeout=10)
        assert r.status_code == 401 and "Authorization" in r.text
        r = httpx.get(url + "api/state", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert r.status_code == 401 and "invalid bearer token" in r.text
        headers = {"Authorization": f"Bearer {cluster_token(cluster.keys)}"}
        deadline = time.monotonic() + 30
        while True:
            state = httpx.get(url + "api/state", headers=headers, timeout=10).json()
            if state["nodes"] or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert state["secure"] and [n["role"] for n in state["nodes"]] == ["server"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chromium_is_installed_in_ci():
    """.ci/run installs chromium; without it the browser test above would silently skip."""
    if os.environ.get("CI"):
        assert shutil.which("chromium") and shutil.which("chromedriver")
