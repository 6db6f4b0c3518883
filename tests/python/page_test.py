#!/usr/bin/python3
"""The page at / of the real emoserve-server, in headless Chromium driven
through WebDriver: it loads offline (nothing but its own files), a clip
picked in the file input shows the label POST /v1/classify gives, with all
probabilities and the timeline plot; then a fake microphone playing the
clip is recorded and live windows, speech events and an utterance appear.
A screenshot of each state goes to --artifacts.

  page_test.py --server BIN --model DIR --artifacts DIR

RAVDESS comes from $EMOSERVE_SHARED_DIR; without it the repository's
synthetic sample (examples/hello.wav) is used.
Exit code 77 (ctest: skipped) when Chromium, its driver or Selenium is missing.
"""
import json
import os
import pathlib
import shutil
import sys
import tempfile
import unittest
import urllib.request

from support import (SKIP, ServerProcess, free_port, parse_test_args, ravdess_clip,
                     stop_and_clean)

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 60


ARGS = parse_test_args(__doc__, required=("--server", "--model", "--artifacts"))
try:
    import soundfile  # noqa: E402
    from selenium import webdriver  # noqa: E402
    from selenium.webdriver.chrome.service import Service  # noqa: E402
    from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
    from selenium.webdriver.common.by import By  # noqa: E402
    from selenium.webdriver.common.keys import Keys  # noqa: E402
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
except ImportError as error:
    print(f"SKIP: {error} (python3-selenium and python3-soundfile are needed)")
    sys.exit(SKIP)
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    print("SKIP: chromium and chromium-driver are needed")
    sys.exit(SKIP)

SCRATCH = SERVER = HTTP_PORT = CLIP = DRIVER = None
ARTIFACTS = pathlib.Path(ARGS.artifacts)


def make_clip(scratch):
    """A 16-bit WAV of a RAVDESS clip (or the sample): Chromium's fake
    microphone plays WAV files only."""
    flac = ravdess_clip()
    if flac is None:
        return ROOT / "examples" / "hello.wav"
    samples, rate = soundfile.read(str(flac), dtype="int16")
    wav = pathlib.Path(scratch) / "clip.wav"
    soundfile.write(str(wav), samples, rate, subtype="PCM_16")
    return wav


def start_browser(clip):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,1600", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={clip}",
                 "--autoplay-policy=no-user-gesture-required", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def setUpModule():
    global SCRATCH, SERVER, HTTP_PORT, CLIP, DRIVER
    SCRATCH = tempfile.mkdtemp(prefix="emoserve_page_")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    HTTP_PORT = free_port()
    SERVER = ServerProcess(ARGS.server, SCRATCH,
                           ["--model", ARGS.model, "--http-port", str(HTTP_PORT)])
    CLIP = make_clip(SCRATCH)
    DRIVER = start_browser(CLIP)


def tearDownModule():
    if DRIVER is not None:
        DRIVER.quit()
    stop_and_clean(SERVER, SCRATCH)


def wait_for(condition, what):
    return WebDriverWait(DRIVER, WAIT_S).until(lambda _: condition(), message=what)


def text(element_id):
    return DRIVER.find_element(By.ID, element_id).text


def screenshot(name):
    path = ARTIFACTS / name
    DRIVER.save_screenshot(str(path))
    print(f"screenshot: {path}")


class PageTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        DRIVER.get(f"http://127.0.0.1:{HTTP_PORT}/")
        wait_for(lambda: text("model").startswith("Model "), "the model's description")

    def test_1_the_page_is_labelled_and_keyboard_operable(self):
        self.assertEqual(DRIVER.title, "emoserve: the emotion in a voice")
        labels = DRIVER.find_elements(By.CSS_SELECTOR, "label[for=file]")
        self.assertEqual(len(labels), 1)
        self.assertTrue(labels[0].text.strip())
        # Tab order: the file input, then the record button.
        DRIVER.execute_script("document.activeElement && document.activeElement.blur()")
        ActionChains(DRIVER).send_keys(Keys.TAB).perform()
        self.assertEqual(DRIVER.switch_to.active_element.get_attribute("id"), "file")
        ActionChains(DRIVER).send_keys(Keys.TAB).perform()
        record = DRIVER.switch_to.active_element
        self.assertEqual(record.get_attribute("id"), "record")
        self.assertEqual(record.get_attribute("aria-pressed"), "false")

    def test_2_a_picked_file_shows_the_servers_label_probabilities_and_plot(self):
        request = urllib.request.Request(
            f"http://127.0.0.1:{HTTP_PORT}/v1/classify?timeline=true", data=CLIP.read_bytes(),
            method="POST")
        with urllib.request.urlopen(request, timeout=WAIT_S) as reply:
            want = json.load(reply)
        DRIVER.find_element(By.ID, "file").send_keys(str(CLIP))
        wait_for(lambda: text("file-label"), "the file's label")
        self.assertEqual(text("file-label"), want["topLabel"])
        rows = DRIVER.find_elements(By.CSS_SELECTOR, "#file-scores tbody tr")
        self.assertEqual(len(rows), len(want["scores"]))
        self.assertTrue(rows[0].text.startswith(want["scores"][0]["label"]))
        self.assertIn(f"{100 * want['scores'][0]['probability']:.1f}%", rows[0].text)
        lines = DRIVER.find_elements(By.CSS_SELECTOR, "#file-plot polyline")
        self.assertGreater(len(lines), 0)
        self.assertFalse(DRIVER.find_element(By.ID, "file-error").is_displayed())
        screenshot("1-file-classified.png")

    def test_3_recording_shows_live_windows_and_an_utterance(self):
        record = DRIVER.find_element(By.ID, "record")
        record.click()
        wait_for(lambda: text("live-label") not in ("", "—"), "a live window with speech")
        # Five windows (about 9 s of the looping clip) in the plot.
        plot = DRIVER.find_element(By.ID, "live-plot")
        wait_for(lambda: int(plot.get_attribute("data-windows") or 0) >= 5, "five live windows")
        self.assertGreater(len(plot.find_elements(By.TAG_NAME, "polyline")), 0)
        self.assertEqual(record.get_attribute("aria-pressed"), "true")
        self.assertIn(text("live-status"), ("Listening", "Speech", "Silence"))
        screenshot("2-recording.png")
        # The fake microphone loops the clip, so an utterance ends within
        # its pauses or, at the latest, when recording stops.
        record.click()
        wait_for(lambda: text("live-status") == "Stopped", "the stream's end")
        utterances = DRIVER.find_elements(By.CSS_SELECTOR, "#utterances li")
        self.assertGreater(len(utterances), 0)
        self.assertRegex(utterances[-1].text, r"^\d+\.\d–\d+\.\d s: \w+ \(\d+\.\d%, \d+ windows\)$")
        self.assertFalse(DRIVER.find_element(By.ID, "live-error").is_displayed())
        screenshot("3-recording-stopped.png")

    def test_4_the_browser_reported_no_errors(self):
        # CSP violations, failed loads and script errors are SEVERE entries.
        severe = [entry["message"] for entry in DRIVER.get_log("browser")
                  if entry["level"] == "SEVERE"]
        self.assertEqual(severe, [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
