"""The training loops. The batched TopK loop: TopK SAEs of one shape step as one
:class:`~.topk.TopKStack` from one stream of batches, and every ``check_every`` steps each
SAE's held-out FVU and dead share are measured (its curve); :func:`converged` is the
held-out criterion that stops it. :func:`fit_sae_lens`: sae_lens's own trainer, for every
other architecture. ``cfg`` is a :class:`~.training.TrainConfig` (its convergence fields
and ``max_steps``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.training.multi_sae_trainer import MultiSAETrainer

from .topk import TopKStack


def converged(curve: Sequence, cfg) -> bool:
    """Whether the best held-out FVU of ``curve`` (``[[step, fvu, ...], ...]``, steps
    counted from this training's start) improved by less than ``cfg.converge_tol`` over
    its last ``cfg.converge_window`` steps, at ``cfg.min_steps`` or later."""
    step = curve[-1][0]
    if step < max(cfg.min_steps, cfg.converge_window):
        return False
    before = [point[1] for point in curve if point[0] <= step - cfg.converge_window]
    if not before:
        return False
    return min(before) - min(point[1] for point in curve) < cfg.converge_tol


def fit_batched(saes: dict, stream, cfg, held_out: dict, *, dead_window: int,
                lr: Mapping[str, float], before: Mapping[str, Mapping] | None = None,
                optimizer: Mapping[str, dict] | None = None) -> dict:
    """Train TopK SAEs, those of one shape as one :class:`~.topk.TopKStack`, from one
    stream of batches, checking each one's held-out FVU and dead share every
    ``cfg.check_every`` steps, at each one's learning rate ``lr``. ``before``: each SAE's metadata from an earlier training
    (``init``), whose steps and curve this one continues; ``optimizer``: their saved Adam
    state (:meth:`~.topk.TopKStack.optimizer_state`), without which Adam starts afresh.

    Returns ``steps`` (in all), ``dead`` (latents dead in training at the end),
    ``curves`` (``[[step, fvu, dead share], ...]``, the earlier ones included) and
    ``converged`` (per SAE), ``converged_at`` (the step it first met the criterion) and
    ``optimizer`` (each SAE's Adam state)."""
    before = before or {}
    offset = {label: int((before.get(label) or {}).get("sage_nn_train_steps") or 0)
              for label in saes}
    groups: dict[tuple, list[str]] = {}
    for label, sae in saes.items():
        groups.setdefault((sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k), []).append(label)
    stacks = [TopKStack(labels, {n: torch.stack([getattr(saes[l], n).detach() for l in labels])
                                 for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
                        k=saes[labels[0]].cfg.k, lr=lr[labels[0]], dead_window=dead_window,
                        aux_coefficient=saes[labels[0]].cfg.aux_loss_coefficient)
              for labels in groups.values()]
    for stack in stacks:  # a continued SAE goes on with the Adam moments it was saved with
        stack.load_optimizer_state({i: optimizer[label] for i, label in enumerate(stack.labels)
                                    if label in (optimizer or {})})
    for labels in groups.values():
        first = saes[labels[0]].cfg
        if not (first.rescale_acts_by_decoder_norm and first.apply_b_dec_to_input
                and first.normalize_activations == "none"):
            raise ValueError("the batched trainer implements sae_lens's default TopK SAE only")
    new_curves: dict[str, list] = {label: [] for label in saes}
    result = {"steps": {}, "dead": {}, "converged_at": {}, "optimizer": {}}

    def check(stack: TopKStack, step: int) -> list[int]:
        """Record each SAE's held-out point; return the rows still training."""
        fvu, dead = stack.held_out(torch.stack([held_out[label] for label in stack.labels]))
        going = []
        for i, label in enumerate(stack.labels):
            new_curves[label].append([step, round(fvu[i].item(), 6), round(dead[i].item(), 4)])
            done = converged(new_curves[label], cfg)
            if done and label not in result["converged_at"]:
                result["converged_at"][label] = step + offset[label]
            if not (done and cfg.stop_at_convergence):
                going.append(i)
        return going

    def finish(stack: TopKStack, rows: list[int], step: int) -> None:
        for i in rows:
            label = stack.labels[i]
            with torch.no_grad():
                for n, value in stack.params(i).items():
                    getattr(saes[label], n).copy_(value)
            saes[label].cfg.metadata.l0 = stack.l0_in_training(i)
            result["dead"][label] = saes[label].cfg.metadata.num_dead_features = \
                stack.dead_in_training(i)
            result["steps"][label] = step
            result["optimizer"][label] = stack.optimizer_state(i)

    for stack in stacks:
        check(stack, 0)
    step = 0
    while stacks and step < cfg.max_steps:
        batch = next(stream)
        for stack in stacks:
            stack.step(torch.stack([batch[label] for label in stack.labels]))
        step += 1
        if step % cfg.check_every and step < cfg.max_steps:
            continue
        for stack in list(stacks):
            going = check(stack, step)
            if len(going) < len(stack.labels):  # finished SAEs leave the stack
                finish(stack, [i for i in range(len(stack.labels)) if i not in going], step)
                if going:
                    stack.keep(going)
                else:
                    stacks.remove(stack)
    for stack in stacks:
        finish(stack, list(range(len(stack.labels))), step)
    result["curves"] = {}
    for label in saes:  # a continued SAE's curve goes on from its saved one
        old = list((before.get(label) or {}).get("sage_nn_held_out_curve") or [])
        result["curves"][label] = old + [[s + offset[label], *rest]
                                         for s, *rest in new_curves[label]
                                         if not (old and s == 0)]  # its last point again
    result["steps"] = {label: s + offset[label] for label, s in result["steps"].items()}
    result["converged"] = {label: label in result["converged_at"] for label in saes}
    return result


def fit_sae_lens(saes: dict, stream, cfg, *, dead_window: int, lr: Mapping[str, float],
                 device: str) -> dict:
    """sae_lens's MultiSAETrainer over the stream, for ``cfg.tokens`` (no held-out checks),
    each SAE at its learning rate ``lr`` (its constant schedule's base rate)."""
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.tokens, train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr, lr_end=cfg.lr / 10, lr_scheduler_name="constant",
        dead_feature_window=dead_window, feature_sampling_window=max(1, cfg.max_steps),
        device=device)
    trainer = MultiSAETrainer(trainer_cfg, saes, {label: label for label in saes}, stream)
    for label, one in trainer.trainers.items():
        for group in one.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = lr[label]
        for schedule in (one.lr_scheduler, *getattr(one.lr_scheduler, "_schedulers", ())):
            if hasattr(schedule, "base_lrs"):  # SequentialLR holds its parts' only
                schedule.base_lrs = [lr[label]] * len(schedule.base_lrs)
    trained = trainer.fit()  # sae_lens shows a progress bar
    for label in saes:  # fit() returns the same modules, trained
        saes[label] = trained[label]
    return {"steps": {label: trainer.n_training_steps for label in saes},
            "dead": {label: int(trainer.trainers[label].dead_neurons.sum()) for label in saes},
            "curves": {}, "converged": {}, "converged_at": {}, "optimizer": {}}
