"""SDM and CD: the loss math, a toy with an exact teacher score, and the one-step checkpoint."""
import pytest
import torch
import torch.nn as nn

import data
import distill_sdm as sdm
import fakes
import model
import scaffold

# A 2-D mixture of four well-separated Gaussians (4 apart, std 0.15), unequal weights.
MU = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])
W = torch.tensor([0.4, 0.3, 0.2, 0.1])
S = 0.15


def gmm_denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact E[x0 | x_t] for x_t = (1 - t) x0 + t eps, x0 ~ the mixture: the toy teacher."""
    a, s = 1 - t[:, None, None], t[:, None, None]  # (B, 1, 1)
    var = a ** 2 * S ** 2 + s ** 2  # variance of x_t given mode k
    logp = -((x_t[:, None] - a * MU) ** 2).sum(-1, keepdim=True) / (2 * var) + W.log()[:, None]  # (B, K, 1)
    post = MU + a * S ** 2 / var * (x_t[:, None] - a * MU)  # E[x0 | x_t, k]: (B, K, 2)
    return (logp.softmax(1) * post).sum(1)


def mlp(n_in: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))


def mode_shares(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(share of samples nearest each mode, share within 1.0 of it: half-way to the next mode is 2)."""
    d = torch.cdist(x, MU)
    k = d.argmin(1)
    near = d.min(1).values < 1.0
    return torch.bincount(k, minlength=4) / len(x), torch.bincount(k[near], minlength=4) / len(x)


def test_generator_loss_gradient_is_g_over_numel():
    x = torch.randn(3, 8, 4, requires_grad=True)
    g = torch.randn(3, 8, 4)
    sdm.generator_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / x.numel())


def test_fake_score_loss_is_zero_for_a_perfect_denoiser_and_never_reaches_the_generator():
    c = torch.tensor([[0.5, -1.0]]).repeat(16, 1)
    shift = torch.zeros(2, requires_grad=True)
    x = c + shift  # a generator whose samples are the point c: its exact denoiser is the constant c
    x_t = sdm.diffuse(x.detach(), torch.randn_like(x), torch.rand(16))
    assert sdm.fake_score_loss(c.clone(), x) == 0
    assert sdm.fake_score_loss(x_t, x) > 0  # an imperfect denoiser (the identity) is penalised

    fake = nn.Linear(2, 2)  # a fake-score step (not a generator step: 1 % fake_updates != 0)
    opt_g, opt_f = torch.optim.SGD([shift], 0.1), torch.optim.SGD(fake.parameters(), 0.1)
    before = fake.weight.detach().clone()
    sdm.sdm_step(1, sdm.Config(fake_updates=5), lambda: c + shift, lambda x_t, t: x_t,
                 lambda x_t, t: fake(x_t), opt_g, opt_f)
    assert shift.grad is None and not torch.equal(fake.weight, before)  # no gradient leaks into G


@pytest.mark.parametrize("normaliser", ["sdm", "dmd2"])
def test_direction_vanishes_when_fake_equals_real_and_points_along_the_score_difference(normaliser):
    x, eps, t = torch.randn(32, 8, 4), torch.randn(32, 8, 4), torch.rand(32) * 0.9 + 0.05
    x_t = sdm.diffuse(x, eps, t)
    d_real, d_fake = torch.randn_like(x), torch.randn_like(x)
    assert sdm.dm_direction(x, x_t, t, d_real, d_real, normaliser).abs().max() == 0
    g = sdm.dm_direction(x, x_t, t, d_real, d_fake, normaliser)
    diff = sdm.score(x_t, d_fake, t) - sdm.score(x_t, d_real, t)
    assert (g * diff >= 0).all()  # a positive multiple of s_fake - s_real, element by element


def test_cd_loss_is_zero_for_the_exact_consistency_function():
    c = torch.tensor([0.3, -0.7])
    exact = lambda x_t, t: c.expand_as(x_t)  # noqa: E731  data = the point c: every ODE path ends at c
    a, eps = c.repeat(8, 1), torch.randn(8, 2)
    n = torch.randint(1, 11, (8,))
    cfg = sdm.Config(grid_steps=10, cd_skip=2)
    assert sdm.cd_loss(exact, exact, exact, a, eps, n.clamp(min=2), cfg) == 0
    wrong = lambda x_t, t: x_t  # noqa: E731
    assert sdm.cd_loss(wrong, exact, exact, a, eps, n.clamp(min=2), cfg) > 0


def test_one_step_generator_covers_every_mode_where_regression_to_the_mean_does_not():
    """The SDM step of distill_sdm.py with the exact mixture score as the frozen teacher. The
    fake starts as the teacher (a zero-initialised residual on it), as SDM copies its teacher."""
    torch.manual_seed(0)
    gen, fake_res = mlp(2), mlp(3)
    nn.init.zeros_(fake_res[-1].weight)
    nn.init.zeros_(fake_res[-1].bias)
    d_fake = lambda x_t, t: gmm_denoiser(x_t, t) + fake_res(torch.cat([x_t, t[:, None]], 1))  # noqa: E731
    cfg = sdm.Config(normaliser="dmd2", t_sampling="grid", fake_updates=5)
    steps = 6000
    opt_g, opt_f = torch.optim.Adam(gen.parameters(), 3e-3), torch.optim.Adam(fake_res.parameters(), 3e-3)
    decay = [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in (opt_g, opt_f)]
    for step in range(steps):
        sdm.sdm_step(step, cfg, lambda: gen(torch.randn(256, 2)), gmm_denoiser, d_fake, opt_g, opt_f)
        for d in decay:
            d.step()
    with torch.no_grad():
        x = gen(torch.randn(20_000, 2))
    share, near = mode_shares(x)
    assert (share - W).abs().max() < 0.05, share  # every mode, in proportion
    assert (near > W / 2).all(), near  # and at least half of each mode's mass lies on it

    torch.manual_seed(0)  # the baseline: one-step regression onto the teacher's denoiser at t = 1
    reg = mlp(2)
    opt = torch.optim.Adam(reg.parameters(), 3e-3)
    for _ in range(500):
        z = torch.randn(256, 2)
        scaffold.update(opt, nn.functional.mse_loss(reg(z), gmm_denoiser(z, torch.ones(256))), 1.0)
    with torch.no_grad():
        _, near = mode_shares(reg(torch.randn(20_000, 2)))
    assert near.sum() < 0.01  # it learns the mixture's mean, which lies on no mode


OPTIONS = dict(gan_weight=3e-3, regress_weight=0.25, ema=0.9, normaliser="sdm", t_sampling="range")


@pytest.mark.parametrize("method,options", [("sdm", {}), ("cd", {}), ("sdm", OPTIONS)], ids=["sdm", "cd", "sdm-options"])
def test_distillation_writes_a_one_step_checkpoint(method, options, dataset_path, tmp_path):
    torch.manual_seed(0)
    teacher = model.VLA(model.VLAConfig(), stats=data.Dataset(dataset_path).meta["stats"])
    teacher.save(tmp_path / "teacher")
    sdm.main(sdm.Config(method=method, teacher=str(tmp_path / "teacher"), data=(str(dataset_path),),
                        out=str(tmp_path / method), steps=3, batch=4, fake_updates=2, log_every=1, eval_every=2, **options))
    student = model.load(tmp_path / method)
    assert student.cfg.steps == 1
    moved = [n for (n, a), b in zip(teacher.expert.state_dict().items(), student.expert.state_dict().values())
             if not torch.equal(a, b)]
    assert moved and all(torch.equal(a, b) for a, b in zip(teacher.vlm.parameters(), student.vlm.parameters()))
    batch, z = fakes.fake_batch(student, 2), torch.randn(2, 8, 4)
    with torch.no_grad():  # the default one step is the generator's single pass D_G(z, 1)
        torch.testing.assert_close(student.sample(batch, noise=z), student.denoise(z, torch.ones(2), student.prefix(batch)))
    assert model.read_config(tmp_path / method)["provenance"]["parent"] == str(tmp_path / "teacher")
    with pytest.raises(ValueError, match="exists"):  # an existing student is never overwritten
        sdm.main(sdm.Config(method=method, teacher=str(tmp_path / "teacher"), data=(str(dataset_path),),
                            out=str(tmp_path / method), steps=1))


def test_an_interrupted_distillation_resumes_to_the_same_student(dataset_path, tmp_path, monkeypatch):
    """Ctrl-C at step 4 of 7, then --resume: the student and every trained network (G, its EMA,
    the fake score, the GAN head, both optimizers) end as in the uninterrupted run, bit for bit.
    On the CPU: some CUDA kernels (attention's backward among them) add in no fixed order, so two
    CUDA runs may differ in the last bits whether or not one was resumed (this test failed so on an H200)."""
    torch.manual_seed(0)
    model.VLA(model.VLAConfig(), stats=data.Dataset(dataset_path).meta["stats"]).save(tmp_path / "teacher")
    kw = dict(teacher=str(tmp_path / "teacher"), data=(str(dataset_path),), steps=7, batch=4, fake_updates=2,
              log_every=1, eval_every=0, save_every=3, ema=0.9, gan_weight=3e-3, device="cpu")
    sdm.main(sdm.Config(out=str(tmp_path / "whole"), **kw))
    real = sdm.observations

    def interrupt_at_4(sets, tok, ids, cfg, step, stream=0):
        if stream == 0 and step == 4:
            raise KeyboardInterrupt
        return real(sets, tok, ids, cfg, step, stream)
    monkeypatch.setattr(sdm, "observations", interrupt_at_4)
    with pytest.raises(SystemExit) as stop:
        sdm.main(sdm.Config(out=str(tmp_path / "cut"), **kw))
    assert stop.value.code == 130
    assert torch.load(tmp_path / "cut" / "train_state.pt", weights_only=False)["step"] == 4
    monkeypatch.undo()
    sdm.main(sdm.Config(out=str(tmp_path / "cut"), resume=True, **kw))
    a, b = (torch.load(tmp_path / p / "train_state.pt", weights_only=False) for p in ("whole", "cut"))
    for net in ("generator", "ema", "fake", "gan"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    for k, v in model.load(tmp_path / "whole").state_dict().items():
        assert torch.equal(v, model.load(tmp_path / "cut").state_dict()[k]), k
    assert a["opt_g"]["state"][0]["exp_avg"].equal(b["opt_g"]["state"][0]["exp_avg"])
