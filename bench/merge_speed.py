"""LoRACLR merge speed: this pack's solver against the reference formulation, side by side.

12 concepts (by default) on SD1.5-shaped layers:

* the 16 cross-attention blocks' to_k and to_v (32 layers) at their real widths (768 → 320/640/1280),
  2 prompts × 77 tokens per concept;
* a representative set of spatial layers (attn1 q/out, a 1×1 proj_in conv, ff.net.2) with the rows a
  20-step recording gives, at a 32×32 latent for the 320-wide level where the full 64×64 latent
  would not fit the reference in memory on this machine.

Synthetic activations are drawn like concept prompts from one template (a shared component plus
a per-concept one) and low-rank LoRA deltas at about a tenth of the base weight's scale.

Reference: stacked raw activations, ΔW optimised by AdamW (lr 1e-4, weight decay 1e-4) for 50
iterations from zero, pairwise distances from squared norms and one cross product, the best
iterate kept: the formulation of the official implementation, in float32.
Ours: the activations streamed step by step into the pack's bounded statistics
(``AdaptiveLayerStats``, timed), then ``merge_layer`` with the pack's defaults.
Both results are scored with the same exact objective. Each side runs in its own process so
peak memory (RSS above the data) is measured separately.

    python bench/merge_speed.py                  # full run (several minutes on 2 CPU cores)
    python bench/merge_speed.py --quick          # small smoke run
    python bench/merge_speed.py --device cuda    # both sides with the activations on the GPU

With ``--device cuda`` the activations and weights are generated as on the CPU (same seeds) and
put on the GPU; the reference runs there entirely. The pack's side receives each recorded step's
rows on the GPU and folds them into its statistics where the collection keeps them, on the CPU
(the copies are timed), then merges. Times are taken after ``torch.cuda.synchronize()``; memory
is the RSS above the data plus the GPU's peak allocation above it.
Last line: merge_speed: ratio=<reference time / ours> objective_ours=<x> objective_ref=<y> mem_ratio=<ref/ours>
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_pack():
    if "comfyui_loraclr" not in sys.modules:
        pkg = types.ModuleType("comfyui_loraclr")
        pkg.__path__ = [ROOT]
        sys.modules["comfyui_loraclr"] = pkg
    import comfyui_loraclr.loraclr as lib
    from comfyui_loraclr.loraclr.streaming import AdaptiveLayerStats

    return lib, AdaptiveLayerStats


# (name, in, out, rows per recorded step, recorded steps)
CROSS_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]


def layer_specs(quick: bool):
    specs = []
    for b, w in enumerate(CROSS_WIDTHS):
        for kv in ("to_k", "to_v"):
            specs.append((f"block{b}.attn2.{kv}", 768, w, 154, 1))
    specs += [
        ("down0.attn1.to_q", 320, 320, 1024, 20),       # 32×32 latent (64×64 scaled down), 20 steps
        ("down1.attn1.to_out.0", 640, 640, 256, 20),    # 16×16 latent, 20 steps
        ("mid.proj_in (1×1 conv)", 1280, 1280, 64, 20),  # 8×8 latent: real size
        ("up3.ff.net.2", 1280, 320, 256, 20),            # GEGLU inner width 1280 → 320
    ]
    if quick:
        specs = specs[:4] + [(n, i, o, max(8, r // 8), s) for n, i, o, r, s in specs[32:]]
    return specs


def make_layer(spec, n_concepts, seed):
    import torch

    name, d_in, d_out, rows_step, steps = spec
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    rank = 8
    deltas = [0.1 * torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g) / (d_in * rank) ** 0.5
              for _ in range(n_concepts)]
    rows = rows_step * steps
    shared = torch.randn(rows, d_in, generator=g)
    X = [shared + 0.5 * torch.randn(rows, d_in, generator=g) for _ in range(n_concepts)]
    Ws = [W0 + d for d in deltas]
    Y = [x @ w.T for x, w in zip(X, Ws)]
    return W0, Ws, X, Y, rows_step


def reference_merge(W0, X, Y, iters=50, lr=1e-4, margin=0.5, lambda_con=1.0, lambda_mse=0.1, lambda_reg=0.001):
    import torch

    inputs, outputs = torch.stack(X), torch.stack(Y)
    n = inputs.shape[0]
    offset = torch.nn.Parameter(torch.zeros_like(W0))
    opt = torch.optim.AdamW([offset], lr=lr, weight_decay=1e-4)
    eye = torch.eye(n, dtype=torch.bool, device=W0.device)
    best, best_w = float("inf"), W0.clone()
    for _ in range(iters):
        opt.zero_grad()
        pred = torch.nn.functional.linear(inputs, W0 + offset)
        k, v = pred.reshape(n, -1), outputs.reshape(n, -1)
        d2 = k.pow(2).sum(1, keepdim=True) + v.pow(2).sum(1)[None] - 2 * k @ v.T
        dist = torch.sqrt(d2.clamp_min(1e-12))
        pos = dist.diagonal()
        neg = dist.masked_fill(eye, float("inf")).min(dim=1).values
        con = (pos.pow(2) + torch.clamp(margin - neg, min=0).pow(2)).mean()
        loss = lambda_con * con + lambda_mse * torch.nn.functional.mse_loss(pred, outputs) + lambda_reg * offset.norm()
        if loss.item() < best:
            best, best_w = loss.item(), (W0 + offset).detach().clone()
        loss.backward()
        opt.step()
    return best_w - W0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakCUDA:
    """Peak GPU memory allocated above the start of the block (0 off CUDA)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.extra = 0

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base


def sync(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class PeakRSS:
    def __enter__(self):
        self.base = _rss()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def run_side(side, n_concepts, quick, device, queue):
    import torch

    torch.manual_seed(0)
    lib, AdaptiveLayerStats = _import_pack()
    total_t, total_obj, peak = 0.0, 0.0, 0
    per_layer = []
    for k, spec in enumerate(layer_specs(quick)):
        W0, Ws, X, Y, rows_step = make_layer(spec, n_concepts, seed=1000 + k)
        if device != "cpu":  # the data sits on the device before timing starts, as recorded there
            dev = [t.to(device) for t in (W0, *X, *Y)]
            W0d, Xd, Yd = dev[0], dev[1:1 + n_concepts], dev[1 + n_concepts:]
            sync(device)
        else:
            W0d, Xd, Yd = W0, X, Y
        with PeakRSS() as mem, PeakCUDA(device) as gpu:
            t0 = time.perf_counter()
            if side == "ref":
                dW = reference_merge(W0d, Xd, Yd)
            else:
                acc = AdaptiveLayerStats(n_concepts, spec[1], spec[2], weights=Ws, base=W0)
                for s in range(0, X[0].shape[0], rows_step):  # one recorded step at a time
                    acc.add([x[s:s + rows_step].cpu() for x in Xd])  # where the collection keeps them
                res = lib.merge_layer(W0, acc.finish(), lib.MergeConfig())
                dW = res.delta
            sync(device)
            dt = time.perf_counter() - t0
        peak = max(peak, mem.extra + gpu.extra)
        dW = dW.cpu()
        del W0d, Xd, Yd
        score_stats = lib.LayerStats.from_rows(X, Y, force="rows")
        obj, _ = lib.loraclr_objective(W0 + dW, score_stats, W0)
        total_t += dt
        total_obj += float(obj)
        per_layer.append((spec[0], dt, float(obj)))
    queue.put({"time": total_t, "objective": total_obj, "peak": peak, "layers": per_layer})


def in_fresh_process(target, *args):
    """Run ``target(*args, queue)`` in a new interpreter and return what it puts on the queue, so
    each side's memory high-water mark is its own."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    # wait for the result, but not for ever: a child that dies (an exception, killed for memory)
    # puts nothing on the queue, and the benchmark must then fail rather than hang
    while True:
        try:
            out = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not p.is_alive():
                try:  # it may have put its result just before exiting
                    out = q.get(timeout=1.0)
                    break
                except queue.Empty:
                    raise RuntimeError(f"{getattr(target, '__name__', target)}{args} failed in its process "
                                       f"(exit code {p.exitcode}); its error is printed above") from None
    p.join()
    return out


def measure(side, n_concepts, quick, device="cpu"):
    return in_fresh_process(run_side, side, n_concepts, quick, device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="few small layers (smoke test)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the activations live and the reference runs (default cpu)")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False (no GPU or a CPU-only torch build)")
    gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}{gpu}, "
          f"{args.concepts} concepts, {len(layer_specs(args.quick))} layers", flush=True)
    ours = measure("ours", args.concepts, args.quick, args.device)
    ref = measure("ref", args.concepts, args.quick, args.device)
    print(f"{'layer':28s} {'ref s':>8s} {'ours s':>8s} {'speed-up':>9s} {'obj ref':>12s} {'obj ours':>12s}")
    for (name, tr, orf), (_, to, oo) in zip(ref["layers"], ours["layers"]):
        print(f"{name:28s} {tr:8.3f} {to:8.3f} {tr / to:9.1f} {orf:12.5g} {oo:12.5g}")
    what = "RSS + GPU allocation" if args.device == "cuda" else "RSS"
    print(f"total: reference {ref['time']:.1f}s, ours {ours['time']:.1f}s; peak extra {what} reference "
          f"{ref['peak'] / 2**20:.0f} MiB, ours {ours['peak'] / 2**20:.0f} MiB")
    print(f"merge_speed: ratio={ref['time'] / ours['time']:.2f} objective_ours={ours['objective']:.6g} "
          f"objective_ref={ref['objective']:.6g} mem_ratio={ref['peak'] / max(ours['peak'], 1):.2f}")


if __name__ == "__main__":
    main()
