"""Forward+backward time of one TMSA attention core with a trainable relative-position bias, per variant.

The variants DiffiT's CPU training path chose between (see docs/benchmarks.md, model_step):
  bias gather   `[N, N, heads]` gather permuted to `[heads, N, N]` (the Swin / released-DiffiT way) vs
                `diffit.layers.TMSA.attention_bias` (gathered straight into `[heads, N*N]`);
  attention     SDPA with the bias as a float mask that needs a gradient (`diffit.layers.attention_with_bias`),
                and SDPA without any mask (what a DiT layer runs) for scale.

    python bench/attention.py                      # XL/2 layer: batch 2, 16 heads, 16x16 tokens, head dim 72
    python bench/attention.py --batch 8 --heads 12 --head-dim 64

On a GPU, `bench/device_check.py` times the CUDA variants against each other at the same shape: SDPA's
memory-efficient and cuDNN kernels with the bias as a float mask, FlexAttention with the bias as a compiled
`score_mod` (`diffit.layers` backend "flex"), and SDPA's flash kernel without bias as the ceiling.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from diffit.layers import TMSA, attention_with_bias, relative_position_index


def timed(step, repeats: int) -> float:
    """Median milliseconds of `step()` over `repeats` calls after two warm-ups."""
    step()
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--window", type=int, default=16, help="tokens per side (latent grid / window size)")
    parser.add_argument("--head-dim", type=int, default=72)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = args.window**2
    print(
        f"# attention  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
        f"threads={torch.get_num_threads()}  torch {torch.__version__}  batch {args.batch}, {args.heads} heads, "
        f"{tokens} tokens, head dim {args.head_dim}"
    )
    print()
    print("| part | variant | fwd+bwd ms (median) |")
    print("|---|---|---|")

    layer = TMSA(args.heads * args.head_dim, args.heads, args.window)
    index = relative_position_index(args.window).reshape(-1)
    bias_grad = torch.randn(args.heads, tokens, tokens)

    def swin_gather():
        bias = layer.relative_position_bias[index].reshape(tokens, tokens, args.heads).permute(2, 0, 1)
        bias.backward(bias_grad)

    def diffit_gather():
        layer.attention_bias().backward(bias_grad)

    for name, step in (("[N, N, heads] gather, permuted", swin_gather), ("[heads, N*N] gather (ours)", diffit_gather)):
        print(f"| bias gather | {name} | {timed(step, args.repeats):.2f} |")

    shape = (args.batch, args.heads, tokens, args.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    bias = (0.1 * torch.randn(args.heads, tokens, tokens)).requires_grad_()
    out_grad = torch.randn(shape)
    variants = {
        "SDPA, float mask with gradient (attention_with_bias)": lambda: attention_with_bias(q, k, v, bias),
        "SDPA, no mask (a DiT layer)": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    for name, forward in variants.items():
        step = lambda forward=forward: forward().backward(out_grad)
        print(f"| attention | {name} | {timed(step, args.repeats):.2f} |")


if __name__ == "__main__":
    main()
