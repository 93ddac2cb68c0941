"""Each training loss term equals a hand computation on fixed tensors (time convention: training/losses.py)."""

import pytest
import torch

from bfs_core.models.composition_unet import build_composition_unet
from bfs_core.sampling.flow_match import pack_latents
from bfs_core.tiny import TINY_PHI
from training.bfs_model import Batch
from training.losses import composition_loss, flow_matching_loss, noisy_latents, one_step_estimate, phi_loss
from training.train_stage1 import TrainConfig as Stage1Config
from training.train_stage1 import stage1_loss
from training.train_stage2 import TrainConfig as Stage2Config
from training.train_stage2 import phase_batches_done, phase_of, real_loss, reg_loss


def _phi():
    torch.manual_seed(0)
    return build_composition_unet(**TINY_PHI).eval().requires_grad_(False)


def _phi_by_hand(phi, z_fg, z_bg):
    return phi(torch.cat([z_fg, z_bg], dim=1), torch.zeros(z_fg.shape[0])).sample  # input order [z_F, z_B]


def test_flow_matching_loss_is_mean_squared_velocity_error():
    x0 = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    noise = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    v = torch.tensor([[-1.0, 0.0], [0.0, 2.0]])
    # v* = noise − x0 = [[-1, -1], [0.5, 2]]; errors² = [[0, 1], [0.25, 0]] -> per-sample means 0.5, 0.125
    assert flow_matching_loss(v, noise, x0).item() == pytest.approx((0.5 + 0.125) / 2)
    assert flow_matching_loss(v, noise, x0, torch.tensor([2.0, 0.0])).item() == pytest.approx(0.5)


def test_interpolation_and_one_step_estimate_follow_the_scheduler_convention():
    x0, noise, sigma = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([0.25])
    x = noisy_latents(x0, noise, sigma)
    assert x.item() == pytest.approx(0.75 * 2.0 + 0.25 * -1.0)  # sigma = 0.25: mostly data
    assert one_step_estimate(x, noise - x0, sigma).item() == pytest.approx(2.0)  # exact clean estimate
    assert torch.equal(noisy_latents(x0, noise, torch.tensor([0.0])), x0)  # sigma = 0 is the clean latent


def test_composition_and_phi_losses_by_hand():
    phi = _phi()
    gen = torch.Generator().manual_seed(0)
    z_fg, z_bg, z_c = (torch.randn(2, 16, 4, 4, generator=gen) for _ in range(3))
    with torch.no_grad():
        composed = _phi_by_hand(phi, z_fg, z_bg)
        assert composition_loss(phi, z_fg, z_bg, z_c).item() == pytest.approx((composed - z_c).abs().mean().item())
        assert phi_loss(phi, z_fg, z_bg, z_c).item() == pytest.approx(((z_c - composed) ** 2).mean().item())


class StubModel:
    """Linear velocities a·x so every term can be computed by hand; records what each branch was fed."""

    def __init__(self, a=0.5, b=-0.25):
        self.a, self.b, self.calls = a, b, []

    def __call__(self, comp, fg, fill, embeds, pooled, t_comp, t_fg, img_ids, guidance):
        self.calls.append({"comp": comp.clone(), "fg": fg.clone(), "t_comp": t_comp.clone(), "t_fg": t_fg.clone()})
        return self.a * comp + 1.0, self.b * fg


def _batch():
    gen = torch.Generator().manual_seed(1)
    z_comp, z_fg, z_bg = (torch.randn(2, 16, 4, 4, generator=gen) for _ in range(3))
    return Batch(
        comp=pack_latents(z_comp),
        fg=pack_latents(z_fg),
        z_bg=z_bg,
        fill_cond=torch.zeros(2, 4, 320),
        prompt_embeds=torch.zeros(2, 3, 32),
        pooled=torch.zeros(2, 32),
        img_ids=torch.zeros(4, 3),
        names=["a", "b"],
    )


def _hand_sigma_and_noise(b, seed, shared):
    """diffusers' Flux trainer with weighting 'none': u ~ U[0,1), sigma = sigmas[int(u·1000)] = (1000 − i)/1000."""
    torch.manual_seed(seed)
    u = torch.rand(2)
    sigma = (1000 - (u * 1000).long()).float() / 1000
    noise_c = torch.randn_like(b.comp)
    noise_f = noise_c if shared else torch.randn_like(b.comp)
    return sigma, noise_c, noise_f


def test_stage1_loss_is_flow_on_both_branches_plus_tenth_of_comp():
    b, phi, model = _batch(), _phi(), StubModel()
    torch.manual_seed(5)
    loss, parts = stage1_loss(model, phi, b, Stage1Config(), "cpu", "shared")
    sigma, noise_c, noise_f = _hand_sigma_and_noise(b, 5, shared=True)
    s = sigma.view(-1, 1, 1)
    x_c, x_f = (1 - s) * b.comp + s * noise_c, (1 - s) * b.fg + s * noise_f
    v_c, v_f = 0.5 * x_c + 1.0, -0.25 * x_f
    flow = ((v_c - (noise_c - b.comp)) ** 2).mean() + ((v_f - (noise_f - b.fg)) ** 2).mean()
    from bfs_core.sampling.flow_match import unpack_latents

    comp_hat, fg_hat = unpack_latents(x_c - s * v_c, 4, 4), unpack_latents(x_f - s * v_f, 4, 4)
    with torch.no_grad():
        l_comp = (_phi_by_hand(phi, fg_hat, b.z_bg) - comp_hat).abs().mean()
    assert torch.equal(model.calls[0]["t_comp"], sigma) and torch.equal(model.calls[0]["t_fg"], sigma)
    assert parts["loss_comp"] == pytest.approx(l_comp.item(), rel=1e-5)
    assert loss.item() == pytest.approx((flow + 0.1 * l_comp).item(), rel=1e-5)


def test_stage2_real_loss_supervises_only_the_composite_velocity():
    b, phi = _batch(), _phi()
    torch.manual_seed(3)
    loss, _ = real_loss(StubModel(b=-0.25), phi, b, Stage2Config(), "cpu", "independent")
    torch.manual_seed(3)
    loss_other_fg, _ = real_loss(StubModel(b=7.0), phi, b, Stage2Config(), "cpu", "independent")
    sigma, noise_c, _ = _hand_sigma_and_noise(b, 3, shared=False)
    s = sigma.view(-1, 1, 1)
    v_c = 0.5 * ((1 - s) * b.comp + s * noise_c) + 1.0
    assert loss.item() == pytest.approx(((v_c - (noise_c - b.comp)) ** 2).mean().item(), rel=1e-6)
    assert loss.item() == loss_other_fg.item()  # the foreground velocity is not part of L_real


def test_stage2_reg_loss_feeds_the_clean_composite_at_sigma_zero():
    b, phi, model = _batch(), _phi(), StubModel()
    torch.manual_seed(4)
    loss, parts = reg_loss(model, phi, b, Stage2Config(), "cpu", "shared")
    sigma, _, noise_f = _hand_sigma_and_noise(b, 4, shared=True)
    call = model.calls[0]
    assert torch.equal(call["comp"], b.comp) and torch.equal(call["t_comp"], torch.zeros(2))
    assert torch.equal(call["t_fg"], sigma)
    s = sigma.view(-1, 1, 1)
    x_f = (1 - s) * b.fg + s * noise_f
    v_f = -0.25 * x_f
    l_reg = ((v_f - (noise_f - b.fg)) ** 2).mean()
    from bfs_core.sampling.flow_match import unpack_latents

    with torch.no_grad():  # ẑ_C = z_C exactly because sigma_C = 0
        l_comp = _phi_by_hand(phi, unpack_latents(x_f - s * v_f, 4, 4), b.z_bg) - unpack_latents(b.comp, 4, 4)
        l_comp = l_comp.abs().mean()
    assert parts["loss_reg"] == pytest.approx(l_reg.item(), rel=1e-6)
    assert loss.item() == pytest.approx((l_reg + 0.1 * l_comp).item(), rel=1e-5)


def test_stage2_alternation_and_data_position():
    assert [phase_of(s) for s in range(1, 5)] == ["real", "reg", "real", "reg"]
    assert phase_batches_done(0) == {"real": 0, "reg": 0}
    assert phase_batches_done(3) == {"real": 2, "reg": 1}


class LeafStubModel(StubModel):
    """StubModel whose velocities are leaf tensors (requires_grad), so the test can read ∂loss/∂v̂ directly."""

    def __call__(self, *args):
        v_comp, v_fg = super().__call__(*args)
        self.v = (v_comp.detach().requires_grad_(), v_fg.detach().requires_grad_())
        return self.v


def _hand_stage1_loss(phi, b, sigma, noise_c, noise_f, v_c, v_f):
    """Eq. 5–7 written out: flow on both branches + 0.1·|Φ(ẑ_F, z_B) − ẑ_C| with ẑ = x_σ − σ·v̂."""
    from bfs_core.sampling.flow_match import unpack_latents

    s = sigma.view(-1, 1, 1)
    x_c, x_f = (1 - s) * b.comp + s * noise_c, (1 - s) * b.fg + s * noise_f
    flow = ((v_c - (noise_c - b.comp)) ** 2).mean() + ((v_f - (noise_f - b.fg)) ** 2).mean()
    comp_hat, fg_hat = unpack_latents(x_c - s * v_c, 4, 4), unpack_latents(x_f - s * v_f, 4, 4)
    return flow, (_phi_by_hand(phi, fg_hat, b.z_bg) - comp_hat).abs().mean()


def test_l_comp_backpropagates_into_both_predicted_velocities():
    """∂loss/∂v̂ includes 0.1·∂L_comp/∂v̂ through ẑ_F = x_σ − σ·v̂_F (and ẑ_C): ẑ must not be detached."""
    b, phi, model = _batch(), _phi(), LeafStubModel()
    torch.manual_seed(5)
    loss, _ = stage1_loss(model, phi, b, Stage1Config(), "cpu", "shared")
    loss.backward()
    sigma, noise_c, noise_f = _hand_sigma_and_noise(b, 5, shared=True)
    v = [v.detach().clone().requires_grad_() for v in model.v]
    flow, l_comp = _hand_stage1_loss(phi, b, sigma, noise_c, noise_f, *v)
    flow_grads = torch.autograd.grad(flow, v)  # all a detached ẑ would leave
    comp_grads = torch.autograd.grad(l_comp, v)
    for got, flow_grad, comp_grad in zip((v.grad for v in model.v), flow_grads, comp_grads):
        assert comp_grad.abs().max() > 1e-4  # L_comp depends on this branch's velocity (σ > 0 in this draw)
        assert torch.allclose(got - flow_grad, 0.1 * comp_grad, rtol=1e-3, atol=1e-9)


def test_stage2_reg_l_comp_backpropagates_into_the_foreground_velocity():
    from bfs_core.sampling.flow_match import unpack_latents

    b, phi, model = _batch(), _phi(), LeafStubModel()
    torch.manual_seed(4)
    loss, _ = reg_loss(model, phi, b, Stage2Config(), "cpu", "shared")
    loss.backward()
    sigma, _, noise_f = _hand_sigma_and_noise(b, 4, shared=True)
    s = sigma.view(-1, 1, 1)
    v_f = model.v[1].detach().clone().requires_grad_()
    x_f = (1 - s) * b.fg + s * noise_f
    l_reg = ((v_f - (noise_f - b.fg)) ** 2).mean()
    l_comp = (_phi_by_hand(phi, unpack_latents(x_f - s * v_f, 4, 4), b.z_bg) - unpack_latents(b.comp, 4, 4)).abs()
    comp_grad = torch.autograd.grad(l_comp.mean(), v_f)[0]
    assert comp_grad.abs().max() > 1e-4
    got = model.v[1].grad - torch.autograd.grad(l_reg, v_f)[0]
    assert torch.allclose(got, 0.1 * comp_grad, rtol=1e-3, atol=1e-9)


class RecordingEncoder:
    """LatentEncoder stand-in: records every image it is asked to encode; latents are 8×8 average pools."""

    def __init__(self):
        self.rgb_inputs, self.rgba_inputs = [], []

    @staticmethod
    def _latent(images):  # [N, C, H, W] -> [N, 16, H/8, W/8]: a fixed function of the pixels
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        return pooled.repeat(1, 16 // images.shape[1] + 1, 1, 1)[:, :16]

    def rgb(self, images):
        self.rgb_inputs.append(images.clone())
        return self._latent(images)

    def rgba_latent(self, rgba):
        self.rgba_inputs.append(rgba.clone())
        return self._latent(rgba)


class FixedTexts:
    def get(self, captions, max_len, device, dtype):
        return torch.zeros(len(captions), 3, 32), torch.zeros(len(captions), 32)


def _pair_batch():
    """Two real pairs (no foreground layer): composites with distinct colours, boxes at different places."""
    gen = torch.Generator().manual_seed(2)
    composite = torch.rand(2, 3, 16, 16, generator=gen) * 0.5 + 0.25
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 2:9, 4:14] = 1
    mask[1, :, 8:16, 0:5] = 1
    background = torch.rand(2, 3, 16, 16, generator=gen)
    foreground = torch.rand(2, 4, 16, 16, generator=gen)
    return {
        "composite": composite,
        "mask": mask,
        "background": background,
        "foreground": foreground,
        "caption": ["a", "b"],
        "name": ["p0", "p1"],
    }


def test_stage2_surrogate_is_the_composite_inside_the_mask_with_alpha_m():
    """Eq. 8's F̃ = C·M: RGB = the composite where M = 1 and 0 elsewhere, alpha = M (not the whole composite)."""
    from training.bfs_model import encode_batch

    raw, encoder = _pair_batch(), RecordingEncoder()
    b = encode_batch(raw, encoder, FixedTexts(), Stage2Config(), "cpu", torch.float32, surrogate=True)
    expected = torch.zeros(2, 4, 16, 16)  # built by hand from the two boxes
    expected[0, :3, 2:9, 4:14] = raw["composite"][0, :, 2:9, 4:14]
    expected[0, 3, 2:9, 4:14] = 1
    expected[1, :3, 8:16, 0:5] = raw["composite"][1, :, 8:16, 0:5]
    expected[1, 3, 8:16, 0:5] = 1
    assert len(encoder.rgba_inputs) == 1 and torch.equal(encoder.rgba_inputs[0], expected)
    assert torch.equal(b.fg, pack_latents(encoder._latent(expected)))  # that latent is the foreground branch's
    # Without `surrogate` (stage 1 triplets) the dataset's own foreground layer is encoded.
    encoder = RecordingEncoder()
    encode_batch(raw, encoder, FixedTexts(), Stage2Config(), "cpu", torch.float32)
    assert torch.equal(encoder.rgba_inputs[0], raw["foreground"])
