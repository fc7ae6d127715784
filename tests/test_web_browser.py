"""The page in a real browser: Debian's Chromium driven by Selenium through the system
chromedriver (nothing is downloaded), against a real ``dts watch`` that starts
``dts web`` itself, with studies sent by dcmtk's storescu. What a person would check:
the exams appear after a refresh, a timeline shows every stage, a failure's reason is
shown and the operator's requeue button reprocesses it, a viewer sees masked patient
IDs and no button, forged and token-less POSTs get 403, five wrong passwords throttle.
A screenshot of each page is saved in tests/artifacts/ (ignored by git)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dts.journal import EventFilter, read_events
from dts.spool import Queue
from dts.station import Station
from tests.helpers import (
    STORESCU,
    free_port,
    make_study,
    start_dts,
    stop_process,
    wait_for,
    wait_port,
)
from tests.webhelpers import PASSWORDS, add_users, web_config

pytestmark = pytest.mark.peers

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "web"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    offline = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never fetch a browser or driver
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--metrics-recording-only", "--no-default-browser-check"):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        pid = service.process.pid if service.process else None
        driver.quit()
        if pid is not None and service.process is not None and service.process.poll() is None:
            service.process.kill()  # by its PID: quit() should have ended it
        if offline is None:
            os.environ.pop("SE_OFFLINE", None)
        else:
            os.environ["SE_OFFLINE"] = offline


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``dts watch`` with the page (it starts dts web), and two exams sent with storescu:
    OK1 (delivered) and BAD1 (its processing fails)."""
    folder = tmp_path_factory.mktemp("browser")
    web_port, dicom_port = free_port(), free_port()
    config = web_config(folder, web={"enabled": True, "port": web_port}, port=dicom_port)
    station = Station.open(config)
    add_users(station)
    proc = start_dts("watch", config=config, log=folder / "watch.log")
    try:
        wait_port(dicom_port, 30)
        wait_port(web_port, 30)
        exams = {}
        for name, acc, pid in (("ok", "OK1", "PATOK77"), ("bad", "BAD1", "PATBAD88")):
            exams[name] = make_study(folder / name, n_series=1, per_series=3, accession=acc,
                                     patient_id=pid)
            sent = subprocess.run([STORESCU, "-aet", "PACS", "-aec", "DTS", "+sd", "+r",
                                   "127.0.0.1", str(dicom_port), str(folder / name)],
                                  capture_output=True, text=True, timeout=60, check=False)
            assert sent.returncode == 0, sent.stderr
        yield {"url": f"http://127.0.0.1:{web_port}", "station": station, "proc": proc,
               "folder": folder, **exams}
    finally:
        code = stop_process(proc)
    assert code == 0, (folder / "watch.log").read_text()[-3000:]


def shot(driver: Any, name: str) -> Path:
    """A screenshot of the whole page (the window as tall as the document)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(600, min(int(height) + 40, 3000)))
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1000)
    return path


def log_in(driver: Any, url: str, name: str, password: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{url}/login")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password or PASSWORDS[name])
    driver.find_element(By.ID, "login").click()
    # the answer is loaded (a page with a logout button, or the login page with its
    # message) before the next step navigates elsewhere
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete" and
             driver.find_elements(By.CSS_SELECTOR, "form[action='/logout'], #login-message, "
                                                   "#error-message"), 15, what="the login")


def follow(driver: Any, element: Any) -> None:
    """Click a link or button and wait for the page it leads to."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.wait import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 20).until(staleness_of(old))
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete", 20,
             what="the page to load")


def body(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def refresh_until(driver: Any, url: str, *texts: str, timeout: float = 60) -> None:
    """Open ``url`` and refresh it, as a person would, until every text shows."""
    driver.get(url)

    def shown() -> bool:
        if all(t in body(driver) for t in texts):
            return True
        time.sleep(0.5)
        driver.refresh()
        return False
    wait_for(shown, timeout, interval=0.5, what=f"{texts} on {url}")


def post_status(driver: Any, path: str, fields: dict[str, str]) -> int:
    """A POST made by script from the page (what a forged form would send)."""
    return int(driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', credentials: 'same-origin',"
        " body: new URLSearchParams(arguments[1])}).then(r => done(r.status), () => done(0));",
        path, fields))


def _events(station: Station, **kw: Any) -> list[dict[str, Any]]:
    return list(read_events(station.spool, EventFilter(**kw)))


def test_an_operator_follows_the_exams_and_requeues_a_failure(browser: Any,
                                                              live: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    url, station = live["url"], live["station"]
    log_in(browser, url, "otto")
    refresh_until(browser, f"{url}/exams", "OK1", "BAD1", "done", "failed")
    assert "PATOK77" in body(browser) and "PATBAD88" in body(browser)
    shot(browser, "exams-operator")

    follow(browser, browser.find_element(By.LINK_TEXT, "OK1"))
    text = body(browser)
    for stage in ("RECEIVE", "CLASSIFY", "RUN", "SEND"):
        assert stage in text, stage
    assert "from PACS → DTS" in text and "valid: 1 DICOM object(s)" in text
    assert browser.find_elements(By.CSS_SELECTOR, "table.deliveries")
    shot(browser, "timeline-done")

    browser.get(f"{url}/attention")
    row = browser.find_element(By.CSS_SELECTOR, "#attention tr.job")
    job = row.get_attribute("data-job")
    assert "exited with code 3" in row.text
    shot(browser, "attention-operator")
    # without the CSRF token, the same POST is refused
    assert post_status(browser, "/attention/requeue", {"job": job, "to": "run"}) == 403
    started_before = len(_events(station, job=job, event="started"))
    follow(browser, row.find_element(By.CSS_SELECTOR, "button.requeue[data-to='run']"))
    assert f"Job {job} requeued to run/new" in body(browser)
    # dts watch runs it again (and it fails again: the command always does)
    wait_for(lambda: len(_events(station, job=job, event="started")) > started_before and
             job in station.spool.list(Queue.FAILED), 60, what="the requeued job's new run")
    refresh_until(browser, f"{url}/exams/{live['bad']['study_uid']}", "by web:otto")
    wait_for(lambda: browser.refresh() or (
        body(browser).count("failed the processing exited with code 3") == 2 and
        browser.find_element(By.ID, "exam-status").text == "failed"), 30, interval=0.5,
        what="the second run's failure on the timeline")
    assert "exit-code: the processing exited with code 3" in body(browser)
    assert "model exploded" in body(browser)
    shot(browser, "timeline-failed")

    browser.get(url + "/")
    assert "Events per day" in body(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "#events-chart rect.bar")
    shot(browser, "overview")

    browser.get(f"{url}/log?accession=BAD1")
    browser.find_element(By.ID, "live").click()
    assert "failed" in body(browser)
    shot(browser, "log")

    browser.get(f"{url}/config")
    options = browser.find_elements(By.CSS_SELECTOR, "#rule-job option")
    assert len(options) >= 3
    options[1].click()
    follow(browser, browser.find_element(By.CSS_SELECTOR, "#rule-test button"))
    assert "Outcome: run:" in body(browser)
    shot(browser, "rule-tester")
    # the same with the study's files uploaded, as a person picks them
    files = sorted(str(f) for f in (live["folder"] / "ok").rglob("*.dcm"))
    browser.find_element(By.ID, "rule-files").send_keys("\n".join(files))
    follow(browser, browser.find_element(By.CSS_SELECTOR, "#rule-test button"))
    assert "3 uploaded file(s)" in body(browser) and "Outcome: run: stats" in body(browser)
    shot(browser, "rule-tester-upload")


def test_a_viewer_sees_masked_ids_no_button_and_a_forged_post_is_403(
        browser: Any, live: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    url = live["url"]
    log_in(browser, url, "vera")
    refresh_until(browser, f"{url}/exams", "OK1", "BAD1")
    text = body(browser)
    assert "PATOK77" not in text and "PATBAD88" not in text and "***" in text
    shot(browser, "exams-viewer")
    browser.get(f"{url}/attention")
    assert "BAD1" in body(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "button.requeue") == []
    shot(browser, "attention-viewer")
    job = browser.find_element(By.CSS_SELECTOR, "#attention tr.job").get_attribute("data-job")
    csrf = browser.find_element(By.CSS_SELECTOR, "form[action='/logout'] input[name=csrf]")
    forged = {"job": job, "to": "run", "csrf": csrf.get_attribute("value")}
    assert post_status(browser, "/attention/requeue", forged) == 403
    browser.get(f"{url}/exams/{live['bad']['study_uid']}")
    assert "PATBAD88" not in body(browser)
    browser.get(f"{url}/config")
    assert browser.find_elements(By.CSS_SELECTOR, "button.echo") == []
    assert browser.find_elements(By.ID, "effective") == []
    shot(browser, "config-viewer")


def test_an_admin_sees_the_effective_configuration(browser: Any,
                                                   live: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    url = live["url"]
    log_in(browser, url, "ada")
    browser.get(f"{url}/config")
    assert browser.find_elements(By.ID, "effective"), body(browser)
    effective = browser.find_element(By.ID, "effective").text
    assert "[station]" in effective and "[web]" in effective
    assert browser.find_elements(By.CSS_SELECTOR, "button.echo")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "button.echo"))
    assert "not reachable" in browser.find_element(By.ID, "echo-result").text
    shot(browser, "config-admin")
    browser.get(f"{url}/exams/1.2.3.4")
    assert "404" in body(browser)
    browser.get(f"{url}/exams?status=bogus")
    assert "400" in body(browser) and "status" in body(browser)
    shot(browser, "error-400")


def test_five_wrong_passwords_are_throttled(browser: Any, tmp_path: Path) -> None:
    """On a dts web of its own: the throttle holds for the address too."""
    port = free_port()
    config = web_config(tmp_path, web={"port": port})
    add_users(Station.open(config))
    proc = start_dts("web", config=config, log=tmp_path / "web.log")
    try:
        wait_port(port, 30)
        url = f"http://127.0.0.1:{port}"
        for _ in range(5):
            log_in(browser, url, "ada", "not-the-password")
            assert "wrong name or password" in body(browser)
        log_in(browser, url, "ada")
        assert "too many failed logins" in body(browser)
        shot(browser, "login-throttled")
    finally:
        assert stop_process(proc) == 0
    events = [(e["event"], e.get("throttled")) for e in
              read_events(Station.open(config).spool, EventFilter(stage="web"))]
    assert events.count(("login-failed", None)) == 5
    assert ("login-failed", True) in events and ("login", None) not in events
    assert json.loads((tmp_path / "spool" / "tmp" / ".run" / "web.pid").read_text())["port"] \
        == port
