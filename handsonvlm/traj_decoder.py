"""Trajectory decoders: hidden state at a `<hand_traj>` token -> one 2D hand point.

Every (sample b, hand h, waypoint t) row is decoded independently from its condition
c = the hand's half of the hidden state (D/2 dims, see ``hand_embedding.hand_conditions``).

CVAE (the released decoder; release ``hoi_forecast/architecture/decoder_modules.py::VAE`` inside
``traj_decoder.py::TrajCVAE``), hidden 512, latent 256, point y in R^2:

    encoder:  h = ELU(enc_in([y; c]))          Linear(2 + Dc -> 512)      release cvae.enc_MLP.0
              mu = enc_mu(h)                   Linear(512 -> 256)         release cvae.linear_means
              logvar = enc_logvar(h)           Linear(512 -> 256)         release cvae.linear_log_var
              z = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)
    decoder:  yhat = dec_out(ELU(dec_in([z; c])))
                                               Linear(256 + Dc -> 512)    release cvae.dec_MLP.0
                                               Linear(512 -> 2)           release cvae.dec_MLP.2
    (no output squashing: predictions may leave [0, 1])

Concatenation orders are the release's (target first, then condition; latent first, then
condition), so released weights load unchanged. At inference z = z_scale * N(0, I) with
z_scale = 2.0 (wider than the unit prior used in training) and yhat = Dec([z; c]).

Losses for a micro-batch with hand validity v [B, 2] (lambdas are applied by the caller):

    recon = sum_b sum_h v_bh sum_t sum_xy (yhat - y)^2            (a SUM, not a mean, as released)
    KL_bht = -1/2 sum_latent (1 + logvar - mu^2 - exp(logvar))
    kl ("corrected") = sum_b sum_h v_bh sum_t KL_bht
    kl ("release")   = K_tot * sum_b sum_h v_bh,  K_tot = sum over ALL B*2*T rows of KL_bht
                       (bug for bug: ``TrajCVAE.forward`` sums the flat [B*2*T] KL vector before
                       masking, so invalid hands and zero-placeholder rows count, times #valid hands)

Precision: the release casts the condition to bf16 inside ``TrajCVAE.forward``. Each layer runs in
its parameters' dtype (fp32 on CPU, bf16 under DeepSpeed bf16, with autocast disabled inside), and
activations between layers, predictions and losses are float32.

MLP (the release's unused ``--traj_decoder MLP`` path, ``TrajMLP``): Linear(Dc -> 512) -> ReLU ->
Linear(512 -> 512) -> ReLU -> Linear(512 -> 2), deterministic. Corrected: the release asserted a
validity tensor of shape [B, 2, T] but was passed [B, 2], so it could never train; we accept [B, 2]
and broadcast over steps. recon = squared error summed over xy and over valid rows, divided by the
number of valid rows (0 when there is none). The release additionally repeated that mean B times
and summed it (B x mean); we do not.

Initialisation: PyTorch defaults (the release rebuilt the decoder in ``train.py`` after HF's
``post_init``, so the trained CVAE also started from PyTorch default init).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from handsonvlm.constants import (
    DECODER_KINDS,
    NUM_HANDS,
    POINT_DIM,
    RELEASE_DECODER_HIDDEN,
    RELEASE_DECODER_LATENT,
    RELEASE_Z_SCALE,
)
from handsonvlm.constants import MODES as KL_REDUCTIONS  # "release" keeps the release's KL reduction

COMPUTE_DTYPE = torch.float32


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in the layer's dtype, returned as float32.

    The layer is *called* (not read through ``layer.weight``): DeepSpeed ZeRO-3 gathers a
    module's partitioned weights in that module's forward hook, so reading ``.weight`` directly
    would see an empty shard."""
    return layer(x.to(layer.weight.dtype)).to(COMPUTE_DTYPE)


def _check_inputs(cond: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, cond_dim: int) -> torch.Tensor:
    """Validate cond [B, 2, T, Dc], target [B, 2, T, 2], valid [B, 2]; return valid as float32 [B, 2]."""
    if cond.ndim != 4 or cond.shape[1] != NUM_HANDS or cond.shape[-1] != cond_dim:
        raise ValueError(f"expected cond [B, {NUM_HANDS}, T, {cond_dim}], got {tuple(cond.shape)}")
    if target.shape != (*cond.shape[:-1], POINT_DIM):
        raise ValueError(f"expected target {(*cond.shape[:-1], POINT_DIM)}, got {tuple(target.shape)}")
    if valid.shape != cond.shape[:2]:
        raise ValueError(f"expected valid [B, {NUM_HANDS}] = {tuple(cond.shape[:2])}, got {tuple(valid.shape)}")
    return valid.to(device=cond.device, dtype=COMPUTE_DTYPE)


class CVAETrajectoryDecoder(nn.Module):
    """Conditional VAE over one 2D point per (hand, step) row; see the module docstring.

    Parameters (Dc = ``cond_dim``, h = ``hidden``, l = ``latent``, p = ``point_dim``):
        enc_in     [h, p + Dc], [h]      input order [y; c]
        enc_mu     [l, h], [l]
        enc_logvar [l, h], [l]
        dec_in     [h, l + Dc], [h]      input order [z; c]
        dec_out    [p, h], [p]
    """

    kind = "cvae"

    def __init__(self, cond_dim: int, hidden: int = RELEASE_DECODER_HIDDEN, latent: int = RELEASE_DECODER_LATENT,
                 point_dim: int = POINT_DIM):
        super().__init__()
        self.cond_dim, self.hidden, self.latent, self.point_dim = cond_dim, hidden, latent, point_dim
        self.enc_in = nn.Linear(point_dim + cond_dim, hidden)
        self.enc_mu = nn.Linear(hidden, latent)
        self.enc_logvar = nn.Linear(hidden, latent)
        self.dec_in = nn.Linear(latent + cond_dim, hidden)
        self.dec_out = nn.Linear(hidden, point_dim)

    def encode(self, target: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """target [..., p], cond [..., Dc] -> (mu, logvar), each [..., l] float32."""
        h = F.elu(_linear(self.enc_in, torch.cat([target.to(COMPUTE_DTYPE), cond.to(COMPUTE_DTYPE)], dim=-1)))
        return _linear(self.enc_mu, h), _linear(self.enc_logvar, h)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """z [..., l], cond [..., Dc] -> yhat [..., p] float32."""
        h = F.elu(_linear(self.dec_in, torch.cat([z.to(COMPUTE_DTYPE), cond.to(COMPUTE_DTYPE)], dim=-1)))
        return _linear(self.dec_out, h)

    def forward(self, cond: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                kl_reduction: str = "release", generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training pass (reconstruction through the posterior).

        cond [B, 2, T, Dc], target [B, 2, T, 2], valid [B, 2] (bool or 0/1) ->
        dict(pred [B, 2, T, 2], recon [], kl []), all float32. ``generator`` (on cond's device)
        seeds the reparameterisation noise. ``kl_reduction`` is "release" or "corrected".
        """
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
        v = _check_inputs(cond, target, valid, self.cond_dim)  # [B, 2]
        with torch.autocast(device_type=cond.device.type, enabled=False):
            mu, logvar = self.encode(target, cond)  # [B, 2, T, l]
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=COMPUTE_DTYPE)
            z = mu + torch.exp(0.5 * logvar) * eps
            pred = self.decode(z, cond)  # [B, 2, T, 2]

            recon_rows = (pred - target.to(COMPUTE_DTYPE)).pow(2).sum(-1)  # [B, 2, T]
            kl_rows = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)  # [B, 2, T]
            recon = (recon_rows.sum(-1) * v).sum()
            if kl_reduction == "corrected":
                kl = (kl_rows.sum(-1) * v).sum()
            else:  # "release": K_tot over all rows, times the number of valid hands
                kl = kl_rows.sum() * v.sum()
        return {"pred": pred, "recon": recon, "kl": kl}

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, z_scale: float = RELEASE_Z_SCALE,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Inference: cond [..., Dc] -> yhat [..., 2] float32 with z = z_scale * N(0, I)."""
        if cond.shape[-1] != self.cond_dim:
            raise ValueError(f"expected cond [..., {self.cond_dim}], got {tuple(cond.shape)}")
        with torch.autocast(device_type=cond.device.type, enabled=False):
            z = z_scale * torch.randn((*cond.shape[:-1], self.latent), generator=generator,
                                      device=cond.device, dtype=COMPUTE_DTYPE)
            return self.decode(z, cond)


class MLPTrajectoryDecoder(nn.Module):
    """Deterministic MLP decoder (release ``TrajMLP``, corrected to accept valid [B, 2]).

    Parameters: fc1 [h, Dc], fc2 [h, h], fc_out [p, h] (+ biases).
    """

    kind = "mlp"

    def __init__(self, cond_dim: int, hidden: int = RELEASE_DECODER_HIDDEN, point_dim: int = POINT_DIM):
        super().__init__()
        self.cond_dim, self.hidden, self.point_dim = cond_dim, hidden, point_dim
        self.fc1 = nn.Linear(cond_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc_out = nn.Linear(hidden, point_dim)

    def predict(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [..., Dc] -> yhat [..., p] float32."""
        h = F.relu(_linear(self.fc1, cond))
        h = F.relu(_linear(self.fc2, h))
        return _linear(self.fc_out, h)

    def forward(self, cond: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                kl_reduction: str = "release", generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """cond [B, 2, T, Dc], target [B, 2, T, 2], valid [B, 2] -> dict(pred [B, 2, T, 2], recon [], kl [] = 0).

        recon = sum over valid (hand, step) rows of sum_xy (yhat - y)^2, divided by the number of
        valid rows. ``kl_reduction`` and ``generator`` are accepted for interface parity and ignored.
        """
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
        v = _check_inputs(cond, target, valid, self.cond_dim)  # [B, 2]
        with torch.autocast(device_type=cond.device.type, enabled=False):
            pred = self.predict(cond)  # [B, 2, T, 2]
            recon_rows = (pred - target.to(COMPUTE_DTYPE)).pow(2).sum(-1)  # [B, 2, T]
            row_valid = v.unsqueeze(-1).expand_as(recon_rows)  # [B, 2, T]
            recon = (recon_rows * row_valid).sum() / row_valid.sum().clamp_min(1.0)
        return {"pred": pred, "recon": recon, "kl": recon.new_zeros(())}

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, z_scale: float = RELEASE_Z_SCALE,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Inference: cond [..., Dc] -> yhat [..., 2] float32 (deterministic; z_scale/generator ignored)."""
        if cond.shape[-1] != self.cond_dim:
            raise ValueError(f"expected cond [..., {self.cond_dim}], got {tuple(cond.shape)}")
        with torch.autocast(device_type=cond.device.type, enabled=False):
            return self.predict(cond)


def build_traj_decoder(kind: str, cond_dim: int, hidden: int = RELEASE_DECODER_HIDDEN,
                       latent: int = RELEASE_DECODER_LATENT) -> CVAETrajectoryDecoder | MLPTrajectoryDecoder:
    """``kind`` "cvae" (released) or "mlp"; ``cond_dim`` = D/2. ``latent`` is ignored for "mlp"."""
    kind = kind.lower()
    if kind == "cvae":
        return CVAETrajectoryDecoder(cond_dim, hidden=hidden, latent=latent)
    if kind == "mlp":
        return MLPTrajectoryDecoder(cond_dim, hidden=hidden)
    raise ValueError(f"unknown trajectory decoder kind {kind!r}; expected one of {DECODER_KINDS}")
