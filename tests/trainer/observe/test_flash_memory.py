"""The meta-device memory estimate counts attention as a GPU's flash kernels hold it."""
import torch
import torch.nn.functional as F

from trainers.lokr.observe.memory import LiveBytes, flash_attention_memory


def test_attention_holds_output_and_logsumexp_not_the_score_matrix():
    b, h, n, d = 4, 10, 4096, 64  # SDXL's 64×64-latent attention at batch 4
    q, k, v = (torch.empty(b, h, n, d, device="meta", dtype=torch.float16, requires_grad=True) for _ in range(3))
    counter = LiveBytes()
    with counter, flash_attention_memory():
        out = F.scaled_dot_product_attention(q, k, v)
        forward = counter.peak
        out.backward(torch.empty_like(out))
    # output fp16 b·h·n·d·2 bytes + log-sum-exp fp32 b·h·n·4 bytes; q, k, v existed before
    assert forward == b * h * n * d * 2 + b * h * n * 4 == 21_626_880
    assert q.grad.shape == k.grad.shape == v.grad.shape == (b, h, n, d)
    # the math path keeps at least one fp16 score matrix b·h·n·n (1.34 GB) per attention
    math = LiveBytes()
    with math:
        F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
    assert math.peak >= b * h * n * n * 2


def test_other_devices_are_untouched():
    q = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4) / 10
    before = F.scaled_dot_product_attention
    with flash_attention_memory():
        got = F.scaled_dot_product_attention(q, q, q)
    weights = torch.softmax(q @ q.transpose(-1, -2) / 2, dim=-1)  # scale 1/√4
    torch.testing.assert_close(got, weights @ q)
    assert F.scaled_dot_product_attention is before  # restored on leaving
