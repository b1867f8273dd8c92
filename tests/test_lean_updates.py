"""The optimizer step in backward and forward-only updates: the same weights as the ordinary step,
no gradient ever held, the memory of a scoring pass, the last rung before a pause."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from edge_daemon.memory.pressure import Level
from edge_daemon.model import forecast_loss
from edge_daemon.training.blocks import estimate_block_grad_norms, measure_block_grad_norms
from edge_daemon.training.forward_only import Direction, forward_only_step
from edge_daemon.training.governor import FORWARD_ONLY_GRACE_S, PlanGovernor
from edge_daemon.training.loop import StepInBackward, update
from edge_daemon.training.lora import attach_lora
from edge_daemon.training.optimizer import AdamW
from edge_daemon.training.plan import TrainingPlan, choose_start_plan, forward_only, plan_from_config, plan_ladder, tighten, with_step_in_backward
from tests.test_trainer import base, data, lora, regime, train_cfg  # noqa: F401  (fixtures)

N, E, H, C = Level.NORMAL, Level.ELEVATED, Level.HIGH, Level.CRITICAL
TARGETS = ["blocks.0.attn.qkv", "blocks.1.fc1", "blocks.2.fc2"]


def adapted(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    lora_model = attach_lora(copy.deepcopy(model), TARGETS, r=4, alpha=8.0)
    # B starts at zero; move it so every adapter weight has a gradient.
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return lora_model, [p for p in lora_model.parameters() if p.requires_grad]


def test_the_step_in_backward_gives_the_ordinary_steps_weights_and_holds_no_gradient(base) -> None:  # noqa: F811
    batch = regime(8, 12, seed=9)
    ordinary, ordinary_params = adapted(base)
    fused = copy.deepcopy(ordinary)
    fused_params = [p for p in fused.parameters() if p.requires_grad]
    ordinary_opt, fused_opt = AdamW(ordinary_params, lr=1e-2), AdamW(fused_params, lr=1e-2)
    hooks = StepInBackward(fused_params, fused_opt, max_norm=float("inf"))
    held: list[int] = []
    # Each hook sees the gradients present when it runs: at most its own, the rest already freed.
    watch = [p.register_post_accumulate_grad_hook(lambda _p: held.append(sum(q.grad is not None for q in fused_params))) for p in fused_params]
    for _ in range(2):
        forecast_loss(ordinary, batch).backward()
        ordinary_opt.step()
        ordinary_opt.zero_grad()
        forecast_loss(fused, batch).backward()
    for handle in watch:
        handle.remove()
    hooks.remove()
    assert all(p.grad is None for p in fused_params)
    assert max(held) <= 1
    for a, b in zip(ordinary_params, fused_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert hooks.take_norm() > 0


def test_the_step_in_backward_clips_each_gradient_to_its_share() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = AdamW([p], lr=0.0)
    seen: list[float] = []
    hooks = StepInBackward([p, torch.nn.Parameter(torch.zeros(1))], optimizer, max_norm=1.0)
    p.register_post_accumulate_grad_hook(lambda q: seen.append(0.0))  # runs after the step: the gradient is gone
    (p * torch.tensor([30.0, 40.0, 0.0, 0.0])).sum().backward()
    assert optimizer.state[p]["exp_avg"].norm() == pytest.approx(0.1 * (1.0 / 2**0.5), rel=1e-4)  # (1 - beta1) x the clipped norm
    assert hooks.take_norm() == pytest.approx(50.0)


def test_an_update_with_the_step_in_backward_trains_like_the_ordinary_one(base, data) -> None:  # noqa: F811
    """The whole update with `[train] step_in_backward = "on"`: the same adapter after one step
    (no clipping), and the plan and the meta's techniques say so."""
    results = {}
    for setting in ("off", "on"):
        cfg = train_cfg(steps=1, max_grad_norm=0.0, step_in_backward=setting)
        results[setting] = update(base, **data, lora_cfg=lora(), train_cfg=cfg, plan=plan_from_config(cfg), seed=3, keep_rejected=True)
    off, on = results["off"], results["on"]
    assert on.plan_history[0].plan.step_in_backward and not off.plan_history[0].plan.step_in_backward
    assert "step_in_backward" in on.techniques and "step_in_backward" not in off.techniques
    for (name, a), (_, b) in zip(off.adapted.named_parameters(), on.adapted.named_parameters(), strict=True):
        if "lora_" in name:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert on.grad_norms[0] == pytest.approx(off.grad_norms[0], rel=1e-5)


def test_plans_with_the_step_in_backward_exclude_accumulation_and_8bit_state() -> None:
    with pytest.raises(ValueError):
        TrainingPlan(8, 4, False, "adamw", step_in_backward=True)
    with pytest.raises(ValueError):
        TrainingPlan(32, 1, False, "adamw8bit", step_in_backward=True)
    loose = with_step_in_backward(TrainingPlan(32, 1, False, "adamw"), True)
    assert loose.step_in_backward and "step_in_backward" in loose.techniques
    assert with_step_in_backward(TrainingPlan(8, 4, False, "adamw"), True) == TrainingPlan(8, 4, False, "adamw")
    # High halves the micro-batch: accumulation, so the step in backward ends.
    assert not tighten(loose, H).step_in_backward
    assert tighten(loose, E).step_in_backward
    # Plans recorded before the knobs existed read as without them.
    legacy = {"micro_batch": 8, "accumulation": 4, "checkpointing": True, "optimizer": "adamw"}
    assert TrainingPlan.from_dict(legacy) == TrainingPlan(8, 4, True, "adamw")  # type: ignore[arg-type]
    assert TrainingPlan.from_dict(loose.to_dict()) == loose


def test_the_block_probe_without_a_backward_ranks_like_the_gradients(base) -> None:  # noqa: F811
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.blocks[1].fc2.weight.mul_(8.0)  # block 1 now dominates the loss's sensitivity
    probe = regime(16, 12, seed=2)
    targets = ["attn.qkv", "attn.proj", "fc1", "fc2"]
    before = [p.detach().clone() for p in model.parameters()]
    estimated, measured = estimate_block_grad_norms(model, probe, targets), measure_block_grad_norms(model, probe, targets)
    assert max(range(3), key=lambda b: estimated[b]) == max(range(3), key=lambda b: measured[b]) == 1
    assert all(0.4 < e / m < 2.5 for e, m in zip(estimated, measured, strict=True)), (estimated, measured)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored exactly


def test_a_config_that_leaves_no_ladder_plan_runs_the_one_it_names() -> None:
    """8-bit state without checkpointing: no rung of the ladder has both, so the ladder is that one
    plan rather than every rung, which would ignore both settings."""
    from edge_daemon.config import TrainConfig

    cfg = TrainConfig(gradient_checkpointing="off", optimizer="adamw8bit")
    assert plan_ladder(cfg) == [TrainingPlan(32, 1, False, "adamw8bit")]


def test_a_direction_is_drawn_again_from_its_seed(base) -> None:  # noqa: F811
    model, params = adapted(base)
    before = [p.detach().clone() for p in params]
    direction = Direction(params, seed=11)
    direction.move(0.5)
    moved = [p.detach().clone() for p in params]
    Direction(params, seed=11).move(-0.5)
    for a, b, c in zip(before, params, moved, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.equal(a, c)


def test_a_forward_only_step_keeps_nothing_for_a_backward_and_moves_downhill(base) -> None:  # noqa: F811
    model, params = adapted(base)
    batch = regime(16, 12, seed=9)
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, slope = forward_only_step(model, params, batch, 8, lr=1.0, eps=1e-3, seed=5)
    assert saved == [] and all(p.grad is None for p in params)
    # Along its direction, a small enough step lowers the loss by about lr x slope^2 / n.
    model2 = copy.deepcopy(model)
    params2 = [p for p in model2.parameters() if p.requires_grad]
    with torch.no_grad():
        start = float(forecast_loss(model2, batch))
    forward_only_step(model2, params2, batch, 16, lr=50.0, eps=1e-3, seed=5)
    with torch.no_grad():
        assert float(forecast_loss(model2, batch)) < start


def test_a_forward_only_update_adapts_without_a_backward_and_says_so(base, data) -> None:  # noqa: F811
    cfg = train_cfg(steps=20, forward_only="on", forward_only_step_factor=8, gate_retry="off")
    plan = plan_from_config(cfg)
    assert plan.forward_only and plan_ladder(cfg) == [plan]
    model = copy.deepcopy(base)
    # A backward anywhere (the block probe's included) would accumulate a gradient into the
    # weights it reaches; the adapters are made inside the update, the probe ranks the base's.
    reached: list[str] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: reached.append(name))
    result = update(model, **data, lora_cfg=lora(), train_cfg=cfg, plan=plan, seed=1, keep_rejected=True, in_place=True)
    assert reached == []
    assert result.steps == 160 and result.optimizer_state == {}
    assert result.techniques[-1] == "forward_only"
    assert result.metrics_after["recent_val_loss"] < 0.95 * result.metrics_before["recent_val_loss"]


def test_an_update_turns_forward_only_at_critical_and_carries_on(base, data) -> None:  # noqa: F811
    """The governor's last rung inside a real update: critical in the middle of a step drops that
    step's gradients and optimizer state, and the steps left run forward-only."""
    # Each micro-batch boundary reads the level twice (should_stop, then plan_source): critical
    # comes at the fourth, step 1 after its first micro-batch.
    levels = iter([N] * 6 + [C, C] + [H] * 1000)
    governor = PlanGovernor(lambda: next(levels), forward_only_rung=True)
    cfg = train_cfg(steps=4, batch_size=8, micro_batch=4, forward_only_step_factor=3)
    start = plan_from_config(cfg)
    result = update(base, **data, lora_cfg=lora(), train_cfg=cfg, plan=start, plan_source=governor.plan_source, should_stop=governor.should_stop, seed=2, keep_rejected=True)
    plans = [change.plan for change in result.plan_history]
    assert plans == [start, forward_only(start)]
    # The switch came in step 2 (0-based 1) after one micro-batch: steps 1..3 forward-only, three each.
    assert result.plan_history[1].step == 1 and result.plan_history[1].window == 4
    assert result.steps == 1 + 3 * 3
    assert not governor.outcome().stopped and governor.outcome().final_plan == forward_only(start)


def test_the_governor_stops_a_forward_only_update_at_critical_again_or_after_its_grace() -> None:
    now = [0.0]
    level = [N]
    governor = PlanGovernor(lambda: level[0], forward_only_rung=True, clock=lambda: now[0])
    loose = TrainingPlan(8, 4, True, "adamw")
    governor.begin_update(loose)
    level[0] = C
    assert not governor.should_stop()  # the rung is still to take
    plan = governor.plan_source(loose)
    assert plan == forward_only(loose)
    now[0] += FORWARD_ONLY_GRACE_S / 2
    assert not governor.should_stop() and governor.plan_source(plan) == plan  # giving memory back
    now[0] += FORWARD_ONLY_GRACE_S
    assert governor.should_stop() and governor.outcome().stopped  # still critical: pause

    governor.begin_update(loose)
    level[0] = C
    plan = governor.plan_source(loose)
    level[0] = H
    assert governor.plan_source(plan) == plan  # nothing tighter than forward-only short of a pause
    level[0] = C
    assert governor.plan_source(plan) is None  # critical again

    # Without the rung, critical stops as before; a forward-only start is the last rung already.
    plain = PlanGovernor(lambda: C)
    plain.begin_update(loose)
    assert plain.should_stop()
    started = PlanGovernor(lambda: C, forward_only_rung=True)
    started.begin_update(forward_only(loose))
    assert started.should_stop()


def test_a_forward_only_plan_runs_micro_batches_of_at_most_8_and_keeps_the_batch_exact() -> None:
    assert forward_only(TrainingPlan(32, 1, False, "adamw")) == TrainingPlan(8, 4, False, "adamw", forward_only=True)
    assert forward_only(TrainingPlan(30, 1, True, "adamw8bit")) == TrainingPlan(6, 5, False, "adamw", forward_only=True)
    assert forward_only(TrainingPlan(1, 32, True, "adamw")) == TrainingPlan(1, 32, False, "adamw", forward_only=True)


def test_the_start_plan_falls_back_to_forward_only_where_no_backward_fits() -> None:
    ladder = [TrainingPlan(8, 4, True, "adamw"), TrainingPlan(1, 32, True, "adamw8bit")]
    rung = forward_only(ladder[-1])
    assert choose_start_plan(ladder, lambda p: 50.0, baseline_mb=100.0, limit_mb=120.0, fallback=rung) == rung
    assert choose_start_plan(ladder, lambda p: 50.0, baseline_mb=100.0, limit_mb=120.0) == ladder[-1]
    assert choose_start_plan(ladder, lambda p: 0.5 * p.micro_batch, baseline_mb=100.0, limit_mb=120.0, fallback=rung) == ladder[0]
    # Over the update's share but under the critical line, the tightest plan with a backward runs:
    # forward-only is for where even it would stop.
    assert choose_start_plan(ladder, lambda p: 50.0, baseline_mb=100.0, limit_mb=120.0, fallback=rung, critical_mb=200.0) == ladder[-1]
    assert choose_start_plan(ladder, lambda p: 50.0, baseline_mb=100.0, limit_mb=120.0, fallback=rung, critical_mb=140.0) == rung


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from edge_daemon.memory.usage import tight_malloc
    tight_malloc()  # as in the daemon and its workers: freed blocks go back to the kernel at once
    from edge_daemon.memory.usage import peak_rss_mb, release_memory, reset_peak_rss, process_tree_rss_mb
    from edge_daemon.model import Forecaster, ForecasterConfig, forecast_loss
    from edge_daemon.training.forward_only import forward_only_step
    from edge_daemon.training.lora import attach_lora
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Forecaster(ForecasterConfig(n_channels=4, window=64))
    model = attach_lora(model, ["blocks.0.attn.qkv", "blocks.0.fc1", "blocks.1.attn.qkv", "blocks.1.fc1"], r=4, alpha=8.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch, other = torch.randn(32, 65, 4), torch.randn(32, 65, 4)

    def peak(run):
        run(other)  # first use of every kernel on another batch: set-up is not the step's
        release_memory()
        before = process_tree_rss_mb("self")
        reset_peak_rss()
        run(batch)
        return peak_rss_mb() - before

    def scoring(x):
        with torch.inference_mode():
            forecast_loss(model, x)

    def forward_only(x):
        forward_only_step(model, params, x, 32, lr=1.0, eps=1e-3, seed=1)

    def backward(x):
        forecast_loss(model, x).backward()
        model.zero_grad(set_to_none=True)

    print(json.dumps({"scoring": peak(scoring), "forward_only": peak(forward_only), "backward": peak(backward)}))
    """
)


def test_a_forward_only_steps_peak_is_a_scoring_passs() -> None:
    """Measured by the kernel (VmHWM) in a process of its own, on the default model at micro-batch
    32: a forward-only step's peak is within 2 MB of a scoring pass over the same windows, where a
    backward's is several times more."""
    import json

    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True, timeout=300)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["forward_only"] <= peaks["scoring"] + 2.0, peaks
    assert peaks["backward"] > peaks["forward_only"] + 5.0, peaks


def _stored_with_a_base(tmp_path, **train):  # type: ignore[no-untyped-def]
    """A config whose store holds 1600 s of the sample sensors and whose base is trained on them."""
    from edge_daemon.frames import build_grid
    from edge_daemon.store import Reading, ReplayStore
    from edge_daemon.training.pretrain import pretrain
    from sample_sensors.generate import CHANNELS, generate_labeled, readings
    from tests.conftest import make_config

    config = make_config(
        tmp_path,
        model={"window": 16, "d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32},
        train={
            "steps": 4, "batch_size": 8, "micro_batch": 8, "forward_only_step_factor": 2, "recent_hours": 400 / 3600,
            "gate_tolerance": 5.0, **train,
        },
    )  # fmt: skip
    data = generate_labeled(1600, start_ts=1.7e9, seed=3)
    with ReplayStore(config.store_path, config.store, list(CHANNELS)) as store:
        store.write([Reading(c, float(data.ts[k]), float(data.values[c][k])) for k in range(1600) for c in CHANNELS])
    pretrain(build_grid(*readings(data, 0, 1200), 3, 1.0, config.channels.max_fill_steps), list(CHANNELS), 1.0, config.model, config.base_dir, steps=30)
    return config


def test_a_worker_with_no_room_for_a_backward_starts_forward_only_and_never_runs_one(tmp_path, caplog) -> None:
    """The worker's own check (training.job): where what it holds, a forward and the first
    backward's set-up would cross the plan's limit, the update starts forward-only and trains to
    its gate; with the rung off, it dry-runs the ladder and trains by backward as before."""
    import threading

    from edge_daemon.artifacts.adapters import AdapterStore
    from edge_daemon.training.job import _run_update
    from edge_daemon.training.records import UpdateJob

    config = _stored_with_a_base(tmp_path)

    class Sink:
        def put(self, message: object) -> None:
            pass

    def run(cfg, budget_mb: float):  # type: ignore[no-untyped-def]
        governor = PlanGovernor(lambda: N, plan_ladder(cfg.train), forward_only_rung=cfg.train.forward_only == "auto")
        # The critical line of this budget sits 1 MB above the service's usage: no backward fits.
        job = UpdateJob("update", "requested", candidates=tuple(governor.start_candidates()), baseline_mb=300.0, budget_mb=budget_mb, seed=1)
        return _run_update(cfg, job, governor, threading.Event(), Sink())

    tight = 301.0 / config.memory.critical
    with caplog.at_level("INFO", logger="edge_daemon.training.plan"):
        result = run(config, tight)
    # No plan with a backward was dry-run (each dry run is logged): the check came before them.
    assert not [r for r in caplog.records if "dry run" in r.getMessage()], caplog.text
    assert result.report is not None and result.report.plan_history[0].plan.forward_only, result
    assert result.report.steps == 2 * 4 and "forward_only" in result.report.techniques
    assert result.outcome is not None and result.outcome.start_plan.forward_only
    without = run(config.model_copy(update={"train": config.train.model_copy(update={"forward_only": "off"})}), tight)
    assert without.report is not None and not without.report.plan_history[0].plan.forward_only
    # Far under the critical line but over a tiny share of the usage: the backward fits where the
    # update would not stop, so the update trains by backward (the ladder's tightest plan).
    small_share = config.model_copy(update={"memory": config.memory.model_copy(update={"update_share": 0.001})})
    roomy = run(small_share, 10_000.0)
    assert roomy.report is not None and not roomy.report.plan_history[0].plan.forward_only, roomy.report.plan_history
    assert AdapterStore(config.adapters_dir).current() is None  # committed, not yet current: nothing served by the test


def _not_here(order, out, level, stop):  # type: ignore[no-untyped-def]
    """The helper's update entry point in the test below: reports that a worker ran the job."""
    from edge_daemon.training.records import JobResult

    out.put(JobResult(order.job.kind, accepted=False, error="ran in a forked worker"))
    out.close()


def test_an_update_that_starts_forward_only_runs_in_the_service_and_stops_when_asked(tmp_path) -> None:
    """Started forward-only, an update runs on a thread of the daemon, not in a forked worker (whose
    own pages would cost more than its forward passes): it trains to its gate, its trace records the
    service's usage, and a stop ends it at its next boundary with nothing saved."""
    import json
    import threading

    from edge_daemon.adaptation.runner import UpdateRunner
    from edge_daemon.training.records import JobResult, UpdateJob
    from edge_daemon.training.worker import WorkerForker

    config = _stored_with_a_base(tmp_path)
    forker = WorkerForker()
    forker.register("update", _not_here)
    forker.start()
    try:
        governor = PlanGovernor(forker.level, plan_ladder(config.train), forward_only_rung=True)
        governor.stop_event = forker.stop_flag
        results: list[JobResult] = []
        ended = threading.Event()

        def on_result(result: JobResult) -> None:
            results.append(result)
            ended.set()

        runner = UpdateRunner(config, governor, forker, on_result)
        rung = forward_only(governor.start_candidates()[-1])
        assert runner.start(UpdateJob("update", "requested", candidates=(rung,), baseline_mb=100.0, budget_mb=1000.0, seed=1))
        assert runner.running and runner.child_pid is None and runner.job is not None and runner.job.in_service
        assert ended.wait(300), "the update in the service must end"
        (result,) = results
        assert result.error is None and result.report is not None, result
        assert result.report.steps == 2 * 4 and "forward_only" in result.report.techniques
        assert result.job is not None and result.job.to_json()["in_service"] is True
        assert not runner.running and runner.last is result
        trace = json.loads(next((config.device.state_dir / "updates").glob("*.json")).read_text())
        assert any(v is not None for v in trace["samples"]["service_mb"]), trace["samples"]

        # Long enough to be stopped on its way: the stop flag ends it at a boundary.
        long = config.model_copy(update={"train": config.train.model_copy(update={"steps": 100_000})})
        runner = UpdateRunner(long, governor, forker, on_result)
        ended.clear()
        assert runner.start(UpdateJob("update", "requested", candidates=(rung,), baseline_mb=100.0, budget_mb=1000.0, seed=2))
        while runner.running and not (runner.progress.step or 0) > 0:
            ended.wait(0.05)  # until its first step is reported
        assert runner.running, results[-1]
        runner.stop(timeout=120)
        assert ended.wait(120)
        stopped = results[-1]
        assert stopped.aborted and stopped.version is None and "TrainingAborted" in (stopped.error or ""), stopped
    finally:
        forker.stop()
