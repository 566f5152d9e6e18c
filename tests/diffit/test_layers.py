"""TMSA, windows, relative position bias and embeddings (diffit/layers.py)."""

import math

import pytest
import torch

from diffit.layers import (
    TMSA,
    LabelEmbedder,
    TimestepEmbedder,
    attention_with_bias,
    drop_labels,
    get_2d_sincos_pos_embed,
    relative_position_index,
    timestep_embedding,
    window_partition,
    window_reverse,
)


def explicit_attention(layer: TMSA, x: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + B) V written out by hand, from the spatial projection only."""
    batch, tokens, dim = x.shape
    heads, head_dim = layer.num_heads, dim // layer.num_heads
    q, k, v = layer.qkv_spatial(x).split(dim, dim=-1)
    q, k, v = (t.reshape(batch, tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    index = relative_position_index(layer.window_size)
    bias = torch.stack([layer.relative_position_bias[index, h] for h in range(heads)])  # [heads, N, N]
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias
    out = torch.softmax(scores, dim=-1) @ v
    return layer.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def test_tmsa_with_zero_time_weights_equals_plain_attention_with_bias():
    torch.manual_seed(0)
    layer = TMSA(dim=32, num_heads=4, window_size=4, time_dim=16)
    torch.nn.init.normal_(layer.relative_position_bias, std=1.0)  # a bias large enough to matter
    torch.nn.init.zeros_(layer.qkv_time.weight)
    torch.nn.init.zeros_(layer.qkv_time.bias)
    x = torch.randn(3, 16, 32)
    time_token = torch.randn(3, 16)
    expected = explicit_attention(layer, x)
    torch.testing.assert_close(layer(x, time_token), expected, rtol=1e-5, atol=1e-5)
    # And the bias really enters: dropping it changes the result.
    with torch.no_grad():
        layer.relative_position_bias.zero_()
    assert not torch.allclose(layer(x, time_token), expected, atol=1e-3)


def test_tmsa_gradients_equal_those_of_the_explicit_computation():
    # The gradients of every parameter (the relative-position bias table through its gather included) and of
    # the input must be those autograd derives from the explicit formula of Eq. 6.
    torch.manual_seed(0)
    layer = TMSA(dim=32, num_heads=4, window_size=4, time_dim=None)
    torch.nn.init.normal_(layer.relative_position_bias, std=1.0)
    x = torch.randn(3, 16, 32, requires_grad=True)
    weights = torch.randn(3, 16, 32)
    grads = {}
    for name, forward in (("layer", lambda: layer(x, None)), ("explicit", lambda: explicit_attention(layer, x))):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (forward() * weights).sum().backward()
        grads[name] = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    assert grads["layer"].keys() == grads["explicit"].keys()
    for name, expected in grads["explicit"].items():
        torch.testing.assert_close(grads["layer"][name], expected, rtol=1e-4, atol=1e-5, msg=name)


def test_attention_with_bias_is_eq6_and_keeps_an_fp32_bias_gradient_under_bf16_autocast():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(3, 10, 10, requires_grad=True)
    explicit = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, dim=-1) @ v
    torch.testing.assert_close(attention_with_bias(q, k, v, bias), explicit, rtol=1e-5, atol=1e-5)
    (explicit_grad,) = torch.autograd.grad(explicit.sum(), bias)
    (grad,) = torch.autograd.grad(attention_with_bias(q, k, v, bias).sum(), bias)
    torch.testing.assert_close(grad, explicit_grad, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_with_bias(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert bias.grad is not None and bias.grad.dtype == torch.float32 and bool(torch.isfinite(bias.grad).all())


def test_tmsa_time_token_enters_q_k_v_as_a_linear_term():
    """q = x_s W_qs + x_t W_qt: TMSA(x, x_t) equals plain attention on projections shifted by x_t W_*t."""
    torch.manual_seed(1)
    layer = TMSA(dim=16, num_heads=2, window_size=2, time_dim=8)
    x, time_token = torch.randn(2, 4, 16), torch.randn(2, 8)
    shift = layer.qkv_time(time_token)  # [2, 48]
    plain = TMSA(dim=16, num_heads=2, window_size=2, time_dim=None)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("qkv_time")})
    with torch.no_grad():  # fold the per-image time shift into the spatial bias, one image at a time
        outputs = []
        for i in range(2):
            plain.qkv_spatial.bias.copy_(layer.qkv_spatial.bias + shift[i])
            outputs.append(plain(x[i : i + 1], None))
    torch.testing.assert_close(layer(x, time_token), torch.cat(outputs), rtol=1e-5, atol=1e-5)


def test_tmsa_output_changes_with_time_token():
    torch.manual_seed(2)
    layer = TMSA(dim=16, num_heads=2, window_size=2, time_dim=8)
    x = torch.randn(1, 4, 16)
    assert not torch.allclose(layer(x, torch.zeros(1, 8)), layer(x, torch.ones(1, 8)))


def test_tmsa_repeats_time_token_over_windows():
    torch.manual_seed(3)
    layer = TMSA(dim=16, num_heads=2, window_size=2, time_dim=8)
    x, time_token = torch.randn(2 * 3, 4, 16), torch.randn(2, 8)  # 2 images x 3 windows
    out = layer(x, time_token)
    for image in range(2):
        for window in range(3):
            row = image * 3 + window
            single = layer(x[row : row + 1], time_token[image : image + 1])
            torch.testing.assert_close(out[row : row + 1], single, rtol=1e-5, atol=1e-5)


def test_tmsa_rejects_wrong_token_count_and_missing_time():
    layer = TMSA(dim=16, num_heads=2, window_size=2, time_dim=8)
    with pytest.raises(ValueError, match="windows got 9 tokens"):
        layer(torch.randn(1, 9, 16), torch.randn(1, 8))
    with pytest.raises(ValueError, match="time token"):
        layer(torch.randn(1, 4, 16), None)


@pytest.mark.parametrize("window_size", [1, 2, 3, 5])
def test_relative_position_index_depends_only_on_offset(window_size):
    index = relative_position_index(window_size)
    coords = [(r, c) for r in range(window_size) for c in range(window_size)]
    by_offset = {}
    for i, (ri, ci) in enumerate(coords):
        for j, (rj, cj) in enumerate(coords):
            offset = (ri - rj, ci - cj)
            by_offset.setdefault(offset, set()).add(int(index[i, j]))
    assert all(len(values) == 1 for values in by_offset.values())  # same offset -> same table row
    rows = [next(iter(v)) for v in by_offset.values()]
    assert len(set(rows)) == len(rows) == (2 * window_size - 1) ** 2  # distinct offsets -> distinct rows
    assert min(rows) == 0 and max(rows) == (2 * window_size - 1) ** 2 - 1


def test_window_partition_then_reverse_is_identity_and_windows_are_contiguous_blocks():
    x = torch.arange(2 * 8 * 12 * 3, dtype=torch.float32).reshape(2, 8, 12, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 16, 3)
    torch.testing.assert_close(window_reverse(windows, 4, 8, 12), x)
    # window 1 of image 0 is rows 0-3, columns 4-7
    torch.testing.assert_close(windows[1].reshape(4, 4, 3), x[0, 0:4, 4:8])
    with pytest.raises(ValueError, match="not divisible"):
        window_partition(torch.zeros(1, 6, 6, 1), 4)


def test_sincos_pos_embed_matches_closed_form():
    dim, grid = 8, 3
    emb = get_2d_sincos_pos_embed(dim, grid)
    assert emb.shape == (9, 8)
    token = 1 * grid + 2  # row 1, column 2
    omega = [1.0, 1.0 / 100.0]  # 1 / 10000^(2i / (dim/2)) for i = 0, 1 with dim/2 = 4
    expected_w = [math.sin(2 * o) for o in omega] + [math.cos(2 * o) for o in omega]
    expected_h = [math.sin(1 * o) for o in omega] + [math.cos(1 * o) for o in omega]
    torch.testing.assert_close(emb[token], torch.tensor(expected_w + expected_h), rtol=1e-6, atol=1e-6)


def test_timestep_embedding_closed_form_and_odd_dim():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 4)
    freqs = [1.0, math.exp(-math.log(10000.0) / 2)]
    expected = [[math.cos(3 * f) for f in freqs] + [math.sin(3 * f) for f in freqs]]
    torch.testing.assert_close(emb[1:], torch.tensor(expected))
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert timestep_embedding(t, 5).shape == (2, 5)


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
def test_timestep_embedder_variants(embedding):
    torch.manual_seed(0)
    embedder = TimestepEmbedder(32, frequency_size=16, embedding=embedding)
    out = embedder(torch.tensor([0.1, 0.5]))
    assert out.shape == (2, 32)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="unknown time embedding"):
        TimestepEmbedder(32, embedding="learned")


def test_label_dropout_uses_null_class_at_the_requested_rate():
    embedder = LabelEmbedder(num_classes=10, hidden_size=4)
    assert embedder.table.num_embeddings == 11 and embedder.null_class == 10
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(labels, embedder.null_class, 0.1, generator=torch.Generator().manual_seed(0))
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - 0.1) < 0.01
    assert set(dropped.unique().tolist()) == {0, 10}
    assert torch.equal(drop_labels(labels, 10, 0.0), labels)


def test_relative_position_index_is_swins_table():
    # Swin Transformer's canonical table for a 2x2 window (row = query token i, column = key token j, the entry
    # encodes the offset of i from j): a transposed index (j - i) would load released weights and compute wrong
    # attention, so the exact table is pinned.
    assert relative_position_index(2).tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]


def test_relative_position_index_matches_the_released_16x16_layout_entry_by_entry():
    # The released DiffiT latent models use a 16x16 token grid: entry (i, j) is
    # (row_i - row_j + 15) * 31 + (col_i - col_j + 15), tokens numbered row-major.
    size = 16
    index = relative_position_index(size)
    assert index.shape == (size * size, size * size)
    for i in range(0, size * size, 37):
        for j in range(size * size):
            (row_i, col_i), (row_j, col_j) = divmod(i, size), divmod(j, size)
            expected = (row_i - row_j + size - 1) * (2 * size - 1) + (col_i - col_j + size - 1)
            assert index[i, j].item() == expected, (i, j)
    assert index.min().item() == 0 and index.max().item() == (2 * size - 1) ** 2 - 1


# ---------------------------------------------------------------------------------------------------------------
# Attention backends: "sdpa" (default), "flex" (FlexAttention, bias as score_mod), "math" (the formula)
# ---------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def eq6_float64(q, k, v, bias):
    """Eq. 6 in float64, written independently of diffit.layers (the reference of every backend)."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1) @ v


def eq6_float64_gradients(q, k, v, bias, out_grad):
    """Gradients of <Eq. 6, out_grad> w.r.t. float64 copies of q, k, v, bias (float64 even for bf16 inputs)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    return torch.autograd.grad(eq6_float64(*leaves), leaves, out_grad.double())


def attention_inputs(batch, heads, tokens, head_dim, device="cpu", dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=generator) for _ in range(3))
    bias = torch.randn(heads, tokens, tokens, generator=generator)  # std 1: large enough to matter
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    return q, k, v, bias.to(device).requires_grad_()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_backends_match_eq6_outputs_and_gradients_on_cpu(backend):
    q, k, v, bias = attention_inputs(2, 3, 16, 8)
    out_grad = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(1))
    out = attention_with_bias(q, k, v, bias, backend=backend)
    torch.testing.assert_close(out.double(), eq6_float64(q, k, v, bias), rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out, (q, k, v, bias), out_grad)
    expected = eq6_float64_gradients(q, k, v, bias, out_grad)
    for name, got, want in zip("q k v bias".split(), grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_flex_attention_score_mod_forward_equals_eq6_on_cpu():
    # FlexAttention runs forward-only on CPU (eager, unfused): the score_mod must add bias[head, query, key].
    from diffit.layers import flex_attention_with_bias

    q, k, v, bias = attention_inputs(2, 3, 16, 8)
    with torch.no_grad():
        out = flex_attention_with_bias(q, k, v, bias, compiled=False)
        transposed = flex_attention_with_bias(q, k, v, bias.transpose(1, 2), compiled=False)
    torch.testing.assert_close(out.double(), eq6_float64(q, k, v, bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(transposed, out, atol=1e-3)  # the (query, key) order of the bias matters


def test_flex_backend_refuses_cpu_training_with_a_clear_error():
    q, k, v, bias = attention_inputs(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="no backward on CPU.*'sdpa'"):
        attention_with_bias(q, k, v, bias, backend="flex")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention_with_bias(q, k, v, bias, backend="flash")


def test_set_attention_backend_reaches_every_tmsa_and_is_not_saved():
    from diffit.layers import set_attention_backend
    from diffit.models import create_model

    model = create_model("DiffiT-Tiny/2")
    state_before = model.state_dict().keys()
    layers = [m for m in model.modules() if isinstance(m, TMSA)]
    assert len(layers) == 2 and all(layer.attention_backend == "sdpa" for layer in layers)
    assert set_attention_backend(model, "math") is model
    assert all(layer.attention_backend == "math" for layer in layers)
    assert model.state_dict().keys() == state_before and "attention_backend" not in str(model.model_config)
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(model, "xformers")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    with torch.no_grad():
        math_out = model(x, t, y)
        sdpa_out = set_attention_backend(model, "sdpa")(x, t, y)
    torch.testing.assert_close(math_out, sdpa_out, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flex_backend_compiled_on_cpu_gives_the_models_sdpa_output():
    # Compiles FlexAttention with inductor's CPU backend (~30 s on 2 cores, once per shape).
    from diffit.layers import set_attention_backend
    from diffit.models import create_model

    torch.manual_seed(0)
    model = create_model("DiffiT-Tiny/2").eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.relative_position_bias, std=1.0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    with torch.no_grad():
        sdpa_out = model(x, t, y)
        flex_out = set_attention_backend(model, "flex")(x, t, y)
    torch.testing.assert_close(flex_out, sdpa_out, rtol=1e-4, atol=1e-5)


CUDA_BACKENDS = ["sdpa", "sdpa-efficient", "flex"]


def cuda_attention(backend, q, k, v, bias):
    """A backend of `attention_with_bias`; "sdpa-efficient" pins SDPA to its memory-efficient kernel."""
    if backend == "sdpa-efficient":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return attention_with_bias(q, k, v, bias, backend="sdpa")
    return attention_with_bias(q, k, v, bias, backend=backend)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_attention_backends_on_cuda_match_eq6_outputs_and_gradients(backend, dtype, monkeypatch):
    # DiffiT-XL/2's attention: 16 heads over a 16x16 token grid, head dim 72 (not a power of two).
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    q, k, v, bias = attention_inputs(2, 16, 256, 72, device="cuda", dtype=dtype)
    out_grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    out = cuda_attention(backend, q, k, v, bias)
    grads = torch.autograd.grad(out, (q, k, v, bias), out_grad)
    reference = eq6_float64(q, k, v, bias)
    expected = eq6_float64_gradients(q, k, v, bias, out_grad)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert out.dtype == dtype and grads[3].dtype == torch.float32  # the bias gradient stays fp32
    torch.testing.assert_close(out.double(), reference, **tolerance)
    for name, got, want in zip("q k v bias".split(), grads, expected):
        scale = want.abs().max().item()  # bf16 gradients: compare relative to the gradient's size
        torch.testing.assert_close(
            got.double() / scale, want / scale, **tolerance, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.cuda
@needs_cuda
def test_latent_diffit_training_step_on_cuda_is_the_same_with_flex_and_sdpa():
    from diffit.layers import set_attention_backend
    from diffit.models import create_model

    torch.manual_seed(0)
    model = create_model("DiffiT-S/2", num_classes=10).cuda()
    x = torch.randn(4, 4, 32, 32, device="cuda")
    t, y = torch.tensor([1.0, 250.0, 500.0, 999.0], device="cuda"), torch.tensor([0, 3, 5, 10], device="cuda")
    grads = {}
    for backend in ("sdpa", "flex"):
        set_attention_backend(model, backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, t, y).float().square().mean()
        loss.backward()
        grads[backend] = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["flex"].keys()
    assert any("relative_position_bias" in name for name in grads["flex"])
    for name, expected in grads["sdpa"].items():
        scale = expected.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grads["flex"][name] / scale, expected / scale, rtol=3e-2, atol=3e-2, msg=name)
