"""Cascade decode attention: one decode step of one layer, the prompt read once per group vs once per sample.

bf16, Qwen2.5-VL-7B attention (28 query / 4 KV heads, D 128), pages of 16; N = groups (``--n``, default 1–32),
8 siblings each, prompt 1229 tokens (docs/kv-sharing.md §6), each sample at suffix length s before the step
(case ``decode_s<s>``, s = 0, 384, 768; the step appends one more token). Page tables keep their rollout widths
(prompt ⌈1229/16⌉, suffix ⌈769/16⌉ pages), as the engine runs them.
Implementations:
  vr1fast_cascade    ``attention.cascade_decode_attention`` (level 1 reads each prompt's pages once for its 8
                     siblings, 56 query rows a tile; level 2 each sample's own pages; LSE merge)
  vr1fast_unshared   the same kernels with ``share=False``: the prompt's pages read once per sample, what a
                     per-sequence paged kernel (vLLM's prefix cache) does
  torch_sdpa         ``F.scaled_dot_product_attention`` (enable_gqa) on dense per-sample K/V [S, Hkv, L, D] gathered
                     before timing (HF generate's layout: every sample holds its own prompt copy)
  vr1fast_reference  ``reference_paged`` (pure torch, gathers the pages per call)
Rate: the KV bytes the implementation reads per step (prompt KV × groups for the cascade, × samples for the others,
plus every sample's own KV) / time, vs the d2d copy rate; the note gives the prompt-KV MB read per step and, on the
cascade row, its speed-up over vr1fast_unshared (SPEC: ≥ 3× at 8 siblings).

    python benchmarks/bench_attention.py [--n 1,2,4,8,16,32] [--max-seconds S] [--out benchmarks/results]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _harness import Results, copy_gbps, parse_args, sizes

HQ, HKV, D, PAGE, SIBLINGS, PROMPT, SUFFIXES = 28, 4, 128, 16, 8, 1229, (0, 384, 768)
SMOKE = dict(hq=4, hkv=2, d=16, page=4, siblings=2, prompt=23, suffixes=(0, 9))


class Step:
    """Caches, page tables and the new tokens of one decode step: ``groups`` prompts × ``siblings`` samples."""

    def __init__(self, groups, siblings, prompt, suffix, width, hq, hkv, d, page, device):
        g = torch.Generator(device=device).manual_seed(0)
        S, pp, sp = groups * siblings, -(-prompt // page), -(-width // page)
        self.k_cache, self.v_cache = (torch.randn(groups * pp + S * sp, page, hkv, d, device=device, generator=g,
                                                  dtype=torch.bfloat16) for _ in range(2))
        pages = torch.arange(groups * pp + S * sp, device=device, dtype=torch.int32)
        self.prefix_table, self.suffix_table = pages[:groups * pp].view(groups, pp), pages[groups * pp:].view(S, sp)
        self.prefix_lens = torch.full((groups,), prompt, device=device)
        self.groups = torch.arange(groups, device=device).repeat_interleave(siblings)
        self.suffix_lens = torch.full((S,), suffix + 1, device=device)
        self.slots = (self.suffix_table[:, suffix // page].long() * page + suffix % page)
        self.q = torch.randn(S, hq, d, device=device, generator=g, dtype=torch.bfloat16)
        self.k, self.v = (torch.randn(S, hkv, d, device=device, generator=g, dtype=torch.bfloat16) for _ in range(2))
        self.siblings = siblings

    def args(self):
        return (self.q, self.k, self.v, self.k_cache, self.v_cache, self.slots, self.prefix_table, self.prefix_lens,
                self.groups, self.suffix_table, self.suffix_lens)

    def dense(self, prompt: int, suffix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample K/V [S, Hkv, prompt + suffix + 1, D]: the sample's prompt copy ‖ its own tokens."""
        out = []
        for cache in (self.k_cache, self.v_cache):
            pre = cache[self.prefix_table[self.groups].long()].flatten(1, 2)[:, :prompt]
            own = cache[self.suffix_table.long()].flatten(1, 2)[:, :suffix + 1]
            out.append(torch.cat([pre, own], 1).transpose(1, 2).contiguous())
        return out[0], out[1]


def decode_case(res: Results, groups: int, suffix: int, shape: dict, gbps: float) -> None:
    from vr1fast import kernels
    from vr1fast.kernels import attention

    s = shape
    width = max(SMOKE["suffixes"] if res.args.cpu_smoke else SUFFIXES) + 1
    step = Step(groups, s["siblings"], s["prompt"], suffix, width, s["hq"], s["hkv"], s["d"], s["page"],
                res.args.device)
    k_dense, v_dense = step.dense(s["prompt"], suffix)
    q4 = step.q[:, :, None]
    token = s["hkv"] * s["d"] * 2 * 2  # K and V bytes of one token of one layer (bf16)
    S = groups * s["siblings"]
    impls = {
        "vr1fast_unshared": (lambda: attention.cascade_decode_attention(*step.args(), share=False), S),
        "vr1fast_cascade": (lambda: attention.cascade_decode_attention(*step.args(), max_group=s["siblings"]), groups),
        "torch_sdpa": (lambda: F.scaled_dot_product_attention(q4, k_dense, v_dense, enable_gqa=True), S),
        "vr1fast_reference": (lambda: kernels.implementation("cascade_decode_attention", "reference")(*step.args()),
                              S),
    }
    row = dict(N=groups, H=s["hq"], V="", dtype="bf16")
    rows = {}
    with torch.no_grad():
        for impl, (fn, prompt_reads) in impls.items():
            prompt_bytes = prompt_reads * s["prompt"] * token
            rows[impl] = res.add(f"decode_s{suffix}", impl, row, fn, work=prompt_bytes + S * (suffix + 1) * token,
                                 unit="GB/s", roofline=gbps, note=f"prompt KV {prompt_bytes / 1e6:.4g} MB/step")
    cascade, unshared = rows["vr1fast_cascade"].get("ms_p50"), rows["vr1fast_unshared"].get("ms_p50")
    if cascade and unshared:
        rows["vr1fast_cascade"]["note"] += f"; {unshared / cascade:.3g}x vr1fast_unshared"
        res.flush()
        print(f"groups={groups} suffix={suffix}: cascade {unshared / cascade:.2f}x the unshared kernel", flush=True)

def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "1,2,4,8,16,32", "1,2")
    shape = dict(SMOKE) if args.cpu_smoke else dict(hq=HQ, hkv=HKV, d=D, page=PAGE, siblings=SIBLINGS, prompt=PROMPT,
                                                     suffixes=SUFFIXES)
    res = Results("attention", args)
    gbps = copy_gbps(1 << 26 if args.device.type == "cuda" else 1 << 20, args.device)
    for groups in sizes(args):
        for suffix in shape["suffixes"]:
            decode_case(res, groups, suffix, shape, gbps)
    print(f"wrote {res.save()}")


if __name__ == "__main__":
    main()
