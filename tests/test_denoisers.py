import torch

from skiptune_search.models.denoisers import EDMPrecond


class Zero(torch.nn.Module):
    def forward(self, x, c_noise):
        self.c_noise = c_noise
        return torch.zeros_like(x)


def test_edm_preconditioning():
    net = Zero()
    d = EDMPrecond(net, sigma_data=0.5)
    x = torch.ones(2, 1, 2, 2)
    sigma = torch.tensor([0.5, 2.0])
    out = d(x, sigma)
    # with F = 0, D(x, σ) = c_skip x = σ_d² / (σ² + σ_d²) x
    assert torch.allclose(out[0], torch.full_like(out[0], 0.5))
    assert torch.allclose(out[1], torch.full_like(out[1], 0.25 / 4.25))
    assert torch.allclose(EDMPrecond.sigma_from_timestep(net.c_noise), sigma)
    # a scalar σ broadcasts over the batch
    assert d(x, 2.0).shape == x.shape and net.c_noise.shape == (2,)


def test_loss_weight_gives_unit_weighted_target():
    d = EDMPrecond(Zero(), sigma_data=0.5)
    s = torch.tensor([0.1, 1.0, 10.0])
    c_out = s * 0.5 / (s**2 + 0.25).sqrt()
    assert torch.allclose(d.loss_weight(s) * c_out**2, torch.ones(3))
