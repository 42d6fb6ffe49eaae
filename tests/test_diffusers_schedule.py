"""vidrt's solvers on a diffusers scheduler config sample exactly as diffusers' own scheduler.step() does."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from vidrt.core.schedulers import FlowEuler, FlowUniPC, solver_from_diffusers  # noqa: E402

UNIPC = {  # as in Wan2.1 diffusers checkpoints' scheduler/scheduler_config.json
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False}
EULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 5.0}
UNIPC3 = {**UNIPC, "solver_order": 3, "disable_corrector": [1]}
CASES = [(UNIPC, 5.0), (UNIPC, None), (EULER, None), (UNIPC3, None)]  # None: the config's own shift (3.0 for UniPC)


def field(x, sigma):
    """A smooth nonlinear stand-in for the DiT's velocity, of the current x and sigma."""
    return torch.tanh(1.5 * x) * (1 + sigma) - 0.3 * torch.sin(2 * x + 4 * sigma) + 0.1 * x * x


def _scheduler(config, steps, shift):
    over = {} if shift is None else {"flow_shift" if "Uni" in config["_class_name"] else "shift": shift}
    sched = getattr(diffusers, config["_class_name"]).from_config(config, **over)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [1, 2, 6, 10])
@pytest.mark.parametrize("config,shift", CASES, ids=["unipc-shift5", "unipc-shift3", "euler-shift5", "unipc3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_diffusers_step(config, shift, steps, dtype):
    sched = _scheduler(config, steps, shift)
    solver = solver_from_diffusers(config, steps, shift)
    assert isinstance(solver, FlowUniPC if "Uni" in config["_class_name"] else FlowEuler)
    assert solver.timesteps == sched.sigmas.tolist() and len(solver.timesteps) == steps + 1
    assert solver.model_t == [float(t) for t in sched.timesteps.tolist()] and solver.timesteps[-1] == 0
    noise = torch.randn((1, 4, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref = noise.clone()
    for t, sigma in zip(sched.timesteps, sched.sigmas.tolist()):
        ref = sched.step(field(ref, sigma), t, ref).prev_sample
    x = noise.clone()
    for _ in range(2):  # the second run checks that the solver's history is reset between runs
        x = noise.clone()
        for i in range(steps):
            x = solver.step(i, x, field(x, solver.timesteps[i]))
    diff = (x.double() - ref.double()).abs().max().item()
    assert diff <= 1e-5, diff
    assert x.dtype == dtype and x.isfinite().all()


def test_shift_override_and_config_shift():
    assert solver_from_diffusers(UNIPC, 4, 5.0).timesteps == _scheduler(UNIPC, 4, 5.0).sigmas.tolist()
    assert solver_from_diffusers(UNIPC, 4).timesteps == _scheduler(UNIPC, 4, 3.0).sigmas.tolist()
    assert solver_from_diffusers(UNIPC, 4, 5.0).timesteps != solver_from_diffusers(UNIPC, 4).timesteps
    unshifted = solver_from_diffusers(EULER, 4, 1.0)  # diffusers' linspace(1, 1 / 1000, 4), then 0
    assert unshifted.timesteps == pytest.approx([1.0, 0.667, 0.334, 0.001, 0.0], abs=1e-6)
    assert unshifted.model_t == pytest.approx([1000.0, 667.0, 334.0, 1.0], abs=1e-3)


def test_unsupported_schedulers():
    with pytest.raises(ValueError, match="unsupported scheduler 'DDIMScheduler'.*UniPCMultistepScheduler"):
        solver_from_diffusers({"_class_name": "DDIMScheduler"}, 4)
    with pytest.raises(ValueError, match="unsupported UniPCMultistepScheduler settings"):
        solver_from_diffusers({**UNIPC, "prediction_type": "epsilon", "use_flow_sigmas": False}, 4)
    with pytest.raises(ValueError, match="unsupported FlowMatchEulerDiscreteScheduler settings"):
        solver_from_diffusers({**EULER, "stochastic_sampling": True}, 4)
    with pytest.raises(ValueError, match="final sigma not zero"):
        solver_from_diffusers({**UNIPC, "final_sigmas_type": "sigma_min"}, 4)


def test_explicit_schedules():
    euler = FlowEuler.from_sigmas([1.0, 0.5, 0.0], [1000.0, 500.0])
    assert euler.model_t == [1000.0, 500.0] and FlowEuler.from_sigmas([1.0, 0.0]).model_t == [1.0]
    assert FlowEuler(3).model_t == FlowEuler(3).timesteps[:-1]
    for bad in ([1.0], [0.5, 0.5, 0.0], [1.5, 0.0]):
        with pytest.raises(ValueError, match="sigmas"):
            FlowEuler.from_sigmas(bad)
    with pytest.raises(ValueError, match="sigmas\\[0\\] < 1"):
        FlowUniPC([1.0, 0.5, 0.0])
    # one data point x0: paths are straight and the x0 prediction exact, so UniPC lands on x0 at any order
    x0, noise = torch.tensor([0.3, -1.2], dtype=torch.float64), torch.tensor([1.5, 0.7], dtype=torch.float64)
    solver = FlowUniPC([0.999, 0.8, 0.5, 0.2, 0.0], order=3)
    x = noise * 0.999 + x0 * 0.001
    for i in range(4):
        x = solver.step(i, x, (x - x0) / solver.timesteps[i])
    torch.testing.assert_close(x, x0)
