"""TopK SAEs of one shape trained as one stack of tensors ``[n_saes, ...]``, with the
gradients written out rather than left to autograd, so that only the encoder's forward
is dense: the decoder, and every gradient, touch only the latents each token uses (the
auxiliary loss's, up to half the dead latents per token, are dense over the dead ones).

The math is sae_lens's ``TopKTrainingSAE`` stepped by its ``SAETrainer`` (the tests
compare the weights with it): pre-activations ranked after scaling by the decoder row
norms, ReLU of the top k, MSE summed over the input and averaged over the batch, the
TopK auxiliary loss on dead latents (the top ``d_in / 2`` dead latents predict the
residual, without ReLU), each SAE's gradient norm clipped to 1, Adam (0.9, 0.999) at a
constant learning rate. :func:`step_flops` counts what a step needs, for the benchmark's
compute floor.
"""

from __future__ import annotations

import warnings

import torch

#: the stacked parameters: the encoder is kept transposed, ``[S, d_sae, d_in]``, so that
#: its gradient (a sum of inputs per latent) has the layout of the decoder's
NAMES = ("W_encT", "b_enc", "W_dec", "b_dec")
#: How a TopK SAE starts (:func:`initialise_topk`): "data" (decoder rows from the first
#: batch's tokens), "scaled" (sae_lens's random rows), both at unit norm with the encoder
#: scaled to fit the batch; "sae_lens" (rows of norm 0.1, sae_lens's default)
WEIGHT_INITS = ("data", "scaled", "sae_lens")


def decode_active(coef: torch.Tensor, index: torch.Tensor,
                  W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j coef[s, b, j] * W_dec[s, index[s, b, j]]`` over the chosen rows only."""
    S, B, k = index.shape
    n = W_dec.shape[1]
    flat = (index + torch.arange(S, device=index.device)[:, None, None] * n).reshape(-1, k)
    out = torch.nn.functional.embedding_bag(flat, W_dec.reshape(S * n, -1), mode="sum",
                                            per_sample_weights=coef.reshape(-1, k))
    return out.view(S, B, -1)


def csr(crow, col, values, shape) -> torch.Tensor:
    """A sparse CSR matrix, built unchecked (the indices are made here, valid by
    construction) and without torch's warning that CSR support is in beta."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _ByLatent:
    """The entries of a ``[tokens, k]`` index sorted by latent, as the rows of a sparse
    ``[d_sae, tokens]`` matrix: sums over the tokens each latent is active on are then one
    sparse-dense product (the gradients of the decoder rows and encoder columns)."""

    def __init__(self, index: torch.Tensor, n: int):
        col = index.reshape(-1)
        self.order = torch.argsort(col, stable=True)
        self.token = torch.div(self.order, index.shape[1], rounding_mode="floor")
        self.crow = torch.zeros(n + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(col, minlength=n), 0, out=self.crow[1:])
        self.n, self.tokens = n, index.shape[0]

    def sums(self, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``out[j] = sum over entries (b, i) with index[b, i] = j of values[b, i] * rows[b]``."""
        return csr(self.crow, self.token, values.reshape(-1)[self.order],
                   (self.n, self.tokens)) @ rows


def row_dots(rows: torch.Tensor, W: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = rows[b] . W[index[b, i]]`` without gathering the rows of ``W``."""
    B, k = index.shape
    mask = csr(torch.arange(0, B * k + 1, k), index.reshape(-1),
               torch.ones(B * k, dtype=rows.dtype), (B, W.shape[0]))
    return torch.sparse.sampled_addmm(mask, rows, W.T, beta=0.0).values().view(B, k)


def step_flops(d_in: int, d_sae: int, k: int, tokens: int, k_aux: int = 0,
               dense_encoder_backward: bool = False) -> int:
    """Multiply-adds x 2 one SAE's training step needs: the encoder's forward (dense: TopK
    ranks every latent), the decoder over the active latents, and their backward (the
    decoder rows' and the coefficients' gradients, the active encoder columns'); ``k_aux``
    dead latents per token add the same for the auxiliary loss. ``dense_encoder_backward``
    counts the encoder's weight gradient as the dense product autograd computes."""
    forward = 2 * tokens * d_in * d_sae
    sparse = 2 * tokens * d_in * (k + k_aux)
    encoder_backward = forward if dense_encoder_backward else sparse
    return forward + 3 * sparse + encoder_backward


class TopKStack:
    """TopK SAEs of one shape (``d_in``, ``d_sae``, ``k``) as stacked tensors, trained
    together: one batched encoder product per step and one Adam update for all of them.

    ``params``: ``W_enc [S, d_in, d_sae]``, ``b_enc [S, d_sae]``, ``W_dec [S, d_sae,
    d_in]``, ``b_dec [S, d_in]``. A latent is dead after ``dead_window`` steps without
    firing (sae_lens's ``dead_feature_window``)."""

    def __init__(self, labels: list[str], params: dict[str, torch.Tensor], *, k: int,
                 lr: float, dead_window: int, aux_coefficient: float = 1.0):
        self.labels, self.k, self.lr = list(labels), k, lr
        self.dead_window, self.aux_coefficient = dead_window, aux_coefficient
        self.p = {"W_encT": params["W_enc"].transpose(1, 2).contiguous().clone(),
                  **{n: params[n].detach().clone() for n in ("b_enc", "W_dec", "b_dec")}}
        S, self.d_sae, self.d_in = self.p["W_dec"].shape
        self.m = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.v = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.t = torch.zeros(())
        self.since_fired = torch.zeros(S, self.d_sae)
        self.fired_count = torch.zeros(S, self.d_sae)
        self.n_seen = 0
        self.flops = {"floor": 0, "dense_encoder_backward": 0}

    def params(self, i: int) -> dict[str, torch.Tensor]:
        """SAE ``i``'s weights in sae_lens's layout."""
        return {"W_enc": self.p["W_encT"][i].T.contiguous(), "b_enc": self.p["b_enc"][i],
                "W_dec": self.p["W_dec"][i], "b_dec": self.p["b_dec"][i]}

    def _ranked(self, x: torch.Tensor):
        """``pre * |W_dec row|`` ``[S, B, d_sae]`` (sae_lens ranks latents by it; the
        decoded value ``relu(pre * norm) / norm`` is ``relu(pre)``) and the row norms.
        ``(x - b_dec) @ W_enc + b_enc`` is computed as ``x @ W_enc + (b_enc - b_dec @
        W_enc)``: the data needs no gradient, so the backward never multiplies it out."""
        Wt, norm = self.p["W_encT"], self.p["W_dec"].norm(dim=-1)
        bias = self.p["b_enc"] - torch.bmm(Wt, self.p["b_dec"][..., None])[..., 0]
        ranked = torch.baddbmm(bias[:, None], x, Wt.transpose(1, 2))
        return ranked.mul_(norm[:, None]), norm

    def _flat(self, index: torch.Tensor) -> torch.Tensor:
        """``index`` as positions in the ``[S * d_sae]`` flattening of every SAE's latents."""
        return index + torch.arange(index.shape[0])[:, None, None] * self.d_sae

    def _active(self, ranked: torch.Tensor, norm: torch.Tensor):
        index = ranked.topk(self.k, dim=-1, sorted=False).indices
        coef = ranked.gather(-1, index) / norm[:, None].expand_as(ranked).gather(-1, index)
        return index, coef.relu_()

    @torch.no_grad()
    def held_out(self, x: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Each SAE's FVU on ``x`` ``[S, tokens, d_in]`` and the share of its latents that
        never fire there."""
        S = x.shape[0]
        err = torch.zeros(S)
        fired = torch.zeros(S * self.d_sae, dtype=torch.bool)
        for start in range(0, x.shape[1], chunk):
            part = x[:, start: start + chunk]
            index, coef = self._active(*self._ranked(part))
            out = decode_active(coef, index, self.p["W_dec"]) + self.p["b_dec"][:, None]
            err += (part - out).pow(2).sum((1, 2))
            fired[self._flat(index)[coef > 0]] = True
        var = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))
        return err / var, 1 - fired.view(S, -1).float().mean(1)

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> None:
        """One optimiser step of every SAE on its batch ``x[s]`` ``[S, B, d_in]``."""
        S, B, _ = x.shape
        grads, index, coef = self.gradients(x)
        self._adam(grads)
        firing = torch.bincount(self._flat(index)[coef > 0], minlength=S * self.d_sae)
        firing = firing.view(S, self.d_sae).float()
        self.since_fired += 1
        self.since_fired[firing > 0] = 0
        self.fired_count += firing
        self.n_seen += B

    @torch.no_grad()
    def gradients(self, x: torch.Tensor):
        """The gradient of each SAE's loss on ``x[s]`` (named as :data:`NAMES`), and the
        active latents ``index`` and their coefficients ``[S, B, k]``."""
        S, B, d = x.shape
        dead = self.since_fired > self.dead_window  # before this step's firing, as sae_lens
        ranked, norm = self._ranked(x)
        index, coef = self._active(ranked, norm)
        out = decode_active(coef, index, self.p["W_dec"]) + self.p["b_dec"][:, None]
        err = out.sub_(x)  # d loss / d out = 2 err / B
        g_out = err * (2.0 / B)
        grads = {n: torch.empty_like(t) for n, t in self.p.items()}
        half = d // 2
        for s in range(S):
            W_dec = self.p["W_dec"][s]
            by_latent = _ByLatent(index[s], self.d_sae)
            g_pre = row_dots(g_out[s], W_dec, index[s]) * (coef[s] > 0)  # through the ReLU
            grads["W_dec"][s] = by_latent.sums(coef[s], g_out[s])
            grads["W_encT"][s] = by_latent.sums(g_pre, x[s])
            g_b_enc = torch.zeros(self.d_sae).index_add_(0, index[s].reshape(-1),
                                                         g_pre.reshape(-1))
            cols = dead[s].nonzero()[:, 0]
            k_aux = min(half, len(cols))
            if k_aux:
                self._aux(s, cols, k_aux, ranked[s], norm[s], err[s], x[s], grads, g_b_enc)
            grads["b_enc"][s] = g_b_enc
            # the encoder reads x - b_dec: sum_b g_pre[b] (x[b] - b_dec) per latent
            grads["W_encT"][s].sub_(torch.outer(g_b_enc, self.p["b_dec"][s]))
            # b_dec: the output's bias, and through the encoder's input (x - b_dec)
            grads["b_dec"][s] = g_out[s].sum(0) - self.p["W_encT"][s].T @ g_b_enc
            for dense in (False, True):
                self.flops["dense_encoder_backward" if dense else "floor"] += step_flops(
                    d, self.d_sae, self.k, B, k_aux, dense_encoder_backward=dense)
        return grads, index, coef

    def _aux(self, s: int, cols: torch.Tensor, k_aux: int, ranked: torch.Tensor,
             norm: torch.Tensor, err: torch.Tensor, x: torch.Tensor, grads: dict,
             g_b_enc: torch.Tensor) -> None:
        """Add SAE ``s``'s auxiliary-loss gradients: the top ``k_aux`` of its dead latents
        ``cols`` (by ranked pre-activation) predict the residual ``x - out = -err``, without
        ReLU. Up to half of the dead latents fire per token, so the products are dense over
        the dead columns: a quarter of the latents cost less dense than sparse."""
        B = ranked.shape[0]
        W_dec = self.p["W_dec"][s][cols]  # [n_dead, d]
        sub = ranked[:, cols]
        chosen = torch.ones_like(sub, dtype=torch.bool)
        if k_aux < len(cols):
            chosen = torch.zeros_like(chosen).scatter_(
                1, sub.topk(k_aux, dim=-1, sorted=False).indices, True)
        coef = sub.div_(norm[cols]).mul_(chosen)  # [B, n_dead], zero where not chosen
        scale = self.aux_coefficient * min(len(cols) / (self.d_in // 2), 1.0)
        g_aux = torch.addmm(err, coef, W_dec).mul_(2.0 * scale / B)  # recon - residual
        g_pre = (g_aux @ W_dec.T).mul_(chosen)
        grads["W_dec"][s].index_add_(0, cols, coef.T @ g_aux)
        grads["W_encT"][s].index_add_(0, cols, g_pre.T @ x)
        g_b_enc.index_add_(0, cols, g_pre.sum(0))

    def _adam(self, grads: dict[str, torch.Tensor]) -> None:
        """Clip each SAE's gradient to norm 1 (sae_lens: ``clip_grad_norm_(..., 1.0)``),
        then Adam (0.9, 0.999, eps 1e-8) on every stacked tensor in one fused update."""
        total = sum(g.pow(2).flatten(1).sum(1) for g in grads.values())
        clip = (1.0 / (total.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(clip.view(-1, *[1] * (g.ndim - 1)))
        self.t += 1
        torch._fused_adam_(list(self.p.values()), list(grads.values()), list(self.m.values()),
                           list(self.v.values()), [], [self.t] * len(self.p), lr=self.lr,
                           beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                           amsgrad=False, maximize=False)

    def optimizer_state(self, i: int) -> dict[str, torch.Tensor]:
        """SAE ``i``'s Adam moments (stack layout) and step, to continue training later."""
        state = {f"{n}.exp_avg": self.m[n][i].clone() for n in NAMES}
        state.update({f"{n}.exp_avg_sq": self.v[n][i].clone() for n in NAMES})
        return {**state, "step": self.t.clone()}

    def load_optimizer_state(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        """Restore saved Adam moments, ``{row: state}``. The stack has one step count, for
        the bias correction: the least of the saved ones (the most cautious step size).
        Unless every SAE of the stack has a saved state, all start afresh: one step count
        cannot suit moments of both kinds."""
        if len(states) != len(self.labels):
            return
        for i, state in states.items():
            for n in NAMES:
                self.m[n][i] = state[f"{n}.exp_avg"]
                self.v[n][i] = state[f"{n}.exp_avg_sq"]
        self.t = min(state["step"].reshape(()) for state in states.values()).clone()

    def keep(self, rows: list[int]) -> None:
        """Drop the SAEs not in ``rows`` (finished) from every stacked state."""
        idx = torch.tensor(rows)
        self.labels = [self.labels[i] for i in rows]
        for state in (self.p, self.m, self.v):
            for n in state:
                state[n] = state[n][idx].clone()
        self.since_fired = self.since_fired[idx].clone()
        self.fired_count = self.fired_count[idx].clone()

    def dead_in_training(self, i: int) -> int:
        return int((self.since_fired[i] > self.dead_window).sum())

    def l0_in_training(self, i: int) -> float:
        return (self.fired_count[i].sum() / max(1, self.n_seen)).item()


def initialise_topk(sae, x: torch.Tensor, how: str, rng: torch.Generator,
                    k: int | None = None) -> None:
    """Start a TopK SAE where training would take hundreds of steps to get: unit decoder
    rows (``"data"``: the batch's own centred tokens, a quarter of sae_lens's random rows
    added; ``"scaled"``: sae_lens's random rows),
    the encoder their transpose times the one scale that fits the batch ``x`` best. TopK
    picks the same latents at any positive scale of the encoder, so that scale is a least-
    squares fit of the reconstruction with ``k`` (default ``sae.cfg.k``) latents; sae_lens's
    rows of norm 0.1 reconstruct about a hundredth of the input, and Adam grows them by
    about ``lr`` a step."""
    k = int(k or sae.cfg.k)
    with torch.no_grad():
        centred = x - sae.b_dec
        rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        if how == "data":  # a quarter random: a corpus repeats tokens, and equal rows tie
            pick = torch.randint(len(x), (sae.cfg.d_sae,), generator=rng)
            rows = rows / 4 + centred[pick] / centred[pick].norm(dim=1, keepdim=True)
            rows /= rows.norm(dim=1, keepdim=True)
        pre = centred @ rows.T
        top = pre.topk(k, dim=-1)
        recon = torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu()) @ rows
        fit = (centred * recon).sum() / recon.pow(2).sum().clamp_min(1e-12)
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T * fit.clamp_min(1e-6))
        sae.b_enc.zero_()


def initialise_threshold(sae, x: torch.Tensor, k: float) -> None:
    """Start the inference threshold of a thresholded SAE at ``k`` active latents per token
    of the batch ``x``, where the weights stand now. BatchTopK (and Matryoshka) SAEs learn
    one threshold as a moving average of each batch's smallest selected activation, from 0:
    after a few hundred steps it still lags, and more latents fire than the ``k`` they were
    trained with; here it starts at the ``k * len(x)``-th largest activation of the batch.
    A JumpReLU SAE's thresholds start at sae_lens's 0.01, far below a start from the data,
    and move about ``lr`` a step; here each latent's starts where it fires on a ``k / d_sae``
    share of the tokens."""
    with torch.no_grad():
        pre = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
        if hasattr(sae, "topk_threshold"):
            acts = pre.relu() * (sae.W_dec.norm(dim=-1)
                                 if sae.cfg.rescale_acts_by_decoder_norm else 1.0)
            n = min(acts.numel(), max(1, round(k * len(x))))
            sae.topk_threshold.fill_(acts.flatten().topk(n).values[-1].item())
        else:
            share = min(1.0, k / sae.cfg.d_sae)
            sae.threshold.copy_(torch.quantile(pre, 1 - share, dim=0).clamp_min(1e-4))
