"""The pack's own sampling pass runs attention a few samples at a time (``attention_by_samples``),
so the score memory of a 12-concept pass is that of one guided KSampler step, and the results are
those of the whole batch at once: to float rounding (BLAS may block a small matrix product by the
batch; 2e-7 seen with 7 keys), bit for bit in the micro UNet's pass."""
import pytest
import torch


@pytest.fixture(scope="module")
def sampling(comfy_env):
    import comfyui_loraclr.nodes._comfy.sampling as sampling

    return sampling


def _recording(func, seen):
    def run(q, k, v, heads, *args, **kwargs):
        seen.append(q.shape[0])
        return func(q, k, v, heads, *args, **kwargs)
    return run


@pytest.mark.parametrize("name", ["attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch"])
def test_every_comfy_attention_gives_the_whole_batch_result(sampling, name):
    import comfy.ldm.modules.attention as attention

    func = getattr(attention, name)
    g = torch.Generator().manual_seed(3)
    b, tokens, width = 5, 64, 64
    q = torch.randn(b, tokens, width, generator=g)
    for k in (torch.randn(b, tokens, width, generator=g), torch.randn(b, 7, width, generator=g)):
        seen = []
        split = sampling.attention_by_samples(_recording(func, seen), q, k, k * 0.5, 4)
        assert seen == [2, 2, 1]
        torch.testing.assert_close(split, func(q, k, k * 0.5, 4), rtol=0, atol=1e-6)


def test_a_mask_per_sample_is_cut_with_its_samples(sampling):
    import comfy.ldm.modules.attention as attention

    g = torch.Generator().manual_seed(4)
    b, tokens, width = 5, 16, 32
    q, k, v = (torch.randn(b, tokens, width, generator=g) for _ in range(3))
    # each sample hides a different key: cutting the samples without their masks changes the output
    mask = torch.zeros(b, tokens, tokens)
    for i in range(b):
        mask[i, :, i] = -torch.inf
    whole = attention.attention_basic(q, k, v, 4, mask=mask)
    assert torch.equal(sampling.attention_by_samples(attention.attention_basic, q, k, v, 4, mask=mask), whole)
    assert torch.equal(sampling.attention_by_samples(attention.attention_basic, q, k, v, 4, mask), whole)
    # a mask shared by every sample is passed whole
    shared = mask[:1]
    assert torch.equal(sampling.attention_by_samples(attention.attention_basic, q, k, v, 4, mask=shared),
                       attention.attention_basic(q, k, v, 4, mask=shared))


def test_the_pack_pass_runs_attention_by_samples_with_the_same_result(sampling, micro, monkeypatch):
    """Through ComfyUI's UNet of the micro checkpoint: the override reaches every attention call,
    no call sees more than two samples, and the denoised batch equals the one computed whole."""
    import comfy.model_management

    model = micro[0]
    comfy.model_management.load_models_gpu([model])
    g = torch.Generator().manual_seed(5)
    x, cond, sigma = torch.randn(6, 4, 16, 16, generator=g), torch.randn(6, 77, 768, generator=g), torch.tensor(2.0)
    seen = []
    real = sampling.attention_by_samples

    def spy(func, *args, **kwargs):
        return real(_recording(func, seen), *args, **kwargs)

    monkeypatch.setattr(sampling, "attention_by_samples", spy)
    with torch.inference_mode():
        split = sampling.denoise(model, x, sigma, cond)
        calls = len(seen)
        monkeypatch.setattr(sampling, "ATTENTION_BATCH", 64)
        whole = sampling.denoise(model, x, sigma, cond)
    unet = model.model.diffusion_model
    n_attention = sum(1 for name, _ in unet.named_modules() if name.endswith((".attn1", ".attn2")))
    assert n_attention > 0 and calls == 3 * n_attention
    assert set(seen[:calls]) == {2} and set(seen[calls:]) == {6}
    assert torch.equal(split, whole)


def test_keys_shared_by_every_sample_are_passed_whole(sampling):
    """An attention that broadcasts one set of keys and values over the samples (batch 1) gets
    them whole, with all the queries: cutting them by samples would leave later chunks none."""
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(5, 8, 16, generator=g), torch.randn(1, 3, 16, generator=g), torch.randn(1, 3, 16, generator=g)

    def broadcasting(q, k, v, heads, **kwargs):
        return torch.nn.functional.scaled_dot_product_attention(q, k.expand(q.shape[0], -1, -1),
                                                                v.expand(q.shape[0], -1, -1))

    seen = []
    out = sampling.attention_by_samples(_recording(broadcasting, seen), q, k, v, 1)
    assert seen == [5]
    torch.testing.assert_close(out, broadcasting(q, k, v, 1), rtol=0, atol=0)
