"""serve.py as users run it, in its own process, on real ORL faces at 64 px: HTTP clients appending
at once while another queries, ``kill -9`` in the middle of appends, a restart that keeps every
acknowledged photo, and the page driven in a real browser (Debian's chromium + chromedriver)."""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from index import load_index

from .conftest import ORL, SERVICE_GALLERY
from .index_helpers import ROOT, writers_beside_a_reader

pytestmark = pytest.mark.slow

GALLERY = SERVICE_GALLERY
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


class Server:
    """``python serve.py --index DIR --port P`` in a subprocess, ready once /health answers."""

    def __init__(self, index_dir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(index_dir.parent / f"server-{self.port}.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "serve.py", "--index", str(index_dir), "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.process.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError("server did not start in 120 s")

    def stop(self, sig=signal.SIGTERM) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout=60)
        self.log.close()


def photo(identity: str, number: int) -> bytes:
    return (ORL / identity / f"{number}.pgm").read_bytes()


def add(client: httpx.Client, data: bytes, identity: str, new: bool = False) -> httpx.Response:
    return client.post("/gallery", files={"image": ("p.pgm", data)},
                       data={"identity": identity, "new_identity": str(new).lower()}, timeout=60)


def test_two_http_clients_append_while_one_queries_and_a_restart_keeps_it_all(index_dir):
    server = Server(index_dir)
    failures: list[str] = []
    answered = []

    def append(person: str) -> None:
        with httpx.Client(base_url=server.url) as client:
            for n in range(1, 6):
                for _ in range(2):  # each photo twice: a client retrying must not duplicate it
                    response = add(client, photo(person, n), f"new_{person}", new=n == 1 and _ == 0)
                    if response.status_code != 200:
                        failures.append(response.text)

    def ask(stop: threading.Event) -> None:
        with httpx.Client(base_url=server.url) as client:
            while not stop.is_set():
                response = client.post("/query", files={"image": ("q.pgm", photo("s2", 9))},
                                       data={"k": "3"}, timeout=60)
                if response.status_code != 200:
                    failures.append(response.text)
                answered.append(response.json()["candidates"][0]["identity"])

    try:
        writers_beside_a_reader(ask, [lambda p=person: append(p) for person in ("s20", "s21")])
        assert not failures, failures[:3]
        assert len(answered) >= 2
        counts = {i["identity"]: len(i["images"]) for i in httpx.get(f"{server.url}/identities").json()}
        assert counts["new_s20"] == counts["new_s21"] == 5 and sum(counts.values()) == 18 + 10
    finally:
        server.stop()
    restarted = Server(index_dir)
    try:
        again = {i["identity"]: len(i["images"]) for i in httpx.get(f"{restarted.url}/identities").json()}
        assert again == counts
    finally:
        restarted.stop()


def test_kill_9_during_appends_leaves_a_whole_index_with_every_acknowledged_photo(index_dir):
    rng = random.Random(0)
    acknowledged: list[bytes] = []
    candidates = [photo(f"s{p}", n) for p in range(20, 26) for n in range(1, 11)]
    first = True
    for round_ in range(3):
        server = Server(index_dir)
        done = threading.Event()

        def keep_appending() -> None:
            nonlocal first
            with httpx.Client(base_url=server.url) as client:
                while not done.is_set() and candidates:
                    data = candidates.pop()
                    try:
                        response = add(client, data, "crowd", new=first)
                    except httpx.HTTPError:
                        return  # the server died mid-request: not acknowledged
                    if response.status_code == 200:
                        acknowledged.append(data)
                        first = False

        before = load_index(index_dir).manifest.counts["images"]
        sent_before = len(candidates)
        appender = threading.Thread(target=keep_appending)
        appender.start()
        time.sleep(rng.uniform(1.0, 3.0))
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=60)
        done.set()
        appender.join()
        server.log.close()
        stored = load_index(index_dir)  # whole: every checksum and count agrees
        attempted = sent_before - len(candidates)
        assert before <= stored.manifest.counts["images"] <= before + attempted
        held = {Path(p).name.split(".")[0] for p in stored.paths}
        for data in acknowledged:
            assert hashlib.sha256(data).hexdigest()[:40] in held
    assert acknowledged, "no append was acknowledged in 3 rounds"


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs Debian's chromium and chromium-driver (bash .ci/run installs them)")
def test_the_page_in_a_real_browser_answers_and_learns_a_new_identity(index_dir, service_built,
                                                                     tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,900"):
        options.add_argument(flag)
    server = Server(index_dir)
    browser = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    wait = WebDriverWait(browser, 60)

    def ask(path: Path) -> list[str]:
        browser.find_element(By.ID, "file").send_keys(str(path))
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), f"answered {path.name}"))
        return [c.get_attribute("data-identity")
                for c in browser.find_elements(By.CSS_SELECTOR, ".candidate")]

    try:
        browser.get(server.url)
        wait.until(ready.text_to_be_present_in_element((By.ID, "info"), "18 photos of 6 identities"))
        known = sorted((service_built / "gallery" / "s4").iterdir())[0]
        assert ask(known)[0] == "s4"
        thumbs = browser.find_elements(By.CSS_SELECTOR, ".candidate .thumbs img")
        assert thumbs and all(browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", t) for t in thumbs)
        browser.find_element(By.CSS_SELECTOR, ".candidate .why").click()  # heat-maps of the match
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".candidate .heat img")) == 2)
        heat = browser.find_elements(By.CSS_SELECTOR, ".candidate .heat img")
        wait.until(lambda b: all(b.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", h) for h in heat))
        browser.save_screenshot(str(tmp_path / "why.png"))

        stranger = tmp_path / "stranger.pgm"
        stranger.write_bytes(photo("s30", 1))
        assert "newcomer" not in ask(stranger)
        browser.find_element(By.ID, "new-name").send_keys("newcomer")
        browser.find_element(By.ID, "add-new").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "added to newcomer"))
        wait.until(ready.text_to_be_present_in_element((By.ID, "info"), "19 photos of 7 identities"))

        again = tmp_path / "stranger-again.pgm"  # a new file name: the input fires a new change
        again.write_bytes(photo("s30", 1))
        assert ask(again)[0] == "newcomer"
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        browser.quit()
        server.stop()
    assert "newcomer" in {identity for identity in load_index(index_dir).identities}
