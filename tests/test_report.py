"""`edge-daemon report` from real state directories.

The main fixture builds one the way a device would: readings in a real
SQLite replay store, a base model pretrained on the old regime, then a real
LoRA update run by `training.job` (in-process) after a regime change, whose
memory level rises mid-update so the plan tightens, then more readings
served by the new adapter. A second, rejected update leaves only its trace.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_daemon.artifacts.adapters import AdapterStore
from edge_daemon.artifacts.traces import TRACE_FILE, UPDATES_DIR, save_update_trace
from edge_daemon.cli import main as cli_main
from edge_daemon.config import Config
from edge_daemon.frames import build_grid
from edge_daemon.training.pretrain import pretrain
from edge_daemon.report import write_report
from edge_daemon.store import Reading, ReplayStore
from edge_daemon.training.records import JobResult, Progress, UpdateJob
from edge_daemon.training.job import _run_update
from edge_daemon.training.governor import PlanGovernor
from edge_daemon.memory.pressure import Level
from edge_daemon.training.plan import plan_candidates
from sample_sensors.generate import CHANNELS, generate_labeled, readings
from tests.conftest import make_config

pytest.importorskip("matplotlib")

OLD_STEPS = 2400
NEW_STEPS = 900
AFTER_STEPS = 400  # new-regime readings that arrive after the adapter is committed
START_TS = 1.7e9
HIGH_FROM_STEP = 25  # memory level turns "high" once the update has done this many steps


def report_config(root: Path, **train: Any) -> Config:
    return make_config(
        root,
        model={"window": 32, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64},
        train={"steps": 40, "batch_size": 16, "micro_batch": 16, "lr": 5e-3, "recent_hours": NEW_STEPS / 3600, **train},
        store={"segment_s": 300},
        drift={"input_window_s": 600, "residual_window_s": 600},  # a (compressed) day
    )


def write_readings(config: Config, data: Any, begin: int, end: int) -> None:
    with ReplayStore(config.store_path, config.store, list(CHANNELS)) as store:
        store.write([Reading(c, float(data.ts[k]), float(data.values[c][k])) for k in range(begin, end) for c in CHANNELS])


class ProgressSink:
    """Stands where the child's result queue is: keeps the messages and the highest step seen."""

    def __init__(self) -> None:
        self.messages: list[Progress] = []
        self.step = 0

    def put(self, message: Progress) -> None:
        self.messages.append(message)
        self.step = max(self.step, message.step or 0)


def run_update(config: Config, high_from_step: int | None, seed: int) -> JobResult:
    sink = ProgressSink()

    def level() -> Level:
        return Level.HIGH if high_from_step is not None and sink.step >= high_from_step else Level.NORMAL

    governor = PlanGovernor(level, plan_candidates(config.train.batch_size, config.train.micro_batch))
    job = UpdateJob("update", "drift detected", candidates=tuple(governor.start_candidates()), baseline_mb=300.0, budget_mb=4000.0, seed=seed)
    return _run_update(config, job, governor, threading.Event(), sink)


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Config:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report-state")
    config = report_config(root, gate_tolerance=5.0)
    data = generate_labeled(OLD_STEPS + NEW_STEPS + AFTER_STEPS, start_ts=START_TS, seed=7, regime_change_at=OLD_STEPS, time_scale=144)
    write_readings(config, data, 0, OLD_STEPS + NEW_STEPS)
    n = OLD_STEPS
    grid = build_grid(*readings(data, 0, n), 3, 1.0, config.channels.max_fill_steps)
    pretrain(grid, list(CHANNELS), 1.0, config.model, config.base_dir, steps=200)
    reply = run_update(config, HIGH_FROM_STEP, seed=1)
    assert reply.accepted and reply.version == 1, reply.reason
    AdapterStore(config.adapters_dir).make_current(1)  # as the daemon does once it serves v1
    write_readings(config, data, OLD_STEPS + NEW_STEPS, OLD_STEPS + NEW_STEPS + AFTER_STEPS)
    # An update that cannot pass the gate (99% improvement required) leaves only its trace.
    rejected = run_update(config.model_copy(update={"train": config.train.model_copy(update={"gate_min_improvement": 0.99})}), None, seed=2)
    assert not rejected.accepted
    return config


class _LinkParser(HTMLParser):
    """Every URL-valued attribute of the page, and every url(...) in its styles."""

    URL_ATTRIBUTES = frozenset({"src", "href", "srcset", "action", "formaction", "poster", "data", "background", "cite"})

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in self.URL_ATTRIBUTES and value is not None:
                self.links.append(value.strip())
            elif name == "style" and value:
                self.links.extend(_css_urls(value))

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.links.extend(_css_urls(data))


def _css_urls(css: str) -> list[str]:
    imports = re.findall(r"@import\s+['\"]([^'\"]+)", css)
    return imports + [u.strip("'\" ") for u in re.findall(r"url\(([^)]*)\)", css)]


def page_links(page: str) -> list[str]:
    parser = _LinkParser()
    parser.feed(page)
    parser.close()
    return parser.links


def test_page_links_finds_what_a_browser_would_fetch() -> None:
    page = (
        "<html><head><link rel=stylesheet href='https://cdn.example/x.css'><style>@import 'a.css'; "
        "body{background:url(http://x/y.png)}</style><script src='s.js'></script></head>"
        "<body><img src='data:image/png;base64,AAAA'><a href='#top'>top</a></body></html>"
    )
    assert page_links(page) == ["https://cdn.example/x.css", "a.css", "http://x/y.png", "s.js", "data:image/png;base64,AAAA", "#top"]


def decode_png(data: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return np.asarray(imread(io.BytesIO(data), format="png"))


def assert_real_picture(pixels: np.ndarray) -> None:
    assert pixels.ndim == 3 and pixels.shape[0] >= 300 and pixels.shape[1] >= 800, pixels.shape
    rgb = pixels[::2, ::2, :3].reshape(-1, 3)
    packed = (rgb * 255).astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.uint32)
    colours = np.unique(packed)
    assert len(colours) > 50, "a plot has many colours (antialiased lines, text); this looks blank"
    # Not mostly one colour: at least 3% of pixels differ from the background.
    background = np.median(rgb, axis=0)
    assert np.mean(np.abs(rgb - background).sum(axis=1) > 0.05) > 0.03


def test_update_job_records_traces(state: Config) -> None:
    traces = sorted((state.device.state_dir / UPDATES_DIR).glob("*.json"))
    assert len(traces) == 2
    accepted, rejected = (json.loads(p.read_text()) for p in traces)
    assert accepted["outcome"] == "accepted" and accepted["version"] == 1
    assert rejected["outcome"] == "rejected" and rejected["version"] is None and "does not improve" in rejected["detail"]
    # The accepted adapter carries the same trace, and when it began serving on the data's clock.
    in_adapter = json.loads((state.adapters_dir / "v1" / TRACE_FILE).read_text())
    assert in_adapter["started_unix"] == accepted["started_unix"]
    meta = json.loads((state.adapters_dir / "v1" / "meta.json").read_text())
    assert meta["served_from_ts"] == pytest.approx(START_TS + OLD_STEPS + NEW_STEPS - 1, abs=1.0)
    # Memory over time, and the plan tightening when the level turned high at step 25.
    samples = accepted["samples"]
    # A sample at the start, at each phase and plan change, and at the end, besides periodic ones.
    assert len(samples["t"]) >= 2 + len(accepted["phases"]) + len(accepted["plans"]) and all(r > 50 for r in samples["rss_mb"])
    assert samples["t"] == sorted(samples["t"])
    plans = accepted["plans"]
    assert [p["level"] for p in plans] == ["normal", "high"]
    # fp32 state throughout: on this small LoRA 8-bit state would save less than importing bitsandbytes costs.
    assert plans[0]["plan"]["optimizer"] == "adamw" and plans[1]["plan"]["optimizer"] == "adamw"
    assert plans[1]["plan"]["micro_batch"] < plans[0]["plan"]["micro_batch"]
    step_at_change = np.interp(plans[1]["t"], accepted["steps"]["t"], accepted["steps"]["step"])
    assert HIGH_FROM_STEP <= step_at_change <= HIGH_FROM_STEP + 1
    assert accepted["steps"]["step"] == list(range(1, 41))
    assert [p["phase"] for p in accepted["phases"]][:3] == ["loading", "planning", "training"]


def test_update_traces_keep_the_newest(tmp_path: Path) -> None:
    for k in range(25):
        save_update_trace(tmp_path, {"started_unix": 1.7e9 + k, "outcome": "rejected"}, keep=20)
    kept = sorted((tmp_path / UPDATES_DIR).glob("*.json"))
    assert len(kept) == 20
    assert json.loads(kept[0].read_text())["started_unix"] == 1.7e9 + 5


def test_report_from_state_dir(state: Config, tmp_path: Path) -> None:
    out = tmp_path / "report"
    files = write_report(state, out)
    names = [f.name for f in files]
    assert names[:3] == ["channels.png", "anomaly.png", "drift.png"]
    assert sum(n.startswith("update-") for n in names) == 2 and names[-1] == "index.html"
    assert all(f.is_file() and f.parent == out for f in files)

    page = (out / "index.html").read_text()
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == len(files) - 1
    for png, encoded in zip(files[:-1], embedded, strict=True):
        assert base64.b64decode(encoded) == png.read_bytes()
        assert_real_picture(decode_png(png.read_bytes()))
    assert "v1 (current)" in page
    assert f"{3 * (OLD_STEPS + NEW_STEPS + AFTER_STEPS):,}" in page  # readings count
    assert "2023-11-14T22:13:20Z" in page  # oldest reading (START_TS)
    assert "accepted v1" in page and "rejected" in page
    # The base and the adapter against the baselines on their held-out windows.
    yardstick = page[page.index("Against the baselines") :]
    assert "<td>base model</td>" in yardstick and "<td>v1</td>" in yardstick and "persistence" in yardstick
    # Self-contained: every link or resource the page names is embedded or on the page itself.
    links = page_links(page)
    assert len([v for v in links if v.startswith("data:image/png;base64,")]) == len(embedded)
    assert all(v.startswith(("data:", "#")) for v in links), [v[:80] for v in links if not v.startswith(("data:", "#"))]


def test_report_shows_adaptation(state: Config) -> None:
    """The recomputed scores say what happened: high on the new regime under the base, lower once v1 serves."""
    from edge_daemon.report.data import collect

    data = collect(state)
    fc = data.forecasts
    assert fc is not None and fc.stride == 1
    served_by_v1 = fc.served_version == 1
    assert served_by_v1.sum() >= AFTER_STEPS - 2
    # The base starts from the ridge fit and already follows much of the new regime; v1's gain is smaller
    # than a transformer-only base's was, but a report that did not replay v1 would show none (ratio 1).
    assert np.mean(fc.served_score[served_by_v1]) < 0.9 * np.mean(fc.base_score[served_by_v1])
    old = fc.t < START_TS + OLD_STEPS
    assert np.array_equal(fc.served[old], fc.base[old])
    assert any(e.kind == "inputs" and e.t >= START_TS + OLD_STEPS for e in data.drift_events)


def test_report_reads_right(state: Config, tmp_path: Path) -> None:
    """What a new user read wrong: detections labelled with a detector that did not judge them, the
    forecast hiding its error, a cramped update axis under its legend, "served model" against
    "serves first: ridge"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.legend import Legend

    from edge_daemon.report.data import collect
    from edge_daemon.report.figures import channels_figure, drift_judges, update_figure

    data = collect(state)
    page = write_report(state, tmp_path / "report", data=data)[-1].read_text()
    # Default settings: the inputs' day window (PSI) and the residuals' window with its CUSUM, not ADWIN.
    judges = drift_judges(state.drift)
    assert "PSI" in judges["inputs"] and "CUSUM" in judges["residuals"]
    assert html.escape(judges["inputs"]) in page and html.escape(judges["residuals"]) in page
    assert "adwin" not in page.lower()
    # The model's forecasts are said to be the model's; the baselines' serving is named as such.
    assert "served model" not in page and "model in use" in page
    assert "mean anomaly score while v1 was in use" in page
    # Each forecast channel has an error panel: forecast - reading, as the replay made them.
    fig = channels_figure(data)
    assert len(fig.axes) == 2 * len(CHANNELS)
    error_ax = fig.axes[1]
    fc = data.forecasts
    assert fc is not None and data.base is not None
    expected = data.base.norm.invert(fc.served)[:, 0] - data.base.norm.invert(fc.actual)[:, 0]
    series = [line for line in error_ax.lines if len(line.get_ydata()) > 2]  # not the zero or switch lines
    drawn = np.asarray(series[-1].get_ydata(), dtype=np.float64)  # the base's error (after v1's switch), then the served
    assert len(drawn) == len(expected) and np.allclose(drawn, expected, atol=1e-3)
    reading, *forecasts = fig.axes[0].lines[:3]
    assert all(line.get_linestyle() != reading.get_linestyle() for line in forecasts)
    assert not any(isinstance(child, Legend) for ax in fig.axes for child in ax.get_children())  # the legend is the figure's
    # An update of half a second: the axis covers every step and event, and the legend stands beside the plot.
    trace = dict(data.updates[0])
    trace["duration_s"] = 0.5
    fig = update_figure(trace)
    ax_mem, ax_loss = fig.axes[:2]
    assert ax_loss.get_xlim()[1] >= max(trace["steps"]["t"] + trace["samples"]["t"])
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    assert ax_mem.get_legend().get_window_extent(renderer).x0 >= ax_mem.get_window_extent(renderer).x1


def test_report_follows_a_rollback_to_the_base_model(state: Config, tmp_path: Path) -> None:
    """A recorded switch back to the base (data time mid-way through v1's period) is replayed as such."""
    import shutil

    from edge_daemon.artifacts.adapters import AdapterStore
    from edge_daemon.report.data import collect

    copy_root = tmp_path / "copy"
    config = report_config(copy_root, gate_tolerance=5.0)
    shutil.copytree(state.device.state_dir, config.device.state_dir)
    back_to_base_at = START_TS + OLD_STEPS + NEW_STEPS + AFTER_STEPS // 2
    store = AdapterStore(config.adapters_dir, keep=config.train.keep_versions)
    assert [e["event"] for e in store.history()] == ["commit"]
    store.use_base(data_ts=back_to_base_at)
    assert [(e["event"], e["version"]) for e in store.history()] == [("commit", 1), ("use_base", None)]
    fc = collect(config).forecasts
    assert fc is not None
    after = fc.t >= back_to_base_at
    assert after.any() and (fc.served_version[after] == 0).all()
    assert np.array_equal(fc.served[after], fc.base[after])
    before = (fc.served_version == 1) & ~after
    assert before.sum() >= AFTER_STEPS // 2 - 2


def test_report_without_adapters(tmp_path: Path) -> None:
    """Only a store and a base: forecasts and drift, no adapters, no updates."""
    torch.set_num_threads(1)
    config = report_config(tmp_path)
    data = generate_labeled(900, start_ts=START_TS, seed=3, time_scale=144)
    write_readings(config, data, 0, 900)
    grid = build_grid(*readings(data), 3, 1.0, 5)
    pretrain(grid, list(CHANNELS), 1.0, config.model, config.base_dir, steps=20)
    files = write_report(config, tmp_path / "out")
    assert [f.name for f in files] == ["channels.png", "anomaly.png", "drift.png", "index.html"]
    page = files[-1].read_text()
    assert "No adapters stored" in page and "No update traces recorded" in page
    assert not (config.adapters_dir).exists()  # a report does not change the state dir
    assert_real_picture(decode_png(files[0].read_bytes()))


def test_report_without_base_still_plots_the_channels(tmp_path: Path) -> None:
    config = report_config(tmp_path)
    data = generate_labeled(300, start_ts=START_TS, seed=3)
    write_readings(config, data, 0, 300)
    files = write_report(config, tmp_path / "out")
    assert [f.name for f in files] == ["channels.png", "drift.png", "index.html"]
    assert "no base model" in files[-1].read_text()


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = report_config(tmp_path)
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        f"""
[device]
id = "test-dev"
state_dir = "{config.device.state_dir}"
socket = "{tmp_path / 'control.sock'}"
[mqtt]
host = "127.0.0.1"
[channels]
names = {json.dumps(list(CHANNELS))}
"""
    )
    # No store yet: exit 1 with a message naming what is missing.
    assert cli_main(["report", "--config", str(config_file), "--out", str(tmp_path / "out")]) == 1
    assert "no replay store" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    write_readings(config, generate_labeled(200, start_ts=START_TS, seed=3), 0, 200)
    assert cli_main(["report", "--config", str(config_file), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-1] == str(tmp_path / "out" / "index.html") and all(Path(p).is_file() for p in printed)


@pytest.mark.slow
def test_demo_writes_a_report(tmp_path: Path) -> None:
    from edge_daemon.demo import run_demo

    summary = run_demo(state_dir=tmp_path / "demo", live=False, timeout_s=240)
    assert summary["update_accepted"]
    index = Path(summary["report"])
    assert index == tmp_path / "demo" / "report" / "index.html" and index.is_file()
    page = index.read_text()
    assert "v1 (current)" in page and page.count("data:image/png;base64,") >= 4
    for png in index.parent.glob("*.png"):
        assert_real_picture(decode_png(png.read_bytes()))
