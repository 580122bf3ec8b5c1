"""Flow matching conventions: ours equals diffusers' FlowMatchEulerDiscreteScheduler (the released weights' convention)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from vidtron.recipes.dit_t2v import flow_matching as fm


@pytest.mark.parametrize("steps", [8, 30, 50])
def test_sigmas_timesteps_and_steps_match_diffusers(steps):
    shift = fm.default_shift(steps)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    base = torch.linspace(1.0, 0.0, steps + 1)[:-1].numpy()  # what HunyuanVideoPipeline passes
    sched.set_timesteps(sigmas=base)
    ours = fm.sampling_sigmas(steps, shift)
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(fm.timestep_from_sigma(ours[:-1]), sched.timesteps.float(), atol=1e-3, rtol=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 4, generator=gen)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=gen)  # any model output
        expected = sched.step(v, t, x, return_dict=False)[0]
        got = fm.euler_step(x, v, float(ours[i]), float(ours[i + 1]))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        x = expected


def test_shift_rule():
    assert fm.default_shift(50) == 7.0 and fm.default_shift(19) == 17.0 and fm.default_shift(20) == 7.0


def test_training_target_is_the_sampler_velocity():
    """Noising at sigma and the target v obey x(sigma') = x(sigma) + (sigma' - sigma) v exactly (straight path)."""
    gen = torch.Generator().manual_seed(1)
    x1, x0 = torch.randn(3, 16, 2, 4, 4, generator=gen), torch.randn(3, 16, 2, 4, 4, generator=gen)
    v = fm.velocity_target(x1, x0)
    for s, s2 in [(0.9, 0.4), (0.3, 0.0), (1.0, 0.5)]:
        xs = fm.noisy_latents(x1, x0, torch.full((3,), s))
        xs2 = fm.noisy_latents(x1, x0, torch.full((3,), s2))
        torch.testing.assert_close(fm.euler_step(xs, v, s, s2), xs2, atol=1e-6, rtol=0)
    # paper convention: x_t = (1 - t) x0 + t x1 with t = 1 - sigma, and u_t = x1 - x0 = -v
    t = torch.full((3,), 0.25)
    torch.testing.assert_close(fm.noisy_latents(x1, x0, fm.sigma_from_t(t)), 0.75 * x0 + 0.25 * x1)
    torch.testing.assert_close(-v, x1 - x0)


def test_exact_velocity_recovers_the_data():
    """With the true velocity of a single target, Euler sampling lands on the target for any schedule."""
    gen = torch.Generator().manual_seed(2)
    x1, noise = torch.randn(1, 4, 1, 2, 2, generator=gen), torch.randn(1, 4, 1, 2, 2, generator=gen)
    out = fm.euler_sample(lambda x, t: fm.velocity_target(x1, noise), noise, steps=7)
    torch.testing.assert_close(out, x1, atol=1e-5, rtol=0)


def test_sample_draws_do_not_depend_on_layout():
    a = fm.sample_generator(0, 5, 3)
    b = fm.sample_generator(0, 5, 3)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    c = fm.sample_generator(0, 5, 4)
    assert not torch.equal(torch.randn(4, generator=fm.sample_generator(0, 5, 3)), torch.randn(4, generator=c))
