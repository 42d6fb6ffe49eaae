import pytest
import torch

from vidrt.core.schedulers import flow_timesteps, make_solver


def test_timesteps_shift():
    assert flow_timesteps(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    ts = flow_timesteps(4, shift=3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and ts[2] == pytest.approx(0.75)  # 3*.5/(1+2*.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_timesteps(0)
    with pytest.raises(ValueError, match="unknown solver 'ddim'"):
        make_solver("ddim", 4)


def _sample(solver, field, x):
    solver.reset()
    for i in range(len(solver.timesteps) - 1):
        x = solver.step(i, x, field(x, solver.timesteps[i]))
    return x


@pytest.mark.parametrize("name", ["euler", "dpm++2m"])
def test_straight_paths_are_exact(name):
    # One data point x0: the true velocity is (x - x0) / t, paths are straight, any first-order step is exact.
    x0, noise = torch.tensor([0.3, -1.2]), torch.tensor([1.5, 0.7])
    out = _sample(make_solver(name, 7, shift=2.0), lambda x, t: (x - x0) / t, noise)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_dpm_solver_beats_euler_on_gaussian_data():
    # Data ~ N(m, s^2): the exact flow maps noise n to m + s n; the velocity E[n - x0 | x_t] is closed-form.
    m, s = 2.0, 0.5

    def field(x, t):
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        r = x - (1 - t) * m
        return t / var * r - (m + (1 - t) * s ** 2 / var * r)

    n = torch.linspace(-2, 2, 9, dtype=torch.float64)
    exact = m + s * n
    errs = {k: (_sample(make_solver(k, 8), field, n) - exact).abs().max().item() for k in ("euler", "dpm++2m")}
    assert errs["dpm++2m"] < errs["euler"] / 4, errs
    assert errs["dpm++2m"] < 0.05
