"""The demo page (GET /) in a real headless Chromium against a live server, and its routes.

Browser tests need Debian's `chromium` and Playwright for Python (never `playwright install`:
the system browser is used). Without them they skip, except under CI=true where they fail.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from service.routes.ui import CONTENT_SECURITY_POLICY, STATIC
from tests.conftest import DEFAULT_MODEL_DIR, REPO
from tests.live import live_server
from tests.service_client import running

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = REPO / "docs" / "demo.png"
KEY = "demo-key-7f3a"
MAX_STEPS = 10  # the server's AE_MAX_INTERPOLATION_STEPS; the page's slider goes to 16


def _report_dir() -> Path:
    versions = sorted(
        (p for p in (DEFAULT_MODEL_DIR / "intel-scenes").iterdir() if p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    return versions[-1] / "report"


def _require_browser() -> None:
    """Skip without Chromium or Playwright, with the reason; under CI=true fail instead."""
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("Playwright for Python is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.is_file():
        problems.append(f"no Chromium at {CHROMIUM} (apt-get install chromium, or CHROMIUM_PATH)")
    if not problems:
        return
    reason = "; ".join(problems)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the browser tests: {reason}")
    pytest.skip(f"browser test skipped: {reason}")


# ---------------------------------------------------------------------------------------------
# Fixtures: one browser and one server per module, a fresh context (sessionStorage) per test.


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(browser):
    env = {"AE_MAX_QUEUE_DELAY_MS": "5", "AE_MAX_INTERPOLATION_STEPS": str(MAX_STEPS)}
    with live_server(env) as live:
        yield live.base


@pytest.fixture(scope="module")
def keyed_server(browser):
    with live_server({"AE_MAX_QUEUE_DELAY_MS": "5", "AE_API_KEY": KEY}) as live:
        yield live.base


def _csp_violations(page) -> list[str]:
    """What the page's Content-Security-Policy blocked, as Chromium reports it on the console."""
    blocked: list[str] = []
    page.on(
        "console",
        lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None,
    )
    return blocked


@pytest.fixture
def new_page(browser):
    """A factory of pages in fresh contexts; JavaScript exceptions and anything the page's
    Content-Security-Policy blocks fail the test (the page must work under its own policy)."""
    contexts, js_errors, blocked = [], [], []

    def make():
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(60_000)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: js_errors.append(str(exc)))
        blocked.append(_csp_violations(page))
        return page

    yield make
    for context in contexts:
        context.close()
    assert not js_errors, f"JavaScript errors on the page: {js_errors}"
    assert not any(blocked), f"blocked by the page's Content-Security-Policy: {blocked}"


@pytest.fixture(scope="module")
def one_per_class() -> list[Path]:
    return [sorted(d.glob("*.jpg"))[0] for d in sorted((REPO / "tests/fixtures/scenes").iterdir())]


@pytest.fixture
def checkerboard(tmp_path) -> Path:
    """1-pixel black and white squares: no autoencoder reconstructs them, far above threshold."""
    board = (np.indices((128, 128)).sum(axis=0) % 2 * 255).astype(np.uint8)
    path = tmp_path / "checkerboard.png"
    cv2.imwrite(str(path), cv2.merge([board, board, board]))
    return path


def _wait_cards(page, done: int, error: int = 0) -> None:
    """Until every card has settled: `done` rendered, `error` failed, none pending."""
    page.wait_for_function(
        """([done, error]) => {
            const count = (state) => document.querySelectorAll(`.card[data-state='${state}']`).length;
            return count("pending") === 0 && count("done") === done && count("error") === error;
        }""",
        arg=[done, error],
    )


def _natural_widths(page, selector: str) -> list[int]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.naturalWidth)")


def _api(base: str, path: str, files: list[Path] | None = None, **kw) -> dict:
    parts = [("images", (p.name, p.read_bytes())) for p in files or []]
    reply = httpx.post(f"{base}{path}", files=parts, timeout=60, **kw)
    reply.raise_for_status()
    return reply.json()


# ---------------------------------------------------------------------------------------------
# In the browser.


def test_upload_score_heatmap_interpolate_model_card_and_screenshot(
    new_page, server, one_per_class, checkerboard
):
    page = new_page()
    page.goto(server + "/")
    card = httpx.get(f"{server}/model", timeout=10).json()

    # The model card, from GET /model, with the report's figures.
    page.wait_for_selector("#model-card[data-state='done']")
    text = page.inner_text("#model-card")
    for value in (card["name"], str(card["latent_dim"]), card["architecture"], *card["providers"]):
        assert value in text
    assert f"{card['metrics']['val_mse']:.5f}" in text
    assert f"{card['metrics']['pca_val_mse']:.5f}" in text
    assert page.inner_text("#model-badge") == f"{card['name']} v{card['version']}"
    figures = sorted(p.name for p in _report_dir().glob("*.png"))
    assert figures
    page.wait_for_selector(f"#figures[data-count='{len(figures)}']")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#figures img')].every(i => i.naturalWidth > 0)"
    )
    assert (
        page.eval_on_selector_all("#figures figcaption", "els => els.map(e => e.textContent)")
        == figures
    )

    # Several images at once: each input beside its reconstruction, MSE, score, the red mark.
    uploads = [*one_per_class, checkerboard]
    page.set_input_files("#files", [str(p) for p in uploads])
    _wait_cards(page, len(uploads))
    width = card["input"]["width"]
    assert _natural_widths(page, ".card img.recon") == [width] * len(uploads)
    assert all(w > 0 for w in _natural_widths(page, ".card img.input"))
    names = page.eval_on_selector_all(".card", "els => els.map(e => e.dataset.name)")
    assert names == [p.name for p in uploads]  # request order kept

    scored = _api(server, "/anomaly-score", uploads)["results"]
    mse = _api(server, "/reconstruct", uploads)["mse"]
    assert scored[-1]["is_anomaly"], "the checkerboard should be far above the threshold"
    for i, (result, error) in enumerate(zip(scored, mse, strict=True)):
        item = page.locator(".card").nth(i)
        assert item.get_attribute("data-anomaly") == str(result["is_anomaly"]).lower()
        assert item.locator(".mark").count() == int(result["is_anomaly"])
        stats = item.inner_text()
        assert f"MSE {error:.4f}" in stats
        assert f"score {result['score']:.4f}" in stats
    mark = page.locator(".card").last.locator(".mark")
    assert mark.is_visible()
    assert mark.evaluate("e => getComputedStyle(e).color") == "rgb(198, 40, 40)"  # red

    # The heatmap toggle.
    heatmaps = page.locator(".card img.heatmap")
    assert not heatmaps.first.is_visible()
    page.check("#heatmap-toggle")
    assert heatmaps.first.is_visible()
    assert _natural_widths(page, ".card img.heatmap") == [width] * len(uploads)
    page.uncheck("#heatmap-toggle")
    assert not heatmaps.first.is_visible()

    # Interpolation: K+2 images, the slider re-runs it, and the 0.5 / 0.5 average.
    page.select_option("#interp-a", label=uploads[0].name)
    page.select_option("#interp-b", label=uploads[2].name)
    page.fill("#steps", "5")
    assert page.inner_text("#steps-value") == "5"
    page.click("#interpolate")
    page.wait_for_selector("#strip[data-state='done'][data-count='7']")
    assert _natural_widths(page, "#strip img") == [width] * 7
    page.fill("#steps", "0")  # `change` on the slider re-runs the path
    page.wait_for_selector("#strip[data-state='done'][data-count='2']")
    assert page.locator("#strip img").count() == 2
    page.click("#average")
    page.wait_for_selector("#strip[data-mode='average'][data-state='done']")
    assert page.locator("#strip img.average").count() == 1
    assert _natural_widths(page, "#strip img.average") == [width]
    assert page.locator("#strip img").count() == 3  # A, the average, B

    # The picture for the README: heatmaps on, a 6-step path.
    page.check("#heatmap-toggle")
    page.fill("#steps", "6")
    page.click("#interpolate")
    page.wait_for_selector("#strip[data-mode='path'][data-state='done'][data-count='8']")
    page.wait_for_function(
        "() => [...document.images].every(i => !i.getAttribute('src') || i.complete)"
    )
    assert page.locator("#errors .error").count() == 0
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_the_policy_blocks_injected_script_and_styles(browser, server):
    """What the Content-Security-Policy is for: markup injected into the page runs no code.
    (`page.evaluate` itself is the debugger's, which no page policy governs.)"""
    context = browser.new_context()
    # Before any of the page's code; init scripts are the browser's, not the page's.
    context.add_init_script(
        "window.violations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " e => window.violations.push(e.effectiveDirective));"
    )
    try:
        page = context.new_page()
        reply = page.goto(server + "/")
        assert reply.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        page.wait_for_selector("#model-card[data-state='done']")  # the page's own script ran
        assert page.evaluate("window.violations") == []
        page.evaluate(
            """() => {
                const script = document.createElement("script");
                script.textContent = "window.injected = 'inline script'";
                document.head.append(script);
                const img = document.createElement("img");
                img.setAttribute("onerror", "window.injected = 'event handler'");
                img.src = "/no-such-image";
                document.body.append(img);
                const p = '<p id="styled" style="color: rgb(255, 0, 0)">injected</p>';
                document.body.insertAdjacentHTML("beforeend", p);
            }"""
        )
        page.wait_for_function("() => window.violations.length >= 3")
        assert set(page.evaluate("window.violations")) == {
            "script-src-elem",
            "script-src-attr",
            "style-src-attr",
        }
        assert page.evaluate("window.injected") is None
        color = page.eval_on_selector("#styled", "e => getComputedStyle(e).color")
        assert color != "rgb(255, 0, 0)"
    finally:
        context.close()


def test_dropped_files_are_scored(new_page, server, one_per_class):
    page = new_page()
    page.goto(server + "/")
    data = base64.b64encode(one_per_class[0].read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
            return transfer;
        }""",
        [one_per_class[0].name, data],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    _wait_cards(page, 1)
    assert _natural_widths(page, ".card img.recon")[0] > 0


def test_api_errors_are_shown_as_readable_messages(new_page, server, one_per_class, tmp_path):
    page = new_page()
    page.goto(server + "/")
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is a text file, not a photo\n")
    page.set_input_files("#files", [str(one_per_class[0]), str(fake), str(one_per_class[1])])
    _wait_cards(page, done=2, error=1)

    # The server's own message, on the card and in the banner, with the file name and status.
    reply = httpx.post(f"{server}/reconstruct", files={"images": (fake.name, fake.read_bytes())})
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    bad = page.locator(".card[data-state='error']")
    assert bad.get_attribute("data-name") == "notes.jpg"
    assert message in bad.inner_text()
    banner = page.locator("#errors .error-message")
    page.wait_for_function("() => document.querySelectorAll('#errors .error').length >= 1")
    first = banner.first.inner_text()
    assert first.startswith("notes.jpg: ")
    assert message in first and "HTTP 400" in first and "invalid_image" in first
    assert "[object" not in first and "undefined" not in first

    # A 422 from /interpolate: more steps than the server allows.
    page.fill("#steps", "16")
    page.click("#interpolate")
    page.wait_for_selector("#strip[data-state='error']", state="attached")
    last = banner.last.inner_text()
    assert last.startswith("Interpolate: ")
    assert f"above the limit of {MAX_STEPS}" in last and "HTTP 422" in last

    # Messages can be dismissed.
    count = page.locator("#errors .error").count()
    page.locator("#errors .dismiss").first.click()
    assert page.locator("#errors .error").count() == count - 1


def test_api_key_prompt_then_results(new_page, keyed_server, one_per_class):
    page = new_page()
    page.goto(keyed_server + "/")  # the page itself is public: it has to ask for the key

    # GET /model answers 401: the page asks; a wrong key is rejected with the server's message.
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "wrong-key")
    page.click("#key-submit")
    page.wait_for_function(
        "() => document.querySelector('#key-dialog').open && "
        "/rejected/.test(document.querySelector('#key-error').textContent)"
    )
    assert "X-API-Key" in page.inner_text("#key-error")
    page.fill("#key-input", KEY)
    page.click("#key-submit")

    page.wait_for_selector("#model-card[data-state='done']")
    page.wait_for_selector("#figures[data-count]")
    assert page.eval_on_selector_all("#figures img", "els => els.map(e => e.naturalWidth)")
    assert all(w > 0 for w in _natural_widths(page, "#figures img"))
    assert page.evaluate("sessionStorage.getItem('convae.apiKey')") == KEY
    assert page.is_visible("#key-state")

    page.set_input_files("#files", [str(p) for p in one_per_class[:2]])
    _wait_cards(page, 2)
    assert all(w > 0 for w in _natural_widths(page, ".card img.recon"))
    page.click("#interpolate")
    page.wait_for_selector("#strip[data-state='done'][data-count='8']")
    assert page.locator("#errors .error").count() == 0

    # The key lasts for the tab: a reload asks no more.
    page.reload()
    page.wait_for_selector("#model-card[data-state='done']")
    assert not page.is_visible("#key-dialog")


def test_api_key_prompt_cancelled_says_so(new_page, keyed_server):
    page = new_page()
    page.goto(keyed_server + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.click("#key-cancel")
    page.wait_for_selector("#model-card[data-state='error']", state="attached")
    message = page.locator("#errors .error-message").first.inner_text()
    assert message.startswith("Model card: ")
    assert "needs an API key" in message and "HTTP 401" in message


def test_generate_section_shows_the_served_images_again_for_a_seed(new_page, server):
    page = new_page()
    page.goto(server + "/")
    card = httpx.get(f"{server}/model", timeout=10).json()
    classes = card["generation"]["classes"]
    page.wait_for_selector("#model-card[data-state='done']")
    assert page.eval_on_selector_all("#gen-class option", "els => els.map(e => e.value)") == [
        "",
        *classes,
    ]

    page.select_option("#gen-class", classes[2])
    page.fill("#gen-temperature", "0.5")
    assert page.inner_text("#gen-temperature-value") == "0.5"
    page.fill("#gen-seed", "7")
    page.fill("#gen-n", "4")
    page.click("#generate")
    page.wait_for_selector("#gen-strip[data-state='done'][data-count='4']")
    request = {"n": 4, "seed": 7, "temperature": 0.5, "class": classes[2]}
    served = httpx.post(f"{server}/generate", json=request, timeout=60).json()
    shown = page.eval_on_selector_all("#gen-strip img", "els => els.map(e => e.src)")
    assert shown == [f"data:image/png;base64,{b}" for b in served["images"]]
    assert _natural_widths(page, "#gen-strip img") == [card["input"]["width"]] * 4
    captions = page.eval_on_selector_all(
        "#gen-strip figcaption", "els => els.map(e => e.textContent)"
    )
    assert all(c.startswith(classes[2]) for c in captions)
    assert "seed 7" in page.inner_text("#gen-hint")

    # No seed: one is drawn, shown, and reproduces the same images.
    page.fill("#gen-seed", "")
    page.select_option("#gen-class", "")
    page.click("#generate")
    page.wait_for_function(
        "() => { const s = document.querySelector('#gen-strip');"
        " return s.dataset.state === 'done' && s.dataset.seed !== '7'; }"
    )
    seed = int(page.get_attribute("#gen-strip", "data-seed"))
    again = httpx.post(f"{server}/generate", json={"n": 4, "seed": seed, "temperature": 0.5})
    shown = page.eval_on_selector_all("#gen-strip img", "els => els.map(e => e.src)")
    assert shown == [f"data:image/png;base64,{b}" for b in again.json()["images"]]

    # The server's limit comes back as a readable error.
    page.fill("#gen-n", "500")
    page.click("#generate")
    page.wait_for_selector("#gen-strip[data-state='error']", state="attached")
    message = page.locator("#errors .error-message").last.inner_text()
    assert message.startswith("Generate: ") and "HTTP 422" in message and "limit" in message


# ---------------------------------------------------------------------------------------------
# The routes, in process (no browser needed). While this module's Playwright (sync API) is
# alive it holds an event loop in the main thread, so these run their own loop in a thread.


def _in_thread(check, *args) -> None:
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, check(*args)).result()


def test_page_fetches_nothing_from_elsewhere():
    """No CDN, no web fonts: the page works with no network beyond the service."""
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"https?://|(src|href)=[\"']?//|url\(\s*[\"']?//|@import", text), name


def test_page_and_assets_are_served_and_public():
    _in_thread(_page_and_assets)


async def _page_and_assets():
    async with running(api_key=KEY) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert 'src="/static/app.js"' in page.text
        assert page.headers["x-content-type-options"] == "nosniff"
        policy = dict(
            d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";")
        )
        assert policy["script-src"] == policy["style-src"] == "'self'"  # no inline code
        assert policy["frame-ancestors"] == "'none'"
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            reply = await client.get(f"/static/{name}")
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith(kind)
            assert reply.headers["x-content-type-options"] == "nosniff"
            assert reply.content == (STATIC / name).read_bytes()
        for path in ("/static/nothing.js", "/static/..%2Fapp.py", "/static/%2E%2E", "/static/"):
            reply = await client.get(path)
            assert reply.status_code == 404, path
            assert reply.json()["error"]["code"] == "not_found"
        # The report figures are model data: they need the key, like GET /model.
        assert (await client.get("/model/report")).status_code == 401
        assert (await client.get("/model/report/loss.png")).status_code == 401
        listing = await client.get("/model/report", headers={"X-API-Key": KEY})
        assert listing.status_code == 200
        assert "/" not in client.app.openapi()["paths"]  # the page is not an API endpoint


def test_report_figures_only_from_the_report_folder(tmp_path):
    # A model folder whose report has one real figure, one non-figure, and a link out of it.
    source = _report_dir().parent
    folder = tmp_path / "models" / "intel-scenes" / "1"
    (folder / "report").mkdir(parents=True)
    for path in source.iterdir():  # everything the manifest names, whatever it is
        if path.is_file():
            (folder / path.name).symlink_to(path)
    figure = sorted((source / "report").glob("*.png"))[0]
    shutil.copy(figure, folder / "report" / figure.name)
    (folder / "report" / "report.md").write_text("# report\n")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not for you")
    (folder / "report" / "escape.png").symlink_to(secret)
    (folder / "fake.png").write_bytes(b"\x89PNG beside the report")

    _in_thread(_only_report_figures, tmp_path, figure)


async def _only_report_figures(tmp_path: Path, figure: Path):
    async with running(model_dir=tmp_path / "models") as client:
        listing = await client.get("/model/report")
        assert listing.json() == {"figures": [figure.name]}
        reply = await client.get(f"/model/report/{figure.name}")
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "image/png"
        assert reply.content == figure.read_bytes()
        for name in (
            "escape.png",
            "report.md",
            "missing.png",
            "..%2Ffake.png",
            "..%2Fmodel.json",
            "%2E%2E%2F%2E%2E%2F%2E%2E%2Fsecret.png",
            "%2E%2E",
            "%2Fetc%2Fpasswd",
        ):
            reply = await client.get(f"/model/report/{name}")
            assert reply.status_code == 404, name
            assert reply.headers["content-type"].startswith("application/json")
            assert reply.json()["error"]["code"] == "not_found", name
            assert b"not for you" not in reply.content and b"beside" not in reply.content


def test_denoise_section_adds_noise_and_shows_the_psnr(new_page, server, one_per_class):
    page = new_page()
    page.goto(server + "/")
    page.wait_for_selector("#denoise-hint[data-model^='intel-scenes-denoise v']")
    page.fill("#denoise-sigma", "25")
    assert page.inner_text("#denoise-sigma-value") == "25"
    page.set_input_files("#denoise-file", str(one_per_class[2]))  # picking starts the request
    page.wait_for_selector("#denoise-out[data-state='done']")
    assert page.locator("#denoise-out img").count() == 3  # original, noisy, cleaned
    # Predicates are functions: a bare expression is eval()'d, which the page's policy forbids.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#denoise-out img')].every(i => i.naturalWidth === 128)"
    )
    noisy = float(page.get_attribute("#denoise-out", "data-psnr-noisy"))
    cleaned = float(page.get_attribute("#denoise-out", "data-psnr-cleaned"))
    assert 18.0 < noisy < 23.0  # sigma 25 on the 0-255 scale is about 20 dB
    assert cleaned > noisy + 3.0
    assert f"{cleaned:.2f} dB" in page.inner_text("#denoise-out")

    page.fill("#denoise-sigma", "0")  # the upload itself: no clean reference, no PSNR
    page.click("#denoise-run")
    page.wait_for_function(
        "() => (o => o.dataset.state === 'done' && o.querySelectorAll('img').length === 2)"
        "(document.querySelector('#denoise-out'))"
    )
    assert page.get_attribute("#denoise-out", "data-psnr-cleaned") == ""
    assert page.locator("#errors .error").count() == 0
