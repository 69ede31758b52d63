"""Which maintained AdamW keeps small updates in pure bf16 training (bf16 weights and bf16 optimizer states)?

Candidates, all from the same bf16 start and the same gradient sequence: plain `torch.optim.AdamW` on bf16 weights
(round-to-nearest loses updates below half a bf16 ulp), `optimi.AdamW(kahan_sum=True)` (torch-optimi, Kahan-
compensated) and `torchao.optim.AdamW8bit(bf16_stochastic_round=True)` (fp32 maths, stochastic rounding to bf16;
torchao 0.18's only public AdamW with that option has 8-bit states; its private full-size one measured the same to
3 digits). Reference: `torch.optim.AdamW` on the fp32 upcast of the same
start. Per candidate: its update (final - start) against the reference's (cosine, norm ratio), overall, for the
~N(0, 0.02) matrices and for the ones-vector; the share of elements that never changed; the share of the reference's
weight decay it applied; measured optimizer-state bytes per parameter; CPU step time on a 2048x2048 matrix (the first
step, which includes torchao's torch.compile for that shape, apart). "kahan+comp" is the kahan run with its
compensation buffer added back: updates Kahan still owes the weights, deferred rather than lost.

Run: `python bench/bf16_optimizers.py` (CPU, no network; about 1-2 minutes on 2 cores, most of it torchao's cold
torch.compile, which needs a C++ compiler). The accuracy figures are deterministic; step times move with machine load.
"""

import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # cold compiles, so the compile time is repeatable

import statistics  # noqa: E402
import time  # noqa: E402

import optimi  # noqa: E402
import torch  # noqa: E402
import torchao.optim  # noqa: E402

SEED, BETAS, EPS = 0, (0.9, 0.999), 1e-8
LRS, WDS, STEPS = (1e-5, 2e-5, 1e-4), (0.0, 0.1), (60, 100)
HEADLINE_WD, HEADLINE_STEPS = 0.0, 100
GRAD_SCALE = 1e-3  # gradients of a realistic size; Adam is scale-free except for eps, which this keeps negligible

CANDIDATES = {  # name -> (weight dtype, optimizer factory); eps and betas pinned, since optimi's defaults differ
    "fp32_ref": (torch.float32, lambda ps, lr, wd: torch.optim.AdamW(ps, lr, BETAS, EPS, wd)),
    "plain_bf16": (torch.bfloat16, lambda ps, lr, wd: torch.optim.AdamW(ps, lr, BETAS, EPS, wd)),
    "kahan": (torch.bfloat16, lambda ps, lr, wd: optimi.AdamW(ps, lr, BETAS, wd, EPS, kahan_sum=True)),
    "sr8bit": (torch.bfloat16,
               lambda ps, lr, wd: torchao.optim.AdamW8bit(ps, lr, BETAS, EPS, wd, bf16_stochastic_round=True)),
}
GROUPS = {"all": slice(None), "mat": slice(0, 3), "ones": slice(3, 4)}  # params 0-2: matrices, 3: the ones-vector


def start_params():
    """Three ~N(0, 0.02) 256x256 matrices and a norm weight of ones, built in bf16 so every optimizer starts equal."""
    g = torch.Generator().manual_seed(SEED)
    mats = [(0.02 * torch.randn(256, 256, generator=g)).bfloat16() for _ in range(3)]
    return mats + [torch.ones(256, dtype=torch.bfloat16)]


def gradients(start, steps):
    """g_t = a fixed direction + as much fresh noise, in fp32; every optimizer casts them to its weight dtype."""
    g = torch.Generator().manual_seed(SEED + 1)
    direction = [torch.randn(p.shape, generator=g) for p in start]
    return [[GRAD_SCALE * (d + torch.randn(d.shape, generator=g)) for d in direction] for _ in range(steps)]


def state_bytes(opt):
    """Bytes of every tensor in the optimizer state; quantized states are counted through their inner tensors, and a
    storage shared between states once."""
    seen, total, stack = set(), 0, [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    while stack:
        t = stack.pop()
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # a tensor subclass: its inner tensors
            stack.extend(getattr(t, name) for name in t.__tensor_flatten__()[0])
        elif t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def train(name, lr, wd, start, grads):
    """Runs one optimizer; returns {steps: {variant: (fp32 updates, per-parameter never-changed masks)}}, bytes."""
    dtype, make = CANDIDATES[name]
    params = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in start]  # bf16 .to() would alias start
    opt = make(params, lr, wd)
    torch.manual_seed(SEED)  # stochastic rounding draws from the global generator
    unchanged = [torch.ones(p.shape, dtype=torch.bool) for p in params]
    snaps = {}
    for step, grad in enumerate(grads, 1):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grad):
            p.grad = g.to(dtype)
        opt.step()
        for u, p, b in zip(unchanged, params, before):
            u &= p == b
        if step in STEPS:
            upd = [p.detach().float() - s.float() for p, s in zip(params, start)]
            snaps[step] = {name: (upd, [u.clone() for u in unchanged])}
            if name == "kahan":
                comp = [u + opt.state[p]["kahan_comp"].float() for u, p in zip(upd, params)]
                snaps[step]["kahan+comp"] = (comp, [u.clone() for u in unchanged])
    return snaps, state_bytes(opt) / sum(p.numel() for p in params)


def compare(upd, ref, unchanged):
    """{group: (cosine, norm ratio, never-changed share)} of an update against the fp32 reference's update."""
    out = {}
    for group, sl in GROUPS.items():
        a, b = torch.cat([t.flatten() for t in upd[sl]]), torch.cat([t.flatten() for t in ref[sl]])
        still = torch.cat([u.flatten() for u in unchanged[sl]]).double().mean().item()
        out[group] = (torch.nn.functional.cosine_similarity(a, b, dim=0).item(), (a.norm() / b.norm()).item(), still)
    return out


def decay_share(raw, lr, variant):
    """How much of the reference's weight decay an optimizer applied: the (wd 0.1 - wd 0) difference of its update,
    projected on the reference's (1 = all of it, 0 = none)."""
    def diff(name):
        runs = [raw[wd, lr, HEADLINE_STEPS][name][0] for wd in WDS]
        return torch.cat([(b - a).flatten() for a, b in zip(*runs)])
    ref = diff("fp32_ref")
    return (torch.dot(diff(variant), ref) / ref.square().sum()).item()


def step_times(n=2048, warmup=3, timed=20):
    """{name: (first step s, which includes state creation and any compile for this shape; median later step ms)}.
    Candidates take turns step by step, so that other jobs on a shared machine slow all of them alike."""
    g = torch.Generator().manual_seed(SEED)
    weight, grad = 0.02 * torch.randn(n, n, generator=g), GRAD_SCALE * torch.randn(n, n, generator=g)
    opts, times = {}, {name: [] for name in CANDIDATES}
    for name, (dtype, make) in CANDIDATES.items():
        p = torch.nn.Parameter(weight.to(dtype, copy=True))
        p.grad = grad.to(dtype)
        opts[name] = make([p], 1e-5, 0.0)
    for _ in range(1 + warmup + timed):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    return {name: (t[0], statistics.median(t[1 + warmup:]) * 1e3) for name, t in times.items()}


def main():
    t0 = time.perf_counter()
    start, raw, results, bytes_per_param = start_params(), {}, {}, {}
    grads = gradients(start, max(STEPS))
    for wd in WDS:
        for lr in LRS:
            for name in CANDIDATES:
                snaps, bytes_per_param[name] = train(name, lr, wd, start, grads)
                for steps, runs in snaps.items():
                    raw.setdefault((wd, lr, steps), {}).update(runs)
    for key, runs in raw.items():
        ref = runs["fp32_ref"][0]
        results[key] = {v: compare(upd, ref, unchanged) for v, (upd, unchanged) in runs.items()}
    names = list(raw[HEADLINE_WD, LRS[0], HEADLINE_STEPS])
    decay = {(v, lr): decay_share(raw, lr, v) for v in names for lr in LRS}
    timing = step_times()

    print("Update vs the fp32 reference: cosine / norm ratio / share never changed, per group "
          "(all; mat = 3 x 256x256 ~N(0,0.02); ones = 256-vector of ones)")
    head = f"{'wd':>4} {'lr':>6} {'steps':>5} {'optimizer':<11}" + "".join(
        f" {g + ' cos':>8} {g + ' ratio':>10} {g + ' unch':>9}" for g in GROUPS)
    print(head + "\n" + "-" * len(head))
    for (wd, lr, steps), runs in sorted(results.items()):
        for v, groups in runs.items():
            cells = "".join(f" {c:8.4f} {r:10.4f} {s:9.1%}" for c, r, s in groups.values())
            print(f"{wd:4g} {lr:6.0e} {steps:5d} {v:<11}{cells}")
    print(f"\nShare of the reference's weight decay applied (wd {WDS[1]:g} run minus wd {WDS[0]:g} run, "
          f"{HEADLINE_STEPS} steps)\n{'optimizer':<11}" + "".join(f" {f'lr {lr:.0e}':>9}" for lr in LRS))
    for v in names:
        print(f"{v:<11}" + "".join(f" {decay[v, lr]:9.3f}" for lr in LRS))
    print(f"\nState bytes/param (accuracy setting, measured); CPU step time ({torch.get_num_threads()} threads, "
          "one 2048x2048 matrix, bf16; fp32 for fp32_ref)")
    print(f"{'optimizer':<11} {'bytes/param':>11} {'first step s':>12} {'median step ms':>14}")
    for name in CANDIDATES:
        print(f"{name:<11} {bytes_per_param[name]:11.3f} {timing[name][0]:12.2f} {timing[name][1]:14.2f}")

    print(f"\nHeadlines (wd {HEADLINE_WD:g}, {HEADLINE_STEPS} steps, all parameters; decay_share from wd {WDS[1]:g}):")
    for v in names[1:]:
        for lr in LRS:
            cos, ratio, still = results[HEADLINE_WD, lr, HEADLINE_STEPS][v]["all"]
            tag = f"{v.replace('+', '_')}_%s_lr{lr:.0e}".replace("e-0", "e-")
            print(f"{tag % 'cosine'}: {cos:.4f}\n{tag % 'norm_ratio'}: {ratio:.4f}\n"
                  f"{tag % 'unchanged_share'}: {still:.4f}\n{tag % 'decay_share'}: {decay[v, lr]:.3f}")
    for name in CANDIDATES:
        print(f"{name}_state_bytes_per_param: {bytes_per_param[name]:.3f}\n{name}_step_ms: {timing[name][1]:.2f}\n"
              f"{name}_first_step_s: {timing[name][0]:.2f}")
    print(f"runtime_s: {time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
