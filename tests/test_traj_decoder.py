"""Hand-token encoding/splitting and the trajectory decoders."""

from __future__ import annotations

import math

import pytest
import torch

from handsonvlm.hand_embedding import (
    hand_conditions,
    hand_point_encoding,
    hand_token_embeddings,
    interleave_hands,
    split_hands,
)
from handsonvlm.traj_decoder import CVAETrajectoryDecoder, MLPTrajectoryDecoder, build_traj_decoder

B, T, D = 3, 4, 32  # batch, waypoints, tiny LLM width
DC = D // 2
LATENT = 8
HIDDEN = 16


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(B, 2, T, DC, generator=g).to(dtype)
    target = torch.rand(B, 2, T, 2, generator=g).to(dtype)
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    return cond, target, valid


# ---- hand_embedding -------------------------------------------------------------------------------

def test_hand_point_encoding_hand_computed_dim8():
    x, y = 0.5, 0.25
    w = [1.0, 10000 ** (-2 * 1 / 4)]  # C = 4, j = 0, 1
    expected = torch.tensor([math.sin(x * w[0]), math.sin(x * w[1]), math.cos(y * w[0]), math.cos(y * w[1])] * 2)
    got = hand_point_encoding(torch.tensor([x, y]), 8)
    torch.testing.assert_close(got, expected)


def test_hand_point_encoding_rejects_bad_dim_and_casts_from_fp32():
    with pytest.raises(ValueError):
        hand_point_encoding(torch.zeros(2), 6)
    points = torch.rand(5, 2)
    fp32 = hand_point_encoding(points, 16)
    bf16 = hand_point_encoding(points.to(torch.bfloat16), 16)
    assert bf16.dtype == torch.bfloat16
    # computed in fp32 from the bf16-rounded coordinates, then cast
    torch.testing.assert_close(bf16, hand_point_encoding(points.to(torch.bfloat16).float(), 16).to(torch.bfloat16))
    assert hand_point_encoding(points, 16, dtype=torch.float16).dtype == torch.float16
    assert fp32.shape == (5, 16)


def test_interleave_split_are_inverse():
    right, left = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    both = interleave_hands(right, left)
    assert both.shape == (2, 5, 14)
    assert torch.equal(both[..., 0::2], right) and torch.equal(both[..., 1::2], left)
    r2, l2 = split_hands(both)
    assert torch.equal(r2, right) and torch.equal(l2, left)
    states = torch.randn(3, 10)
    assert torch.equal(interleave_hands(*split_hands(states)), states)


def test_interleave_small_example():
    out = interleave_hands(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0]))
    assert out.tolist() == [1.0, 10.0, 2.0, 20.0]


def _release_hand_embeds(gt_hand: torch.Tensor, token_dim: int) -> torch.Tensor:
    """The release's process_traj_positional_embedding for one sample: [2, n, 2] -> [n, D]."""
    channels = token_dim // 4
    n = gt_hand.shape[1]
    flat = gt_hand.reshape(-1, 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2, dtype=torch.float32) / channels))
    xe, ye = flat[:, 0:1] * inv_freq, flat[:, 1:2] * inv_freq
    enc = torch.cat([torch.sin(xe), torch.cos(ye), torch.sin(xe), torch.cos(ye)], dim=-1)
    return enc.reshape(2, n, token_dim // 2).permute(1, 2, 0).reshape(n, token_dim)


def test_hand_token_embeddings_match_release_layout():
    points = torch.rand(B, 2, T, 2)
    got = hand_token_embeddings(points, D)
    assert got.shape == (B, T, D)
    for b in range(B):
        torch.testing.assert_close(got[b], _release_hand_embeds(points[b], D))
    with pytest.raises(ValueError):
        hand_token_embeddings(points, 36)  # D/2 = 18 not divisible by 4


def test_hand_conditions_match_release_split():
    states = torch.randn(B, T, D)
    cond = hand_conditions(states)
    assert cond.shape == (B, 2, T, DC)
    for b in range(B):
        release = states[b].reshape(T, DC, 2).permute(2, 0, 1)  # handsonvlm.py forward
        torch.testing.assert_close(cond[b], release)


# ---- CVAE -------------------------------------------------------------------------------------------

def test_cvae_shapes_and_parameter_layout():
    dec = CVAETrajectoryDecoder(DC, hidden=HIDDEN, latent=LATENT)
    shapes = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert shapes == {
        "enc_in.weight": (HIDDEN, 2 + DC), "enc_in.bias": (HIDDEN,),
        "enc_mu.weight": (LATENT, HIDDEN), "enc_mu.bias": (LATENT,),
        "enc_logvar.weight": (LATENT, HIDDEN), "enc_logvar.bias": (LATENT,),
        "dec_in.weight": (HIDDEN, LATENT + DC), "dec_in.bias": (HIDDEN,),
        "dec_out.weight": (2, HIDDEN), "dec_out.bias": (2,),
    }
    cond, target, valid = _inputs()
    out = dec(cond, target, valid)
    assert out["pred"].shape == (B, 2, T, 2)
    assert out["recon"].shape == () and out["kl"].shape == ()
    assert dec.sample(cond).shape == (B, 2, T, 2)
    assert dec.sample(cond[0, 0, 0]).shape == (2,)


def test_cvae_concatenation_order_target_then_cond():
    """enc_in sees [y; c]: the first 2 input columns multiply the target."""
    dec = CVAETrajectoryDecoder(DC, hidden=HIDDEN, latent=LATENT)
    cond, target, _ = _inputs()
    with torch.no_grad():
        dec.enc_in.weight[:, :2] = 0.0  # kill the target columns only
    mu1, lv1 = dec.encode(target, cond)
    mu2, lv2 = dec.encode(torch.rand_like(target), cond)
    torch.testing.assert_close(mu1, mu2)
    torch.testing.assert_close(lv1, lv2)
    with torch.no_grad():
        dec.dec_in.weight[:, LATENT:] = 0.0  # kill the condition columns of [z; c]
    z = torch.randn(B, 2, T, LATENT)
    torch.testing.assert_close(dec.decode(z, cond), dec.decode(z, torch.randn_like(cond)))


def _kl_rows(dec, cond, target):
    mu, logvar = dec.encode(target, cond)
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)  # [B, 2, T]


def test_release_kl_is_total_times_num_valid_and_differs_from_corrected():
    dec = CVAETrajectoryDecoder(DC, hidden=HIDDEN, latent=LATENT)
    cond, target, valid = _inputs()
    rows = _kl_rows(dec, cond, target)
    v = valid.float()
    release = dec(cond, target, valid, kl_reduction="release")["kl"]
    corrected = dec(cond, target, valid, kl_reduction="corrected")["kl"]
    torch.testing.assert_close(release, rows.sum() * v.sum())
    torch.testing.assert_close(corrected, (rows.sum(-1) * v).sum())
    assert not torch.isclose(release, corrected)


def test_kl_constructed_case_hand_computed():
    """mu = 1, logvar = 0 for every row -> KL_row = latent / 2."""
    dec = CVAETrajectoryDecoder(DC, hidden=HIDDEN, latent=LATENT)
    with torch.no_grad():
        for layer in (dec.enc_mu, dec.enc_logvar):
            layer.weight.zero_()
        dec.enc_mu.bias.fill_(1.0)
        dec.enc_logvar.bias.zero_()
    cond, target, valid = _inputs()
    n_valid = int(valid.sum())  # 3 valid hands
    kl_row = LATENT / 2
    out_rel = dec(cond, target, valid, kl_reduction="release")
    out_cor = dec(cond, target, valid, kl_reduction="corrected")
    assert out_rel["kl"].item() == pytest.approx(kl_row * B * 2 * T * n_valid)  # 4 * 24 * 3 = 288
    assert out_cor["kl"].item() == pytest.approx(kl_row * T * n_valid)  # 4 * 4 * 3 = 48


def test_recon_counts_only_valid_hands():
    dec = CVAETrajectoryDecoder(DC, hidden=HIDDEN, latent=LATENT)
    cond, target, valid = _inputs()
    out = dec(cond, target, valid, generator=torch.Generator().manual_seed(1))
    per_row = (out["pred"] - target).pow(2).sum(-1)  # [B, 2, T]
    torch.testing.assert_close(out["recon"], (per_row.sum(-1) * valid.float()).sum())
    # rows are independent: changing the targets of invalid hands (same noise) changes only their
    # own predictions, and recon not at all
    target2 = target.clone()
    target2[0, 1] += 5.0  # (b=0, left) is invalid
    target2[2] -= 3.0  # sample 2 has no valid hand
    out2 = dec(cond, target2, valid, generator=torch.Generator().manual_seed(1))
    mask = valid[:, :, None, None].expand_as(out["pred"])
    torch.testing.assert_close(out2["pred"][mask], out["pred"][mask])
    torch.testing.assert_close(out2["recon"], out["recon"])


def test_cvae_seeded_noise_and_sampling_reproducible():
    dec = CVAETrajectoryDecoder(DC, hidden=HIDDEN, latent=LATENT)
    cond, target, valid = _inputs()
    a = dec(cond, target, valid, generator=torch.Generator().manual_seed(7))["pred"]
    b = dec(cond, target, valid, generator=torch.Generator().manual_seed(7))["pred"]
    assert torch.equal(a, b)
    s1 = dec.sample(cond, generator=torch.Generator().manual_seed(3))
    s2 = dec.sample(cond, generator=torch.Generator().manual_seed(3))
    s3 = dec.sample(cond, generator=torch.Generator().manual_seed(4))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


def test_sample_uses_z_scale():
    dec = CVAETrajectoryDecoder(DC, hidden=HIDDEN, latent=LATENT)
    cond = torch.randn(5, DC)
    z = 2.0 * torch.randn((5, LATENT), generator=torch.Generator().manual_seed(0))
    got = dec.sample(cond, z_scale=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, dec.decode(z, cond))
    with pytest.raises(ValueError):
        dec.sample(torch.randn(5, DC + 1))


def test_cvae_gradients_flow_to_parameters_and_condition():
    dec = CVAETrajectoryDecoder(DC, hidden=HIDDEN, latent=LATENT)
    cond, target, valid = _inputs()
    cond.requires_grad_(True)
    out = dec(cond, target, valid, kl_reduction="corrected")
    (out["recon"] + 1e-3 * out["kl"]).backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert cond.grad.abs().sum() > 0
    assert cond.grad[2].abs().sum() == 0  # sample 2 has no valid hand: no gradient (corrected KL)


def test_cvae_computes_in_fp32_with_low_precision_inputs_and_params():
    dec = CVAETrajectoryDecoder(DC, hidden=HIDDEN, latent=LATENT).to(torch.bfloat16)
    cond, target, valid = _inputs(dtype=torch.bfloat16)
    out = dec(cond, target, valid)
    assert out["pred"].dtype == torch.float32 and out["kl"].dtype == torch.float32
    out["recon"].backward()
    assert dec.enc_in.weight.grad is not None and dec.enc_in.weight.grad.dtype == torch.bfloat16
    assert dec.sample(cond).dtype == torch.float32


def test_cvae_input_validation():
    dec = CVAETrajectoryDecoder(DC, hidden=HIDDEN, latent=LATENT)
    cond, target, valid = _inputs()
    with pytest.raises(ValueError):
        dec(cond, target, valid, kl_reduction="mean")
    with pytest.raises(ValueError):
        dec(cond, target, valid[:, :1])
    with pytest.raises(ValueError):
        dec(cond, target[..., :1], valid)
    with pytest.raises(ValueError):
        dec(cond[..., :-1], target, valid)


# ---- MLP --------------------------------------------------------------------------------------------

def test_mlp_accepts_valid_b2_and_normalises_by_valid_rows():
    dec = MLPTrajectoryDecoder(DC, hidden=HIDDEN)
    assert [k for k in dec.state_dict()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                             "fc_out.weight", "fc_out.bias"]
    cond, target, valid = _inputs()
    out = dec(cond, target, valid)
    per_row = (out["pred"] - target).pow(2).sum(-1)  # [B, 2, T]
    n_rows = valid.sum() * T
    torch.testing.assert_close(out["recon"], (per_row * valid[:, :, None]).sum() / n_rows)
    assert out["kl"].item() == 0.0
    none_valid = dec(cond, target, torch.zeros(B, 2, dtype=torch.bool))
    assert none_valid["recon"].item() == 0.0
    out["recon"].backward()
    assert all(p.grad is not None for p in dec.parameters())


def test_mlp_sample_is_deterministic():
    dec = MLPTrajectoryDecoder(DC, hidden=HIDDEN)
    cond = torch.randn(2, 2, 1, DC)
    a = dec.sample(cond, generator=torch.Generator().manual_seed(0))
    b = dec.sample(cond, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 2, 1, 2) and torch.equal(a, b)


def test_factory():
    assert isinstance(build_traj_decoder("cvae", DC, HIDDEN, LATENT), CVAETrajectoryDecoder)
    assert isinstance(build_traj_decoder("MLP", DC, HIDDEN, LATENT), MLPTrajectoryDecoder)
    cvae = build_traj_decoder("cvae", DC)
    assert cvae.hidden == 512 and cvae.latent == 256
    with pytest.raises(ValueError):
        build_traj_decoder("diffusion", DC)
