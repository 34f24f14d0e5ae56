"""The dashboard (`/ui`) in headless Chromium, driven by Selenium, against a live cluster of
three agents: logging in with a token, the nodes, a job from the CLI seen from submission
to its end without a reload, an admin's kill and drain and a user's kill of its own job from
the page, and no error in the browser's console. Screenshots are kept under the test's own
directory (its path is printed).

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from shoal.config import MasterSettings
from shoal.model import JobSpec, JobState, Role, TaskState
from shoal.testing.live import LiveCluster, live_cluster, wait_for

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver are not installed (Debian: chromium chromium-driver; make test does)",
)
WAIT = 15.0  # seconds an explicit wait may take, at most


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    with live_cluster(tmp_path_factory.mktemp("ui"), agents=3) as c:
        yield c


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The browser on the dashboard: explicit waits, screenshots, the console checked."""

    def __init__(self, driver: WebDriver, cluster: LiveCluster, shots: Path) -> None:
        self.driver = driver
        self.cluster = cluster
        self.shots = shots

    def until(self, condition: Callable[[WebDriver], object], what: str) -> object:
        try:
            return WebDriverWait(self.driver, WAIT, poll_frequency=0.05).until(
                lambda d: _tolerant(condition, d), what
            )
        except Exception:
            self.shot("timed-out")
            raise

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def open(self, page: str) -> None:
        """Show `page` (#/nodes, ...) in the page already loaded, and wait for its data."""
        self.driver.execute_script("location.hash = arguments[0]", page)
        name = page.removeprefix("#/").split("/")[0].split("?")[0]
        self.until(lambda d: self.rendered() == name, f"{page} rendered")

    def log_in(self, token: str) -> None:
        self.driver.get(f"{self.cluster.url}/ui/#/login")
        field = self.until(lambda d: d.find_element(By.ID, "token"), "the login form")
        field.send_keys(token)  # type: ignore[attr-defined]
        self.driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        self.until(lambda d: self.rendered() == "nodes", "the nodes page")

    def rendered(self) -> str | None:
        """The page whose data is rendered (the dashboard marks it once it is)."""
        return self.driver.execute_script("return document.body.dataset.rendered")

    def text(self, selector: str) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, selector).text

    def click_twice(self, selector: str) -> None:
        """A button that asks to be clicked again before it does something irreversible."""
        self.until(lambda d: d.find_element(By.CSS_SELECTOR, selector).is_enabled(), selector)
        self.driver.find_element(By.CSS_SELECTOR, selector).click()
        self.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{selector}[data-armed]"), f"{selector} armed")
        self.driver.find_element(By.CSS_SELECTOR, selector).click()

    def console_errors(self) -> list[dict]:
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]


def _tolerant(condition: Callable[[WebDriver], object], driver: WebDriver) -> object:
    """A condition that a row redrawn under it (a stale element) or not there yet makes false."""
    try:
        return condition(driver)
    except (StaleElementReferenceException, NoSuchElementException):
        return False


@pytest.fixture
def page(
    browser: WebDriver, cluster: LiveCluster, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Page]:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots of {request.node.name}: {shots}")
    browser.get_log("browser")  # what earlier tests left
    p = Page(browser, cluster, shots)
    yield p
    p.shot("end")
    assert p.console_errors() == []


def _token(cluster: LiveCluster, name: str, role: Role) -> str:
    with cluster.client() as c:
        return c.create_token(name, role).token


def test_a_token_logs_in_and_the_three_nodes_show(page: Page, cluster: LiveCluster) -> None:
    page.log_in(cluster.admin_token)
    names = "return [...document.querySelectorAll('#rows tr[data-node]')].map(r => r.dataset.node)"
    page.until(lambda d: d.execute_script(names) == ["node1", "node2", "node3"], "the three nodes")
    assert "3 up" in page.text("#summary")
    assert page.driver.find_elements(By.CSS_SELECTOR, "#rows [data-drain]")  # an admin's buttons
    page.shot("nodes")
    # A user's token: the same nodes, and no admin's buttons; logging out forgets the token.
    page.driver.find_element(By.ID, "logout").click()
    page.log_in(_token(cluster, "ui-user", Role.USER))
    page.until(lambda d: d.execute_script(names) == ["node1", "node2", "node3"], "the three nodes")
    assert page.driver.find_elements(By.CSS_SELECTOR, "[data-drain], [data-undrain]") == []
    assert "ui-user" in page.text("#who")
    page.driver.find_element(By.ID, "logout").click()
    assert page.driver.execute_script("return sessionStorage.getItem('shoal.token')") is None


def test_a_revoked_token_goes_back_to_the_login(page: Page, cluster: LiveCluster) -> None:
    with cluster.client() as c:
        made = c.create_token("ui-revoked", Role.READER)
    page.log_in(made.token)  # the nodes page: it lists them again every 3 s
    with cluster.client() as c:
        c.revoke_token(made.id)
    page.until(lambda d: d.find_element(By.ID, "token"), "the login form")  # the next call had a 401
    assert page.driver.execute_script("return sessionStorage.getItem('shoal.token')") is None
    assert page.driver.execute_script("return sessionStorage.getItem('shoal.next')") == "#/nodes"
    refused = [e for e in page.console_errors() if "401 (Unauthorized)" not in e["message"]]
    assert refused == []


def test_a_job_from_the_cli_appears_and_finishes_without_a_reload(page: Page, cluster: LiveCluster) -> None:
    page.log_in(cluster.admin_token)
    page.open("#/jobs")
    page.driver.execute_script("window.notReloaded = true")
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(
            cluster.cli,
            "run",
            "--name",
            "watched",
            "--cpus",
            "0.5",
            "--",
            "sh",
            "-c",
            "sleep 1.5; echo watched",
        )
        row = "#rows tr td:nth-child(2)"
        page.until(lambda d: d.find_element(By.CSS_SELECTOR, row).text == "watched", "the job listed")
        page.until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#rows tr .badge").text in ("pending", "running"),
            "the job waiting or running",
        )
        page.shot("job-running")
        done = run.result(timeout=60)
    assert (done.returncode, done.stdout) == (0, "watched\n")
    page.until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#rows tr .badge").text == "complete", "the job complete"
    )
    assert page.driver.execute_script("return window.notReloaded") is True
    page.shot("job-complete")
    # Its page: the task, and its output in the tail.
    page.driver.find_element(By.CSS_SELECTOR, "#rows tr td:first-child a").click()
    page.until(lambda d: page.rendered() == "job", "the job's page")
    page.until(lambda d: "watched" in d.find_element(By.ID, "log").text, "the task's output")
    assert page.text("#rows tr .badge") == "finished"
    page.shot("job-page")


def test_the_jobs_page_lists_the_state_owner_and_queue_asked(page: Page, cluster: LiveCluster) -> None:
    with cluster.client() as c:
        waiting = c.submit(JobSpec(name="sifted-waits", command="true", constraints=["rack == r9"]))
        done = c.submit(JobSpec(name="sifted-done", command="true", resources={"cpus": 0.5}))
        wait_for(lambda: c.job(done).state is JobState.COMPLETE, what="a job complete")
    names = "#rows tr td:nth-child(2)"
    page.log_in(cluster.admin_token)
    try:
        for query, shown in [
            ("state=pending&owner=admin&q=sifted", ["sifted-waits"]),
            ("state=complete&queue=default&q=sifted", ["sifted-done"]),
            ("state=complete&owner=nobody", []),
        ]:
            page.open(f"#/jobs?{query}")
            page.until(
                lambda d, shown=shown: [r.text for r in d.find_elements(By.CSS_SELECTOR, names)] == shown,
                query,
            )
        page.shot("sifted")
        page.open("#/jobs?queue=Nope")  # no queue could be named so: the page says why
        page.until(lambda d: "queue" in page.text("#empty") and not page.text("#rows"), "the reason shown")
        page.open("#/jobs")  # no filter: nothing is refused from now on
        # The browser logs each refused call as an error of its own: those alone are expected.
        refused = page.console_errors()
        assert refused and all("422" in e["message"] for e in refused)
    finally:
        with cluster.client() as c:
            c.kill(waiting)


def test_a_waiting_job_says_why(page: Page, cluster: LiveCluster) -> None:
    with cluster.client() as c:
        job = c.submit(JobSpec(name="nowhere", command="true", constraints=["rack == r9"]))
        wait_for(lambda: c.job(job).waiting, what="a reason to wait")
    page.log_in(cluster.admin_token)
    page.open(f"#/job/{job}")
    assert "3 nodes fail rack == r9" in page.text("#waiting")
    assert "3 nodes fail rack == r9" in page.text("#rows tr .why")
    page.shot("waiting")
    with cluster.client() as c:
        c.kill(job)


def test_an_admin_kills_a_job_and_drains_a_node_from_the_page(page: Page, cluster: LiveCluster) -> None:
    with cluster.client() as c:
        job = c.submit(JobSpec(name="sleeper", command="sleep 300", kill_grace=1, resources={"cpus": 0.5}))
        wait_for(lambda: c.job(job).tasks[0].state is TaskState.RUNNING, what="the job running")
    page.log_in(cluster.admin_token)
    page.open("#/jobs")
    page.click_twice(f'#rows [data-kill="{job}"]')
    with cluster.client() as c:
        wait_for(lambda: c.job(job).state is JobState.KILLED, what="the job killed")
    row = f'#rows tr[data-job="{job}"] .badge'
    page.until(lambda d: d.find_element(By.CSS_SELECTOR, row).text == "killed", "the row killed")
    page.shot("killed")

    page.open("#/nodes")
    page.click_twice('#rows [data-drain="node3"]')
    with cluster.client() as c:
        wait_for(lambda: {n.name: n.drained for n in c.nodes()}["node3"], what="node3 drained")
    badges = '#rows tr[data-node="node3"] td:nth-child(2)'
    page.until(lambda d: "drained" in d.find_element(By.CSS_SELECTOR, badges).text, "node3 shown drained")
    page.shot("drained")
    page.driver.find_element(By.CSS_SELECTOR, '#rows [data-undrain="node3"]').click()
    with cluster.client() as c:
        wait_for(lambda: not {n.name: n.drained for n in c.nodes()}["node3"], what="node3 undrained")
    page.until(
        lambda d: "drained" not in d.find_element(By.CSS_SELECTOR, badges).text, "node3 shown undrained"
    )


def test_a_user_kills_its_own_job_from_the_page_and_a_reader_kills_none(
    page: Page, cluster: LiveCluster
) -> None:
    user = _token(cluster, "ui-killer", Role.USER)
    with cluster.client(user) as c:
        job = c.submit(JobSpec(name="mine", command="sleep 300", kill_grace=1, resources={"cpus": 0.5}))
        wait_for(lambda: c.job(job).tasks[0].state is TaskState.RUNNING, what="the job running")
    row = f'#rows tr[data-job="{job}"]'
    # A reader sees the job, and no button to kill it, in the list or on its page.
    page.log_in(_token(cluster, "ui-looker", Role.READER))
    page.open("#/jobs")
    page.until(lambda d: d.find_element(By.CSS_SELECTOR, row), "the job listed")
    assert page.driver.find_elements(By.CSS_SELECTOR, "#rows [data-kill]") == []
    page.open(f"#/job/{job}")
    assert not page.driver.find_element(By.ID, "kill").is_displayed()
    page.driver.find_element(By.ID, "logout").click()
    # Its owner, a user, gets the button on its page and in the list, and the kill is done.
    page.log_in(user)
    page.open(f"#/job/{job}")
    assert page.driver.find_element(By.ID, "kill").is_displayed()
    page.open("#/jobs")
    page.click_twice(f'#rows [data-kill="{job}"]')
    with cluster.client(user) as c:
        wait_for(lambda: c.job(job).state is JobState.KILLED, what="the job killed")
    page.until(lambda d: d.find_element(By.CSS_SELECTOR, f"{row} .badge").text == "killed", "the row killed")
    assert page.driver.find_elements(By.CSS_SELECTOR, f"{row} [data-kill]") == []
    page.shot("killed-by-its-owner")


def test_every_page_renders(page: Page, cluster: LiveCluster) -> None:
    page.log_in(cluster.admin_token)
    page.open("#/queues")
    assert page.text('#rows tr[data-queue="default"] td').startswith("default")
    for name in ("queues", "frameworks", "services", "events"):
        page.open(f"#/{name}")
        page.shot(name)
    with cluster.client() as c:  # on the events page: the job's events come as they happen
        job = c.submit(JobSpec(name="seen-live", command="true", resources={"cpus": 0.5}))
    page.until(lambda d: f"job {job} seen-live by admin" in d.find_element(By.ID, "feed").text, "its event")
    page.until(lambda d: f"task {job}.0 finished" in d.find_element(By.ID, "feed").text, "its task's end")
    page.shot("events-live")


@pytest.mark.parametrize("role", [Role.READER, Role.USER])
def test_a_reader_and_a_user_follow_the_events_page(page: Page, cluster: LiveCluster, role: Role) -> None:
    token = _token(cluster, f"ui-events-{role.value}", role)
    page.log_in(token)
    page.open("#/events")
    assert page.driver.find_elements(By.CSS_SELECTOR, "#topics [name=audit]") == []  # an admin's alone
    with cluster.client(token if role is Role.USER else None) as c:  # a user sees its own jobs' events
        job = c.submit(JobSpec(name="followed", command="true", resources={"cpus": 0.5}))
    page.until(lambda d: f"task {job}.0 finished" in d.find_element(By.ID, "feed").text, "its task's end")
    assert page.driver.execute_script("return document.getElementById('live').dataset.state") == "live"


def test_the_files_need_no_token_and_the_data_does(cluster: LiveCluster) -> None:
    shell = httpx.get(f"{cluster.url}/ui")
    assert shell.status_code == 200 and "text/html" in shell.headers["content-type"]
    assert shell.headers["cache-control"] == "no-cache"
    assert "script-src 'self' 'sha256-" in shell.headers["content-security-policy"]
    again = httpx.get(f"{cluster.url}/ui/", headers={"If-None-Match": shell.headers["etag"]})
    assert again.status_code == 304
    # The shell names every file by its version, and a versioned name is cached for good.
    app = re.search(r'src="(/ui/js/app\.js\?v=\w+)"', shell.text)
    assert app is not None and '"/ui/js/pages/nodes.js":"/ui/js/pages/nodes.js?v=' in shell.text
    script = httpx.get(f"{cluster.url}{app[1]}")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "immutable" in script.headers["cache-control"]
    assert httpx.get(f"{cluster.url}/ui/js/app.js").headers["cache-control"] == "no-cache"
    assert httpx.get(f"{cluster.url}/ui/%2e%2e/pyproject.toml").status_code == 404
    assert httpx.get(f"{cluster.url}/ui/nothing.js").status_code == 404
    assert httpx.get(f"{cluster.url}/v1/queues").status_code == 401
    assert "/ui" not in httpx.get(f"{cluster.url}/openapi.json").text


def test_queues_say_what_each_holds_and_what_waits(cluster: LiveCluster) -> None:
    with cluster.client() as c:
        running = c.submit(JobSpec(name="holder", command="sleep 300", resources={"cpus": 1, "mem": 256}))
        waiting = c.submit(JobSpec(name="stuck", command="true", count=2, constraints=["rack == r9"]))
        wait_for(lambda: c.job(running).tasks[0].state is TaskState.RUNNING, what="the job running")
        headers = {"Authorization": f"Bearer {cluster.admin_token}"}
        queues = httpx.get(f"{cluster.url}/v1/queues", headers=headers).json()
        user = {"Authorization": f"Bearer {c.create_token('queue-reader', Role.USER).token}"}
        as_user = httpx.get(f"{cluster.url}/v1/queues", headers=user).json()
        c.kill(running)
        c.kill(waiting)
    default = next(q for q in queues if q["name"] == "default")
    assert (default["running"], default["pending"], default["jobs_pending"]) == (1, 2, 1)
    assert default["allocated"]["cpus"] == 1 and default["allocated"]["mem"] == 256
    assert default["share"] == pytest.approx(1 / 6, abs=1e-6)  # a cpu of 3 x 2: its dominant resource
    holding = [u for u in default["users"] if u["running"]]  # the module's earlier users hold nothing now
    assert holding == [{"user": "admin", "share": pytest.approx(1 / 6, abs=1e-6), "running": 1}]
    assert (default["configured"], default["order"], default["weight"]) == (True, "priority", 1.0)
    theirs = next(q for q in as_user if q["name"] == "default")
    assert theirs["running"] == 1 and theirs["users"] == []  # the totals, but not who holds them


MOST = MasterSettings.model_fields["streams_per_caller"].default  # the cluster's: not set otherwise


def test_a_refused_stream_says_why_on_the_page_and_goes_live_once_it_may(
    page: Page, cluster: LiveCluster
) -> None:
    token = _token(cluster, "ui-crowded", Role.USER)
    with httpx.Client(timeout=WAIT, limits=httpx.Limits(max_connections=None)) as http:
        held = []
        for _ in range(MOST):  # the page's own is one too many
            request = http.build_request(
                "GET", f"{cluster.url}/v1/stream", headers={"Authorization": f"Bearer {token}"}
            )
            held.append(http.send(request, stream=True))
        assert all(r.status_code == 200 for r in held)
        page.log_in(token)
        page.until(lambda d: f"ui-crowded holds {MOST} streams" in page.text("#live-why"), "the reason")
        assert "trying again" in page.text("#live-why")
        assert page.driver.execute_script("return document.getElementById('live').dataset.state") == "lost"
        page.shot("refused")
        for response in held:
            response.close()
    page.until(
        lambda d: d.execute_script("return document.getElementById('live').dataset.state") == "live", "live"
    )
    assert page.text("#live-why") == ""
    # The browser logs each refused fetch as an error of its own: those alone are expected.
    refused = page.console_errors()
    assert refused and all("429" in e["message"] for e in refused)
