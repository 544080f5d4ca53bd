"""One GPU: the context-parallel kernel path (segments + LocalSegmentExchange, no communication)
against the one-pass kernels on the same tokens, to price the slot-by-slot forward and the
carried-state loads. bf16, B = 1, H = 16, d = 128, fwd+bwd median ms.

    python benchmarks/bench_segments.py [--tokens 65536,262144]
"""

import argparse

import torch
from triton.testing import do_bench

from regla_kernels import LocalSegmentExchange, chunk_regla, chunk_regla_segments, sequence_key_max
from regla_kernels.triton.backend import segments_per_sequence
from regla_kernels.triton.settings import LAUNCH

HEADS, DIM = 16, 128


def timed(step, leaves):
    out = step()
    grad = torch.randn_like(out)
    return do_bench(lambda: torch.autograd.grad(step(), leaves, grad), warmup=10, rep=100, return_mode="median")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="65536,262144")
    for tokens in (int(t) for t in parser.parse_args().tokens.split(",")):
        r = lambda b=0.0: (torch.randn(1, tokens, HEADS, DIM, device="cuda") + b).to(torch.bfloat16).requires_grad_(True)
        q, k, v, z, u = r(), r(), r(), r(2.0), r()
        whole = timed(lambda: chunk_regla(q, k, v, z, u, backend="triton", output_final_state=True)[0], [q, k, v, z, u])
        row = [f"tokens {tokens}: one pass {whole:.2f} ms"]
        for segments, slots in ((2, 1), (2, 2), (4, 2)):
            cut = lambda x: x.reshape(segments, tokens // segments, HEADS, DIM)
            key_max = sequence_key_max(k).repeat(segments, 1)
            step = lambda: chunk_regla_segments(
                *(cut(x) for x in (q, k, v, z, u)), LocalSegmentExchange(segments, slots), key_max=key_max
            )
            row.append(f"{segments} segments / {slots} slots {timed(step, [q, k, v, z, u]):.2f} ms")
        saved = dict(LAUNCH)
        for target in (128, 264, 528):  # chunk_regla's own route (LAUNCH["segment_min_programs"])
            LAUNCH.update(segment_min_programs=target, segment_below_programs=target)
            segments = segments_per_sequence(1, HEADS, DIM, DIM, tokens)
            auto = timed(lambda: chunk_regla(q, k, v, z, u, backend="triton")[0], [q, k, v, z, u])
            row.append(f"chunk_regla with segment_min_programs={target} ({segments} segments) {auto:.2f} ms")
        LAUNCH.update(saved)
        print("; ".join(row), flush=True)


if __name__ == "__main__":
    main()
