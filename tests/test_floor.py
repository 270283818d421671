"""The random floor keeps the SAE's architecture and settings and matches its L0 on data."""

import pytest
import torch

from sage_nn.floor import floor_margins, mean_l0, random_like
from sage_nn.saes import SparseAutoencoder

D_IN, D_SAE = 32, 128


def data_like(n: int = 400, seed: int = 1) -> torch.Tensor:
    """Residual-stream-like rows: a large shared mean, anisotropic spread, heavy-ish tails."""
    g = torch.Generator().manual_seed(seed)
    mean = 3 * torch.randn(D_IN, generator=g)
    mix = torch.randn(D_IN, D_IN, generator=g) * torch.logspace(0, -1.5, D_IN)[:, None]
    z = torch.randn(n, D_IN, generator=g) * (1 + torch.rand(n, 1, generator=g) * 3)
    return mean + z @ mix


def make_sae(architecture: str, x: torch.Tensor | None = None, **settings) -> SparseAutoencoder:
    """A small SAE with random (untied, non-unit) weights; its biases and thresholds are set
    in units of the spread of its pre-activations on ``x`` (default :func:`data_like`), so
    that its L0 there is moderate (about 5-20 of 128) whatever the normalisation."""
    x = data_like() if x is None else x
    g = torch.Generator().manual_seed(7)
    W_dec = torch.randn(D_SAE, D_IN, generator=g) * (0.5 + torch.rand(D_SAE, 1, generator=g))
    W_enc = torch.randn(D_IN, D_SAE, generator=g) / D_IN ** 0.5
    b_dec = 0.1 * torch.randn(D_IN, generator=g)
    noise = 0.1 * torch.randn(D_SAE, generator=g)
    probe = SparseAutoencoder(W_enc, torch.zeros(D_SAE), W_dec, b_dec, **{
        k: v for k, v in settings.items() if k != "k"})
    u, _, _ = probe._prepare(x)
    sigma = float(((u - b_dec if probe.apply_b_dec_to_input else u) @ W_enc).std())
    kw = dict(settings)
    b_enc = None
    if architecture == "gated":
        kw.update(b_gate=sigma * (-1.5 + noise), r_mag=0.2 * torch.randn(D_SAE, generator=g),
                  b_mag=sigma * 0.1 * torch.randn(D_SAE, generator=g))
    elif architecture == "jumprelu":
        b_enc = sigma * (-0.5 + noise)
        kw["threshold"] = sigma * (1.0 + 0.2 * torch.rand(D_SAE, generator=g))
    else:
        b_enc = sigma * (-1.5 + noise) if architecture == "standard" else sigma * noise
    if architecture == "topk":
        kw.setdefault("k", 8)
    return SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, architecture=architecture,
                             layer=3, kind="resid_pre", hook_name="blocks.3.hook_resid_pre",
                             **kw)


CASES = {
    "standard": ("standard", {}),
    "standard-layer_norm": ("standard", dict(normalize="layer_norm")),
    "standard-centred-no-b_dec-in": ("standard", dict(center=True, apply_b_dec_to_input=False)),
    "topk": ("topk", {}),
    "topk-rescaled-constant_norm": ("topk", dict(rescale_acts_by_decoder_norm=True,
                                                 normalize="constant_norm_rescale")),
    "jumprelu": ("jumprelu", {}),
    "jumprelu-constant_norm": ("jumprelu", dict(normalize="constant_norm_rescale")),
    "gated": ("gated", {}),
    "gated-layer_norm": ("gated", dict(normalize="layer_norm")),
}
SETTINGS = ("architecture", "k", "apply_b_dec_to_input", "normalize",
            "rescale_acts_by_decoder_norm", "center", "layer", "kind", "heads", "hook_name")


@pytest.mark.parametrize("case", list(CASES))
def test_floor_keeps_the_architecture_and_matches_l0(case):
    architecture, settings = CASES[case]
    sae, x = make_sae(architecture, **settings), data_like()
    floor = random_like(sae, x, seed=0)
    for name in SETTINGS:
        assert getattr(floor, name) == getattr(sae, name), name
    torch.testing.assert_close(floor.b_dec, sae.b_dec)
    if architecture == "jumprelu":
        torch.testing.assert_close(floor.threshold, sae.threshold)
    if architecture == "gated":
        torch.testing.assert_close(floor.r_mag, sae.r_mag)
    # random unit directions, tied encoder, not the SAE's
    torch.testing.assert_close(floor.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(floor.W_enc, floor.W_dec.T)
    cos = (floor.W_dec @ (sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)).T).diagonal()
    assert cos.abs().max() < 0.8
    # L0 on the calibration data matches the SAE's
    target = mean_l0(sae, x)
    assert 2 < target < 40, f"make_sae should give a moderate L0, got {target}"
    assert mean_l0(floor, x) == pytest.approx(target, abs=max(1.0, 0.05 * target))
    assert mean_l0(floor, x) == pytest.approx(target, abs=1 / len(x) + 1e-9)  # exact solve
    # and it reconstructs (finite, right shape) through the kept normalisation
    out = floor(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_calibration_generalises_to_held_out_rows():
    sae = make_sae("jumprelu")
    floor = random_like(sae, data_like(800, seed=1))
    held_out = data_like(800, seed=2)
    assert mean_l0(floor, held_out) == pytest.approx(mean_l0(sae, held_out), rel=0.2)


def test_jumprelu_floor_of_low_l0_is_not_a_topk_32():
    """The old floor was a TopK k=32 stand-in: L0 32 whatever the SAE's."""
    sae = make_sae("jumprelu")
    sae.threshold.data *= 1.25  # sparser: L0 ~ 5
    x = data_like()
    target = mean_l0(sae, x)
    assert 3 < target < 8
    floor = random_like(sae, x)
    assert floor.architecture == "jumprelu" and floor.k is None
    assert abs(mean_l0(floor, x) - target) <= 1.0
    assert mean_l0(floor, x) < 10


def test_same_seed_same_floor_other_seed_other_directions():
    sae, x = make_sae("gated"), data_like()
    a, b, c = (random_like(sae, x, seed=s) for s in (0, 0, 1))
    for name, p in a.named_parameters():
        torch.testing.assert_close(p, dict(b.named_parameters())[name], rtol=0, atol=0)
    assert not torch.allclose(a.W_dec, c.W_dec)
    assert (a.W_dec @ c.W_dec.T).diagonal().abs().max() < 0.8


def test_without_activations_no_calibration():
    sae = make_sae("standard")
    floor = random_like(sae)
    torch.testing.assert_close(floor.b_enc, sae.b_enc, rtol=0, atol=0)
    calibrated = random_like(sae, data_like())
    torch.testing.assert_close(calibrated.W_dec, floor.W_dec)  # same directions
    shift = calibrated.b_enc - floor.b_enc
    assert shift.abs().min() > 0  # a nonzero scalar shift ...
    torch.testing.assert_close(shift, shift[0].expand_as(shift))  # ... the same for all


def test_topk_floor_keeps_k_and_needs_no_shift():
    sae, x = make_sae("topk", k=5), data_like()
    sae.b_enc.data += 10.0  # every top-5 pre-activation positive: L0 is exactly k
    floor = random_like(sae, x)
    assert floor.k == 5 and mean_l0(sae, x) == 5.0 and mean_l0(floor, x) == 5.0
    torch.testing.assert_close(floor.b_enc, sae.b_enc, rtol=0, atol=0)


def test_margins_predict_activity():
    for architecture in ("standard", "topk", "jumprelu", "gated"):
        sae, x = make_sae(architecture), data_like(100)
        active = sae.encode(x) > 0
        assert active.any() and not active.all()
        torch.testing.assert_close(floor_margins(sae, x) > 0, active, msg=architecture)


def test_float64_and_head_sites_are_kept():
    sae = make_sae("standard").double()
    sae.kind, sae.heads, sae.hook_name = "z", [0, 2], "blocks.3.attn.hook_z"
    floor = random_like(sae, data_like().double(), seed=3)
    assert floor.W_dec.dtype == torch.float64 and floor.heads == [0, 2]
    assert floor.heads is not sae.heads


@pytest.mark.parametrize("case", ["jumprelu", "topk"])
def test_a_floor_ships_without_its_directions(case):
    """Pickled (as a request to a server carries it), a floor holds its biases and seed,
    not its random directions: they are drawn again, identical, when it is unpickled."""
    import pickle

    sae = make_sae(case)
    floor = random_like(sae, torch.randn(200, sae.d_in), seed=5)
    blob = pickle.dumps(floor)
    assert len(blob) < 0.2 * len(pickle.dumps(sae))
    back = pickle.loads(blob)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(floor, name)), name
    x = torch.randn(20, sae.d_in)
    assert torch.equal(back.encode(x), floor.encode(x))


@pytest.mark.parametrize("remote", [None, "server"])
def test_a_read_matches_the_floors_l0_on_the_fit_rows_before_the_other_sets(remote, tmp_path):
    """The plan accumulates the first set's rows (each feed, repeats kept) inside the read
    and shifts the floor before any other set's forward, here or through a serialized
    request: the floor random_like calibrates on the same rows."""
    from types import SimpleNamespace

    import numpy as np

    from sage_nn import Site, tiny_random_model
    from sage_nn.floor import calibration
    from sage_nn.reads import read_sites
    from sage_nn.remote import FreshProcessBackend, Remote

    model = tiny_random_model("llama", seed=1)
    prompts = ["when Mary and John went to the store", "John gave a ball to", "Alice said",
               "then Bob went to the park and Tom said", "Tom and Sue", "a b c d e f"]
    fit, rest = (SimpleNamespace(prompts=p, positions={"END": np.full(len(p), -1),
                                                       "FIRST": np.zeros(len(p), int)})
                 for p in (prompts[:4], prompts[4:]))
    end, first = (Site(1, "resid_pre"), "END"), (Site(1, "resid_pre"), "FIRST")
    (values,), _ = read_sites(model, [fit], [end, first])
    rows = torch.cat([values[end], values[end], values[first]])
    sae = make_sae("standard", rows)
    expected = random_like(sae, rows, seed=3)
    floor = random_like(sae, seed=3)
    plan = calibration(sae, floor, [end, end, first])
    read_sites(model, [fit, rest], [end, first], calibrations=[plan], batch_size=3,
               remote=remote and Remote(FreshProcessBackend.for_model(model, tmp_path)))
    assert plan["shift"] != 0.0
    assert ("margins" in plan) == (remote is not None)  # the server solved a copy of the plan
    torch.testing.assert_close(floor.b_enc, expected.b_enc)
    assert mean_l0(floor, rows) == pytest.approx(mean_l0(sae, rows), abs=1 / len(rows))


def test_a_plan_cannot_be_solved_without_rows_nor_its_fit_set_coded():
    """What a user sees: a plan solved before any row, and a read asked to code the fit
    set its floors are calibrated on."""
    from types import SimpleNamespace

    import numpy as np

    from sage_nn import Site, tiny_random_model
    from sage_nn.floor import calibration, solve
    from sage_nn.reads import read_sites

    sae = make_sae("standard")
    with pytest.raises(RuntimeError, match="solved before any row was accumulated"):
        solve(calibration(sae, random_like(sae)))
    model = tiny_random_model("llama", seed=1)
    data = SimpleNamespace(prompts=["Alice said", "Tom and Sue"],
                           positions={"END": np.full(2, -1)})
    end = (Site(1, "resid_pre"), "END")
    plan = calibration(sae, random_like(sae), [end])
    with pytest.raises(ValueError, match=r"sets\[0\] holds the fit prompts the floors are "
                                         r"calibrated on: no job may code it"):
        read_sites(model, [data, data], [end], [({}, [Site(1, "z", 0)], [0, 1])],
                   calibrations=[plan])
