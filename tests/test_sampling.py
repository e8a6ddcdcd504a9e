import math

import pytest
import torch

from skiptune_search.sampling.samplers import (
    generate, initial_noise, karras_sigmas, sample_dpmpp_2m, sample_euler, sample_heun, steps_for_nfe,
)


def test_karras_grid_endpoints_and_order():
    s = karras_sigmas(5, 0.002, 80.0)
    assert len(s) == 6 and s[-1] == 0
    assert float(s[0]) == pytest.approx(80.0) and float(s[-2]) == pytest.approx(0.002)
    assert torch.all(s[:-1][1:] < s[:-1][:-1])
    for bad in ((0.0, 80.0), (0.002, math.inf), (80.0, 0.002)):  # EDM's Precond defaults are 0 and inf
        with pytest.raises(ValueError, match="σ_min < σ_max"):
            karras_sigmas(5, *bad)


class CountingGaussianDenoiser:
    """Exact denoiser for data ~ N(0, s²): D(x, σ) = x s² / (s² + σ²); counts its calls."""

    def __init__(self, s: float) -> None:
        self.s2 = s * s
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        return x * self.s2 / (self.s2 + sigma**2)


@pytest.mark.parametrize("sampler, fn, nfe", [("heun", sample_heun, 9), ("heun", sample_heun, 19),
                                              ("euler", sample_euler, 7), ("dpmpp_2m", sample_dpmpp_2m, 10)])
def test_nfe_is_counted_exactly(sampler, fn, nfe):
    d = CountingGaussianDenoiser(0.5)
    steps = steps_for_nfe(sampler, nfe)
    fn(d, torch.randn(2, 1, 4, 4), karras_sigmas(steps, 0.002, 80.0))
    assert d.calls == nfe


@pytest.mark.parametrize("fn", [sample_heun, sample_euler, sample_dpmpp_2m])
def test_sigma_reaches_the_denoiser_on_the_samples_device(fn):
    """EDM's Precond reshapes σ and multiplies it with x: a CPU σ beside CUDA samples fails there.
    The 'meta' device stands in for a GPU: any σ left on the CPU shows as a CPU tensor."""
    seen = []

    def denoiser(x, sigma):
        seen.append((sigma.device, sigma.dtype))
        return x * 0.5

    fn(denoiser, torch.zeros(2, 1, 4, 4, device="meta"), karras_sigmas(3, 0.002, 80.0))
    assert seen and set(seen) == {(torch.device("meta"), torch.float32)}


def test_heun_solves_the_gaussian_ode():
    """For Gaussian data the ODE maps x_T to x_T · s / sqrt(s² + σ_max²); Heun converges to it."""
    s, sigma_max = 0.5, 80.0
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64) * sigma_max
    exact = x * s / math.sqrt(s * s + sigma_max**2)
    err_coarse = (sample_heun(CountingGaussianDenoiser(s), x, karras_sigmas(10, 0.002, sigma_max)) - exact).abs().max()
    err_fine = (sample_heun(CountingGaussianDenoiser(s), x, karras_sigmas(200, 0.002, sigma_max)) - exact).abs().max()
    assert err_fine < 1e-3 * exact.abs().max()
    assert err_fine < err_coarse / 100  # second order: 20x the steps, ~400x less error


@pytest.mark.parametrize("fn, order", [(sample_euler, 1), (sample_dpmpp_2m, 2)])
def test_solvers_converge_at_their_order(fn, order):
    """Error on the Gaussian ODE falls like steps^-order (x4 steps: /4 or /16)."""
    s, sigma_max = 0.5, 80.0
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64) * sigma_max
    exact = x * s / math.sqrt(s * s + sigma_max**2)
    errors = [(fn(CountingGaussianDenoiser(s), x, karras_sigmas(n, 0.002, sigma_max)) - exact).abs().max()
              for n in (25, 100)]
    assert errors[1] < errors[0] / (4**order * 0.6)


def test_impossible_nfe_lists_nearest_valid():
    with pytest.raises(ValueError, match="nearest valid: 9, 11"):
        steps_for_nfe("heun", 10)
    with pytest.raises(ValueError, match="unknown σ-space sampler 'lms'"):  # a scheduler: its own steps count
        steps_for_nfe("lms", 10)
    from skiptune_search.scoring.task import Task

    with pytest.raises(ValueError, match="unknown sampler 'zigzag'"):
        Task(sampler="zigzag")


def test_sample_noise_depends_on_its_seed_only():
    a = initial_noise([5, 6, 7], (1, 4, 4), 80.0)
    b = initial_noise([7, 5], (1, 4, 4), 80.0)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])


def test_generate_is_independent_of_batch_size():
    d = CountingGaussianDenoiser(0.5)
    sig = karras_sigmas(3, 0.002, 80.0)
    seeds = list(range(10, 17))
    one = generate(d, "heun", sig, seeds, (1, 4, 4), batch_size=7, progress=False)
    many = generate(d, "heun", sig, seeds, (1, 4, 4), batch_size=3, progress=False)
    assert one.dtype == torch.uint8 and one.shape == (7, 1, 4, 4)
    assert torch.equal(one, many)


def test_non_finite_samples_are_reported():
    from skiptune_search.sampling.samplers import NonFiniteSamplesError

    with pytest.raises(NonFiniteSamplesError, match="seeds 0..1"):
        generate(lambda x, s: x * float("nan"), "euler", karras_sigmas(2, 0.002, 80.0), [0, 1], (1, 2, 2),
                 progress=False)


def test_model_grid_is_evenly_spaced_training_timesteps():
    from skiptune_search.sampling.samplers import model_sigmas, sigma_grid

    table = torch.linspace(0.01, 80.0, 1000, dtype=torch.float64)  # σ of timesteps 0..999, ascending
    grid = model_sigmas(4, table)
    assert torch.equal(grid, torch.cat([table[[999, 666, 333, 0]], torch.zeros(1, dtype=torch.float64)]))
    assert torch.equal(model_sigmas(1, table), torch.tensor([80.0, 0.0], dtype=torch.float64))
    assert len(model_sigmas(1000, table).unique()) == 1001  # every timestep once, then 0
    with pytest.raises(ValueError, match="has 1000 timesteps; cannot take 1001"):
        model_sigmas(1001, table)
    with pytest.raises(ValueError, match="continuous in σ .* use the karras grid"):
        sigma_grid("model", 5, 0.002, 80.0, None, "edm.pkl")


def test_native_samplers_step_only_on_the_model_grid():
    from skiptune_search.sampling.samplers import check_sigma_grid, default_sigma_grid

    assert default_sigma_grid("heun") == "karras" and default_sigma_grid("ddim") == "model"
    check_sigma_grid("heun", "model")
    with pytest.raises(ValueError, match="sampler ddim steps on its scheduler's own timesteps"):
        check_sigma_grid("ddim", "karras")
    with pytest.raises(ValueError, match="unknown σ grid 'linear'"):
        check_sigma_grid("heun", "linear")
