"""cat_training/ in pure torch: trigger removal, the bypass switch, the CAT loss and resume."""
import copy

import pytest
import torch

from comfyui_loraclr.cat_training import (AdapterSet, CATTrainer, LoRAWeight, TrainConfig, TriggerNotFound,
                                          TriggerRemover)

# token ids of a toy vocabulary: "<"=1 ">"=2 ","=3 "a"=10 "dog"=11 "sks"=20 "zwx"=21 "photo"=12 "of"=13
LT, GT, COMMA = 1, 2, 3
A, DOG, PHOTO, OF, SKS, ZWX = 10, 11, 12, 13, 20, 21


def remover(*triggers):
    return TriggerRemover([list(t) for t in triggers], wrappers={LT: GT}, separators={COMMA})


@pytest.mark.parametrize("ids, expect", [
    ([LT, SKS, GT, COMMA, A, DOG], [A, DOG]),           # "<sks>, a dog"
    ([A, SKS, DOG], [A, DOG]),                          # "a sks dog"
    ([SKS], []),                                        # "sks"
    ([SKS, COMMA, A, DOG], [A, DOG]),                   # "sks, a dog"
    ([A, DOG, COMMA, SKS], [A, DOG]),                   # "a dog, sks"
    ([SKS, COMMA, COMMA, A, DOG], [A, DOG]),            # "sks,, a dog": every separator after it
    ([PHOTO, OF, SKS, COMMA, A, DOG, COMMA, SKS], [PHOTO, OF, A, DOG]),  # twice
])
def test_trigger_removal_on_token_ids(ids, expect):
    out, found = remover((SKS,)).remove(ids)
    assert out == expect and found >= 1


def test_several_and_multi_token_triggers():
    r = remover((SKS,), (ZWX, DOG))
    out, found = r.remove([PHOTO, OF, SKS, A, ZWX, DOG, COMMA, A])
    assert out == [PHOTO, OF, A, A] and found == 2
    # a wrapper that does not enclose a trigger stays
    assert r.remove([LT, A, GT, SKS])[0] == [LT, A, GT]


def test_caption_without_trigger_is_an_error():
    with pytest.raises(TriggerNotFound, match="a dog"):
        remover((SKS,)).kept_indices([A, DOG], "a dog")


class TinyNet(torch.nn.Module):
    """A small conditional denoiser whose layers compute their weights through adapters."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(16, 8 + 4, generator=g) / 4
        self.w2 = torch.randn(8, 16, generator=g) / 4
        self.fn = {}

    def weight(self, name, w):
        return self.fn[name](w) if name in self.fn else w

    def forward(self, x, t, cond):
        return self.forward_with(self.weight("w1", self.w1), self.weight("w2", self.w2), x, t, cond)

    @staticmethod
    def forward_with(w1, w2, x, t, cond):
        h = torch.cat([x.flatten(1), cond.mean(1) + t[:, None].to(w1.dtype) / 1000], dim=1).to(w1.dtype)
        h = torch.tanh(h @ w1.T)
        return (h @ w2.T).reshape(x.shape)


def make_trainer(lambda_cat, seed=0, steps=6):
    net = TinyNet()
    gen = torch.Generator().manual_seed(seed)
    adapters = {"w1": LoRAWeight((16, 12), 2, 2.0, generator=gen), "w2": LoRAWeight((8, 16), 2, 2.0, generator=gen)}
    net.fn = adapters
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(5, 2, 2, 2, generator=g)
    conds = torch.randn(5, 3, 4, generator=g)
    neutral = conds * 0.5
    sig = torch.linspace(0.1, 3.0, 1000)
    trainer = CATTrainer(AdapterSet(adapters), net, lambda x0, n, t: x0 + sig[t].reshape(-1, 1, 1, 1) * n,
                         lambda x0, n, t: n, latents, conds, neutral,
                         TrainConfig(steps=steps, learning_rate=1e-2, lambda_cat=lambda_cat, seed=seed, batch_size=2))
    return net, trainer


def test_bypass_is_exactly_the_base_model():
    net, trainer = make_trainer(1.0)
    for _ in range(3):
        trainer.step()
    x, t, c = torch.randn(2, 2, 2, 2), torch.tensor([5, 500]), torch.randn(2, 3, 4)
    adapted = net(x, t, c)
    with trainer.adapters.bypassed():
        bypassed = net(x, t, c)
    net.fn = {}
    base = net(x, t, c)
    assert torch.equal(bypassed, base) and not torch.allclose(adapted, base)


def test_cat_term_zero_at_first_step_then_positive():
    _, trainer = make_trainer(1.0)
    first = trainer.step()
    assert first.cat == 0.0  # up starts at zero: adapted == base, bit for bit
    later = [trainer.step().cat for _ in range(3)]
    assert all(v > 0 for v in later)
    # fused passes (one batch for both adapter passes): zero up to the rounding of another batch shape
    _, fused = make_trainer(1.0)
    fused.config.fuse_passes = True
    assert abs(fused.step().cat) < 1e-12 and all(fused.step().cat > 0 for _ in range(3))


def test_lambda_zero_is_plain_training():
    _, a = make_trainer(0.0)
    _, b = make_trainer(0.0)
    b.neutral_conds = None  # plain mode needs no neutral captions at all
    ha = [a.step().loss for _ in range(4)]
    hb = [b.step().loss for _ in range(4)]
    assert ha == hb and all(s.cat == 0.0 for s in a.history)
    _, c = make_trainer(1.0)
    hc = [c.step().diffusion for _ in range(4)]
    assert hc[0] == ha[0] and hc[1:] != ha[1:]  # same first batch; the CAT term changes the updates


def test_resume_matches_an_uninterrupted_run():
    _, full = make_trainer(1.0)
    for _ in range(6):
        full.step()
    _, first = make_trainer(1.0)
    for _ in range(3):
        first.step()
    saved = copy.deepcopy(first.state())
    _, resumed = make_trainer(1.0)
    resumed.load_state(saved)
    for _ in range(3):
        resumed.step()
    for k in full.adapters.adapters:
        assert torch.equal(full.adapters.adapters[k].up, resumed.adapters.adapters[k].up)
        assert torch.equal(full.adapters.adapters[k].down, resumed.adapters.adapters[k].down)
    assert [h.loss for h in full.history] == [h.loss for h in resumed.history]


def test_split_backward_equals_the_summed_loss_gradient():
    _, split = make_trainer(1.0)
    _, fused = make_trainer(1.0)
    fused.config.fuse_passes = True
    for _ in range(3):  # past step 0 so the CAT term has a gradient
        split.step()
        fused.step()
    for k in split.adapters.adapters:
        a, b = split.adapters.adapters[k], fused.adapters.adapters[k]
        torch.testing.assert_close(a.up, b.up, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.down, b.down, rtol=1e-5, atol=1e-6)


def test_moving_adapters_between_steps_keeps_the_run_exact():
    """A device move (here a fresh copy on the same device, which is what a move does to the
    storage) keeps the Parameter objects the optimizer holds: training continues bit for bit."""
    _, ref = make_trainer(1.0)
    for _ in range(3):
        ref.step()
    _, moved = make_trainer(1.0)
    moved.step()
    params = [id(p) for p in moved.optimizer.param_groups[0]["params"]]
    storages = [p.data_ptr() for p in moved.adapters.parameters()]
    for a in moved.adapters.adapters.values():
        a._place(torch.device("cpu"))
        assert a.move_to("cpu") == a.memory_bytes() == (a.up.numel() + a.down.numel()) * 4
    assert [p.data_ptr() for p in moved.adapters.parameters()] != storages  # really new storage
    assert [id(p) for p in moved.adapters.parameters()] == params
    moved.step()
    moved.step()
    for k, a in ref.adapters.adapters.items():
        assert torch.equal(a.up, moved.adapters.adapters[k].up) and torch.equal(a.down, moved.adapters.adapters[k].down)


def test_float16_scales_the_loss_and_skips_non_finite_steps():
    _, fp32 = make_trainer(0.0)
    _, bf16 = make_trainer(0.0)
    bf16.config.dtype = "bfloat16"
    bf16.__post_init__()
    _, fp16 = make_trainer(0.0)
    fp16.config.dtype = "float16"
    fp16.__post_init__()
    assert not fp32.scaler.is_enabled() and not bf16.scaler.is_enabled() and fp16.scaler.is_enabled()
    assert bf16.step().loss > 0 and fp16.step().loss > 0
    scale = fp16.scaler.get_scale()
    before = {k: v.clone() for k, v in fp16.adapters.state_dict().items()}
    fp16.latents = torch.full_like(fp16.latents, float("nan"))  # every gradient is NaN
    fp16.step()
    assert fp16.scaler.get_scale() == scale / 2  # the loss scale backs off ...
    for k, v in fp16.adapters.state_dict().items():  # ... and the step is skipped
        assert torch.equal(v, before[k]), k
    # the scale is part of the checkpoint: a resumed run continues with the backed-off scale
    _, resumed = make_trainer(0.0)
    resumed.config.dtype = "float16"
    resumed.__post_init__()
    resumed.load_state(copy.deepcopy(fp16.state()))
    assert resumed.scaler.get_scale() == scale / 2


@pytest.mark.parametrize("fuse", [False, True])
def test_step_loss_and_gradient_match_a_float64_brute_force(fuse):
    """One CAT step recomputed independently in float64 from its definition,
    L = mean over micro-batches of [ MSE(f_LoRA(x_t, t, c), ε) + λ·MSE(f_LoRA(x_t, t, c_noT), f_base(x_t, t, c_noT)) ],
    with the LoRA weight W + (α/r)·up·down: the reported losses and, through an SGD update, the
    gradient. λ = 0.3, α/r = 0.5 and two accumulated micro-batches, so a dropped or misplaced
    factor shows."""
    lam, rank, alpha, lr = 0.3, 2, 1.0, 0.5
    net = TinyNet()
    gen = torch.Generator().manual_seed(0)
    adapters = {"w1": LoRAWeight((16, 12), rank, alpha, generator=gen),
                "w2": LoRAWeight((8, 16), rank, alpha, generator=gen)}
    for a in adapters.values():  # a LoRA that already changes the model, so the CAT term is active
        torch.nn.init.normal_(a.up, std=0.3, generator=gen)
    net.fn = adapters
    g = torch.Generator().manual_seed(1)
    latents, conds = torch.randn(5, 2, 2, 2, generator=g), torch.randn(5, 3, 4, generator=g)
    neutral = torch.randn(5, 3, 4, generator=g)
    sig = torch.linspace(0.1, 3.0, 1000)
    cfg = TrainConfig(learning_rate=lr, optimizer="SGD", lambda_cat=lam, seed=7, batch_size=2, grad_accumulation=2,
                      fuse_passes=fuse)
    trainer = CATTrainer(AdapterSet(adapters), net, lambda x0, n, t: x0 + sig[t].reshape(-1, 1, 1, 1) * n,
                         lambda x0, n, t: n, latents, conds, neutral, cfg)
    before = {k: (a.up.detach().double().clone(), a.down.detach().double().clone()) for k, a in adapters.items()}

    # the same draws as the trainer: per micro-batch image indices, timesteps, then noise
    g = torch.Generator().manual_seed(7)
    params = {k: (u.clone().requires_grad_(), d.clone().requires_grad_()) for k, (u, d) in before.items()}
    w = {"w1": net.w1.double(), "w2": net.w2.double()}

    def lora(name):
        up, down = params[name]
        return w[name] + (alpha / rank) * up @ down

    total = diff = cat = 0.0
    loss64 = 0.0
    for _ in range(2):
        idx = torch.randint(5, (2,), generator=g)
        t = torch.randint(1000, (2,), generator=g)
        x0 = latents[idx].double()
        noise = torch.randn(x0.shape, generator=g).double()
        x_t = x0 + sig[t].double().reshape(-1, 1, 1, 1) * noise
        c, cn = conds[idx].double(), neutral[idx].double()
        l_diff = ((TinyNet.forward_with(lora("w1"), lora("w2"), x_t, t, c) - noise) ** 2).mean()
        base = TinyNet.forward_with(w["w1"], w["w2"], x_t, t, cn)
        l_cat = ((TinyNet.forward_with(lora("w1"), lora("w2"), x_t, t, cn) - base) ** 2).mean()
        loss64 = loss64 + (l_diff + lam * l_cat) / 2
        diff += l_diff.item() / 2
        cat += l_cat.item() / 2
    total = loss64.item()
    loss64.backward()

    rec = trainer.step()
    assert cat > 1e-2 * diff  # the CAT term matters here
    assert rec.diffusion == pytest.approx(diff, rel=1e-5)
    assert rec.cat == pytest.approx(cat, rel=1e-4)
    assert rec.loss == pytest.approx(total, rel=1e-5)
    for k, a in adapters.items():  # SGD: new = old − lr · gradient
        for new, old, p in ((a.up, before[k][0], params[k][0]), (a.down, before[k][1], params[k][1])):
            grad = (old - new.detach().double()) / lr
            torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)
