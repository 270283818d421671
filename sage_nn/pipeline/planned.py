"""One request a remote run would send, as a plan sees it (:class:`PlannedRequest`): its
rows, tokens, sites and tensor bytes by what they are (:func:`carried`, read off the chunks a
dry run prepared), and the requests that depend on an earlier one's results, estimated
from sizes as upper bounds (:func:`later_evaluation_requests`, :func:`validation_requests`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from .config import select_kinds_of

#: Bytes a request carries besides its tensors, up and down: the kernels' code (sage_nn
#: ships by value) and the framing of each object; measured on serialized requests by
#: benchmarks/remote.py (the largest seen, 251 kB up with 8 SAEs' edits, rounded up).
CODE_BYTES = (260_000, 20_000)


@dataclass
class PlannedRequest:
    """One request a run would send: its stage, kernel, prompt rows (a patched variant of a
    prompt is a row) and tokens, the sites it reads or patches, its tensor bytes up by what
    they are (``tensors``: prompt tokens, SAE weights, activation values, indices...) and
    down; ``estimated``: from sizes, as it depends on an earlier request's results. ``up``
    and ``down`` count tensors only; :attr:`total_up` / :attr:`total_down` add the
    :data:`CODE_BYTES` every request carries, and are what the stage totals sum."""

    stage: str
    kernel: str
    rows: int
    up: int
    down: int
    estimated: bool = False
    tokens: int = 0
    sites: list[str] = field(default_factory=list)
    tensors: dict[str, int] = field(default_factory=dict)

    @property
    def total_up(self) -> int:
        return self.up + CODE_BYTES[0]

    @property
    def total_down(self) -> int:
        return self.down + CODE_BYTES[1]


#: what a request's tensors are, by where they sit in its chunks (``carried``)
TOKENS = ("input_ids", "attention_mask", "position_ids")


def carried(request: Any) -> tuple[list[str], dict[str, int]]:
    """The sites a dry run's request names and its tensor bytes by what they are: prompt
    tokens (ids, mask, positions), SAE weights (each module's parameters), activation
    values (other floating tensors: patch values, frozen maps), indices (other integer
    tensors: answer ids, token positions, channels). Counted as
    :func:`~sage_nn.model.remote.payload_bytes` counts (each storage once, at the
    transport's size), so the parts add up to the request's ``up``."""
    import torch

    from ..model.remote import payload_bytes
    from ..model.sites import KINDS, Site, site_name

    sites: dict[str, None] = {}
    parts: dict[str, int] = {}
    seen: set = set()

    def add(what: str, obj: Any) -> None:
        parts[what] = parts.get(what, 0) + payload_bytes(obj, None, seen)

    def walk(obj: Any, key: str = "") -> None:
        if isinstance(obj, Site):
            sites[str(obj)] = None
        elif isinstance(obj, tuple) and len(obj) == 3 and isinstance(obj[0], int) and \
                obj[1] in KINDS:  # a site as kernels take it: (layer, kind, head)
            sites[site_name(obj)] = None
        elif isinstance(obj, dict) and "W_enc" in obj:  # an SAE as plain data
            add("SAE weights", obj)
        elif isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], int) and \
                obj[1] in KINDS:  # a grid's (layer, kind): every head of it
            sites[f"L{obj[0]}.{obj[1]}"] = None
        elif isinstance(obj, torch.Tensor):
            add("prompt tokens" if key in TOKENS else "activation values"
                if obj.is_floating_point() else "indices", obj)
        elif isinstance(obj, torch.nn.Module):
            add(f"SAE weights ({type(obj).__name__})" if hasattr(obj, "W_enc") else
                f"weights ({type(obj).__name__})", obj)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, str(k))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, key)
        elif is_dataclass(obj) and not isinstance(obj, type):
            for f in fields(obj):
                walk(getattr(obj, f.name), f.name)

    walk(request.carried)
    return list(sites), {k: v for k, v in parts.items() if v}


def _prompt_inputs(model, data, batch_size: int) -> tuple[int, int, int]:
    """What a request's prompts weigh, batch by batch: ``(bytes, batches, tokens)``; the
    bytes are the tokens, mask and positions (int64) and the answer and distractor ids."""
    from ..model.activations import batches, encode

    inputs, n_batches, tokens = 0, 0, 0
    for idx in batches(len(data), batch_size):
        n_batches += 1
        batch = encode(model, [data.prompts[i] for i in idx])
        tokens += batch.inputs["input_ids"].numel()
        inputs += 3 * batch.inputs["input_ids"].numel() * 8 + 2 * len(idx) * 8
    return inputs, n_batches, tokens


def later_evaluation_requests(model, data, sections, coders, config) -> list:
    """The evaluation's requests after its read, from sizes: the patched runs of every
    variant (per attribute: mean and counterfactual; per dictionary, the ceiling, the path
    ceiling, each SAE and its controls at every control seed: sufficiency, necessity and,
    where it has directions, greedy and F1 edits at each k), and the second forward of sublayer sites without directions
    (mlp_out, difference mode), where there are any."""
    import torch

    from ..model.sites import adapter

    ad = adapter(model)
    size, n = getattr(torch, config.remote_transport).itemsize, len(data)
    inputs, n_batches, tokens = _prompt_inputs(model, data, config.batch_size)
    edits, variants, values, nonlinear = 2 * len(config.ks), 0, 0, []
    for cs in sections:
        count = 2 + (2 + edits)  # mean, counterfactual; the ceiling
        if any(getattr(coder, "mode", None) is not None for coder in coders.values()):
            count += 2 + edits  # the path ceiling of residual SAEs through the reconstruction
        for coder in coders.values():
            missing = [(s, p) for s, p in cs.pairs if without_directions(coder, s)]
            # the SAE, and its floor and random SAE at every control seed (an upper bound:
            # an SAE without a sae_lens architecture has no random SAE)
            count += (1 + 2 * config.control_seeds) * (2 + (0 if missing else edits))
            nonlinear += missing
        variants += count  # each patches every pair: a value and a row and column index,
        # and in each batch at most one channel index (int64) a channel
        values += count * sum(n * (ad.width(s.kind) * size + 16) + n_batches * ad.width(
            s.kind) * 8 for s, _ in cs.pairs)
    sites = list(dict.fromkeys(str(s) for cs in sections for s, _ in cs.pairs))
    out = [PlannedRequest("evaluation", "patch", n, inputs + values, n * (1 + variants) * 16,
                          estimated=True, tokens=tokens, sites=sites,
                          tensors={"prompt tokens and indices": inputs,
                                   "patch values and indices": values})]
    if nonlinear:  # held-out and counterfactual prompts, clean and scratch rows
        saes = sum(int(p.numel()) * 4 for c in coders.values()
                   for sae in getattr(c, "saes", []) for p in sae.parameters())
        rows = 2 * n * len({p for _, p in nonlinear})
        down = rows * (ad.config.vocab_size + 2 * len({s for s, _ in nonlinear}) * ad.d_model)
        out.append(PlannedRequest("evaluation", "reconstruct", rows, 2 * inputs + saes,
                                  4 * down, estimated=True, tokens=2 * tokens,
                                  sites=list(dict.fromkeys(str(s) for s, _ in nonlinear)),
                                  tensors={"prompt tokens and indices": 2 * inputs,
                                           "SAE weights": saes}))
    return out


def validation_requests(model, data, attributes, restriction, config) -> list:
    """The top-k selections' exact patching, from sizes (:func:`~sage_nn.discovery.
    selection.validate_all`, three requests): the counterfactual values at every selected
    site, every site and all of them patched, the counterfactual prompts' logit
    differences; each site as wide as the widest selectable kind."""
    import torch

    from ..model.sites import adapter

    ad = adapter(model)
    size, n, A, K = getattr(torch, config.remote_transport).itemsize, len(data), \
        len(attributes), config.top_k
    width = max(ad.width(k) for k in (restriction[1] if restriction else
                                      select_kinds_of(config)))
    inputs, n_batches, tokens = _prompt_inputs(model, data, config.batch_size)
    cf_inputs = 2 * A * inputs  # counterfactuals may tokenize longer: twice, to be safe
    pair = n * (width * size + 16) + n_batches * width * 8  # one patch of one site
    tokens_in = {"prompt tokens and indices": cf_inputs}
    return [PlannedRequest("discovery", "read", A * n, cf_inputs,  # all sites, every set
                           A * n * A * K * width * size, estimated=True, tokens=2 * A * tokens,
                           tensors=tokens_in),
            PlannedRequest("discovery", "patch", n, inputs + A * 2 * K * pair,
                           n * (1 + A * (K + 1)) * 16, estimated=True, tokens=tokens,
                           tensors={"prompt tokens and indices": inputs,
                                    "patch values and indices": A * 2 * K * pair}),
            PlannedRequest("discovery", "patch", A * n, cf_inputs, A * n * 16, estimated=True,
                           tokens=2 * A * tokens, tensors=tokens_in)]


def without_directions(coder: Any, site: Any) -> bool:
    """Whether a coder reaches ``site`` without per-latent directions (no edits there)."""
    mode = getattr(coder, "mode", None)
    return mode is not None and site.kind not in ("resid_pre", "resid_mid", "resid_post") and (
        mode == "difference" or site.kind == "mlp_out")
