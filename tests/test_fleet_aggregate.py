"""Merging the fleet's adapters: the exact merge is the windows-weighted mean of the devices'
changes (B @ A); FedAvg of the factors, the baseline, is not."""

from __future__ import annotations

import numpy as np
import pytest

from edge_daemon.fleet.aggregate import DeviceUpdate, change_of, exact_merge, fedavg_factors, mean_delta

SCALE = 2.0  # alpha / r of the default LoRA (alpha 8, r 4)
OUT, IN, R = 192, 64, 4  # the default model's attention projection


def device(seed: int, windows: int, rank: int = R, modules: tuple[str, ...] = ("blocks.0.attn.qkv", "blocks.1.fc1")) -> DeviceUpdate:
    rng = np.random.default_rng(seed)
    shapes = {"blocks.0.attn.qkv": (OUT, IN), "blocks.1.fc1": (128, IN)}
    return DeviceUpdate(
        {m: (rng.normal(0, 0.1, (rank, shapes[m][1])).astype(np.float32), rng.normal(0, 0.1, (shapes[m][0], rank)).astype(np.float32)) for m in modules},
        windows,
    )


def relative_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    return max(float(np.linalg.norm(got[m] - want[m]) / np.linalg.norm(want[m])) for m in want)


def test_the_exact_merge_is_the_weighted_mean_of_the_changes_and_fedavg_of_factors_is_not() -> None:
    updates = [device(1, 100), device(2, 300), device(3, 50)]
    want = mean_delta(updates, SCALE)
    # By hand for one module: the windows-weighted mean of scale * B @ A.
    total = sum(u.windows for u in updates)
    qkv = sum(u.windows / total * SCALE * (u.factors["blocks.0.attn.qkv"][1].astype(np.float64) @ u.factors["blocks.0.attn.qkv"][0]) for u in updates)
    np.testing.assert_allclose(want["blocks.0.attn.qkv"], qkv, rtol=1e-12)

    merged = exact_merge(updates, SCALE)
    assert merged.rank == {"blocks.0.attn.qkv": 3 * R, "blocks.1.fc1": 3 * R}  # what three rank-4 changes span
    assert relative_error(change_of(merged.factors, SCALE), want) < 1e-5
    assert max(merged.left_out.values()) < 1e-6
    fedavg = relative_error(change_of(fedavg_factors(updates), SCALE), want)
    assert fedavg > 0.5, f"FedAvg of factors is {fedavg:.0%} off the mean change"


def test_at_the_devices_rank_the_merge_is_exact_where_their_changes_span_it_and_fedavg_halves_them() -> None:
    """Two devices, each using two of the four rank components (a device with a rank-2 change):
    together they span rank 4, so the merge at rank 4 is exact. FedAvg of the factors drops the
    cross terms' nothing and halves each device's own: the mean of the factors of two disjoint
    changes is half their mean change."""
    first, second = device(4, 200), device(5, 200)
    for update, used in ((first, slice(0, 2)), (second, slice(2, 4))):
        for a, b in update.factors.values():
            keep = np.zeros(R, bool)
            keep[used] = True
            a[~keep, :] = 0.0
            b[:, ~keep] = 0.0
    updates = [first, second]
    want = mean_delta(updates, SCALE)
    merged = exact_merge(updates, SCALE, rank=R)
    assert set(merged.rank.values()) == {R}
    assert relative_error(change_of(merged.factors, SCALE), want) < 1e-5
    fedavg = change_of(fedavg_factors(updates), SCALE)
    for m in want:
        np.testing.assert_allclose(fedavg[m], want[m] / 2, rtol=1e-4, atol=1e-7)


def test_truncated_to_the_devices_rank_the_merge_is_the_closest_change_of_that_rank() -> None:
    updates = [device(6, 10), device(7, 20), device(8, 30)]
    want = mean_delta(updates, SCALE)
    merged = exact_merge(updates, SCALE, rank=R)
    got = change_of(merged.factors, SCALE)
    fedavg = change_of(fedavg_factors(updates), SCALE)
    for m, delta in want.items():
        s = np.linalg.svd(delta, compute_uv=False)
        best = float(np.sqrt((s[R:] ** 2).sum()))  # Eckart-Young: no rank-4 change is closer
        error = float(np.linalg.norm(got[m] - delta))
        assert error == pytest.approx(best, rel=1e-4)
        assert merged.left_out[m] == pytest.approx(best / float(np.linalg.norm(delta)), rel=1e-4)
        assert np.linalg.norm(fedavg[m] - delta) > 1.2 * error  # FedAvg's change is rank 4 as well, and further off
        a, b = merged.factors[m]
        assert a.shape == (R, IN) and b.shape == (delta.shape[0], R) and a.dtype == b.dtype == np.float32


def test_a_module_one_device_did_not_adapt_counts_as_no_change_from_it() -> None:
    both = device(9, 100)
    only_one = device(10, 300, modules=("blocks.0.attn.qkv",))
    want = mean_delta([both, only_one], SCALE)
    a, b = both.factors["blocks.1.fc1"]
    np.testing.assert_allclose(want["blocks.1.fc1"], 0.25 * SCALE * (b.astype(np.float64) @ a), rtol=1e-12)
    merged = exact_merge([both, only_one], SCALE)
    assert relative_error(change_of(merged.factors, SCALE), want) < 1e-5


def test_factors_that_do_not_fit_together_are_refused() -> None:
    good = device(11, 1)
    a, b = good.factors["blocks.0.attn.qkv"]
    wrong_shape = DeviceUpdate({"blocks.0.attn.qkv": (a[:, :32], b)}, 1)
    with pytest.raises(ValueError, match="disagree on its shape"):
        exact_merge([good, wrong_shape], SCALE)
    with pytest.raises(ValueError, match="do not make a LoRA"):
        exact_merge([DeviceUpdate({"m": (a, b[:, :2])}, 1)], SCALE)
    with pytest.raises(ValueError, match="not all 0"):
        exact_merge([DeviceUpdate(good.factors, 0)], SCALE)
    with pytest.raises(ValueError, match="one rank"):
        fedavg_factors([good, device(12, 1, rank=2)])
    with pytest.raises(ValueError, match="no device updates"):
        exact_merge([], SCALE)
