"""`mmgraph calibrate`: a degenerate fit (a busy machine) is measured again, then refused with
exit 2 and nothing written. The fit is tested on injected measurements, so no test here depends
on how busy the machine is."""

from __future__ import annotations

import pytest

from mmgraph.commands import calibrate
from mmgraph.commands.calibrate import DegenerateFit, fit_optimizer, fit_steps, fit_with_retries
from mmgraph.cli import main
from mmgraph.core.errors import UserError


def rows(overhead: float, efficiency: float, jitter: float = 0.0):
    """Two steps' (roofline s, ops, measured s) made from known figures."""
    out = []
    for roofline, ops in ((2e-3, 400), (40e-3, 300)):
        out.append((roofline, ops, roofline / efficiency + ops * overhead + jitter))
    return out


def test_fit_recovers_known_figures():
    overhead, efficiency = fit_steps(rows(4e-6, 0.75))
    assert overhead == pytest.approx(4e-6) and efficiency == pytest.approx(0.75)
    rate, per_tensor = fit_optimizer(16 * 256 * 1024 / 7e8 + 16 * 3e-5, 256 * 1024 / 7e8 + 256 * 3e-5)
    assert rate == pytest.approx(7e8) and per_tensor == pytest.approx(3e-5)


@pytest.mark.parametrize("measured,reason", [
    # The failure seen under load: the small step slowed down, the fit gave overhead ~0 and an
    # efficiency at the bound (the old code wrote overhead 0, efficiency 1.0).
    ([(2e-3, 400, 2.0e-3), (40e-3, 300, 60e-3)], "per-op overhead"),
    ([(2e-3, 400, 1e-3), (40e-3, 300, 30e-3)], "per-op overhead"),     # faster than the roofline
    (rows(4e-6, 1.0), "op_efficiency"),                                 # exactly at the bound
    (rows(4e-6, 1.5), "op_efficiency"),
    (rows(5e-3, 0.5), "per-op overhead"),                               # 5 ms per op: implausible
    ([(2e-3, 400, float("nan")), (40e-3, 300, 60e-3)], "no solution"),
])
def test_degenerate_fits_are_rejected(measured, reason):
    with pytest.raises(DegenerateFit, match=reason):
        fit_steps(measured)


def test_optimizer_fit_without_a_per_tensor_cost_is_rejected():
    with pytest.raises(DegenerateFit, match="per tensor"):
        fit_optimizer(16e-3, 0.5e-3)           # the small tensors ran faster per element: no solution


def test_a_degenerate_measurement_is_measured_again():
    measurements = iter([rows(0.0, 1.0), rows(4e-6, 0.7)])
    calls = []

    def once():
        calls.append(1)
        return next(measurements)
    overhead, efficiency = fit_with_retries(once, fit_steps, "step")
    assert len(calls) == 2 and overhead == pytest.approx(4e-6) and efficiency == pytest.approx(0.7)


def test_refuses_after_a_bounded_number_of_measurements():
    calls = []

    def once():
        calls.append(1)
        return rows(0.0, 1.0)
    with pytest.raises(UserError, match="no plausible fit in 3 measurements") as err:
        fit_with_retries(once, fit_steps, "step", attempts=3)
    assert len(calls) == 3 and "nothing written" in str(err.value)


def _figures(**over):
    base = {"peak_flops": {"fp32": 1e11, "bf16": 5e10, "fp16": 5e10}, "matmul_efficiency": [[1e6, 0.5], [2e9, 1.0]],
            "attention_efficiency": [[1e6, 0.3]], "transcendental_rate": 1e9, "bandwidth": 1e10,
            "cache_bandwidth": 3e10, "cache_bytes": 3e6, "overhead": 4e-6, "op_efficiency": 0.75,
            "update_rate": 7e8, "tensor_overhead": 3e-5}
    return {**base, **over}


@pytest.mark.parametrize("bad", [{"overhead": 0.0, "op_efficiency": 1.0}, {"op_efficiency": 1.0},
                                 {"tensor_overhead": 0.0}])
def test_the_command_writes_nothing_from_a_degenerate_fit(tmp_path, monkeypatch, capsys, bad):
    out = tmp_path / "host.yaml"
    out.write_text("previous: target\n")
    monkeypatch.setattr(calibrate, "measure", lambda device, size: _figures(**bad))
    assert main(["calibrate", "--output", str(out)]) == 2
    assert "mmgraph: error: calibrate: degenerate fit" in capsys.readouterr().err
    assert out.read_text() == "previous: target\n" and not list(tmp_path.glob("*.tmp"))


def test_the_command_writes_a_plausible_fit(tmp_path, monkeypatch):
    from mmgraph.core.target import load_target

    monkeypatch.setenv("MMGRAPH_HOME", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure", lambda device, size: _figures())
    assert main(["calibrate"]) == 0
    target = load_target("host")
    assert target.compute.kernel_overhead_s == pytest.approx(4e-6) and target.compute.op_efficiency == 0.75


def test_real_measurement_gives_a_valid_target_or_a_named_refusal():
    """Measured for real: on an idle machine a valid host target, on a busy one possibly a
    refusal after the bounded re-measurements; both are correct outcomes, a degenerate target is not."""
    from mmgraph.commands.calibrate import host_target, measure
    from mmgraph.core.target import Target

    try:
        figures = measure(size=128, repeats=1)
    except UserError as err:
        assert "no plausible fit in 3 measurements" in str(err)
        return
    target = Target.model_validate(host_target(figures))
    assert target.compute.granularity == "op" and not target.stream.enabled
    assert 0 < target.matmul_share(1e3) <= 1 and target.compute.transcendental_rate > 0
    assert 0.01 < target.compute.op_efficiency <= 0.999 and target.compute.kernel_overhead_s > 0
    assert target.external_memory.optimizer_tensor_overhead_s > 0
