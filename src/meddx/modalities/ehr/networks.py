"""Networks for ICU time series and tables.

EHR inputs are the ``(B, C, T)`` tensors of :mod:`meddx.modalities.ehr.features`
(values, masks, deltas for ``n_vars`` variables, ``n_static`` statics, a ``valid`` channel);
tabular inputs are ``(B, F)``. No library offers GRU-D for plain torch (PyPOTS would pull a
large stack), so the cell is written here, following Che et al., Sci Rep 2018.

* ``grud``: GRU-D — missing values decay from the last observation towards the (train) mean
  with a learned, per-variable rate; the hidden state decays with time since observation.
  Reads the bins inside the window only (the state is frozen after the last valid bin).
* ``ehr_transformer``: a transformer encoder over hourly bins, padding masked.
* ``logistic``: a linear model on summary features (last, min, max, mean, observed) — the
  clinician-familiar baseline; on ``(B, F)`` tables a plain logistic regression.
* ``mlp``: the same inputs through hidden layers (the tabular default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from meddx.errors import ConfigError
from meddx.modalities.networks import network

__all__ = ["GRUD", "GRUDEnsemble", "grud", "ehr_transformer", "logistic", "mlp", "summary_features"]

_N_VARS, _N_STATIC, _T = 37, 9, 48
_EHR_SPEC = {"spatial_dims": 1, "in_channels": 3 * _N_VARS + _N_STATIC + 1, "size": _T,
             "n_vars": _N_VARS, "n_static": _N_STATIC}
_TAB_SPEC = {"spatial_dims": 0, "in_channels": 20, "size": None}


def _ehr_example(spec: dict[str, Any], batch: int) -> torch.Tensor:
    """A random but well-formed EHR batch (masks 0/1, deltas ≥ 0, windows of 6-48 h)."""
    v, s, t = spec["n_vars"], spec["n_static"], spec["size"]
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(batch, v, t, generator=g) < 0.3).float()
    values = torch.randn(batch, v, t, generator=g) * mask
    delta = torch.rand(batch, v, t, generator=g)
    static = torch.randn(batch, s, 1, generator=g).expand(batch, s, t)
    hours = torch.randint(6, t + 1, (batch,), generator=g)
    valid = (torch.arange(t)[None, :] < hours[:, None]).float()[:, None, :]
    return torch.cat([values, mask, delta * valid, static, valid], dim=1)


def _tab_example(spec: dict[str, Any], batch: int) -> torch.Tensor:
    return torch.randn(batch, spec["in_channels"])


def _split(x: torch.Tensor, n_vars: int, n_static: int) -> tuple[torch.Tensor, ...]:
    if x.dim() != 3 or x.shape[1] != 3 * n_vars + n_static + 1:
        raise ConfigError(
            f"EHR networks take (B, {3 * n_vars + n_static + 1}, T) inputs, got {tuple(x.shape)}"
        )
    v = n_vars
    static = x[:, 3 * v:3 * v + n_static, 0]
    return x[:, :v], x[:, v:2 * v], x[:, 2 * v:3 * v], static, x[:, -1]


def summary_features(x: torch.Tensor, n_vars: int, n_static: int) -> torch.Tensor:
    """Per variable over the window: last, min, max, mean (0 when unobserved) and whether it
    was observed; then the statics → ``(B, 5·n_vars + n_static)``."""
    values, mask, _, static, valid = _split(x, n_vars, n_static)
    mask = mask * valid[:, None, :]
    seen = mask > 0
    count = mask.sum(-1)
    any_seen = (count > 0).float()
    mean = (values * mask).sum(-1) / count.clamp_min(1)
    big = torch.finfo(values.dtype).max / 4
    vmin = torch.where(seen, values, values.new_full((), big)).amin(-1) * any_seen
    vmax = torch.where(seen, values, values.new_full((), -big)).amax(-1) * any_seen
    t = torch.arange(values.shape[-1], device=x.device)
    last_idx = torch.where(seen, t, torch.zeros_like(t)).amax(-1, keepdim=True)
    last = values.gather(-1, last_idx).squeeze(-1) * any_seen
    return torch.cat([last, vmin, vmax, mean, any_seen, static], dim=1)


class GRUD(nn.Module):
    """GRU-D (Che et al. 2018) on binned inputs with a ``valid`` window channel.

    Options beyond the paper: ``pooling="mean_max"`` reads the hidden states of every valid
    bin (last, mean and max) instead of the last one only; ``wide=True`` adds a linear path on
    the summary features (a "wide and deep" model: the logistic baseline plus the recurrent
    network's correction).
    """

    def __init__(self, n_vars: int, n_static: int, num_outputs: int, hidden: int = 64,
                 dropout: float = 0.3, pooling: str = "last", wide: bool = False) -> None:
        super().__init__()
        if pooling not in ("last", "mean_max"):
            raise ConfigError(f"grud pooling must be 'last' or 'mean_max', got {pooling!r}")
        self.n_vars, self.n_static = n_vars, n_static
        self.pooling = pooling
        self.wide = nn.Linear(5 * n_vars + n_static, num_outputs) if wide else None
        self.decay_x_w = nn.Parameter(torch.full((n_vars,), 1.0))
        self.decay_x_b = nn.Parameter(torch.zeros(n_vars))
        self.decay_h = nn.Linear(n_vars, hidden)
        self.h0 = nn.Linear(n_static, hidden)
        self.cell = nn.GRUCell(2 * n_vars, hidden)
        width = hidden * (3 if pooling == "mean_max" else 1) + n_static
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden),
                                  nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, mask, delta, static, valid = _split(x, self.n_vars, self.n_static)
        gamma_x = torch.exp(-torch.relu(self.decay_x_w[:, None] * delta + self.decay_x_b[:, None]))
        gamma_h = torch.exp(-torch.relu(self.decay_h(delta.transpose(1, 2))))  # (B, T, H)
        # Everything that does not depend on the hidden state is computed outside the
        # recurrence, which then holds only one fused GRU cell and the window freeze per bin:
        # the per-op overhead of that loop is what a forward pass costs on a CPU.
        x_hat = mask * values + (1 - mask) * gamma_x * _last_seen(values, mask)
        inputs = torch.cat([x_hat, mask], dim=1).transpose(1, 2)  # (B, T, 2V)
        h = torch.tanh(self.h0(static))
        states = []
        for x_t, g_t, keep in zip(inputs.unbind(1), gamma_h.unbind(1),
                                  (valid > 0.5)[..., None].unbind(1), strict=True):
            h = torch.where(keep, self.cell(x_t, h * g_t), h)  # frozen after the window
            states.append(h)
        if self.pooling == "mean_max":
            hs = torch.stack(states, dim=1)  # (B, T, H)
            keep = valid[..., None]
            mean = (hs * keep).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
            top = (hs * keep + (keep - 1)).amax(1)  # tanh-bounded states: -1 is the floor
            h = torch.cat([h, mean, top], dim=1)
        out = self.head(torch.cat([h, static], dim=1))
        if self.wide is not None:
            out = out + self.wide(summary_features(x, self.n_vars, self.n_static))
        return out


# GRUDEnsemble parameter → the GRUD parameter it stacks along the member axis (Linear weights,
# stored (out, in), are stacked transposed: the ensemble multiplies by (in, out))
_STACKED = {"decay_x_w": "decay_x_w", "decay_x_b": "decay_x_b",
            "decay_h_w": "decay_h.weight", "decay_h_b": "decay_h.bias",
            "h0_w": "h0.weight", "h0_b": "h0.bias",
            "w_ih": "cell.weight_ih", "b_ih": "cell.bias_ih",
            "w_hh": "cell.weight_hh", "b_hh": "cell.bias_hh",
            "fc1_w": "head.1.weight", "fc1_b": "head.1.bias",
            "fc2_w": "head.4.weight", "fc2_b": "head.4.bias",
            "wide_w": "wide.weight", "wide_b": "wide.bias"}


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach().T if t.dim() == 2 else t.detach() for t in tensors]).clone()


def _unstack(t: torch.Tensor) -> torch.Tensor:
    return t.detach().T.clone() if t.dim() == 2 else t.detach().clone()


class GRUDEnsemble(nn.Module):
    """``members`` GRU-D networks run side by side as one module; the output is the mean of
    their logits (a deep ensemble, Lakshminarayanan et al. 2017).

    Every parameter carries a leading member axis and the recurrence runs once for all members
    with batched matrix products, so a forward pass costs little more than one member's (the
    loop's per-op overhead, not arithmetic, is what a CPU spends here). ``meddx train`` trains
    the members as separate runs (each a standard run with its own early stopping, resumable)
    and joins them with :meth:`from_members`; see docs/ehr.md for what that gains.
    """

    def __init__(self, n_vars: int, n_static: int, num_outputs: int, members: int,
                 hidden: int = 64, dropout: float = 0.3, pooling: str = "last",
                 wide: bool = False) -> None:
        super().__init__()
        # the members' initial weights are those of separately built GRU-D networks
        nets = [GRUD(n_vars, n_static, num_outputs, hidden, dropout, pooling, wide)
                for _ in range(members)]
        self.n_vars, self.n_static, self.pooling = n_vars, n_static, pooling
        self.members, self.hidden, self.dropout = members, hidden, dropout
        for ours, theirs in _STACKED.items():
            if theirs.startswith("wide.") and not wide:
                setattr(self, ours, None)
                continue
            setattr(self, ours, nn.Parameter(_stack([n.state_dict()[theirs] for n in nets])))

    @classmethod
    def from_members(cls, nets: list[GRUD]) -> GRUDEnsemble:
        """One ensemble module from separately trained :class:`GRUD` networks (same options)."""
        if len(nets) < 2 or not all(isinstance(n, GRUD) for n in nets):
            raise ConfigError("an ensemble needs two or more GRU-D networks")
        first = nets[0]
        ens = cls(first.n_vars, first.n_static, first.head[4].out_features, len(nets),
                  hidden=first.cell.hidden_size, dropout=first.head[0].p, pooling=first.pooling,
                  wide=first.wide is not None)
        shapes = {k: v.shape for k, v in ens.member(0).state_dict().items()}
        states = [n.state_dict() for n in nets]
        if any({k: v.shape for k, v in st.items()} != shapes for st in states):
            raise ConfigError("ensemble members must share one architecture")
        ens.load_state_dict({ours: _stack([st[theirs] for st in states])
                             for ours, theirs in _STACKED.items()
                             if getattr(ens, ours) is not None})
        return ens.eval()

    def member(self, k: int) -> GRUD:
        """Member ``k`` as a plain :class:`GRUD` (same weights), e.g. to inspect or test it."""
        net = GRUD(self.n_vars, self.n_static, self.fc2_b.shape[-1], self.hidden, self.dropout,
                   self.pooling, self.wide_w is not None)
        net.load_state_dict({theirs: _unstack(getattr(self, ours)[k])
                             for ours, theirs in _STACKED.items()
                             if getattr(self, ours) is not None})
        return net.train(self.training)

    @staticmethod
    def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-member affine map: ``(K, B, I) @ (K, I, O) + (K, O)``."""
        return torch.baddbmm(b[:, None, :], x, w)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits ``(K, B, outputs)``."""
        values, mask, delta, static, valid = _split(x, self.n_vars, self.n_static)
        k, (b, v, t) = self.members, values.shape
        gamma_x = torch.exp(-torch.relu(self.decay_x_w[:, None, :, None] * delta
                                        + self.decay_x_b[:, None, :, None]))  # (K, B, V, T)
        x_hat = mask * values + (1 - mask) * gamma_x * _last_seen(values, mask)
        inputs = torch.cat([x_hat, mask.expand(k, b, v, t)], dim=2).transpose(2, 3)
        # the input side of every gate for every bin at once: (K, B*T, 3H)
        gates_x = self._linear(inputs.reshape(k, b * t, 2 * v), self.w_ih, self.b_ih)
        gates_x = gates_x.reshape(k, b, t, -1)
        d = delta.transpose(1, 2).reshape(1, b * t, v).expand(k, b * t, v)
        gamma_h = torch.exp(-torch.relu(self._linear(d, self.decay_h_w, self.decay_h_b)))
        gamma_h = gamma_h.reshape(k, b, t, -1)
        static_k = static.expand(k, b, self.n_static)
        h = torch.tanh(self._linear(static_k, self.h0_w, self.h0_b))
        n_h = h.shape[-1]
        states = []
        # GRU gates in torch's order (r, z, n); h' = (1 - z)·n + z·h_in = lerp(n, h_in, z)
        for gx_rz, gx_n, g_h, keep in zip(gates_x[..., :2 * n_h].unbind(2),
                                          gates_x[..., 2 * n_h:].unbind(2), gamma_h.unbind(2),
                                          (valid > 0.5)[None, :, :, None].unbind(2), strict=True):
            h_in = h * g_h
            g_hh = self._linear(h_in, self.w_hh, self.b_hh)
            r, z = torch.sigmoid(gx_rz + g_hh[..., :2 * n_h]).chunk(2, dim=-1)
            n = torch.tanh(gx_n + r * g_hh[..., 2 * n_h:])
            h = torch.where(keep, torch.lerp(n, h_in, z), h)  # frozen after the window
            states.append(h)
        if self.pooling == "mean_max":
            hs = torch.stack(states, dim=2)  # (K, B, T, H)
            w = valid[None, :, :, None]
            mean = (hs * w).sum(2) / valid.sum(1)[None, :, None].clamp_min(1)
            top = (hs * w + (w - 1)).amax(2)
            h = torch.cat([h, mean, top], dim=-1)
        z = torch.cat([h, static_k.to(h.dtype)], dim=-1)
        z = nn.functional.dropout(z, self.dropout, self.training)
        z = torch.relu(self._linear(z, self.fc1_w, self.fc1_b))
        z = nn.functional.dropout(z, self.dropout, self.training)
        out = self._linear(z, self.fc2_w, self.fc2_b)
        if self.wide_w is not None:
            f = summary_features(x, self.n_vars, self.n_static)
            out = out + self._linear(f.expand(k, *f.shape), self.wide_w, self.wide_b)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).mean(0)


def _last_seen(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last observed value *before* each bin, 0 (the train mean) before the first
    ``(B, V, T)``.

    A recurrence ``last ← lerp(last, value, mask)`` rather than a ``cummax`` (which ONNX does not
    have) or a hard gather: with the fractional masks that integrated gradients interpolates
    through, the imputed value blends smoothly and stays differentiable in the mask.
    """
    last = torch.zeros_like(values[..., 0])
    out = [last]
    for v_t, m_t in zip(values.unbind(-1)[:-1], mask.unbind(-1)[:-1], strict=True):
        last = torch.lerp(last, v_t, m_t)
        out.append(last)
    return torch.stack(out, dim=-1)


class EHRTransformer(nn.Module):
    """Transformer encoder over hourly bins (values, masks, deltas), padding masked."""

    def __init__(self, n_vars: int, n_static: int, num_outputs: int, length: int,
                 d_model: int = 64, heads: int = 4, layers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.n_vars, self.n_static = n_vars, n_static
        self.embed = nn.Linear(3 * n_vars, d_model)
        self.position = nn.Parameter(torch.zeros(1, length, d_model))
        self.static = nn.Linear(n_static, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * d_model, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, mask, delta, static, valid = _split(x, self.n_vars, self.n_static)
        tokens = torch.cat([values, mask, delta], dim=1).transpose(1, 2)
        s = self.static(static)
        h = self.embed(tokens) + self.position[:, : tokens.shape[1]] + s[:, None, :]
        h = self.encoder(h, src_key_padding_mask=valid < 0.5)  # bins after the window
        pooled = (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        return self.head(torch.cat([pooled, s], dim=1))


class SummaryNet(nn.Module):
    """Linear model or MLP on summary features (EHR) or on the table's columns."""

    def __init__(self, in_features: int, num_outputs: int, hidden: list[int], dropout: float,
                 n_vars: int | None, n_static: int | None) -> None:
        super().__init__()
        self.n_vars, self.n_static = n_vars, n_static
        width = 5 * n_vars + n_static if n_vars is not None else in_features
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_vars is not None:
            x = summary_features(x, self.n_vars, self.n_static or 0)
        elif x.dim() != 2:
            raise ConfigError(f"tabular networks take (B, F) inputs, got {tuple(x.shape)}")
        return self.net(x)


def _no_extra(name: str, extra: dict[str, Any]) -> None:
    if extra:
        raise ConfigError(f"unknown options for model '{name}': {sorted(extra)}")


@network(modality="ehr", example_spec=_EHR_SPEC, example_input=_ehr_example)
def grud(*, num_outputs: int, spatial_dims: int = 1, in_channels: int, size: int | None = None,
         n_vars: int, n_static: int, hidden: int = 64, dropout: float = 0.3,
         pooling: str = "last", wide: bool = False, members: int = 1,
         **extra: Any) -> nn.Module:
    """GRU-D-style recurrent network (values, masks, time since last, learned decay);
    ``pooling`` "last" or "mean_max", ``wide`` adds a linear path on summary features;
    ``members`` > 1 trains that many as one deep ensemble (mean of their logits)."""
    _no_extra("grud", extra)
    if not isinstance(members, int) or members < 1:
        raise ConfigError(f"grud members must be a whole number ≥ 1, got {members!r}")
    if members > 1:
        return GRUDEnsemble(n_vars, n_static, num_outputs, members, hidden=hidden,
                            dropout=dropout, pooling=pooling, wide=wide)
    return GRUD(n_vars, n_static, num_outputs, hidden=hidden, dropout=dropout, pooling=pooling,
                wide=wide)


@network(modality="ehr", example_spec=_EHR_SPEC, example_input=_ehr_example)
def ehr_transformer(*, num_outputs: int, spatial_dims: int = 1, in_channels: int,
                    size: int | None = None, n_vars: int, n_static: int, d_model: int = 64,
                    heads: int = 4, layers: int = 2, dropout: float = 0.2,
                    **extra: Any) -> nn.Module:
    """Transformer encoder over the hourly bins."""
    _no_extra("ehr_transformer", extra)
    return EHRTransformer(n_vars, n_static, num_outputs, size or 48, d_model, heads, layers,
                          dropout)


@network(modality="ehr", example_spec=_EHR_SPEC, example_input=_ehr_example)
def logistic(*, num_outputs: int, spatial_dims: int = 1, in_channels: int,
             size: int | None = None, n_vars: int | None = None, n_static: int | None = None,
             **extra: Any) -> nn.Module:
    """Logistic regression on summary features (EHR) or on the columns (tabular)."""
    _no_extra("logistic", extra)
    return SummaryNet(in_channels, num_outputs, [], 0.0, n_vars, n_static)


@network(modality="tabular", example_spec=_TAB_SPEC, example_input=_tab_example)
def mlp(*, num_outputs: int, spatial_dims: int = 0, in_channels: int, size: int | None = None,
        n_vars: int | None = None, n_static: int | None = None, hidden: list[int] | None = None,
        dropout: float = 0.2, **extra: Any) -> nn.Module:
    """Multi-layer perceptron on table columns (or on EHR summary features)."""
    _no_extra("mlp", extra)
    return SummaryNet(in_channels, num_outputs, list(hidden or [64, 32]), dropout, n_vars,
                      n_static)
